"""The holistic search: per block, where weights and optimizer state live, where the update runs, which
intermediates are kept, swapped or recomputed; chunks, prefetch depth and the edges, under every budget.

Greedy by benefit per HBM byte on the step-time model, the paper's activation search as one of its moves:
start from the plan that needs the least memory (state on the host, weights streamed, every block
recomputed from a swapped input), then repeatedly apply the move with the largest predicted time saved per
HBM byte spent, among the moves that fit every budget: GPU-resident state for the next group of blocks,
resident weights, un-swapped inputs, the next intermediate in the paper's benefit order (OB = recompute
FLOPs / bytes) kept in HBM or swapped to host, edges on the GPU, disk-tier units back to RAM. A move's
predicted saving is re-checked before it is taken (lazy greedy); it stops when no move saves time. Groups of
blocks first, then single blocks to fill what is left. Deterministic; no jax.
"""
from __future__ import annotations

import dataclasses
import heapq
import math
import time

from lohan_jax.plan import ActivationPolicy, Plan, Tier, UnitPlan, UpdateOn
from lohan_jax.planner.capacity import Budgets, Margins, budgets, memory, overflow
from lohan_jax.planner.cost import Prediction, predict
from lohan_jax.planner.profile import GIB, MachineProfile
from lohan_jax.planner.workload import Workload

GPU, HOST, DISK = "gpu", "host", "disk"


@dataclasses.dataclass(frozen=True)
class Block:
    """One block's choices: state tier (gpu/host/disk), weights resident (host state) or on disk (disk
    state), how many ranked intermediates it saves (levels beyond them = keep), kept ones swapped, input
    swapped."""

    state: str = HOST
    w_hbm: bool = False
    w_disk: bool = False
    level: int = 0
    swap: bool = False
    swap_input: bool = True


@dataclasses.dataclass(frozen=True)
class Genome:
    blocks: tuple[Block, ...]
    edges: str = HOST  # host (CPU update, streamed) | hbm (CPU update, resident weights) | gpu
    chunks: int = 1
    depth: int = 2
    keep_turn: int = 1


@dataclasses.dataclass(frozen=True)
class SearchOptions:
    allow_disk: bool | None = None  # None: use the machine's disk tier only when nothing fits without it
    force_state: str | None = None  # "disk": every block's optimizer state on disk (the paper's placement)
    force_weights: str | None = None  # "disk": every block's bf16 weights on disk too (the paper's system)
    margins: Margins = Margins()
    group_blocks: int = 0  # blocks per move in the first phase; 0: about L/16

    def __post_init__(self):
        for f in ("force_state", "force_weights"):
            if getattr(self, f) not in (None, DISK):
                raise ValueError(f"SearchOptions.{f}={getattr(self, f)!r}: None or {DISK!r}")
        if self.force_weights == DISK and self.force_state != DISK:
            raise ValueError("SearchOptions.force_weights='disk' needs force_state='disk' (weights on disk are "
                             "updated where their state is read)")


@dataclasses.dataclass(frozen=True)
class PlanResult:
    plan: Plan | None
    prediction: Prediction | None
    workload: Workload
    machine: MachineProfile
    budgets: Budgets
    problems: tuple[str, ...] = ()  # why nothing fits (plan is None)
    evaluations: int = 0
    search_s: float = 0.0

    @property
    def executable(self) -> bool:
        return self.plan is not None and self.plan.engine_executable


