"""Data parallel on several GPUs of one host: the interconnect, the shared host, and the step-time model.

Pure decisions (no jax at import; `measure_interconnect` imports it when called). DataParallelEngine splits
every unit's flat vectors into one shard per GPU (ZeRO): a GPU uploads, downloads and (on the GPU) updates
only its 1/N shard, at its B/N share of the batch, while the host's CPU AdamW, RAM, pinned memory and disk
serve all GPUs. So one GPU of an N-GPU step is a one-GPU step of a 1/N-sized model (same FLOPs, same
activations) on a machine whose shared resources are divided by N:

  step_N = predict(plan, view(workload at B/N), view(machine)) with the collectives in the GPU programs

The collectives run inside the programs that need them, as the engine runs them (so they are exposed GPU
time, not overlapped): an all-gather of the unit's bf16 weights at each use (forward, backward, tied head) and
a reduce-scatter of its fp32 gradient after its backward. Time of each: latency + bytes * (N-1)/N / bus
bandwidth (NCCL-tests' "busbw", which `measure_interconnect` reports). The host AdamW is one worker over all
shards: N shards of P/N at rate R/N take P/R, as on one GPU. PCIe: each GPU's own link, capped by the total
all GPUs reach at once (`pcie_*_total_gbps`: a shared switch or uplink, or the host memory's DMA bandwidth).
"""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import yaml

from lohan_jax.plan import ActivationPolicy, Plan
from lohan_jax.planner.cost import Prediction, predict
from lohan_jax.planner.profile import GB, GIB, MachineProfile, ModelProfile
from lohan_jax.planner.search import PlanResult, SearchOptions, search
from lohan_jax.planner.workload import Workload

SHARD_ALIGN = 128  # lohan_jax.engine.data_parallel.SHARD_ALIGN (kept equal by test)


@dataclasses.dataclass(frozen=True)
class Interconnect:
    """How N GPUs of one host talk to each other and share the host. Bandwidths in GB/s (1e9 B/s)."""

    name: str = "unnamed"
    description: str = ""
    n_gpus: int = 2
    all_gather_gbps: float = 100.0  # bus bandwidth of an all-gather (NCCL-tests busbw)
    reduce_scatter_gbps: float = 100.0  # bus bandwidth of a reduce-scatter
    latency_us: float = 20.0  # per collective (launch and synchronisation)
    pcie_h2d_total_gbps: float = 0.0  # all GPUs' host->GPU at once, in total; 0: no cap beyond each link
    pcie_d2h_total_gbps: float = 0.0  # the same GPU->host
    source: str = "described"

    def __post_init__(self):
        if self.n_gpus < 1:
            raise ValueError(f"interconnect {self.name!r}: n_gpus={self.n_gpus} must be >= 1")
        for f in ("all_gather_gbps", "reduce_scatter_gbps"):
            if getattr(self, f) <= 0:
                raise ValueError(f"interconnect {self.name!r}: {f}={getattr(self, f)} must be > 0")
        for f in ("latency_us", "pcie_h2d_total_gbps", "pcie_d2h_total_gbps"):
            if getattr(self, f) < 0:
                raise ValueError(f"interconnect {self.name!r}: {f}={getattr(self, f)} must be >= 0")

    def with_(self, **changes) -> Interconnect:
        return dataclasses.replace(self, **changes)

    def _ring_s(self, nbytes: float, gbps: float) -> float:
        n = self.n_gpus
        return 0.0 if n == 1 else self.latency_us * 1e-6 + nbytes * (n - 1) / n / (gbps * GB)

    def all_gather_s(self, nbytes: float) -> float:
        """Seconds to gather a vector of `nbytes` in all (each GPU holding 1/N of it) onto every GPU."""
        return self._ring_s(nbytes, self.all_gather_gbps)

    def reduce_scatter_s(self, nbytes: float) -> float:
        """Seconds to sum N vectors of `nbytes` each, leaving each GPU its 1/N of the sum."""
        return self._ring_s(nbytes, self.reduce_scatter_gbps)


