"""The plan: per block, where each tensor class lives, where its update runs, what happens to its activations.

Pure data (no jax): printable, saved as JSON, produced by hand, by `uniform_plan`, or by the planner. The
engine only executes a plan; it never decides.
"""
from __future__ import annotations

import dataclasses
import enum
import json
from pathlib import Path
from typing import Any


class Tier(str, enum.Enum):
    HBM = "hbm"
    HOST = "host"  # pinned host memory
    DISK = "disk"  # NVMe through TensorStore


class UpdateOn(str, enum.Enum):
    CPU = "cpu"
    GPU = "gpu"


class DiskIOOrder(str, enum.Enum):
    """When the disk read of a unit's optimizer state is issued (units with state on disk only)."""

    REORDERED = "reordered"  # ahead of its update (engine/disk_reads.py): reads leave the host worker's path
    NAIVE = "naive"  # as its update starts, behind the previous unit's write: the paper's naive order (ablation)


@dataclasses.dataclass(frozen=True)
class ActivationPolicy:
    """What a block keeps for its backward.

    save=None keeps every residual the backward needs (no recompute); save=() keeps only the block input and
    recomputes the block; save=(names...) keeps those named intermediates and recomputes the rest. swap moves
    the kept residuals to pinned host memory after the forward and fetches them back ahead of the backward;
    swap_input does the same for the block input (the minimum checkpoint). chunks > 1 runs the block over
    that many slices of the batch, summing the weight gradient in fp32 on the GPU: the backward's working
    memory shrinks by that factor while the weights still cross PCIe once per pass, so a large batch fits a
    small GPU without host-side gradient accumulation (which would cost 4 bytes of RAM per parameter).
    """

    save: tuple[str, ...] | None = ()
    swap: bool = False
    swap_input: bool = False
    chunks: int = 1  # >1 (recompute only): forward and backward over batch slices, weight grad summed in fp32

    def __post_init__(self):
        if self.chunks < 1:
            raise ValueError(f"activation policy: chunks={self.chunks} must be >= 1")
        if self.chunks > 1 and self.save != ():
            raise ValueError("activation policy: chunks > 1 needs the recompute policy (save nothing)")

    @classmethod
    def parse(cls, text: str) -> ActivationPolicy:
        """'keep', 'recompute', 'save:qkv,mlp_up', optionally '+swap', '+swap_input', '+chunks=N'."""
        head, *flags = text.split("+")
        chunks = 1
        for flag in [f for f in flags if f.startswith("chunks=")]:
            try:
                chunks = int(flag[len("chunks="):])
            except ValueError:
                raise ValueError(f"activation policy {text!r}: {flag!r} needs an integer, e.g. chunks=4") from None
            flags.remove(flag)
        unknown = set(flags) - {"swap", "swap_input"}
        if unknown:
            raise ValueError(f"activation policy {text!r}: unknown flag(s) {sorted(unknown)}; "
                             "use +swap, +swap_input, +chunks=N")
        if head == "keep":
            save = None
        elif head == "recompute":
            save = ()
        elif head.startswith("save:"):
            save = tuple(n for n in head[5:].split(",") if n)
        else:
            raise ValueError(f"activation policy {text!r} must start with keep, recompute or save:name1,name2")
        return cls(save=save, swap="swap" in flags, swap_input="swap_input" in flags, chunks=chunks)

    def describe(self) -> str:
        head = "keep" if self.save is None else "recompute" if not self.save else "save:" + ",".join(self.save)
        return (head + ("+swap" if self.swap else "") + ("+swap_input" if self.swap_input else "")
                + (f"+chunks={self.chunks}" if self.chunks > 1 else ""))


