"""Machine and model profiles: what the planner knows about a box and a model, as plain data.

A MachineProfile is measured (`lohan-jax profile`) or described by hand in YAML (configs/machines/); a
ModelProfile comes from a model's shape alone (`model_profile_from_spec`) or from measurements on the device
(lohan_jax.planner.measure). Both save as JSON or YAML. The jax-free measurements (RAM, disk, host AdamW)
live here; the device ones (block times, activation bytes, PCIe, HBM) in measure.py.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any

import yaml

GIB = 2**30
GB = 1e9


@dataclasses.dataclass(frozen=True)
class MachineProfile:
    """One GPU box. Rates in GB/s are 1e9 bytes per second; memory sizes in GiB."""

    name: str = "unnamed"
    description: str = ""
    gpu: str = ""
    hbm_gib: float = 0.0  # HBM the plan may use (free memory of the card, or an emulated cap)
    gpu_block_tflops: float = 100.0  # achieved FLOP/s of a block's matmuls (forward, backward, recompute)
    gpu_head_tflops: float = 30.0  # achieved FLOP/s of the head (vocab matmul, fp32 logits, loss)
    gpu_adam_gparams_per_s: float = 20.0  # AdamW on the GPU (memory-bound, ~28 bytes/param of HBM traffic)
    hbm_gbps: float = 1000.0  # HBM bandwidth (embedding gather/scatter, gradient accumulation)
    h2d_gbps: float = 20.0  # pinned host -> GPU, alone
    d2h_gbps: float = 20.0  # GPU -> pinned host, alone
    duplex_gbps: float = 40.0  # both directions at once, in total
    host_adam_gparams_per_s: float = 1.0  # fused host AdamW (28 bytes/param of RAM traffic)
    host_accumulate_gparams_per_s: float = 0.0  # host fp32 += bf16 gradient; 0: 2.8x the AdamW rate (10 vs 28 B)
    cpu_cores: int = 0
    ram_gib: float = 0.0  # host RAM available to the run (cgroup-aware MemAvailable)
    pinned_limit_gib: float = 0.0  # cap on pinned host memory (XLA_PJRT_GPU_HOST_MEMORY_LIMIT_GB); 0: none
    disk_gib: float = 0.0  # free space on the NVMe path; 0: no disk tier
    disk_read_gbps: float = 0.0
    disk_write_gbps: float = 0.0  # the disk is simplex: reads and writes share its time
    disk_path: str = ""
    dispatch_ms: float = 0.1  # Python/jax dispatch per operation on the engine's main thread
    source: str = "described"  # described | measured on <device>, <date>

    def __post_init__(self):
        for f in ("gpu_block_tflops", "gpu_head_tflops", "gpu_adam_gparams_per_s", "hbm_gbps", "h2d_gbps",
                  "d2h_gbps", "duplex_gbps", "host_adam_gparams_per_s"):
            if getattr(self, f) <= 0:
                raise ValueError(f"machine {self.name!r}: {f}={getattr(self, f)} must be > 0")
        for f in ("hbm_gib", "ram_gib", "disk_gib", "pinned_limit_gib", "dispatch_ms"):
            if getattr(self, f) < 0:
                raise ValueError(f"machine {self.name!r}: {f}={getattr(self, f)} must be >= 0")
        if self.disk_gib and min(self.disk_read_gbps, self.disk_write_gbps) <= 0:
            raise ValueError(f"machine {self.name!r}: a disk tier (disk_gib={self.disk_gib}) needs "
                             "disk_read_gbps and disk_write_gbps > 0")

    @property
    def accumulate_gparams_per_s(self) -> float:
        return self.host_accumulate_gparams_per_s or 2.8 * self.host_adam_gparams_per_s

    def with_(self, **changes) -> MachineProfile:
        return dataclasses.replace(self, **changes)


@dataclasses.dataclass(frozen=True)
class Candidate:
    """A named intermediate of a block: bytes to keep it and FLOPs to recompute it, per token."""

    name: str
    nbytes_per_token: float
    recompute_flops_per_token: float

    @property
    def benefit(self) -> float:
        """The paper's offloading benefit OB = recompute FLOPs / bytes."""
        return self.recompute_flops_per_token / max(self.nbytes_per_token, 1e-9)


