"""Tests for lohan_jax.baselines (jax_native_offload against the reference trainer, its fallback without host
memory) and the experiment plumbing around the baselines: the DeepSpeed runner's config and prechecks (no
deepspeed needed), the studies' child runs (failures as rows, the time budget), dry runs and plots."""
import importlib.util
import json
import logging
import shlex
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lohan_jax.baselines import SYSTEMS, make_trainer
from lohan_jax.baselines import jax_native_offload as native
from lohan_jax.batches import step_batch
from lohan_jax.config import OptimConfig, Schedule
from lohan_jax.data import open_dataset
from lohan_jax.models import build_model, get_spec
from lohan_jax.reference import ReferenceTrainer

REPO = Path(__file__).resolve().parents[1]
SEQ_LEN = 16
SPEC = get_spec("gpt-tiny", n_layers=1)
MODEL = build_model(SPEC, jnp.float32)  # one block: half the compile time
LR = 1e-2


def numpy_params(model, seed=0):
    """GPT-2-like fp32 init from numpy (no XLA compile), as tests/test_reference.py."""
    rng = np.random.default_rng(seed)

    def leaf(path, a):
        name = path[-1].key
        if name in ("scale", "bias"):
            return jnp.full(a.shape, 1.0 if name == "scale" else 0.0, jnp.float32)
        return jnp.asarray(rng.normal(0.0, 0.02, a.shape).astype(np.float32))

    return jax.tree_util.tree_map_with_path(leaf, model.abstract_params(SEQ_LEN))


def _np(tree):
    return jax.tree.map(np.asarray, tree)


@pytest.fixture(scope="module")
def runs():
    """Two steps of 2 micro-batches through the reference and through jax_native_offload, from the same params
    (the baseline gets them as unit_params(k), compiled ahead from shapes)."""
    params = numpy_params(MODEL)
    units = [params["embed"], *params["blocks"], params["head"]]
    data = open_dataset("synthetic", seq_len=SEQ_LEN, batch_size=2, seed=0, vocab_size=SPEC.vocab_size)
    batches = [step_batch(data, s, 2) for s in range(2)]
    optim = OptimConfig(lr=LR, weight_decay=0.1, schedule=Schedule.CONSTANT)
    ref = ReferenceTrainer(MODEL, params, optim, 2, jnp.float32)
    nat = native.JaxNativeOffloadTrainer(MODEL, units.__getitem__, optim, 2, jnp.float32, batch_shape=(2, 2, SEQ_LEN),
                                         seq_len=SEQ_LEN)
    out = {"ref": [ref.step(b) for b in batches], "nat": [nat.step(b) for b in batches]}
    out.update(ref_params=ref.master_params(), nat_params=nat.master_params(), trainer=nat, params=params)
    return out


def test_native_offload_equals_the_reference(runs):
    for key in ("loss", "grad_norm"):
        got, want = ([float(m[key]) for m in runs[k]] for k in ("nat", "ref"))
        np.testing.assert_allclose(got, want, rtol=1e-5)
    assert float(runs["ref"][0]["loss"]) != float(runs["ref"][1]["loss"])  # the params moved
    # remat and XLA's fusions change the rounding of near-cancelling gradient sums; Adam turns that into up to
    # ~1% of a step (lr) on such elements (as tests/test_reference.py allows)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-2 * LR),
                 _np(runs["nat_params"]), _np(runs["ref_params"]))


def test_native_offload_state_lives_in_pinned_host_memory(runs):
    t = runs["trainer"]
    if "pinned_host" not in {m.kind for m in jax.devices()[0].addressable_memories()}:
        pytest.skip("this backend has no pinned_host memory")
    kinds = {a.sharding.memory_kind for a in jax.tree.leaves((t.params, t.opt_state))}
    assert kinds == {"pinned_host"}
    report = t.report()
    assert report["memory_kind"] == "pinned_host" and report["offload_params"] and report["offload_opt_state"]
    assert report["compile_s"] > 0 and "xla_temp_gib" in report  # compiled ahead, from shapes alone
    n = sum(a.size for a in jax.tree.leaves(runs["params"]))
    assert report["host_state_gib"] == pytest.approx(12 * n / 2**30)


