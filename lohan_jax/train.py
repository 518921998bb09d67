"""The training loop: build everything a config describes, run steps, report metrics into a run directory."""
from __future__ import annotations

import dataclasses
import json
import logging
import time
import warnings
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lohan_jax.batches import step_batch
from lohan_jax.config import Config, EngineKind, save_config
from lohan_jax.data import load_tokenizer, open_dataset
from lohan_jax.metrics import MetricsWriter, model_flops_per_token, paper_flops_per_token, peak_tflops
from lohan_jax.models import build_model

log = logging.getLogger(__name__)
# The CPU backend cannot reuse some donated buffers; donation matters (and works) on the GPU.
warnings.filterwarnings("ignore", message="Some donated buffers were not usable")


@dataclasses.dataclass
class TrainResult:
    run_dir: Path
    losses: list[float]
    eval_loss: float | None
    tokens_per_s: float
    params: Any = None  # final fp32 master weights (host or device arrays)


def resolve_compute_dtype(name: str) -> Any:
    """`auto` computes in bf16 on accelerators and fp32 on the CPU (XLA's CPU bf16 matmuls are slow)."""
    if name == "auto":
        return jnp.bfloat16 if jax.default_backend() != "cpu" else jnp.float32
    return jnp.dtype(name).type


def make_run_dir(cfg: Config) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    run_dir = Path(cfg.train.run_dir) / f"{cfg.model.name}-{stamp}"
    suffix = 1
    while run_dir.exists():
        run_dir = Path(cfg.train.run_dir) / f"{cfg.model.name}-{stamp}-{suffix}"
        suffix += 1
    run_dir.mkdir(parents=True)
    return run_dir


def make_trainer(cfg: Config, model, params32, compute_dtype):
    """The engine the config asks for; both expose step(batch), eval_loss(batch) and master_params()."""
    if cfg.train.engine is EngineKind.REFERENCE:
        from lohan_jax.reference import ReferenceTrainer
        return ReferenceTrainer(model, params32, cfg.optim, cfg.train.steps, compute_dtype)
    from lohan_jax.engine import OffloadEngine
    from lohan_jax.timeline import Timeline
    return OffloadEngine.from_config(cfg, model, params32, compute_dtype, timeline=Timeline(enabled=False))


def run_training(cfg: Config, run_dir: Path | None = None, progress: bool = True, resume: bool = False) -> TrainResult:
    """Train as `cfg` says. With resume=True, `run_dir` is an earlier run: its latest checkpoint is loaded and
    training continues from that step, appending to the same metrics file."""
    t = cfg.train
    compute_dtype = resolve_compute_dtype(t.compute_dtype)
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(t, compute_dtype=jnp.dtype(compute_dtype).name))
    attention = None if t.attention == "auto" else t.attention
    model = build_model(cfg.model, compute_dtype, attention)
    data = open_dataset(cfg.data.source, tokenizer=load_tokenizer(cfg.data.tokenizer), seq_len=t.seq_len,
                        batch_size=t.micro_batch_size, seed=t.seed, eval_fraction=cfg.data.eval_fraction,
                        token_dtype=cfg.data.token_dtype or None, vocab_size=cfg.model.vocab_size,
                        micro_batches=t.micro_batches)
    data.check_vocab(cfg.model.vocab_size)
    if cfg.hf.export_dir:  # [hf] fail now, not after the last step
        from lohan_jax.hf.training import check_export_dir
        check_export_dir(cfg)

    run_dir = Path(run_dir) if run_dir is not None else make_run_dir(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / "config.yaml")
    device = jax.devices()[0]
    (run_dir / "run.json").write_text(json.dumps(
        {"device": device.device_kind, "backend": jax.default_backend(), "jax_version": jax.__version__,
         "params": cfg.model.param_count()}, indent=1))

    if cfg.hf.checkpoint:  # [hf] the offload engine reads the checkpoint one unit at a time
        from lohan_jax.hf.training import initial_params
        params32 = initial_params(cfg, streamed=cfg.train.engine is EngineKind.OFFLOAD)
    else:
        params32 = model.init(jax.random.key(t.seed), t.seq_len)
    trainer = make_trainer(cfg, model, params32, compute_dtype)
    del params32
    if hasattr(trainer, "memory"):  # the offloaded engine's accounting and plan, next to the config
        run = json.loads((run_dir / "run.json").read_text())
        m = trainer.memory
        run.update({"mem/hbm_planned_gib": m.hbm_bytes / 2**30, "mem/host_pinned_gib": m.pinned_bytes / 2**30,
                    "mem/host_gib": m.ram_bytes / 2**30})
        (run_dir / "run.json").write_text(json.dumps(run, indent=1))
        trainer.plan.save(run_dir / "plan.json")
    try:
        ckpt = None
        start = 0
        if t.checkpoint_every or resume:
            from lohan_jax.checkpoint import Checkpointer
            ckpt = Checkpointer(run_dir / "checkpoints", max_to_keep=t.keep_checkpoints)
            if resume:
                start = ckpt.restore(trainer)
                log.info("resumed from step %d of %s", start, run_dir)
        return _loop(cfg, trainer, data, run_dir, device, progress, ckpt, start)
    finally:
        if hasattr(trainer, "close"):
            trainer.close()