def _nvlink_h100(n: int) -> Interconnect:
    return Interconnect(
        name=f"h100-sxm-x{n}", n_gpus=n,
        description=f"{n}x H100 SXM on NVLink 4 / NVSwitch, each on its own PCIe 5 x16 link",
        # NVLink 4: 450 GB/s each way per GPU; NCCL all-gather / reduce-scatter reach ~350-370 GB/s busbw on 8 GPUs
        # (NVIDIA's DGX H100 NCCL-tests); taken lower for 2-4 GPUs and bf16/fp32 messages of 0.1-1 GB
        all_gather_gbps=300.0, reduce_scatter_gbps=300.0, latency_us=20.0,
        source="described from NVLink 4 datasheets, not measured: run experiments/bench_data_parallel.py")


def _pcie_4090(n: int) -> Interconnect:
    return Interconnect(
        name=f"paper-4090-x{n}", n_gpus=n,
        description=f"{n}x RTX 4090 (no P2P: NCCL goes through host memory), each on its own PCIe 4.0 x16 link",
        # without P2P NCCL stages every collective through host shared memory: each byte crosses PCIe twice,
        # ~10 GB/s busbw for 2-4 GPUs at ~21 GB/s per direction per link (PAPER.md's link rate)
        all_gather_gbps=10.0, reduce_scatter_gbps=10.0, latency_us=50.0,
        source="described (PAPER.md testbed, PCIe 4.0; no P2P on GeForce cards), not measured")


BUILTIN: dict[str, Interconnect] = {ic.name: ic for n in (2, 4, 8) for ic in (_nvlink_h100(n), _pcie_4090(n))}


