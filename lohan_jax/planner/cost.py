"""The step-time model: the engine's schedule replayed on a described machine, plus the paper's bounds.

`predict` replays what OffloadEngine.step issues, in its order, on five in-order resources: the GPU stream,
the two PCIe directions (duplex), the host optimizer worker and the disk (simplex). The main (dispatching)
thread blocks where the engine blocks: fetching a unit's weights waits for its pending host update, so the
next forward waits on the updates that drain in forward order. The worker picks, like HostWorker, the
lowest unit among the gradients that have landed, else waits on the oldest. Three steps are replayed; the
step time is the period between the heads of the last two (each forward finishes every pending update, so
the pipeline is in its steady state from the second step on).

Disk-tier optimizer state follows engine/disk_reads.py: at most DISK_READ_WINDOW units' state is in RAM, from
the issue of its read until its update ends (then its write goes to the disk queue and the next read may be
issued). With the window of one, a unit's read, its update and its write-back run one after another, unit
after unit: the disk-state updates cost L x (read + update + write) per step, not max(disk, CPU). A read is
issued by the backward ahead of the gradient while the window is free, else when the window frees for the
update the worker runs next (a simplification: the replayed worker waits for that read, the engine's could
run a host-state update meanwhile).

`bounds` is the resource bound behind the paper's model (Ratel IV-D: each phase as a maximum over the GPU,
each PCIe direction and the simplex disk), extended with the host optimizer and GPU-side updates: no
schedule beats its busiest resource, and the gap between it and `predict` is what the engine's ordering
(the waits of the next forward on pending updates, pipeline fill) costs. paper.py has the formula itself.
"""
from __future__ import annotations

import dataclasses
import heapq

from lohan_jax.plan import Plan, Tier, UpdateOn, expected_traffic
from lohan_jax.plan_memory import DISK_READ_WINDOW
from lohan_jax.planner.profile import GB, MachineProfile
from lohan_jax.planner.workload import Workload

RESOURCES = ("gpu", "h2d", "d2h", "cpu", "disk")


@dataclasses.dataclass(frozen=True)
class Prediction:
    step_s: float
    tokens_per_s: float
    tflops_6n: float
    tflops_paper: float
    busy_s: dict  # resource -> busy seconds per step
    traffic: dict  # h2d_bytes, d2h_bytes, disk_read_bytes, disk_write_bytes per step
    bound_s: float  # the paper-style lower bound (max of per-resource work)
    gpu_idle_s: float  # step_s - GPU busy: waits on transfers, the optimizer, the disk

    @property
    def utilization(self) -> dict:
        return {r: b / self.step_s for r, b in self.busy_s.items()}


