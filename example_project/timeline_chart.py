"""A PNG Gantt chart of the ``make demo`` timeline (see :mod:`example_project.timeline`).

One lane per worker process; each task run is a bar from its ``start`` to its ``end``
event, coloured by outcome; throttled slot holds are hatched bands inside the bars; state
transitions are tick marks under the bars with the target state. Drawn with Pillow only
(the ``dev`` extra), so importing this module raises ``ImportError`` without it.

The module does not import Django: it takes the event dicts that
:func:`example_project.timeline.read_timeline` returns.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont

__all__ = [
    "FAILURE_COLOUR",
    "RETRY_COLOUR",
    "SUCCESS_COLOUR",
    "UNKNOWN_COLOUR",
    "WIDTH",
    "ChartLayout",
    "TaskRun",
    "layout_timeline",
    "outcome_colour",
    "render_timeline_png",
]

RGB = tuple[int, int, int]
Font = ImageFont.FreeTypeFont | ImageFont.ImageFont

WIDTH = 1400
SUCCESS_COLOUR: RGB = (98, 178, 104)
FAILURE_COLOUR: RGB = (214, 78, 70)
RETRY_COLOUR: RGB = (236, 168, 44)  # a busy slot or self.retry() re-queued the task
UNKNOWN_COLOUR: RGB = (168, 168, 168)  # no end event, or another final state
#: Slot groups get these in order of first acquisition (then repeat).
SLOT_COLOURS: tuple[RGB, ...] = (
    (37, 89, 173),
    (128, 62, 160),
    (0, 124, 128),
    (150, 84, 20),
    (196, 46, 128),
)

BACKGROUND: RGB = (255, 255, 255)
LANE_SHADE: RGB = (244, 246, 249)
GRID: RGB = (222, 226, 232)
TEXT: RGB = (33, 37, 41)
MUTED: RGB = (104, 112, 120)
TICK: RGB = (45, 45, 45)

LEFT = 170  # lane labels
RIGHT = 40
PLOT_TOP = 78  # below the title and subtitle
LANE_HEIGHT = 92
BAR_OFFSET = 22  # a row of labels of narrow bars above the bar
BAR_HEIGHT = 32
SLOT_BAND = 11  # the lower part of a bar, where slot holds are drawn
AXIS_HEIGHT = 52
LEGEND_ROW = 24
_LEGEND_SWATCH = 28  # px: the width of a legend entry's sample
BOTTOM = 14
MIN_BAR = 4  # px: a run of a few milliseconds still shows


def _font(size: int) -> Font:
    """Pillow's built-in font; scalable from Pillow 10.1, a fixed bitmap before."""
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: no size argument
        return ImageFont.load_default()


@dataclass
class TaskRun:
    """One run of a task in a worker process: ``start`` to ``end`` in seconds since the
    first event (``end`` is the last event's time when the run never ended)."""

    pid: int
    task: str
    args: str
    start: float
    end: float | None = None
    state: str | None = None
    failed: bool = False
    retried: bool = False

    @property
    def short_name(self) -> str:
        return self.task.rsplit(".", 1)[-1]

    @property
    def outcome(self) -> str:
        """SUCCESS, FAILURE, RETRY or UNKNOWN."""
        if self.state in ("SUCCESS", "FAILURE", "RETRY"):
            return self.state
        if self.state is None and self.failed:
            return "FAILURE"
        if self.state is None and self.retried:
            return "RETRY"
        return "UNKNOWN"


@dataclass
class SlotHold:
    group: str
    pid: int
    start: float
    end: float


@dataclass
class Transition:
    pid: int
    at: float
    entity: str
    target: str


def outcome_colour(outcome: str) -> RGB:
    return {"SUCCESS": SUCCESS_COLOUR, "FAILURE": FAILURE_COLOUR, "RETRY": RETRY_COLOUR}.get(
        outcome, UNKNOWN_COLOUR
    )


