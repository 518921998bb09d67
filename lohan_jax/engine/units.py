"""Per-unit state: where a unit's weights, gradient and optimizer state live, and how it is updated."""
from __future__ import annotations

import dataclasses
import threading
from typing import Any

import jax
import ml_dtypes
import numpy as np

from lohan_jax.engine.layout import FlatLayout
from lohan_jax.plan import Tier, UnitPlan, UpdateOn
from lohan_jax.tiers import HostBuffer, MemorySpaces


@dataclasses.dataclass(eq=False)
class UnitState:
    index: int  # forward order: 0 embedding, 1..L blocks, L+1 head
    name: str
    plan: UnitPlan
    layout: FlatLayout
    host_w: HostBuffer | None = None  # pinned compute weights (host tier) or the upload staging (hbm + CPU update)
    dev_w: jax.Array | None = None  # resident compute weights (hbm tier)
    master: np.ndarray | None = None  # fp32 master and moments on the host (CPU update)
    mu: np.ndarray | None = None
    nu: np.ndarray | None = None
    acc: np.ndarray | None = None  # host fp32 gradient accumulator (micro-batches > 1)
    dev_state: tuple | None = None  # (master, mu, nu) in HBM (GPU update)
    dev_acc: jax.Array | None = None
    ready: threading.Event | None = None  # set when the pending host update has finished
    stale: bool = False  # hbm weights must be re-uploaded from host_w after a host update
    held_grad: Any = None  # gradient waiting for the global norm (clipping)
    write: Any = None  # the pending disk write of this unit's state (disk tier)
    sq_host: float = 0.0  # squared norm of the accumulated host gradient

    @property
    def on_disk(self) -> bool:
        return self.plan.optim_state is Tier.DISK

    @property
    def host_updated(self) -> bool:
        return self.plan.update_on is UpdateOn.CPU

    @property
    def streamed(self) -> bool:
        return self.plan.weights is Tier.HOST

    @classmethod
    def create(cls, index: int, name: str, plan: UnitPlan, tree32: Any, spaces: MemorySpaces, compute_dtype: Any,
               accumulate: bool, store: Any = None) -> UnitState:
        layout = FlatLayout.of(tree32)
        master = layout.flatten_np(tree32, np.float32)
        w = master.astype(ml_dtypes.bfloat16 if np.dtype(compute_dtype) == np.dtype(ml_dtypes.bfloat16)
                          else np.float32)
        u = cls(index, name, plan, layout)
        u.place(master, w, spaces, accumulate, store, HostBuffer)
        return u

    def place(self, master: np.ndarray, w: np.ndarray, spaces: Any, accumulate: bool, store: Any,
              host_buffer: type) -> None:
        """Put the flat fp32 master (moments start at zero) and compute weights `w` where the plan says."""
        zeros = np.zeros_like
        if self.on_disk or self.host_updated:
            if self.on_disk:  # written once at start (one unit in RAM at a time), then read and written per update
                store.write(self.name, np.stack([master, zeros(master), zeros(master)])).result()
            else:
                self.master, self.mu, self.nu = master, zeros(master), zeros(master)
            self.acc = zeros(master) if accumulate else None
            self.host_w = host_buffer(spaces, w)
            if not self.streamed:
                self.dev_w = spaces.to_hbm(self.host_w.array)
        else:
            self.dev_state = tuple(spaces.to_hbm(a) for a in (master, zeros(master), zeros(master)))
            self.dev_w = spaces.to_hbm(w)

    def master_tree(self, store: Any = None) -> Any:
        if self.on_disk:
            if self.write is not None:
                self.write.result()
            flat = store.read(self.name).result()[0]
        else:
            flat = self.master if self.host_updated else np.asarray(self.dev_state[0])
        return self.layout.unflatten(np.array(flat, copy=True))

    @property
    def w_nbytes(self) -> int:
        return (self.host_w.nbytes if self.host_w is not None else self.dev_w.nbytes)
