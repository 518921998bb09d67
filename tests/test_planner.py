"""The planner: budgets never exceeded, deterministic and fast search, traffic equal to what the engine counts,
the step-time model against our measured H100 steps, profiles that round-trip, a CLI that plans without a GPU."""
import argparse
import ast
import dataclasses
import json
import time
from pathlib import Path

import pytest

from lohan_jax.models import get_spec
from lohan_jax.plan import ActivationPolicy, Plan, Tier, UnitPlan, UpdateOn, uniform_plan
from lohan_jax.planner import cost
from lohan_jax.planner.capacity import Margins, budgets, memory, overflow
from lohan_jax.planner.machines import BUILTIN, H100_80G, PAPER_4090_768G, machine
from lohan_jax.planner.profile import (
    GIB,
    MachineProfile,
    load_profile,
    model_from_dict,
    model_profile_from_spec,
    save_profile,
)
from lohan_jax.planner.search import SearchOptions, search, suggestions
from lohan_jax.planner.workload import Workload

ROOT = Path(__file__).resolve().parent.parent


def _measured_6b(batch: int, block_ms: float, head_ms: float):
    """paper-6b as experiments/results/engine_throughput.jsonl measured it: block forward + backward with
    recompute (1:3, as the run's timeline shows) and head, per micro-batch, on the H100."""
    mp = model_profile_from_spec(get_spec("paper-6b"), 1024)
    return dataclasses.replace(mp, tokens_measured=batch * 1024, block_fwd_ms=block_ms / 4,
                               block_bwd_keep_ms=block_ms / 2, block_bwd_recompute_ms=3 * block_ms / 4,
                               head_ms=head_ms, embed_ms=1.6 * batch / 8, source="measured (engine_throughput)")


def test_model_reproduces_measured_h100_steps():
    """Hand plans run on the H100 at a 24 GiB cap: batch 8 recompute 1.605 s/step (the host AdamW bounds it);
    batch 64 in chunks of 8 with the first 16 inputs swapped 5.577 s/step (the GPU bounds it)."""
    m = H100_80G.with_(hbm_gib=24.0)
    p8 = uniform_plan(28)
    pred8 = cost.predict(p8, Workload(_measured_6b(8, 20.64, 57.45), 8), m)
    p64 = uniform_plan(28, activations="recompute+chunks=8")
    p64 = dataclasses.replace(p64, blocks=tuple(
        dataclasses.replace(u, activations=dataclasses.replace(u.activations, swap_input=i < 16))
        for i, u in enumerate(p64.blocks)))
    pred64 = cost.predict(p64, Workload(_measured_6b(64, 184.6, 472.1), 64), m)
    assert abs(pred8.step_s / 1.605 - 1) < 0.12, pred8.step_s
    assert abs(pred64.step_s / 5.577 - 1) < 0.12, pred64.step_s
    assert max(pred8.busy_s, key=pred8.busy_s.get) == "cpu" and max(pred64.busy_s, key=pred64.busy_s.get) == "gpu"
    # the measured traffic of those runs (bytes per step)
    assert pred8.traffic["h2d_bytes"] == 22151782400 and pred8.traffic["d2h_bytes"] == 11277271040
    assert pred64.traffic["h2d_bytes"] == 30741716992 and pred64.traffic["d2h_bytes"] == 19867205632


def test_replay_issues_the_plans_traffic_and_respects_bounds():
    m = PAPER_4090_768G
    for plan, wl in [
        (uniform_plan(40, activations="save:qkv,mlp_up+swap+swap_input"),
         Workload(model_profile_from_spec(get_spec("paper-13b"), 1024), 8)),
        (Plan(embed=UnitPlan(Tier.HOST, Tier.HOST, UpdateOn.CPU), head=UnitPlan(Tier.HBM, Tier.HBM, UpdateOn.GPU),
              blocks=(UnitPlan(Tier.DISK, Tier.DISK, UpdateOn.CPU), UnitPlan(Tier.HBM, Tier.HOST, UpdateOn.CPU),
                      UnitPlan(Tier.HOST, Tier.DISK, UpdateOn.CPU, ActivationPolicy.parse("keep+swap"))),
              prefetch_depth=1, keep_turn_blocks=2),
         Workload(model_profile_from_spec(get_spec("paper-6b", n_layers=3), 1024), 8, n_micro=2, clip=True)),
    ]:
        replay = cost._Replay(plan, wl, m)
        replay.run(3)
        tr = cost.traffic(plan, wl)
        assert replay.nbytes == {"h2d_bytes": tr["h2d_bytes"], "d2h_bytes": tr["d2h_bytes"]}
        pred = cost.predict(plan, wl, m)
        assert pred.step_s >= max(pred.busy_s.values()) - 1e-9


