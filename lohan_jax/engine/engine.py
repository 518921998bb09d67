"""OffloadEngine: executes a plan. One step = per micro-batch a streamed forward and backward, block by
block, with each gradient leaving for the host (or updated on the GPU) the moment its backward ends.

The loop reads like the schedule in DESIGN.md: prefetch weights `prefetch_depth` blocks ahead, swap or
keep residuals as planned, hand gradients to the host worker, and never read a block's weights before its
previous update finished.
"""
from __future__ import annotations

import collections
import functools
import logging
import threading
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from lohan_jax.engine import guard
from lohan_jax.engine.host_updates import HostWorker
from lohan_jax.engine.layout import FlatLayout
from lohan_jax.engine.memory import Budgets, check_budgets, estimate_memory, machine_budgets
from lohan_jax.engine.programs import BlockProgram, EdgePrograms, make_accumulate, make_gpu_adamw
from lohan_jax.engine.units import UnitState
from lohan_jax.engine.watcher import CompletionWatcher
from lohan_jax.models import DecoderModel, Params
from lohan_jax.optim import host_adamw
from lohan_jax.plan import DiskIOOrder, Plan, Tier
from lohan_jax.tiers import MemorySpaces
from lohan_jax.engine.disk_reads import DiskReadAhead
from lohan_jax.plan_memory import DISK_GRADS_IN_FLIGHT, DISK_READ_WINDOW, DISK_WRITES_IN_FLIGHT
from lohan_jax.tiers.store import StateStore
from lohan_jax.timeline import Timeline

log = logging.getLogger(__name__)


