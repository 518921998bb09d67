"""Device measurements for the planner (the one planner module that imports jax): per-block forward and
backward times of the engine's own BlockProgram with resident weights, the head and embedding, activation
bytes and recompute FLOPs per named intermediate by abstract evaluation, PCIe bandwidth from pinned memory,
GPU AdamW and matmul rates, free HBM. Runs on CPU too (tiny sizes), which is how it is tested.
"""
from __future__ import annotations

import dataclasses
import datetime
import statistics
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lohan_jax.engine.layout import FlatLayout
from lohan_jax.engine.memory import pinned_limit_nbytes
from lohan_jax.engine.programs import BlockProgram, EdgePrograms
from lohan_jax.plan import ActivationPolicy
from lohan_jax.planner.profile import (
    GIB,
    Candidate,
    MachineProfile,
    ModelProfile,
    available_ram_gib,
    disk_free_gib,
    measure_disk_gbps,
    measure_host_adam_gparams_per_s,
    model_profile_from_spec,
)
from lohan_jax.tiers import MemorySpaces


def median_s(fn: Callable[[], Any], reps: int) -> float:
    """Median seconds of `reps` calls of fn, each waited for, after one untimed call (the compile)."""
    jax.block_until_ready(fn())  # compile
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _random_flat(layout: FlatLayout, dtype) -> jax.Array:
    return 0.02 * jax.random.normal(jax.random.key(0), (layout.size,), dtype)


def _block_setup(model, spec, micro_batch: int, seq_len: int, dtype):
    tree = jax.eval_shape(lambda: model.init_unit(jax.random.key(0), 1, seq_len))
    layout = FlatLayout.of(tree)
    w_aval = jax.ShapeDtypeStruct((layout.size,), dtype)
    x_aval = jax.ShapeDtypeStruct((micro_batch, seq_len, spec.d_model), dtype)
    return layout, w_aval, x_aval


def _bwd_flops(prog: BlockProgram, w_aval, x_aval) -> float | None:
    """XLA's FLOP count of the block backward (lowered only, nothing compiled); None if not reported."""
    try:
        cost = prog.bwd.lower(w_aval, x_aval, list(prog.residual_avals), x_aval).cost_analysis()
    except Exception:  # noqa: BLE001 - a backend without cost analysis: the analytic FLOPs stand
        return None
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost["flops"]) if cost and "flops" in cost else None


def activation_profile(model, spec, micro_batch: int, seq_len: int,
                       dtype) -> tuple[tuple[Candidate, ...], float, float]:
    """(candidates, keep bytes/token, recompute FLOPs/token) of one block, by abstract evaluation only: the
    residuals BlockProgram keeps under `save:<name>` and `keep`, and XLA's FLOP count of its backward (the
    analytic FLOPs where the backend reports none)."""
    layout, w_aval, x_aval = _block_setup(model, spec, micro_batch, seq_len, dtype)
    tokens = micro_batch * seq_len
    analytic = model_profile_from_spec(spec, seq_len, jnp.dtype(dtype).itemsize)
    known = {c.name: c.recompute_flops_per_token for c in analytic.candidates}
    prog = lambda text: BlockProgram(model, layout, ActivationPolicy.parse(text), w_aval, x_aval)
    rec_flops = _bwd_flops(prog("recompute"), w_aval, x_aval)

    def saved_per_token(p: BlockProgram, fallback: float) -> float:
        f = _bwd_flops(p, w_aval, x_aval)
        return fallback if rec_flops is None or f is None else max(0.0, rec_flops - f) / tokens

    cands = []
    for name in model.activation_names:
        p = prog(f"save:{name}")
        cands.append(Candidate(name, p.residual_nbytes / tokens, saved_per_token(p, known.get(name, 0.0))))
    keep = prog("keep")
    return tuple(cands), keep.residual_nbytes / tokens, saved_per_token(keep, analytic.recompute_flops_per_token)