@dataclass
class ChartLayout:
    """Where everything goes; :func:`render_timeline_png` draws what this describes."""

    origin: float  # epoch seconds of the first event
    duration: float  # seconds from the first event to the last
    pids: list[int]
    queues: dict[int, str]
    runs: list[TaskRun]
    holds: list[SlotHold]
    transitions: list[Transition]
    slot_colours: dict[str, RGB]
    legend_rows: list[list[tuple[str, str, RGB]]] = field(default_factory=list)

    @property
    def span(self) -> float:
        """Seconds shown on the x axis: a little room after the last event."""
        return max(self.duration, 1e-3) * 1.02

    @property
    def width(self) -> int:
        return WIDTH

    @property
    def height(self) -> int:
        return self.axis_top + AXIS_HEIGHT + len(self.legend_rows) * LEGEND_ROW + BOTTOM

    @property
    def size(self) -> tuple[int, int]:
        return self.width, self.height

    @property
    def axis_top(self) -> int:
        return PLOT_TOP + len(self.pids) * LANE_HEIGHT

    def x(self, seconds: float) -> int:
        """The x pixel of ``seconds`` since the first event."""
        return LEFT + round(seconds / self.span * (WIDTH - LEFT - RIGHT))

    def lane_top(self, pid: int) -> int:
        return PLOT_TOP + self.pids.index(pid) * LANE_HEIGHT

    def bar_top(self, pid: int) -> int:
        return self.lane_top(pid) + BAR_OFFSET

    def bar_bottom(self, pid: int) -> int:
        return self.bar_top(pid) + BAR_HEIGHT

    def span_x(self, start: float, end: float) -> tuple[int, int]:
        x0 = self.x(start)
        return x0, max(self.x(end), x0 + MIN_BAR)


def _collect(events: Sequence[dict[str, Any]], origin: float, last: float) -> tuple[
    list[TaskRun], list[SlotHold], list[Transition], dict[int, str]
]:  # fmt: skip
    runs: list[TaskRun] = []
    open_runs: dict[tuple[int, str], list[TaskRun]] = {}
    holds: list[SlotHold] = []
    open_holds: dict[tuple[str, int], float] = {}
    transitions: list[Transition] = []
    queues: dict[int, str] = {}
    for event in events:
        pid, kind, at = int(event["pid"]), event.get("event"), float(event["t"]) - origin
        task = str(event.get("task", "?"))
        if kind == "start":
            run = TaskRun(pid, task, str(event.get("args") or ""), at)
            runs.append(run)
            open_runs.setdefault((pid, task), []).append(run)
            if event.get("queue"):
                queues.setdefault(pid, str(event["queue"]))
        elif kind == "end":
            pending = open_runs.get((pid, task))
            if pending:  # starts and ends pair in order, per process and task
                run = pending.pop(0)
                run.end, run.state = at, event.get("state")
        elif kind in ("failed", "retry"):
            pending = open_runs.get((pid, task))
            if pending:
                if kind == "failed":
                    pending[0].failed = True
                else:
                    pending[0].retried = True
        elif kind == "slot":
            key = (str(event.get("group")), pid)
            if event.get("action") == "acquired":
                open_holds[key] = at
            elif event.get("action") == "released" and key in open_holds:
                holds.append(SlotHold(key[0], pid, open_holds.pop(key), at))
        elif kind == "transition":
            transitions.append(
                Transition(pid, at, str(event.get("entity", "")), str(event.get("target", "")))
            )
    for (group, pid), start in open_holds.items():  # still held at the end of the record
        holds.append(SlotHold(group, pid, start, last - origin))
    return runs, holds, transitions, queues


def layout_timeline(events: Iterable[dict[str, Any]]) -> ChartLayout | None:
    """The chart's layout for ``events`` (in any order); ``None`` when there are none."""
    ordered = sorted(events, key=lambda e: float(e["t"]))
    if not ordered:
        return None
    origin, last = float(ordered[0]["t"]), float(ordered[-1]["t"])
    runs, holds, transitions, queues = _collect(ordered, origin, last)
    for run in runs:
        if run.end is None:
            run.end = last - origin

    first_seen: dict[int, float] = {}
    for event in ordered:
        first_seen.setdefault(int(event["pid"]), float(event["t"]))
    queue_first: dict[str, float] = {}
    for pid, seen in first_seen.items():
        queue_first.setdefault(queues.get(pid, "~"), seen)
    # Workers of one queue next to each other, queues and workers in order of appearance.
    pids = sorted(first_seen, key=lambda pid: (queue_first[queues.get(pid, "~")], first_seen[pid]))

    slot_colours: dict[str, RGB] = {}
    for hold in sorted(holds, key=lambda h: h.start):
        slot_colours.setdefault(hold.group, SLOT_COLOURS[len(slot_colours) % len(SLOT_COLOURS)])

    layout = ChartLayout(
        origin=origin,
        duration=last - origin,
        pids=pids,
        queues=queues,
        runs=runs,
        holds=holds,
        transitions=transitions,
        slot_colours=slot_colours,
    )
    layout.legend_rows = _legend_rows(slot_colours)
    return layout


