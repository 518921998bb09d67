"""Question: does a >= 6B run with some blocks' optimizer state on disk, killed with SIGKILL in the middle of a
backward, resume from its last checkpoint to the loss trajectory and final weights of the run that was not
killed, bit for bit? And does a model planned to within 10% of this machine's RAM train without the kernel's
OOM killer, while one just over the budget is refused before anything is allocated?

Part A (kill and resume; lohan_jax.drill with fresh processes): GPT-3 6.7B (6.65B), bf16, batch 8 x 1024, the
state of `--disk-blocks` middle blocks on disk (TensorStore, hard-linked into checkpoints), the rest in host RAM.
  1. the reference: 5 steps, no checkpoint, held-out loss at the end;
  2. the same run killed with SIGKILL in the backward of step 3 (0-based), after the checkpoint of step 3, its
     only one (checkpoint_every 3, checkpoint_at_end false: one generation of 80 GB on disk, not two), saved
     synchronously so that the kill point is deterministic;
  3. `lohan-jax train --resume` to the end (steps 3 and 4); every logged loss and the final held-out loss (a
     function of every final weight) must equal the reference's bit for bit.
  All three with train.deterministic=true (XLA's deterministic GPU ops): without them two processes differ in the
  last bits from step 2 on, kill or no kill (measured 2026-11-26: lohan_jax.determinism). That run set
  XLA_FLAGS=--xla_gpu_deterministic_ops=true in the environment, which is what train.deterministic does.
Part B (memory safety): a GPT of d_model 4096 with as many layers as the engine's accounting fits in this
machine's RAM budget (free RAM, cgroup-aware, minus 5%), state in host RAM (offload.plan=uniform: the planner's
auto plan would move state into HBM and fit one layer more, as it did on 2026-11-26), 3 steps: it must finish (not
killed) with its peak RSS under the budget; one layer more must be refused (exit 2, "host RAM: needs").

Rows go to experiments/results/fault_recovery.jsonl (RESULTS.md schema: resume_identical, status, peak RSS).
Disk: part A needs one checkpoint of the fp32 state in RAM (12 B/param) plus the disk tier's versions: ~84 GiB
for GPT-3 6.7B. The script checks first and records `failed` with the numbers if it does not fit (an H100 x1
machine has 64 GiB of disk: run it on nvidia-h100-x2, 128 GiB, with CUDA_VISIBLE_DEVICES=0).

usage (GPU machine, ~8 min on one H100):  PYTHONPATH=. python3 experiments/fault_gpu_run.py --work /tmp/fault
       (CPU plumbing check, ~2 min):       PYTHONPATH=. python3 experiments/fault_gpu_run.py --tiny
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
RESULTS = REPO / "experiments" / "results" / "fault_recovery.jsonl"
GIB = 2**30


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _sets(items: list[str]) -> list[str]:
    return [a for it in items for a in ("--set", it)]


# ---- part A: kill and resume ----------------------------------------------------------------------------------
def part_a(args, work: Path) -> dict:
    from lohan_jax.config import load_config
    from lohan_jax.engine.memory import free_disk_bytes
    from lohan_jax.models import get_spec
    from lohan_jax.plan import Tier, uniform_plan

    spec = get_spec(args.model)
    L, k = spec.n_layers, args.disk_blocks
    first = L // 2 - k // 2
    plan = uniform_plan(L, activations="recompute")
    on_disk = lambda i, b: dataclasses.replace(b, optim_state=Tier.DISK) if first <= i < first + k else b
    plan = dataclasses.replace(plan, blocks=tuple(on_disk(i, b) for i, b in enumerate(plan.blocks)))
    work.mkdir(parents=True, exist_ok=True)
    plan.save(work / "plan.json")
    steps, every = 5, 3
    train = [f"model.name={args.model}", f"train.seq_len={args.seq}", f"train.batch_size={args.batch}",
             f"train.steps={steps}", f"train.checkpoint_every={every}", "train.keep_checkpoints=1",
             "train.checkpoint_at_end=false", "train.deterministic=true",
             "train.checkpoint_async=false", "train.compute_dtype=bfloat16", "data.eval_fraction=0.05",
             "train.eval_batches=2", "optim.lr=1e-4", "optim.warmup_steps=1",
             f"offload.plan_file={work / 'plan.json'}", f"offload.disk_path={work / 'drill' / 'disk'}"]
    if args.tiny:
        train = [t.replace("bfloat16", "float32") for t in train]
    params = spec.param_count()
    block = spec.block_param_count()
    need = 12 * (params - k * block) + 3 * 12 * k * block  # one checkpoint + the disk tier's generations
    free = free_disk_bytes(work)
    row = {"experiment": "fault_recovery", "system": "lohan_jax", "model": args.model, "params": params,
           "seq_len": args.seq, "batch_tokens": args.batch * args.seq, "steps": steps, "disk_blocks": k,
           "disk_bytes": 12 * k * block, "kill_point": f"backward@{3 * L + L // 2}",
           "checkpoint_every": every}
    if need > free:
        return {**row, "status": "failed", "resume_identical": None,
                "error": f"needs ~{need / GIB:.0f} GiB free in {work}, {free / GIB:.0f} GiB free: use a larger disk "
                         "or a smaller --model"}
    cmd = [sys.executable, "-m", "lohan_jax.drill", "--work", str(work / "drill"), "--kills", "0", "--signals", "",
           "--fault", f"backward@{3 * L + L // 2}", "--steps", str(steps), "--every", str(every), "--keep", "1",
           "--blocks", str(L), "--disk-units", str(k), "--spawn", "subprocess", "--reference-without-checkpoints",
           "--child-timeout", str(args.child_timeout), "--", *_sets(train)]
    load_config(None, train)  # a bad setting fails here, not in a child
    log(f"part A: {args.model} ({params / 1e9:.2f}B), {k} blocks' state on disk, kill at backward@{3 * L + L // 2}")
    t0 = time.monotonic()
    proc = subprocess.run(cmd, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, text=True, capture_output=True)
    report_path = work / "drill" / "report.json"
    if not report_path.exists():
        return {**row, "status": "failed", "resume_identical": None,
                "error": (proc.stderr.strip().splitlines() or ["no report"])[-1][:500]}
    report = json.loads(report_path.read_text())
    ref_rows = [json.loads(x) for x in (work / "drill" / "reference" / "metrics.jsonl").read_text().splitlines()]
    run_rows = [json.loads(x) for x in (work / "drill" / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = lambda rows: {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}
    step_s = [r["perf/step_s"] for r in ref_rows if "perf/step_s" in r and r.get("step", 0) > 0 and "train/loss" in r]
    log(f"part A: {'identical' if report['resume_identical'] else 'DIFFERENT'} in {time.monotonic() - t0:.0f} s; "
        f"problems: {report['problems']}")
    return {**row, "step_s": min(step_s) if step_s else None,
            "reference_losses": losses(ref_rows), "resumed_losses": losses(run_rows),
            "children": [{k2: c[k2] for k2 in ("action", "start_step", "status", "committed_after", "seconds")}
                         for c in report["children"]],
            "resume_identical": report["resume_identical"], "problems": report["problems"],
            "status": "ok" if report["resume_identical"] else "failed", "wall_s": time.monotonic() - t0}


# ---- part B: memory safety ------------------------------------------------------------------------------------
def _model_sets(layers: int, d: int, heads: int, vocab: int, seq: int) -> list[str]:
    return [f"model.name=fit-{layers}x{d}", "model.arch=gpt", f"model.n_layers={layers}", f"model.d_model={d}",
            f"model.n_heads={heads}", f"model.vocab_size={vocab}", f"model.max_seq_len={seq}"]


def part_b(args, work: Path) -> dict:
    # no jax device here: this process must not take the GPU (XLA preallocates) from the runs it starts
    from lohan_jax import preflight
    from lohan_jax.config import load_config
    from lohan_jax.engine.memory import available_ram_bytes
    from lohan_jax.planner.capacity import memory
    from lohan_jax.planner.cli import workload_for

    d, heads, vocab = (256, 4, 257) if args.tiny else (4096, 32, 50257)
    base = [f"train.seq_len={args.seq}", f"train.batch_size={args.batch}", "train.steps=3", "data.eval_fraction=0",
            "optim.lr=1e-4",
            "offload.plan=uniform",  # state in host RAM, the plan both this process and the run account for
            "train.compute_dtype=" + ("float32" if args.tiny else "bfloat16")]
    if args.ram_budget_gib:
        base.append(f"offload.host_budget_gib={args.ram_budget_gib}")
    avail = available_ram_bytes() or 0
    if args.ram_budget_gib:
        avail = min(avail, int(args.ram_budget_gib * GIB))
    budget = int(avail * 0.95)  # lohan_jax.engine.memory.machine_budgets' margin

    def planned(layers: int) -> int:
        cfg = load_config(None, _model_sets(layers, d, heads, vocab, args.seq) + base)
        est = memory(preflight.run_plan(cfg), workload_for(cfg))
        if args.tiny:  # the CPU backend
            est = preflight.cpu_estimate(est)
        return est.ram_bytes

    layers = 1
    while planned(layers + 1) <= budget:
        layers += 1
    fit, over = planned(layers), planned(layers + 1)
    row = {"experiment": "memory_safety", "system": "lohan_jax", "model": f"gpt-{layers}x{d}",
           "seq_len": args.seq, "batch_tokens": args.batch * args.seq, "steps": 3,
           "available_ram_gib": (available_ram_bytes() or 0) / GIB, "ram_budget_gib": budget / GIB,
           "planned_ram_gib": fit / GIB, "planned_fraction_of_budget": fit / budget}
    log(f"part B: {layers} layers of {d} plan {fit / GIB:.1f} GiB of a {budget / GIB:.1f} GiB RAM budget "
        f"({fit / budget:.1%}); {layers + 1} would plan {over / GIB:.1f} GiB")
    env = {**os.environ, "PYTHONPATH": str(REPO)}

    def train(n: int, name: str, timeout: float):
        argv = [sys.executable, "-m", "lohan_jax", "train", *_sets(_model_sets(n, d, heads, vocab, args.seq) + base),
                "--run-dir", str(work / name), "--no-progress"]
        t0 = time.monotonic()
        proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        peak = 0
        while proc.poll() is None and time.monotonic() - t0 < timeout:
            try:
                for line in open(f"/proc/{proc.pid}/status"):
                    if line.startswith("VmHWM:"):
                        peak = max(peak, int(line.split()[1]) * 1024)
            except OSError:
                pass
            time.sleep(0.2)
        if proc.poll() is None:
            proc.kill()
        out, err = proc.communicate()
        peak = max(peak, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024)
        return proc.returncode, peak, err, time.monotonic() - t0

    rc, peak, err, secs = train(layers, "fit", args.child_timeout)
    row.update({"params": load_config(None, _model_sets(layers, d, heads, vocab, args.seq) + base).model.param_count(),
                "peak_rss_gib": peak / GIB, "peak_within_budget": peak <= budget, "wall_s": secs,
                "status": "ok" if rc == 0 else ("oom" if rc in (-9, 137) else "failed")})
    if rc != 0:
        row["error"] = (err.strip().splitlines() or [f"exit {rc}"])[-1][:500]
    rc2, _, err2, secs2 = train(layers + 1, "over", 300)
    row["refused_over_budget"] = rc2 == 2 and "host RAM: needs" in err2
    row["refusal"] = next((x for x in err2.splitlines() if "host RAM" in x), err2.strip()[:300])
    row["refusal_s"] = secs2
    log(f"part B: exit {rc} peak RSS {peak / GIB:.1f} GiB in {secs:.0f} s; one layer more: exit {rc2} "
        f"({'refused' if row['refused_over_budget'] else 'NOT refused'}) in {secs2:.0f} s")
    return row


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", default="/tmp/lohan_fault_run", help="scratch directory (needs the disk of part A)")
    p.add_argument("--part", choices=("A", "B", "all"), default="all")
    p.add_argument("--model", default="gpt3-6.7b")
    p.add_argument("--disk-blocks", type=int, default=2, help="blocks whose optimizer state lives on disk")
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--ram-budget-gib", type=float, default=0.0, help="part B: cap the RAM budget (0: free RAM)")
    p.add_argument("--child-timeout", type=float, default=420.0)
    p.add_argument("--tiny", action="store_true", help="CPU plumbing check with tiny models")
    p.add_argument("--no-record", action="store_true", help="do not append to experiments/results")
    args = p.parse_args()
    if args.tiny:
        args.model, args.disk_blocks, args.seq, args.batch = "gpt-tiny", 1, 32, 4
        args.ram_budget_gib = args.ram_budget_gib or 2.0
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    rows = []
    if args.part in ("A", "all"):
        rows.append(part_a(args, work / "A"))
    if args.part in ("B", "all"):
        rows.append(part_b(args, work / "B"))
    from lohan_jax.metrics import append_result
    for row in rows:
        if args.tiny:
            row["note"] = "CPU plumbing check (--tiny), not a result"
        if not args.no_record and not args.tiny:
            append_result(RESULTS, row)
        print(json.dumps({k: v for k, v in row.items() if "losses" not in k}, default=str))
    return 0 if all(r.get("status") == "ok" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
