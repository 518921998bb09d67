"""Printing a planner result: per-tier bytes, per-block choices grouped into runs, the predicted step, the
bottleneck (the resource whose speed-up shortens the step most) and what would relieve it."""
from __future__ import annotations

import dataclasses

from lohan_jax.plan import Plan, UpdateOn
from lohan_jax.planner.capacity import Budgets, Memory, memory
from lohan_jax.planner.cost import RESOURCES, Prediction, predict
from lohan_jax.planner.profile import GIB, MachineProfile
from lohan_jax.planner.search import PlanResult
from lohan_jax.planner.workload import Workload


def _faster(resource: str, wl: Workload, m: MachineProfile, f: float) -> tuple[Workload, MachineProfile]:
    if resource == "gpu":
        mp = wl.model
        scaled = {k: getattr(mp, k) / f for k in ("block_fwd_ms", "block_bwd_keep_ms", "block_bwd_recompute_ms",
                                                   "head_ms", "embed_ms")}
        scaled["block_bwd_points_ms"] = tuple((x, ms / f) for x, ms in mp.block_bwd_points_ms)
        wl = dataclasses.replace(wl, model=dataclasses.replace(mp, **scaled))
        return wl, m.with_(gpu_block_tflops=m.gpu_block_tflops * f, gpu_head_tflops=m.gpu_head_tflops * f,
                           gpu_adam_gparams_per_s=m.gpu_adam_gparams_per_s * f, hbm_gbps=m.hbm_gbps * f)
    if resource in ("h2d", "d2h"):
        return wl, m.with_(**{f"{resource}_gbps": getattr(m, f"{resource}_gbps") * f, "duplex_gbps": m.duplex_gbps * f})
    if resource == "cpu":
        return wl, m.with_(host_adam_gparams_per_s=m.host_adam_gparams_per_s * f,
                           host_accumulate_gparams_per_s=m.accumulate_gparams_per_s * f)
    return wl, m.with_(disk_read_gbps=m.disk_read_gbps * f, disk_write_gbps=m.disk_write_gbps * f)


def sensitivity(plan: Plan, wl: Workload, m: MachineProfile, pred: Prediction, f: float = 2.0) -> dict[str, float]:
    """Step time saved (s) by making each busy resource `f` times faster, the plan unchanged."""
    out = {}
    for r in RESOURCES:
        if pred.busy_s.get(r, 0.0) > 0:
            w2, m2 = _faster(r, wl, m, f)
            out[r] = pred.step_s - predict(plan, w2, m2).step_s
    return out


_NAMES = {"gpu": "GPU compute", "h2d": "PCIe host->GPU", "d2h": "PCIe GPU->host", "cpu": "host optimizer (AdamW)",
          "disk": "disk"}


def bottleneck(plan: Plan, wl: Workload, m: MachineProfile, pred: Prediction) -> tuple[str, str]:
    """(resource, what would relieve it)."""
    sens = sensitivity(plan, wl, m, pred)
    r = max(sorted(sens), key=lambda k: sens[k]) if sens else "gpu"
    gain = sens.get(r, 0.0) / pred.step_s
    busy = pred.busy_s
    tr = pred.traffic
    cpu_params = sum(p for u, p in zip(plan.units, wl.model.unit_params()) if u.update_on is UpdateOn.CPU)
    if gain < 0.02:
        return "none", ("no single resource bounds the step (a 2x faster one saves < 2%): the engine's ordering "
                        f"(the GPU idles {pred.gpu_idle_s:.2f} s per step waiting on transfers and updates)")
    head = f"{_NAMES[r]}: busy {busy[r]:.2f} s of the {pred.step_s:.2f} s step; 2x faster would save {100 * gain:.0f}%"
    relief = {
        "gpu": "keep or swap more intermediates instead of recomputing them (needs HBM or PCIe headroom); past "
               "that, this is the block peak",
        "h2d": f"{tr['h2d_bytes'] / 1e9:.1f} GB/step to the GPU: keep more weights resident in HBM, swap fewer "
               "activations, or more tokens per step (weight traffic is per step)",
        "d2h": f"{tr['d2h_bytes'] / 1e9:.1f} GB/step to the host: GPU-side updates for more blocks (no gradient "
               "download), fewer swapped activations, or more tokens per step",
        "cpu": f"AdamW over {cpu_params / 1e9:.2f} B parameters at {m.host_adam_gparams_per_s:g} G/s: more HBM for "
               "GPU-resident optimizer state (16 B/param), a host with more memory bandwidth, or more tokens per "
               "step (the optimizer's cost is per step, not per token)",
        "disk": f"{(tr['disk_read_bytes'] + tr['disk_write_bytes']) / 1e9:.0f} GB/step through the disk: more RAM "
                "for optimizer state, more SSDs, or more tokens per step",
    }[r]
    return r, f"{head}. Relieve: {relief}"


