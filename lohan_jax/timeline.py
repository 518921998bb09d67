"""The step timeline: timed events per lane (gpu, h2d, d2h, cpu_optim, disk, host), exported as a Chrome /
Perfetto trace, a Gantt chart, and a summary of busy and overlapped time.

Pure Python (+ matplotlib, imported only by `plot`); never imports jax.
"""

from __future__ import annotations

import json
import os
import re
import threading
import time
from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple, Self

# Lanes in display order; lanes not listed follow in order of first appearance.
LANE_ORDER = ("gpu", "h2d", "d2h", "cpu_optim", "disk", "host")

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
        for row, lane in enumerate(lanes):
            y_top = len(lanes) - 1 - row  # first lane on top
            subrows = _assign_subrows([e for e in events if e.lane == lane])
            n_sub = max((s for _, s in subrows), default=0) + 1
            height = 0.8 / n_sub
            for e, sub in subrows:
                start_ms, dur_ms = (e.start_ns - t0) / 1e6, e.dur_ns / 1e6
                y = y_top - 0.4 + sub * height
                ax.broken_barh([(start_ms, max(dur_ms, total_ms * 1e-4))], (y, height * 0.92),
                               facecolors=color(name_prefix(e.name)), edgecolor="black", linewidth=0.2)
                if dur_ms > 0.04 * total_ms and n_sub == 1:  # label only bars wide enough to hold text
                    ax.text(start_ms + dur_ms / 2, y + height * 0.46, e.name, ha="center", va="center",
                            fontsize=6, clip_on=True)
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
