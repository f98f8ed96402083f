"""The PNG chart of the demo timeline: no database, broker or workers needed.

The artists of the figure are checked against the input (one bar collection per lane, hatched
slot-hold bands, transition ticks, labels and legend entries), and the written PNG is read
back to check that they were drawn where they should be, in the colours they should have.
"""

from __future__ import annotations

import io
import subprocess
import sys
from itertools import combinations
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from matplotlib.axes import Axes
from matplotlib.collections import PolyCollection
from matplotlib.colors import to_hex, to_rgb
from matplotlib.figure import Figure
from matplotlib.image import imread
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.transforms import Bbox

from example_project.timeline_chart import (
    BAR_HEIGHT,
    BAR_TOP,
    FAILURE_COLOUR,
    HATCH,
    LANE_HEIGHT,
    RETRY_COLOUR,
    SUCCESS_COLOUR,
    UNKNOWN_COLOUR,
    WAIT_COLOUR,
    WAIT_HATCH,
    WIDTH,
    ChartLayout,
    TaskRun,
    layout_timeline,
    render_timeline_png,
    timeline_figure,
)

T0 = 1_800_000_000.0
GROUP = "example.slow[region-1]"
OUTCOME_COLOURS = {SUCCESS_COLOUR, FAILURE_COLOUR, RETRY_COLOUR, UNKNOWN_COLOUR}


def _event(at: float, pid: int, event: str, **fields: Any) -> dict[str, Any]:
    return {"t": T0 + at, "pid": pid, "event": event, **fields}


def _events() -> list[dict[str, Any]]:
    """Two workers: a success, a failure, a re-queue, two holds of one slot group, transitions,
    and a run that never ended (the record stops at 3.0 s)."""
    return [
        _event(0.0, 101, "start", task="example.stop_instance", args="vm-1", host="h", queue="celery"),
        _event(0.05, 101, "transition", entity="vm-1", transition="begin_stopping", source="online",
               target="stopping"),
        _event(0.1, 202, "start", task="example.slow", args="10", host="h", queue="heavy"),
        _event(0.2, 202, "slot", action="acquired", group=GROUP),
        _event(1.0, 101, "end", task="example.stop_instance", state="SUCCESS"),
        _event(1.0, 202, "slot", action="released", group=GROUP),
        _event(1.05, 202, "end", task="example.slow", state="SUCCESS"),
        _event(1.1, 202, "start", task="example.slow", args="20", host="h", queue="heavy"),
        _event(1.2, 101, "start", task="example.backend_shutdown", args="vm-2", host="h", queue="celery"),
        _event(1.3, 202, "retry", task="example.slow", reason="slot busy"),
        _event(1.35, 202, "end", task="example.slow", state="RETRY"),
        _event(1.5, 202, "start", task="example.slow", args="20", host="h", queue="heavy"),
        _event(1.6, 202, "slot", action="acquired", group=GROUP),
        _event(1.9, 101, "failed", task="example.backend_shutdown", error="BackendError: quota"),
        _event(1.95, 101, "transition", entity="vm-2", transition="set_erred", source="stopping",
               target="erred"),
        _event(2.0, 101, "end", task="example.backend_shutdown", state="FAILURE"),
        _event(2.4, 202, "slot", action="released", group=GROUP),
        _event(2.5, 202, "end", task="example.slow", state="SUCCESS"),
        _event(2.6, 101, "start", task="example.orphan", args="", host="h", queue="celery"),
        _event(3.0, 202, "transition", entity="vm-3", transition="set_online", source="starting",
               target="online"),
    ]  # fmt: skip


def _run(layout: ChartLayout, task: str, start: float) -> TaskRun:
    (run,) = [r for r in layout.runs if r.task == task and r.start == pytest.approx(start)]
    return run


def _figure(events: list[dict[str, Any]]) -> tuple[Figure, Axes]:
    figure = timeline_figure(events)
    assert figure is not None
    (ax,) = figure.axes
    return figure, ax


def _collection(ax: Axes, gid: str) -> PolyCollection:
    (collection,) = [c for c in ax.collections if c.get_gid() == gid]
    assert isinstance(collection, PolyCollection)
    return collection


def _boxes(collection: PolyCollection) -> list[Bbox]:
    """The collection's rectangles in data coordinates (seconds, lanes)."""
    return [path.get_extents() for path in collection.get_paths()]