class OffloadEngine:
    """Holds the model's state across tiers as the plan says and runs optimizer steps.

    Public API (also for user training loops): `step(batch) -> metrics`, `eval_loss(batch)`,
    `master_params()`, `close()`. A batch is `lohan_jax.batches.step_batch`'s dict of [M, b, S] arrays.
    """

    def __init__(self, model: DecoderModel, params32: Params | Callable[[int], Any], plan: Plan, *, optim, total_steps: int,
                 micro_batch_shape: tuple[int, int], n_micro: int = 1, compute_dtype: Any = jnp.bfloat16,
                 timeline: Timeline | None = None, device: jax.Device | None = None,
                 budgets: Budgets | None = None, disk_path: str | None = None, guard_nonfinite: bool = True,
                 disk_io_mode: str = "default", disk_io_concurrency: int = 8):
        from lohan_jax.optim.schedule import make_schedule

        if len(plan.blocks) != model.n_layers:
            raise ValueError(f"the plan has {len(plan.blocks)} blocks but the model has {model.n_layers}")
        plan.check_executable()
        self.model, self.plan, self.optim, self.n_micro = model, plan, optim, n_micro
        self.compute_dtype = compute_dtype
        self.schedule = make_schedule(optim, total_steps)
        self.spaces = self._make_spaces(device)
        self.timeline = timeline if timeline is not None else Timeline(enabled=False)
        self.watcher = CompletionWatcher(self.timeline)
        self.traffic: collections.Counter = collections.Counter()
        self._step = 0  # optimizer steps applied (Adam's count): a skipped non-finite step does not count
        self.guard_nonfinite = guard_nonfinite  # lohan_jax.engine.guard: a NaN/inf step applies no update
        self.defer_updates = False  # hold this step's updates until its gradient norm is known (a torn replay)
        self._unchecked: list = []  # fast-path steps whose gradient norm has not been checked yet
        self._poison = None  # the running step's verdict once it is known to be skipped
        accumulate = n_micro > 1
        L = model.n_layers
        names = ["embed", *(f"block{i}" for i in range(L)), "head"]
        b, s = micro_batch_shape
        layouts = _abstract_layouts(model, s)
        d = model.spec.d_model if model.spec is not None else _hidden_size(model, b, s)
        x_aval = jax.ShapeDtypeStruct((b, s, d), compute_dtype)
        programs: dict[Any, BlockProgram] = {}
        self.block_programs = []
        for layout, bp in zip(layouts[1:-1], plan.blocks):
            key = (layout, bp.activations.save, bp.activations.chunks)
            if key not in programs:
                w_aval = jax.ShapeDtypeStruct((layout.size,), compute_dtype)
                programs[key] = BlockProgram(model, layout, bp.activations, w_aval, x_aval)
            self.block_programs.append(programs[key])
        spec = model.spec
        self.memory = estimate_memory(
            plan, unit_params=[lay.size for lay in layouts], compute_itemsize=jnp.dtype(compute_dtype).itemsize,
            micro_batch=b, seq_len=s, d_model=d, d_ff=spec.ff_dim if spec else 4 * d,
            vocab_size=spec.vocab_size if spec else 0, residual_nbytes=[p.residual_nbytes for p in self.block_programs],
            n_micro=n_micro, hold_grads=optim.clip_norm > 0)
        budgets = budgets if budgets is not None else machine_budgets(self.spaces.device)
        if budgets.pinned_limit_bytes is not None:  # on the GPU: RAM holds XLA's pinned pool at its cap
            self.memory = self.memory.with_pinned_pool(budgets.pinned_limit_bytes)
        check_budgets(self.memory, budgets)
        log.info("memory plan:\n%s", self.memory.describe())
        self.store = None
        disk_params = sum(lay.size for lay, u in zip(layouts, plan.units) if u.optim_state is Tier.DISK)
        if disk_params:
            if not disk_path:
                raise ValueError("the plan keeps optimizer state on disk: set offload.disk_path to a directory "
                                 "on a fast local disk (NVMe)")
            StateStore.check_capacity(disk_path, 12 * disk_params)
            self.store = StateStore(disk_path, io_mode=disk_io_mode, io_concurrency=disk_io_concurrency,
                                    timeline=self.timeline, max_writes_in_flight=DISK_WRITES_IN_FLIGHT)
        self._disk_reads = self._new_disk_reads()
        # gradients of units whose state is on disk wait in pinned memory for the disk; a few at a time
        self._disk_grad_slots = threading.BoundedSemaphore(DISK_GRADS_IN_FLIGHT)
        self.worker = HostWorker(self.timeline)

        if callable(params32):  # unit_params(k) -> tree: never more than one unit's fp32 copy in flight
            unit_params = params32
        else:
            trees = [params32["embed"], *params32["blocks"], params32["head"]]
            unit_params = trees.__getitem__
        self.units = [self._create_unit(k, n, p, _checked(unit_params(k), layouts[k], n), compute_dtype, accumulate)
                      for k, (n, p) in enumerate(zip(names, plan.units))]
        self.embed_u, self.block_us, self.head_u = self.units[0], self.units[1:-1], self.units[-1]
        self.edges = EdgePrograms(model, self.embed_u.layout, self.head_u.layout)
        self._no_tied = jnp.zeros((1,), compute_dtype)
        self._gpu_adamw = {u.layout: make_gpu_adamw(u.layout, optim.b1, optim.b2, optim.eps, optim.weight_decay,
                                                    compute_dtype)
                           for u in self.units if not u.host_updated}
        self._accumulate = make_accumulate()
        self._sq = jax.jit(lambda a: jnp.sum(jnp.square(a.astype(jnp.float32))))
        self.ckpt_nbytes = b * s * d * jnp.dtype(compute_dtype).itemsize

    @classmethod
    def from_config(cls, cfg, model: DecoderModel, params32: Params, compute_dtype: Any,
                    timeline: Timeline | None = None) -> OffloadEngine:
        """The engine for a run config, running lohan_jax.preflight.run_plan's plan (file, auto or uniform)."""
        from lohan_jax.preflight import run_plan

        o, t = cfg.offload, cfg.train
        device = jax.devices()[0]
        plan = run_plan(cfg, device)
        if o.host_threads:
            host_adamw.set_num_threads(o.host_threads)
        return cls(model, params32, plan, optim=cfg.optim, total_steps=t.steps,
                   micro_batch_shape=(t.micro_batch_size, t.seq_len), n_micro=t.micro_batches,
                   compute_dtype=compute_dtype, timeline=timeline, device=device,
                   budgets=machine_budgets(device, o.hbm_budget_gib, o.host_budget_gib), disk_path=o.disk_path or None,
                   guard_nonfinite=t.on_nonfinite.value != "off", disk_io_mode=o.disk_io_mode,
                   disk_io_concurrency=o.disk_io_concurrency, **cls._config_kwargs(cfg))

    # ---- what a subclass (DataParallelEngine) replaces -----------------------------------------------------
    @classmethod
    def _config_kwargs(cls, cfg) -> dict:
        """Constructor arguments of a subclass, from the run config."""
        return {}

    def _make_spaces(self, device: jax.Device | None) -> Any:
        return MemorySpaces(device)

    def _create_unit(self, k: int, name: str, plan: Any, tree32: Any, compute_dtype: Any,
                     accumulate: bool) -> UnitState:
        return UnitState.create(k, name, plan, tree32, self.spaces, compute_dtype, accumulate, self.store)

    # ---- weights -----------------------------------------------------------------------------------------
    def _wait_update(self, u: UnitState) -> None:
        if u.ready is not None:
            u.ready.wait()
            u.ready = None
            self.worker.check()

    def _weights(self, u: UnitState) -> jax.Array:
        """The unit's compute weights on the GPU, after its last update."""
        self._wait_update(u)
        if u.streamed:
            w = self.spaces.to_hbm(u.host_w.array)
            self._count("h2d", "weights", u.host_w.nbytes, w, u.name)
            return w
        if u.stale:  # a host update wrote new weights into the staging buffer: upload once
            u.dev_w = self.spaces.to_hbm(u.host_w.array)
            self._count("h2d", "weights", u.host_w.nbytes, u.dev_w, u.name)
            u.stale = False
        return u.dev_w

    def _count(self, direction: str, what: str, nbytes: int, array: Any, name: str) -> None:
        self.traffic[f"{direction}_bytes"] += nbytes
        self.traffic[f"{direction}_{what}_bytes"] += nbytes
        self.watcher.watch(direction, f"{direction}_{what}:{name}", array, bytes=nbytes)

    # ---- the step ----------------------------------------------------------------------------------------
    def step(self, batch: dict[str, Any]) -> dict[str, Any]:
        """One synchronous optimizer step over the batch's micro-batches. Returns device/lazy scalars."""
        self.worker.check()
        self.traffic.clear()
        clip = self.optim.clip_norm > 0
        # updates wait for the gradient norm when clipping, and with the guard on where they could not be
        # undone otherwise: micro-batch sums, or a torn step being replayed (lohan_jax.engine.guard)
        defer = clip or (self.guard_nonfinite and (self.defer_updates or self.n_micro > 1))
        lr = float(self.schedule(self._step))
        count = self._step + 1
        losses, sq_parts = [], []
        self._poison = None
        for m in range(self.n_micro):
            mb = {k: self.spaces.to_hbm(np.asarray(v[m])) for k, v in batch.items()}
            losses.append(self._forward_backward(mb, m, lr, count, defer, sq_parts))
            if self._poison is not None:
                break
        if self._poison is None and (defer or self.n_micro > 1):
            self._finish_deferred(lr, count, clip, sq_parts, defer)
        check = self._poison
        if check is None:
            self._step += 1
            check = guard.speculative(self, sq_parts) if self.guard_nonfinite and not defer else guard.StepCheck()
            if self.guard_nonfinite and not defer:
                self._unchecked.append(check)
        loss = functools.reduce(jnp.add, losses)
        disk = {}
        if self.store is not None:  # cumulative: the writes of a step land during the next one
            c = self.store.counters
            disk = {"disk/read_gb_total": c.bytes_read / 1e9, "disk/write_gb_total": c.bytes_written / 1e9}
        return {"loss": loss, "grad_norm": _LazyNorm(self, sq_parts), "lr": lr, "nonfinite": check, **disk,
                **{f"traffic/{k[:-6]}_gb": v / 1e9 for k, v in self.traffic.items()}}

    def check_nonfinite(self) -> None:
        """Check the fast-path steps not checked yet; a torn one raises TornStepError (lohan_jax.engine.guard).
        Called before any checkpoint is taken, so a torn state is never saved."""
        pending, self._unchecked = self._unchecked, []
        for check in pending:
            if check.torn:
                from lohan_jax.faults import TornStepError
                raise TornStepError(f"a non-finite gradient in {check.unit} after updates of the same step were "
                                    "applied (the fast path overlaps updates with the backward)", unit=check.unit)

    def _forward_backward(self, mb, m: int, lr: float, count: int, clip: bool, sq_parts: list) -> jax.Array:
        plan, L, depth = self.plan, len(self.block_us), self.plan.prefetch_depth
        tokens = mb["tokens"]
        w_embed = self._weights(self.embed_u)
        x = self.edges.embed_fwd(w_embed, tokens)
        if self.embed_u.streamed:
            del w_embed  # fetched again for the tied head and the embedding backward
        fetched: dict[int, jax.Array] = {}
        turn: dict[int, jax.Array] = {}
        ckpt: list[Any] = [None] * L
        res: list[Any] = [None] * L
        for i in range(L):  # ---- forward
            for j in range(i, min(L, i + depth + 1)):
                if j not in fetched:
                    fetched[j] = self._weights(self.block_us[j])
            w = fetched.pop(i)
            if i >= L - plan.keep_turn_blocks:
                turn[i] = w
            prog, act = self.block_programs[i], self.block_us[i].plan.activations
            y, r = prog.fwd(w, x)
            self.watcher.watch("gpu", f"fwd:{i}", y)
            ckpt[i] = self._swap_out(x, "ckpt", i) if act.swap_input else x
            res[i] = [self._swap_out(a, "residual", i) for a in r] if act.swap and r else r
            x = y
            del w, y, r
        w_head = self._weights(self.head_u)
        w_tied = self._weights(self.embed_u) if self.edges.tied else self._no_tied
        loss, dx, g_head, g_tied, sq_head = self.edges.head_fwd_bwd(w_head, w_tied, x, mb["targets"], mb["weights"])
        self.watcher.watch("gpu", "head", sq_head)
        del x, w_head, w_tied
        if self.guard_nonfinite and not (guard.finite(loss) and guard.finite(sq_head)):  # before any update
            self._poison = guard.skipped(self, "loss" if not guard.finite(loss) else self.head_u.name)
            sq_parts.append(float("nan"))  # the step's gradient norm is unknown: its backward never ran
            return loss
        self._on_grad(self.head_u, g_head, sq_head, m, lr, count, clip, sq_parts)
        if m == self.n_micro - 1:  # optimizer state on disk: reads issued in backward order, ahead of the grads
            for j in range(L - 1, max(-1, L - 2 - depth), -1):
                self._prefetch_state(self.block_us[j])
        back: dict[int, tuple] = {}
        for i in reversed(range(L)):  # ---- backward
            for j in range(i, max(-1, i - depth - 1), -1):
                if j not in back:
                    u, act = self.block_us[j], self.block_us[j].plan.activations
                    w = turn.pop(j) if j in turn else self._weights(u)
                    x_j = self._swap_in(ckpt[j], "ckpt", j) if act.swap_input else ckpt[j]
                    r_j = [self._swap_in(a, "residual", j) for a in res[j]] if act.swap and res[j] else res[j]
                    ckpt[j] = res[j] = None
                    back[j] = (w, x_j, r_j)
            if m == self.n_micro - 1 and i - depth - 1 >= 0:
                self._prefetch_state(self.block_us[i - depth - 1])
            w, x_i, r_i = back.pop(i)
            dx, g, sq = self.block_programs[i].bwd(w, x_i, r_i, dx)
            self.watcher.watch("gpu", f"bwd:{i}", sq)
            del w, x_i, r_i
            self._on_grad(self.block_us[i], g, sq, m, lr, count, clip, sq_parts)
        w_embed = self._weights(self.embed_u)
        if self.edges.tied:
            g_embed, sq_embed = self.edges.embed_bwd(w_embed, tokens, dx, g_tied)
        else:
            g_embed, sq_embed = self.edges.embed_bwd(w_embed, tokens, dx)
        self.watcher.watch("gpu", "embed_bwd", sq_embed)
        self._on_grad(self.embed_u, g_embed, sq_embed, m, lr, count, clip, sq_parts)
        return loss

    def _swap_out(self, a: jax.Array, what: str, i: int) -> jax.Array:
        h = self.spaces.to_host(a)
        self._count("d2h", what, a.nbytes, h, f"block{i}")
        return h

    def _swap_in(self, a: jax.Array, what: str, i: int) -> jax.Array:
        d = self.spaces.to_hbm(a)
        self._count("h2d", what, a.nbytes, d, f"block{i}")
        return d

    # ---- gradients and updates ---------------------------------------------------------------------------
    def _on_grad(self, u: UnitState, g: jax.Array, sq: jax.Array, m: int, lr: float, count: int, clip: bool,
                 sq_parts: list) -> None:
        """Active gradient offloading: the gradient leaves for its update as soon as its backward ends."""
        single, last = self.n_micro == 1, m == self.n_micro - 1
        if single:  # to pinned host memory: held in HBM until the step ends, these 4-byte buffers sit between the
            # backward's large transient ones and split the free pool (H100, 6B batch 16 in a 24 GiB pool: jit_bwd's
            # 4.01 GiB did not fit in 11.1 GiB free, cut into pieces of at most 3.6 GiB by 17 of them)
            sq_parts.append(self.spaces.to_host(sq))
        if not u.host_updated:
            if single and not clip:
                self._gpu_update(u, g, lr, count, 1.0)
            elif single:
                u.held_grad = g
            else:
                u.dev_acc = self._accumulate(jnp.zeros(g.shape, jnp.float32) if m == 0 else u.dev_acc, g)
            return
        slot = single and not clip and u.on_disk
        if slot:  # the disk is far slower than the backward: wait for one of its updates to finish
            self._disk_grad_slots.acquire()
        g_host = self.spaces.to_host(g)
        self._count("d2h", "grad", g.nbytes, g_host, u.name)
        if single and clip:
            u.held_grad = g_host
        elif single:
            self._submit_update(u, g_host, lr, count, 1.0, release_slot=slot)
        else:
            fused_update = last and not clip
            done = self.worker.submit(u.index, f"accumulate:{u.name}", g_host, functools.partial(
                self._host_accumulate, u, m == 0, last, (lr, count) if fused_update else None))
            if fused_update:  # the next forward waits for this one; earlier accumulations need no wait
                u.ready = done
                if u.on_disk:
                    self._disk_reads.submitted(u)

    def _finish_deferred(self, lr: float, count: int, clip: bool, sq_parts: list, defer: bool | None = None) -> None:
        """After the last backward: global norm (accumulated or clipped), then updates in forward order.
        `defer`: the host updates were held for the norm too (clipping, or the non-finite guard)."""
        defer = clip if defer is None else defer
        if self.n_micro > 1:
            for u in self.units:
                if not u.host_updated:
                    sq_parts.append(self._sq(u.dev_acc))
            sq_parts.append(_HostSq(self))
        scale = 1.0
        if clip or (defer and self.guard_nonfinite):
            norm = float(np.sqrt(sum(float(p) for p in sq_parts)))
            if self.guard_nonfinite and not np.isfinite(norm):  # nothing of this step has been applied yet
                self._poison = guard.skipped(self, guard.first_offender(self, sq_parts))
                return
            if clip:
                scale = 1.0 if norm < self.optim.clip_norm else self.optim.clip_norm / norm
        for u in self.units:  # forward order: the next forward's first blocks are updated first
            if not u.host_updated:
                self._gpu_update(u, u.held_grad if self.n_micro == 1 else u.dev_acc, lr, count, scale)
            elif defer:  # (otherwise the last accumulation already ran the update)
                self._submit_update(u, u.held_grad, lr, count, scale)
            u.held_grad = None

    def _gpu_update(self, u: UnitState, g: jax.Array, lr: float, count: int, scale: float) -> None:
        master, mu, nu = u.dev_state
        *state, u.dev_w = self._gpu_adamw[u.layout](master, mu, nu, g, jnp.float32(lr), jnp.float32(count),
                                                     jnp.float32(scale))
        u.dev_state = tuple(state)
        u.dev_acc = None
        self.watcher.watch("gpu", f"update:{u.name}", u.dev_w)

    def _new_disk_reads(self) -> DiskReadAhead | None:
        """Reads of disk-resident state: ahead of the updates, or (naive order) only as each update starts."""
        if self.store is None:
            return None
        return DiskReadAhead(self.store, DISK_READ_WINDOW,
                             read_ahead=self.plan.disk_io_order is DiskIOOrder.REORDERED)

    def _prefetch_state(self, u: UnitState) -> None:
        """Issue the disk read of a unit's state, unless issued or its previous write is still in flight
        (then the update task reads it itself, after the write)."""
        if u.on_disk:
            self._disk_reads.prefetch(u)

    def _submit_update(self, u: UnitState, g_host: Any, lr: float, count: int, scale: float,
                       release_slot: bool = False) -> None:
        deps = None
        if u.on_disk:
            self._disk_reads.submitted(u)
            if self._disk_reads.read_ahead:  # (naive order: the task reads its state itself, as it starts)
                deps = _StateLanded(self._disk_reads, u)
        fn = functools.partial(self._host_update, u, lr, count, scale)
        if release_slot:
            fn = functools.partial(self._releasing, fn, self._disk_grad_slots)
        u.ready = self.worker.submit(u.index, f"update:{u.name}", g_host, fn, deps=deps)

    @staticmethod
    def _releasing(fn: Callable[[Any], None], slots: threading.BoundedSemaphore, g_host: Any) -> None:
        try:
            fn(g_host)
        finally:
            slots.release()

    def _host_update(self, u: UnitState, lr: float, count: int, scale: float, g_host: Any) -> None:
        """Worker thread: fused AdamW from the landed gradient (or the accumulator) into the pinned weights.
        State on disk is read (ahead, normally), updated in the staging array and written back behind."""
        if u.on_disk:
            state = self._disk_reads.take(u).result()
            master, mu, nu = state[0], state[1], state[2]
        else:
            master, mu, nu = u.master, u.mu, u.nu
        self._host_adamw(u, master, mu, nu, g_host, lr, count, scale)
        if u.on_disk:
            u.write = self.store.write(u.name, state)
            self._disk_reads.released()
        if not u.streamed:
            u.stale = True

    def _host_adamw(self, u: UnitState, master, mu, nu, g_host: Any, lr: float, count: int, scale: float) -> None:
        """The fused kernel over the unit's flat state, from the landed gradient (None: the accumulator), writing
        the next compute weights into the unit's pinned buffer. (DataParallelEngine runs it shard by shard.)"""
        grad = u.acc if g_host is None else _as_kernel_array(np.asarray(g_host))
        bf16_out = u.host_w.view.dtype.itemsize == 2
        bounds, decay = u.layout.segments(self.optim.weight_decay)
        host_adamw.adamw_update_(master, mu, nu, grad, u.host_w.view.view(np.uint16) if bf16_out else None,
                                 lr=lr, b1=self.optim.b1, b2=self.optim.b2, eps=self.optim.eps, count=count,
                                 seg_bounds=bounds, seg_decay=decay, grad_scale=scale)
        if not bf16_out:
            np.copyto(u.host_w.view, master)

    def _host_accumulate(self, u: UnitState, first: bool, last: bool, update: tuple | None, g_host: Any) -> None:
        if first:
            u.acc.fill(0.0)
        self._host_add(u, g_host)
        if last:
            u.sq_host = float(np.dot(u.acc.astype(np.float64), u.acc.astype(np.float64)))
            if update is not None:
                self._host_update(u, update[0], update[1], 1.0, None)

    def _host_add(self, u: UnitState, g_host: Any) -> None:
        """u.acc += the landed gradient (DataParallelEngine: shard by shard)."""
        host_adamw.accumulate_(u.acc, _as_kernel_array(np.asarray(g_host)))

    # ---- evaluation and state ----------------------------------------------------------------------------
    def eval_loss(self, batch: dict[str, Any]) -> jax.Array:
        total = None
        for m in range(batch["tokens"].shape[0]):
            mb = {k: self.spaces.to_hbm(np.asarray(v[m])) for k, v in batch.items()}
            x = self.edges.embed_fwd(self._weights(self.embed_u), mb["tokens"])
            for u, prog in zip(self.block_us, self.block_programs):
                x = prog.apply(self._weights(u), x)
            w_tied = self._weights(self.embed_u) if self.edges.tied else self._no_tied
            loss = self.edges.head_loss(self._weights(self.head_u), w_tied, x, mb["targets"], mb["weights"])
            total = loss if total is None else total + loss
        return total

    def master_params(self) -> Params:
        """fp32 master weights as numpy trees, after every pending update (a full copy: prefer
        `unit_master_params` for models near the size of RAM)."""
        trees = [self.unit_master_params(k) for k in range(len(self.units))]
        return {"embed": trees[0], "blocks": trees[1:-1], "head": trees[-1]}

    def unit_master_params(self, k: int) -> Any:
        """fp32 master weights of unit k (forward order) as a numpy tree, after every pending update."""
        self.worker.drain()
        return self.units[k].master_tree(self.store)

    def state_dict(self) -> dict:
        """Everything a resumed run needs: per unit fp32 master and Adam moments, and the step (numpy)."""
        self.worker.drain()
        units = []
        for u in self.units:
            if u.on_disk:
                if u.write is not None:
                    u.write.result()
                master, mu, nu = self.store.read(u.name).result()
            elif u.host_updated:
                master, mu, nu = u.master, u.mu, u.nu
            else:
                master, mu, nu = (np.asarray(a) for a in u.dev_state)
            units.append({"master": master, "mu": mu, "nu": nu})
        return {"units": units, "step": np.asarray([self._step], np.int64)}

    def load_state_dict(self, state: dict) -> None:
        """Restore `state_dict()`'s output; the bf16 compute weights are re-derived from the masters."""
        self.worker.drain()
        for u, s in zip(self.units, state["units"]):
            master, mu, nu = (np.asarray(s[k], np.float32) for k in ("master", "mu", "nu"))
            w = master.astype(np.dtype(self.compute_dtype))
            if u.on_disk:
                u.write = None
                self.store.write(u.name, np.stack([master, mu, nu])).result()
            elif u.host_updated:
                np.copyto(u.master, master), np.copyto(u.mu, mu), np.copyto(u.nu, nu)
            else:
                u.dev_state = tuple(self.spaces.to_hbm(a) for a in (master, mu, nu))
                u.dev_w = self.spaces.to_hbm(w)
            if u.host_w is not None:
                u.host_w.write(w)
                u.stale = not u.streamed
            u.ready = None
        self._disk_reads = self._new_disk_reads()
        self._unchecked.clear()
        self._step = int(np.asarray(state["step"]).reshape(-1)[0])

    def close(self) -> None:
        self.worker.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _as_kernel_array(a: np.ndarray) -> np.ndarray:
    """bf16 gradients go to the kernel as their uint16 bit patterns (numba has no bfloat16)."""
    return a.view(np.uint16) if a.dtype.itemsize == 2 else a