@dataclasses.dataclass(frozen=True)
class ModelProfile:
    """A model's units, FLOPs and activations; optionally its measured per-block times.

    Per-token quantities scale with the micro-batch; measured times were taken at `tokens_measured` tokens
    per call and are scaled to other micro-batch sizes per token, at the per-token rate `size_points` gives
    for that many tokens per call (larger calls run the matmuls closer to peak).
    """

    model: str
    n_layers: int
    d_model: int
    d_ff: int
    n_heads: int
    vocab_size: int
    seq_len: int
    tied: bool
    itemsize: int  # bytes of the compute dtype (2: bf16)
    embed_params: int
    block_params: int
    head_params: int
    nonembed_params: int  # the N of 6*N*tokens
    fwd_flops_per_token: float  # one block's forward
    head_flops_per_token: float  # head forward + backward
    candidates: tuple[Candidate, ...] = ()  # in the model's order; the planner ranks them by benefit
    keep_nbytes_per_token: float = 0.0  # residuals of the `keep` policy (everything the backward reads)
    recompute_flops_per_token: float = 0.0  # the `recompute` policy's extra backward FLOPs
    tokens_measured: int = 0  # 0: times below are derived from the machine's FLOP rates
    block_fwd_ms: float = 0.0
    block_bwd_keep_ms: float = 0.0
    block_bwd_recompute_ms: float = 0.0
    # (recompute-FLOP fraction left, backward ms) measured at the saved-set levels the search uses, sorted by
    # fraction; empty: the backward is interpolated linearly between the keep and recompute ends. Measured
    # because recompute time is not proportional to FLOPs (gpt3-1.3b on the H100: two plans rated 1% apart
    # by the two-point line ran 17% apart, attention's recompute costing more than its FLOP share).
    block_bwd_points_ms: tuple[tuple[float, float], ...] = ()
    head_ms: float = 0.0  # head forward + backward + loss
    embed_ms: float = 0.0  # embedding forward + backward
    chunk_overhead: float = 1.0  # time factor of a block run as chunks > 1 (measured 1.12 on the H100)
    # (tokens per call, time per token relative to that at tokens_measured), sorted, for the blocks and the head;
    # empty: linear in tokens. gpt3-1.3b on the H100: a block's recompute step at 32 x 1024 tokens took 0.8x
    # the per-token time of 8 x 1024, so plans timed from 8 sequences overstated 64-sequence steps by 25%.
    size_points: tuple[tuple[int, float], ...] = ()
    head_size_points: tuple[tuple[int, float], ...] = ()
    source: str = "analytic"

    @property
    def measured(self) -> bool:
        return self.tokens_measured > 0 and self.block_fwd_ms > 0

    @property
    def param_count(self) -> int:
        return self.embed_params + self.n_layers * self.block_params + self.head_params

    def unit_params(self) -> list[int]:
        return [self.embed_params, *([self.block_params] * self.n_layers), self.head_params]

    def ranked_candidates(self) -> tuple[Candidate, ...]:
        """Candidates worth keeping, best benefit first (deterministic: ties by name)."""
        useful = [c for c in self.candidates if c.recompute_flops_per_token > 0.01 * self.d_model]
        return tuple(sorted(useful, key=lambda c: (-c.benefit, c.name)))

    def rec_frac(self, save: tuple[str, ...] | None) -> float:
        """The fraction of the `recompute` policy's extra backward FLOPs left under a policy (0 keep, 1 none saved)."""
        return self.save_recompute_flops_per_token(save) / max(self.recompute_flops_per_token, 1e-9)

    def block_bwd_ms(self, rec_frac: float) -> float:
        """Measured backward ms of one block at `rec_frac`: piecewise linear through the measured points (the
        keep and recompute ends when no points are stored), constant beyond the outermost ones."""
        pts = self.block_bwd_points_ms or ((0.0, self.block_bwd_keep_ms), (1.0, self.block_bwd_recompute_ms))
        if rec_frac <= pts[0][0]:
            return pts[0][1]
        for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
            if rec_frac <= x1:
                return y1 if x1 <= x0 else y0 + (y1 - y0) * (rec_frac - x0) / (x1 - x0)
        return pts[-1][1]

    def per_token_factor(self, tokens: float, head: bool = False) -> float:
        """Time per token at `tokens` per call over that at tokens_measured: log-linear between the measured
        sizes, constant beyond them."""
        pts = self.head_size_points if head else self.size_points
        if not pts or tokens <= pts[0][0]:
            return pts[0][1] if pts else 1.0
        for (t0, f0), (t1, f1) in zip(pts, pts[1:]):
            if tokens <= t1:
                return f0 + (f1 - f0) * math.log(tokens / t0) / math.log(t1 / t0)
        return pts[-1][1]

    def save_nbytes_per_token(self, save: tuple[str, ...] | None) -> float:
        if save is None:
            return self.keep_nbytes_per_token
        by_name = {c.name: c for c in self.candidates}
        return sum(by_name[n].nbytes_per_token for n in save)

    def save_recompute_flops_per_token(self, save: tuple[str, ...] | None) -> float:
        """Backward recompute FLOPs left under a policy (0 for keep)."""
        if save is None:
            return 0.0
        by_name = {c.name: c for c in self.candidates}
        return max(0.0, self.recompute_flops_per_token - sum(by_name[n].recompute_flops_per_token for n in save))


