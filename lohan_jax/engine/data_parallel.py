"""DataParallelEngine: the offloaded engine on several GPUs of one host, single controller, one mesh axis.

Each device runs the block-by-block step of OffloadEngine on its share of the batch (the same loop, the same
per-block programs, wrapped in `jax.shard_map`). ZeRO-style, every flat vector of a unit (bf16 weights, fp32
master, Adam moments) is split into one shard per device, padded to a multiple of the device count:
  - weights live as shards (in pinned host memory, or resident in HBM) and are all-gathered inside the
    program that uses them, so each device uploads only its 1/N over its own PCIe link and HBM holds 1/N of
    the resident weights;
  - a block's weight gradient is reduce-scattered (summed in fp32, rounded once to the compute dtype as the
    one-device engine rounds it) inside the block's backward program, as it is produced; each device's
    shard then leaves for its own pinned host buffer while the backward goes on (dispatch is asynchronous);
  - the host AdamW worker updates each device's shard of the fp32 state in place and writes that device's
    next bf16 shard straight into its pinned buffer; state in HBM is updated on the GPU shard by shard.
Batches carry loss weights normalised over the global step (lohan_jax.batches), so the per-device losses and
gradients sum to exactly the one-device ones: the step is the same AdamW step as OffloadEngine's.
"""
from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from lohan_jax.engine.engine import OffloadEngine, _as_kernel_array
from lohan_jax.engine.layout import FlatLayout
from lohan_jax.engine.programs import BlockProgram, EdgePrograms, _adamw_gpu
from lohan_jax.engine.units import UnitState
from lohan_jax.models import DecoderModel, Params
from lohan_jax.optim import host_adamw
from lohan_jax.plan import Plan
from lohan_jax.tiers import MeshSpaces, ShardedHostBuffer

AXIS = "data"
SHARD = P(AXIS)  # split along the first axis: batches, flat-vector shards, per-device stacks
REPLICATED = P()
SHARD_ALIGN = 128  # elements: shard boundaries of bf16 and fp32 vectors stay 256/512-byte aligned