class _Worker:
    """HostWorker replayed lazily: a decision at time t sees only tasks submitted by t."""

    def __init__(self):
        self.t = 0.0
        self._by_key: dict[int, list] = {}
        self._unlanded: list = []  # (landed, seq, task) of eligible tasks
        self._landed: list = []  # (key, seq, task)
        self._oldest: list = []  # (seq, task)
        self._seq = 0
        self.n_pending = 0
        self.busy = 0.0
        self.on_done = None  # called with (task, end) when a task ends (disk write-back)
        self.on_start = None  # called with (task, earliest start) when picked: the start (a disk read first)

    def submit(self, now: float, key: int, landed: float, dur: float, tag=None) -> list:
        self.advance(now)
        task = [key, self._seq, now, landed, dur, None, tag]  # .. 5: end time
        self._seq += 1
        self.n_pending += 1
        queue = self._by_key.setdefault(key, [])
        queue.append(task)
        if len(queue) == 1:
            self._eligible(task)
        return task

    def _eligible(self, task: list) -> None:
        heapq.heappush(self._unlanded, (task[3], task[1], task))
        heapq.heappush(self._oldest, (task[1], task))

    def _next_decision(self) -> float:
        """When the worker next picks: once free and something is pending (submissions come in time order,
        so the oldest pending task was submitted first)."""
        oldest = self._oldest
        while oldest[0][1][5] is not None:
            heapq.heappop(oldest)
        return max(self.t, oldest[0][1][2])

    def advance(self, until: float) -> None:
        while self.n_pending and self._next_decision() < until:
            self._run_one()

    def wait(self, task: list) -> float:
        while task[5] is None:
            self._run_one()
        return task[5]

    def drain(self) -> None:
        while self.n_pending:
            self._run_one()

    def _run_one(self) -> None:
        td = self._next_decision()
        while self._unlanded and self._unlanded[0][0] <= td:
            _, seq, task = heapq.heappop(self._unlanded)
            if task[5] is None:
                heapq.heappush(self._landed, (task[0], seq, task))
        task = None
        while self._landed:
            task = heapq.heappop(self._landed)[2]
            if task[5] is None:
                break
            task = None
        while task is None:
            task = heapq.heappop(self._oldest)[1]
            if task[5] is not None:
                task = None
        start = max(td, task[3])
        if self.on_start is not None:
            start = self.on_start(task, start)
        task[5] = end = start + task[4]
        self.t = end
        self.busy += task[4]
        self.n_pending -= 1
        queue = self._by_key[task[0]]
        queue.pop(0)
        if queue:
            self._eligible(queue[0])
        if self.on_done is not None:
            self.on_done(task, end)


