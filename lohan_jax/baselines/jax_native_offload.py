"""jax_native_offload: the baseline a JAX user writes without lohan_jax.

One jitted train step over the whole model (jax.value_and_grad + optax.adamw, bf16 compute over fp32 masters,
exactly lohan_jax.reference's semantics), with the fp32 parameters and the Adam state placed in `pinned_host`
memory through the shardings' memory kinds and every transfer left to XLA: the step's in/out shardings name
host memory, and inside the step `jax.device_put` moves the state to the device and the results back, as
MaxText's parameter and optimizer-state host offload does. Blocks are rematerialised (`jax.checkpoint`, the
cast to bf16 inside), as any user training a model of this size would.

Where the backend has no `pinned_host` memory (or cannot move arrays there inside jit) the state stays in the
default memory, with a warning: the numerics are the same, there is just no offload.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import SingleDeviceSharding

from lohan_jax.config import OptimConfig
from lohan_jax.engine.memory import pinned_limit_nbytes
from lohan_jax.plan_memory import PINNED_LIMIT_ENV
from lohan_jax.models import DecoderModel, Params, cast_floating, decay_mask
from lohan_jax.optim.schedule import make_optax_adamw, make_schedule
from lohan_jax.reference import over_micro_batches

log = logging.getLogger(__name__)

HOST_KIND = "pinned_host"
GIB = 2**30


class BaselineOutOfMemory(MemoryError):
    """Refused before allocating: the state or XLA's compiled step would not fit (message says by how much)."""


def host_memory_kind(device: jax.Device) -> str | None:
    """`pinned_host` if `device` has it and a jitted step can move arrays there and back, else None (logged)."""
    try:
        kinds = {m.kind for m in device.addressable_memories()}
    except Exception as e:  # noqa: BLE001 (backends without memories: no offload possible)
        kinds, reason = set(), repr(e)
    else:
        reason = f"its memories are {sorted(kinds)}"
    if HOST_KIND in kinds:
        host = SingleDeviceSharding(device, memory_kind=HOST_KIND)
        dev = SingleDeviceSharding(device, memory_kind="device")
        try:
            probe = jax.jit(lambda a: jax.device_put(jax.device_put(a, dev) + 1.0, host),
                            in_shardings=host, out_shardings=host)
            probe(jax.device_put(np.zeros(4, np.float32), host)).block_until_ready()
            return HOST_KIND
        except Exception as e:  # noqa: BLE001
            reason = f"a jitted transfer to {HOST_KIND} failed: {type(e).__name__}: {str(e)[:200]}"
    log.warning("jax_native_offload: no %s memory on %s (%s); parameters and optimizer state stay in the default "
                "memory: same numerics, no offload", HOST_KIND, device.platform, reason)
    return None


def make_native_loss_and_grad(model: DecoderModel, compute_dtype: Any, remat: bool = True):
    """(fp32 params, step batch [M, b, S]) -> (loss, fp32 grads): lohan_jax.reference's function, with each
    block (and its cast to `compute_dtype`) rematerialised in the backward when `remat`."""

    def block(p32, x):
        return model.block(cast_floating(p32, compute_dtype), x)

    block_fn = jax.checkpoint(block) if remat else block

    def micro_loss(params32: Params, tokens, targets, weights):
        edges = cast_floating({"embed": params32["embed"], "head": params32["head"]}, compute_dtype)
        x = model.embed(edges["embed"], tokens)
        for p32 in params32["blocks"]:
            x = block_fn(p32, x)
        return model.head_loss(edges["head"], edges["embed"], x, targets, weights)

    return over_micro_batches(micro_loss)