def shard_size(n: int, n_devices: int) -> int:
    """Elements of each device's shard of an n-element flat vector (the vector is zero-padded to n_devices
    times this; padded elements have zero gradients, so AdamW leaves them at zero)."""
    return -(-n // (n_devices * SHARD_ALIGN)) * SHARD_ALIGN


def shard_segments(layout: FlatLayout, weight_decay: float, n_devices: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per shard, the host AdamW kernel's (seg_bounds, seg_decay): the unit's leaves clipped to the shard, the
    padding a last segment without decay."""
    ns = shard_size(layout.size, n_devices)
    bounds = np.append(np.asarray(layout.offsets, np.int64), ns * n_devices)
    decay = np.append(layout.leaf_decay(weight_decay), np.float32(0))
    return [(np.clip(bounds, d * ns, (d + 1) * ns) - d * ns, decay) for d in range(n_devices)]


def _shard_map(fn: Callable, mesh: Mesh, in_specs, out_specs) -> Callable:
    # check_vma off: the bodies call the one-device jitted programs, and all_gather's result is replicated
    # although the checker cannot infer it
    return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)


def _gather(w_shard: jax.Array, n: int) -> jax.Array:
    """Inside shard_map: the unit's whole flat vector from every device's shard."""
    return jax.lax.all_gather(w_shard, AXIS, tiled=True)[:n]


def _reduce_scatter(dw: jax.Array, n_pad: int) -> tuple[jax.Array, jax.Array]:
    """Inside shard_map: this device's shard of the gradient summed over devices (in fp32, then rounded once to
    the compute dtype), and the squared norm of the whole summed gradient."""
    g = jnp.pad(dw.astype(jnp.float32), (0, n_pad - dw.shape[0]))
    g = jax.lax.psum_scatter(g, AXIS, scatter_dimension=0, tiled=True).astype(dw.dtype)
    return g, jax.lax.psum(jnp.sum(jnp.square(g.astype(jnp.float32))), AXIS)


class ShardedBlockProgram:
    """A BlockProgram on every device's share of the batch: weights come in as shards and are gathered in the
    program; the weight gradient goes out reduce-scattered. Residuals stay per device: stacked on a leading
    device axis (any shape, scalars included), so they can be swapped to host like the one-device ones."""

    def __init__(self, prog: BlockProgram, mesh: Mesh, n: int, n_pad: int):
        self.policy, self.residual_avals, self.residual_nbytes = prog.policy, prog.residual_avals, prog.residual_nbytes

        def fwd(w, x_BSD):
            y, res = prog.fwd(_gather(w, n), x_BSD)
            return y, [r[None] for r in res]

        def bwd(w, x_BSD, residuals, dy_BSD):
            dx, dw, _ = prog.bwd(_gather(w, n), x_BSD, [r[0] for r in residuals], dy_BSD)
            return (dx, *_reduce_scatter(dw, n_pad))

        self.fwd = jax.jit(_shard_map(fwd, mesh, (SHARD, SHARD), (SHARD, SHARD)))
        self.bwd = jax.jit(_shard_map(bwd, mesh, (SHARD,) * 4, (SHARD, SHARD, REPLICATED)), donate_argnums=(2, 3))
        self.apply = jax.jit(_shard_map(lambda w, x: prog.apply(_gather(w, n), x), mesh, (SHARD, SHARD), SHARD))


class ShardedEdges:
    """EdgePrograms on every device's share of the batch. The loss is summed over devices; the tied head's
    share of the embedding gradient stays per device (stacked) until the embedding backward adds its own and
    reduce-scatters the sum. Without tying, the head's dummy embedding argument is a replicated constant."""

    def __init__(self, edges: EdgePrograms, mesh: Mesh, embed_n: int, head_n: int, n_devices: int):
        self.tied = tied = edges.tied
        embed_pad, head_pad = (n_devices * shard_size(k, n_devices) for k in (embed_n, head_n))
        full_embed = functools.partial(_gather, n=embed_n) if tied else (lambda w: w)
        we_spec = SHARD if tied else REPLICATED
        psum = functools.partial(jax.lax.psum, axis_name=AXIS)

        def embed_fwd(w, tokens):
            return edges.embed_fwd(_gather(w, embed_n), tokens)

        def embed_bwd(w, tokens, dx, *g_tied):
            dw, _ = edges.embed_bwd(_gather(w, embed_n), tokens, dx, *(g[0] for g in g_tied))
            return _reduce_scatter(dw, embed_pad)

        def head_fwd_bwd(wh, we, x_BSD, targets, weights):
            loss, dx, dwh, dwe, _ = edges.head_fwd_bwd(_gather(wh, head_n), full_embed(we), x_BSD, targets, weights)
            g_head, sq = _reduce_scatter(dwh, head_pad)
            return psum(loss), dx, g_head, dwe[None], sq

        def head_loss(wh, we, x_BSD, targets, weights):
            return psum(edges.head_loss(_gather(wh, head_n), full_embed(we), x_BSD, targets, weights))

        head_in = (SHARD, we_spec, SHARD, SHARD, SHARD)
        self.embed_fwd = jax.jit(_shard_map(embed_fwd, mesh, (SHARD, SHARD), SHARD))
        self.embed_bwd = jax.jit(_shard_map(embed_bwd, mesh, (SHARD,) * (4 if tied else 3), (SHARD, REPLICATED)),
                                 donate_argnums=(2,))
        self.head_fwd_bwd = jax.jit(_shard_map(head_fwd_bwd, mesh, head_in,
                                               (REPLICATED, SHARD, SHARD, SHARD, REPLICATED)), donate_argnums=(2,))
        self.head_loss = jax.jit(_shard_map(head_loss, mesh, head_in, REPLICATED))


class _ShardDecay:
    """Stands in for a FlatLayout inside `_adamw_gpu` under shard_map: the per-element weight decay of this
    device's shard (leaf looked up from the global element index; padding decays by 0)."""

    def __init__(self, layout: FlatLayout, shard: int):
        self.leaf_ends = np.asarray(layout.offsets[1:], np.int32)  # leaf k covers [offsets[k], offsets[k + 1])
        self.shard = shard

    def decay_vector(self, per_leaf: jax.Array) -> jax.Array:
        idx = jax.lax.axis_index(AXIS) * self.shard + jnp.arange(self.shard, dtype=jnp.int32)
        leaf = jnp.searchsorted(jnp.asarray(self.leaf_ends), idx, side="right")
        return jnp.concatenate([per_leaf, jnp.zeros((1,), per_leaf.dtype)])[leaf]


def make_sharded_gpu_adamw(layout: FlatLayout, spaces: MeshSpaces, n_devices: int, optim, compute_dtype: Any):
    """programs.make_gpu_adamw on every device's shard (the same arithmetic, `_adamw_gpu`); returns the
    updated shards of master, moments and the bf16 weights."""
    decay = _ShardDecay(layout, shard_size(layout.size, n_devices))

    def body(master, mu, nu, grad, lr, count, scale, leaf_decay):
        return _adamw_gpu(master, mu, nu, grad, lr, count, scale, leaf_decay, layout=decay, b1=optim.b1,
                          b2=optim.b2, eps=optim.eps, compute_dtype=compute_dtype)

    fn = jax.jit(_shard_map(body, spaces.mesh, (SHARD,) * 4 + (REPLICATED,) * 4, (SHARD,) * 4),
                 donate_argnums=(0, 1, 2))
    leaf_decay = spaces.replicate(layout.leaf_decay(optim.weight_decay))
    return lambda master, mu, nu, grad, lr, count, scale: fn(master, mu, nu, grad, lr, count, scale, leaf_decay)


@dataclasses.dataclass(eq=False)
class ShardedUnitState(UnitState):
    """UnitState whose flat vectors are padded and split over the devices (host_w: a ShardedHostBuffer,
    dev_w and dev_state: arrays sharded over the mesh, master/mu/nu/acc: padded numpy, one slice per shard)."""

    segments: list | None = None  # per shard: the host kernel's (seg_bounds, seg_decay)

    @classmethod
    def create_sharded(cls, index: int, name: str, plan, tree32: Any, spaces: MeshSpaces, n_devices: int,
                       compute_dtype: Any, accumulate: bool, weight_decay: float,
                       store: Any = None) -> ShardedUnitState:
        layout = FlatLayout.of(tree32)
        master = np.zeros(n_devices * shard_size(layout.size, n_devices), np.float32)
        master[:layout.size] = layout.flatten_np(tree32, np.float32)
        w = master.astype(ml_dtypes.bfloat16 if np.dtype(compute_dtype) == np.dtype(ml_dtypes.bfloat16)
                          else np.float32)
        u = cls(index, name, plan, layout, segments=shard_segments(layout, weight_decay, n_devices))
        u.place(master, w, spaces, accumulate, store, ShardedHostBuffer)
        return u

class DataParallelEngine(OffloadEngine):
    """OffloadEngine over `devices` (default: every local device) of one host, data parallel.

    `micro_batch_shape` is the global micro-batch; its batch size must be a multiple of the device count.
    Batches, `step`, `eval_loss`, `master_params`, `state_dict` (unpadded, interchangeable with
    OffloadEngine's) are as in OffloadEngine; traffic counters sum over the devices.
    """

    def __init__(self, model: DecoderModel, params32: Params | Callable[[int], Any], plan: Plan, *, optim,
                 total_steps: int, micro_batch_shape: tuple[int, int], n_micro: int = 1,
                 compute_dtype: Any = jnp.bfloat16, devices: int | Sequence[jax.Device] | None = None,
                 device: jax.Device | None = None, **kwargs):
        del device  # OffloadEngine.from_config names one device; the mesh's first stands for all of them
        devices = local_devices(devices)
        n = len(devices)
        b, s = micro_batch_shape
        if b % n:
            raise ValueError(f"a micro-batch of {b} sequences does not split over {n} devices: make "
                             f"train.batch_size / train.micro_batches a multiple of offload.devices={n}")
        self.mesh = Mesh(np.asarray(devices), (AXIS,))
        self.n_devices = n
        super().__init__(model, params32, plan, optim=optim, total_steps=total_steps, micro_batch_shape=(b // n, s),
                         n_micro=n_micro, compute_dtype=compute_dtype, device=devices[0], **kwargs)
        wrapped: dict[int, ShardedBlockProgram] = {}
        self.block_programs = [
            wrapped.setdefault(id(p), ShardedBlockProgram(p, self.mesh, u.layout.size, self._padded(u.layout)))
            for p, u in zip(self.block_programs, self.block_us)]
        self.edges = ShardedEdges(self.edges, self.mesh, self.embed_u.layout.size, self.head_u.layout.size, n)
        self._no_tied = self.spaces.replicate(jnp.zeros((1,), compute_dtype))
        self._gpu_adamw = {u.layout: make_sharded_gpu_adamw(u.layout, self.spaces, n, optim, compute_dtype)
                           for u in self.units if not u.host_updated}
        self.ckpt_nbytes *= n  # one block input of the global micro-batch
        accumulate, first = self._accumulate, jax.jit(lambda g: g.astype(jnp.float32))
        # OffloadEngine starts a GPU accumulator from zeros on the default device: start from the sharded
        # gradient instead (the same value: 0 + g), rather than copy a whole unit's zeros onto every device
        self._accumulate = lambda acc, g: first(g) if acc.sharding != g.sharding else accumulate(acc, g)

    @classmethod
    def _config_kwargs(cls, cfg) -> dict:
        return {"devices": cfg.offload.devices}

    def _padded(self, layout: FlatLayout) -> int:
        return self.n_devices * shard_size(layout.size, self.n_devices)

    def _make_spaces(self, device) -> MeshSpaces:
        return MeshSpaces(self.mesh)

    def _create_unit(self, k: int, name: str, plan, tree32: Any, compute_dtype: Any, accumulate: bool):
        return ShardedUnitState.create_sharded(k, name, plan, tree32, self.spaces, self.n_devices, compute_dtype,
                                               accumulate, self.optim.weight_decay, self.store)

    # ---- the host side, shard by shard ---------------------------------------------------------------------
    def _host_adamw(self, u: ShardedUnitState, master, mu, nu, g_host: Any, lr: float, count: int,
                    scale: float) -> None:
        """One fused kernel call per device's shard (each with all the kernel's threads: the CPU is shared),
        writing that device's next compute weights into its own pinned buffer."""
        grads = _host_shards(g_host) if g_host is not None else [u.acc[lo:hi] for lo, hi in u.host_w.bounds]
        bf16_out = u.host_w.dtype.itemsize == 2
        for (lo, hi), view, grad, (bounds, decay) in zip(u.host_w.bounds, u.host_w.views, grads, u.segments):
            host_adamw.adamw_update_(master[lo:hi], mu[lo:hi], nu[lo:hi], grad,
                                     view.view(np.uint16) if bf16_out else None, lr=lr, b1=self.optim.b1,
                                     b2=self.optim.b2, eps=self.optim.eps, count=count, seg_bounds=bounds,
                                     seg_decay=decay, grad_scale=scale)
            if not bf16_out:
                np.copyto(view, master[lo:hi])

    def _host_add(self, u: ShardedUnitState, g_host: Any) -> None:
        for (lo, hi), grad in zip(u.host_w.bounds, _host_shards(g_host)):
            host_adamw.accumulate_(u.acc[lo:hi], grad)

    # ---- state: unpadded, as OffloadEngine's ---------------------------------------------------------------
    def state_dict(self) -> dict:
        state = super().state_dict()
        for u, s in zip(self.units, state["units"]):
            for k in ("master", "mu", "nu"):
                s[k] = np.asarray(s[k])[:u.layout.size]
        return state

    def load_state_dict(self, state: dict) -> None:
        units = []
        for u, s in zip(self.units, state["units"]):
            pad = self._padded(u.layout) - u.layout.size
            units.append({k: np.pad(np.asarray(s[k], np.float32), (0, pad)) for k in ("master", "mu", "nu")})
        super().load_state_dict({**state, "units": units})


def _host_shards(g_host: jax.Array) -> list[np.ndarray]:
    """Each device's shard of a landed gradient as the kernels' array (np.asarray of a pinned-host shard is a
    zero-copy view on the GPU; of the whole sharded array it would be a gathering copy)."""
    shards = sorted(g_host.addressable_shards, key=lambda s: s.index[0].start or 0)
    return [_as_kernel_array(np.asarray(s.data)) for s in shards]


def local_devices(devices: int | Sequence[jax.Device] | None = None) -> list[jax.Device]:
    """The devices to train on: all local ones (None), the first n, or the given ones; refused clearly when
    the host has fewer."""
    available = jax.local_devices()
    if devices is None:
        return list(available)
    if isinstance(devices, int):
        if not 1 <= devices <= len(available):
            raise ValueError(f"offload.devices={devices} but this host has {len(available)} "
                             f"{available[0].platform.upper()} device(s): {available}")
        return list(available[:devices])
    return list(devices)
