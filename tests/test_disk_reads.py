"""The disk read-ahead keeps at most `window` unit states in RAM and reads in the worker's order; in the naive
order it reads nothing ahead."""
import dataclasses
import json
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
        self.events = []  # ("read" | "write", name) in issue order

    def read(self, name):
        self.reads.append(name)
        self.events.append(("read", name))
        return _Fut()

    def write(self, name):
        self.events.append(("write", name))
        fut = _Fut()
        fut.event.set()
        return fut


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
    assert (ra.reads_ahead, ra.reads_at_update, ra.peak_live) == (5, 0, 1)


def test_naive_order_never_reads_ahead():
    """The paper's naive order: read i, Adam i, write i, then read i-1; nothing is read before its update."""
    store = _Store()
    ra = DiskReadAhead(store, window=1, read_ahead=False)
    units = {i: _Unit(i, f"block{i}") for i in range(4)}
    ra.prefetch(units[3])
    for i in (3, 2, 1, 0):
        ra.submitted(units[i])
    assert store.reads == [] and not ra.landed(units[3])
    for i in (0, 1, 2, 3):  # the worker's update order
        ra.take(units[i])
        units[i].write = store.write(units[i].name)
        ra.released()  # frees the window but issues nothing
    assert store.events == [(kind, f"block{i}") for i in range(4) for kind in ("read", "write")]
    assert (ra.reads_ahead, ra.reads_at_update, ra.peak_live) == (0, 4, 1)


def test_plan_carries_the_disk_io_order(tmp_path):
    from lohan_jax.config import load_config
    from lohan_jax.plan import DiskIOOrder, Plan, uniform_plan
    from lohan_jax.preflight import run_plan

    plan = uniform_plan(2, optim_state="disk", disk_io_order="naive")
    assert plan.disk_io_order is DiskIOOrder.NAIVE
    plan.save(tmp_path / "p.json")
    assert Plan.load(tmp_path / "p.json") == plan
    old = {k: v for k, v in json.loads(plan.to_json()).items() if k != "disk_io_order"}
    assert Plan.from_dict(old).disk_io_order is DiskIOOrder.REORDERED  # plans saved before the knob
    with pytest.raises(ValueError, match="disk_io_order='optimized'.*reordered"):
        dataclasses.replace(plan, disk_io_order="optimized")
    cfg = load_config(None, ["offload.plan=uniform", "offload.disk_io_order=naive"])
    assert run_plan(cfg).disk_io_order is DiskIOOrder.NAIVE
    assert run_plan(load_config(None, ["offload.plan=uniform"])).disk_io_order is DiskIOOrder.REORDERED


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