def _legend_rows(slot_colours: dict[str, RGB]) -> list[list[tuple[str, str, RGB]]]:
    """Legend entries (kind, text, colour), wrapped to the chart width."""
    entries: list[tuple[str, str, RGB]] = [
        ("bar", "success", SUCCESS_COLOUR),
        ("bar", "failure", FAILURE_COLOUR),
        ("bar", "retry / re-queued", RETRY_COLOUR),
        ("bar", "no end / other state", UNKNOWN_COLOUR),
        *(("slot", f"slot held: {group}", colour) for group, colour in slot_colours.items()),
        ("tick", "state transition (entity, target state)", TICK),
    ]
    font = _font(13)
    rows: list[list[tuple[str, str, RGB]]] = [[]]
    x = LEFT
    for entry in entries:
        width = _LEGEND_SWATCH + 8 + _text_width(font, entry[1]) + 26
        if rows[-1] and x + width > WIDTH - RIGHT:
            rows.append([])
            x = LEFT
        rows[-1].append(entry)
        x += width
    return rows


def _text_width(font: Font, text: str) -> int:
    left, _, right, _ = font.getbbox(text)
    return int(right - left)


def _nice_step(span: float, ticks: int = 12) -> float:
    raw = span / ticks
    magnitude = 10.0 ** math.floor(math.log10(raw))
    for factor in (1, 2, 2.5, 5, 10):
        if factor * magnitude >= raw:
            return factor * magnitude
    return 10 * magnitude


def _text_on(colour: RGB) -> RGB:
    luminance = 0.299 * colour[0] + 0.587 * colour[1] + 0.114 * colour[2]
    return TEXT if luminance > 130 else BACKGROUND


def _tint(colour: RGB, amount: float) -> RGB:
    r, g, b = (round(c + (255 - c) * amount) for c in colour)
    return r, g, b


def _shade(colour: RGB, factor: float = 0.7) -> RGB:
    r, g, b = (round(c * factor) for c in colour)
    return r, g, b


def _hatch(draw: ImageDraw.ImageDraw, box: tuple[int, int, int, int], colour: RGB) -> None:
    """A band of diagonal lines in ``colour`` with an outline of it."""
    x0, y0, x1, y1 = box
    draw.rectangle(box, fill=_tint(colour, 0.78))
    height = y1 - y0
    for start in range(x0 - height, x1, 6):
        # The part of the line x = start + (y1 - y) that lies inside the box.
        a, b = max(start, x0), min(start + height, x1)
        if a < b:
            draw.line([(a, y1 - (a - start)), (b, y1 - (b - start))], fill=colour, width=1)
    draw.rectangle(box, outline=colour, width=1)


def _place(spans: list[list[tuple[int, int]]], x0: int, x1: int, gap: int = 6) -> int | None:
    """The first row in which ``x0..x1`` overlaps nothing placed before (then placed)."""
    for index, row in enumerate(spans):
        if all(x1 + gap <= a or x0 >= b + gap for a, b in row):
            row.append((x0, x1))
            return index
    return None