def model_profile_from_spec(spec: Any, seq_len: int, itemsize: int = 2, flash_attention: bool = True) -> ModelProfile:
    """Shapes, FLOPs and named activations of a built-in GPT or LLaMA block from its ModelSpec alone.

    The named intermediates and what recomputing each costs match the models' checkpoint_name tags; the
    FLOPs agree with XLA's cost analysis of the block (tests/test_planner.py checks both on tiny shapes).
    Saving attn_ctx spares only the AV product: the backward recomputes the softmax either way.
    """
    d, f, s, h = spec.d_model, spec.ff_dim, seq_len, spec.n_heads
    gpt = getattr(spec.arch, "value", spec.arch) == "gpt"
    kv = spec.kv_heads * spec.head_dim
    if gpt:
        names = [("qkv", 3 * d, 6 * d * d), ("attn_ctx", d, 2 * s * d), ("attn_res", d, 2 * d * d),
                 ("mlp_up", f, 2 * d * f), ("mlp_act", f, f)]
        fwd = 2 * spec.block_param_count() + 4 * s * d
    else:
        names = [("q_rot", d, 2 * d * d), ("k_rot", kv, 2 * d * kv), ("v", kv, 2 * d * kv), ("attn_ctx", d, 2 * s * d),
                 ("attn_res", d, 2 * d * d), ("mlp_gate", f, 2 * d * f), ("mlp_up", f, 2 * d * f), ("mlp_act", f, f)]
        fwd = 2 * spec.block_param_count() + 4 * s * d
    cands = tuple(Candidate(n, float(e * itemsize), float(fl)) for n, e, fl in names)
    names_bytes = sum(c.nbytes_per_token for c in cands)
    # keep also holds the norms' outputs and fp32 row statistics (mean and 1/std for LayerNorm, 1/rms for
    # RMSNorm: their custom backward keeps nothing else) and the attention's fp32 softmax statistics (flash), or
    # XLA's attention's causal mask (bool), logits and shifted logits (fp32), probabilities and statistics
    norm_stats = 2 * (8 if gpt else 4)
    attn_extra = 4 * h if flash_attention else h * s * (1 + 8 + itemsize) + 8 * h
    keep = names_bytes + 2 * d * itemsize + norm_stats + attn_extra
    recompute = sum(c.recompute_flops_per_token for c in cands) + 2 * s * d  # + the softmax (QK^T)
    return ModelProfile(
        model=spec.name, n_layers=spec.n_layers, d_model=d, d_ff=f, n_heads=h, vocab_size=spec.vocab_size,
        seq_len=s, tied=bool(spec.tie_embeddings), itemsize=itemsize, embed_params=spec.embed_param_count(),
        block_params=spec.block_param_count(), head_params=spec.head_param_count(),
        nonembed_params=spec.nonembed_param_count(), fwd_flops_per_token=float(fwd),
        head_flops_per_token=float(6 * d * spec.vocab_size), candidates=cands, keep_nbytes_per_token=float(keep),
        recompute_flops_per_token=float(recompute))


# ---- io --------------------------------------------------------------------------------------------------
def _to_dict(x: Any) -> Any:
    if dataclasses.is_dataclass(x):
        return {f.name: _to_dict(getattr(x, f.name)) for f in dataclasses.fields(x)}
    if isinstance(x, (tuple, list)):
        return [_to_dict(v) for v in x]
    return x