def _x_spans(collection: PolyCollection) -> list[tuple[float, float]]:
    return [(box.x0, box.x1) for box in _boxes(collection)]


def _hexes(colours: Any) -> list[str]:
    """RGBA rows (as collections return them) as hex strings."""
    return [to_hex(colour) for colour in np.atleast_2d(colours)]


def _png(path: Path) -> np.ndarray:
    """The PNG as rows of RGB floats in [0, 1], row 0 at the top."""
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return imread(path, format="png")[:, :, :3]


def _share(image: np.ndarray, ax: Axes, box: Bbox, colour: str) -> float:
    """The share of the PNG's pixels inside the data box ``box`` that are ``colour``."""
    (x0, y0), (x1, y1) = ax.transData.transform([(box.x0, box.y0), (box.x1, box.y1)])
    height = image.shape[0]  # display y grows upwards, image rows downwards
    rows = slice(round(height - max(y0, y1)) + 2, round(height - min(y0, y1)) - 2)
    pixels = image[rows, round(min(x0, x1)) + 2 : round(max(x0, x1)) - 2]
    assert pixels.size
    return float(np.all(np.abs(pixels - to_rgb(colour)) < 2 / 255, axis=-1).mean())


def _right_quarter_above_band(box: Bbox, lane: int) -> Bbox:
    """Where a bar shows only its colour: right of its label, above the slot band."""
    return Bbox([(box.x1 - box.width / 4, lane + BAR_TOP), (box.x1, lane + BAR_TOP + BAR_HEIGHT / 2)])


def test_pairs_starts_and_ends_per_process_and_task() -> None:
    layout = layout_timeline(reversed(_events()))  # any order: sorted by time
    assert layout is not None
    assert layout.pids == [101, 202]
    assert layout.queues == {101: "celery", 202: "heavy"}
    outcomes = [(r.pid, r.short_name, r.start, r.end, r.outcome) for r in layout.runs]
    assert outcomes == [
        (101, "stop_instance", 0.0, 1.0, "SUCCESS"),
        (202, "slow", pytest.approx(0.1), pytest.approx(1.05), "SUCCESS"),
        (202, "slow", pytest.approx(1.1), pytest.approx(1.35), "RETRY"),
        (101, "backend_shutdown", pytest.approx(1.2), pytest.approx(2.0), "FAILURE"),
        (202, "slow", pytest.approx(1.5), pytest.approx(2.5), "SUCCESS"),
        (101, "orphan", pytest.approx(2.6), pytest.approx(3.0), "UNKNOWN"),  # to the last event
    ]
    holds = [(h.group, h.pid, h.start, h.end) for h in layout.holds]
    assert holds == [
        (GROUP, 202, pytest.approx(0.2), pytest.approx(1.0)),
        (GROUP, 202, pytest.approx(1.6), pytest.approx(2.4)),
    ]
    assert [t.target for t in layout.transitions] == ["stopping", "erred", "online"]


def test_writes_a_png_of_the_expected_size(tmp_path: Path) -> None:
    path = tmp_path / "out" / "timeline.png"
    assert render_timeline_png(_events(), path) == path
    layout = layout_timeline(_events())
    assert layout is not None
    height, width = _png(path).shape[:2]
    assert (width, height) == layout.size
    assert width == WIDTH == 1400
    assert 300 < height < 600


def test_one_lane_per_worker_process(tmp_path: Path) -> None:
    events = [
        *_events(),
        _event(0.5, 303, "start", task="example.fast", args="1", host="h", queue="celery"),
        _event(0.6, 303, "end", task="example.fast", state="SUCCESS"),
    ]
    two, three = layout_timeline(_events()), layout_timeline(events)
    assert two is not None
    assert three is not None
    assert three.pids == [101, 303, 202]  # workers of one queue side by side
    assert three.size == (WIDTH, two.size[1] + LANE_HEIGHT)
    path = render_timeline_png(events, tmp_path / "three.png")
    assert path is not None
    assert _png(path).shape[:2] == (two.size[1] + LANE_HEIGHT, WIDTH)
    _, ax = _figure(events)
    lanes = [label.get_text() for label in ax.get_yticklabels()]
    assert lanes == ["pid 101\nqueue celery", "pid 303\nqueue celery", "pid 202\nqueue heavy"]
    assert ax.get_ylim() == (3, 0)  # top-down
    assert _x_spans(_collection(ax, "runs 303")) == [pytest.approx((0.5, 0.6))]


