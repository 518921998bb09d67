"""The step timeline: timed events per lane (gpu, h2d, d2h, cpu_optim, disk, host), exported as a Chrome /
Perfetto trace, a Gantt chart, and a summary of busy and overlapped time; the same lanes (and host_compute: XLA's
ops on the CPU backend) read from the traces torch.profiler and jax.profiler write, for the baselines' steps.

Pure Python (+ matplotlib, imported only by `plot`); never imports jax.
"""

from __future__ import annotations

import bisect
import gzip
import json
import math
import os
import re
import threading
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, NamedTuple, Self

# Lanes in display order; lanes not listed follow in order of first appearance.
LANE_ORDER = ("gpu", "host_compute", "h2d", "d2h", "cpu_optim", "disk", "host")

# Bar colours by event-name prefix (the text before the first non-alphanumeric character, lower-cased).
PREFIX_COLORS = {
    "fwd": "#1f77b4", "bwd": "#ff7f0e", "recompute": "#bcbd22", "head": "#9467bd", "loss": "#9467bd",
    "update": "#2ca02c", "adam": "#2ca02c", "h2d": "#17becf", "d2h": "#d62728", "read": "#8c564b",
    "write": "#e377c2", "wait": "#7f7f7f",
}
_FALLBACK_COLORS = ("#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5", "#c49c94", "#f7b6d2", "#dbdb8d",
                    "#9edae5", "#393b79", "#637939", "#8c6d31", "#843c39", "#7b4173")
_MAX_SUBROWS = 4  # concurrent events in one lane are drawn on up to this many sub-rows


class Event(NamedTuple):
    """One timed event; times are `time.perf_counter_ns()` values."""

    lane: str
    name: str
    start_ns: int
    end_ns: int
    args: dict[str, Any]

    @property
    def dur_ns(self) -> int:
        return self.end_ns - self.start_ns


def name_prefix(name: str) -> str:
    """"h2d_w16:3" -> "h2d", "fwd 12" -> "fwd": the category used for colours and the trace's `cat`."""
    return re.split(r"[^A-Za-z0-9]", name, maxsplit=1)[0].lower() or name


# ------------------------------------------------------------------------------------- interval arithmetic


def union_intervals(intervals: Iterable[tuple[float, float]]) -> list[tuple[float, float]]:
    """Sorted, disjoint union of [start, end) intervals (empty and inverted intervals dropped)."""
    merged: list[list[float]] = []
    for start, end in sorted(iv for iv in intervals if iv[1] > iv[0]):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return [(s, e) for s, e in merged]


def total_length(disjoint: Sequence[tuple[float, float]]) -> float:
    return sum(e - s for s, e in disjoint)


def intersection_length(a: Sequence[tuple[float, float]], b: Sequence[tuple[float, float]]) -> float:
    """Length of the intersection of two sorted, disjoint interval lists (as `union_intervals` returns)."""
    i = j = 0
    overlap = 0.0
    while i < len(a) and j < len(b):
        lo, hi = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
        if hi > lo:
            overlap += hi - lo
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return overlap


# ----------------------------------------------------------------------------------------------- recorder


class _Span:
    __slots__ = ("_args", "_lane", "_name", "_start_ns", "_timeline")

    def __init__(self, timeline: Timeline, lane: str, name: str, args: dict[str, Any]):
        self._timeline, self._lane, self._name, self._args = timeline, lane, name, args

    def __enter__(self) -> Self:
        self._start_ns = time.perf_counter_ns()
        return self

    def __exit__(self, *exc_info) -> None:
        self._timeline._append(Event(self._lane, self._name, self._start_ns, time.perf_counter_ns(), self._args))


class _NullSpan:
    __slots__ = ()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info) -> None:
        pass


_NULL_SPAN = _NullSpan()