class _Space:
    """Genome -> plan, fit and predicted time, memoised."""

    def __init__(self, wl: Workload, machine: MachineProfile, opts: SearchOptions):
        self.wl, self.machine, self.opts = wl, machine, opts
        self.ranked = tuple(c.name for c in wl.model.ranked_candidates())
        self.budgets = budgets(machine, opts.margins)
        self.cache: dict[Genome, Prediction | None] = {}
        self._mem: dict = {}
        self.evaluations = 0

    @property
    def max_level(self) -> int:
        return len(self.ranked) + 1  # the last level is `keep`

    def policy(self, b: Block, chunks: int) -> ActivationPolicy:
        if chunks > 1 or b.level == 0:
            return ActivationPolicy(save=(), swap=False, swap_input=b.swap_input, chunks=chunks)
        save = None if b.level > len(self.ranked) else self.ranked[:b.level]
        return ActivationPolicy(save=save, swap=b.swap, swap_input=b.swap_input)

    def plan(self, g: Genome) -> Plan:
        def unit(state: str, w_hbm: bool, w_disk: bool, act: ActivationPolicy) -> UnitPlan:
            if state == GPU:
                return UnitPlan(Tier.HBM, Tier.HBM, UpdateOn.GPU, act)
            if state == DISK:
                return UnitPlan(Tier.DISK if w_disk else Tier.HOST, Tier.DISK, UpdateOn.CPU, act)
            return UnitPlan(Tier.HBM if w_hbm else Tier.HOST, Tier.HOST, UpdateOn.CPU, act)

        blocks = tuple(unit(b.state, b.w_hbm, b.w_disk, self.policy(b, g.chunks)) for b in g.blocks)
        edge = unit(GPU if g.edges == GPU else HOST, g.edges == "hbm", False, ActivationPolicy())
        return Plan(embed=edge, blocks=blocks, head=edge, prefetch_depth=g.depth,
                    keep_turn_blocks=min(g.keep_turn, len(blocks)))

    def memory(self, g: Genome):
        if g not in self._mem:
            self._mem[g] = memory(self.plan(g), self.wl)
        return self._mem[g]

    def over(self, g: Genome) -> dict[str, int]:
        return overflow(self.memory(g), self.budgets)

    def hbm(self, g: Genome) -> int:
        return self.memory(g).hbm_bytes

    def prediction(self, g: Genome) -> Prediction | None:
        """Two replayed steps (the search's fast estimate); None if it does not fit."""
        if g not in self.cache:
            if self.over(g):
                self.cache[g] = None
            else:
                self.evaluations += 1
                self.cache[g] = predict(self.plan(g), self.wl, self.machine, steps=2)
        return self.cache[g]

    def time(self, g: Genome) -> float | None:
        p = self.prediction(g)
        return None if p is None else p.step_s

    def host_load(self, g: Genome) -> float:
        """Seconds per step of the host-side resources (PCIe both ways, CPU updates, disk): the work the model
        predicts least well, since it shares the host's memory bandwidth (6B b16 on the H200 ran 11% over)."""
        busy = self.prediction(g).busy_s
        return sum(busy.get(r, 0.0) for r in ("h2d", "d2h", "cpu", "disk"))


# ---- moves -----------------------------------------------------------------------------------------------
def _to_gpu_state(b: Block) -> Block:
    return dataclasses.replace(b, state=GPU, w_hbm=True, w_disk=False)


def _resident_weights(b: Block) -> Block:
    return dataclasses.replace(b, w_hbm=True)


def _keep_input(b: Block) -> Block:
    return dataclasses.replace(b, swap_input=False)


def _apply(g: Genome, order, ok, change, n: int) -> Genome | None:
    blocks, done = list(g.blocks), 0
    for i in order:
        if done == n:
            break
        if ok(blocks[i]):
            blocks[i] = change(blocks[i])
            done += 1
    return dataclasses.replace(g, blocks=tuple(blocks)) if done else None


