"""The CPU side of active gradient offloading: a worker thread that runs host tasks (accumulate, AdamW) as
gradients land in pinned memory, overlapping the GPU's backward and the next forward.

Among the tasks whose gradient has landed it runs the one the next forward needs first (lowest unit index),
so after the backward the pending updates drain in forward order; when none has landed it waits on the
oldest. The numba kernels release the GIL, so the main thread keeps dispatching GPU work meanwhile.
"""
from __future__ import annotations

import dataclasses
import itertools
import threading
from typing import Any, Callable

from lohan_jax.timeline import Timeline


@dataclasses.dataclass(eq=False)
class HostTask:
    key: int  # unit index in forward order: lower runs first among landed tasks
    name: str
    grad: Any  # a pinned-host jax array the task reads (None: nothing to wait for)
    fn: Callable[[Any], None]  # called with the grad (or None) on the worker thread
    seq: int = 0
    deps: Any = None  # something else the task reads (a disk read future): landed once done()
    done: threading.Event = dataclasses.field(default_factory=threading.Event)

    def landed(self) -> bool:
        return (self.grad is None or self.grad.is_ready()) and (self.deps is None or self.deps.done())


class HostWorker:
    """One thread; tasks run one at a time, each using all the kernel's threads."""

    def __init__(self, timeline: Timeline | None = None):
        self._timeline = timeline if timeline is not None else Timeline(enabled=False)
        self._cv = threading.Condition()
        self._pending: list[HostTask] = []
        self._seq = itertools.count()
        self._error: BaseException | None = None
        self._closed = False
        self.busy_s = 0.0
        self._thread = threading.Thread(target=self._run, name="lohan-host-optim", daemon=True)
        self._thread.start()

    def submit(self, key: int, name: str, grad: Any, fn: Callable[[Any], None], deps: Any = None) -> threading.Event:
        task = HostTask(key, name, grad, fn, next(self._seq), deps)
        with self._cv:
            self._check()
            self._pending.append(task)
            self._cv.notify()
        return task.done

    def drain(self) -> None:
        """Wait until every submitted task has run; re-raise a task's failure here."""
        with self._cv:
            self._cv.wait_for(lambda: not self._pending and not self._running or self._error is not None)
            self._check()

    def check(self) -> None:
        with self._cv:
            self._check()

    def _check(self) -> None:
        if self._error is not None:
            raise RuntimeError(f"a host optimizer task failed: {self._error!r}") from self._error

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        self._thread.join(timeout=10)

    _running = False

    def _pick(self) -> HostTask:
        first_of_key = {}
        for t in sorted(self._pending, key=lambda t: t.seq):  # a unit's tasks run in submission order
            first_of_key.setdefault(t.key, t)
        landed = [t for t in first_of_key.values() if t.landed()]
        task = min(landed, key=lambda t: (t.key, t.seq)) if landed else min(self._pending, key=lambda t: t.seq)
        self._pending.remove(task)
        return task

    def _run(self) -> None:
        while True:
            with self._cv:
                self._cv.wait_for(lambda: self._pending or self._closed)
                if self._closed and not self._pending:
                    return
                task = self._pick()
                self._running = True
            try:
                if task.grad is not None:
                    task.grad.block_until_ready()
                t0 = Timeline.now_s()
                task.fn(task.grad)
                t1 = Timeline.now_s()
                self.busy_s += t1 - t0
                self._timeline.add("cpu_optim", task.name, t0, t1)
            except BaseException as e:  # surfaced to the main thread by drain()/check()
                with self._cv:
                    self._error = e
            finally:
                task.done.set()
                with self._cv:
                    self._running = False
                    self._cv.notify_all()
