"""Fused multi-threaded AdamW over flat host buffers: optax.adamw's numerics in one pass over memory.

Numerics. The kernel reproduces what XLA:CPU actually computes for a jitted optax.adamw step (update and
apply_updates under one jit; jax 0.10.2, optax 0.2.8), bit for bit (tests/test_host_adamw.py checks it):
  mu = fma(g, 1-b1, b1*mu)             LLVM contracts the first product of each add into an FMA
  nu = fma(g*g, 1-b2, b2*nu)
  u  = mu / (bc1 * (sqrt(nu / bc2) + eps))   XLA's simplifier rewrites (a/b)/c as a/(b*c)
  p  = fma(-lr, fma(p, wd, u), p)      decayed segments;  p = fma(-lr, u, p) where the mask excludes wd
with 1-b rounded from float64 (optax's Python-float constants), bc = 1 - powf(b, count) in fp32 (XLA calls
libm powf), and denormals flushed to zero (XLA:CPU runs with FTZ/DAZ; it also spares us the x86 denormal
slow path on embedding rows whose moments decay for thousands of steps). The textbook order without FMAs
differs from this by an ulp in mu/nu on ~15% of elements; so does optax with apply_updates in a separate jit
(no FMA for the last add) or an lr from an eager schedule (eager x / 3, jitted x * 0.33333334).
"""

from __future__ import annotations

import platform

import ml_dtypes
import numba
import numpy as np
from llvmlite import ir
from numba import prange, types
from numba.extending import intrinsic, overload

# Elements per parallel work item. 64K elements touch ~1.8 MB (fp32 master, mu, nu read and written, bf16
# grad and out): the per-chunk segment lookup is noise, and 16 threads still get 256 chunks from 16M params.
CHUNK_ELEMS = 1 << 16

# Leave one core to the Python thread that dispatches GPU work while the optimizer thread runs here.
DEFAULT_NUM_THREADS = max(1, numba.config.NUMBA_NUM_THREADS - 1)
_num_threads = DEFAULT_NUM_THREADS

_X86 = platform.machine().lower() in ("x86_64", "amd64")
_MXCSR_FTZ_DAZ = 0x8040
# error_model="numpy": a float division by zero gives inf/NaN as in XLA instead of raising; numba's default
# Python error model puts a zero test before every division, which stops LLVM vectorising the loop. With
# unsigned loop indices (below) this took one core of the 2-core dev box from 0.25 to 1.4 G params/s.
_JIT = dict(parallel=True, fastmath=False, nogil=True, cache=True, error_model="numpy")


def set_num_threads(n: int) -> None:
    """Sets how many numba threads the kernels use (1..NUMBA_NUM_THREADS; default all but one).

    numba's own setting is thread-local, so every call re-applies this value on the calling thread (the
    optimizer thread, not necessarily the one that called this function).
    """
    if not 1 <= int(n) <= numba.config.NUMBA_NUM_THREADS:
        raise ValueError(f"num_threads={n} must be in [1, {numba.config.NUMBA_NUM_THREADS}]")
    global _num_threads
    _num_threads = int(n)


def get_num_threads() -> int:
    """The thread count the kernels use on their next call."""
    return _num_threads


def _widen(x):
    """fp32 value of one gradient element: bf16 bits (uint16) or fp32."""


@overload(_widen, inline="always")
def _widen_impl(x):
    if isinstance(x, types.Integer):  # bf16 bits are the top half of an fp32
        return lambda x: np.uint32(np.uint32(x) << np.uint32(16)).view(np.float32)
    return lambda x: np.float32(x)


@intrinsic
def _fma(typingctx, a, b, c):
    """a * b + c in fp32 with one rounding (llvm.fma: one vfmadd on x86-64)."""
    def codegen(context, builder, signature, args):
        f32 = ir.FloatType()
        fn = builder.module.declare_intrinsic("llvm.fma", [f32], ir.FunctionType(f32, [f32, f32, f32]))
        return builder.call(fn, args)
    return types.float32(types.float32, types.float32, types.float32), codegen


def _call_mxcsr(builder, name, slot):
    ptr_t = ir.IntType(8).as_pointer()
    fn = builder.module.declare_intrinsic(name, (), ir.FunctionType(ir.VoidType(), [ptr_t]))
    builder.call(fn, [builder.bitcast(slot, ptr_t)])


@intrinsic
def _flush_denormals_on(typingctx):
    """Sets FTZ|DAZ on this thread's MXCSR and returns the old value (a no-op off x86)."""
    def codegen(context, builder, signature, args):
        i32 = ir.IntType(32)
        if not _X86:
            return ir.Constant(i32, 0)
        slot = builder.alloca(i32)
        _call_mxcsr(builder, "llvm.x86.sse.stmxcsr", slot)
        old = builder.load(slot)
        builder.store(builder.or_(old, ir.Constant(i32, _MXCSR_FTZ_DAZ)), slot)
        _call_mxcsr(builder, "llvm.x86.sse.ldmxcsr", slot)
        return old
    return types.uint32(), codegen