class _Replay:
    """One replay of `steps` optimizer steps of a plan."""

    def __init__(self, plan: Plan, wl: Workload, m: MachineProfile):
        self.plan, self.wl, self.L = plan, wl, len(plan.blocks)
        units = plan.units
        w = wl.weight_nbytes()
        params = wl.model.unit_params()
        self.h2d_bw, self.d2h_bw = m.h2d_gbps * GB, m.d2h_gbps * GB
        self.rd_bw, self.wr_bw = max(m.disk_read_gbps, 1e-9) * GB, max(m.disk_write_gbps, 1e-9) * GB
        self.dispatch = m.dispatch_ms / 1e3
        self.w = w
        self.fetch = [u.weights is not Tier.HBM for u in units]
        self.disk_w = [u.weights is Tier.DISK for u in units]
        self.disk_s = [u.optim_state is Tier.DISK for u in units]
        self.cpu = [u.update_on is UpdateOn.CPU for u in units]
        adam, acc = m.host_adam_gparams_per_s * 1e9, m.accumulate_gparams_per_s * 1e9
        self.upd = [p / adam if c else p / (m.gpu_adam_gparams_per_s * 1e9) for p, c in zip(params, self.cpu)]
        self.acc = [p / acc if c else p * 10 / (m.hbm_gbps * GB) for p, c in zip(params, self.cpu)]
        self.state_bytes = [12 * p for p in params]
        e_fwd, e_bwd = wl.embed_s(m)
        self.fwd = [e_fwd]
        self.bwd = [e_bwd]
        self.res = [0]
        for b in plan.blocks:
            f, bw = wl.block_times_s(b.activations, m)
            self.fwd.append(f)
            self.bwd.append(bw)
            self.res.append(wl.residual_nbytes(b.activations) if b.activations.swap else 0)
        self.head = wl.head_s(m)
        self.acts = [None, *(b.activations for b in plan.blocks), None]
        self.ckpt = wl.ckpt_nbytes
        self.main = self.gpu_t = self.h2d_t = self.d2h_t = self.disk_t = 0.0
        self.busy = dict.fromkeys(RESOURCES, 0.0)
        self.worker = _Worker()
        self.worker.on_done = self._written_back
        self.worker.on_start = self._read_state
        self.ready: list = [None] * len(units)  # pending host task per unit
        self.stale = [False] * len(units)
        self.held: list = [None] * len(units)
        self.heads: list[float] = []
        self.reads: dict[int, float] = {}  # disk reads of optimizer state issued ahead: unit -> end
        self.written = [0.0] * len(units)  # end of each unit's last disk write-back
        self.slots = [0.0] * DISK_READ_WINDOW  # heap: when each place for a unit's state in RAM is free
        self.holds: set[int] = set()  # units whose update holds a place (released when it ends)
        self.unread = 0  # disk-state updates submitted whose read is not issued yet

    # ---- resources ---------------------------------------------------------------------------------------
    def _gpu(self, dur: float, dep: float = 0.0) -> float:
        start = max(self.gpu_t, self.main, dep)
        self.gpu_t = start + dur
        self.busy["gpu"] += dur
        self.main += self.dispatch
        return self.gpu_t

    def _h2d(self, nbytes: int, dep: float = 0.0) -> float:
        self.nbytes["h2d_bytes"] += nbytes
        dur = nbytes / self.h2d_bw
        start = max(self.h2d_t, self.main, dep)
        self.h2d_t = start + dur
        self.busy["h2d"] += dur
        self.main += self.dispatch
        return self.h2d_t

    def _d2h(self, nbytes: int, dep: float) -> float:
        self.nbytes["d2h_bytes"] += nbytes
        dur = nbytes / self.d2h_bw
        start = max(self.d2h_t, self.main, dep)
        self.d2h_t = start + dur
        self.busy["d2h"] += dur
        return self.d2h_t

    def _disk(self, nbytes: int, write: bool, dep: float, count: bool = True) -> float:
        dur = nbytes / (self.wr_bw if write else self.rd_bw)
        start = max(self.disk_t, dep)
        self.disk_t = start + dur
        if count:  # state reads and write-backs are counted when their update is submitted (they run lazily)
            self.busy["disk"] += dur
        return self.disk_t

    def _read_state(self, task: list, start: float) -> float:
        """The worker picked a disk-state update: its state read (issued ahead, or now that a place in RAM is
        free, after the unit's last write-back) must land before it runs."""
        k = task[6]
        if k is None:
            return start
        if k in self.reads:  # read ahead by the backward: it holds a place already
            self.holds.add(k)
            return max(start, self.reads.pop(k))
        self.unread -= 1
        if self.slots:  # issued when a place freed (or at the gradient's submission, if later)
            self.holds.add(k)
            issue = max(task[2], heapq.heappop(self.slots))
        else:  # every place held by reads ahead: the engine's worker reads it anyway (DiskReadAhead.take)
            issue = start
        return max(start, self._disk(self.state_bytes[k], False, max(issue, self.written[k]), count=False))

    def _written_back(self, task: list, end: float) -> None:
        k = task[6]
        if k is not None:  # state (and weights) of a disk-tier unit go back after its update
            self.written[k] = self._disk(self.state_bytes[k] + (self.w[k] if self.disk_w[k] else 0), True, end,
                                         count=False)
            if k in self.holds:  # its place in RAM is free for the next read
                self.holds.discard(k)
                heapq.heappush(self.slots, end)

    # ---- the engine's operations -------------------------------------------------------------------------
    def _weights(self, k: int) -> float:
        """OffloadEngine._weights: wait for the unit's pending update, then upload if streamed or stale."""
        task = self.ready[k]
        if task is not None:
            self.main = max(self.main, self.worker.wait(task))
            self.ready[k] = None
        if self.fetch[k]:
            dep = self._disk(self.w[k], False, self.main) if self.disk_w[k] else 0.0
            return self._h2d(self.w[k], dep)
        if self.stale[k]:
            self.stale[k] = False
            return self._h2d(self.w[k])
        return 0.0

    def _on_grad(self, k: int, g: float, m: int) -> None:
        single, last = self.wl.n_micro == 1, m == self.wl.n_micro - 1
        clip = self.wl.clip
        if not self.cpu[k]:
            if single and not clip:
                self._gpu(self.upd[k], g)
            elif single:
                self.held[k] = g
            else:
                self._gpu(self.acc[k], g)
            return
        landed = self._d2h(self.w[k], g)
        if single and clip:
            self.held[k] = landed
        elif single:
            self._submit_update(k, landed, self.upd[k])
        else:
            fused = last and not clip
            task = self._submit(k, landed, self.acc[k] + (self.upd[k] if fused else 0.0), fused)
            if fused:
                self.ready[k] = task

    def _prefetch_state(self, k: int) -> None:
        """OffloadEngine._prefetch_state (DiskReadAhead.prefetch): read a disk-tier unit's state ahead of its
        gradient if a place in RAM is free, no submitted update waits for one, and its last write is done."""
        if not self.disk_s[k] or k in self.reads:
            return
        self.worker.advance(self.main)
        if self.unread or not self.slots or self.slots[0] > self.main or self.written[k] > self.main:
            return
        heapq.heappop(self.slots)
        self.reads[k] = self._disk(self.state_bytes[k], False, self.main, count=False)

    def _submit(self, k: int, landed: float, dur: float, update: bool) -> list:
        if update and self.disk_s[k]:  # the worker reads its state first (_read_state), writes it back after
            self.unread += k not in self.reads
            self.busy["disk"] += self.state_bytes[k] / self.rd_bw + \
                (self.state_bytes[k] + (self.w[k] if self.disk_w[k] else 0)) / self.wr_bw
        self.busy["cpu"] += dur
        return self.worker.submit(self.main, k, landed, dur, k if update and self.disk_s[k] else None)

    def _submit_update(self, k: int, landed: float, dur: float) -> None:
        self.ready[k] = self._submit(k, landed, dur, True)
        if not self.fetch[k]:
            self.stale[k] = True

    def _forward_backward(self, m: int) -> None:
        L, depth, kt = self.L, self.plan.prefetch_depth, self.plan.keep_turn_blocks
        w = self._weights(0)
        self._gpu(self.fwd[0], w)
        fetched: dict[int, float] = {}
        ck_host: dict[int, float] = {}
        res_host: dict[int, float] = {}
        turn: dict[int, float] = {}
        x_ready = self.gpu_t
        for i in range(L):
            for j in range(i, min(L, i + depth + 1)):
                if j not in fetched:
                    fetched[j] = self._weights(j + 1)
            w = fetched.pop(i)
            if i >= L - kt:
                turn[i] = w
            y = self._gpu(self.fwd[i + 1], w)
            act = self.acts[i + 1]
            if act.swap_input:
                ck_host[i] = self._d2h(self.ckpt, x_ready)
            if self.res[i + 1]:
                res_host[i] = self._d2h(self.res[i + 1], y)
            x_ready = y
        wh = self._weights(L + 1)
        wt = self._weights(0) if self.wl.model.tied else 0.0
        self.heads.append(self._gpu(self.head, max(wh, wt)))
        self._on_grad(L + 1, self.gpu_t, m)
        last = m == self.wl.n_micro - 1
        if last:  # optimizer state on disk: reads issued in backward order, ahead of the gradients
            for j in range(L - 1, max(-1, L - 2 - depth), -1):
                self._prefetch_state(j + 1)
        back: dict[int, float] = {}
        for i in reversed(range(L)):
            for j in range(i, max(-1, i - depth - 1), -1):
                if j not in back:
                    ready = turn.pop(j) if j in turn else self._weights(j + 1)
                    if j in ck_host:
                        ready = max(ready, self._h2d(self.ckpt, ck_host.pop(j)))
                    if j in res_host:
                        ready = max(ready, self._h2d(self.res[j + 1], res_host.pop(j)))
                    back[j] = ready
            if last and i - depth - 1 >= 0:
                self._prefetch_state(i - depth)
            g = self._gpu(self.bwd[i + 1], back.pop(i))
            self._on_grad(i + 1, g, m)
        w = self._weights(0)
        g = self._gpu(self.bwd[0], w)
        self._on_grad(0, g, m)

    def _finish_deferred(self) -> None:
        """Clipping or accumulation: the global norm, then updates in forward order (OffloadEngine)."""
        if self.wl.clip:  # float(norm) waits for every gradient (and, accumulating, every host task)
            self.main = max(self.main, self.gpu_t, self.d2h_t)
            if self.wl.n_micro > 1:
                self.worker.drain()
                self.main = max(self.main, self.worker.t)
        for k in range(self.L + 2):
            if not self.cpu[k]:
                self._gpu(self.upd[k], 0.0)
            elif self.wl.clip:
                landed = self.held[k] if self.wl.n_micro == 1 else self.main
                self._submit_update(k, landed, self.upd[k])

    def run(self, steps: int) -> list[float]:
        for _ in range(steps):
            self.busy = dict.fromkeys(RESOURCES, 0.0)  # the last step's work is what is reported
            self.nbytes = {"h2d_bytes": 0, "d2h_bytes": 0}
            for m in range(self.wl.n_micro):
                self._forward_backward(m)
            if self.wl.clip or self.wl.n_micro > 1:
                self._finish_deferred()
        self.worker.drain()
        return self.heads


