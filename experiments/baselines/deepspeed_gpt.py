"""Question: how fast do DeepSpeed ZeRO-2 with CPU optimizer offload (ZeRO-Offload: `deepspeed_zero_offload`) and
ZeRO-3 with CPU parameter and optimizer offload (`deepspeed_zero3_cpu`) train the paper's GPT shapes on this
machine, at lohan_jax's batch, sequence length, precision (bf16, fp32 master) and data (synthetic tokens)?

An optional baseline: deepspeed is not a dependency of lohan_jax (the wheels travel in .whl/, see
experiments/README.md). The model is transformers' GPT-2 with the registry shape (hidden, layers, heads, seq,
vocab; exact GELU, no dropout, tied embedding: the same parameter count), activation checkpointing on, SDPA
attention. One configuration per call, single process without a launcher (world size 1). Training runs in a
child process, so a CUDA OOM, a crash or the host's OOM killer becomes a result row (status oom/failed, with
its cause and the phase it died in) instead of taking the study down. Configurations that certainly cannot fit
the host's RAM are refused before starting (status oom, attempted: false); --no-precheck runs them anyway.

  python experiments/baselines/deepspeed_gpt.py --system deepspeed_zero_offload --model paper-6b --batch 8,16,32 \
      --gpu-budget-gib 24
  python experiments/baselines/deepspeed_gpt.py --system deepspeed_zero3_cpu --model paper-13b --batch 8 --dry-run
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
GIB = 2**30
SYSTEMS = ("deepspeed_zero_offload", "deepspeed_zero3_cpu")
# Host bytes per parameter that each system keeps in (pinned) RAM: fp32 master 4 + Adam m, v 8 + the fp32
# gradient partition 4 (ZeRO-2 offload), + the bf16 parameters themselves 2 under ZeRO-3 param offload.
# DeepSpeed's own estimators (estimate_zero{2,3}_model_states_mem_needs) say 16 and 18 x 1.5 buffer factor;
# the precheck uses the bare 16 / 18 so it refuses only what certainly cannot fit.
HOST_BYTES_PER_PARAM = {"deepspeed_zero_offload": 16, "deepspeed_zero3_cpu": 18}
RUNTIME_HOST_GIB = 6.0  # torch + CUDA context + deepspeed's pinned staging buffers (a guess, not measured)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--system", choices=SYSTEMS, default="deepspeed_zero_offload")
    p.add_argument("--model", default="paper-6b", help="a lohan_jax registry name of the GPT family")
    p.add_argument("--layers", type=int, default=0, help="override the number of blocks (0: the model's)")
    p.add_argument("--batch", type=_batches, default=[8],
                   help="sequences per optimizer step (one micro-batch); a list (8,16,32) sweeps them in one process, "
                        "ascending, stopping at the first GPU OOM (one row each)")
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--steps", type=int, default=3, help="optimizer steps in all, warm-up included")
    p.add_argument("--warmup", type=int, default=1, help="steps left out of the median")
    p.add_argument("--gpu-budget-gib", type=float, default=0.0,
                   help="cap PyTorch's GPU memory (torch.cuda.set_per_process_memory_fraction); 0: the whole card")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds before the child is stopped")
    p.add_argument("--experiment", default="baseline_throughput")
    p.add_argument("--out", default="experiments/results/baseline_throughput.jsonl")
    p.add_argument("--log", default="", help="the child's stdout+stderr go here (default: a temporary file)")
    p.add_argument("--timeline", default="",
                   help="directory for one more step per batch, after the timed ones, traced by torch.profiler: "
                        "<system>-<model>-b<batch>-<cap>gib.png and .trace.json, figures in the row")
    p.add_argument("--dry-run", action="store_true", help="print the DeepSpeed config and model size; run nothing")
    p.add_argument("--no-precheck", action="store_true", help="run even what the host-RAM estimate says cannot fit")
    p.add_argument("--torch-adam", action="store_true",
                   help="torch.optim.AdamW on the CPU instead of DeepSpeedCPUAdam (used automatically, and recorded "
                        "as cpu_optimizer, when DeepSpeedCPUAdam fails to JIT-build)")
    p.add_argument("--worker", default="", help=argparse.SUPPRESS)  # internal: the child writes its result here
    args = p.parse_args(argv)
    if not 0 <= args.warmup < args.steps:
        p.error(f"--warmup {args.warmup} must be in [0, --steps {args.steps})")
    return args


def _batches(text: str) -> list[int]:
    try:
        values = sorted({int(v) for v in text.split(",") if v.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"--batch {text!r}: integers, comma-separated (e.g. 8,16,32)") from None
    if not values or values[0] < 1:
        raise argparse.ArgumentTypeError(f"--batch {text!r}: positive integers")
    return values


def build_ds_config(system: str, batch: int, *, torch_adam: bool = False, lr: float = 1e-4, b1: float = 0.9,
                    b2: float = 0.95, eps: float = 1e-8, weight_decay: float = 0.1) -> dict:
    """The DeepSpeed config of `system`: bf16 with fp32 master, DeepSpeed's CPU AdamW (its AVX kernel, chosen
    for an AdamW optimizer with offload_optimizer on the CPU; torch's AdamW with torch_adam), lohan_jax's
    optimizer hyper-parameters."""
    offload = {"device": "cpu", "pin_memory": True}
    if system == "deepspeed_zero_offload":
        zero = {"stage": 2, "offload_optimizer": offload, "contiguous_gradients": True, "overlap_comm": True,
                "reduce_scatter": True, "reduce_bucket_size": int(2e8), "allgather_bucket_size": int(2e8)}
    elif system == "deepspeed_zero3_cpu":
        zero = {"stage": 3, "offload_optimizer": offload, "offload_param": dict(offload), "contiguous_gradients": True,
                "overlap_comm": True, "reduce_bucket_size": int(2e8), "stage3_prefetch_bucket_size": int(5e7),
                "stage3_param_persistence_threshold": int(1e5), "stage3_max_live_parameters": int(1e9),
                "stage3_max_reuse_distance": int(1e9), "sub_group_size": int(1e9)}
    else:
        raise ValueError(f"unknown system {system!r}; known: {', '.join(SYSTEMS)}")
    return {"train_batch_size": batch, "train_micro_batch_size_per_gpu": batch, "gradient_accumulation_steps": 1,
            "bf16": {"enabled": True}, "zero_optimization": zero, "gradient_clipping": 0.0,
            "optimizer": {"type": "AdamW", "params": {"lr": lr, "betas": [b1, b2], "eps": eps,
                                                      "weight_decay": weight_decay,
                                                      **({"torch_adam": True} if torch_adam else {})}},
            "steps_per_print": 10**9, "wall_clock_breakdown": False}


def hf_gpt2_config(spec, seq_len: int):
    """transformers' GPT-2 config with the registry shape (same parameter count as lohan_jax's GPT)."""
    from transformers import GPT2Config

    if getattr(spec.arch, "value", spec.arch) != "gpt" or spec.ff_dim != 4 * spec.d_model or not spec.tie_embeddings:
        raise ValueError(f"{spec.name}: only GPT shapes with d_ff = 4 * d_model and a tied head map onto GPT-2")
    act = {"gelu": "gelu", "gelu_tanh": "gelu_new", "relu": "relu"}[getattr(spec.activation, "value", spec.activation)]
    return GPT2Config(vocab_size=spec.vocab_size, n_positions=max(seq_len, spec.max_seq_len), n_embd=spec.d_model,
                      n_layer=spec.n_layers, n_head=spec.n_heads, activation_function=act,
                      layer_norm_epsilon=spec.norm_eps, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                      initializer_range=spec.init_std, use_cache=False, attn_implementation="sdpa")


def host_need_gib(system: str, n_params: int) -> float:
    return HOST_BYTES_PER_PARAM[system] * n_params / GIB + RUNTIME_HOST_GIB


def _spec(args):
    sys.path.insert(0, str(REPO))
    from lohan_jax.models.registry import get_spec

    return get_spec(args.model, **({"n_layers": args.layers} if args.layers else {}))


def main(argv=None) -> int:
    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # lohan_jax's helpers import jax: keep it off the GPU
    args = parse_args(argv)
    if args.worker:
        return worker(args)
    spec = _spec(args)
    if args.dry_run:
        return dry_run(args, spec, build_ds_config(args.system, args.batch[0], torch_adam=args.torch_adam))
    from lohan_jax.metrics import append_result, model_flops_per_token, paper_flops_per_token
    from lohan_jax.planner.profile import available_ram_gib

    n = spec.param_count()
    need, avail = host_need_gib(args.system, n), available_ram_gib()
    if not args.no_precheck and avail and need > avail:
        results = [{"status": "oom", "attempted": False, "error": (
            f"not attempted: {args.system} keeps {HOST_BYTES_PER_PARAM[args.system]} bytes/param in host RAM, "
            f"{need:.0f} GiB for {n / 1e9:.2f}B params (+{RUNTIME_HOST_GIB:.0f} runtime), {avail:.0f} GiB available "
            "(DeepSpeed's own estimator asks 1.5x that); --no-precheck runs it anyway")} for _ in args.batch]
    else:
        argv = list(argv if argv is not None else sys.argv[1:])
        results = run_child(args, argv)
        failed = results[0].get("status") == "failed" and not args.torch_adam
        if failed and any(k in str(results[0].get("error", "")) for k in _BUILD_FAILURE):
            why = str(results[0]["error"])[:300]
            args.torch_adam = True
            results = run_child(args, [*argv, "--torch-adam"])
            for r in results:
                r["cpu_optimizer"] = f"torch.optim.AdamW (DeepSpeedCPUAdam did not build: {why})"
    total_mib = _nvidia_smi("memory.total")
    f6 = model_flops_per_token(spec.nonembed_param_count(), spec.n_layers, spec.d_model, args.seq, spec.vocab_size)
    fp = paper_flops_per_token(spec.n_layers, spec.d_model, args.seq)
    ok = True
    for batch, res in zip(args.batch, results, strict=True):
        row = {"experiment": args.experiment, "system": args.system, "model": args.model, "params": n,
               "seq_len": args.seq, "batch_tokens": batch * args.seq, "n_gpus": 1, "steps": args.steps,
               "host_need_estimate_gib": round(need, 1), **res}
        row["gpu_budget_gib"] = args.gpu_budget_gib or row.get("gpu_total_gib") or (
            float(total_mib) / 1024 if total_mib else None)
        if row.get("step_s"):
            tokens = batch * args.seq
            row.update(tokens_per_s=tokens / row["step_s"], tflops_6n=tokens * f6 / row["step_s"] / 1e12,
                       tflops_paper=tokens * fp / row["step_s"] / 1e12)
        row.setdefault("device", _nvidia_smi("name") or "unknown")
        row["command"] = " ".join(["python", *sys.argv])
        row = append_result(args.out, row)
        ok = ok and row.get("status") == "ok"
        print(json.dumps(row, indent=1, default=str))
    return 0 if ok else 1


def dry_run(args, spec, config) -> int:
    n = spec.param_count()
    print(f"# {args.system}: {args.model} ({n / 1e9:.3f}B params: {spec.n_layers} layers, hidden {spec.d_model}, "
          f"{spec.n_heads} heads, vocab {spec.vocab_size}), batch {','.join(map(str, args.batch))} x {args.seq}, "
          f"GPU cap {args.gpu_budget_gib or 'whole card'}")
    print(json.dumps(config, indent=1))
    print(f"# host RAM estimate {host_need_gib(args.system, n):.1f} GiB "
          f"({HOST_BYTES_PER_PARAM[args.system]} B/param + {RUNTIME_HOST_GIB:.0f} GiB runtime)")
    try:
        import torch
        from transformers import GPT2LMHeadModel

        cfg = hf_gpt2_config(spec, args.seq)
        with torch.device("meta"):
            hf = GPT2LMHeadModel(cfg)
        n_hf = sum(p.numel() for p in hf.parameters())
        print(f"# transformers GPT-2 ({cfg.activation_function}, {cfg._attn_implementation}): {n_hf} params "
              f"({'equal to' if n_hf == n else 'DIFFERENT from'} lohan_jax's {n})")
    except ImportError as e:
        print(f"# transformers/torch not importable here ({e}); skipped the GPT-2 parameter count")
    try:
        from deepspeed.runtime.config import DeepSpeedConfig

        ds = DeepSpeedConfig(config)
        version = __import__("deepspeed").__version__
        print(f"# validated by deepspeed {version}: ZeRO stage {ds.zero_optimization_stage}, "
              f"optimizer {ds.optimizer_name}, offload_optimizer {ds.zero_config.offload_optimizer.device}, "
              f"offload_param {ds.zero_config.offload_param.device if ds.zero_config.offload_param else None}")
    except ImportError:
        print("# deepspeed not importable here: config not validated (install the wheels in .whl/)")
    argv = [a for a in sys.argv[1:] if a != "--dry-run"]
    print("# child: " + " ".join([sys.executable, __file__, *argv, "--worker", "RESULT.json"]))
    return 0


# ---- the parent: run the child, turn its end into a result ----------------------------------------------
def _oom_first(argv: list[str]) -> list[str]:
    """argv run by a shell that first makes itself (then exec's the command) the host OOM killer's first choice,
    so it never picks the study above us (no preexec_fn: this process has jax's threads)."""
    return ["sh", "-c", 'echo 1000 > /proc/self/oom_score_adj 2>/dev/null; exec "$@"', "sh", *argv]


def run_child(args, argv: list[str]) -> list[dict]:
    """One result per batch: the child's, or the cause of its end (OOM kill, timeout, crash) for the batch it
    was on and 'not attempted' for those after it."""
    import importlib.util

    if importlib.util.find_spec("deepspeed") is None:
        return [{"status": "failed", "error": "deepspeed is not installed: install the wheels of .whl/ "
                                              "(see experiments/README.md, 'Baselines')"} for _ in args.batch]
    tmp = Path(tempfile.mkdtemp(prefix="ds_run_"))
    result, progress = tmp / "result.json", tmp / "result.json.progress"
    log_path = Path(args.log) if args.log else tmp / "child.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), *argv, "--worker", str(result)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "NCCL_NVLS_ENABLE": "0", "JAX_PLATFORMS": "cpu"}
    t0 = time.monotonic()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(_oom_first(cmd), stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        try:
            rc = proc.wait(timeout=args.timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = None
            proc.wait()
    wall = time.monotonic() - t0
    done = json.loads(result.read_text()) if result.exists() else []  # rewritten after every batch
    for r in done:
        r.update(wall_s=round(wall, 1), log=str(log_path))
    if len(done) == len(args.batch) or (done and done[-1].get("status") != "ok"):
        return done + [_not_attempted(b, done[-1]) for b in args.batch[len(done):]]
    phase = progress.read_text().strip() if progress.exists() else "start"
    tail = log_path.read_text(errors="replace")[-800:] if log_path.exists() else ""
    if rc is None:
        end = {"status": "failed", "error": f"timeout: stopped after {args.timeout:.0f} s, in phase '{phase}'"}
    elif rc == -signal.SIGKILL:
        end = {"status": "oom", "error": f"killed by SIGKILL after {wall:.0f} s in phase '{phase}': the host's OOM "
                                         f"killer{_dmesg_oom(proc.pid)} (no other sender here)"}
    else:
        end = {"status": "failed", "error": f"child exited with {rc} in phase '{phase}': {tail}"}
    end.update(wall_s=round(wall, 1), log=str(log_path))
    return done + [end] + [_not_attempted(b, end) for b in args.batch[len(done) + 1:]]


# what a failed JIT build of DeepSpeedCPUAdam says (torch.utils.cpp_extension, ninja, a missing compiler or header)
_BUILD_FAILURE = ("Error building extension", "cpu_adam", "ninja", "Python.h", "No such file or directory: 'c++'",
                  "CalledProcessError")


def _not_attempted(batch: int, last: dict) -> dict:
    return {"status": last.get("status", "failed"), "attempted": False,
            "error": f"not attempted: a smaller batch already ended with {last.get('status')} "
                     f"({str(last.get('error', ''))[:300]})"}


def _dmesg_oom(pid: int) -> str:
    try:
        text = subprocess.run(["dmesg"], capture_output=True, text=True, timeout=5).stdout
    except (OSError, subprocess.SubprocessError):
        return ""
    lines = [ln for ln in text.splitlines() if f"Killed process {pid}" in ln]
    return f" ({lines[-1].strip()[-200:]})" if lines else ""


def _nvidia_smi(field: str) -> str:
    """One field of the first GPU (name, memory.total in MiB), or "" without a GPU."""
    try:
        return subprocess.run(["nvidia-smi", f"--query-gpu={field}", "--format=csv,noheader,nounits"],
                              capture_output=True, text=True, timeout=10, check=True).stdout.strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        return ""


# ---- the child: DeepSpeed training ------------------------------------------------------------------------
class _Progress:
    """The phase and RSS, rewritten every 2 s to a side file: what the parent reports if we are killed."""

    def __init__(self, path: str):
        self.path, self.phase = Path(path + ".progress"), "start"
        threading.Thread(target=self._beat, daemon=True).start()

    def set(self, phase: str) -> None:
        self.phase = phase
        self._write()
        print(f"[{time.strftime('%H:%M:%S')}] {phase} (rss {_rss_gib():.1f} GiB)", flush=True)

    def _write(self) -> None:
        self.path.write_text(f"{self.phase} (rss {_rss_gib():.1f} GiB)")

    def _beat(self) -> None:
        while True:
            time.sleep(2.0)
            self._write()


def _rss_gib() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024 / GIB
    except OSError:
        pass
    return 0.0


def worker(args) -> int:
    for k, v in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(29500 + os.getpid() % 1000), "RANK": "0",
                 "LOCAL_RANK": "0", "WORLD_SIZE": "1", "DS_ACCELERATOR": "cuda"}.items():
        os.environ.setdefault(k, v)
    progress = _Progress(args.worker)
    results: list[dict] = []

    def save(result: dict) -> None:  # after every batch, so a later kill keeps the finished ones
        results.append({**result, "host_rss_peak_gib": _peak_rss_gib()})
        Path(args.worker).write_text(json.dumps(results))

    try:
        for result in train(args, progress):
            save(result)
    except Exception as e:  # failures are results too
        import traceback

        traceback.print_exc()
        msg = f"{type(e).__name__}: {e}"
        oom = "out of memory" in msg.lower() or type(e).__name__ == "OutOfMemoryError"
        save({"status": "oom" if oom else "failed", "error": f"in phase '{progress.phase}': {msg[:1500]}"})
    return 0


def train(args, progress: _Progress):
    """Builds the DeepSpeed engine once, then yields one result per batch size (ascending)."""
    progress.set("import")
    import deepspeed
    import numpy as np
    import torch
    import transformers
    from transformers import GPT2LMHeadModel

    spec = _spec(args)
    config = build_ds_config(args.system, args.batch[0], torch_adam=args.torch_adam)
    progress.set("CUDA and process-group setup")
    torch.cuda.set_device(0)
    total = torch.cuda.get_device_properties(0).total_memory
    if args.gpu_budget_gib:
        torch.cuda.set_per_process_memory_fraction(min(args.gpu_budget_gib * GIB / total, 1.0))
    deepspeed.init_distributed(dist_backend="nccl", auto_mpi_discovery=False, verbose=False)
    info = {"device": torch.cuda.get_device_name(0), "torch_version": torch.__version__,
            "deepspeed_version": deepspeed.__version__, "transformers_version": transformers.__version__,
            "gpu_total_gib": total / GIB,
            "cpu_optimizer": "torch.optim.AdamW" if args.torch_adam else "DeepSpeedCPUAdam"}
    progress.set("build model")
    t0 = time.perf_counter()
    hf_config = hf_gpt2_config(spec, args.seq)
    if args.system == "deepspeed_zero3_cpu":  # built under zero.Init: each module partitioned to the CPU
        try:  # transformers' integration (needs accelerate): also initialises the partitioned weights properly
            from transformers.integrations import HfDeepSpeedConfig

            zero3_marker = HfDeepSpeedConfig(config)  # noqa: F841 (must stay alive while the model is built)
            model = GPT2LMHeadModel._from_config(hf_config, dtype=torch.bfloat16)
        except ImportError as e:  # bare zero.Init: same shapes and speed, transformers' init skipped
            print(f"HfDeepSpeedConfig unavailable ({e}); building under deepspeed.zero.Init", flush=True)
            with deepspeed.zero.Init(config_dict_or_path=config, dtype=torch.bfloat16):
                model = GPT2LMHeadModel._from_config(hf_config, dtype=torch.bfloat16)
    else:  # ZeRO-2 keeps the bf16 model on the GPU: create it there, in bf16 (no fp32 copy on the device)
        with torch.device("cuda"):
            model = GPT2LMHeadModel._from_config(hf_config, dtype=torch.bfloat16)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    info["hf_params"] = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in model.parameters())
    progress.set("deepspeed.initialize (JIT-builds cpu_adam the first time)")
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
    info["init_s"] = time.perf_counter() - t0
    sys.path.insert(0, str(REPO))
    from lohan_jax.data import open_dataset

    for batch in args.batch:  # the engine's buffers are sized by the parameters: any batch runs on it
        data = open_dataset("synthetic", seq_len=args.seq, batch_size=batch, seed=0, vocab_size=spec.vocab_size)
        times, losses = [], []
        torch.cuda.reset_peak_memory_stats()
        try:
            for s in range(args.steps):
                progress.set(f"batch {batch}, step {s}")
                tokens = torch.from_numpy(np.asarray(data.batch(s)["tokens"], np.int64)).cuda()
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                loss = engine(input_ids=tokens, labels=tokens).loss
                engine.backward(loss)
                engine.step()
                torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
                losses.append(loss.item())
                print(f"batch {batch} step {s}: loss {losses[-1]:.4f} in {times[-1]:.3f}s", flush=True)
        except torch.cuda.OutOfMemoryError as e:
            yield {**info, "status": "oom", "error": f"batch {batch}, step {len(times)}: {str(e)[:1200]}"}
            return
        result = {**info, "status": "ok", "step_s": statistics.median(times[args.warmup:]), "step_times_s": times,
                  "losses": losses, "gpu_peak_allocated_gib": torch.cuda.max_memory_allocated() / GIB}
        if args.timeline:  # a trace that fails is noted in the row; the measurement stands
            progress.set(f"batch {batch}, traced step")
            tokens = torch.from_numpy(np.asarray(data.batch(args.steps)["tokens"], np.int64)).cuda()

            def one_step(tokens=tokens):
                engine.backward(engine(input_ids=tokens, labels=tokens).loss)
                engine.step()
                torch.cuda.synchronize()

            try:
                result.update(trace_step(one_step, Path(args.timeline), f"{args.system}-{args.model}-b{batch}-"
                                         f"{args.gpu_budget_gib:g}gib", f"{args.system} {args.model} batch "
                                         f"{batch}x{args.seq}: one step (torch.profiler)"))
            except Exception as e:
                result["timeline_error"] = f"{type(e).__name__}: {e}"[:500]
        yield result


def trace_step(step, out_dir: Path, stem: str, title: str) -> dict:
    """`step()` (one optimizer step, synchronised) once under torch.profiler (CPU, and CUDA where there is one):
    its kernels, copies and host optimizer in lohan_jax's lanes; PNG, trace and the figures for the row."""
    import torch

    sys.path.insert(0, str(REPO))
    from lohan_jax.timeline import STEP_MARKER, timeline_from_trace, write_step_timeline

    activities = [torch.profiler.ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with tempfile.TemporaryDirectory() as tmp:
        with torch.profiler.profile(activities=activities) as prof, torch.profiler.record_function(STEP_MARKER):
            step()
        raw = Path(tmp) / "torch_trace.json"
        prof.export_chrome_trace(str(raw))
        timeline = timeline_from_trace(raw, window=STEP_MARKER)
    if torch.cuda.is_available() and "gpu" not in timeline.lanes():
        raise RuntimeError("torch.profiler recorded no GPU kernel in the step (CUPTI unavailable?)")
    return write_step_timeline(timeline, out_dir, stem, title)


def _peak_rss_gib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


if __name__ == "__main__":
    sys.exit(main())
