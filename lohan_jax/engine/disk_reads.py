"""Bounded read-ahead of disk-resident optimizer state.

A unit's [3, n] fp32 state is in RAM from the issue of its read until the update hands it to the store's write
(the store bounds writes in flight itself). The backward produces gradients far faster than a disk moves state
(13B: 0.1 s of backward per block against ~4 s of read + write), so reads tied to the backward's pace put every
disk unit's state in RAM at once (45 GB for 12 blocks of 13B: the host OOM of 2026-11-25). Here at most `window`
states are live, and reads are issued in the order the host worker runs the updates: among the units whose
gradient has been submitted, the lowest index first (the worker's forward-need order); before any is submitted,
the backward loop asks for the first ones in backward order.

With read_ahead=False (the plan's disk_io_order "naive", for the ablation) nothing is read ahead: a unit's read
is issued by its update task as it starts, i.e. after the previous disk unit's write was issued, so on the
simplex disk each read queues behind the write before it (read i, Adam i, write i, read i-1: the paper's naive
order) and the host worker waits for every read.
"""
from __future__ import annotations

import threading
from typing import Any


class DiskReadAhead:
    def __init__(self, store: Any, window: int = 1, read_ahead: bool = True):
        if window < 1:
            raise ValueError(f"disk read-ahead window must be >= 1, got {window}")
        self.store, self.window, self.read_ahead = store, window, read_ahead
        self._lock = threading.Lock()
        self._reads: dict[int, Any] = {}  # unit index -> read future, issued and not yet taken by its update
        self._waiting: dict[int, Any] = {}  # unit index -> unit: gradient submitted, no read issued yet
        self._live = 0
        self.peak_live = 0
        self.reads_ahead = 0  # reads issued before their update started (cumulative)
        self.reads_at_update = 0  # reads issued by the update itself: naive order, or a write was in flight

    def prefetch(self, u: Any) -> None:
        """Main thread: read ahead of the gradient, if the window has room and no write of u is in flight."""
        if not self.read_ahead:
            return
        with self._lock:
            if u.index not in self._reads and self._live < self.window and _writable(u):
                self._issue(u)

    def submitted(self, u: Any) -> None:
        """Main thread: u's gradient went to the worker; its read is issued as soon as the window allows."""
        if not self.read_ahead:
            return
        with self._lock:
            if u.index not in self._reads:
                self._waiting[u.index] = u
            self._pump()

    def take(self, u: Any) -> Any:
        """Worker: the read future of u's state, issuing it now (after u's pending write) if none was issued."""
        with self._lock:
            self._waiting.pop(u.index, None)
            fut = self._reads.pop(u.index, None)
        if fut is None:
            if u.write is not None:
                u.write.result()
            with self._lock:
                fut = self._issue(u, keep=False)
        return fut

    def landed(self, u: Any) -> bool:
        """Whether u's state has been read (its update can run without waiting on the disk)."""
        with self._lock:
            fut = self._reads.get(u.index)
        return fut is not None and fut.done()

    def cancel(self, u: Any) -> None:
        """u's update will not run this step (a skipped update): drop its read and free its place."""
        with self._lock:
            self._waiting.pop(u.index, None)
            if self._reads.pop(u.index, None) is not None:
                self._live -= 1
            self._pump()

    def released(self) -> None:
        """Worker: the state taken last went to its write; the next read may start."""
        with self._lock:
            self._live -= 1
            self._pump()

    def _pump(self) -> None:
        while self._live < self.window:
            ready = [i for i, u in self._waiting.items() if _writable(u)]
            if not ready:
                return
            self._issue(self._waiting.pop(min(ready)))

    def _issue(self, u: Any, keep: bool = True) -> Any:
        fut = self.store.read(u.name)
        self._live += 1
        self.peak_live = max(self.peak_live, self._live)
        if keep:
            self._reads[u.index] = fut
            self.reads_ahead += 1
        else:
            self.reads_at_update += 1
        return fut


def _writable(u: Any) -> bool:
    """No write of u's previous state in flight (a read now would see the old generation)."""
    return u.write is None or u.write.done()