@dataclasses.dataclass(frozen=True)
class UnitPlan:
    """Placement of one unit (the embedding, a block or the head)."""

    weights: Tier = Tier.HOST  # bf16 compute weights between uses: HOST (streamed each use) or HBM (resident)
    optim_state: Tier = Tier.HOST  # fp32 master + Adam moments
    update_on: UpdateOn = UpdateOn.CPU
    activations: ActivationPolicy = ActivationPolicy()

    def __post_init__(self):
        object.__setattr__(self, "weights", Tier(self.weights))
        object.__setattr__(self, "optim_state", Tier(self.optim_state))
        object.__setattr__(self, "update_on", UpdateOn(self.update_on))
        if self.weights is Tier.DISK and self.optim_state is not Tier.DISK:
            raise ValueError("a unit with weights on disk keeps its optimizer state there too (optim_state=disk)")
        if (self.update_on is UpdateOn.GPU) != (self.optim_state is Tier.HBM):
            raise ValueError(f"update_on={self.update_on.value} with optim_state={self.optim_state.value}: the GPU "
                             "updates exactly the units whose optimizer state is in HBM")
        if self.update_on is UpdateOn.GPU and self.weights is not Tier.HBM:
            raise ValueError("a unit updated on the GPU keeps its weights in HBM (weights=hbm)")


@dataclasses.dataclass(frozen=True)
class Plan:
    """Per-unit placement plus pipeline settings. units = (embed, block 0 .. block L-1, head)."""

    embed: UnitPlan
    blocks: tuple[UnitPlan, ...]
    head: UnitPlan
    prefetch_depth: int = 2  # weight/activation transfers issued this many blocks ahead
    keep_turn_blocks: int = 1  # last blocks whose forward weights stay on the GPU for the backward
    predicted_step_s: float | None = None
    notes: tuple[str, ...] = ()
    predicted_tokens_per_s: float | None = None  # the planner's prediction for the batch it planned
    predicted_bottleneck: str | None = None  # the resource that bounds the predicted step (planner)
    disk_io_order: DiskIOOrder = DiskIOOrder.REORDERED  # disk state reads issued ahead, or only as updates start

    def __post_init__(self):
        try:
            object.__setattr__(self, "disk_io_order", DiskIOOrder(self.disk_io_order))
        except ValueError:
            raise ValueError(f"disk_io_order={self.disk_io_order!r} must be one of "
                             f"{[o.value for o in DiskIOOrder]}") from None
        if self.prefetch_depth < 1:
            raise ValueError(f"prefetch_depth={self.prefetch_depth} must be >= 1")
        if not 0 <= self.keep_turn_blocks <= len(self.blocks):
            raise ValueError(f"keep_turn_blocks={self.keep_turn_blocks} must be in [0, n_layers={len(self.blocks)}]")

    @property
    def units(self) -> tuple[UnitPlan, ...]:
        return (self.embed, *self.blocks, self.head)

    @property
    def engine_executable(self) -> bool:
        """False when a unit's weights are on disk: the planner models that tier (the paper's testbed), the
        engine does not execute it yet (optimizer state on disk it does)."""
        return not any(u.weights is Tier.DISK for u in self.units)

    def check_executable(self) -> None:
        """Raise if this engine cannot run the plan (call before allocating anything)."""
        if not self.engine_executable:
            n = sum(u.weights is Tier.DISK for u in self.units)
            raise ValueError(f"the plan keeps the weights of {n} unit(s) on disk, which this engine does not "
                             "execute yet; plan with more RAM or with the weights tier limited to host/hbm")

    def to_json(self) -> str:
        return json.dumps(_to_jsonable(self), indent=1)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json())

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Plan:
        def unit(u):
            a = u.get("activations", {})
            act = ActivationPolicy(save=None if a.get("save") is None else tuple(a["save"]),
                                   swap=a.get("swap", False), swap_input=a.get("swap_input", False),
                                   chunks=a.get("chunks", 1))
            return UnitPlan(weights=u["weights"], optim_state=u["optim_state"], update_on=u["update_on"],
                            activations=act)
        return cls(embed=unit(d["embed"]), blocks=tuple(unit(b) for b in d["blocks"]), head=unit(d["head"]),
                   prefetch_depth=d.get("prefetch_depth", 2), keep_turn_blocks=d.get("keep_turn_blocks", 1),
                   predicted_step_s=d.get("predicted_step_s"), notes=tuple(d.get("notes", ())),
                   predicted_tokens_per_s=d.get("predicted_tokens_per_s"),
                   predicted_bottleneck=d.get("predicted_bottleneck"),
                   disk_io_order=d.get("disk_io_order", DiskIOOrder.REORDERED.value))

    @classmethod
    def load(cls, path: str | Path, executable_only: bool = True) -> Plan:
        """A saved plan; by default only one this engine can run (see check_executable)."""
        plan = cls.from_dict(json.loads(Path(path).read_text()))
        if executable_only:
            plan.check_executable()
        return plan

    def table(self) -> str:
        """A compact per-unit table."""
        rows = [f"{'unit':<8} {'weights':<7} {'state':<6} {'update':<6} activations"]
        names = ["embed", *(f"block{i}" for i in range(len(self.blocks))), "head"]
        for name, u in zip(names, self.units):
            act = u.activations.describe() if name.startswith("block") else "-"
            rows.append(f"{name:<8} {u.weights.value:<7} {u.optim_state.value:<6} {u.update_on.value:<6} {act}")
        return "\n".join(rows)