def _loop(cfg: Config, trainer, data, run_dir: Path, device, progress: bool, ckpt=None, start: int = 0) -> TrainResult:
    t = cfg.train

    tokens_per_step = t.batch_size * t.seq_len
    s = cfg.model
    flops_6n = model_flops_per_token(s.nonembed_param_count(), s.n_layers, s.d_model, t.seq_len, s.vocab_size)
    flops_paper = paper_flops_per_token(s.n_layers, s.d_model, t.seq_len)
    peak = peak_tflops(device.device_kind)

    losses: list[float] = []
    step_times: list[float] = []
    bar = _progress(t.steps, progress)
    bar.update(start)
    with MetricsWriter(run_dir / "metrics.jsonl", stdout=False) as writer:
        pending, t_last = None, time.perf_counter()
        for step in range(start, t.steps + 1):
            traced = step == cfg.offload.timeline_step and hasattr(trainer, "timeline")
            if traced:
                trainer.timeline.clear()
                trainer.timeline.enabled = True
            out = trainer.step(step_batch(data, step, t.micro_batches)) if step < t.steps else None
            if ckpt is not None and out is not None and t.checkpoint_every and (
                    (step + 1) % t.checkpoint_every == 0 or step + 1 == t.steps):
                ckpt.save(step + 1, trainer, cfg)  # waits for the step's updates; batches resume from step + 1
            if traced:
                _write_timeline(trainer, out, run_dir, step)
            if pending is not None:  # read step-1's metrics only after step's work is dispatched
                prev, metrics = pending
                loss = float(metrics["loss"])
                now = time.perf_counter()
                step_s, t_last = now - t_last, now
                losses.append(loss)
                if prev > 0:  # step 0 includes compilation
                    step_times.append(step_s)
                row = {"train/loss": loss, "train/lr": float(metrics["lr"]),
                       "train/grad_norm": float(metrics["grad_norm"]), "perf/step_s": step_s,
                       "perf/tokens_per_s": tokens_per_step / step_s,
                       "perf/tflops": tokens_per_step * flops_6n / step_s / 1e12,
                       "perf/tflops_paper": tokens_per_step * flops_paper / step_s / 1e12}
                if peak:
                    row["perf/mfu"] = row["perf/tflops"] / peak
                row.update({k: float(v) for k, v in metrics.items() if k.startswith(("traffic/", "time/", "mem/", "disk/"))})
                if prev % t.log_every == 0 or prev == t.steps - 1:
                    writer.write(prev, row)
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{row['perf/tokens_per_s']:.0f}",
                                tflops=f"{row['perf/tflops']:.2f}",
                                **({"mfu": f"{row['perf/mfu']:.1%}"} if "perf/mfu" in row else {}))
                if t.eval_every and (prev + 1) % t.eval_every == 0 and prev + 1 < t.steps and data.num_eval_windows:
                    eval_now = _evaluate(trainer, data, t.eval_batches)
                    writer.write(prev, {"eval/loss": eval_now, "eval/ppl": _perplexity(eval_now)})
            pending = (step, out) if out is not None else None
        bar.close()
        eval_loss = _evaluate(trainer, data, t.eval_batches)
        median_s = float(np.median(step_times)) if step_times else float("nan")
        summary = {"eval/loss": eval_loss, "eval/ppl": _perplexity(eval_loss),
                   "perf/tokens_per_s": tokens_per_step / median_s,
                   "perf/tflops": tokens_per_step * flops_6n / median_s / 1e12,
                   "perf/tflops_paper": tokens_per_step * flops_paper / median_s / 1e12, "perf/step_s": median_s}
        if peak:
            summary["perf/mfu"] = summary["perf/tflops"] / peak
        writer.write(t.steps, summary)
    print(f"done: {t.steps} steps, loss {losses[0]:.3f} -> {losses[-1]:.3f}, eval loss {eval_loss:.3f}, "
          f"{summary['perf/tokens_per_s']:.0f} tokens/s, {summary['perf/tflops']:.3f} TFLOPS "
          f"({summary['perf/tflops_paper']:.3f} by the paper's convention); run dir {run_dir}")
    if cfg.hf.export_dir:  # [hf] unit by unit from the trainer's master weights
        from lohan_jax.hf.training import export_trained
        export_trained(cfg, trainer)
    params = trainer.master_params()
    return TrainResult(run_dir, losses, eval_loss, summary["perf/tokens_per_s"], params)


def _write_timeline(trainer, metrics, run_dir: Path, step: int) -> None:
    """Finish the traced step, then write its Perfetto trace, PNG and per-lane summary."""
    float(metrics["loss"])
    trainer.worker.drain()
    trainer.watcher.flush()
    trainer.timeline.enabled = False
    trainer.timeline.to_chrome_trace(run_dir / f"timeline-step{step}.json")
    trainer.timeline.plot(run_dir / f"timeline-step{step}.png", title=f"step {step}")
    (run_dir / f"timeline-step{step}-summary.json").write_text(json.dumps(trainer.timeline.summary(), indent=1))


def _evaluate(trainer, data, n_batches: int) -> float:
    if data.num_eval_windows == 0:  # data.eval_fraction=0: no held-out split, no evaluation
        return float("nan")
    batches = list(data.eval_batches(n_batches))
    losses = [float(trainer.eval_loss(step_batch(_Fixed(b), 0, 1))) for b in batches]
    counts = [float(b["loss_mask"].sum()) for b in batches]  # masked data: weight each batch by its loss tokens
    return float(np.average(losses, weights=counts)) if losses and sum(counts) > 0 else float("nan")


def _perplexity(loss: float) -> float:
    """exp(mean held-out token loss); capped so that a diverged run logs a huge number, not an overflow."""
    return float(np.exp(min(loss, 700.0))) if np.isfinite(loss) else float("nan")


class _Fixed:
    """Adapts one ready batch to the BatchSource protocol."""

    def __init__(self, batch):
        self._batch = batch

    def batch(self, step: int, micro: int = 0):
        return self._batch


def _progress(total: int, enabled: bool):
    from tqdm.auto import tqdm
    return tqdm(total=total, disable=not enabled, unit="step", dynamic_ncols=True)