def _grid():
    tiny = MachineProfile(name="small-gpu", hbm_gib=10, gpu_block_tflops=50, h2d_gbps=12, d2h_gbps=12,
                          duplex_gbps=20, host_adam_gparams_per_s=2, ram_gib=48, pinned_limit_gib=40,
                          disk_gib=500, disk_read_gbps=3, disk_write_gbps=2)
    for m in [*BUILTIN.values(), tiny]:
        for model in ("gpt3-1.3b", "llama2-7b", "paper-30b", "paper-175b"):
            for batch in (1, 16):
                yield m, model, batch


def test_budgets_never_exceeded_and_engine_accepts():
    from lohan_jax.engine.memory import Budgets as EngineBudgets
    from lohan_jax.engine.memory import check_budgets, estimate_memory

    fitted = 0
    for m, model, batch in _grid():
        spec = get_spec(model)
        wl = Workload(model_profile_from_spec(spec, 1024), batch)
        r = search(wl, m)
        if r.plan is None:
            continue
        fitted += 1
        mem = memory(r.plan, wl)
        b = budgets(m, Margins())
        assert not overflow(mem, b), (m.name, model, batch, overflow(mem, b))
        assert mem.hbm_bytes <= m.hbm_gib * GIB and mem.ram_bytes <= m.ram_gib * GIB
        if r.plan.engine_executable:  # the engine's own accounting accepts it at the machine's limits
            est = estimate_memory(r.plan, unit_params=wl.model.unit_params(), compute_itemsize=2,
                                  micro_batch=wl.micro_batch, seq_len=1024, d_model=spec.d_model, d_ff=spec.ff_dim,
                                  vocab_size=spec.vocab_size, n_micro=1,
                                  residual_nbytes=[wl.residual_nbytes(u.activations) for u in r.plan.blocks])
            check_budgets(est, EngineBudgets(int(m.hbm_gib * GIB * 0.95), int(m.pinned_limit_gib * GIB * 0.95) or None,
                                             int(m.ram_gib * GIB * 0.95)))
    assert fitted > 15


def test_fragmentation_reserve_keeps_the_block_backward_contiguous():
    """XLA allocates the block backward's temporaries as one block. On the H100 (2026-11-25) the planner's paper-6b
    batch-32 plan at a 24 GiB cap, estimated at 21.27 GiB, failed to find its 6.25 GiB in one piece: the working
    memory (8.00 GiB estimated) had only (budget - other terms) = 1.13x its size. The estimate now reserves
    FRAGMENTATION_RESERVE x that working memory: that plan is refused by the planner and the engine, and the
    planner's plan leaves the working buffer at least (1 + FRAGMENTATION_RESERVE)x its size."""
    from lohan_jax.engine.memory import Budgets as EngineBudgets
    from lohan_jax.engine.memory import MemoryBudgetError, check_budgets
    from lohan_jax.plan_memory import FRAGMENTATION_RESERVE

    wl = Workload(model_profile_from_spec(get_spec("paper-6b"), 1024), 32)
    m = H100_80G.with_(hbm_gib=24.0)
    b = budgets(m)
    work = lambda mem: mem.hbm["block backward working memory"]
    mems = [memory(uniform_plan(28, activations=f"recompute+chunks={c}"), wl) for c in (1, 2, 4)]
    for mem in mems:
        assert mem.hbm["fragmentation reserve"] == int(FRAGMENTATION_RESERVE * work(mem))
        assert "fragmentation reserve" in mem.describe()
    assert [work(a) > work(c) and a.hbm["fragmentation reserve"] > c.hbm["fragmentation reserve"]
            for a, c in zip(mems, mems[1:])] == [True, True]

    failed = uniform_plan(28, activations="save:attn_res+swap+swap_input")
    first = dataclasses.replace(failed.blocks[0],
                                activations=ActivationPolicy.parse("save:attn_res,mlp_up+swap+swap_input"))
    failed = dataclasses.replace(failed, blocks=(first,) * 8 + failed.blocks[8:])
    mem = memory(failed, wl)
    others = lambda mem: mem.hbm_bytes - work(mem) - mem.hbm["fragmentation reserve"]
    assert round((mem.hbm_bytes - mem.hbm["fragmentation reserve"]) / GIB, 2) == 21.27 and work(mem) == 8 * GIB
    assert (b.hbm - others(mem)) / work(mem) < 1.15 and "hbm" in overflow(mem, b)
    with pytest.raises(MemoryBudgetError, match="HBM"):
        check_budgets(mem, EngineBudgets(int(24 * GIB * 0.95), None, None))

    mem = memory(search(wl, m).plan, wl)
    assert work(mem) * (1 + FRAGMENTATION_RESERVE) <= b.hbm - others(mem)


