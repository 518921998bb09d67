"""Which attention does a GPT block run on this GPU, and what does each one cost?

The planner's analytic profile assumes fused (flash) attention: no S x S probabilities kept. Before 2026-11-26
07:00 UTC the engine measured far more (gpt3-1.3b 155.8 KB/token kept, gpt3-2.7b 198.5, against 61.5 and 76.9
analytic). This probe showed cuDNN's attention did run (head dims 64/80/128) and the excess was ours: weight
matrices kept as residuals, fp32 copies inside the LayerNorms, erf's parts in GELU (now 61.6 and 76.9: exactly
the analytic profile). It asks, for the models' head dims: does jax.nn.dot_product_attention(implementation=
"cudnn") trace, compile and differentiate here (the error if not), how fast is its forward+backward against
XLA's, and what one block keeps and costs under each `train.attention` (auto, cudnn, xla) through the engine's
own BlockProgram. One JSON row per (probe, case) to --out; a short table last.

    python experiments/attention_probe.py --out $OUT/attention_probe.jsonl
"""
from __future__ import annotations

import argparse
import os
import sys
import traceback
from pathlib import Path

os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.9")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from lohan_jax.metrics import append_result  # noqa: E402
from lohan_jax.models import build_model, get_spec  # noqa: E402
from lohan_jax.models.attention import causal_attention  # noqa: E402
from lohan_jax.planner.measure import activation_profile, block_times_ms, median_s  # noqa: E402
from lohan_jax.planner.profile import model_profile_from_spec  # noqa: E402


def _error(e: BaseException) -> str:
    """The exception and where it was raised, on one line (jax's traceback-filtering advice dropped)."""
    msg = str(e).split("----")[0]
    frames = traceback.extract_tb(e.__traceback__)
    where = f" (at {Path(frames[-1].filename).name}:{frames[-1].lineno})" if frames else ""
    return " ".join(f"{type(e).__name__}: {msg}".split())[:600] + where


def kernel_case(batch: int, seq: int, heads: int, head_dim: int, impl: str) -> dict:
    """Forward+backward of the attention core alone under `impl` (our causal_attention's path names)."""
    ks = jax.random.split(jax.random.key(0), 3)
    q, k, v = (jax.random.normal(kk, (batch, seq, heads, head_dim), jnp.bfloat16) for kk in ks)
    row = dict(case=f"kernel h{head_dim}", impl=impl, batch=batch, seq_len=seq, n_heads=heads, head_dim=head_dim)
    try:
        fwd = jax.jit(lambda q, k, v: causal_attention(q, k, v, impl))
        loss = lambda q, k, v: causal_attention(q, k, v, impl).astype(jnp.float32).sum()
        bwd = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
        row["hlo_has_cudnn"] = "cudnn" in fwd.lower(q, k, v).compile().as_text().lower()
        row["fwd_ms"] = median_s(lambda: fwd(q, k, v), 10) * 1e3
        row["fwd_bwd_ms"] = median_s(lambda: bwd(q, k, v), 10) * 1e3
        row["status"] = "ok"
    except Exception as e:  # noqa: BLE001 - the error is the result
        row.update(status="failed", error=_error(e))
    return row


def block_case(model_name: str, micro: int, seq: int, impl: str | None) -> dict:
    """One block of `model_name` through BlockProgram: kept bytes/token (abstract) and keep/recompute times."""
    spec = get_spec(model_name)
    model = build_model(spec, jnp.bfloat16, impl)
    analytic = model_profile_from_spec(spec, seq, 2)
    row = dict(case=f"block {model_name}", impl=impl or "auto", model=model_name, batch=micro, seq_len=seq,
               head_dim=spec.head_dim, analytic_keep_kb_per_token=analytic.keep_nbytes_per_token / 1e3)
    try:
        _, keep_b, _ = activation_profile(model, spec, micro, seq, jnp.bfloat16)
        row["keep_kb_per_token"] = keep_b / 1e3
        times = block_times_ms(model, spec, micro, seq, jnp.bfloat16, reps=5, chunks=False)
        for text, (f, b) in times.items():
            row[f"{text}_fwd_ms"], row[f"{text}_bwd_ms"] = f, b
        row["status"] = "ok"
    except Exception as e:  # noqa: BLE001
        row.update(status="failed", error=_error(e))
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="experiments/results/attention_probe.jsonl")
    p.add_argument("--models", default="gpt3-1.3b,gpt3-2.7b,paper-6b")
    p.add_argument("--micro", type=int, default=8)
    p.add_argument("--seq", type=int, default=1024)
    args = p.parse_args(argv)
    from jax._src.lib import cuda_versions  # noqa: PLC0415 - only where a CUDA jaxlib is installed
    env = dict(backend=jax.default_backend())
    try:
        env["cudnn_version"] = cuda_versions.cudnn_get_version() if cuda_versions else None
    except Exception as e:  # noqa: BLE001
        env["cudnn_version"] = f"unknown ({e})"
    print(env, flush=True)
    rows = []
    for head_dim, heads in ((64, 32), (80, 32), (128, 32)):
        for impl in ("cudnn", "xla"):
            rows.append(kernel_case(args.micro, args.seq, heads, head_dim, impl))
            print(rows[-1], flush=True)
    for name in args.models.split(","):
        for impl in (None, "cudnn", "xla"):
            rows.append(block_case(name, args.micro, args.seq, impl))
            print(rows[-1], flush=True)
    for r in rows:
        append_result(args.out, dict(experiment="attention_probe", system="lohan_jax", **env, **r))
    print("\ncase                 impl   status  keep KB/tok  fwd ms  fwd+bwd ms (kernel) | keep bwd / recompute bwd ms")
    for r in rows:
        extra = (f"{r['keep_kb_per_token']:8.1f}" if "keep_kb_per_token" in r else " " * 8)
        if "fwd_ms" in r:
            t = f"{r['fwd_ms']:7.2f} {r['fwd_bwd_ms']:7.2f}"
        elif "keep_fwd_ms" in r:
            t = f"{r['keep_fwd_ms']:7.2f} {r['keep_bwd_ms']:7.2f} / {r.get('recompute_bwd_ms', 0):.2f}"
        else:
            t = " " * 15
        print(f"{r['case']:20s} {r['impl']:6s} {r['status']:7s} {extra}  {t}  {r.get('error', '')[:120]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