def _moves(space: _Space, g: Genome, n: int) -> list[tuple[str, Genome]]:
    L = len(g.blocks)
    fwd, rev = range(L), range(L - 1, -1, -1)
    top = space.max_level
    rp = dataclasses.replace
    free_state = space.opts.force_state != DISK  # forced: every block's state stays on disk (none on the GPU)
    out = [
        ("gpu state (first blocks)", _apply(g, fwd, lambda b: free_state and b.state != GPU, _to_gpu_state, n)),
        ("gpu state (last blocks)", _apply(g, rev, lambda b: free_state and b.state != GPU, _to_gpu_state, n)),
        ("resident weights", _apply(g, rev, lambda b: b.state == HOST and not b.w_hbm, _resident_weights, n)),
        ("keep block inputs", _apply(g, rev, lambda b: b.swap_input, _keep_input, n)),
        ("state disk -> host", _apply(g, fwd, lambda b: b.state == DISK and free_state,
                                      lambda b: rp(b, state=HOST, w_disk=False), n)),
        ("weights disk -> host", _apply(g, fwd, lambda b: b.w_disk and space.opts.force_weights != DISK,
                                        lambda b: rp(b, w_disk=False), n)),
    ]
    if g.chunks == 1:  # the paper's order: every block's best-OB intermediate before anyone's next one
        by_level = lambda order: sorted(order, key=lambda i: g.blocks[i].level)
        out += [
            ("keep next intermediate in HBM", _apply(g, by_level(rev),
                                                      lambda b: b.level < top and (not b.swap or b.level == 0),
                                                      lambda b: rp(b, level=b.level + 1, swap=False), n)),
            ("swap next intermediate", _apply(g, by_level(fwd), lambda b: b.level < top and (b.swap or b.level == 0),
                                              lambda b: rp(b, level=b.level + 1, swap=True), n)),
        ]
    if g.edges != GPU:
        out.append(("edges on the GPU", dataclasses.replace(g, edges=GPU)))
    if g.edges == HOST:
        out.append(("edges resident", dataclasses.replace(g, edges="hbm")))
    return [(name, h) for name, h in out if h is not None]


def _greedy(space: _Space, g: Genome, n: int) -> Genome:
    """Lazy greedy: take the move with the best (time saved / HBM bytes added). Moves are evaluated in the
    order of their last known score, and one is taken once its fresh score beats every stale one; the loop
    ends when every move has been evaluated fresh on the current genome and none saves time."""
    t = space.time(g)
    stale: dict[str, float] = {}
    while True:
        hbm0 = space.hbm(g)
        heap = [(-stale.get(name, math.inf), idx, False, name, h) for idx, (name, h) in enumerate(_moves(space, g, n))]
        heapq.heapify(heap)
        best = None
        while heap:
            _, idx, fresh, name, h = heapq.heappop(heap)
            if fresh:
                best = h
                break
            th = space.time(h)
            score = -math.inf if th is None or th >= t * (1 - 1e-4) else (t - th) / max(space.hbm(h) - hbm0, 64 << 20)
            stale[name] = score
            if score > -math.inf:
                heapq.heappush(heap, (-score, idx, True, name, h))
        if best is None:
            return g
        g, t = best, space.time(best)


def _start(space: _Space, L: int) -> tuple[Genome | None, list[str]]:
    """The least-memory genome that fits: chunks for the HBM; for the RAM, GPU-resident state while the HBM
    has room, then disk tiers (when allowed)."""
    wl, opts = space.wl, space.opts
    b = wl.micro_batch
    state0 = DISK if opts.force_state == DISK else HOST
    w_disk0 = opts.force_weights == DISK
    problems: list[str] = []
    tiers = [True] if opts.allow_disk is True or opts.force_state == DISK else \
        [False, True] if opts.allow_disk is None else [False]
    for allow_disk in tiers:
        if allow_disk and space.machine.disk_gib <= 0:
            break
        for chunks in [c for c in range(1, b + 1) if b % c == 0]:
            for depth, kt in ((2, 1), (1, 1), (1, 0)):
                g = Genome(tuple(Block(state=state0, w_disk=w_disk0) for _ in range(L)), HOST, chunks, depth, kt)
                over = space.over(g)
                if "hbm" in over:
                    continue
                if over:
                    g = _relieve_ram(space, g, allow_disk)
                    over = space.over(g)
                if not over:
                    return g, []
                problems = [f"{k}: {v / GIB:.1f} GiB over budget" for k, v in sorted(over.items())]
        if not problems:
            problems = ["hbm: even streamed blocks recomputed in the smallest chunks do not fit"]
    return None, problems