def test_bars_per_lane_coloured_by_outcome(tmp_path: Path) -> None:
    path = render_timeline_png(_events(), tmp_path / "timeline.png")
    assert path is not None
    image = _png(path)
    layout = layout_timeline(_events())
    assert layout is not None
    _, ax = _figure(_events())
    expected = {
        101: [("stop_instance", 0.0, 1.0, SUCCESS_COLOUR), ("backend_shutdown", 1.2, 2.0, FAILURE_COLOUR),
              ("orphan", 2.6, 3.0, UNKNOWN_COLOUR)],  # never ended: drawn up to the last event
        202: [("slow", 0.1, 1.05, SUCCESS_COLOUR), ("slow", 1.1, 1.35, RETRY_COLOUR),
              ("slow", 1.5, 2.5, SUCCESS_COLOUR)],
    }  # fmt: skip
    assert sorted(c.get_gid() or "" for c in ax.collections if (c.get_gid() or "").startswith("runs ")) == [
        "runs 101",
        "runs 202",
    ]
    for lane, (pid, runs) in enumerate(expected.items()):
        bars = _collection(ax, f"runs {pid}")
        assert _x_spans(bars) == [pytest.approx((start, end)) for _, start, end, _ in runs]
        assert _hexes(bars.get_facecolor()) == [colour for *_, colour in runs]
        assert all(lane < box.y0 < box.y1 < lane + 1 for box in _boxes(bars))
        for box, (_, _, _, colour) in zip(_boxes(bars), runs, strict=True):
            assert _share(image, ax, _right_quarter_above_band(box, lane), colour) > 0.9
            for other in OUTCOME_COLOURS - {colour}:
                assert _share(image, ax, _right_quarter_above_band(box, lane), other) == 0
    assert _run(layout, "example.orphan", 2.6).outcome == "UNKNOWN"


def test_slot_holds_are_hatched_bands_in_the_group_colour(tmp_path: Path) -> None:
    path = render_timeline_png(_events(), tmp_path / "timeline.png")
    assert path is not None
    image = _png(path)
    layout = layout_timeline(_events())
    assert layout is not None
    colour = layout.slot_colours[GROUP]
    assert colour not in OUTCOME_COLOURS
    _, ax = _figure(_events())
    assert [c.get_gid() for c in ax.collections if (c.get_gid() or "").startswith("holds ")] == [
        f"holds 202 {GROUP}"
    ]
    band = _collection(ax, f"holds 202 {GROUP}")
    assert band.get_hatch() == HATCH
    assert _hexes(band.get_edgecolor()) == [colour]
    assert _x_spans(band) == [pytest.approx((0.2, 1.0)), pytest.approx((1.6, 2.4))]
    (bar, *_) = _boxes(_collection(ax, "runs 202"))
    first, _ = _boxes(band)
    assert bar.y0 < first.y0 < first.y1 == pytest.approx(bar.y1)  # the lower part of the bar
    # Drawn: the band hides the bar's colour, while the bar before the hold shows it.
    assert _share(image, ax, first, SUCCESS_COLOUR) == 0
    assert _share(image, ax, first, _hexes(band.get_facecolor())[0]) > 0.3
    before = Bbox([(bar.x0, first.y0), (first.x0, first.y1)])
    assert _share(image, ax, before, SUCCESS_COLOUR) > 0.9


def test_transitions_are_ticks_with_their_target_state() -> None:
    _, ax = _figure(_events())
    ticks = {line.get_gid(): line for line in ax.lines if isinstance(line, Line2D)}
    assert ticks.keys() == {"transitions 101", "transitions 202"}
    assert np.asarray(ticks["transitions 101"].get_xdata()).tolist() == pytest.approx([0.05, 1.95])
    assert np.asarray(ticks["transitions 202"].get_xdata()).tolist() == pytest.approx([3.0])
    assert np.asarray(ticks["transitions 202"].get_ydata()).tolist() == pytest.approx(
        [1 + BAR_TOP + BAR_HEIGHT]
    )
    assert ticks["transitions 101"].get_marker() == "|"
    labels = {text.get_text(): to_hex(text.get_color()) for text in ax.texts}
    assert labels["vm-1 stopping"] != FAILURE_COLOUR
    assert labels["vm-2 erred"] == FAILURE_COLOUR
    assert "vm-3 online" in labels
    # The bars' names: with their arguments inside the wide enough bars.
    assert {"stop_instance(vm-1)", "backend_shutdown(vm-2)", "orphan", "slow(10)"} <= labels.keys()


