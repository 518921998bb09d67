"""Bit-identical runs on the GPU: XLA's deterministic GPU ops (train.deterministic), set before jax starts.

XLA's GPU kernels may reduce in a different order from one process to the next (atomics, autotuned algorithms),
so two runs of the same steps from the same seed drift apart in the last bits, and a resumed run cannot equal the
uninterrupted one. Measured on 2026-11-26 (H200, GPT-3 6.7B, bf16, `experiments/fault_gpu_run.py --part A`):
without these ops the two processes agreed on steps 0 and 1 and differed at step 2 (loss 27.125893 vs
27.125607), before any kill; with them every loss and the final held-out loss were equal bit for bit, across a
SIGKILL and a resume. The CPU backend is deterministic without them.
"""
from __future__ import annotations

import os

FLAG = "--xla_gpu_deterministic_ops=true"


def enable(cfg) -> None:
    """With train.deterministic, add FLAG to XLA_FLAGS before jax starts its backend (XLA reads XLA_FLAGS once).
    If jax has already started on a GPU without it, refuse (ConfigError): the run would not be deterministic."""
    from lohan_jax.config import ConfigError
    from lohan_jax.pinned_pool import jax_started

    if not cfg.train.deterministic:
        return
    flags = os.environ.get("XLA_FLAGS", "")
    if FLAG in flags.split():
        return
    if not jax_started():
        os.environ["XLA_FLAGS"] = f"{flags} {FLAG}".strip()
        return
    import jax
    if jax.default_backend() != "cpu":
        raise ConfigError(f"train.deterministic=true: jax started its {jax.default_backend()} backend before "
                          f"XLA_FLAGS held {FLAG}; set XLA_FLAGS='{FLAG}' in the environment (or run "
                          "`lohan-jax train`, which sets it before jax starts)")