class Timeline:
    """Thread-safe recorder of the events of a step (or several).

    with timeline.span("gpu", "fwd:3", block=3): ...          # wall time of the enclosed code
    timeline.add("h2d", "h2d_w16:4", start_s, end_s, nbytes=n)  # times known afterwards, in `now_s()` seconds

    A disabled timeline records nothing and `span` returns a shared no-op context manager.
    """

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self._events: list[Event] = []
        self._lock = threading.Lock()

    @staticmethod
    def now_s() -> float:
        """The clock of all events (`time.perf_counter`), in seconds: use it for `add`'s start_s / end_s."""
        return time.perf_counter_ns() / 1e9

    def span(self, lane: str, name: str, **args: Any) -> _Span | _NullSpan:
        """Context manager recording the wall-clock interval of its body as one event."""
        if not self.enabled:
            return _NULL_SPAN
        return _Span(self, lane, name, args)

    def add(self, lane: str, name: str, start_s: float, end_s: float, **args: Any) -> None:
        """Record an event whose times (in `now_s()` seconds) were observed afterwards."""
        if not self.enabled:
            return
        if end_s < start_s:
            raise ValueError(f"Timeline.add: {lane}/{name} ends before it starts ({end_s} < {start_s})")
        self._append(Event(lane, name, round(start_s * 1e9), round(end_s * 1e9), args))

    def _append(self, event: Event) -> None:
        with self._lock:
            self._events.append(event)

    @property
    def events(self) -> list[Event]:
        """A copy of the events, sorted by start time."""
        with self._lock:
            return sorted(self._events, key=lambda e: (e.start_ns, e.end_ns))

    def __len__(self) -> int:
        with self._lock:
            return len(self._events)

    def clear(self) -> None:
        with self._lock:
            self._events.clear()

    def lanes(self) -> list[str]:
        """Lanes with events, in display order: LANE_ORDER first, then others by first appearance."""
        return _ordered_lanes(self.events)

    # ------------------------------------------------------------------------------------------- summary

    def busy_intervals_s(self, lane: str) -> list[tuple[float, float]]:
        """Union of the lane's events, in seconds relative to the first event of the timeline."""
        events = self.events
        return _busy_intervals_s(events, lane, events[0].start_ns) if events else []

    def overlap_s(self, lane: str, other: str) -> float:
        """Seconds during which both lanes were busy (e.g. cpu_optim time hidden behind gpu time)."""
        events = self.events
        if not events:
            return 0.0
        t0 = events[0].start_ns
        return intersection_length(_busy_intervals_s(events, lane, t0), _busy_intervals_s(events, other, t0))

    def summary(self) -> dict[str, Any]:
        """Busy time per lane and pairwise overlap, JSON-serialisable; seconds from the first event.

        {"total_s": last end - first start,
         "lanes": {lane: {"n_events", "busy_s" (union, not sum), "first_s", "last_s", "busy_fraction"}},
         "overlap_s": {lane: {other: seconds both busy}}}
        so the CPU optimizer's hidden share is overlap_s["cpu_optim"]["gpu"] / lanes["cpu_optim"]["busy_s"].
        """
        events = self.events
        if not events:
            return {"total_s": 0.0, "lanes": {}, "overlap_s": {}}
        t0 = events[0].start_ns
        total_s = (max(e.end_ns for e in events) - t0) / 1e9
        lanes = _ordered_lanes(events)
        busy = {lane: _busy_intervals_s(events, lane, t0) for lane in lanes}
        lane_stats = {}
        for lane in lanes:
            mine = [e for e in events if e.lane == lane]
            busy_s = total_length(busy[lane])
            lane_stats[lane] = {
                "n_events": len(mine),
                "busy_s": busy_s,
                "first_s": (mine[0].start_ns - t0) / 1e9,
                "last_s": (max(e.end_ns for e in mine) - t0) / 1e9,
                "busy_fraction": busy_s / total_s if total_s > 0 else 0.0,
            }
        overlap = {a: {b: intersection_length(busy[a], busy[b]) for b in lanes if b != a} for a in lanes}
        return {"total_s": total_s, "lanes": lane_stats, "overlap_s": overlap}

    # -------------------------------------------------------------------------------------------- export

    def to_chrome_trace(self, path: str | os.PathLike) -> None:
        """Write Chrome / Perfetto trace-event JSON: "X" events (ts, dur in us from the first event), one tid
        per lane, labelled and ordered by thread_name / thread_sort_index metadata."""
        events = self.events
        t0 = events[0].start_ns if events else 0
        lanes = _ordered_lanes(events)
        tids = {lane: i + 1 for i, lane in enumerate(lanes)}
        trace: list[dict[str, Any]] = [{"ph": "M", "name": "process_name", "pid": 1, "tid": 0,
                                        "args": {"name": "lohan_jax step"}}]
        for lane, tid in tids.items():
            trace.append({"ph": "M", "name": "thread_name", "pid": 1, "tid": tid, "args": {"name": lane}})
            trace.append({"ph": "M", "name": "thread_sort_index", "pid": 1, "tid": tid, "args": {"sort_index": tid}})
        for e in events:
            trace.append({"ph": "X", "name": e.name, "cat": name_prefix(e.name), "pid": 1, "tid": tids[e.lane],
                          "ts": (e.start_ns - t0) / 1e3, "dur": e.dur_ns / 1e3, "args": e.args})
        with open(path, "w", encoding="utf-8") as f:
            json.dump({"traceEvents": trace, "displayTimeUnit": "ms"}, f, default=str)

    def plot(self, path_png: str | os.PathLike, title: str | None = None) -> None:
        """Gantt chart of the events (one row per lane, ms from the first event, colours by name prefix).

        Uses matplotlib's Agg canvas directly, so it neither needs a display nor touches pyplot's state.
        Events that overlap within a lane are stacked on sub-rows so that none hides another.
        """
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.patches import Patch

        events = self.events
        lanes = _ordered_lanes(events)
        t0 = events[0].start_ns if events else 0
        colors: dict[str, str] = {}

        def color(prefix: str) -> str:
            if prefix not in colors:
                n_fallback = sum(1 for p in colors if p not in PREFIX_COLORS)
                colors[prefix] = PREFIX_COLORS.get(prefix, _FALLBACK_COLORS[n_fallback % len(_FALLBACK_COLORS)])
            return colors[prefix]

        fig = Figure(figsize=(14, 1.2 + 0.7 * max(len(lanes), 1)), dpi=110)
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        total_ms = (max(e.end_ns for e in events) - t0) / 1e6 if events else 1.0
        # one broken_barh per (sub-row, colour): a profiler's step has ~10^4 kernels, one call each took 2 min
        bars: dict[tuple[float, float, str], list[tuple[float, float]]] = {}
        for row, lane in enumerate(lanes):
            y_top = len(lanes) - 1 - row  # first lane on top
            subrows = _assign_subrows([e for e in events if e.lane == lane])
            n_sub = max((s for _, s in subrows), default=0) + 1
            height = 0.8 / n_sub
            for e, sub in subrows:
                start_ms, dur_ms = (e.start_ns - t0) / 1e6, e.dur_ns / 1e6
                y = y_top - 0.4 + sub * height
                bars.setdefault((y, height * 0.92, color(name_prefix(e.name))), []).append(
                    (start_ms, max(dur_ms, total_ms * 1e-4)))
                if dur_ms > 0.04 * total_ms and n_sub == 1:  # label only bars wide enough to hold text
                    ax.text(start_ms + dur_ms / 2, y + height * 0.46, e.name, ha="center", va="center",
                            fontsize=6, clip_on=True)
        for (y, height, facecolor), xranges in bars.items():
            ax.broken_barh(xranges, (y, height), facecolors=facecolor, edgecolor="black", linewidth=0.2)
        ax.set_yticks(range(len(lanes)), labels=list(reversed(lanes)))
        ax.set_ylim(-0.6, max(len(lanes), 1) - 0.4)
        ax.set_xlim(0, total_ms * 1.01)
        ax.set_xlabel("time from first event (ms)")
        ax.grid(axis="x", alpha=0.3)
        if title:
            ax.set_title(title)
        if colors:
            ax.legend(handles=[Patch(facecolor=c, label=p) for p, c in colors.items()], loc="upper left",
                      bbox_to_anchor=(1.0, 1.0), fontsize=8, frameon=False)
        fig.tight_layout()
        fig.savefig(os.fspath(path_png))


