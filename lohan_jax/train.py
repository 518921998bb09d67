"""The training loop: build everything a config describes, run steps, report metrics into a run directory.

Nothing lost: checkpoints every train.checkpoint_every steps (asynchronous, atomic: lohan_jax.checkpoint);
SIGINT/SIGTERM checkpoint at the next step boundary and exit (lohan_jax.interrupts); a step with a non-finite
loss or gradient norm is skipped or stops the run (train.on_nonfinite; lohan_jax.engine.guard), and a step
torn by a non-finite gradient in the fast path is replayed from the last checkpoint and skipped exactly.
"""
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

from lohan_jax import faults
from lohan_jax.batches import step_batch
from lohan_jax.config import Config, EngineKind, OnNonFinite, save_config
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
    params: Any = None  # final fp32 master weights (host or device arrays), with run_training(keep_params=True)
    interrupted: str = ""  # the signal that stopped the run early ("" when it ran to the end)
    exit_status: int = 0  # 128 + the signal's number when interrupted (the CLI's exit status)
    skipped_steps: list[int] = dataclasses.field(default_factory=list)  # non-finite steps whose update was skipped


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
        return ReferenceTrainer(model, params32, cfg.optim, cfg.train.steps, compute_dtype,
                                guard_nonfinite=cfg.train.on_nonfinite is not OnNonFinite.OFF)
    from lohan_jax.engine import DataParallelEngine, OffloadEngine
    from lohan_jax.timeline import Timeline
    engine = DataParallelEngine if cfg.offload.devices > 1 else OffloadEngine
    return engine.from_config(cfg, model, params32, compute_dtype, timeline=Timeline(enabled=False))


def run_training(cfg: Config, run_dir: Path | None = None, progress: bool = True, resume: bool = False,
                 keep_params: bool = False) -> TrainResult:
    """Train as `cfg` says. With resume=True, `run_dir` is an earlier run: its latest checkpoint is loaded and
    training continues from that step, appending to the same metrics file. keep_params=True returns the final
    fp32 master weights in the result: a full copy in RAM, which a model near the size of RAM does not survive
    (the CLI never asks for it)."""
    from lohan_jax import determinism, preflight

    determinism.enable(cfg)  # a no-op when `lohan-jax train` has set it already
    t = cfg.train
    compute_dtype = resolve_compute_dtype(t.compute_dtype)
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(t, compute_dtype=jnp.dtype(compute_dtype).name))
    preflight.check_paths(cfg, run_dir, resume)  # one-line errors before anything is built
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
    if cfg.train.engine is EngineKind.OFFLOAD:  # the plan against free HBM, RAM and disk, before allocating
        preflight.check_memory(cfg, run_dir)

    run_dir = Path(run_dir) if run_dir is not None else make_run_dir(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    if resume:
        _drop_torn_metrics_line(run_dir / "metrics.jsonl")
    save_config(cfg, run_dir / "config.yaml")
    device = jax.devices()[0]
    (run_dir / "run.json").write_text(json.dumps(
        {"device": device.device_kind, "backend": jax.default_backend(), "jax_version": jax.__version__,
         "params": cfg.model.param_count(),
         "n_devices": cfg.offload.devices if cfg.train.engine is EngineKind.OFFLOAD else 1}, indent=1))

    ckpt = None
    if t.checkpoint_every or resume:
        from lohan_jax.checkpoint import Checkpointer
        ckpt = Checkpointer(run_dir / "checkpoints", max_to_keep=t.keep_checkpoints, async_save=t.checkpoint_async)
    if resume and ckpt.latest_step() is None:
        log.warning("no checkpoint in %s yet: starting %s from step 0", run_dir / "checkpoints", run_dir)
        resume = False
    offload = cfg.train.engine is EngineKind.OFFLOAD
    if resume:  # every value comes from the checkpoint: neither initialise nor read a HF checkpoint
        params32 = _placeholder_params(model, t.seq_len, offload)
    elif cfg.hf.checkpoint:  # [hf] the offload engine reads the checkpoint one unit at a time
        from lohan_jax.hf.training import initial_params
        params32 = initial_params(cfg, streamed=offload)
    elif offload:  # unit by unit into its tiers (the same values as model.init): no whole fp32 copy in RAM
        key = jax.random.key(t.seed)
        params32 = lambda k: model.init_unit(key, k, t.seq_len)
    else:
        params32 = model.init(jax.random.key(t.seed), t.seq_len)
    trainer = make_trainer(cfg, model, params32, compute_dtype)
    del params32
    faults.install(trainer)
    if hasattr(trainer, "memory"):  # the offloaded engine's accounting and plan, next to the config
        run = json.loads((run_dir / "run.json").read_text())
        m = trainer.memory
        run.update({"mem/hbm_planned_gib": m.hbm_bytes / 2**30, "mem/host_pinned_gib": m.pinned_bytes / 2**30,
                    "mem/host_gib": m.ram_bytes / 2**30})
        if device.platform == "gpu":  # XLA's cap on its pinned pool (lohan_jax.pinned_pool sets it from the plan)
            from lohan_jax.engine.memory import pinned_limit_nbytes
            run["mem/pinned_pool_limit_gib"] = pinned_limit_nbytes() / 2**30
        (run_dir / "run.json").write_text(json.dumps(run, indent=1))
        trainer.plan.save(run_dir / "plan.json")
    try:
        start = 0
        if resume:
            start = ckpt.restore(trainer)
            log.info("resumed from step %d of %s", start, run_dir)
        result = _loop(cfg, trainer, data, run_dir, device, progress, ckpt, start)
        if keep_params and not result.interrupted:
            result.params = trainer.master_params()
        return result
    finally:
        try:
            if ckpt is not None:
                ckpt.close()  # a save in flight completes (or its error is raised) before the process ends
        finally:
            if hasattr(trainer, "close"):
                trainer.close()


def _drop_torn_metrics_line(path: Path) -> None:
    """A run killed while writing a metrics row leaves half a line; cut it before appending more."""
    if path.exists() and path.stat().st_size:
        data = path.read_bytes()
        if not data.endswith(b"\n"):
            with open(path, "r+b") as f:
                f.truncate(data.rfind(b"\n") + 1)


def _placeholder_params(model, seq_len: int, per_unit: bool):
    """Zeros of the parameters' shapes, for a trainer whose state a checkpoint is about to replace."""
    abstract: dict[int, Any] = {}

    def unit(k: int) -> Any:
        kind = 0 if k == 0 else model.n_layers + 1 if k == model.n_layers + 1 else 1  # blocks share one shape
        if kind not in abstract:
            abstract[kind] = jax.eval_shape(lambda: model.init_unit(jax.random.key(0), kind, seq_len))
        return jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), abstract[kind])

    if per_unit:
        return unit
    units = [unit(k) for k in range(model.n_layers + 2)]
    return {"embed": units[0], "blocks": units[1:-1], "head": units[-1]}


