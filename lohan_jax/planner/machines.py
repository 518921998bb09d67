"""Hand-described machines: our H100 box (measured, shared/MACHINE.md and experiments/results/) and the
paper's RTX 4090 testbed (PAPER.md) at 768, 256 and 128 GB of RAM. configs/machines/*.yaml hold the same
descriptions (a test keeps them equal); `machine(name_or_path)` resolves either.
"""
from __future__ import annotations

from pathlib import Path

from lohan_jax.planner.profile import MachineProfile, load_profile

H100_80G = MachineProfile(
    name="h100-80g",
    description="1x H100 80GB HBM3 (SXM), 16 Xeon cores, 125 GiB RAM, 64 GB virtio disk (the project's GPU box)",
    gpu="NVIDIA H100 80GB HBM3",
    hbm_gib=75.6,  # XLA's pool at XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 of 79.6 GiB (experiments/bench_step.py)
    # paper-6b block, 8x1024 tokens, recompute: 20.64 ms for (3 forwards + recompute) = 12.66 TFLOP
    gpu_block_tflops=613.0,  # (MACHINE.md also measured a bf16 8192^3 matmul at 613)
    gpu_head_tflops=176.0,  # paper-6b head + loss, 8x1024: 57.4 ms for 6*d*V*tokens = 10.1 TFLOP
    gpu_adam_gparams_per_s=41.0,  # timeline: GPU AdamW of the 210 M-parameter embedding in 5.1 ms
    hbm_gbps=2500.0,  # ~75% of the 3.35 TB/s datasheet figure
    h2d_gbps=52.0, d2h_gbps=52.0, duplex_gbps=76.0,  # pinned_host <-> HBM, MACHINE.md
    host_adam_gparams_per_s=4.09,  # fused numba AdamW, 16 threads (experiments/results/host_adam.jsonl)
    cpu_cores=16,
    ram_gib=120.0,  # 125 GiB total, ~120 usable (MACHINE.md)
    # bounds the plan's pinned need at 90% of RAM; `lohan-jax train` then caps XLA's pool at that need + 10% + 2 GB
    # (lohan_jax.pinned_pool), and the RAM budget counts the pool at that cap (plan_memory.pinned_pool_limit_gib)
    pinned_limit_gib=112.0,
    disk_gib=60.0, disk_read_gbps=1.3, disk_write_gbps=1.6,  # TensorStore zarr3 1.3/1.75, direct I/O 1.6/1.6
    dispatch_ms=0.1,
    source="measured on the H100 machine, 2026-11-23..25 (MACHINE.md, experiments/results/)",
)


def _paper_4090(ram_gib: int) -> MachineProfile:
    return MachineProfile(
        name=f"paper-4090-{ram_gib}g",
        description=(f"the paper's testbed: RTX 4090 24 GB, PCIe 4.0 x16, 2x Xeon Gold 5320, {ram_gib} GB DDR4 "
                     "(smaller RAM emulated in the paper), 12 NVMe SSDs in RAID-0"),
        gpu="NVIDIA GeForce RTX 4090",
        hbm_gib=22.5,  # 23.6 GiB on the card, less the CUDA context and cuDNN/cuBLAS workspaces
        gpu_block_tflops=160.0,  # the paper's block-only peak, in its convention (all 4 passes, full recompute)
        gpu_head_tflops=46.0,  # not in the paper (its artifact is headless); our H100's head/block ratio 0.29
        gpu_adam_gparams_per_s=12.0,  # 1008 GB/s / 28 B/param at the 34% efficiency our H100 shows
        hbm_gbps=800.0,  # ~80% of 1008 GB/s
        h2d_gbps=21.0, d2h_gbps=21.0, duplex_gbps=38.0,  # PCIe 4.0 x16: ~21 GB/s one way (PAPER.md)
        # Our fused AdamW kernel, memory-bound: the Xeon Gold 5320 (Ice Lake-SP) runs its 8 channels per socket
        # at DDR4-2933 at most (Intel ARK), so 2 x 8 x 23.5 GB/s = 375 GB/s peak; AdamW streams 28 B/param (fp32
        # master, m, v read and written, bf16 grad in and weight out); at ~70% of peak (a STREAM-like figure)
        # -> 9.4 G params/s. (The paper's artifact runs DeepSpeed's CPU Adam, slower on this box:
        # experiments/planner_testbed.py models it for the paper's system.)
        host_adam_gparams_per_s=9.4,
        cpu_cores=52,
        ram_gib=float(ram_gib),
        pinned_limit_gib=0.9 * ram_gib,
        # 12 SSDs in RAID-0, ~32 GB/s read+write in total: simplex (reads and writes share the time).
        # Capacity is not in the paper; 12 x 3.84 TB is assumed (only models past ~2.5T parameters care).
        disk_gib=41_900.0, disk_read_gbps=32.0, disk_write_gbps=32.0,
        dispatch_ms=0.1,
        source="described from PAPER.md (Fuyou/LoHan/Ratel testbed) and vendor datasheets",
    )


PAPER_4090_768G = _paper_4090(768)
PAPER_4090_256G = _paper_4090(256)
PAPER_4090_128G = _paper_4090(128)

BUILTIN: dict[str, MachineProfile] = {m.name: m for m in (H100_80G, PAPER_4090_768G, PAPER_4090_256G, PAPER_4090_128G)}


def machine(name_or_path: str) -> MachineProfile:
    """A built-in machine by name, or a machine YAML/JSON file (hand-written or saved by `lohan-jax profile`)."""
    if name_or_path in BUILTIN:
        return BUILTIN[name_or_path]
    path = Path(name_or_path)
    if not path.exists():
        raise FileNotFoundError(f"machine {name_or_path!r}: neither a built-in ({', '.join(BUILTIN)}) nor a file")
    m, _ = load_profile(path)
    if m is None:
        raise ValueError(f"{name_or_path!r} holds no machine profile")
    return m