def test_search_is_deterministic_and_fast_for_175b():
    # batch 4: at batch 8 the 24 GB card is 1.2 GiB short once the fragmentation reserve is counted
    wl = Workload(model_profile_from_spec(get_spec("paper-175b"), 1024), 4)
    t0 = time.perf_counter()
    a = search(wl, PAPER_4090_768G)
    assert time.perf_counter() - t0 < 1.0
    b = search(wl, PAPER_4090_768G)
    assert a.plan is not None and a.plan.to_json() == b.plan.to_json() and a.prediction == b.prediction
    w6 = Workload(model_profile_from_spec(get_spec("paper-6b"), 1024), 8)
    assert search(w6, H100_80G).plan.to_json() == search(w6, H100_80G).plan.to_json()


def test_search_beats_or_matches_uniform_plans():
    wl = Workload(_measured_6b(8, 20.64, 57.45), 8)
    m = H100_80G.with_(hbm_gib=24.0)
    best = search(wl, m)
    assert best.prediction.step_s <= cost.predict(uniform_plan(28), wl, m).step_s
    assert any(u.update_on is UpdateOn.GPU for u in best.plan.blocks)  # CPU-bound: some updates move to the GPU


def test_testbed_predictions_of_the_papers_system_within_15_percent():
    """The paper's system on its described testbed (its placement, DeepSpeed's CPU Adam speed, full recompute):
    13B at batch 8..128 within 15% of its measured tokens/s, and 175B at batch 16 within 15% of its best-batch
    ~62 tokens/s; the table and why the rest differs are in experiments/results/planner_testbed.md."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("testbed", ROOT / "experiments" / "planner_testbed.py")
    testbed = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(testbed)
    cases = [("paper-13b", b, tps) for b, tps in testbed.PAPER_13B.items()] + [("paper-175b", 16, 62)]
    for model, batch, paper_tps in cases:
        # hbm_what_if: our accounting (fragmentation reserve included) puts 175B at batch 16 0.1 GiB over the card
        row = testbed.predict_row(model, batch, "paper-4090-768g", "paper_placement", paper_tps, hbm_what_if=True)
        assert abs(row["tokens_per_s"] / paper_tps - 1) < 0.15, (model, batch, row["tokens_per_s"])


def test_disk_state_read_update_and_write_back_run_in_series():
    """One unit's disk-resident state in RAM at a time (DISK_READ_WINDOW, engine/disk_reads.py): a unit's read,
    its host update and its write-back run one after another, so a step bound by them costs their sum."""
    wl = Workload(model_profile_from_spec(get_spec("paper-13b"), 1024), 1)
    m = PAPER_4090_768G.with_(host_adam_gparams_per_s=1.6)
    pred = cost.predict(uniform_plan(40, optim_state="disk"), wl, m)
    disk, cpu = pred.busy_s["disk"], pred.busy_s["cpu"]
    assert disk > 3 * pred.busy_s["gpu"] and cpu > 3 * pred.busy_s["gpu"]
    assert 0.97 * (disk + cpu) <= pred.step_s <= 1.1 * (disk + cpu), (pred.step_s, disk, cpu)


def test_refusal_and_smallest_changes():
    wl = Workload(model_profile_from_spec(get_spec("paper-30b"), 1024), 8)
    r = search(wl, H100_80G, SearchOptions(allow_disk=False))
    assert r.plan is None and any("ram" in p for p in r.problems)
    fixes = suggestions(wl, H100_80G, SearchOptions(allow_disk=False))
    assert any(f.startswith("more RAM") for f in fixes)
    ram = float(fixes[0].split(":")[1].split("GiB")[0])
    bigger = H100_80G.with_(ram_gib=ram, pinned_limit_gib=0.9 * ram)
    assert search(wl, bigger, SearchOptions(allow_disk=False)).plan is not None


def test_disk_weights_are_planned_but_not_executable(tmp_path):
    wl = Workload(model_profile_from_spec(get_spec("paper-175b"), 1024), 4)
    r = search(wl, BUILTIN["paper-4090-256g"])  # 175B's 2.8 TB of state on disk; bf16 weights too, at 256 GB
    assert r.plan is not None and not r.executable
    with pytest.raises(ValueError, match="disk"):
        r.plan.check_executable()
    d = json.loads(r.plan.to_json())
    assert Plan.from_dict(d) == r.plan  # the plan format carries the tier
    r.plan.save(tmp_path / "disk.json")
    with pytest.raises(ValueError, match="disk"):  # what offload.plan_file loads must be runnable
        Plan.load(tmp_path / "disk.json")
    assert Plan.load(tmp_path / "disk.json", executable_only=False) == r.plan
    old = {k: v for k, v in d.items() if k not in ("predicted_tokens_per_s", "predicted_bottleneck")}
    assert Plan.from_dict(old).predicted_bottleneck is None  # plans saved before these fields still load


@pytest.mark.parametrize("name", ["gpt-tiny", "llama-tiny"])
def test_analytic_activations_match_abstract_evaluation(name):
    import jax.numpy as jnp

    from lohan_jax.models import build_model
    from lohan_jax.planner.measure import activation_profile

    spec = get_spec(name, n_layers=2, d_model=128, **({"d_ff": 256} if name.startswith("llama") else {}))
    cands, keep_bytes, rec = activation_profile(build_model(spec, jnp.float32), spec, 4, 32, jnp.float32)
    analytic = model_profile_from_spec(spec, 32, itemsize=4, flash_attention=False)  # the CPU runs XLA's
    assert [c.name for c in cands] == [c.name for c in analytic.candidates]
    for c, a in zip(cands, analytic.candidates):
        assert c.nbytes_per_token == a.nbytes_per_token
        if c.name == "mlp_act":  # elementwise only: XLA counts erf as a polynomial; never the up-projection
            assert 0 < c.recompute_flops_per_token < spec.d_model * spec.ff_dim
        else:
            assert abs(c.recompute_flops_per_token - a.recompute_flops_per_token) <= 0.1 * a.recompute_flops_per_token
    assert rec >= sum(c.recompute_flops_per_token for c in cands)  # keep also spares the softmax and the norms
    # keep holds exactly what the analytic profile counts: no weight matrices, no fp32 copies inside the norms or
    # the activation (LLaMA: plus its rotary tables, a few bytes per token)
    assert analytic.keep_nbytes_per_token <= keep_bytes <= 1.02 * analytic.keep_nbytes_per_token


def test_planned_traffic_equals_engine_counted_traffic():
    """A mixed plan from the search on a tiny machine, run by the engine on CPU: the bytes it counts equal
    the planner's traffic (weights from the spec's parameter counts, residuals from abstract evaluation)."""
    import jax
    import jax.numpy as jnp

    from lohan_jax.batches import step_batch
    from lohan_jax.config import OptimConfig
    from lohan_jax.data import open_dataset
    from lohan_jax.engine import OffloadEngine
    from lohan_jax.models import build_model
    from lohan_jax.planner.measure import activation_profile

    spec = get_spec("gpt-tiny", n_layers=3)
    model = build_model(spec, jnp.float32)
    batch, seq, n_micro = 4, 32, 2
    cands, keep, rec = activation_profile(model, spec, batch // n_micro, seq, jnp.float32)
    mp = dataclasses.replace(model_profile_from_spec(spec, seq, itemsize=4), candidates=cands,
                             keep_nbytes_per_token=keep, recompute_flops_per_token=rec)
    wl = Workload(mp, batch, n_micro)
    # 1.4 MB of "HBM": the edges' state, one block's weights and a saved intermediate fit, not much more
    tiny = MachineProfile(name="tiny", hbm_gib=1.4e6 / GIB, gpu_block_tflops=1e-4, gpu_head_tflops=1e-4,
                          h2d_gbps=1e-3, d2h_gbps=1e-3, duplex_gbps=2e-3, host_adam_gparams_per_s=1e-5, ram_gib=64)
    r = search(wl, tiny)
    assert r.plan is not None and len({(u.weights, u.update_on, u.activations) for u in r.plan.units}) >= 3, \
        r.plan.table()
    plan = r.plan
    data = open_dataset("builtin:pydoc", tokenizer="byte", seq_len=seq, batch_size=batch // n_micro, seed=0)
    with OffloadEngine(model, model.init(jax.random.key(0), seq), plan, optim=OptimConfig(lr=1e-3), total_steps=2,
                       micro_batch_shape=(batch // n_micro, seq), n_micro=n_micro, compute_dtype=jnp.float32) as eng:
        eng.step(step_batch(data, 0, n_micro))
        metrics = eng.step(step_batch(data, 1, n_micro))
        counted = {k: eng.traffic[k] for k in ("h2d_bytes", "d2h_bytes")}
        float(metrics["loss"])
    tr = cost.traffic(plan, wl)
    assert counted == {"h2d_bytes": tr["h2d_bytes"], "d2h_bytes": tr["d2h_bytes"]}
    assert counted["d2h_bytes"] > 0


def test_profiles_round_trip(tmp_path):
    mp = dataclasses.replace(model_profile_from_spec(get_spec("llama2-7b"), 2048),
                             block_bwd_points_ms=((0.0, 1.5), (1 / 3, 2.25), (1.0, 3.0)))
    for suffix in (".json", ".yaml"):
        save_profile(tmp_path / f"p{suffix}", H100_80G, mp)
        m2, mp2 = load_profile(tmp_path / f"p{suffix}")
        assert m2 == H100_80G and mp2 == mp
    assert model_from_dict(json.loads(json.dumps(dataclasses.asdict(mp)))) == mp


def test_measured_backward_is_piecewise_linear_through_the_saved_set_levels():
    base = _measured_6b(8, 20.64, 57.45)
    wl0 = Workload(base, 8)
    ranked = [c.name for c in base.ranked_candidates()]
    policies = [ActivationPolicy(save=None)] + [ActivationPolicy(save=tuple(ranked[:k]))
                                                 for k in range(len(ranked), 0, -1)] + [ActivationPolicy(save=())]
    fracs = [base.rec_frac(p.save) for p in policies]
    assert fracs == sorted(fracs) and fracs[0] == 0.0 and fracs[-1] == 1.0
    # saving is worth more than its FLOP share: the measured levels sit below the two-point line
    lo, hi = base.block_bwd_keep_ms, base.block_bwd_recompute_ms
    ms = [lo + (hi - lo) * f**2 for f in fracs]
    line = [wl0.block_times_s(p, H100_80G)[1] * 1e3 for p in policies]
    assert all(y < y0 for y, y0 in zip(ms[1:-1], line[1:-1]))
    wl = Workload(dataclasses.replace(base, block_bwd_points_ms=tuple(zip(fracs, ms))), 8)
    for p, want in zip(policies, ms):  # the measured points, exactly
        assert wl.block_times_s(p, H100_80G)[1] * 1e3 == pytest.approx(want, rel=1e-12)
    xs = [x for x0, x1 in zip(fracs, fracs[1:]) for x in (x0 + (x1 - x0) * t / 4 for t in range(5))]
    ys = [wl.model.block_bwd_ms(x) for x in xs]
    assert all(a <= b + 1e-12 for a, b in zip(ys, ys[1:]))  # monotone between them
    # the forward and the chunked form are untouched
    assert wl.block_times_s(policies[2], H100_80G)[0] == wl0.block_times_s(policies[2], H100_80G)[0]


def test_block_and_head_times_follow_the_measured_per_token_rate_of_larger_calls(tmp_path):
    """Measured at 8 sequences, with the recomputed block 0.8x and the head 0.9x the per-token time at 32: a
    micro-batch of 32 runs at those rates, one of 64 in 2 chunks runs its blocks 32 sequences a call, sizes in
    between interpolate log-linearly, sizes outside stay at the ends; profiles without the points scale linearly."""
    base = _measured_6b(8, 20.64, 57.45)
    t8 = base.tokens_measured
    mp = dataclasses.replace(base, size_points=((t8, 1.0), (4 * t8, 0.8)), head_size_points=((t8, 1.0), (4 * t8, 0.9)))
    keep, chunked = ActivationPolicy(save=None), ActivationPolicy(save=(), chunks=2)
    lin8, lin32 = Workload(base, 8), Workload(base, 32)
    assert lin32.block_times_s(keep, H100_80G)[1] == pytest.approx(4 * lin8.block_times_s(keep, H100_80G)[1])
    w32, w64, w16, w4 = (Workload(mp, b) for b in (32, 64, 16, 4))
    assert w32.block_times_s(keep, H100_80G)[1] == pytest.approx(0.8 * lin32.block_times_s(keep, H100_80G)[1])
    assert w32.head_s(H100_80G) == pytest.approx(0.9 * lin32.head_s(H100_80G))
    assert w64.block_times_s(chunked, H100_80G)[0] == pytest.approx(
        2 * 0.8 * lin32.block_times_s(chunked, H100_80G)[0])  # 2 calls of 32 sequences
    assert mp.per_token_factor(2 * t8) == pytest.approx(0.9)  # halfway on a log scale
    assert w16.block_times_s(keep, H100_80G)[0] == pytest.approx(0.9 * 2 * lin8.block_times_s(keep, H100_80G)[0])
    assert w4.block_times_s(keep, H100_80G)[0] == pytest.approx(0.5 * lin8.block_times_s(keep, H100_80G)[0])
    assert w32.embed_s(H100_80G) == pytest.approx(lin32.embed_s(H100_80G))  # bandwidth-bound: linear
    save_profile(tmp_path / "p.json", H100_80G, mp)
    assert load_profile(tmp_path / "p.json")[1] == mp
    bad = json.loads((tmp_path / "p.json").read_text())
    bad["model"]["size_points"] = [[0, 1.2], [t8, 1.0]]
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="size_points must be .* tokens > 0 strictly increasing"):
        load_profile(tmp_path / "bad.json")


def test_old_profile_without_points_loads_with_todays_two_point_times(tmp_path):
    mp = _measured_6b(8, 20.64, 57.45)
    save_profile(tmp_path / "p.json", H100_80G, mp)
    raw = json.loads((tmp_path / "p.json").read_text())
    del raw["model"]["block_bwd_points_ms"]  # written before the field existed
    (tmp_path / "old.json").write_text(json.dumps(raw))
    _, old = load_profile(tmp_path / "old.json")
    assert old == mp and old.block_bwd_points_ms == ()
    wl = Workload(old, 8)
    for k in range(len(old.ranked_candidates()) + 1):
        save = tuple(c.name for c in old.ranked_candidates()[:k])
        f = old.save_recompute_flops_per_token(save) / old.recompute_flops_per_token
        want = (old.block_bwd_keep_ms + (old.block_bwd_recompute_ms - old.block_bwd_keep_ms) * f) * 1e-3
        assert wl.block_times_s(ActivationPolicy(save=save), H100_80G)[1] == pytest.approx(want, rel=1e-12)


@pytest.mark.parametrize("name", list(BUILTIN))
def test_machine_yaml_files_equal_builtins(name):
    assert machine(str(ROOT / "configs" / "machines" / f"{name}.yaml")) == BUILTIN[name]


def test_pure_planner_modules_import_no_jax():
    """Decisions are plain Python: only measure.py (and the CLI, lazily) may reach jax."""
    pure = ["profile", "workload", "cost", "capacity", "search", "machines", "explain"]
    banned = ("jax", "flax", "optax", "lohan_jax.engine", "lohan_jax.models", "lohan_jax.tiers")
    for name in pure:
        tree = ast.parse((ROOT / "lohan_jax" / "planner" / f"{name}.py").read_text())
        for node in ast.walk(tree):
            mods = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            for mod in mods:
                assert not mod.startswith(banned), f"planner/{name}.py imports {mod}"


def _cli(argv):
    from lohan_jax.planner.cli import add_plan_commands

    parser = argparse.ArgumentParser()
    add_plan_commands(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_plan_saves_a_runnable_plan_and_refuses_with_numbers(tmp_path, capsys):
    out = tmp_path / "plan.json"
    assert _cli(["plan", str(ROOT / "configs" / "paper-6b.yaml"), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "predicted:" in text and "bottleneck:" in text and "tokens/s" in text
    plan = Plan.load(out)
    assert plan.predicted_step_s > 0 and plan.predicted_bottleneck and plan.engine_executable and len(plan.blocks) == 28
    assert _cli(["plan", str(ROOT / "configs" / "paper-13b.yaml"), "--set", "model.name=paper-30b",
                 "--machine", "h100-80g", "--disk", "off"]) == 1
    text = capsys.readouterr().out
    assert "does not fit" in text and "more RAM" in text


def test_cli_profile_on_cpu(tmp_path, capsys):
    out = tmp_path / "prof.json"
    assert _cli(["profile", "--set", "model.name=gpt-tiny", "--set", "train.seq_len=32", "--set", "train.batch_size=2",
                 "--quick", "--out", str(out)]) == 0
    m, mp = load_profile(out)
    assert m.host_adam_gparams_per_s > 0 and m.ram_gib > 0 and m.h2d_gbps > 0
    assert mp.measured and mp.block_fwd_ms > 0 and mp.block_bwd_recompute_ms >= mp.block_bwd_keep_ms > 0
    assert [c.name for c in mp.candidates] == ["qkv", "attn_ctx", "attn_res", "mlp_up", "mlp_act"]
    pts = mp.block_bwd_points_ms  # --quick: the ends and every third saved-set level
    assert pts[0] == (0.0, mp.block_bwd_keep_ms) and pts[-1] == (1.0, mp.block_bwd_recompute_ms) and len(pts) >= 3
    assert [x for x, _ in pts] == sorted({x for x, _ in pts}) and [y for _, y in pts] == sorted(y for _, y in pts)
    save = tuple(c.name for c in mp.ranked_candidates()[:3])
    assert mp.block_bwd_ms(mp.rec_frac(save)) in [y for _, y in pts[1:-1]]
    assert "recompute share:ms" in capsys.readouterr().out
    # the recomputed block and the head timed again at 4x the micro-batch: per-token factors of larger calls
    assert [t for t, _ in mp.size_points] == [64, 256] == [t for t, _ in mp.head_size_points]
    assert mp.size_points[0][1] == 1.0 and 0 < mp.size_points[1][1] < 2 and 0 < mp.head_size_points[1][1] < 2


def test_spare_hbm_buys_less_host_traffic(monkeypatch):
    """On a card with HBM to spare (6B b16 on a 141 GB H200), the greedy alone stops where the model sees no time
    to gain, with 26 of 28 blocks' state on the host and 45 GB/step of PCIe; the spare-HBM phase keeps swaps and
    state on the card instead, within SPARE_HBM_SLACK of the predicted step and every budget."""
    import importlib

    search_mod = importlib.import_module("lohan_jax.planner.search")  # the package exports the function `search`
    m = H100_80G.with_(hbm_gib=132.0, ram_gib=240.0, pinned_limit_gib=220.0)
    wl = Workload(model_profile_from_spec(get_spec("paper-6b"), 1024), 16)
    small = H100_80G.with_(hbm_gib=24.0)
    spent, spent_small = search(wl, m), search(wl, small)
    monkeypatch.setattr(search_mod, "_spend_spare_hbm", lambda space, g, n, t_max: g)
    greedy, greedy_small = search(wl, m), search(wl, small)
    pcie = lambda r: r.prediction.traffic["h2d_bytes"] + r.prediction.traffic["d2h_bytes"]
    assert pcie(spent) < 0.5 * pcie(greedy)
    assert spent.prediction.busy_s["cpu"] < greedy.prediction.busy_s["cpu"]
    assert spent.prediction.step_s <= greedy.prediction.step_s * (1 + search_mod.SPARE_HBM_SLACK) * 1.01
    assert not overflow(memory(spent.plan, wl), budgets(m))
    # little spare HBM at 24 GiB: the phase may only trade within the slack, and never adds traffic
    assert spent_small.prediction.step_s <= greedy_small.prediction.step_s * (1 + search_mod.SPARE_HBM_SLACK) * 1.01
    assert pcie(spent_small) <= pcie(greedy_small)


def test_block_program_keeps_no_weights_and_no_reshaped_duplicates(monkeypatch):
    """Under `keep`, the forward's residuals hold neither weight matrices nor a reshape of another residual. An
    attention that keeps its own output (as cuDNN's does, in head layout) leaves the output projection's (B, S, D)
    input as a view rebuilt in the backward; gradients are autodiff's."""
    import jax
    import jax.numpy as jnp

    from lohan_jax.engine.layout import FlatLayout
    from lohan_jax.engine.programs import BlockProgram
    from lohan_jax.models import attention, build_model, gpt
    from lohan_jax.plan import ActivationPolicy

    @jax.custom_vjp
    def keeps_output(q, k, v):  # XLA's attention with cuDNN's residuals (q, k, v, out), less its statistics
        return attention._xla_attention(q, k, v)

    def fwd(q, k, v):
        out = attention._xla_attention(q, k, v)
        return out, (q, k, v, out)

    keeps_output.defvjp(fwd, lambda res, g: jax.vjp(attention._xla_attention, *res[:3])[1](g))
    monkeypatch.setattr(gpt, "causal_attention", lambda q, k, v, impl=None: keeps_output(q, k, v))
    spec = get_spec("gpt-tiny", n_layers=2, d_model=64)
    model = build_model(spec, jnp.float32)
    tree = model.init_unit(jax.random.key(0), 1, 16)
    layout = FlatLayout.of(tree)
    w, x = layout.flatten(tree), jax.random.normal(jax.random.key(1), (2, 16, spec.d_model))
    dy = jax.random.normal(jax.random.key(2), x.shape)
    prog = BlockProgram(model, layout, ActivationPolicy.parse("keep"), jax.ShapeDtypeStruct(w.shape, w.dtype),
                        jax.ShapeDtypeStruct(x.shape, x.dtype))
    assert "view" in prog._kinds
    # a reshape that transposes first (lax.reshape with dimensions, as jnp.concatenate of an array emits) is
    # not a view: rebuilding it by a plain reshape would permute the data
    from lohan_jax.engine.programs import _views

    a = jnp.arange(6.0).reshape(2, 3)
    closed = jax.make_jaxpr(lambda a: (a, jax.lax.reshape(a, (3, 2), dimensions=(1, 0)), a.reshape(3, 2)))(a)
    assert _views(closed.jaxpr, closed.jaxpr.outvars, ["r", "r", "r"]) == [(2, 0, (3, 2))]
    assert all(a.shape[:2] == x.shape[:2] for a in prog.residual_avals)  # per-token arrays only: no weights
    analytic = model_profile_from_spec(spec, 16, itemsize=4)  # flash: + 4 B/head of statistics this one lacks
    assert prog.residual_nbytes / x.shape[0] / x.shape[1] == analytic.keep_nbytes_per_token - 4 * spec.n_heads
    y, res = prog.fwd(w, x)
    dx, dw, _ = prog.bwd(w, x, res, dy)
    gw, gx = jax.jit(jax.grad(lambda w, x: jnp.sum(model.block(layout.unflatten(w), x) * dy), argnums=(0, 1)))(w, x)
    assert float(jnp.abs(dx - gx).max()) < 1e-5 and float(jnp.abs(dw - gw).max()) < 1e-5


def test_profile_reads_the_chunked_block_as_half_size_calls():
    """With chunks timed (not --quick) and the 4x size measured, the chunked block's cost becomes the per-token
    rate of half-size calls (a size point) and chunk_overhead stays 1: a chunked block is not charged twice."""
    import jax.numpy as jnp

    from lohan_jax.planner.measure import measure_model_profile

    spec = get_spec("gpt-tiny", n_layers=2)
    mp = measure_model_profile(spec, 2, 32, jnp.float32, reps=2, chunks=True, level_step=0)
    assert [t for t, _ in mp.size_points] == [32, 64, 256] and mp.size_points[1][1] == 1.0
    assert mp.chunk_overhead == 1.0 and mp.size_points[0][1] >= 1.0
    assert Workload(mp, 2).block_times_s(ActivationPolicy(save=(), chunks=2), H100_80G)[1] == pytest.approx(
        mp.size_points[0][1] * Workload(mp, 2).block_times_s(ActivationPolicy(save=()), H100_80G)[1])