# ------------------------------------------------------------------------ traces written by other profilers

STEP_MARKER = "lohan_jax_traced_step"  # wraps a runner's traced step: the `window` below (no ":" or "/", which
# jax.profiler reads as a TensorFlow op "name:type" and shortens)
DEVICE_LANES = ("gpu", "h2d", "d2h")
# event-name prefix per lane: picks the bar colour (PREFIX_COLORS) and keeps the legend to one entry per lane
_LABELS = {"gpu": "kernel", "h2d": "h2d", "d2h": "d2h", "cpu_optim": "update", "host_compute": "xla"}
_MAX_NAME = 100  # characters of a kernel's name kept (C++ template names run to thousands)


def timeline_from_trace(path: str | os.PathLike, *, window: str | None = None) -> Timeline:
    """Our lanes from a Chrome / Perfetto trace-event JSON (plain or .gz) written by another profiler, so that a
    baseline's step reads like ours: torch.profiler's `export_chrome_trace`, jax.profiler's perfetto_trace.json.gz.

    Complete ("X") events are classified from the trace's own metadata (pid/tid named by the "M" process_name /
    thread_name events, torch's `cat`, the names the CUDA tracers give copies):
      gpu           torch: cat "kernel". jax: events on a "Stream #N(...)" thread of a "/device:GPU:N" process,
                    copies and memsets excepted
      h2d, d2h      torch: cat "gpu_memcpy", "Memcpy HtoD (Pinned -> Device)" / "Memcpy DtoH (...)". jax: the
                    stream events "MemcpyH2D" / "MemcpyD2H"
      cpu_optim     torch: a user_annotation "Optimizer.step#<class>.step" (every torch optimizer's step) whose
                    thread launched no GPU kernel meanwhile: DeepSpeed's CPU Adam, torch's optimizers on CPU tensors
      host_compute  jax: XLA ops run by host threads (an "hlo_op" arg), only in a trace without device lanes: on
                    the CPU backend they are the compute, beside a GPU they would be launches
    Everything else (device-to-device copies, memsets, ops that launch GPU work, Python frames) is dropped.
    window: the name of the event(s) marking the step (STEP_MARKER); events are clipped to their span, which is
    also recorded as the host lane's "step" event (the step's wall time).
    """
    opener = gzip.open if os.fspath(path).endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        data = json.load(f)
    raw = data["traceEvents"] if isinstance(data, dict) else data
    names: dict[tuple, str] = {}  # (pid,) -> process name, (pid, tid) -> thread name
    for e in raw:
        if e.get("ph") == "M" and e.get("name") in ("process_name", "thread_name"):
            key = (e.get("pid"),) if e["name"] == "process_name" else (e.get("pid"), e.get("tid"))
            names[key] = str((e.get("args") or {}).get("name", ""))
    complete = [e for e in raw if e.get("ph") == "X" and "ts" in e]
    lo_us, hi_us = _window_us(complete, window, path) if window else (-math.inf, math.inf)
    launches: dict[tuple, list[float]] = {}  # (pid, tid) -> start times of its GPU kernel launches
    for e in complete:
        if e.get("cat") in ("cuda_runtime", "cuda_driver") and "Launch" in str(e.get("name")):
            launches.setdefault((e.get("pid"), e.get("tid")), []).append(e["ts"])
    for times in launches.values():
        times.sort()
    picked = []
    for e in complete:
        pid, tid = e.get("pid"), e.get("tid")
        lane = _trace_lane(e, names.get((pid,), ""), names.get((pid, tid), ""), launches.get((pid, tid), []))
        start, end = max(e["ts"], lo_us), min(e["ts"] + e.get("dur", 0), hi_us)
        if lane and end > start:
            picked.append((lane, e, start, end))
    if any(lane in DEVICE_LANES for lane, *_ in picked):
        picked = [p for p in picked if p[0] != "host_compute"]
    if not picked:
        raise ValueError(
            f"{os.fspath(path)}: nothing recognisable{f' within {window!r}' if window else ''}: looked for GPU kernels "
            "(torch cat 'kernel'; jax '/device:GPU' 'Stream #' threads), host<->device copies ('Memcpy HtoD'/'DtoH', "
            "'MemcpyH2D'/'D2H'), host optimizer steps ('Optimizer.step#...' launching no kernel) and XLA host ops "
            "('hlo_op' on a '/host:' process)")
    timeline = Timeline()
    if window:
        timeline.add("host", "step", lo_us / 1e6, hi_us / 1e6)
    for lane, e, start, end in picked:
        nbytes = (e.get("args") or {}).get("bytes")  # torch's copies carry their size
        timeline.add(lane, f"{_LABELS[lane]}:{str(e.get('name'))[:_MAX_NAME]}", start / 1e6, end / 1e6,
                     **({"bytes": nbytes} if isinstance(nbytes, int | float) else {}))
    return timeline