def render_timeline_png(events: list[dict[str, Any]], path: Path) -> Path | None:
    """Draw the timeline ``events`` as a Gantt chart PNG at ``path`` (parents created).

    Returns ``path``, or ``None`` without writing anything when there are no events.
    """
    layout = layout_timeline(events)
    if layout is None:
        return None
    image = Image.new("RGB", layout.size, BACKGROUND)
    draw = ImageDraw.Draw(image)
    title, label, small = _font(22), _font(13), _font(12)
    plot_right = WIDTH - RIGHT

    draw.text((LEFT, 16), "make demo timeline", font=title, fill=TEXT)
    subtitle = (
        f"{len(layout.runs)} task runs in {len(layout.pids)} worker processes over "
        f"{layout.duration:.2f} s; seconds since the first event"
    )
    draw.text((LEFT, 46), subtitle, font=label, fill=MUTED)

    # Lanes, then the grid over their shading.
    for index, pid in enumerate(layout.pids):
        top = layout.lane_top(pid)
        if index % 2 == 0:
            draw.rectangle((0, top, WIDTH, top + LANE_HEIGHT - 1), fill=LANE_SHADE)
        draw.text((16, layout.bar_top(pid) - 2), f"pid {pid}", font=_font(15), fill=TEXT)
        if pid in layout.queues:
            draw.text((16, layout.bar_top(pid) + 18), f"queue {layout.queues[pid]}", font=small, fill=MUTED)
    step = _nice_step(layout.span)
    ticks = [i * step for i in range(int(layout.span / step) + 1)]
    for tick in ticks:
        x = layout.x(tick)
        draw.line([(x, PLOT_TOP), (x, layout.axis_top)], fill=GRID, width=1)

    # Task runs: bars by outcome, slot holds inside, labels inside or above.
    above: dict[int, list[list[tuple[int, int]]]] = {pid: [[]] for pid in layout.pids}
    for run in sorted(layout.runs, key=lambda r: r.start):
        assert run.end is not None
        x0, x1 = layout.span_x(run.start, run.end)
        top, bottom = layout.bar_top(run.pid), layout.bar_bottom(run.pid)
        colour = outcome_colour(run.outcome)
        draw.rectangle((x0, top, x1, bottom), fill=colour, outline=_shade(colour), width=1)
        for text in (f"{run.short_name}({run.args})" if run.args else run.short_name, run.short_name):
            width = _text_width(label, text)
            if width + 8 <= x1 - x0:
                draw.text((x0 + 4, top + 3), text, font=label, fill=_text_on(colour))
                break
        else:  # too narrow: above the bar when there is room
            width = _text_width(small, run.short_name)
            x0 = min(x0, WIDTH - 4 - width)
            if _place(above[run.pid], x0, x0 + width) is not None:
                draw.text((x0, top - 16), run.short_name, font=small, fill=MUTED)
    for hold in layout.holds:
        if hold.pid not in above:
            continue
        x0, x1 = layout.span_x(hold.start, hold.end)
        bottom = layout.bar_bottom(hold.pid)
        _hatch(draw, (x0 + 1, bottom - SLOT_BAND, x1 - 1, bottom - 1), layout.slot_colours[hold.group])

    # Transitions: a tick through the bar's lower edge, the target state below it.
    rows: dict[int, list[list[tuple[int, int]]]] = {pid: [[], []] for pid in layout.pids}
    for change in sorted(layout.transitions, key=lambda c: c.at):
        x, bottom = layout.x(change.at), layout.bar_bottom(change.pid)
        draw.line([(x, bottom - 7), (x, bottom + 6)], fill=TICK, width=2)
        text = f"{change.entity[:12]} {change.target}".strip()
        width = _text_width(small, text)
        x0 = min(max(x - width // 2, LEFT), plot_right - width)
        row = _place(rows[change.pid], x0, x0 + width)
        if row is not None:
            colour = FAILURE_COLOUR if change.target in ("erred", "error", "failed") else TEXT
            draw.text((x0, bottom + 8 + row * 15), text, font=small, fill=colour)

    # The x axis.
    axis = layout.axis_top
    draw.line([(LEFT, axis), (plot_right, axis)], fill=MUTED, width=1)
    for tick in ticks:
        x = layout.x(tick)
        draw.line([(x, axis), (x, axis + 5)], fill=MUTED, width=1)
        text = f"{round(tick, 6):g}s"
        draw.text((x - _text_width(small, text) // 2, axis + 8), text, font=small, fill=MUTED)
    draw.text((16, axis + 8), "seconds", font=small, fill=MUTED)

    # The legend.
    y = axis + AXIS_HEIGHT - 10
    for entries in layout.legend_rows:
        x = LEFT
        for kind, text, colour in entries:
            box = (x, y + 2, x + _LEGEND_SWATCH, y + 16)
            if kind == "bar":
                draw.rectangle(box, fill=colour, outline=_shade(colour))
            elif kind == "slot":
                _hatch(draw, box, colour)
            else:
                middle = x + _LEGEND_SWATCH // 2
                draw.line([(middle, y), (middle, y + 17)], fill=colour, width=2)
            draw.text((x + _LEGEND_SWATCH + 8, y + 2), text, font=label, fill=TEXT)
            x += _LEGEND_SWATCH + 8 + _text_width(label, text) + 26
        y += LEGEND_ROW

    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="PNG", optimize=True)
    return path