@intrinsic
def _restore_mxcsr(typingctx, old):
    """Puts back the MXCSR value _flush_denormals_on returned: numba's worker threads are shared."""
    def codegen(context, builder, signature, args):
        if _X86:
            slot = builder.alloca(ir.IntType(32))
            builder.store(args[0], slot)
            _call_mxcsr(builder, "llvm.x86.sse.ldmxcsr", slot)
        return context.get_dummy_value()
    return types.none(types.uint32), codegen


@numba.njit(inline="always", error_model="numpy")
def _round_bf16(x):
    """fp32 -> bf16 bits, round to nearest even; NaN becomes quiet NaN 0x7fc0 with its sign, as ml_dtypes
    and XLA do. Overflow to inf falls out of the same integer add."""
    b = np.float32(x).view(np.uint32)
    if (b & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000):
        return np.uint16(((b >> np.uint32(16)) & np.uint32(0x8000)) | np.uint32(0x7FC0))
    lsb = (b >> np.uint32(16)) & np.uint32(1)
    return np.uint16((b + np.uint32(0x7FFF) + lsb) >> np.uint32(16))


@numba.njit(nogil=True, cache=True, error_model="numpy")
def _adamw_span(lo, hi, master, mu, nu, grad, out, nlr, b1, omb1, b2, omb2, eps, bc1, bc2, gscale, wd):
    """One segment's slice of a chunk. The wd == 0 loop has no decay term at all, as optax's mask does
    (0 * inf would make NaN of an inf weight). Unsigned indices: a signed one makes numba wrap negative
    indices around, which LLVM cannot prove alias-free, so it would not vectorise."""
    if wd != np.float32(0):
        for i in range(np.uint64(lo), np.uint64(hi)):
            g = _widen(grad[i]) * gscale
            m = _fma(g, omb1, mu[i] * b1)
            v = _fma(g * g, omb2, nu[i] * b2)
            p = master[i]
            p = _fma(nlr, _fma(p, wd, m / (bc1 * (np.sqrt(v / bc2) + eps))), p)
            mu[i] = m
            nu[i] = v
            master[i] = p
            if out is not None:
                out[i] = _round_bf16(p)
    else:
        for i in range(np.uint64(lo), np.uint64(hi)):
            g = _widen(grad[i]) * gscale
            m = _fma(g, omb1, mu[i] * b1)
            v = _fma(g * g, omb2, nu[i] * b2)
            p = _fma(nlr, m / (bc1 * (np.sqrt(v / bc2) + eps)), master[i])
            mu[i] = m
            nu[i] = v
            master[i] = p
            if out is not None:
                out[i] = _round_bf16(p)