def _relieve_ram(space: _Space, g: Genome, allow_disk: bool) -> Genome:
    """Fit the host budgets: the edges, then the fewest first blocks, onto the GPU while the HBM has room;
    then the fewest optimizer states, then weights, onto the disk tier (counts found by bisection)."""
    def ram_ok(h: Genome) -> bool:
        return not set(space.over(h)) & {"ram", "pinned"}

    def hbm_ok(h: Genome) -> bool:
        return "hbm" not in space.over(h)

    def first(h: Genome, k: int, change, ok_block) -> Genome:
        blocks, done = list(h.blocks), 0
        for i, b in enumerate(blocks):
            if done == k:
                break
            if ok_block(b):
                blocks[i], done = change(b), done + 1
        return dataclasses.replace(h, blocks=tuple(blocks))

    def fewest(h: Genome, change, ok_block, valid) -> Genome:
        """h with the fewest blocks changed that fits the RAM; else the most that stays `valid`."""
        n = sum(map(ok_block, h.blocks))
        lo, hi = 0, n
        while lo < hi:  # largest valid count
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if valid(first(h, mid, change, ok_block)) else (lo, mid - 1)
        top = lo
        if not ram_ok(first(h, top, change, ok_block)):
            return first(h, top, change, ok_block)
        lo, hi = 0, top
        while lo < hi:  # fewest that fit the RAM
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if ram_ok(first(h, mid, change, ok_block)) else (mid + 1, hi)
        return first(h, lo, change, ok_block)

    if space.opts.force_state != DISK:
        h = dataclasses.replace(g, edges=GPU)
        if hbm_ok(h):
            g = h
        if not ram_ok(g):
            g = fewest(g, lambda b: Block(GPU, True, False, 0, False, True), lambda b: b.state == HOST, hbm_ok)
    if not allow_disk or ram_ok(g):
        return g
    g = fewest(g, lambda b: dataclasses.replace(b, state=DISK, w_hbm=False), lambda b: b.state == HOST,
               lambda h: True)
    if ram_ok(g):
        return g
    return fewest(g, lambda b: dataclasses.replace(b, w_disk=True), lambda b: b.state == DISK and not b.w_disk,
                  lambda h: True)


SPARE_HBM_SLACK = 0.02  # how much predicted step time the spare-HBM phase may give for less host-side work


def _spend_spare_hbm(space: _Space, g: Genome, n: int, t_max: float) -> Genome:
    """HBM the greedy left unused buys less host-side work: un-swapped intermediates and inputs, resident weights,
    GPU-resident state, the most host seconds saved per HBM byte first, while the predicted step stays within
    SPARE_HBM_SLACK of the greedy's. The greedy stops where the model sees no time to gain, which on a large card
    left 26 of 28 blocks on the host and the PCIe busy with swaps; the host side is where the model errs (shared
    memory bandwidth), so a plan that leans on it less runs closer to its prediction."""
    rev = range(len(g.blocks) - 1, -1, -1)
    free_state = space.opts.force_state != DISK
    while True:
        load0, hbm0 = space.host_load(g), space.hbm(g)
        moves = [_apply(g, rev, lambda b: b.swap and b.level > 0, lambda b: dataclasses.replace(b, swap=False), n),
                 _apply(g, rev, lambda b: b.swap_input, _keep_input, n),
                 _apply(g, rev, lambda b: b.state == HOST and not b.w_hbm, _resident_weights, n),
                 _apply(g, rev, lambda b: free_state and b.state == HOST, _to_gpu_state, n)]
        best, best_score = None, 0.0
        for h in moves:
            th = None if h is None else space.time(h)
            if th is None or th > t_max:
                continue
            score = (load0 - space.host_load(h)) / max(space.hbm(h) - hbm0, 64 << 20)
            if score > best_score:
                best, best_score = h, score
        if best is None:
            return g
        g = best