def block_times_ms(model, spec, micro_batch: int, seq_len: int, dtype, reps: int = 5, chunks: bool = True,
                   saves: tuple[tuple[str, ...], ...] = ()) -> dict[str, tuple[float, float]]:
    """Median (forward, backward) ms of one block under keep, recompute and `save:<names>` for each of `saves`
    (and recompute in 2 chunks when asked and the micro-batch allows), weights resident, through the engine's
    BlockProgram, keyed by the policy's text. A policy other than recompute that runs out of memory is left out."""
    layout, w_aval, x_aval = _block_setup(model, spec, micro_batch, seq_len, dtype)
    w = _random_flat(layout, dtype)  # timing needs the shapes, not the initialisation
    x = jax.random.normal(jax.random.key(1), x_aval.shape, dtype)
    dy = jnp.ones(x_aval.shape, dtype)
    policies = ("keep", "recompute", *(f"save:{','.join(names)}" for names in saves)) \
        + (("recompute+chunks=2",) if chunks and micro_batch % 2 == 0 else ())
    out = {}
    for text in policies:
        prog = BlockProgram(model, layout, ActivationPolicy.parse(text), w_aval, x_aval)
        fwd, bwd = [], []
        try:
            for _ in range(reps + 1):  # the first round compiles
                t0 = time.perf_counter()
                r = jax.block_until_ready(prog.fwd(w, x)[1])
                t1 = time.perf_counter()
                jax.block_until_ready(prog.bwd(w, x, r, dy + 0)[0])  # residuals and dy are donated
                fwd.append(t1 - t0)
                bwd.append(time.perf_counter() - t1)
        except Exception as e:  # noqa: BLE001
            if text == "recompute" or not _oom(e):
                raise
            continue  # `keep` (a saved set, chunks) does not fit this micro-batch here: derived or skipped
        out[text] = (statistics.median(fwd[1:]) * 1e3, statistics.median(bwd[1:]) * 1e3)
    return out


def _oom(e: Exception) -> bool:
    return "RESOURCE_EXHAUSTED" in str(e) or "out of memory" in str(e).lower()


def edge_times_ms(model, spec, micro_batch: int, seq_len: int, dtype, reps: int = 3) -> tuple[float, float]:
    """(head forward+backward+loss, embedding forward+backward) in ms."""
    abstract = lambda k: jax.eval_shape(lambda: model.init_unit(jax.random.key(0), k, seq_len))
    le, lh = FlatLayout.of(abstract(0)), FlatLayout.of(abstract(model.n_layers + 1))
    we, wh = _random_flat(le, dtype), _random_flat(lh, dtype)
    edges = EdgePrograms(model, le, lh)
    tok = jnp.zeros((micro_batch, seq_len), jnp.int32)
    wts = jnp.full((micro_batch, seq_len), 1.0 / tok.size, jnp.float32)
    x = jax.random.normal(jax.random.key(1), (micro_batch, seq_len, spec.d_model), dtype)
    w_tied = we if edges.tied else jnp.zeros((1,), dtype)
    head = median_s(lambda: edges.head_fwd_bwd(wh, w_tied, x + 0, tok, wts)[0], reps)
    embed = median_s(lambda: edges.embed_bwd(we, tok, edges.embed_fwd(we, tok) + 0)[0], reps)
    return head * 1e3, embed * 1e3


