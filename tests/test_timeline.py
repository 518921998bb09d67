"""Tests of lohan_jax.timeline: recording from threads, trace and plot export, busy/overlap arithmetic."""

import json
import threading

import pytest

from lohan_jax import timeline as tl


def _hand_made() -> tl.Timeline:
    """gpu busy [0,4) and [5,8) (two events overlap); cpu_optim [3,6); h2d [1,2). Times in seconds."""
    t = tl.Timeline()
    t.add("gpu", "fwd:0", 0.0, 2.0)
    t.add("gpu", "bwd:0", 1.0, 4.0)  # overlaps fwd:0 within the lane: union, not sum
    t.add("gpu", "bwd:1", 5.0, 8.0)
    t.add("cpu_optim", "update:0", 3.0, 6.0)
    t.add("h2d", "h2d_w16:1", 1.0, 2.0, nbytes=1 << 20)
    return t


def test_interval_helpers():
    assert tl.union_intervals([(5, 6), (0, 2), (1, 3), (3, 4), (7, 7)]) == [(0, 4), (5, 6)]
    assert tl.total_length([(0, 4), (5, 6)]) == 5
    assert tl.intersection_length([(0, 4), (5, 8)], [(3, 6)]) == 2
    assert tl.intersection_length([(0, 1)], [(1, 2)]) == 0
    assert tl.name_prefix("h2d_w16:3") == "h2d" and tl.name_prefix("FWD 12") == "fwd"


def test_summary_union_and_overlap():
    s = _hand_made().summary()
    assert s["total_s"] == pytest.approx(8.0)
    assert list(s["lanes"]) == ["gpu", "h2d", "cpu_optim"]
    gpu, cpu = s["lanes"]["gpu"], s["lanes"]["cpu_optim"]
    assert gpu["busy_s"] == pytest.approx(7.0) and gpu["n_events"] == 3  # sum would be 8
    assert gpu["first_s"] == 0.0 and gpu["last_s"] == pytest.approx(8.0)
    assert cpu["busy_s"] == pytest.approx(3.0) and cpu["first_s"] == pytest.approx(3.0)
    assert s["overlap_s"]["cpu_optim"]["gpu"] == pytest.approx(2.0)  # [3,4) and [5,6): 1 s left exposed
    assert s["overlap_s"]["gpu"]["cpu_optim"] == pytest.approx(2.0)
    assert s["overlap_s"]["h2d"]["gpu"] == pytest.approx(1.0)
    assert s["overlap_s"]["h2d"]["cpu_optim"] == 0.0
    assert _hand_made().overlap_s("cpu_optim", "gpu") == pytest.approx(2.0)
    json.dumps(s)
    assert tl.Timeline().summary() == {"total_s": 0.0, "lanes": {}, "overlap_s": {}}


def test_span_and_add_from_two_threads():
    t = tl.Timeline()
    n = 200

    def optimizer_thread():
        for i in range(n):
            with t.span("cpu_optim", f"update:{i}", block=i):
                pass

    worker = threading.Thread(target=optimizer_thread)
    worker.start()
    for i in range(n):
        start = t.now_s()
        with t.span("gpu", f"fwd:{i}"):
            pass
        t.add("h2d", f"h2d:{i}", start, t.now_s(), nbytes=i)
    worker.join()
    events = t.events
    assert len(t) == len(events) == 3 * n
    assert {e.lane for e in events} == {"gpu", "h2d", "cpu_optim"}
    assert all(e.end_ns >= e.start_ns for e in events)
    assert [e.start_ns for e in events] == sorted(e.start_ns for e in events)
    assert sorted(e.args["block"] for e in events if e.lane == "cpu_optim") == list(range(n))
    t.clear()
    assert len(t) == 0
    with pytest.raises(ValueError, match="ends before"):
        t.add("gpu", "x", 2.0, 1.0)


def test_disabled_timeline_records_nothing():
    t = tl.Timeline(enabled=False)
    with t.span("gpu", "fwd:0"):
        pass
    t.add("h2d", "h2d:0", 0.0, 1.0)
    assert len(t) == 0 and t.span("gpu", "a") is t.span("d2h", "b")


def test_chrome_trace_has_labelled_lanes(tmp_path):
    path = tmp_path / "trace.json"
    _hand_made().to_chrome_trace(path)
    trace = json.loads(path.read_text())["traceEvents"]
    names = {e["tid"]: e["args"]["name"] for e in trace if e["ph"] == "M" and e["name"] == "thread_name"}
    assert list(names.values()) == ["gpu", "h2d", "cpu_optim"]
    complete = [e for e in trace if e["ph"] == "X"]
    assert len(complete) == 5
    bwd1 = next(e for e in complete if e["name"] == "bwd:1")
    assert names[bwd1["tid"]] == "gpu" and bwd1["ts"] == pytest.approx(5e6) and bwd1["dur"] == pytest.approx(3e6)
    assert bwd1["cat"] == "bwd"
    assert next(e for e in complete if e["name"] == "h2d_w16:1")["args"] == {"nbytes": 1 << 20}


def test_plot_writes_png_for_a_busy_step(tmp_path):
    t = tl.Timeline()
    # ~300 events: 40 blocks of fwd, bwd, h2d, d2h, update, plus disk reads and a head.
    for i in range(40):
        t.add("gpu", f"fwd:{i}", i * 1e-3, i * 1e-3 + 0.9e-3)
        t.add("h2d", f"h2d_w16:{i}", i * 1e-3 - 0.5e-3, i * 1e-3 + 0.2e-3)
        t.add("h2d", f"h2d_act:{i}", i * 1e-3 - 0.3e-3, i * 1e-3 + 0.1e-3)  # concurrent in its lane
        b = 41e-3 + (39 - i) * 2e-3
        t.add("gpu", f"bwd:{i}", b, b + 1.9e-3)
        t.add("d2h", f"d2h_grad:{i}", b + 1.9e-3, b + 2.5e-3)
        t.add("cpu_optim", f"update:{i}", b + 2.5e-3, b + 5e-3)
        t.add("disk", f"read_state:{i}", b - 3e-3, b)
        t.add("host", f"wait:{i}", b, b + 0.1e-3)
    t.add("gpu", "head", 40e-3, 41e-3)
    t.add("misc", "other", 0.0, 1e-3)
    path = tmp_path / "step.png"
    t.plot(path, title="test step")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    empty = tmp_path / "empty.png"
    tl.Timeline().plot(empty)
    assert empty.stat().st_size > 0
