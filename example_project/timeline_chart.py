"""A PNG Gantt chart of the ``make demo`` timeline (see :mod:`example_project.timeline`).

One lane per worker process; each task run is a bar from its ``start`` to its ``end``
event, coloured by outcome; the part of a run spent waiting for a throttle slot (from its
``slot waiting`` event to its ``slot acquired``) is covered by a grey cross-hatched box, so
it does not read as running; throttled slot holds are hatched bands inside the bars; state
transitions are tick marks under the bars with the target state. The legend lists only the
kinds of thing the run has. Drawn with matplotlib
(the ``dev`` extra) on a figure of its own Agg canvas, without pyplot or any global state;
importing this module raises ``ImportError`` without matplotlib.

The module does not import Django: it takes the event dicts that
:func:`example_project.timeline.read_timeline` returns.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from matplotlib.artist import Artist
from matplotlib.axes import Axes
from matplotlib.backend_bases import RendererBase
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import to_rgb
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.text import Annotation
from matplotlib.ticker import FuncFormatter, MaxNLocator
from matplotlib.transforms import Bbox

SUCCESS_COLOUR, FAILURE_COLOUR = "#62b268", "#d64e46"
RETRY_COLOUR = "#eca82c"  # a busy slot or self.retry() re-queued the task
UNKNOWN_COLOUR = "#a8a8a8"  # no end event, or another final state
#: A run waiting for its throttle slot: neither running nor holding anything yet.
WAIT_COLOUR, WAIT_EDGE, WAIT_HATCH = "#e1e4e8", "#7d848c", "xx"
#: Waits shorter than this (seconds) are the store's round trip of a slot granted at once,
#: not waiting for another holder: not drawn.
MIN_WAIT = 0.05
OUTCOMES = dict(SUCCESS=SUCCESS_COLOUR, FAILURE=FAILURE_COLOUR, RETRY=RETRY_COLOUR, UNKNOWN=UNKNOWN_COLOUR)
LEGEND = dict(SUCCESS="success", FAILURE="failure", RETRY="retry / re-queued", UNKNOWN="no end / other state")
#: Slot groups get these in order of first acquisition (then repeat).
SLOT_COLOURS = ("#2559ad", "#803ea0", "#007c80", "#965414", "#c42e80")
LANE_SHADE, GRID, TEXT, MUTED, EDGE = "#f4f6f9", "#dee2e8", "#212529", "#687078", "#0000004d"
HATCH, TICK_COLOUR = "////", "#2d2d2d"
TICK: dict[str, Any] = dict(color=TICK_COLOUR, marker="|", linestyle="none", markersize=10, markeredgewidth=2)
# Pixels at DPI: the figure's width and margins, one lane per worker process, the x axis, a legend row.
WIDTH, DPI, LEFT, RIGHT, TOP, BOTTOM = 1400, 100, 170, 40, 78, 14
LANE_HEIGHT, AXIS_HEIGHT, LEGEND_ROW = 92, 52, 24
LEGEND_COLUMNS, MIN_BAR = 4, 4  # MIN_BAR px: a run of a few milliseconds still shows
# In lane units (a lane spans 1, top-down): a row for the names of narrow bars, the bar (its
# lower part for slot holds), then the transitions' labels.
BAR_TOP, BAR_HEIGHT, SLOT_BAND = 0.24, 0.35, 0.12


@dataclass
class TaskRun:
    """One run of a task in a worker process: ``start`` to ``end`` in seconds since the
    first event (``end`` is the last event's time when the run never ended)."""

    pid: int
    task: str
    args: str
    start: float
    end: float = math.nan
    state: str | None = None
    failed: bool = False
    retried: bool = False

    @property
    def short_name(self) -> str:
        return self.task.rsplit(".", 1)[-1]

    @property
    def outcome(self) -> str:
        """SUCCESS, FAILURE, RETRY or UNKNOWN."""
        if self.state is None:
            return "FAILURE" if self.failed else "RETRY" if self.retried else "UNKNOWN"
        return self.state if self.state in OUTCOMES else "UNKNOWN"


class SlotHold(NamedTuple):
    """A slot of ``group`` held by process ``pid`` from ``start`` to ``end``."""

    group: str
    pid: int
    start: float
    end: float


class SlotWait(NamedTuple):
    """Process ``pid`` waiting for a slot of ``group`` from ``start`` until it got one (or
    its run ended without one) at ``end``."""

    group: str
    pid: int
    start: float
    end: float


class Transition(NamedTuple):
    pid: int
    at: float
    entity: str
    target: str


def outcome_colour(outcome: str) -> str:
    return OUTCOMES.get(outcome, UNKNOWN_COLOUR)


@dataclass
class ChartLayout:
    """What the chart shows, in seconds since the first event; lanes top-down in ``pids``."""

    duration: float  # seconds from the first event to the last
    pids: list[int] = field(default_factory=list)
    queues: dict[int, str] = field(default_factory=dict)
    runs: list[TaskRun] = field(default_factory=list)
    holds: list[SlotHold] = field(default_factory=list)
    waits: list[SlotWait] = field(default_factory=list)
    transitions: list[Transition] = field(default_factory=list)
    slot_colours: dict[str, str] = field(default_factory=dict)

    @property
    def span(self) -> float:
        """Seconds shown on the x axis: a little room after the last event."""
        return max(self.duration, 1e-3) * 1.02

    @property
    def outcomes(self) -> list[str]:
        """The outcomes of the runs shown, in legend order."""
        present = {run.outcome for run in self.runs}
        return [outcome for outcome in OUTCOMES if outcome in present]

    @property
    def legend_entries(self) -> int:
        """How many entries the legend has: only the kinds of thing the chart shows."""
        return len(self.outcomes) + bool(self.waits) + len(self.slot_colours) + bool(self.transitions)

    @property
    def size(self) -> tuple[int, int]:
        """The PNG's (width, height) in pixels."""
        legend_rows = math.ceil(self.legend_entries / LEGEND_COLUMNS)
        return WIDTH, TOP + len(self.pids) * LANE_HEIGHT + AXIS_HEIGHT + legend_rows * LEGEND_ROW + BOTTOM


def layout_timeline(events: Iterable[dict[str, Any]]) -> ChartLayout | None:
    """The chart's content for ``events`` (in any order); ``None`` when there are none."""
    ordered = sorted(events, key=lambda e: float(e["t"]))
    if not ordered:
        return None
    origin = float(ordered[0]["t"])
    layout = ChartLayout(duration=float(ordered[-1]["t"]) - origin)
    open_runs: dict[tuple[int, str], list[TaskRun]] = {}  # starts and ends pair in order
    open_holds: dict[tuple[str, int], float] = {}
    open_waits: dict[tuple[str, int], float] = {}

    def close_wait(key: tuple[str, int], at: float) -> None:
        start = open_waits.pop(key)
        if at - start >= MIN_WAIT:
            layout.waits.append(SlotWait(key[0], key[1], start, at))

    for event in ordered:
        pid, kind, at = int(event["pid"]), event.get("event"), float(event["t"]) - origin
        task = str(event.get("task", "?"))
        if pid not in layout.pids:  # lanes in order of appearance, until sorted by queue below
            layout.pids.append(pid)
        pending = open_runs.setdefault((pid, task), [])
        if kind == "start":
            pending.append(TaskRun(pid, task, str(event.get("args") or ""), at))
            layout.runs.append(pending[-1])
            if event.get("queue"):
                layout.queues.setdefault(pid, str(event["queue"]))
        elif kind in ("end", "failed", "retry") and pending:
            pending[0].failed |= kind == "failed"
            pending[0].retried |= kind == "retry"
            if kind == "end":
                pending[0].end, pending[0].state = at, event.get("state")
                pending.pop(0)
                for key in [key for key in open_waits if key[1] == pid]:  # gave up: re-queued
                    close_wait(key, at)
        elif kind == "slot" and event.get("action") == "waiting":
            open_waits[str(event.get("group")), pid] = at
        elif kind == "slot" and event.get("action") == "acquired":
            if (key := (str(event.get("group")), pid)) in open_waits:
                close_wait(key, at)
            open_holds[str(event.get("group")), pid] = at
        elif kind == "slot" and (key := (str(event.get("group")), pid)) in open_holds:
            layout.holds.append(SlotHold(key[0], pid, open_holds.pop(key), at))
        elif kind == "transition":
            entity, target = str(event.get("entity", "")), str(event.get("target", ""))
            layout.transitions.append(Transition(pid, at, entity, target))
    end = layout.duration  # of runs, waits and slot holds that never ended
    layout.holds += [SlotHold(group, pid, start, end) for (group, pid), start in open_holds.items()]
    for key in list(open_waits):
        close_wait(key, end)
    for run in layout.runs:
        run.end = end if math.isnan(run.end) else run.end
    # Workers of one queue next to each other, queues and workers in order of appearance.
    queue_order = list(dict.fromkeys(layout.queues.get(pid, "~") for pid in layout.pids))
    layout.pids.sort(key=lambda pid: queue_order.index(layout.queues.get(pid, "~")))
    for hold in sorted(layout.holds, key=lambda h: h.start):
        layout.slot_colours.setdefault(hold.group, SLOT_COLOURS[len(layout.slot_colours) % len(SLOT_COLOURS)])
    return layout


def _tint(colour: str, amount: float = 0.78) -> tuple[float, float, float]:
    r, g, b = (c + (1 - c) * amount for c in to_rgb(colour))
    return r, g, b


def _label(ax: Axes, text: str, xy: tuple[float, float], offset: tuple[int, int], **style: Any) -> Annotation:
    """``text`` at ``offset`` pixels from the data point ``xy``."""
    return ax.annotate(text, xy, xytext=offset, textcoords="offset pixels", **{"fontsize": 9, **style})


def _place(label: Annotation, renderer: RendererBase, rows: list[list[Bbox]], step: float = 0) -> None:
    """Move ``label`` into the plot horizontally and into the first of ``rows`` (``step`` px
    apart) where it overlaps no label placed before; remove it when no row has room."""
    dx, dy = label.xyann
    box = label.get_window_extent(renderer)
    dx += max(0.0, LEFT - box.x0) + min(0.0, WIDTH - RIGHT - box.x1)
    for index, row in enumerate(rows):
        label.xyann = (dx, dy - index * step)
        box = label.get_window_extent(renderer)
        if all(box.x1 + 6 <= other.x0 or box.x0 >= other.x1 + 6 for other in row):
            row.append(box)
            return
    label.remove()


def _draw_lane(ax: Axes, renderer: RendererBase, layout: ChartLayout, lane: int, pid: int) -> None:
    """One worker process: its runs, slot holds and transitions (artists by ``gid``), with labels."""
    px = (WIDTH - LEFT - RIGHT) / layout.span  # pixels per second
    top, bottom = lane + BAR_TOP, lane + BAR_TOP + BAR_HEIGHT
    middle = top + (BAR_HEIGHT - SLOT_BAND) / 2  # of the bar's part above the slot band
    runs = sorted((r for r in layout.runs if r.pid == pid), key=lambda r: r.start)
    colours = [outcome_colour(run.outcome) for run in runs]
    spans = [(run.start, max(run.end - run.start, MIN_BAR / px)) for run in runs]
    ax.broken_barh(spans, (top, BAR_HEIGHT), facecolors=colours, edgecolors=EDGE, gid=f"runs {pid}")
    waits = [(w.start, w.end - w.start) for w in layout.waits if w.pid == pid]
    if waits:  # over the run's bar: the run is not working yet
        ax.broken_barh(
            waits, (top, BAR_HEIGHT), facecolors=WAIT_COLOUR, edgecolors=WAIT_EDGE, hatch=WAIT_HATCH,
            linewidth=0.5, gid=f"waits {pid}",
        )  # fmt: skip
    above: list[list[Bbox]] = [[]]
    for run, colour, (start, width) in zip(runs, colours, spans, strict=True):
        ink = "white" if colour == FAILURE_COLOUR else TEXT
        for text in [f"{run.short_name}({run.args})", run.short_name] if run.args else [run.short_name]:
            label = _label(ax, text, (start, middle), (4, 0), va="center", fontsize=10, color=ink)
            if label.get_window_extent(renderer).width + 8 <= width * px:  # inside the bar
                break
            label.remove()
        else:  # too narrow: above the bar when there is room
            label = _label(ax, run.short_name, (start, top), (0, 3), va="bottom", color=MUTED)
            _place(label, renderer, above)
    for group, colour in layout.slot_colours.items():
        holds = [(h.start, max(h.end - h.start, MIN_BAR / px)) for h in layout.holds if h[:2] == (group, pid)]
        if holds:
            band, gid = (bottom - SLOT_BAND, SLOT_BAND), f"holds {pid} {group}"
            ax.broken_barh(holds, band, facecolors=_tint(colour), edgecolors=colour, hatch=HATCH, gid=gid)
    changes = sorted((t for t in layout.transitions if t.pid == pid), key=lambda t: t.at)
    ax.plot([t.at for t in changes], [bottom] * len(changes), **TICK, gid=f"transitions {pid}")
    rows: list[list[Bbox]] = [[], []]  # labels in up to two rows under the ticks
    for change in changes:
        colour = FAILURE_COLOUR if change.target in ("erred", "error", "failed") else TEXT
        text = f"{change.entity[:12]} {change.target}".strip()
        label = _label(ax, text, (change.at, bottom), (0, -9), ha="center", va="top", color=colour)
        _place(label, renderer, rows, step=15)


def timeline_figure(events: Iterable[dict[str, Any]]) -> Figure | None:
    """The chart of ``events`` as a figure on an Agg canvas; ``None`` when there are no events."""
    layout = layout_timeline(events)
    if layout is None:
        return None
    (width, height), plot = layout.size, len(layout.pids) * LANE_HEIGHT
    figure = Figure(figsize=(width / DPI, height / DPI), dpi=DPI, facecolor="white")
    renderer = FigureCanvasAgg(figure).get_renderer()
    ax = figure.add_axes((LEFT / width, 1 - (TOP + plot) / height, 1 - (LEFT + RIGHT) / width, plot / height))
    ax.set(xlim=(0, layout.span), ylim=(len(layout.pids), 0), xlabel="seconds since the first event")
    ax.xaxis.set_major_locator(MaxNLocator(nbins=14, steps=[1, 2, 2.5, 5, 10]))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda seconds, _: f"{round(seconds, 6):g}s"))
    lanes = [f"pid {pid}" + (f"\nqueue {q}" if (q := layout.queues.get(pid)) else "") for pid in layout.pids]
    ax.set_yticks([lane + BAR_TOP + BAR_HEIGHT / 2 for lane in range(len(lanes))], lanes)
    ax.tick_params(axis="y", length=0, labelsize=11, labelcolor=TEXT)
    ax.tick_params(axis="x", colors=MUTED, labelsize=9)
    ax.xaxis.label.set(color=MUTED, fontsize=9)
    ax.spines[["top", "right", "left"]].set_visible(False)
    ax.grid(axis="x", color=GRID)
    ax.set_axisbelow(True)
    for lane, pid in enumerate(layout.pids):
        ax.axhspan(lane, lane + 1, color=LANE_SHADE if lane % 2 == 0 else "white", zorder=0)
        _draw_lane(ax, renderer, layout, lane, pid)

    figure.text(LEFT / width, 1 - 14 / height, "make demo timeline", fontsize=16, va="top", color=TEXT)
    subtitle = f"{len(layout.runs)} task runs in {len(lanes)} worker processes over {layout.duration:.2f} s"
    figure.text(LEFT / width, 1 - 46 / height, subtitle, fontsize=10, va="top", color=MUTED)
    handles: list[Artist] = [
        Patch(facecolor=OUTCOMES[o], edgecolor=EDGE, label=LEGEND[o]) for o in layout.outcomes
    ]
    if layout.waits:
        label = "waiting for a slot"
        handles.append(Patch(facecolor=WAIT_COLOUR, edgecolor=WAIT_EDGE, hatch=WAIT_HATCH, label=label))
    for group, c in layout.slot_colours.items():
        handles.append(Patch(facecolor=_tint(c), edgecolor=c, hatch=HATCH, label=f"slot held: {group}"))
    if layout.transitions:
        handles.append(Line2D([], [], **TICK, label="state transition (entity, target state)"))
    anchor = (LEFT / width - 0.01, 1 - (TOP + plot + AXIS_HEIGHT - 6) / height)
    figure.legend(
        handles=handles, loc="upper left", bbox_to_anchor=anchor, ncol=LEGEND_COLUMNS, frameon=False
    )
    return figure


def render_timeline_png(events: list[dict[str, Any]], path: Path) -> Path | None:
    """Draw the timeline ``events`` as a Gantt chart PNG at ``path`` (parents created).

    Returns ``path``, or ``None`` without writing anything when there are no events.
    """
    figure = timeline_figure(events)
    if figure is None:
        return None
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png", dpi=DPI)
    return path