def _trace_lane(e: dict, process: str, thread: str, launches_us: list[float]) -> str | None:
    name, cat = str(e.get("name", "")), e.get("cat")
    if cat == "kernel":
        return "gpu"
    if cat == "gpu_memcpy":
        return _copy_lane(name)
    if process.startswith("/device:GPU") and thread.startswith("Stream #"):
        return _copy_lane(name) if name.startswith(("Memcpy", "Memset")) else "gpu"
    if cat == "user_annotation" and name.startswith("Optimizer.step#"):
        i = bisect.bisect_left(launches_us, e["ts"])
        return None if i < len(launches_us) and launches_us[i] <= e["ts"] + e.get("dur", 0) else "cpu_optim"
    if process.startswith("/host:") and "hlo_op" in (e.get("args") or {}):
        return "host_compute"
    return None


def _copy_lane(name: str) -> str | None:
    """h2d / d2h from a copy's name (torch "Memcpy HtoD (Pinned -> Device)", XLA "MemcpyH2D"); else None."""
    if "HtoD" in name or "H2D" in name:
        return "h2d"
    if "DtoH" in name or "D2H" in name:
        return "d2h"
    return None


def _window_us(events: list[dict], marker: str, path) -> tuple[float, float]:
    marks = [e for e in events if e.get("name") == marker]
    if not marks:
        raise ValueError(f"{os.fspath(path)}: no event named {marker!r} marks the step to keep")
    return min(e["ts"] for e in marks), max(e["ts"] + e.get("dur", 0) for e in marks)


