"""Tests of lohan_jax.timeline: recording from threads, trace and plot export, busy/overlap arithmetic; reading
the traces torch.profiler and jax.profiler write (real ones on the CPU, synthetic ones shaped like their GPU traces)."""

import gzip
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


# ---- traces written by other profilers ---------------------------------------------------------------------------
def _meta(kind: str, pid, name: str, tid=0) -> dict:
    return {"ph": "M", "name": kind, "pid": pid, "tid": tid, "args": {"name": name}}


def _x(name: str, ts: float, dur: float, pid, tid, cat=None, **args) -> dict:
    event = {"ph": "X", "name": name, "ts": ts, "dur": dur, "pid": pid, "tid": tid, "args": args}
    return {**event, "cat": cat} if cat else event


def _torch_gpu_trace() -> list[dict]:
    """Shaped like torch.profiler's export_chrome_trace on a GPU (kineto: GPU activity under pid = device, tid =
    stream, cat kernel / gpu_memcpy / gpu_memset; record_function ranges as user_annotation). Times in us."""
    cpu, gpu = 4242, 0
    return [
        _meta("process_name", cpu, "python"), _meta("thread_name", cpu, "thread 4242 (python)", cpu),
        _meta("process_name", gpu, "python"), _meta("thread_name", gpu, "stream 7 ", 7),
        _x(tl.STEP_MARKER, 100, 1000, cpu, cpu, "user_annotation"),
        _x(tl.STEP_MARKER, 150, 900, gpu, 7, "gpu_user_annotation"),
        _x("aten::mm", 120, 30, cpu, cpu, "cpu_op"),  # a launch, not compute: dropped
        _x("cudaLaunchKernel", 130, 5, cpu, cpu, "cuda_runtime"),
        _x("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64", 150, 300, gpu, 7, "kernel"),
        _x("Memcpy HtoD (Pinned -> Device)", 450, 100, gpu, 7, "gpu_memcpy", bytes=2_000_000),
        _x("Memcpy DtoH (Device -> Pinned)", 560, 40, gpu, 7, "gpu_memcpy", bytes=1_000_000),
        _x("Memcpy DtoD (Device -> Device)", 600, 10, gpu, 7, "gpu_memcpy", bytes=10),  # no lane of ours
        _x("Memset (Device)", 610, 5, gpu, 7, "gpu_memset"),
        _x("Optimizer.step#DeepSpeedCPUAdam.step", 500, 400, cpu, cpu, "user_annotation"),  # host: launches nothing
        _x("Optimizer.step#AdamW.step", 950, 40, cpu, cpu, "user_annotation"),  # launches a kernel: a GPU optimizer
        _x("cudaLaunchKernel", 960, 5, cpu, cpu, "cuda_runtime"),
        _x("Optimizer.step#AdamW.step", 970, 30, gpu, 7, "gpu_user_annotation"),
        _x("void at::native::elementwise_kernel", 970, 30, gpu, 7, "kernel"),
        _x("void at::native::elementwise_kernel", 1050, 100, gpu, 7, "kernel"),  # straddles the window's end
        _x("void at::native::elementwise_kernel", 1200, 10, gpu, 7, "kernel"),  # after it: dropped
    ]


def _jax_gpu_trace() -> list[dict]:
    """Shaped like jax.profiler's perfetto_trace.json.gz on a GPU (XLA's trace viewer: one process per XPlane,
    "/host:CPU" and "/device:GPU:0", one thread per line; CUPTI's stream lines "Stream #N(<event types>)", copies
    named MemcpyH2D / MemcpyD2H; derived lines such as "XLA Ops" repeat the kernels)."""
    host, dev = 701, 1
    return [
        _meta("process_name", host, "/host:CPU"), _meta("thread_name", host, "python", 11),
        _meta("process_name", dev, "/device:GPU:0"), _meta("thread_name", dev, "Stream #14(Compute,MemcpyH2D)", 14),
        _meta("thread_name", dev, "Stream #15(MemcpyD2H)", 15), _meta("thread_name", dev, "XLA Ops", 3),
        _x(tl.STEP_MARKER, 0, 500, host, 11),
        _x("jit_train_step", 10, 20, host, 11, hlo_module="jit_train_step", hlo_op="fusion.3"),  # a launch beside a GPU
        _x("loop_multiply_fusion", 40, 200, dev, 14, hlo_op="fusion.3"),
        _x("fusion.3", 40, 200, dev, 3),  # the same kernel on a derived line
        _x("MemcpyH2D", 250, 100, dev, 14),
        _x("MemcpyD2H", 200, 150, dev, 15),
        _x("MemcpyD2D", 360, 10, dev, 14),
        _x("Memset", 380, 10, dev, 14),
    ]


def _write(path, events):
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "wt", encoding="utf-8") as f:
        json.dump({"traceEvents": events, "displayTimeUnit": "ms"}, f)
    return path