def interconnect(name_or_path: str) -> Interconnect:
    """A built-in interconnect by name, or a YAML/JSON file (top-level keys, or under `interconnect:`, so a
    machine file may carry both `machine:` and `interconnect:` sections)."""
    if name_or_path in BUILTIN:
        return BUILTIN[name_or_path]
    path = Path(name_or_path)
    if not path.is_file():
        raise FileNotFoundError(f"interconnect {name_or_path!r}: neither a built-in ({', '.join(BUILTIN)}) "
                                "nor a file")
    raw = yaml.safe_load(path.read_text()) or {}
    raw = raw.get("interconnect", raw) if isinstance(raw, dict) else raw
    if not isinstance(raw, dict):
        raise ValueError(f"{name_or_path!r} holds no interconnect mapping")
    known = {f.name for f in dataclasses.fields(Interconnect)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ValueError(f"interconnect {name_or_path!r}: unknown key(s) {unknown}; "
                         f"known keys: {', '.join(sorted(known))}")
    return Interconnect(**raw)


def save_interconnect(ic: Interconnect, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump({"interconnect": dataclasses.asdict(ic)}, sort_keys=False))


# ---- one GPU's view of the N-GPU step --------------------------------------------------------------------
def _shard(n: int, n_gpus: int) -> int:
    return -(-n // (n_gpus * SHARD_ALIGN)) * SHARD_ALIGN


def gpu_machine(m: MachineProfile, ic: Interconnect) -> MachineProfile:
    """The machine as one of N GPUs sees it: the host's CPU AdamW, RAM, pinned memory and disk shared N
    ways; its own PCIe link, capped by the total all GPUs reach at once."""
    n = ic.n_gpus
    h2d = min(m.h2d_gbps, ic.pcie_h2d_total_gbps / n) if ic.pcie_h2d_total_gbps else m.h2d_gbps
    d2h = min(m.d2h_gbps, ic.pcie_d2h_total_gbps / n) if ic.pcie_d2h_total_gbps else m.d2h_gbps
    duplex = m.duplex_gbps * min(h2d / m.h2d_gbps, d2h / m.d2h_gbps)
    return m.with_(
        name=f"{m.name} (1 of {n} GPUs)", h2d_gbps=h2d, d2h_gbps=d2h, duplex_gbps=duplex,
        host_adam_gparams_per_s=m.host_adam_gparams_per_s / n,
        host_accumulate_gparams_per_s=m.accumulate_gparams_per_s / n,
        ram_gib=m.ram_gib / n, pinned_limit_gib=m.pinned_limit_gib / n, disk_gib=m.disk_gib / n,
        disk_read_gbps=m.disk_read_gbps / n, disk_write_gbps=m.disk_write_gbps / n)


def gather_scratch_gib(model: ModelProfile) -> float:
    """HBM the engine's collectives need beyond the one-GPU accounting: the largest unit's gathered bf16
    weights and its fp32 gradient padded for the reduce-scatter, alive in the same program."""
    return max(model.unit_params()) * (model.itemsize + 4) / GIB


@dataclasses.dataclass(frozen=True)
class DataParallelWorkload(Workload):
    """One GPU's share of an N-GPU workload: `model` is the 1/N shard of every unit (what this GPU moves and
    updates), `batch_size` its share of the batch; GPU times are the whole model's at that batch plus the
    collectives of each program."""

    full: ModelProfile | None = None  # the whole model
    interconnect: Interconnect = Interconnect()

    def _whole(self) -> Workload:
        return Workload(self.full, self.batch_size, self.n_micro, self.clip)

    def _gather_s(self, params: int) -> float:
        return self.interconnect.all_gather_s(params * self.full.itemsize)

    def _reduce_s(self, params: int) -> float:  # the engine sums gradients in fp32
        return self.interconnect.reduce_scatter_s(params * 4)

    def block_times_s(self, act: ActivationPolicy, machine: MachineProfile) -> tuple[float, float]:
        fwd, bwd = self._whole().block_times_s(act, machine)
        p = self.full.block_params
        return fwd + self._gather_s(p), bwd + self._gather_s(p) + self._reduce_s(p)

    def head_s(self, machine: MachineProfile) -> float:
        f = self.full
        tied = self._gather_s(f.embed_params) if f.tied else 0.0
        return self._whole().head_s(machine) + self._gather_s(f.head_params) + self._reduce_s(f.head_params) + tied

    def embed_s(self, machine: MachineProfile) -> tuple[float, float]:
        fwd, bwd = self._whole().embed_s(machine)
        p = self.full.embed_params
        return fwd + self._gather_s(p), bwd + self._gather_s(p) + self._reduce_s(p)

    def flops_6n_per_token(self) -> float:
        return self._whole().flops_6n_per_token()

    def flops_paper_per_token(self) -> float:
        return self._whole().flops_paper_per_token()

    def collective_s(self, plan: Plan) -> float:
        """GPU seconds per step spent in collectives (each unit: a gather per use, a reduce per backward)."""
        f, n_blocks = self.full, len(plan.blocks)
        per_micro = (2 * self._gather_s(f.embed_params) + self._reduce_s(f.embed_params)
                     + n_blocks * (2 * self._gather_s(f.block_params) + self._reduce_s(f.block_params))
                     + self._gather_s(f.head_params) + self._reduce_s(f.head_params)
                     + (self._gather_s(f.embed_params) if f.tied else 0.0))
        return per_micro * self.n_micro


def gpu_workload(wl: Workload, ic: Interconnect) -> DataParallelWorkload:
    """One GPU's share of `wl` (the global batch) on N GPUs: refused unless each micro-batch splits evenly."""
    n = ic.n_gpus
    if wl.micro_batch % n:
        raise ValueError(f"a micro-batch of {wl.micro_batch} sequences does not split over {n} GPUs")
    m = wl.model
    shard = dataclasses.replace(m, embed_params=_shard(m.embed_params, n), block_params=_shard(m.block_params, n),
                                head_params=_shard(m.head_params, n))
    return DataParallelWorkload(shard, wl.batch_size // n, wl.n_micro, wl.clip, full=m, interconnect=ic)


@dataclasses.dataclass(frozen=True)
class ParallelPrediction:
    n_gpus: int
    step_s: float
    tokens_per_s: float  # all GPUs together
    tflops_6n: float
    tflops_paper: float
    collective_s: float  # GPU time per step inside collectives (exposed: they run in the GPU programs)
    per_gpu: Prediction  # one GPU's replay (its tokens/s is one GPU's)


def predict_data_parallel(plan: Plan, wl: Workload, machine: MachineProfile, ic: Interconnect) -> ParallelPrediction:
    """Predicted steady-state step of `plan` (placement per GPU) for the global workload `wl` on N GPUs."""
    view = gpu_workload(wl, ic)
    p = predict(plan, view, gpu_machine(machine, ic))
    n = ic.n_gpus
    return ParallelPrediction(n_gpus=n, step_s=p.step_s, tokens_per_s=p.tokens_per_s * n, tflops_6n=p.tflops_6n * n,
                              tflops_paper=p.tflops_paper * n, collective_s=view.collective_s(plan), per_gpu=p)


def plan_data_parallel(wl: Workload, machine: MachineProfile, ic: Interconnect,
                       opts: SearchOptions | None = None) -> tuple[PlanResult, ParallelPrediction | None]:
    """The planner's search for one GPU's view of the N-GPU step (its budgets: the GPU's HBM less the
    collectives' scratch; 1/N of RAM, pinned memory and disk), and that plan's N-GPU prediction."""
    view = gpu_workload(wl, ic)
    vm = gpu_machine(machine, ic)
    vm = vm.with_(hbm_gib=max(0.0, vm.hbm_gib - gather_scratch_gib(wl.model)))
    result = search(view, vm, opts or SearchOptions())
    if result.plan is None:
        return result, None
    pred = predict_data_parallel(result.plan, wl, machine, ic)
    plan = dataclasses.replace(result.plan, predicted_step_s=pred.step_s, predicted_tokens_per_s=pred.tokens_per_s)
    return dataclasses.replace(result, plan=plan), pred


def scaling(plan: Plan, per_gpu_batch: int, model: ModelProfile, machine: MachineProfile, ic: Interconnect,
            n_micro: int = 1, clip: bool = False) -> dict[str, Any]:
    """Predicted tokens/s on one GPU and on N GPUs at the same per-GPU batch, and their ratio."""
    one = predict(plan, Workload(model, per_gpu_batch, n_micro, clip), machine)
    many = predict_data_parallel(plan, Workload(model, per_gpu_batch * ic.n_gpus, n_micro, clip), machine, ic)
    return {"n_gpus": ic.n_gpus, "step_s_1": one.step_s, "tokens_per_s_1": one.tokens_per_s,
            "step_s_n": many.step_s, "tokens_per_s_n": many.tokens_per_s, "collective_s": many.collective_s,
            "scaling": many.tokens_per_s / one.tokens_per_s}


# ---- measured on the machine (imports jax) ---------------------------------------------------------------
def measure_interconnect(n_gpus: int = 0, nbytes: int = 256 << 20, reps: int = 5, name: str = "") -> Interconnect:
    """All-gather and reduce-scatter bus bandwidth over the first `n_gpus` local devices (0: all), with
    jitted shard_map collectives of an fp32 vector of `nbytes`; and the host<->GPU rate all devices reach at
    once from pinned memory (each its own shard), which shows whether their PCIe links are shared."""
    import datetime

    import jax
    import numpy as np
    from jax.sharding import Mesh
    from jax.sharding import PartitionSpec as P

    from lohan_jax.planner.measure import median_s
    from lohan_jax.tiers import MeshSpaces

    devices = jax.local_devices()[:n_gpus] if n_gpus else jax.local_devices()
    n = len(devices)
    mesh = Mesh(np.asarray(devices), ("x",))
    spaces = MeshSpaces(mesh)
    elems = max(n, nbytes // 4 // n * n)

    timed = lambda fn: median_s(fn, reps)

    smap = lambda f, out: jax.jit(jax.shard_map(f, mesh=mesh, in_specs=P("x"), out_specs=out, check_vma=False))
    gather = smap(lambda s: jax.lax.all_gather(s, "x", tiled=True), P())
    scatter = smap(lambda s: jax.lax.psum_scatter(s, "x", scatter_dimension=0, tiled=True), P("x"))
    shards = spaces.to_hbm(np.ones(elems, np.float32))  # 1/N each: gathered to the whole vector
    whole = spaces.to_hbm(np.ones(elems * n, np.float32))  # the whole vector each: reduced to 1/N each
    bus = lambda s: elems * 4 * (n - 1) / n / s / GB if n > 1 else float("inf")
    ag, rs = bus(timed(lambda: gather(shards))), bus(timed(lambda: scatter(whole)))
    host = spaces.to_host(np.ones(elems * 4 * n, np.uint8))  # `nbytes` from and to every device at once
    h2d = host.nbytes / timed(lambda: spaces.to_hbm(host)) / GB
    dev = spaces.to_hbm(np.ones(host.shape, np.uint8))
    d2h = dev.nbytes / timed(lambda: spaces.to_host(dev)) / GB
    kind = devices[0].device_kind
    return Interconnect(
        name=name or f"{kind.replace(' ', '-').lower()}-x{n}", n_gpus=n, description=f"{n}x {kind}, measured",
        all_gather_gbps=min(ag, 1e6), reduce_scatter_gbps=min(rs, 1e6), pcie_h2d_total_gbps=h2d,
        pcie_d2h_total_gbps=d2h, source=f"measured on {n}x {kind}, {datetime.date.today().isoformat()}, "
                                        f"{elems * 4 / 2**20:.0f} MiB fp32 vectors")


def bandwidth_row(ic: Interconnect) -> dict[str, float]:
    """The interconnect's figures under RESULTS.md-style keys (for experiment rows)."""
    return {"all_gather_busbw_gbps": ic.all_gather_gbps, "reduce_scatter_busbw_gbps": ic.reduce_scatter_gbps,
            "pcie_h2d_total_gbps": ic.pcie_h2d_total_gbps, "pcie_d2h_total_gbps": ic.pcie_d2h_total_gbps}


def describe(pred: ParallelPrediction, single: Prediction | None = None) -> str:
    line = (f"{pred.n_gpus} GPUs: step {pred.step_s:.3f} s, {pred.tokens_per_s:,.0f} tokens/s, "
            f"{pred.tflops_6n:.1f} TFLOPS (6N), collectives {pred.collective_s * 1e3:.1f} ms/step")
    if single is not None:
        line += f"; {pred.tokens_per_s / single.tokens_per_s:.2f}x one GPU ({single.tokens_per_s:,.0f} tokens/s)"
    return line if math.isfinite(pred.step_s) else f"{pred.n_gpus} GPUs: no prediction"


# ---- `python -m lohan_jax.planner.parallel` (until `lohan-jax plan` takes --gpus) ----------------------------
def main(argv: list[str] | None = None) -> int:
    """Plan a run config on N GPUs of a machine: the per-GPU plan, the predicted step, the scaling."""
    import argparse

    from lohan_jax.config import load_config
    from lohan_jax.planner.cli import DEFAULT_MACHINE, workload_for
    from lohan_jax.planner.machines import machine

    p = argparse.ArgumentParser(prog="python -m lohan_jax.planner.parallel", description=main.__doc__)
    p.add_argument("config", nargs="?", help="YAML config file; train.batch_size is the global batch")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config value")
    p.add_argument("--machine", default=DEFAULT_MACHINE, help="a built-in machine or a machine YAML/JSON file")
    p.add_argument("--interconnect", default="", help=f"a built-in ({', '.join(BUILTIN)}) or a YAML file "
                                                       "(default: h100-sxm-x<offload.devices>)")
    args = p.parse_args(argv)
    cfg = load_config(args.config, args.set)
    ic = interconnect(args.interconnect or f"h100-sxm-x{cfg.offload.devices}") if (
        args.interconnect or cfg.offload.devices > 1) else Interconnect(n_gpus=1)
    m, wl = machine(args.machine), workload_for(cfg)
    result, pred = plan_data_parallel(wl, m, ic)
    if pred is None:
        print(f"does not fit {ic.n_gpus} GPU(s) of {m.name}: " + "; ".join(result.problems))
        return 1
    one = search(Workload(wl.model, wl.batch_size // ic.n_gpus, wl.n_micro, wl.clip), m).prediction
    print(f"{cfg.model.name}, batch {wl.batch_size} x {wl.model.seq_len} on {ic.n_gpus} GPU(s) of {m.name} "
          f"({ic.name}); the plan of each GPU:\n{result.plan.table()}\n{describe(pred, one)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
