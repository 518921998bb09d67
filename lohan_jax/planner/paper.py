"""The paper's step-time model (Ratel section IV-D, PAPER.md) and its activation search, as published: used to
compare our predictions with what the paper's own model would say for its placement (state on SSD).

T_iter = T_f + T_b
T_f = max(FLOP_f/THP_G, A/BW_G, 2P/BW_G, 2P/BW_S2M + a*A/BW_M2S)
T_b = max((2*FLOP_f + FLOP_r)/THP_G, 2P/BW_G, (2P + A)/BW_G, (14P + a*A)/BW_S2M + 14P/BW_M2S)
with a*A = max(0, A - MEM_avail) the swapped bytes that spill to SSD; the SSD is simplex (reads and writes
add). A grows by whole candidates in benefit order (OB = recompute FLOPs / bytes) while T_iter falls.
"""
from __future__ import annotations

from lohan_jax.planner.profile import GB, MachineProfile
from lohan_jax.planner.workload import Workload


def paper_terms(wl: Workload, m: MachineProfile, swap_nbytes: float, recompute_flops: float,
                mem_avail_nbytes: float) -> tuple[float, float]:
    """(T_f, T_b) for one step with A = swap_nbytes and FLOP_r = recompute_flops."""
    P = wl.model.param_count
    A = swap_nbytes
    spill = max(0.0, A - mem_avail_nbytes)
    thp = m.gpu_block_tflops * 1e12
    h2d, d2h = m.h2d_gbps * GB, m.d2h_gbps * GB
    rd, wr = m.disk_read_gbps * GB, m.disk_write_gbps * GB
    flop_f = wl.tokens * wl.model.fwd_flops_per_token * wl.model.n_layers
    t_f = max(flop_f / thp, A / d2h, 2 * P / h2d, 2 * P / rd + spill / wr)
    t_b = max((2 * flop_f + recompute_flops) / thp, 2 * P / d2h, (2 * P + A) / h2d,
              (14 * P + spill) / rd + 14 * P / wr)
    return t_f, t_b


def paper_step_s(wl: Workload, m: MachineProfile) -> tuple[float, float]:
    """(T_iter, A) at the swap amount the paper's convex search picks: candidates of every block added in
    benefit order, one block at a time, while T_iter falls."""
    mp = wl.model
    tokens = wl.tokens
    recompute = tokens * mp.n_layers * mp.recompute_flops_per_token
    mem_avail = max(0.0, m.ram_gib * 2**30 - 2 * mp.param_count)  # free RAM beside the cached fp16 weights
    A = 0.0
    best = sum(paper_terms(wl, m, A, recompute, mem_avail))
    for c in mp.ranked_candidates():
        for _ in range(mp.n_layers):
            a2, r2 = A + tokens * c.nbytes_per_token, recompute - tokens * c.recompute_flops_per_token
            t = sum(paper_terms(wl, m, a2, r2, mem_avail))
            if t >= best:
                return best, A
            A, recompute, best = a2, r2, t
    return best, A
