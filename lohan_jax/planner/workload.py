"""A workload: a model profile at a batch geometry, and the per-unit times and bytes a plan implies there.

Pure arithmetic (no jax). Times come from the model's measured per-block times (scaled per token, at the
measured rate for the tokens each call runs) or, for a described machine, from FLOPs over the machine's achieved
FLOP rates.
"""
from __future__ import annotations

import dataclasses

from lohan_jax.plan import ActivationPolicy
from lohan_jax.planner.profile import GB, MachineProfile, ModelProfile


@dataclasses.dataclass(frozen=True)
class Workload:
    model: ModelProfile
    batch_size: int  # sequences per optimizer step
    n_micro: int = 1  # gradient-accumulation micro-batches (train.micro_batches)
    clip: bool = False  # clip_by_global_norm: every update waits for the end of the backward

    def __post_init__(self):
        if self.batch_size < 1 or self.n_micro < 1 or self.batch_size % self.n_micro:
            raise ValueError(f"batch_size={self.batch_size} must be a positive multiple of n_micro={self.n_micro}")

    @property
    def micro_batch(self) -> int:
        return self.batch_size // self.n_micro

    @property
    def micro_tokens(self) -> int:
        return self.micro_batch * self.model.seq_len

    @property
    def tokens(self) -> int:
        return self.batch_size * self.model.seq_len

    @property
    def ckpt_nbytes(self) -> int:
        """A block input (the minimum checkpoint) of one micro-batch."""
        return self.micro_tokens * self.model.d_model * self.model.itemsize

    def weight_nbytes(self) -> list[int]:
        return [p * self.model.itemsize for p in self.model.unit_params()]

    def residual_nbytes(self, act: ActivationPolicy) -> int:
        if act.chunks > 1:
            return 0
        return int(round(self.micro_tokens * self.model.save_nbytes_per_token(act.save)))

    # ---- GPU times of one micro-batch ------------------------------------------------------------------
    def _scale(self, tokens_per_call: float | None = None, head: bool = False) -> float:
        """Measured time at tokens_measured -> this micro-batch's, run `tokens_per_call` tokens at a time."""
        call = self.micro_tokens if tokens_per_call is None else tokens_per_call
        return self.micro_tokens / self.model.tokens_measured * self.model.per_token_factor(call, head)

    def block_times_s(self, act: ActivationPolicy, machine: MachineProfile) -> tuple[float, float]:
        """(forward, backward incl. the policy's recompute) of one block."""
        m = self.model
        rec_frac = m.rec_frac(act.save)
        if m.measured:  # piecewise linear in rec_frac through the measured saved-set levels
            s = self._scale(self.micro_tokens / act.chunks)
            fwd = m.block_fwd_ms * s / 1e3
            bwd = m.block_bwd_ms(rec_frac) * s / 1e3
        else:
            rate = machine.gpu_block_tflops * 1e12
            fwd = self.micro_tokens * m.fwd_flops_per_token / rate
            bwd = self.micro_tokens * (2 * m.fwd_flops_per_token + rec_frac * m.recompute_flops_per_token) / rate
        if act.chunks > 1:
            fwd, bwd = fwd * m.chunk_overhead, bwd * m.chunk_overhead
        return fwd, bwd

    def head_s(self, machine: MachineProfile) -> float:
        m = self.model
        if m.measured and m.head_ms:
            return m.head_ms * self._scale(head=True) / 1e3
        return self.micro_tokens * m.head_flops_per_token / (machine.gpu_head_tflops * 1e12)

    def embed_s(self, machine: MachineProfile) -> tuple[float, float]:
        """(forward, backward): a gather and a scatter-add into a zeroed gradient, bound by HBM bandwidth."""
        m = self.model
        if m.measured and m.embed_ms:  # a gather and a scatter: bandwidth-bound, linear in tokens
            t = m.embed_ms * self.micro_tokens / m.tokens_measured / 1e3
            return t / 3, 2 * t / 3
        act = self.micro_tokens * m.d_model * m.itemsize
        bw = machine.hbm_gbps * GB
        return 3 * act / bw, (2 * m.embed_params * (m.itemsize + 4) + 3 * act) / bw

    # ---- FLOP conventions ------------------------------------------------------------------------------
    def flops_6n_per_token(self) -> float:
        """6N + 6*d*V + 12*L*d*S (lohan_jax.metrics.model_flops_per_token)."""
        m = self.model
        return 6.0 * m.nonembed_params + 6.0 * m.d_model * m.vocab_size + 12.0 * m.n_layers * m.d_model * m.seq_len

    def flops_paper_per_token(self) -> float:
        """96*L*h^2*(1 + S/(6h)): the paper's hardware FLOPs with full recompute, no vocabulary term."""
        m = self.model
        return 96.0 * m.n_layers * m.d_model**2 * (1 + m.seq_len / (6 * m.d_model))