def _spare_hbm_note(space: _Space, greedy: Genome, spent: Genome) -> tuple[str, ...]:
    """What the spare-HBM phase traded, for the plan's explanation (nothing when it changed nothing)."""
    if spent == greedy:
        return ()
    a, b = space.prediction(greedy), space.prediction(spent)
    pcie = lambda p: (p.traffic["h2d_bytes"] + p.traffic["d2h_bytes"]) / 1e9
    on_gpu = lambda g: sum(x.state == GPU for x in g.blocks)
    return (f"spare HBM ({(space.hbm(spent) - space.hbm(greedy)) / GIB:.1f} GiB) spent on less host-side work: PCIe "
            f"{pcie(a):.1f} -> {pcie(b):.1f} GB/step, host AdamW {a.busy_s.get('cpu', 0):.2f} -> "
            f"{b.busy_s.get('cpu', 0):.2f} s, blocks with GPU state {on_gpu(greedy)} -> {on_gpu(spent)}, predicted "
            f"step {100 * (b.step_s / a.step_s - 1):+.1f}% (allowed {100 * SPARE_HBM_SLACK:.0f}%)",)


def _tune_pipeline(space: _Space, g: Genome) -> Genome:
    best, t = g, space.time(g)
    for depth, kt in ((1, 1), (3, 1), (2, 0), (2, 2), (1, 0), (4, 1)):
        h = dataclasses.replace(g, depth=depth, keep_turn=kt)
        th = space.time(h)
        if th is not None and th < t * (1 - 1e-4):
            best, t = h, th
    return best


def search(wl: Workload, machine: MachineProfile, opts: SearchOptions = SearchOptions()) -> PlanResult:
    """The fastest plan found for `wl` on `machine` within its budgets, or the reasons nothing fits."""
    t0 = time.perf_counter()
    space = _Space(wl, machine, opts)
    L = wl.model.n_layers
    start, problems = _start(space, L)
    if start is None:
        return PlanResult(None, None, wl, machine, space.budgets, tuple(problems), space.evaluations,
                          time.perf_counter() - t0)
    # a few starting points: a shallower pipeline or more chunks free HBM that the greedy may spend better (also
    # from one chunk: a halved block-backward temp is what fits a fragmented pool, 6B b32 at 24 GiB on the H100)
    chunks = [start.chunks] + ([2 * start.chunks] if wl.micro_batch % (2 * start.chunks) == 0 else [])
    pipes = [(d, k) for d, k in ((2, 1), (1, 1), (1, 0)) if (d, k) <= (start.depth, start.keep_turn)]
    candidates = [dataclasses.replace(start, chunks=c, depth=d, keep_turn=k) for c in chunks for d, k in pipes]
    n = opts.group_blocks or max(1, math.ceil(L / 16))
    best, best_t = None, math.inf
    for g in candidates:
        if space.time(g) is None:
            continue
        g = _greedy(space, g, n)
        if n > 1:
            g = _greedy(space, g, 1)
        g = _tune_pipeline(space, g)
        if space.time(g) < best_t:
            best, best_t = g, space.time(g)
    greedy, t_max = best, best_t * (1 + SPARE_HBM_SLACK)
    for group in sorted({n, 1}, reverse=True):
        best = _spend_spare_hbm(space, best, group, t_max)
    plan = space.plan(best)
    pred = predict(plan, wl, machine)
    plan = dataclasses.replace(plan, predicted_step_s=pred.step_s, predicted_tokens_per_s=pred.tokens_per_s,
                               notes=_spare_hbm_note(space, greedy, best))
    return PlanResult(plan, pred, wl, machine, space.budgets, (), space.evaluations, time.perf_counter() - t0)