def block_runs(plan: Plan) -> list[tuple[int, int, str]]:
    """Consecutive blocks with identical choices: (first, last, description)."""
    runs: list[tuple[int, int, str]] = []
    for i, u in enumerate(plan.blocks):
        desc = f"{u.weights.value:<5} {u.optim_state.value:<5} {u.update_on.value:<4} {u.activations.describe()}"
        if runs and runs[-1][2] == desc:
            runs[-1] = (runs[-1][0], i, desc)
        else:
            runs.append((i, i, desc))
    return runs


def tiers_table(mem: Memory, b: Budgets) -> str:
    rows = [f"  {'tier':<13} {'needs GiB':>9} {'budget GiB':>10}  largest parts"]
    for name, parts, total, budget in (("HBM", mem.hbm, mem.hbm_bytes, b.hbm),
                                       ("pinned host", mem.pinned, mem.pinned_bytes, b.pinned),
                                       ("host RAM", {**mem.host, "pinned pool": max(mem.pinned_bytes, mem.pinned_pool)},
                                        mem.ram_bytes, b.ram),
                                       ("disk", mem.disk, mem.disk_bytes, b.disk)):
        if name == "disk" and not total:
            continue
        top = sorted(((v, k) for k, v in parts.items() if v), reverse=True)[:3]
        detail = ", ".join(f"{k} {v / GIB:.1f}" for v, k in top)
        budget_s = f"{budget / GIB:10.1f}" if budget is not None else f"{'-':>10}"
        rows.append(f"  {name:<13} {total / GIB:9.1f} {budget_s}  {detail}")
    return "\n".join(rows)


def format_result(r: PlanResult) -> str:
    wl, m, plan, pred = r.workload, r.machine, r.plan, r.prediction
    mp = wl.model
    size = f"{mp.param_count / 1e9:.2f} B" if mp.param_count >= 1e9 else f"{mp.param_count / 1e6:.1f} M"
    lines = [f"model {mp.model}: {size} params, {mp.n_layers} blocks; batch {wl.batch_size} x "
             f"{mp.seq_len} tokens in {wl.n_micro} micro-batch(es); profile: {mp.source}",
             f"machine {m.name}: {m.description or m.gpu} ({m.source})"]
    if plan is None:
        lines.append("does not fit:")
        lines += [f"  {p}" for p in r.problems]
        return "\n".join(lines)
    lines.append("memory per tier:")
    lines.append(tiers_table(memory(plan, wl), r.budgets))
    lines.append(f"plan (prefetch_depth={plan.prefetch_depth}, keep_turn_blocks={plan.keep_turn_blocks}):")
    lines.append(f"  {'units':<14} weights state upd  activations")
    for name, u in (("embed", plan.embed), ("head", plan.head)):
        lines.append(f"  {name:<14} {u.weights.value:<5} {u.optim_state.value:<5} {u.update_on.value:<4} -")
    for a, b, desc in block_runs(plan):
        lines.append(f"  {f'blocks {a}-{b}' if b > a else f'block {a}':<14} {desc}")
    lines.append(f"predicted: {pred.step_s:.3f} s/step, {pred.tokens_per_s:,.0f} tokens/s, {pred.tflops_6n:.1f} TFLOPS "
                 f"(6N), {pred.tflops_paper:.1f} TFLOPS (paper's convention); lower bound {pred.bound_s:.3f} s")
    busy = ", ".join(f"{k} {v:.2f} s" for k, v in pred.busy_s.items() if v)
    lines.append(f"busy per step: {busy}; traffic: h2d {pred.traffic['h2d_bytes'] / 1e9:.1f} GB, d2h "
                 f"{pred.traffic['d2h_bytes'] / 1e9:.1f} GB" + (
                     f", disk {(pred.traffic['disk_read_bytes'] + pred.traffic['disk_write_bytes']) / 1e9:.0f} GB"
                     if pred.busy_s.get("disk") else ""))
    _, text = bottleneck(plan, wl, m, pred)
    lines.append(f"bottleneck: {text}")
    lines += [f"note: {n}" for n in plan.notes]
    if not plan.engine_executable:
        lines.append("NOTE: this plan keeps weights on disk, which the planner models but the engine does not "
                     "execute yet.")
    lines.append(f"(searched {r.evaluations} candidate plans in {r.search_s * 1e3:.0f} ms)")
    return "\n".join(lines)