def step_figures(timeline: Timeline) -> dict[str, float | None]:
    """What a result row carries from a step's timeline: its length, the GPU's busy fraction, each copy
    direction's busy time (and rate, where the events carry bytes), the host optimizer's time and the share of it
    hidden behind GPU work, the host's XLA compute (CPU backend); None where the timeline has no such lane."""
    s = timeline.summary()
    total, lanes = s["total_s"], s["lanes"]
    busy = lambda lane: lanes[lane]["busy_s"] if lane in lanes else None
    fraction = lambda lane: lanes[lane]["busy_fraction"] if lane in lanes else None
    nbytes = {lane: sum(e.args.get("bytes", 0) for e in timeline.events if e.lane == lane) for lane in ("h2d", "d2h")}
    gbps = lambda lane: nbytes[lane] / busy(lane) / 1e9 if nbytes[lane] and busy(lane) else None
    cpu = busy("cpu_optim")
    hidden = s["overlap_s"]["cpu_optim"]["gpu"] / cpu if cpu and "gpu" in lanes else None
    return {"timeline_step_s": total, "gpu_busy_fraction": fraction("gpu"), "h2d_busy_s": busy("h2d"),
            "d2h_busy_s": busy("d2h"), "h2d_gbps": gbps("h2d"), "d2h_gbps": gbps("d2h"), "cpu_optim_s": cpu,
            "cpu_optim_hidden_fraction": hidden,
            "host_compute_busy_fraction": fraction("host_compute")}


def write_step_timeline(timeline: Timeline, out_dir: str | os.PathLike, stem: str, title: str) -> dict[str, Any]:
    """<out_dir>/<stem>.trace.json and .png; returns step_figures plus the PNG's path (for the result row)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    timeline.to_chrome_trace(out_dir / f"{stem}.trace.json")
    timeline.plot(out_dir / f"{stem}.png", title=title)
    return {**step_figures(timeline), "timeline_png": str(out_dir / f"{stem}.png")}


def _ordered_lanes(events: Sequence[Event]) -> list[str]:
    seen = list(dict.fromkeys(e.lane for e in events))
    return [lane for lane in LANE_ORDER if lane in seen] + [lane for lane in seen if lane not in LANE_ORDER]


def _busy_intervals_s(events: Sequence[Event], lane: str, t0_ns: int) -> list[tuple[float, float]]:
    return union_intervals(((e.start_ns - t0_ns) / 1e9, (e.end_ns - t0_ns) / 1e9) for e in events if e.lane == lane)


def _assign_subrows(events: Sequence[Event]) -> list[tuple[Event, int]]:
    """Greedy interval packing: each event goes to the lowest sub-row free at its start (at most
    _MAX_SUBROWS; past that, bars share the last sub-row)."""
    row_ends: list[int] = []
    placed = []
    for e in sorted(events, key=lambda e: e.start_ns):
        for i, end in enumerate(row_ends):
            if end <= e.start_ns:
                row_ends[i] = e.end_ns
                placed.append((e, i))
                break
        else:
            if len(row_ends) < _MAX_SUBROWS:
                row_ends.append(e.end_ns)
                placed.append((e, len(row_ends) - 1))
            else:
                row_ends[-1] = max(row_ends[-1], e.end_ns)
                placed.append((e, _MAX_SUBROWS - 1))
    return placed