def traffic(plan: Plan, wl: Workload) -> dict[str, int]:
    """Bytes over PCIe (as the engine counts them) and to/from disk in one steady-state step."""
    blocks = plan.blocks
    out = _expected(plan, wl)
    rd = wr = 0
    L = len(blocks)
    for k, (u, w, p) in enumerate(zip(plan.units, wl.weight_nbytes(), wl.model.unit_params())):
        if u.optim_state is Tier.DISK:
            rd, wr = rd + 12 * p, wr + 12 * p
        if u.weights is Tier.DISK:  # read before each upload (as expected_traffic counts uses), written once
            uses = (2 + int(wl.model.tied)) if k == 0 else 1 if k == L + 1 else \
                1 if k - 1 >= L - plan.keep_turn_blocks else 2
            rd, wr = rd + uses * w * wl.n_micro, wr + w
    out.update(disk_read_bytes=rd, disk_write_bytes=wr)
    return out


def _expected(plan: Plan, wl: Workload) -> dict[str, int]:
    return expected_traffic(plan, weight_nbytes=wl.weight_nbytes(),
                            residual_nbytes=[wl.residual_nbytes(b.activations) for b in plan.blocks],
                            ckpt_nbytes=wl.ckpt_nbytes, n_micro=wl.n_micro, tied=wl.model.tied)