def test_legend_lists_outcomes_slot_groups_and_transitions() -> None:
    figure, ax = _figure(_events())
    (legend,) = figure.legends
    assert [text.get_text() for text in legend.get_texts()] == [
        "success",
        "failure",
        "retry / re-queued",
        "no end / other state",
        f"slot held: {GROUP}",
        "state transition (entity, target state)",
    ]
    *patches, tick = legend.legend_handles
    assert all(isinstance(patch, Patch) for patch in patches)
    assert [to_hex(patch.get_facecolor()) for patch in patches if isinstance(patch, Patch)] == [
        SUCCESS_COLOUR,
        FAILURE_COLOUR,
        RETRY_COLOUR,
        UNKNOWN_COLOUR,
        _hexes(_collection(ax, f"holds 202 {GROUP}").get_facecolor())[0],
    ]
    assert [patch.get_hatch() for patch in patches if isinstance(patch, Patch)] == [None] * 4 + [HATCH]
    assert isinstance(tick, Line2D)
    assert tick.get_marker() == "|"


def test_crowded_labels_stay_apart_and_inside_the_figure(tmp_path: Path) -> None:
    """Narrow bars are named above them; close transitions stack in two rows, a third is left
    out; no label overlaps another or sticks out of the plot."""
    events = [
        *_events(),
        _event(1.4, 101, "start", task="example.quick_one", args="x", host="h", queue="celery"),
        _event(1.41, 101, "end", task="example.quick_one", state="SUCCESS"),
        *(_event(2.9, 202, "transition", entity=f"vm-{n}", transition="t", source="a", target="online")
          for n in (5, 6, 7)),
    ]  # fmt: skip
    figure, ax = _figure(events)
    names = [text for text in ax.texts if text.get_text() == "quick_one"]
    assert len(names) == 1  # above the bar, too narrow for it
    (bar,) = [box for box in _boxes(_collection(ax, "runs 101")) if box.x0 == pytest.approx(1.4)]
    assert ax.transData.transform((0, bar.y0))[1] < names[0].get_window_extent().y0
    shown = {text.get_text() for text in ax.texts}
    assert len(shown & {"vm-5 online", "vm-6 online", "vm-7 online", "vm-3 online"}) == 2
    figure.canvas.draw()
    plot = ax.get_window_extent()
    outside = [
        t.get_text()
        for t in ax.texts
        if not plot.x0 <= t.get_window_extent().x0 < t.get_window_extent().x1 <= plot.x1 + 0.5
    ]
    pairs = combinations(ax.texts, 2)
    overlapping = [(a, b) for a, b in pairs if a.get_window_extent().overlaps(b.get_window_extent())]
    assert not overlapping, [(a.get_text(), b.get_text()) for a, b in overlapping]
    assert not outside
    assert render_timeline_png(events, tmp_path / "crowded.png") is not None


def test_no_events_write_nothing(tmp_path: Path) -> None:
    path = tmp_path / "timeline.png"
    assert render_timeline_png([], path) is None
    assert not path.exists()
    assert layout_timeline([]) is None
    assert timeline_figure([]) is None


def test_draws_without_pyplot_or_a_gui_backend(tmp_path: Path) -> None:
    """The chart leaves matplotlib's global state alone: no pyplot (so no backend switch)."""
    script = (
        "import sys; from pathlib import Path\n"
        "from example_project.timeline_chart import render_timeline_png\n"
        "events = [{'t': 1, 'pid': 1, 'event': 'start', 'task': 't'}, {'t': 2, 'pid': 1, 'event': 'end'}]\n"
        f"assert render_timeline_png(events, Path({str(tmp_path / 'x.png')!r}))\n"
        "assert 'matplotlib.pyplot' not in sys.modules, 'pyplot imported'\n"
    )
    env_root = str(Path(__file__).resolve().parents[1])
    subprocess.run([sys.executable, "-c", script], check=True, cwd=env_root, timeout=60)


def test_the_demo_prints_a_note_without_matplotlib(monkeypatch: pytest.MonkeyPatch) -> None:
    from example_project.management.commands.run_demo import Command

    monkeypatch.setitem(sys.modules, "example_project.timeline_chart", None)  # import fails
    out = io.StringIO()
    Command(stdout=out)._write_chart()
    assert "chart: skipped (matplotlib is not installed" in out.getvalue()