def test_torch_gpu_trace_lanes_window_and_figures(tmp_path):
    t = tl.timeline_from_trace(_write(tmp_path / "torch.json", _torch_gpu_trace()), window=tl.STEP_MARKER)
    by_lane = {lane: [e.name for e in t.events if e.lane == lane] for lane in t.lanes()}
    assert list(by_lane) == ["gpu", "h2d", "d2h", "cpu_optim", "host"]
    assert by_lane["h2d"] == ["h2d:Memcpy HtoD (Pinned -> Device)"]
    assert by_lane["d2h"] == ["d2h:Memcpy DtoH (Device -> Pinned)"]
    assert by_lane["cpu_optim"] == ["update:Optimizer.step#DeepSpeedCPUAdam.step"]
    assert by_lane["host"] == ["step"] and len(by_lane["gpu"]) == 3  # the kernel after the window is dropped
    last = max((e for e in t.events if e.lane == "gpu"), key=lambda e: e.start_ns)
    assert last.end_ns == 1_100_000  # clipped to the window (100 + 1000 us)
    f = tl.step_figures(t)
    assert f["timeline_step_s"] == pytest.approx(1000e-6)
    assert f["gpu_busy_fraction"] == pytest.approx((300 + 30 + 50) / 1000)
    assert f["h2d_busy_s"] == pytest.approx(100e-6) and f["h2d_gbps"] == pytest.approx(2e6 / 100e-6 / 1e9)
    assert f["d2h_gbps"] == pytest.approx(1e6 / 40e-6 / 1e9)
    assert f["cpu_optim_s"] == pytest.approx(400e-6) and f["cpu_optim_hidden_fraction"] == 0.0
    assert f["host_compute_busy_fraction"] is None


def test_jax_gpu_trace_lanes(tmp_path):
    t = tl.timeline_from_trace(_write(tmp_path / "perfetto_trace.json.gz", _jax_gpu_trace()), window=tl.STEP_MARKER)
    got = [(e.lane, e.name) for e in t.events if e.lane != "host"]
    assert got == [("gpu", "kernel:loop_multiply_fusion"), ("d2h", "d2h:MemcpyD2H"), ("h2d", "h2d:MemcpyH2D")]
    assert tl.step_figures(t)["gpu_busy_fraction"] == pytest.approx(200 / 500)


def test_nothing_recognisable_or_no_marker_is_an_error(tmp_path):
    path = _write(tmp_path / "cpu_ops.json", [_x("aten::mm", 0, 10, 1, 1, "cpu_op"), _x("MemcpyH2D", 0, 5, 1, 1)])
    with pytest.raises(ValueError, match=r"cpu_ops\.json: nothing recognisable.*GPU kernels"):
        tl.timeline_from_trace(path)
    torch_trace = _write(tmp_path / "torch.json", _torch_gpu_trace())
    with pytest.raises(ValueError, match="torch.json: no event named 'other_step'"):
        tl.timeline_from_trace(torch_trace, window="other_step")
    window = [_x("marker", 0, 10, 1, 1), _x("k", 20, 5, 1, 1, "kernel")]  # recognisable, but not in the step
    with pytest.raises(ValueError, match="nothing recognisable within 'marker'"):
        tl.timeline_from_trace(_write(tmp_path / "late.json", window), window="marker")


def test_reads_a_jax_cpu_trace(tmp_path):
    """On the CPU backend XLA's ops run on host threads: they are the step's compute (host_compute), no GPU lane."""
    import jax
    import jax.numpy as jnp

    f = jax.jit(lambda a: jnp.tanh(a @ a).sum())
    x = jnp.ones((128, 128), jnp.float32)
    f(x).block_until_ready()
    with jax.profiler.trace(tmp_path, create_perfetto_trace=True), jax.profiler.TraceAnnotation(tl.STEP_MARKER):
        f(x).block_until_ready()
    (path,) = tmp_path.glob("plugins/profile/*/perfetto_trace.json.gz")
    t = tl.timeline_from_trace(path, window=tl.STEP_MARKER)
    assert t.lanes() == ["host_compute", "host"]
    assert all(e.name.startswith("xla:") for e in t.events if e.lane == "host_compute")
    figures = tl.step_figures(t)
    assert figures["gpu_busy_fraction"] is None and 0 < figures["host_compute_busy_fraction"] <= 1


def test_reads_a_torch_cpu_trace(tmp_path):
    """A matmul and torch's AdamW on CPU tensors: the optimizer step is the host optimizer; the matmul's CPU ops
    are not classified (on a GPU they would be launches) and are dropped."""
    torch = pytest.importorskip("torch")
    w = torch.nn.Parameter(torch.randn(32, 32))
    opt = torch.optim.AdamW([w])
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        with torch.profiler.record_function(tl.STEP_MARKER):
            (torch.randn(8, 32) @ w).square().mean().backward()
            opt.step()
    prof.export_chrome_trace(str(tmp_path / "torch.json"))
    t = tl.timeline_from_trace(tmp_path / "torch.json", window=tl.STEP_MARKER)
    got = [(e.lane, e.name) for e in t.events if e.lane != "host"]
    assert got == [("cpu_optim", "update:Optimizer.step#AdamW.step")]
    assert tl.step_figures(t)["cpu_optim_s"] > 0
