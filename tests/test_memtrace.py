import json

import numpy as np

from lohan_jax.memtrace import MemTrace, snapshot


def test_snapshot_reads_proc():
    snap = snapshot()
    assert snap["VmRSS"] > 0 and snap["sys_MemAvailable"] > 0


def test_trace_lines_follow_phases_and_growth(tmp_path):
    path = tmp_path / "mem.jsonl"
    with MemTrace(path, every_s=0.01) as mt:
        mt.phase = "alloc"
        big = np.ones(64 << 20, np.uint8)  # 64 MiB touched
        mt.sample()
        del big
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert rows[0]["phase"] in ("start", "alloc") and any(r["phase"] == "alloc" for r in rows)
    assert mt.peak_rss_gib >= max(r["VmRSS"] for r in rows) - 1e-3
    assert mt.peak_rss_gib - rows[0]["VmRSS"] > 0.05