class JaxNativeOffloadTrainer:
    """fp32 params and optax AdamW state in pinned host memory; `step` is one jitted optimizer step whose
    transfers XLA schedules. Same interface as ReferenceTrainer: `step(batch) -> {"loss", "grad_norm", "lr"}`.

    params32: a {"embed", "blocks", "head"} tree (copied) or `unit_params(k) -> tree` for k in forward order
    (placed one unit at a time, so the device never holds the whole model at init). With `batch_shape`
    ([M, b, S]) the step is compiled before any state is allocated and refused (BaselineOutOfMemory) if XLA's
    scratch alone exceeds the device's memory or the state exceeds the host's.
    """

    def __init__(self, model: DecoderModel, params32: Params | Callable[[int], Any], optim: OptimConfig,
                 total_steps: int, compute_dtype: Any = jnp.bfloat16, *,
                 batch_shape: tuple[int, int, int] | None = None, offload_params: bool = True,
                 offload_opt_state: bool = True, remat: bool = True, device: jax.Device | None = None,
                 seq_len: int = 8):
        self.model, self.compute_dtype = model, compute_dtype
        self.device = device or jax.devices()[0]
        self.memory_kind = host_memory_kind(self.device) if offload_params or offload_opt_state else None
        offload = self.memory_kind is not None
        self.offload_params, self.offload_opt_state = offload and offload_params, offload and offload_opt_state
        default = SingleDeviceSharding(self.device)
        self._dev = SingleDeviceSharding(self.device, memory_kind="device") if offload else default
        host = SingleDeviceSharding(self.device, memory_kind=self.memory_kind) if offload else default
        self.param_sharding = host if self.offload_params else self._dev
        self.opt_sharding = host if self.offload_opt_state else self._dev
        self.schedule = make_schedule(optim, total_steps)
        abstract = model.abstract_params(seq_len)
        self.optimizer = make_optax_adamw(optim, total_steps, decay_mask(abstract))
        self._opt_abstract = jax.eval_shape(self.optimizer.init, abstract)
        self.n_params = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(abstract))
        self._train_step = jax.jit(self._make_step(make_native_loss_and_grad(model, compute_dtype, remat)),
                                   in_shardings=(self.param_sharding, self.opt_sharding, self._dev),
                                   out_shardings=(self.param_sharding, self.opt_sharding, self._dev),
                                   donate_argnums=(0, 1))
        self._report: dict[str, Any] = {"memory_kind": self.memory_kind or "default",
                                        "offload_params": self.offload_params,
                                        "offload_opt_state": self.offload_opt_state, "remat": remat}
        self._check_host_memory()
        self._compiled = None
        if batch_shape is not None:  # compile ahead from shapes alone, check, then allocate
            self._compile(abstract, batch_shape)
        t0 = time.perf_counter()
        self.params = self._place_params(params32)
        self.opt_state = jax.tree.map(self._zeros, self._opt_abstract)
        jax.block_until_ready((self.params, self.opt_state))
        self._report["state_init_s"] = time.perf_counter() - t0
        self._step = 0

    # ---- the step ----------------------------------------------------------------------------------------
    def _make_step(self, loss_and_grad):
        to_dev = lambda tree, on_host: jax.device_put(tree, self._dev) if on_host else tree

        def train_step(params_h, opt_state_h, batch):
            params = to_dev(params_h, self.offload_params)
            loss, grads = loss_and_grad(params, batch)
            opt_state = to_dev(opt_state_h, self.offload_opt_state)
            with jax.numpy_dtype_promotion("standard"):  # optax mixes Python floats and int32 counts
                updates, opt_state = self.optimizer.update(grads, opt_state, params)
                params = optax.apply_updates(params, updates)
            metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads)}
            return (jax.device_put(params, self.param_sharding), jax.device_put(opt_state, self.opt_sharding),
                    metrics)

        return train_step

    def _compile(self, abstract_params: Params, batch_shape: tuple[int, int, int]) -> None:
        spec = lambda tree, s: jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree)
        batch = {"tokens": jax.ShapeDtypeStruct(batch_shape, jnp.int32, sharding=self._dev),
                 "targets": jax.ShapeDtypeStruct(batch_shape, jnp.int32, sharding=self._dev),
                 "weights": jax.ShapeDtypeStruct(batch_shape, jnp.float32, sharding=self._dev)}
        t0 = time.perf_counter()
        compiled = self._train_step.lower(spec(abstract_params, self.param_sharding),
                                          spec(self._opt_abstract, self.opt_sharding), batch).compile()
        self._report["compile_s"] = time.perf_counter() - t0
        stats = compiled.memory_analysis()
        fields = ("temp", "argument", "output", "alias", "host_temp", "host_argument", "host_output", "host_alias")
        mem = {f"xla_{f}_gib": getattr(stats, f"{f}_size_in_bytes", 0) / GIB for f in fields} if stats else {}
        if stats is not None and getattr(stats, "peak_memory_in_bytes", 0):
            mem["xla_peak_gib"] = stats.peak_memory_in_bytes / GIB
        self._report.update(mem)
        host_args = getattr(stats, "host_argument_size_in_bytes", 0) if stats is not None else 0
        if host_args and getattr(stats, "host_alias_size_in_bytes", 0) < 0.9 * host_args:
            # the donated host state is not reused for the results: both copies live at once
            self._report["host_state_aliased"] = False
            self._check_host_memory(copies=2)
        limit = (self.device.memory_stats() or {}).get("bytes_limit") if self.device.platform == "gpu" else None
        if stats is not None and limit and stats.temp_size_in_bytes > limit:
            raise BaselineOutOfMemory(
                "out of memory (refused before allocating): XLA's compiled step needs "
                f"{stats.temp_size_in_bytes / GIB:.1f} GiB of device scratch alone, the device allows "
                f"{limit / GIB:.1f} GiB (memory analysis: {mem})")
        self._compiled = compiled

    def step(self, batch: dict[str, Any]) -> dict[str, Any]:
        """One optimizer step; returns device scalars (read them after dispatching the next step)."""
        lr = self.schedule(self._step)
        batch = jax.device_put(batch, self._dev)
        fn = self._compiled or self._train_step
        self.params, self.opt_state, metrics = fn(self.params, self.opt_state, batch)
        self._step += 1
        return {**metrics, "lr": lr}

    # ---- state -------------------------------------------------------------------------------------------
    def _place_params(self, params32) -> Params:
        put = lambda tree: jax.tree.map(
            lambda a: jax.device_put(a, self.param_sharding, may_alias=False), tree)  # the step donates them
        if not callable(params32):
            return put(params32)
        n = self.model.n_layers
        units = [put(params32(k)) for k in range(n + 2)]  # one unit on the device at a time
        return {"embed": units[0], "blocks": units[1:-1], "head": units[-1]}

    def _zeros(self, a: jax.ShapeDtypeStruct) -> jax.Array:
        """optax AdamW's initial state is all zeros (counts, moments): allocated leaf by leaf where it lives
        rather than by optimizer.init on the device (the whole state would pass through device memory)."""
        return jax.device_put(np.zeros(a.shape, a.dtype), self.opt_sharding)

    def _check_host_memory(self, copies: int = 1) -> None:
        from lohan_jax.planner.profile import available_ram_gib

        n = self.n_params
        host_bytes = copies * (4 * n * self.offload_params + 8 * n * self.offload_opt_state)  # fp32 master; m, v
        self._report["host_state_gib"] = host_bytes / GIB
        if not host_bytes or self.device.platform != "gpu":
            return
        limits = {"available RAM": available_ram_gib() * GIB,
                  f"XLA's pinned-host cap ({PINNED_LIMIT_ENV})": pinned_limit_nbytes()}
        for what, limit in limits.items():
            if limit and host_bytes > limit:
                raise BaselineOutOfMemory(
                    "out of memory (host, refused before allocating): fp32 parameters and Adam state of "
                    f"{n / 1e9:.2f}B parameters need {host_bytes / GIB:.1f} GiB of pinned host memory"
                    f"{' (XLA keeps the donated state and the new one at once)' if copies > 1 else ''}; {what} is "
                    f"{limit / GIB:.1f} GiB")

    def master_params(self) -> Params:
        return self.params

    def report(self) -> dict[str, Any]:
        """Placement, compile time and XLA's memory analysis of the step (for the result row)."""
        return dict(self._report)


def init_params_by_unit(model: DecoderModel, seed: int = 0, seq_len: int = 8) -> Callable[[int], Any]:
    """unit_params(k): unit k of `model.init(jax.random.key(seed), seq_len)`, computed on the device one unit
    at a time (the blocks through one jitted function of the block index: one compile, not one per block)."""
    rng = jax.random.key(seed)
    k_embed, _, k_blocks = jax.random.split(rng, 3)  # DecoderModel._init_unit's keys
    tokens = jnp.zeros((1, seq_len), jnp.int32)
    p_embed = jax.eval_shape(lambda: model.embed_module.init(k_embed, tokens)["params"])
    x_aval = jax.eval_shape(model.embed_module.apply, {"params": p_embed}, tokens)

    @jax.jit
    def init_block(i):
        with jax.numpy_dtype_promotion("standard"):  # as DecoderModel.init_unit
            x = jnp.zeros(x_aval.shape, x_aval.dtype)
            return model.block_module.init(jax.random.fold_in(k_blocks, i), x)["params"]

    def unit_params(k: int) -> Any:
        return init_block(k - 1) if 1 <= k <= model.n_layers else model.init_unit(rng, k, seq_len)

    return unit_params
