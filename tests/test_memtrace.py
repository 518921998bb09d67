import json

import numpy as np

from lohan_jax.memtrace import MemTrace, snapshot


def test_snapshot_reads_proc():
    snap = snapshot()
    assert snap["VmRSS"] > 0 and snap["sys_MemAvailable"] > 0


def test_trace_lines_follow_phases_and_growth(tmp_path):
    path = tmp_path / "mem.jsonl"
    with MemTrace(path, every_s=0.05) as mt:
        before = mt.sample()
        mt.phase = "alloc"
        big = np.ones(256 << 20, np.uint8)  # 256 MiB, every page touched
        after = mt.sample()
        del big
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert rows[0]["phase"] == "start" and any(r["phase"] == "alloc" for r in rows)
    assert after["VmRSS"] - before["VmRSS"] > 0.2
    assert mt.peak_rss_gib >= after["VmRSS"] - 1e-3
