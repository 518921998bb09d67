"""The disk read-ahead keeps at most `window` unit states in RAM and reads in the worker's order."""
import dataclasses
import threading

import pytest

from lohan_jax.engine.disk_reads import DiskReadAhead


class _Fut:
    def __init__(self):
        self.event = threading.Event()

    def done(self):
        return self.event.is_set()

    def result(self):
        return "state"


class _Store:
    def __init__(self):
        self.reads = []

    def read(self, name):
        self.reads.append(name)
        return _Fut()


@dataclasses.dataclass
class _Unit:
    index: int
    name: str
    write: object = None


def test_window_and_order():
    store = _Store()
    ra = DiskReadAhead(store, window=1)
    units = {i: _Unit(i, f"block{i}") for i in range(5)}
    ra.prefetch(units[4])  # the backward asks for the first disk unit
    ra.prefetch(units[3])  # no room: the window holds block4's state
    assert store.reads == ["block4"]
    for i in (4, 3, 2, 1, 0):  # gradients arrive in backward order
        ra.submitted(units[i])
    assert store.reads == ["block4"]
    assert not ra.landed(units[4])
    ra.take(units[4])
    ra.released()  # block4's state went to its write: the next read is the lowest index waiting
    assert store.reads == ["block4", "block0"]
    for i in (0, 1, 2, 3):
        ra.take(units[i])
        ra.released()
    assert store.reads == ["block4", "block0", "block1", "block2", "block3"]
    assert ra.peak_live == 1


def test_unit_with_write_in_flight_is_not_read_early():
    store = _Store()
    ra = DiskReadAhead(store, window=2)
    pending = _Fut()
    u = _Unit(0, "block0", write=pending)
    ra.prefetch(u)
    ra.submitted(u)
    assert store.reads == []
    pending.event.set()  # take() waits for the write, then reads
    ra.take(u)
    assert store.reads == ["block0"]


def test_cancel_frees_the_window():
    store = _Store()
    ra = DiskReadAhead(store, window=1)
    a, b = _Unit(1, "a"), _Unit(0, "b")
    ra.prefetch(a)
    ra.submitted(b)
    assert store.reads == ["a"]
    ra.cancel(a)
    assert store.reads == ["a", "b"]


def test_bad_window():
    with pytest.raises(ValueError, match="window"):
        DiskReadAhead(_Store(), window=0)


def test_a_finished_write_does_not_keep_the_state_alive(tmp_path):
    """The engine keeps each unit's last write future (u.write) for a step: if the future kept the [3, n]
    array alive, every disk unit's state would stay in RAM (the 13B host OOM of 2026-11-25)."""
    import gc
    import weakref

    import numpy as np

    from lohan_jax.tiers.store import StateStore

    store = StateStore(tmp_path)
    state = np.ones((3, 1000), np.float32)
    alive = weakref.ref(state)
    fut = store.write("block0", state)
    fut.result()
    del state
    gc.collect()
    assert fut.done() and alive() is None
    np.testing.assert_array_equal(store.read("block0").result(), np.ones((3, 1000), np.float32))