def test_fallback_to_the_default_memory_without_pinned_host(monkeypatch, caplog):
    class Memory:
        kind = "device"

    class NoHostMemory:
        platform = "fake"

        def addressable_memories(self):
            return [Memory()]

    with caplog.at_level(logging.WARNING, logger=native.__name__):
        assert native.host_memory_kind(NoHostMemory()) is None
    assert "no pinned_host memory on fake" in caplog.text and "no offload" in caplog.text

    monkeypatch.setattr(native, "host_memory_kind", lambda device: None)
    t = native.JaxNativeOffloadTrainer(MODEL, numpy_params(MODEL), OptimConfig(lr=LR), 2, jnp.float32, seq_len=SEQ_LEN)
    assert t.report()["memory_kind"] == "default" and not t.report()["offload_params"]
    assert {a.sharding.memory_kind for a in jax.tree.leaves(t.params)} <= {None, "device"}


def test_registry():
    assert set(SYSTEMS) == {"jax_native_offload"}
    with pytest.raises(ValueError, match="unknown baseline system 'zero'.*jax_native_offload"):
        make_trainer("zero", MODEL, OptimConfig(), 1)


# ---- the DeepSpeed runner (pure parts: no torch, no deepspeed) -------------------------------------------------
def _load(path: str, name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def test_deepspeed_configs_and_prechecks():
    ds = _load("experiments/baselines/deepspeed_gpt.py", "deepspeed_gpt")
    args = ds.parse_args(["--system", "deepspeed_zero3_cpu", "--batch", "16,8,16", "--gpu-budget-gib", "24"])
    assert args.batch == [8, 16]
    with pytest.raises(SystemExit):
        ds.parse_args(["--batch", "8,x"])
    z2, z3 = (ds.build_ds_config(s, 8) for s in ds.SYSTEMS)
    assert z2["zero_optimization"]["stage"] == 2 and z2["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert "offload_param" not in z2["zero_optimization"]
    assert z3["zero_optimization"]["stage"] == 3 and z3["zero_optimization"]["offload_param"]["device"] == "cpu"
    for cfg in (z2, z3):
        assert cfg["bf16"] == {"enabled": True} and cfg["train_micro_batch_size_per_gpu"] == 8
        assert cfg["optimizer"]["params"]["betas"] == [0.9, 0.95]  # lohan_jax's OptimConfig defaults
    # the host-RAM precheck: 13B cannot fit the H100 machine's ~120 GiB under either system, 6B ZeRO-Offload can
    assert ds.host_need_gib("deepspeed_zero3_cpu", get_spec("paper-13b").param_count()) > 200
    assert ds.host_need_gib("deepspeed_zero_offload", get_spec("paper-6b").param_count()) < 100


# ---- one step's timeline of each baseline (issue 6) -------------------------------------------------------------
def test_bench_step_timeline_for_the_reference(tmp_path, monkeypatch):
    """bench_step --timeline for a baseline: one more step, untimed, traced by jax.profiler. On the CPU backend
    XLA's ops run on host threads, so the honest lane is host_compute and there is no GPU figure."""
    for var in ("XLA_PYTHON_CLIENT_MEM_FRACTION", "XLA_PJRT_GPU_HOST_MEMORY_LIMIT_GB"):  # main sets them
        monkeypatch.setenv(var, "0.95" if "FRACTION" in var else "120")
    bench_step = _load("experiments/bench_step.py", "bench_step")
    out = tmp_path / "rows.jsonl"
    assert bench_step.main(["--system", "reference", "--model", "gpt-tiny", "--seq", "64", "--batch", "4", "--steps",
                            "3", "--timeline", str(tmp_path / "timelines"), "--out", str(out)]) == 0
    row = json.loads(out.read_text().splitlines()[-1])
    assert len(row["losses"]) == 3 and "timeline_error" not in row  # the traced step is not a timed one
    stem = tmp_path / "timelines" / "reference-gpt-tiny-b4-0gib"  # beside lohan_jax's gpt-tiny-b4-0gib
    assert row["timeline_png"] == f"{stem}.png" and Path(f"{stem}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert row["gpu_busy_fraction"] is None and 0 < row["host_compute_busy_fraction"] <= 1
    trace = json.loads(Path(f"{stem}.trace.json").read_text())["traceEvents"]
    lanes = {e["args"]["name"] for e in trace if e["ph"] == "M" and e["name"] == "thread_name"}
    assert lanes == {"host_compute", "host"}


def test_deepspeed_runner_traces_a_step_on_the_cpu(tmp_path):
    """The DeepSpeed runner's traced step (torch.profiler, CPU only here): a matmul and torch's AdamW on CPU
    tensors give the host optimizer's lane; --timeline reaches the child's arguments."""
    torch = pytest.importorskip("torch")
    ds = _load("experiments/baselines/deepspeed_gpt.py", "deepspeed_gpt")
    assert ds.parse_args(["--timeline", "somewhere"]).timeline == "somewhere"
    w = torch.nn.Parameter(torch.randn(32, 32))
    opt = torch.optim.AdamW([w])

    def step():
        (torch.randn(8, 32) @ w).square().mean().backward()
        opt.step()

    row = ds.trace_step(step, tmp_path, "deepspeed_zero_offload-tiny-b8-24gib", "a tiny step")
    assert (tmp_path / "deepspeed_zero_offload-tiny-b8-24gib.png").stat().st_size > 1000
    assert row["cpu_optim_s"] > 0 and row["gpu_busy_fraction"] is None and row["timeline_step_s"] > 0


# ---- the studies ------------------------------------------------------------------------------------------------
@pytest.fixture()
def sr(monkeypatch):
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")  # study_main pins it; restored after the test
    monkeypatch.syspath_prepend(str(REPO / "experiments"))
    import study_runner

    return study_runner


def _fake(code: str) -> list[str]:
    """A child that parses --out like the real runners and runs `code` (may write `row` to it)."""
    return [sys.executable, "-c", "import json, os, sys; out = sys.argv[sys.argv.index('--out') + 1]\n" + code]


def test_children_failures_and_budget_are_results(sr, tmp_path):
    ok_row = ("row = {'experiment': 'e', 'system': 'reference', 'model': 'gpt-tiny', 'seq_len': 1024, "
              "'batch_tokens': 8192, 'step_s': 0.5, 'tokens_per_s': 16384.0, 'status': 'ok'}\n"
              "open(out, 'a').write(json.dumps(row) + '\\n')")
    runs = [sr.Run("fine", "reference", "gpt-tiny", (8,), 0.0, _fake(ok_row), 1.0, {"note": "kept"}),
            sr.Run("killed", "deepspeed_zero3_cpu", "gpt-tiny", (8, 16), 24.0, _fake("os.kill(os.getpid(), 9)"), 1.0),
            sr.Run("crashed", "jax_native_offload", "gpt-tiny", (8,), 0.0, _fake("raise SystemExit(3)"), 1.0),
            sr.Run("refused", "lohan_jax", "gpt-tiny", (8,), 24.0, [], 0.0, skip="planner: no", skip_status="oom"),
            sr.Run("too long", "lohan_jax", "gpt-tiny", (8,), 0.0, _fake(ok_row), 1e6)]
    rows = sr.execute(runs, experiment="e", out=tmp_path / "e.jsonl", log_dir=tmp_path / "logs", budget_s=300,
                      dry_run=False)
    got = [(r["label"], r["batch_tokens"] // 1024, r["status"]) for r in rows]
    assert got == [("fine", 8, "ok"), ("killed", 8, "oom"), ("killed", 16, "oom"), ("crashed", 8, "failed"),
                   ("refused", 8, "oom"), ("too long", 8, "skipped")]
    assert rows[0]["note"] == "kept" and "OOM killer" in rows[1]["error"] and "exited with 3" in rows[3]["error"]
    assert "study time budget" in rows[5]["error"]
    assert len(sr.latest_rows(tmp_path / "e.jsonl", "e")) == 6


def test_timelines_on_the_first_configuration_of_each_system(sr, tmp_path):
    runs = [sr.Run("refused", "lohan_jax", "paper-6b", (8,), 24.0, [], 0.0, skip="planner: no", skip_status="oom"),
            sr.Run("13b", "deepspeed_zero_offload", "paper-13b", (8,), 24.0, ["ds"], 10.0),
            sr.Run("b64", "lohan_jax", "paper-6b", (64,), 24.0, ["bench"], 100.0),
            sr.Run("b8", "lohan_jax", "paper-6b", (8,), 24.0, ["bench"], 80.0),
            sr.Run("zero", "deepspeed_zero_offload", "paper-6b", (8, 16), 24.0, ["ds"], 200.0)]
    sr.with_timelines(runs, "paper-6b", tmp_path / "timelines")
    traced = [r.label for r in runs if "--timeline" in r.argv]
    assert traced == ["b64", "zero"] and runs[2].argv == ["bench", "--timeline", str(tmp_path / "timelines")]
    assert runs[4].est_s == 200.0 + 2 * sr.TIMELINE_S and runs[3].est_s == 80.0


def test_lohan_runs_the_planners_plan_or_its_refusal(sr, tmp_path):
    from lohan_jax.plan import Plan

    run = sr.lohan_run("paper-6b", 64, 24.0, plan_dir=tmp_path)
    assert not run.skip and run.argv[1] == sr.BENCH
    plan = Plan.load(run.argv[run.argv.index("--plan-file") + 1])
    assert plan.engine_executable and 4 < plan.predicted_step_s < 8
    assert all(u.activations.chunks > 1 for u in plan.blocks)  # one slice of 64 x 1024 cannot fit 24 GiB
    refused = sr.lohan_run("paper-13b", 8, 24.0, plan_dir=tmp_path)
    assert refused.skip_status == "oom" and refused.extra["planner_refused"] and not refused.argv
    assert "refused by the planner" in refused.skip and "Smallest changes" in refused.skip


def test_ablation_dry_run_prints_every_command(sr, tmp_path, capsys):
    import study_ablation

    assert study_ablation.main(["--dry-run", "--log-dir", str(tmp_path), "--out", str(tmp_path / "a.jsonl")]) == 0
    text = capsys.readouterr().out
    assert text.count("experiments/bench_step.py --system lohan_jax") >= 4
    assert "--disk-io-order naive" in text and "estimated total" in text
    assert "--plan-file" in text and "--clip-norm 1e9 --sync-updates" in text
    assert not (tmp_path / "a.jsonl").exists()
    bench_step = _load("experiments/bench_step.py", "bench_step")
    commands = [shlex.split(line) for line in text.splitlines() if line.startswith("  ")]
    assert commands[0][1:4] == ["-m", "lohan_jax", "profile"]  # the planned variant's model, measured first
    commands = commands[1:]
    assert len(commands) == 8 and all(argv[1] == sr.BENCH for argv in commands)
    for argv in commands:  # every flag the study passes exists in bench_step
        bench_step.parse_args(argv[2:])


def test_plots_redraw_from_rows(sr, tmp_path):
    import study_ablation
    import study_batch
    import study_size

    def row(system, model, batch, status="ok", cap=24.0, **kw):
        return {"experiment": "x", "system": system, "model": model, "seq_len": 1024, "batch_tokens": batch * 1024,
                "gpu_budget_gib": cap, "status": status, "tokens_per_s": 1000.0 * batch if status == "ok" else None,
                "tflops_6n": 10.0 * batch if status == "ok" else None, **kw}

    rows = [row("lohan_jax", "paper-6b", 8), row("lohan_jax", "paper-6b", 64),
            row("lohan_jax", "paper-6b", 8, cap=79.6),
            row("deepspeed_zero_offload", "paper-6b", 32, "oom"), row("lohan_jax", "paper-13b", 8, "oom"),
            row("lohan_jax", "gpt3-1.3b", 64)]
    study_batch.plot(rows, tmp_path / "batch.png")
    study_size.plot(rows, tmp_path / "size.png")
    ablations = [row("lohan_jax", "paper-6b", 8, variant="opt:overlapped"),
                 row("lohan_jax", "paper-6b", 8, "skipped", variant="opt:after_backward")]
    study_ablation.plot(ablations, tmp_path / "abl.png")
    assert all((tmp_path / f).stat().st_size > 10_000 for f in ("batch.png", "size.png", "abl.png"))
    assert "lohan_jax" in sr.table(rows) and sr.speedups(rows, "paper-6b") == {}
    ratios = sr.speedups([*rows, row("deepspeed_zero_offload", "paper-6b", 16)], "paper-6b")
    assert ratios == {"speedup_vs_deepspeed_zero_offload": pytest.approx(64 / 16)}
    json.dumps(rows)


def test_latest_rows_keep_each_cards_rows(sr, tmp_path):
    """An H200 row of a configuration does not replace the H100 row of the same one (tables, plots, ratios)."""
    path = tmp_path / "rows.jsonl"
    base = {"experiment": "x", "system": "lohan_jax", "model": "paper-6b", "batch_tokens": 16384,
            "gpu_budget_gib": 79.6, "status": "ok"}
    with open(path, "w") as f:
        for device, tps in (("NVIDIA H100 80GB HBM3", 1.0), ("NVIDIA H200", 2.0), ("NVIDIA H100 80GB HBM3", 3.0)):
            f.write(json.dumps({**base, "device": device, "tokens_per_s": tps}) + "\n")
    rows = sr.latest_rows(path, "x")
    assert sorted((sr.card_of(r), r["tokens_per_s"]) for r in rows) == [("H100", 3.0), ("H200", 2.0)]
    assert "H200" in sr.table(rows)