class _StateLanded:
    """A disk unit's update task is landed for the host worker once its state's read is done."""

    def __init__(self, reads: DiskReadAhead, u: UnitState):
        self._reads, self._u = reads, u

    def done(self) -> bool:
        return self._reads.landed(self._u)


class _HostSq:
    """Squared norm of the host-accumulated gradients; read after their tasks ran."""

    def __init__(self, engine: OffloadEngine):
        self.engine = engine

    def __float__(self) -> float:
        self.engine.worker.drain()
        return sum(u.sq_host for u in self.engine.units if u.host_updated)


class _LazyNorm:
    """The step's global gradient norm, computed when read (after the next step is dispatched)."""

    def __init__(self, engine: OffloadEngine, parts: list):
        self.parts = parts

    def __float__(self) -> float:
        return float(np.sqrt(sum(float(p) for p in self.parts)))


def _hidden_size(model: DecoderModel, b: int, s: int) -> int:
    embed = lambda: model.embed(model.init_unit(jax.random.key(0), 0, s), jnp.zeros((b, s), jnp.int32))
    return jax.eval_shape(embed).shape[-1]


def _checked(tree: Any, layout: FlatLayout, name: str) -> Any:
    """The unit's parameters as numpy, after checking they have the model's structure and shapes."""
    tree = jax.tree.map(np.asarray, tree)
    got = FlatLayout.of(tree)
    if got.treedef != layout.treedef or got.shapes != layout.shapes:
        diffs = [f"{a} != {b}" for a, b in zip(got.shapes, layout.shapes) if a != b][:3]
        raise ValueError(f"parameters of {name} do not match the model: "
                         + (f"shapes {'; '.join(diffs)}" if diffs else f"structure {got.treedef} != {layout.treedef}"))
    return tree


def _abstract_layouts(model: DecoderModel, seq_len: int) -> list[FlatLayout]:
    """Flat layouts of every unit from shapes alone (blocks share one module, hence one shape)."""
    shape = lambda k: jax.eval_shape(lambda: model.init_unit(jax.random.key(0), k, seq_len))
    embed, block, head = shape(0), shape(1), shape(model.n_layers + 1)
    block_layout = FlatLayout.of(block)
    return [FlatLayout.of(embed), *([block_layout] * model.n_layers), FlatLayout.of(head)]