@numba.njit(**_JIT)
def _adamw_kernel(master, mu, nu, grad, out, nlr, b1, omb1, b2, omb2, eps, bc1, bc2, gscale, seg_bounds,
                  seg_decay):
    n = master.shape[0]
    for c in prange((n + CHUNK_ELEMS - 1) // CHUNK_ELEMS):
        mxcsr = _flush_denormals_on()
        lo = c * CHUNK_ELEMS
        hi = min(lo + CHUNK_ELEMS, n)
        k = np.searchsorted(seg_bounds, lo, side="right") - 1
        while lo < hi:
            end = min(hi, seg_bounds[k + 1])
            _adamw_span(lo, end, master, mu, nu, grad, out, nlr, b1, omb1, b2, omb2, eps, bc1, bc2, gscale,
                        seg_decay[k])
            lo = end
            k += 1
        _restore_mxcsr(mxcsr)


@numba.njit(**_JIT)
def _accumulate_kernel(acc, grad):
    n = acc.shape[0]
    for c in prange((n + CHUNK_ELEMS - 1) // CHUNK_ELEMS):
        mxcsr = _flush_denormals_on()
        for i in range(np.uint64(c * CHUNK_ELEMS), np.uint64(min((c + 1) * CHUNK_ELEMS, n))):
            acc[i] += _widen(grad[i])
        _restore_mxcsr(mxcsr)


@numba.njit(cache=True, error_model="numpy")
def _pow_f32(decay, count):
    return decay ** count  # fp32 llvm.pow -> libm powf, the call XLA:CPU makes for optax's decay**count


def bias_correction_f32(decay: float, count: int) -> np.float32:
    """1 - decay**count as optax computes it under jit: fp32 decay, fp32 count, libm powf. A correctly
    rounded power differs from powf by an ulp at ~1.6% of counts for decay 0.999."""
    return np.float32(1) - np.float32(_pow_f32(np.float32(decay), np.float32(count)))


def make_segments(sizes, decays) -> tuple[np.ndarray, np.ndarray]:
    """(seg_bounds int64[nseg+1], seg_decay float32[nseg]) for tensors of `sizes` laid out back to back."""
    bounds = np.zeros(len(sizes) + 1, np.int64)
    np.cumsum(np.asarray(sizes, np.int64), out=bounds[1:])
    return bounds, np.asarray(decays, np.float32).reshape(len(sizes))


def _kernel_view(a, name: str, n: int, dtypes: tuple) -> np.ndarray:
    """a as the 1-D C-contiguous length-n array the kernels take; bfloat16 becomes its uint16 view."""
    if not isinstance(a, np.ndarray):
        raise TypeError(f"{name} must be a numpy array, got {type(a).__name__}")
    if a.dtype == ml_dtypes.bfloat16:
        a = a.view(np.uint16)
    if a.dtype not in dtypes or a.ndim != 1 or a.shape[0] != n or not a.flags.c_contiguous:
        raise ValueError(f"{name} must be 1-D C-contiguous {'/'.join(map(str, dtypes))} of length {n} "
                         f"(uint16 = bf16 bits), got {a.dtype}{a.shape}")
    return a


def _check_state(a, name: str, n: int) -> None:
    _kernel_view(a, name, n, (np.float32,))
    if not a.flags.writeable:
        raise ValueError(f"{name} is read-only; it is updated in place")


def adamw_update_(master_f32, mu_f32, nu_f32, grad, out_bf16, *, lr: float, b1: float, b2: float,
                  eps: float, count: int, seg_bounds: np.ndarray, seg_decay: np.ndarray,
                  grad_scale: float = 1.0) -> None:
    """One optax.adamw step (eps_root=0) on flat host buffers, in place, one pass, GIL released.

    grad: fp32, or bf16 as ml_dtypes.bfloat16 or its uint16 view; multiplied by grad_scale (clipping,
    1/microbatches) in fp32 first. out_bf16: None, or bf16/uint16 receiving the new master rounded to bf16
    (RNE, bit-identical to ml_dtypes and jax astype). count: 1-based step, optax's state count + 1. lr: the
    fp32 value optax's schedule gives at count - 1 (evaluate it under jax.jit to match optax bit for bit).
    Elements [seg_bounds[k], seg_bounds[k+1]) decay by seg_decay[k]; 0 excludes them as optax's mask does.
    b1, b2 as Python floats, like optax's arguments. Math and its exact fp32 order: the module docstring.
    """
    n = master_f32.shape[0] if isinstance(master_f32, np.ndarray) else -1
    for a, name in ((master_f32, "master_f32"), (mu_f32, "mu_f32"), (nu_f32, "nu_f32")):
        _check_state(a, name, n)
    grad = _kernel_view(grad, "grad", n, (np.float32, np.uint16))
    if out_bf16 is not None:
        out_bf16 = _kernel_view(out_bf16, "out_bf16", n, (np.uint16,))
    seg_bounds = np.ascontiguousarray(seg_bounds, np.int64)
    seg_decay = np.ascontiguousarray(seg_decay, np.float32)
    if (seg_bounds.ndim != 1 or seg_decay.shape != (seg_bounds.shape[0] - 1,) or seg_bounds[0] != 0
            or seg_bounds[-1] != n or np.any(np.diff(seg_bounds) < 0)):
        raise ValueError(f"seg_bounds must rise from 0 to n={n} with len(seg_decay)+1 entries; got "
                         f"{seg_bounds.shape[0]} bounds from {seg_bounds[:1]} to {seg_bounds[-1:]}, "
                         f"{seg_decay.shape} decays")
    if count < 1:
        raise ValueError(f"count={count} is 1-based and must be >= 1")
    b1, b2, f32 = float(b1), float(b2), np.float32
    numba.set_num_threads(_num_threads)  # thread-local in numba: apply it on the calling thread
    _adamw_kernel(master_f32, mu_f32, nu_f32, grad, out_bf16, -f32(lr), f32(b1), f32(1.0 - b1), f32(b2),
                  f32(1.0 - b2), f32(eps), bias_correction_f32(b1, count), bias_correction_f32(b2, count),
                  f32(grad_scale), seg_bounds, seg_decay)


def accumulate_(acc_f32, grad) -> None:
    """acc_f32 += grad (fp32, or bf16 as bfloat16/uint16) in place, multi-threaded, GIL released; fp32 sum
    with denormals flushed, as the same add under jax on CPU."""
    n = acc_f32.shape[0] if isinstance(acc_f32, np.ndarray) else -1
    _check_state(acc_f32, "acc_f32", n)
    grad = _kernel_view(grad, "grad", n, (np.float32, np.uint16))
    numba.set_num_threads(_num_threads)
    _accumulate_kernel(acc_f32, grad)


def warmup() -> None:
    """Compiles, or loads from numba's on-disk cache, every kernel signature on tiny arrays (bf16 and fp32
    grads, with and without the bf16 output) so the first training step pays no JIT time (~10 s cold)."""
    bounds, decays = make_segments([2, 1], [0.1, 0.0])
    for gdtype in (np.uint16, np.float32):
        for out in (np.zeros(3, np.uint16), None):
            master, mu, nu = (np.ones(3, np.float32) for _ in range(3))
            adamw_update_(master, mu, nu, np.zeros(3, gdtype), out, lr=1e-3, b1=0.9, b2=0.999, eps=1e-8,
                          count=1, seg_bounds=bounds, seg_decay=decays)
        accumulate_(np.zeros(3, np.float32), np.zeros(3, gdtype))