def _waiting_events() -> list[dict[str, Any]]:
    """Two slow tasks of one slot group on two heavy workers: the second starts at 0.1 s,
    waits for the slot from 0.15 s and gets it at 1.6 s, when the first releases it."""
    return [
        _event(0.0, 301, "start", task="example.slow", args="20", host="h", queue="heavy"),
        _event(0.02, 301, "slot", action="waiting", group=GROUP),
        _event(0.03, 301, "slot", action="acquired", group=GROUP),
        _event(0.1, 302, "start", task="example.slow", args="10", host="h", queue="heavy"),
        _event(0.15, 302, "slot", action="waiting", group=GROUP),
        _event(1.58, 301, "slot", action="released", group=GROUP),
        _event(1.59, 301, "end", task="example.slow", state="SUCCESS"),
        _event(1.6, 302, "slot", action="acquired", group=GROUP),
        _event(2.6, 302, "slot", action="released", group=GROUP),
        _event(2.61, 302, "end", task="example.slow", state="SUCCESS"),
    ]  # fmt: skip


def test_waiting_for_a_slot_is_drawn_as_waiting_not_as_running(tmp_path: Path) -> None:
    layout = layout_timeline(_waiting_events())
    assert layout is not None
    # The first got its slot at once (a store round trip, not a wait): no waiting interval.
    assert [(w.group, w.pid, w.start, w.end) for w in layout.waits] == [
        (GROUP, 302, pytest.approx(0.15), pytest.approx(1.6))
    ]
    path = render_timeline_png(_waiting_events(), tmp_path / "timeline.png")
    assert path is not None
    image = _png(path)
    _, ax = _figure(_waiting_events())
    waits = _collection(ax, "waits 302")
    assert waits.get_hatch() == WAIT_HATCH
    assert _hexes(waits.get_facecolor()) == [WAIT_COLOUR]
    assert _x_spans(waits) == [pytest.approx((0.15, 1.6))]
    assert not [c for c in ax.collections if c.get_gid() == "waits 301"]
    (bar,) = _boxes(_collection(ax, "runs 302"))
    (wait,) = _boxes(waits)
    assert wait.y0 == pytest.approx(bar.y0)
    assert wait.y1 == pytest.approx(bar.y1)  # the whole height of the bar
    # In the PNG: the waiting interval (right of the bar's label) shows the waiting colour and
    # no running green; after the slot was granted the bar is green again.
    lane = 1
    waiting = Bbox([(0.8, lane + BAR_TOP), (1.5, lane + BAR_TOP + BAR_HEIGHT / 2)])
    assert _share(image, ax, waiting, SUCCESS_COLOUR) == 0
    assert _share(image, ax, waiting, WAIT_COLOUR) > 0.3
    running = Bbox([(1.7, lane + BAR_TOP), (2.5, lane + BAR_TOP + BAR_HEIGHT / 2)])
    assert _share(image, ax, running, SUCCESS_COLOUR) > 0.9


def test_legend_shows_only_the_kinds_the_run_has() -> None:
    figure, _ = _figure(_waiting_events())
    (legend,) = figure.legends
    assert [text.get_text() for text in legend.get_texts()] == [
        "success",
        "waiting for a slot",
        f"slot held: {GROUP}",
    ]
    waiting = legend.legend_handles[1]
    assert isinstance(waiting, Patch)
    assert (to_hex(waiting.get_facecolor()), waiting.get_hatch()) == (WAIT_COLOUR, WAIT_HATCH)
    # Without a wait, a slot or a transition: only the outcomes that occurred.
    plain = [
        _event(0.0, 1, "start", task="example.fast", args="1", host="h", queue="celery"),
        _event(0.1, 1, "end", task="example.fast", state="SUCCESS"),
        _event(0.2, 1, "start", task="example.dangerous", args="1", host="h", queue="celery"),
        _event(0.3, 1, "end", task="example.dangerous", state="FAILURE"),
    ]
    figure, _ = _figure(plain)
    (legend,) = figure.legends
    assert [text.get_text() for text in legend.get_texts()] == ["success", "failure"]
    # The full sample has every outcome, a slot group and transitions, but no wait.
    figure, _ = _figure(_events())
    (legend,) = figure.legends
    assert "waiting for a slot" not in [text.get_text() for text in legend.get_texts()]