def measure_model_profile(spec, micro_batch: int, seq_len: int, dtype=jnp.bfloat16, attention_impl: str | None = None,
                          reps: int = 5, chunks: bool = True, level_step: int = 1, size_factor: int = 4) -> ModelProfile:
    """The model's profile on the default device: analytic shapes, measured activations and times. The block
    backward is timed at every `level_step`-th saved-set level the search uses (prefixes of the ranked
    candidates; 0: only the keep and recompute ends), each a compile of its own. The recomputed block and the
    head are timed again at `size_factor` times the micro-batch (0: not), where memory allows, for the
    per-token rate of larger calls."""
    from lohan_jax.models import build_model

    model = build_model(spec, dtype, attention_impl)
    itemsize = jnp.dtype(dtype).itemsize
    base = model_profile_from_spec(spec, seq_len, itemsize)
    cands, keep_bytes, keep_flops = activation_profile(model, spec, micro_batch, seq_len, dtype)
    base = dataclasses.replace(base, candidates=cands, keep_nbytes_per_token=keep_bytes,
                               recompute_flops_per_token=keep_flops)
    ranked = tuple(c.name for c in base.ranked_candidates())
    saves = tuple(ranked[:k] for k in range(level_step, len(ranked) + 1, level_step)) if level_step > 0 else ()
    b = micro_batch
    while True:  # the micro-batch at hand, else the largest half of it that fits (times scale per token)
        try:
            times = block_times_ms(model, spec, b, seq_len, dtype, reps, chunks, saves)
            head_ms, embed_ms = edge_times_ms(model, spec, b, seq_len, dtype, max(2, reps // 2))
            break
        except Exception as e:  # noqa: BLE001
            if not _oom(e) or b == 1:
                raise
            b //= 2
    fwd_r, bwd_r = times["recompute"]
    fwd_k, bwd_k = times.get("keep", (fwd_r, 2 * fwd_r))  # keep's backward: the two matmul passes
    chunked = times.get("recompute+chunks=2")
    overhead = (sum(chunked) / (fwd_r + bwd_r)) if chunked else 1.0
    bwd_r = max(bwd_r, bwd_k)
    points = {0.0: bwd_k, 1.0: bwd_r}
    for names in saves:  # a level that ran out of memory is not in `times`: the line spans it
        if f"save:{','.join(names)}" in times:
            points.setdefault(base.rec_frac(names), min(max(times[f"save:{','.join(names)}"][1], bwd_k), bwd_r))
    # the backward cannot get faster by saving less: a running max over the levels irons out timing noise
    ms = [(x, max(points[v] for v in sorted(points) if v <= x)) for x in sorted(points)]
    size_points = head_points = ()
    if size_factor > 1 and b == micro_batch:
        big = b * size_factor
        try:
            f_big, b_big = block_times_ms(model, spec, big, seq_len, dtype, max(2, reps // 2), False)["recompute"]
            h_big, _ = edge_times_ms(model, spec, big, seq_len, dtype, 2)
            per = lambda ms_big, ms: ms_big / size_factor / ms
            size_points = ((b * seq_len, 1.0), (big * seq_len, per(f_big + b_big, fwd_r + times["recompute"][1])))
            head_points = ((b * seq_len, 1.0), (big * seq_len, per(h_big, head_ms)))
            if chunked and b % 2 == 0:  # chunks=2 ran half-size calls: read as that size's per-token rate, so
                # a chunked block is timed at its slice size once, not also by an overhead measured at one size
                size_points, overhead = ((b // 2 * seq_len, max(1.0, overhead)), *size_points), 1.0
        except Exception as e:  # noqa: BLE001 - the larger call does not fit: times stay linear in tokens
            if not _oom(e):
                raise
    device = jax.devices()[0].device_kind
    return dataclasses.replace(
        base, tokens_measured=b * seq_len, block_fwd_ms=(fwd_k + fwd_r) / 2, block_bwd_keep_ms=bwd_k,
        block_bwd_recompute_ms=bwd_r, block_bwd_points_ms=tuple(ms) if saves else (),
        head_ms=head_ms, embed_ms=embed_ms,
        chunk_overhead=max(1.0, overhead), size_points=size_points, head_size_points=head_points,
        source=f"measured on {device}, {datetime.date.today().isoformat()}, micro-batch {b}x{seq_len}")


# ---- the machine -----------------------------------------------------------------------------------------
def measure_pcie_gbps(nbytes: int = 256 << 20, reps: int = 3) -> tuple[float, float, float]:
    """(host->GPU, GPU->host, both at once in total) GB/s between pinned host memory and the device."""
    spaces = MemorySpaces()
    host = spaces.to_host(np.ones(nbytes, np.uint8))
    dev = spaces.to_hbm(np.ones(nbytes, np.uint8))
    jax.block_until_ready((host, dev))
    h2d = median_s(lambda: spaces.to_hbm(host), reps)
    d2h = median_s(lambda: spaces.to_host(dev), reps)
    both = median_s(lambda: (spaces.to_hbm(host), spaces.to_host(dev)), reps)
    return nbytes / h2d / 1e9, nbytes / d2h / 1e9, 2 * nbytes / both / 1e9


def measure_matmul_tflops(n: int = 4096, dtype=jnp.bfloat16, reps: int = 5) -> float:
    a = jax.random.normal(jax.random.key(0), (n, n), dtype)
    f = jax.jit(lambda a: a @ a)
    return 2 * n**3 / median_s(lambda: f(a), reps) / 1e12


def measure_gpu_adam_gparams_per_s(n_params: int = 64 << 20, reps: int = 5) -> float:
    """The GPU AdamW's memory traffic (fp32 master, m, v in and out, bf16 gradient in, bf16 weights out)."""
    @jax.jit
    def step(master, mu, nu, g):
        g = g.astype(jnp.float32)
        mu = 0.1 * g + 0.9 * mu
        nu = 0.05 * g * g + 0.95 * nu
        master = master - 1e-4 * (mu / (jnp.sqrt(nu) + 1e-8) + 0.1 * master)
        return master, mu, nu, master.astype(jnp.bfloat16)

    state = [jnp.zeros((n_params,), jnp.float32) for _ in range(3)]
    g = jnp.ones((n_params,), jnp.bfloat16)
    return n_params / median_s(lambda: step(*state, g), reps) / 1e9


def free_hbm_gib(device=None) -> float:
    device = device or jax.devices()[0]
    stats = device.memory_stats() or {}
    if "bytes_limit" in stats:
        return (stats["bytes_limit"] - stats.get("bytes_in_use", 0)) / GIB
    return 0.0


def measure_machine(name: str = "", disk_path: str = "", quick: bool = False,
                    model_profile: ModelProfile | None = None) -> MachineProfile:
    """This machine: the device's rates and memory, pinned PCIe, host AdamW, RAM and (with a path) the disk."""
    import os

    device = jax.devices()[0]
    on_gpu = device.platform == "gpu"
    size = (16 << 20) if quick or not on_gpu else (512 << 20)
    h2d, d2h, both = measure_pcie_gbps(size)
    block = measure_matmul_tflops(1024 if quick or not on_gpu else 8192, jnp.bfloat16 if on_gpu else jnp.float32)
    head = 0.29 * block  # our H100's head/block ratio, unless the model's head was measured
    if model_profile is not None and model_profile.measured and model_profile.head_ms:
        head = model_profile.head_flops_per_token * model_profile.tokens_measured / model_profile.head_ms / 1e9
    disk = dict(disk_gib=0.0, disk_read_gbps=0.0, disk_write_gbps=0.0)
    if disk_path:
        rd, wr = measure_disk_gbps(disk_path, (64 << 20) if quick else (2 << 30))
        disk = dict(disk_gib=disk_free_gib(disk_path), disk_read_gbps=rd, disk_write_gbps=wr, disk_path=disk_path)
    ram = available_ram_gib()
    return MachineProfile(
        name=name or f"{device.device_kind.replace(' ', '-').lower()}-{os.uname().nodename}",
        description=f"{device.device_kind}, {os.cpu_count()} cores", gpu=device.device_kind,
        hbm_gib=free_hbm_gib(device) if on_gpu else 0.0, gpu_block_tflops=block, gpu_head_tflops=head,
        gpu_adam_gparams_per_s=measure_gpu_adam_gparams_per_s((4 << 20) if quick or not on_gpu else (64 << 20)),
        h2d_gbps=h2d, d2h_gbps=d2h, duplex_gbps=both,
        host_adam_gparams_per_s=measure_host_adam_gparams_per_s((4 << 20) if quick else (64 << 20)),
        cpu_cores=os.cpu_count() or 0, ram_gib=ram,
        pinned_limit_gib=pinned_limit_nbytes() / GIB if on_gpu else 0,
        **disk, source=f"measured on {device.device_kind}, {datetime.date.today().isoformat()}")