def _to_jsonable(x: Any) -> Any:
    if dataclasses.is_dataclass(x):
        return {f.name: _to_jsonable(getattr(x, f.name)) for f in dataclasses.fields(x)}
    if isinstance(x, enum.Enum):
        return x.value
    if isinstance(x, tuple):
        return [_to_jsonable(v) for v in x]
    return x


def uniform_plan(n_layers: int, *, weights: str = "host", optim_state: str = "host", activations: str = "recompute",
                 edges_on_gpu: bool = True, prefetch_depth: int = 2, keep_turn_blocks: int = 1,
                 disk_io_order: str = "reordered") -> Plan:
    """Every block placed alike; the embedding and head (small, used at both ends of the step) on the GPU."""
    state = Tier(optim_state)
    block = UnitPlan(weights=Tier.HBM if state is Tier.HBM else Tier(weights), optim_state=state,
                     update_on=UpdateOn.GPU if state is Tier.HBM else UpdateOn.CPU,
                     activations=ActivationPolicy.parse(activations))
    edge = UnitPlan(Tier.HBM, Tier.HBM, UpdateOn.GPU) if edges_on_gpu else UnitPlan(
        Tier.HOST if block.weights is Tier.HOST else Tier.HBM, state, block.update_on)
    return Plan(embed=edge, blocks=(block,) * n_layers, head=edge, prefetch_depth=prefetch_depth,
                keep_turn_blocks=min(keep_turn_blocks, n_layers), disk_io_order=disk_io_order)


def expected_traffic(plan: Plan, *, weight_nbytes: list[int], residual_nbytes: list[int], ckpt_nbytes: int,
                     n_micro: int, tied: bool) -> dict[str, int]:
    """PCIe bytes of one steady-state step under `plan` (units in forward order; gradients are as large as the
    compute weights). The engine's counters must equal this: the planner's traffic model and the executor
    agree by test."""
    L = len(plan.blocks)
    h2d = d2h = 0
    units = plan.units
    for _ in range(n_micro):
        for k, (u, w) in enumerate(zip(units, weight_nbytes)):
            if u.weights is not Tier.HBM:  # streamed from host (or, planner-only, from disk through host)
                if k == 0:
                    uses = 2 + int(tied)  # forward, tied head, backward
                elif k == L + 1:
                    uses = 1  # head forward and backward are one program
                else:
                    uses = 1 if k - 1 >= L - plan.keep_turn_blocks else 2
                h2d += uses * w
            if u.update_on is UpdateOn.CPU:
                d2h += w  # the gradient
        for b, r in zip(plan.blocks, residual_nbytes):
            if b.activations.swap_input:
                h2d, d2h = h2d + ckpt_nbytes, d2h + ckpt_nbytes
            if b.activations.swap:
                h2d, d2h = h2d + r, d2h + r
    for u, w in zip(units, weight_nbytes):
        if u.weights is Tier.HBM and u.update_on is UpdateOn.CPU:
            h2d += w  # updated weights uploaded once to their resident copy
    return {"h2d_bytes": h2d, "d2h_bytes": d2h}