def _loop(cfg: Config, trainer, data, run_dir: Path, device, progress: bool, ckpt=None, start: int = 0) -> TrainResult:
    from lohan_jax.interrupts import GracefulStop

    t = cfg.train
    tokens_per_step = t.batch_size * t.seq_len
    s = cfg.model
    flops_6n = model_flops_per_token(s.nonembed_param_count(), s.n_layers, s.d_model, t.seq_len, s.vocab_size)
    flops_paper = paper_flops_per_token(s.n_layers, s.d_model, t.seq_len)
    peak = peak_tflops(device.device_kind)
    if peak and cfg.train.engine is EngineKind.OFFLOAD:
        peak *= cfg.offload.devices  # MFU of all the GPUs the step runs on

    losses: dict[int, float] = {}
    step_times: list[float] = []
    skipped: list[int] = []
    replay_deferred: set[int] = set()  # torn steps: replayed with their updates held back
    checks: dict[int, Any] = {}  # step -> its non-finite verdict, until read
    bar = _progress(t.steps, progress)
    bar.update(start)

    def report(step: int, metrics: dict, writer: MetricsWriter, step_s: float) -> None:
        check = metrics.get("nonfinite")
        if check is not None and check.torn:
            raise faults.TornStepError(f"a non-finite gradient in {check.unit} after updates of the same step were "
                                       "applied", step=step, unit=check.unit)
        loss = float(metrics["loss"])
        row = {"train/loss": loss, "train/lr": float(metrics["lr"]),
               "train/grad_norm": float(metrics["grad_norm"]), "perf/step_s": step_s,
               "perf/tokens_per_s": tokens_per_step / step_s,
               "perf/tflops": tokens_per_step * flops_6n / step_s / 1e12,
               "perf/tflops_paper": tokens_per_step * flops_paper / step_s / 1e12}
        if peak:
            row["perf/mfu"] = row["perf/tflops"] / peak
        row.update({k: float(v) for k, v in metrics.items() if k.startswith(("traffic/", "time/", "mem/", "disk/"))})
        if check is not None and not check.ok:
            row.update({"train/skipped": int(check.skipped), "train/nonfinite_unit": check.unit or "unknown"})
        if step % t.log_every == 0 or step == t.steps - 1 or "train/skipped" in row:
            writer.write(step, row)
        if check is not None and not check.ok:
            _on_nonfinite(cfg, step, check, ckpt)
            if step not in skipped:
                skipped.append(step)
        checks.pop(step, None)
        losses[step] = loss
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{row['perf/tokens_per_s']:.0f}", tflops=f"{row['perf/tflops']:.2f}",
                        **({"mfu": f"{row['perf/mfu']:.1%}"} if "perf/mfu" in row else {}))
        if t.eval_every and (step + 1) % t.eval_every == 0 and step + 1 < t.steps and data.num_eval_windows:
            eval_now = _evaluate(trainer, data, t.eval_batches)
            writer.write(step, {"eval/loss": eval_now, "eval/ppl": _perplexity(eval_now)})

    with MetricsWriter(run_dir / "metrics.jsonl", stdout=False) as writer, GracefulStop() as stop:
        pending, step, saved = None, start, start
        save_after = set(t.checkpoint_steps(start))
        dispatched = {start - 1: time.perf_counter()}  # step -> when its dispatch returned

        def flush(done: int, metrics: dict) -> None:
            # dispatch to dispatch: each step() returns once the engine can take the next one
            step_s = dispatched[done] - dispatched[done - 1]
            if done > start:  # the first step includes compilation
                step_times.append(step_s)
            report(done, metrics, writer, step_s)

        while True:
            try:
                out = None
                if stop.requested and saved != step:  # stopping: checkpoint every step dispatched so far
                    if pending is not None:  # its row first, as below
                        flush(*pending)
                        pending = None
                    ckpt = ckpt or _checkpointer(cfg, run_dir)
                    ckpt.save(step, trainer, cfg)
                    saved = step
                if step < t.steps and not stop.requested:
                    faults.hit("step")
                    traced = step == cfg.offload.timeline_step and hasattr(trainer, "timeline")
                    if traced:
                        trainer.timeline.clear()
                        trainer.timeline.enabled = True
                    trainer.defer_updates = step in replay_deferred
                    out = trainer.step(step_batch(data, step, t.micro_batches))
                    dispatched[step] = time.perf_counter()
                    checks[step] = out.get("nonfinite")
                    if traced:
                        _write_timeline(trainer, out, run_dir, step)
                if pending is not None:  # read step-1's metrics only after step's work is dispatched
                    flush(*pending)
                pending = (step, out) if out is not None else None
                if out is not None and step + 1 in save_after:  # its row first: a kill after the checkpoint's
                    flush(*pending)  # commit must not lose it (the save waits for the step's updates anyway)
                    pending = None
                    ckpt.save(step + 1, trainer, cfg)  # batches resume from step + 1
                    saved = step + 1
                if out is None and (saved == step or not stop.requested):
                    break
                step += 1 if out is not None else 0
            except faults.TornStepError as e:  # lohan_jax.engine.guard: replay from the last checkpoint
                torn = e.step if e.step is not None else min(
                    (k for k, c in checks.items() if c is not None and c.torn), default=step)
                if torn in replay_deferred:  # the replay held the updates back and still tore: never loop
                    raise faults.NonFiniteError(f"step {torn}: {e}, again after a replay", step=torn) from None
                step, pending = _replay_torn(cfg, trainer, ckpt, torn, e), None
                replay_deferred.add(torn)
                checks.clear()
                dispatched = {step - 1: time.perf_counter()}
        bar.close()
        if stop.requested and step < t.steps:
            where = "nothing to save"
            if ckpt is not None:
                ckpt.wait()
                where = f"checkpoint {step} saved in {ckpt.directory}"
            print(f"stopped by {stop.name} after {step} of {t.steps} steps; {where}; continue with: "
                  f"lohan-jax train --resume {run_dir}")
            return TrainResult(run_dir, [losses[k] for k in sorted(losses)], None, float("nan"),
                               interrupted=stop.name, exit_status=stop.exit_status, skipped_steps=skipped)
        eval_loss = _evaluate(trainer, data, t.eval_batches)
        median_s = float(np.median(step_times)) if step_times else float("nan")
        summary = {"eval/loss": eval_loss, "eval/ppl": _perplexity(eval_loss),
                   "perf/tokens_per_s": tokens_per_step / median_s,
                   "perf/tflops": tokens_per_step * flops_6n / median_s / 1e12,
                   "perf/tflops_paper": tokens_per_step * flops_paper / median_s / 1e12, "perf/step_s": median_s}
        if skipped:
            summary["train/skipped_steps"] = len(skipped)
        if peak:
            summary["perf/mfu"] = summary["perf/tflops"] / peak
        predicted = getattr(getattr(trainer, "plan", None), "predicted_step_s", None)
        if predicted:  # plan: auto (or a saved planner plan): the planner's step time next to the measured one
            summary["perf/predicted_step_s"] = predicted
            summary["perf/predicted_error"] = predicted / median_s - 1
        writer.write(t.steps, summary)
    loss_list = [losses[k] for k in sorted(losses)]
    first, last = (f"{loss_list[0]:.3f}", f"{loss_list[-1]:.3f}") if loss_list else ("-", "-")
    print(f"done: {t.steps} steps, loss {first} -> {last}, eval loss {eval_loss:.3f}, "
          f"{summary['perf/tokens_per_s']:.0f} tokens/s, {summary['perf/tflops']:.3f} TFLOPS "
          f"({summary['perf/tflops_paper']:.3f} by the paper's convention); run dir {run_dir}"
          + (f"; {len(skipped)} non-finite steps skipped" if skipped else "")
          + (f"; step {summary['perf/step_s']:.3f} s measured, {summary['perf/predicted_step_s']:.3f} s predicted "
             f"({summary['perf/predicted_error']:+.1%})" if "perf/predicted_step_s" in summary else ""))
    if cfg.hf.export_dir:  # [hf] unit by unit from the trainer's master weights
        from lohan_jax.hf.training import export_trained
        export_trained(cfg, trainer)
    return TrainResult(run_dir, loss_list, eval_loss, summary["perf/tokens_per_s"], skipped_steps=skipped)