# ---- what would make it fit ------------------------------------------------------------------------------
def _fit(wl: Workload, machine: MachineProfile, opts: SearchOptions) -> str | None:
    """None if nothing fits; "disk" if only with the disk tier; "" if the engine can run it."""
    space = _Space(wl, machine, opts)
    g, _ = _start(space, wl.model.n_layers)
    return None if g is None else "" if space.plan(g).engine_executable else "disk"


def _smallest(lo: float, hi: float, ok, steps: int = 14) -> float | None:
    """Smallest x in (lo, hi] with ok(x) (monotone), to ~0.1%; None if not even hi."""
    if not ok(hi):
        return None
    for _ in range(steps):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if ok(mid) else (mid, hi)
    return hi


def suggestions(wl: Workload, machine: MachineProfile, opts: SearchOptions = SearchOptions(),
                executable_only: bool = False) -> list[str]:
    """The smallest single changes that make `wl` fit `machine`: more RAM, more HBM, a disk tier, a smaller
    batch, or gradient accumulation, each checked with the search's own budgets. executable_only: fits that
    the engine can run (no disk tier)."""
    opts = dataclasses.replace(opts, allow_disk=False) if executable_only else opts

    def fits(w: Workload, m: MachineProfile) -> str | None:
        return _fit(w, m, opts)

    def tag(how: str | None) -> str:
        return " (with the disk tier)" if how == "disk" else ""

    out = []
    pinned = lambda x: 0.9 * x if machine.pinned_limit_gib else 0.0
    ram = _smallest(machine.ram_gib, max(2 * machine.ram_gib, 64.0) * 64,
                    lambda x: fits(wl, machine.with_(ram_gib=x, pinned_limit_gib=pinned(x))) is not None)
    if ram is not None:
        how = fits(wl, machine.with_(ram_gib=ram, pinned_limit_gib=pinned(ram)))
        out.append(f"more RAM: {ram:.0f} GiB available (have {machine.ram_gib:.0f}; "
                   f"+{ram - machine.ram_gib:.0f}){tag(how)}")
    hbm = _smallest(machine.hbm_gib, 4 * max(machine.hbm_gib, 1.0),
                    lambda x: fits(wl, machine.with_(hbm_gib=x)) is not None)
    if hbm is not None:
        hbm = math.ceil(hbm * 10) / 10  # stated to 0.1 GiB, rounded up so that the amount stated fits
        how = fits(wl, machine.with_(hbm_gib=hbm))
        out.append(f"more GPU memory: {hbm:.1f} GiB (have {machine.hbm_gib:.1f}){tag(how)}")
    if not executable_only and opts.allow_disk is not False and machine.disk_gib <= 0:
        disk_m = machine.with_(disk_gib=1e6, disk_read_gbps=3.0, disk_write_gbps=3.0)
        space = _Space(wl, disk_m, dataclasses.replace(opts, allow_disk=True))
        g, _ = _start(space, wl.model.n_layers)
        if g is not None:
            need = memory(space.plan(g), wl).disk_bytes / GIB / (1 - opts.margins.disk)
            out.append(f"a disk tier of >= {need:.0f} GiB (disk_gib in the machine profile; modelled by the "
                       "planner, not yet executed by the engine)")
    b, n = wl.batch_size, wl.n_micro
    for micro in [k for k in range(n + 1, b + 1) if b % k == 0][:6]:
        how = fits(dataclasses.replace(wl, n_micro=micro), machine)
        if how is not None:
            out.append(f"gradient accumulation: train.micro_batches={micro} (+4 B/param of host RAM){tag(how)}")
            break
    for smaller in range(b - n, 0, -n):
        how = fits(dataclasses.replace(wl, batch_size=smaller), machine)
        if how is not None:
            out.append(f"a smaller batch: train.batch_size={smaller} (asked {b}){tag(how)}")
            break
    return out
