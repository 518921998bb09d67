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


def test_hand_plan_pinned_cap_follows_a_measured_profile(tmp_path, monkeypatch):
    """A hand plan that swaps everything XLA keeps is capped from the profile's kept bytes when one was measured:
    on the H100 2.7B kept 198.5 KB/token (XLA's attention), the analytic profile says 76.9 (flash)."""
    import dataclasses

    from lohan_jax.models import get_spec
    from lohan_jax.planner.profile import model_profile_from_spec, save_profile

    spec = importlib.util.spec_from_file_location("bench_step", REPO / "experiments" / "bench_step.py")
    bench_step = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "bench_step", bench_step)
    spec.loader.exec_module(bench_step)
    analytic = model_profile_from_spec(get_spec("gpt3-2.7b"), 1024)
    measured = dataclasses.replace(analytic, keep_nbytes_per_token=198546.5)
    save_profile(tmp_path / "p.json", model=measured)
    argv = ["--model", "gpt3-2.7b", "--batch", "16", "--gpu-budget-gib", "24", "--activations", "keep+swap+swap_input"]
    cap = bench_step.plan_pinned_cap_gib(bench_step.parse_args(argv))
    with_profile = bench_step.parse_args([*argv, "--model-profile", str(tmp_path / "p.json")])
    cap_measured = bench_step.plan_pinned_cap_gib(with_profile)
    # 32 blocks x 16 x 1024 tokens x (198.5 - 76.9) KB more swapped, plus the 10% margin
    assert cap_measured - cap >= 0.9 * 32 * 16384 * (198546.5 - analytic.keep_nbytes_per_token) * 1.1 / 2**30