def machine_from_dict(d: dict[str, Any]) -> MachineProfile:
    known = {f.name for f in dataclasses.fields(MachineProfile)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ValueError(f"machine profile: unknown key(s) {unknown}; known keys: {', '.join(sorted(known))}")
    return MachineProfile(**d)


def model_from_dict(d: dict[str, Any]) -> ModelProfile:
    d = dict(d)
    d["candidates"] = tuple(Candidate(**c) for c in d.get("candidates", ()))
    d["block_bwd_points_ms"] = tuple((float(x), float(ms)) for x, ms in d.get("block_bwd_points_ms", ()))
    for key in ("size_points", "head_size_points"):
        d[key] = tuple((int(t), float(f)) for t, f in d.get(key, ()))
        tokens = [t for t, _ in d[key]]
        if any(t <= 0 for t in tokens) or tokens != sorted(set(tokens)) or any(f <= 0 for _, f in d[key]):
            raise ValueError(f"model profile: {key} must be (tokens, factor) pairs with tokens > 0 strictly "
                             f"increasing and factors > 0, got {list(d[key])}")
    return ModelProfile(**d)


def save_profile(path: str | Path, machine: MachineProfile | None = None, model: ModelProfile | None = None) -> None:
    """JSON (or YAML by suffix) with `machine` and/or `model` sections."""
    out = {k: _to_dict(v) for k, v in (("machine", machine), ("model", model)) if v is not None}
    path = Path(path)
    text = yaml.safe_dump(out, sort_keys=False) if path.suffix in (".yaml", ".yml") else json.dumps(out, indent=1)
    path.write_text(text)


def load_profile(path: str | Path) -> tuple[MachineProfile | None, ModelProfile | None]:
    """A saved profile, or a hand-written machine YAML (top-level keys, or under `machine:`)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"profile {str(path)!r} does not exist")
    raw = yaml.safe_load(path.read_text()) or {}
    if not isinstance(raw, dict):
        raise ValueError(f"profile {str(path)!r} must hold a mapping")
    if "machine" not in raw and "model" not in raw:
        raw = {"machine": raw}
    machine = machine_from_dict(raw["machine"]) if raw.get("machine") else None
    model = model_from_dict(raw["model"]) if raw.get("model") else None
    return machine, model


# ---- jax-free measurements -------------------------------------------------------------------------------
def available_ram_gib() -> float:
    """MemAvailable capped by the cgroup limit minus its usage (containers see the host's /proc/meminfo)."""
    avail = 0.0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                avail = int(line.split()[1]) * 1024
    except OSError:
        pass
    for limit_path, usage_path in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            limit = Path(limit_path).read_text().strip()
        except OSError:
            continue
        if limit.isdigit() and int(limit) < (1 << 60):
            try:
                used = int(Path(usage_path).read_text().strip())
            except (OSError, ValueError):
                used = 0
            free = int(limit) - used
            avail = min(avail, free) if avail else free
    return avail / GIB


def disk_free_gib(path: str | Path) -> float:
    return shutil.disk_usage(path).free / GIB


def measure_disk_gbps(path: str | Path, nbytes: int = 256 << 20, block: int = 16 << 20) -> tuple[float, float]:
    """(read, write) GB/s of a file under `path`: written with fsync, read after dropping it from the page
    cache (posix_fadvise), so neither is the page cache's speed."""
    import numpy as np

    f = Path(path) / f".lohan-disk-probe-{os.getpid()}"
    buf = np.random.default_rng(0).integers(0, 255, block, dtype=np.uint8).tobytes()
    try:
        t0 = time.perf_counter()
        fd = os.open(f, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            for _ in range(max(1, nbytes // block)):
                os.write(fd, buf)
            os.fsync(fd)
        finally:
            os.close(fd)
        write_s = time.perf_counter() - t0
        fd = os.open(f, os.O_RDONLY)
        try:
            if hasattr(os, "posix_fadvise"):
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            t0 = time.perf_counter()
            while os.read(fd, block):
                pass
            read_s = time.perf_counter() - t0
        finally:
            os.close(fd)
    finally:
        f.unlink(missing_ok=True)
    n = max(1, nbytes // block) * block
    return n / read_s / GB, n / write_s / GB


def measure_host_adam_gparams_per_s(n_params: int = 32 << 20, reps: int = 3) -> float:
    """The engine's fused host AdamW kernel (bf16 gradient in, bf16 weights out), best of `reps`."""
    import numpy as np

    from lohan_jax.optim import host_adamw

    master = np.zeros(n_params, np.float32)
    mu, nu = np.zeros_like(master), np.zeros_like(master)
    grad = np.full(n_params, 0x3F80, np.uint16)  # bf16 1.0
    out = np.zeros(n_params, np.uint16)
    bounds, decay = host_adamw.make_segments([n_params], [0.1])
    best = float("inf")
    for i in range(reps + 1):
        t0 = time.perf_counter()
        host_adamw.adamw_update_(master, mu, nu, grad, out, lr=1e-4, b1=0.9, b2=0.95, eps=1e-8, count=i + 1,
                                 seg_bounds=bounds, seg_decay=decay)
        if i:  # the first call compiles or loads the kernel
            best = min(best, time.perf_counter() - t0)
    return n_params / best / 1e9
