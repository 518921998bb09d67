"""experiments/bench_step.py times whole steps: a host-bound step's time includes its host AdamW updates."""
import importlib.util
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SLEEP_S = 0.05


def test_step_time_covers_the_host_updates(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("bench_step", REPO / "experiments" / "bench_step.py")
    bench_step = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "bench_step", bench_step)
    spec.loader.exec_module(bench_step)
    from lohan_jax.optim import host_adamw

    real, calls = host_adamw.adamw_update_, []

    def slow(master, *args, **kwargs):  # a host optimizer far slower than the (CPU) compute: host-bound steps
        if master.size > 3:  # not host_adamw.warmup()'s
            time.sleep(SLEEP_S)
            calls.append(1)
        return real(master, *args, **kwargs)

    monkeypatch.setattr(host_adamw, "adamw_update_", slow)
    out = tmp_path / "rows.jsonl"
    steps = 3
    assert bench_step.main(["--system", "lohan_jax", "--model", "gpt-tiny", "--seq", "32", "--batch", "2",
                            "--steps", str(steps), "--no-peak", "--out", str(out)]) == 0
    row = json.loads(out.read_text().splitlines()[-1])
    host_per_step = len(calls) / steps * SLEEP_S
    assert row["step_s_method"] == "drained_mean"
    assert row["step_s"] >= host_per_step, (row["step_s"], host_per_step)
    assert row["step_s"] < 2 * host_per_step + 0.5  # and not much more: the compute is small