def bounds(busy_s: dict, tr: dict, m: MachineProfile) -> float:
    """No schedule is faster than its busiest resource, nor than both PCIe directions at once."""
    duplex = (tr["h2d_bytes"] + tr["d2h_bytes"]) / (m.duplex_gbps * GB)
    return max(max(busy_s.values()), duplex)


def predict(plan: Plan, wl: Workload, m: MachineProfile, steps: int = 3) -> Prediction:
    """Predicted steady-state step of `plan` for workload `wl` on machine `m`."""
    replay = _Replay(plan, wl, m)
    heads = replay.run(steps)  # replay.nbytes: the last step's PCIe bytes (== traffic(); tested)
    step = heads[-1] - heads[-1 - wl.n_micro] if len(heads) > wl.n_micro else heads[-1]
    busy = dict(replay.busy)
    tr = traffic(plan, wl)
    bound = bounds(busy, tr, m)
    step = max(step, bound)  # the replay keeps each direction at full speed; both at once share the duplex cap
    tok = wl.tokens / step
    return Prediction(step_s=step, tokens_per_s=tok, tflops_6n=tok * wl.flops_6n_per_token() / 1e12,
                      tflops_paper=tok * wl.flops_paper_per_token() / 1e12, busy_s=busy, traffic=tr,
                      bound_s=bound, gpu_idle_s=max(0.0, step - busy["gpu"]))
