"""Faults: the errors a run stops with when its state cannot be trusted or saved, and named injection points
that tests and drills use to kill, stop or fill the disk under a real run.

Injection is off unless armed: `arm("backward@3:kill")` or the environment variable LOHAN_JAX_FAULT (read at
import, so a child process inherits it). Armed with `point@N:action`, the Nth time the process reaches
`point` it performs `action`:

  kill     SIGKILL itself: nothing runs after it (no handler, no flush, no atexit), as with `kill -9`
  term     send itself SIGTERM (the graceful stop: checkpoint at the next step boundary, then exit)
  int      send itself SIGINT (the same, as Ctrl-C)
  enospc   the caller fails as a full disk would (OSError ENOSPC)

Points: `forward` and `backward` (a block program dispatched), `optimizer` (a host update task starting),
`disk_write` (a state-store write in flight), `checkpoint_write` (between the arrays of a checkpoint being
written), `step` (a step boundary of the training loop). An unarmed `hit` is one attribute read.
"""
from __future__ import annotations

import dataclasses
import errno
import os
import signal
import threading
import time
from typing import Any

ENV = "LOHAN_JAX_FAULT"
POINTS = ("forward", "backward", "optimizer", "disk_write", "checkpoint_write", "step")
ACTIONS = ("kill", "term", "int", "enospc")


class NonFiniteError(RuntimeError):
    """A step's loss or gradient norm was not finite and the policy (train.on_nonfinite) says stop, or the
    step could not be skipped exactly. `step` is the loop step, `unit` the first offending unit."""

    def __init__(self, message: str, step: int | None = None, unit: str | None = None):
        super().__init__(message)
        self.step, self.unit = step, unit


class TornStepError(NonFiniteError):
    """A step whose updates overlap its backward found a non-finite gradient after some of those updates were
    applied: the in-memory state mixes two steps. Nothing of it may be saved; the training loop reloads the
    last checkpoint and replays up to this step with the updates held back (lohan_jax.engine.guard)."""


class StepCheck:
    """One step's non-finite verdict: `skipped` (none of its updates was applied), `torn` (some were, before
    a non-finite gradient appeared: lohan_jax.engine.guard), `unit` (the first offending unit, "loss" when the
    loss itself was not finite). A resolver computes it on first access (it may read device scalars)."""

    def __init__(self, *, skipped: bool = False, unit: str | None = None, resolver: Any = None):
        self._skipped, self._torn, self._unit, self._resolver = skipped, False, unit, resolver

    def resolve(self) -> StepCheck:
        if self._resolver is not None:
            resolver, self._resolver = self._resolver, None
            self._skipped, self._torn, self._unit = resolver()
        return self

    @property
    def skipped(self) -> bool:
        return self.resolve()._skipped

    @property
    def torn(self) -> bool:
        return self.resolve()._torn

    @property
    def unit(self) -> str | None:
        return self.resolve()._unit

    @property
    def ok(self) -> bool:
        return not (self.skipped or self.torn)


def disk_full(what: str) -> OSError:
    return OSError(errno.ENOSPC, f"No space left on device (injected fault) while {what}")


@dataclasses.dataclass(frozen=True)
class Fault:
    point: str
    after: int  # act on this occurrence (1-based)
    action: str = "kill"

    @classmethod
    def parse(cls, text: str) -> Fault:
        where, _, action = text.strip().partition(":")
        point, at, n = where.partition("@")
        if point not in POINTS or not at or not n.isdigit() or int(n) < 1 or (action or "kill") not in ACTIONS:
            raise ValueError(f"{ENV}={text!r}: expected point@N[:action] with point in {POINTS}, N >= 1 and "
                             f"action in {ACTIONS}")
        return cls(point, int(n), action or "kill")

    def __str__(self) -> str:
        return f"{self.point}@{self.after}:{self.action}"


_armed: Fault | None = None
_count = 0
_lock = threading.Lock()


def arm(fault: Fault | str | None) -> None:
    """Arm one fault (or disarm with None); occurrences count from here."""
    global _armed, _count
    with _lock:
        _armed = Fault.parse(fault) if isinstance(fault, str) else fault
        _count = 0


def armed() -> Fault | None:
    return _armed


def hit(point: str) -> str | None:
    """Count an occurrence of `point`; on the armed one, kill/term/int act here and `enospc` is returned for
    the caller to fail with (`disk_full`). Returns None otherwise."""
    global _count
    fault = _armed
    if fault is None or fault.point != point:
        return None
    with _lock:
        _count += 1
        if _count != fault.after:
            return None
    if fault.action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(60)  # SIGKILL is delivered before this returns
    if fault.action in ("term", "int"):
        os.kill(os.getpid(), signal.SIGTERM if fault.action == "term" else signal.SIGINT)
        return None
    return fault.action


def install(trainer: Any) -> None:
    """Put the engine's `forward`, `backward` and `optimizer` points in place when one of them is armed (the
    engine itself has no hooks: its block programs and host worker are wrapped instead)."""
    fault = _armed
    if fault is None or not hasattr(trainer, "block_programs"):
        return
    if fault.point in ("forward", "backward"):
        trainer.block_programs = [_ProbedProgram(p) for p in trainer.block_programs]
    elif fault.point == "optimizer":
        submit = trainer.worker.submit

        def probed_submit(key, name, grad, fn, deps=None):
            def run(g):
                hit("optimizer")
                fn(g)
            return submit(key, name, grad, run, deps)

        trainer.worker.submit = probed_submit


class _ProbedProgram:
    """A block program whose forward and backward pass through their fault points first."""

    def __init__(self, program: Any):
        self._program = program

    def __getattr__(self, name: str) -> Any:
        return getattr(self._program, name)

    def fwd(self, *args):
        hit("forward")
        return self._program.fwd(*args)

    def bwd(self, *args):
        hit("backward")
        return self._program.bwd(*args)


if os.environ.get(ENV):
    arm(os.environ[ENV])