def _checkpointer(cfg: Config, run_dir: Path):
    from lohan_jax.checkpoint import Checkpointer
    return Checkpointer(run_dir / "checkpoints", max_to_keep=cfg.train.keep_checkpoints,
                        async_save=cfg.train.checkpoint_async)


def _on_nonfinite(cfg: Config, step: int, check: Any, ckpt) -> None:
    """A skipped step: logged (the metrics row has train/skipped), or the end of the run if the policy is stop."""
    what = "loss" if check.unit == "loss" else f"gradient (first in {check.unit or 'an unknown unit'})"
    if cfg.train.on_nonfinite is OnNonFinite.STOP:
        last = ckpt.latest_step() if ckpt is not None else None
        raise faults.NonFiniteError(
            f"step {step}: non-finite {what}; no update of it was applied and train.on_nonfinite=stop ends the run "
            + (f"(the last checkpoint, step {last}, is intact)" if last is not None else "(no checkpoint was saved)"),
            step=step, unit=check.unit)
    log.warning("step %d: non-finite %s: its update was skipped (Adam's step count unchanged)", step, what)


def _replay_torn(cfg: Config, trainer, ckpt, step: int, error: faults.TornStepError) -> int:
    """Reload the last checkpoint (at or before `step`) and return the step to continue from; the loop then
    replays up to `step` with its updates held back, which skips it exactly."""
    last = ckpt.latest_step() if ckpt is not None else None
    if cfg.train.on_nonfinite is OnNonFinite.STOP or last is None or last > step:
        why = ("train.on_nonfinite=stop" if cfg.train.on_nonfinite is OnNonFinite.STOP else
               "there is no checkpoint to replay it from (set train.checkpoint_every, or optim.clip_norm > 0 so "
               "that updates wait for the gradient norm and such a step is skipped in place)")
        raise faults.NonFiniteError(f"step {step}: {error}; the run stops: {why}", step=step, unit=error.unit) from None
    resumed = ckpt.restore(trainer)
    log.warning("step %d: %s; replaying from the checkpoint of step %d to skip it exactly", step, error, resumed)
    return resumed


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
