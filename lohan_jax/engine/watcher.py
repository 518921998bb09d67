"""Turns asynchronous device work into timeline events: one thread per lane waits for each array in issue
order and records [max(issued, previous end), ready]. Streams run in order, so this recovers each stream's
busy intervals without synchronising the dispatching thread (used only when a timeline is recorded)."""
from __future__ import annotations

import queue
import threading
from typing import Any

from lohan_jax.timeline import Timeline


class CompletionWatcher:
    def __init__(self, timeline: Timeline):
        self._timeline = timeline
        self._queues: dict[str, queue.Queue] = {}
        self._lock = threading.Lock()

    def watch(self, lane: str, name: str, array: Any, **args) -> None:
        if not self._timeline.enabled:
            return
        issued = Timeline.now_s()
        with self._lock:
            q = self._queues.get(lane)
            if q is None:
                q = self._queues[lane] = queue.Queue()
                threading.Thread(target=self._run, args=(lane, q), daemon=True, name=f"watch-{lane}").start()
        q.put((name, array, issued, args))

    def flush(self) -> None:
        for q in list(self._queues.values()):
            q.join()

    def _run(self, lane: str, q: queue.Queue) -> None:
        last_end = 0.0
        while True:
            name, array, issued, args = q.get()
            try:
                (array[0] if isinstance(array, (list, tuple)) else array).block_until_ready()
                end = Timeline.now_s()
                start = max(issued, last_end)
                self._timeline.add(lane, name, start, max(start, end), **args)
                last_end = end
            except Exception:  # a deleted/donated buffer: the event is lost, the step is not
                pass
            finally:
                q.task_done()
