"""Fault drills: train under injected faults and check that nothing was lost.

A drill runs the same `lohan-jax train` command once without faults (the reference trajectory), then as a
chain of processes, each resuming the run directory the previous one left: some are killed with SIGKILL at a
randomly chosen occurrence of a named point (forward, backward, optimizer, disk_write, checkpoint_write,
step: lohan_jax.faults), some receive SIGTERM or SIGINT from this process once they have logged a step;
the last one runs to the end. Then it checks:

  - every loss any process logged equals the reference's loss of that step, bit for bit;
  - the final checkpoint's arrays (fp32 master weights, Adam moments, wherever they lived) equal the
    reference's, bit for bit;
  - no committed checkpoint disappeared except by keep-last-N rotation, every remaining one reads back with
    all digests valid, and each signalled process saved the step it stopped at and exited 128 + signal.

Processes are forked from this one after the heavy imports (none of which starts a thread) so that each
costs its compilation (cached) and its steps, not its imports; `spawn="subprocess"` runs fresh interpreters
instead (the GPU drill). `python -m lohan_jax.drill --help`; the result is one JSON report.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

POINTS_PER_STEP = {"forward": "blocks", "backward": "blocks", "optimizer": "host_units", "disk_write": "disk_units",
                   "checkpoint_write": "units", "step": 1}


@dataclasses.dataclass
class Child:
    index: int
    action: str  # "fault:<point@N:kill>", "signal:SIGTERM", "signal:SIGINT" or "finish"
    start_step: int
    status: str = ""  # "killed", "exit <rc>"
    committed_before: list[int] = dataclasses.field(default_factory=list)
    committed_after: list[int] = dataclasses.field(default_factory=list)
    last_logged: int | None = None
    seconds: float = 0.0


class Drill:
    def __init__(self, train_args: list[str], work: Path, *, steps: int, every: int, keep: int, n_blocks: int,
                 host_units: int, disk_units: int, spawn: str = "fork", env: dict | None = None,
                 child_timeout_s: float = 300.0):
        self.train_args, self.work = list(train_args), Path(work)
        self.steps, self.every, self.keep = steps, every, keep
        self.counts = {"blocks": n_blocks, "host_units": host_units, "disk_units": disk_units,
                       "units": n_blocks + 2}
        self.spawn, self.env, self.timeout = spawn, dict(env or {}), child_timeout_s
        self.run_dir, self.ref_dir = self.work / "run", self.work / "reference"
        (self.work / "logs").mkdir(parents=True, exist_ok=True)
        self.children: list[Child] = []

    # ---- processes -----------------------------------------------------------------------------------------
    def _launch(self, argv: list[str], fault: str | None, log: Path):
        if self.spawn == "subprocess":
            env = {k: v for k, v in {**os.environ, **self.env}.items() if k != "LOHAN_JAX_FAULT"}
            if fault:
                env["LOHAN_JAX_FAULT"] = fault
            out = open(log, "w")  # noqa: SIM115 (closed with the process)
            return subprocess.Popen([sys.executable, "-m", "lohan_jax", *argv], stdout=out, stderr=subprocess.STDOUT,
                                    env=env)
        pid = os.fork()
        if pid:
            return pid
        code = 1  # the child: never returns into the drill
        try:
            fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(fd, 1), os.dup2(fd, 2)
            os.environ.update(self.env)
            from lohan_jax import cli, faults
            faults.arm(fault)
            code = cli.main(argv)
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        except BaseException:  # noqa: BLE001
            import traceback
            traceback.print_exc()
        finally:
            sys.stdout.flush(), sys.stderr.flush()
            os._exit(code)

    def _wait(self, proc, deadline: float) -> tuple[str, int | None]:
        """('killed', SIGNUM) or ('exit', rc)."""
        while True:
            if self.spawn == "subprocess":
                rc = proc.poll()
                if rc is not None:
                    return ("killed", -rc) if rc < 0 else ("exit", rc)
            else:
                pid, status = os.waitpid(proc, os.WNOHANG)
                if pid:
                    if os.WIFSIGNALED(status):
                        return "killed", os.WTERMSIG(status)
                    return "exit", os.WEXITSTATUS(status)
            if time.monotonic() > deadline:
                self._signal(proc, signal.SIGKILL)
                raise TimeoutError(f"a drill process ran past {self.timeout:.0f} s; see {self.work / 'logs'}")
            time.sleep(0.005)

    def _signal(self, proc, signum: int) -> None:
        os.kill(proc.pid if self.spawn == "subprocess" else proc, signum)

    # ---- the chain -------------------------------------------------------------------------------------------
    def committed(self) -> list[int]:
        from lohan_jax.checkpoint import committed_steps
        return committed_steps(self.run_dir / "checkpoints")

    def _rows(self, run_dir: Path) -> list[dict]:
        path = run_dir / "metrics.jsonl"
        rows = []
        if path.exists():
            for line in path.read_text().splitlines():
                try:
                    rows.append(json.loads(line))
                except ValueError:
                    rows.append({"torn_line": line})
        return rows

    def _argv(self, first: bool) -> list[str]:
        if first:
            return ["train", *self.train_args, "--run-dir", str(self.run_dir), "--no-progress"]
        return ["train", "--resume", str(self.run_dir), "--no-progress"]

    def run_reference(self, extra: list[str] = ()) -> float:
        t0 = time.monotonic()
        proc = self._launch(["train", *self.train_args, *extra, "--run-dir", str(self.ref_dir), "--no-progress"], None,
                            self.work / "logs" / "reference.log")
        kind, code = self._wait(proc, time.monotonic() + self.timeout)
        if (kind, code) != ("exit", 0):
            raise RuntimeError(f"the reference run failed ({kind} {code}); see {self.work / 'logs' / 'reference.log'}")
        return time.monotonic() - t0

    def run_child(self, action: str, rng: random.Random) -> Child:
        first = not (self.run_dir / "config.yaml").exists()
        before = self.committed()
        start = before[-1] if before else 0
        child = Child(len(self.children), action, start, committed_before=before)
        fault = None
        if action.startswith("fault:") and "@" in action:  # an explicit point@N
            fault = action.split(":", 1)[1]
            fault = fault if fault.count(":") else f"{fault}:kill"
            child.action = f"fault:{fault}"
        elif action.startswith("fault:"):
            point = action.split(":", 1)[1]
            per = POINTS_PER_STEP[point]
            per_step = per if isinstance(per, int) else self.counts[per]
            per_save = self.counts["units"]
            span = (per_save * max(1, (self.steps - start) // self.every) if point == "checkpoint_write"
                    else per_step * max(1, self.steps - start))
            fault = f"{point}@{rng.randint(1, max(1, span))}:kill"
            child.action = f"fault:{fault}"
        rows_before = len(self._rows(self.run_dir))
        t0 = time.monotonic()
        log = self.work / "logs" / f"child-{child.index:02d}.log"
        proc = self._launch(self._argv(first), fault, log)
        if action.startswith("signal:"):
            signum = getattr(signal, action.split(":", 1)[1])
            deadline = time.monotonic() + self.timeout
            while len(self._rows(self.run_dir)) <= rows_before and time.monotonic() < deadline:
                if self.spawn == "fork" and os.waitpid(proc, os.WNOHANG)[0]:
                    raise RuntimeError(f"child {child.index} ended before it logged a step; see {log}")
                time.sleep(0.002)
            self._signal(proc, signum)
        kind, code = self._wait(proc, t0 + self.timeout)
        child.seconds = time.monotonic() - t0
        child.status = f"{kind} {code}"
        child.committed_after = self.committed()
        logged = [r["step"] for r in self._rows(self.run_dir)[rows_before:] if "train/loss" in r]
        child.last_logged = max(logged) if logged else None
        self.children.append(child)
        return child

    # ---- checks ------------------------------------------------------------------------------------------------
    def check(self) -> dict[str, Any]:
        problems = []
        ref = {r["step"]: r["train/loss"] for r in self._rows(self.ref_dir) if "train/loss" in r}
        rows = self._rows(self.run_dir)
        torn_lines = sum("torn_line" in r for r in rows)
        seen: dict[int, list] = {}
        for r in rows:
            if "train/loss" in r:
                seen.setdefault(r["step"], []).append(r["train/loss"])
        for step, values in sorted(seen.items()):
            if any(v != ref.get(step) for v in values):
                problems.append(f"step {step}: losses {values} != reference {ref.get(step)}")
        if sorted(seen) != sorted(ref):
            problems.append(f"steps logged {sorted(seen)} != reference {sorted(ref)}")
        for c in self.children:
            lost = [s for s in c.committed_before if s not in c.committed_after
                    and not (c.committed_after and s < c.committed_after[-self.keep])]
            went_back = c.committed_before and (not c.committed_after or c.committed_after[-1] < c.committed_before[-1])
            if lost or went_back:
                problems.append(f"child {c.index} ({c.action}): checkpoints {c.committed_before} -> "
                                f"{c.committed_after}")
            want = {"signal:SIGTERM": "exit 143", "signal:SIGINT": "exit 130", "finish": "exit 0"}.get(c.action)
            if c.action.startswith("fault:"):
                want = "killed 9"
            if c.status != want:
                problems.append(f"child {c.index} ({c.action}): {c.status}, expected {want}")
            if c.action.startswith("signal:") and c.last_logged is not None and (
                    not c.committed_after or c.committed_after[-1] != c.last_logged + 1):
                problems.append(f"child {c.index} ({c.action}) logged step {c.last_logged} but its last checkpoint "
                                f"is {c.committed_after[-1:] or None}")
        problems += self._compare_final()
        return {"children": [dataclasses.asdict(c) for c in self.children], "problems": problems,
                "steps_compared": len(seen), "torn_metric_lines": torn_lines,
                "kill_points": [c.action for c in self.children if c.action.startswith("fault:")],
                "resume_identical": not problems}

    def _compare_final(self) -> list[str]:
        from lohan_jax.checkpoint import CheckpointError, read_array
        problems = []
        for step in self.committed():  # every checkpoint left must be valid
            for arr in sorted((self.run_dir / "checkpoints" / str(step) / "arrays").iterdir()):
                if arr.is_dir():
                    try:
                        read_array(arr)
                    except CheckpointError as e:
                        problems.append(f"checkpoint {step}: {e}")
        final = self.run_dir / "checkpoints" / str(self.steps) / "arrays"
        ref = self.ref_dir / "checkpoints" / str(self.steps) / "arrays"
        if not (self.ref_dir / "checkpoints").is_dir():  # a reference without checkpoints: the final weights
            last = lambda d: [r.get("eval/loss") for r in self._rows(d) if r.get("step") == self.steps][-1:]
            if last(self.run_dir) != last(self.ref_dir) or not last(self.ref_dir):  # through their eval loss
                problems.append(f"final eval/loss {last(self.run_dir)} != reference {last(self.ref_dir)}")
            return problems
        if not final.is_dir() or not ref.is_dir():
            return problems + [f"missing final checkpoint {final if not final.is_dir() else ref}"]
        names = sorted(p.name for p in ref.iterdir() if p.is_dir())
        for name in names:
            a, b = read_array(final / name), read_array(ref / name)
            if a.shape != b.shape or a.tobytes() != b.tobytes():
                problems.append(f"final state of {name} differs from the reference "
                                f"(max abs diff {np.max(np.abs(a.astype(np.float64) - b)):.3g})")
        return problems


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m lohan_jax.drill", description=__doc__.split("\n\n")[0])
    p.add_argument("--work", required=True, help="directory for the runs, logs and report.json")
    p.add_argument("--kills", type=int, default=20, help="processes killed at random fault points")
    p.add_argument("--fault", action="append", default=[], help="a kill at an explicit point@N (repeatable), first")
    p.add_argument("--reference-without-checkpoints", action="store_true",
                   help="the reference run saves no checkpoint (final weights compared through its eval loss)")
    p.add_argument("--signals", default="SIGTERM,SIGINT", help="graceful stops sent from outside, first")
    p.add_argument("--points", default=",".join(POINTS_PER_STEP), help="fault points to draw from")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, required=True, help="train.steps of the train arguments")
    p.add_argument("--every", type=int, required=True, help="train.checkpoint_every of the train arguments")
    p.add_argument("--keep", type=int, default=3, help="train.keep_checkpoints of the train arguments")
    p.add_argument("--blocks", type=int, required=True, help="model layers")
    p.add_argument("--host-units", type=int, default=0, help="units updated on the host (optimizer points)")
    p.add_argument("--disk-units", type=int, default=0, help="units with state on disk (disk_write points)")
    p.add_argument("--spawn", choices=("fork", "subprocess"), default="fork")
    p.add_argument("--child-timeout", type=float, default=300.0)
    p.add_argument("train_args", nargs=argparse.REMAINDER, help="-- then the `lohan-jax train` arguments")
    a = p.parse_args(argv)
    train_args = a.train_args[1:] if a.train_args[:1] == ["--"] else a.train_args
    if a.spawn == "fork":  # import what every child needs once, here, before forking (no threads yet)
        import lohan_jax.checkpoint  # noqa: F401
        import lohan_jax.cli  # noqa: F401
        import lohan_jax.engine  # noqa: F401
        import lohan_jax.train  # noqa: F401
    drill = Drill(train_args, Path(a.work), steps=a.steps, every=a.every, keep=a.keep, n_blocks=a.blocks,
                  host_units=a.host_units, disk_units=a.disk_units, spawn=a.spawn, child_timeout_s=a.child_timeout)
    rng = random.Random(a.seed)
    points = [x for x in a.points.split(",") if x and (x != "disk_write" or a.disk_units)
              and (x != "optimizer" or a.host_units)]
    t0 = time.monotonic()
    ref_s = drill.run_reference(["--set", "train.checkpoint_every=0"] if a.reference_without_checkpoints else [])
    actions = [f"fault:{f}" for f in a.fault] + [f"signal:{s}" for s in a.signals.split(",") if s]
    actions += [f"fault:{points[i % len(points)]}" for i in range(a.kills)]
    for action in actions:
        drill.run_child(action, rng)
    drill.run_child("finish", rng)
    report = drill.check()
    report.update({"reference_s": ref_s, "total_s": time.monotonic() - t0, "seed": a.seed, "train_args": train_args})
    (Path(a.work) / "report.json").write_text(json.dumps(report, indent=1))
    print(json.dumps({k: report[k] for k in ("resume_identical", "problems", "steps_compared", "total_s")}))
    return 0 if report["resume_identical"] else 1


if __name__ == "__main__":
    sys.exit(main())
