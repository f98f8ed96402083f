"""The PNG chart of the demo timeline: no database, broker or workers needed."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from example_project.timeline_chart import (
    FAILURE_COLOUR,
    LANE_HEIGHT,
    RETRY_COLOUR,
    SLOT_BAND,
    SUCCESS_COLOUR,
    UNKNOWN_COLOUR,
    WIDTH,
    ChartLayout,
    TaskRun,
    layout_timeline,
    render_timeline_png,
)

T0 = 1_800_000_000.0
GROUP = "example.slow[region-1]"


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


def _share(image: Image.Image, box: tuple[int, int, int, int], colour: tuple[int, int, int]) -> float:
    """The share of the pixels in ``box`` (inclusive) that are exactly ``colour``."""
    pixels = Counter(
        image.getpixel((x, y)) for x in range(box[0], box[2] + 1) for y in range(box[1], box[3] + 1)
    )
    return pixels[colour] / sum(pixels.values())


def _bar_box(layout: ChartLayout, run: TaskRun) -> tuple[int, int, int, int]:
    """The bar's inside above the slot band (the label covers a little of it)."""
    assert run.end is not None
    x0, x1 = layout.span_x(run.start, run.end)
    return x0 + 2, layout.bar_top(run.pid) + 2, x1 - 2, layout.bar_bottom(run.pid) - SLOT_BAND - 2


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
    with Image.open(path) as image:
        assert image.format == "PNG"
        layout = layout_timeline(_events())
        assert layout is not None
        assert image.size == layout.size
        assert image.width == WIDTH == 1400
        assert 300 < image.height < 600


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
    assert three.height == two.height + LANE_HEIGHT
    path = render_timeline_png(events, tmp_path / "three.png")
    assert path is not None
    with Image.open(path) as image:
        assert image.size == (WIDTH, two.height + LANE_HEIGHT)


def test_bars_are_coloured_by_outcome(tmp_path: Path) -> None:
    path = render_timeline_png(_events(), tmp_path / "timeline.png")
    assert path is not None
    layout = layout_timeline(_events())
    assert layout is not None
    with Image.open(path) as opened:
        image = opened.convert("RGB")
    failed = _bar_box(layout, _run(layout, "example.backend_shutdown", 1.2))
    succeeded = _bar_box(layout, _run(layout, "example.stop_instance", 0.0))
    requeued = _bar_box(layout, _run(layout, "example.slow", 1.1))
    unfinished = _bar_box(layout, _run(layout, "example.orphan", 2.6))
    assert _share(image, failed, FAILURE_COLOUR) > 0.7
    assert _share(image, failed, SUCCESS_COLOUR) == 0
    assert _share(image, succeeded, SUCCESS_COLOUR) > 0.7
    assert _share(image, succeeded, FAILURE_COLOUR) == 0
    assert _share(image, requeued, RETRY_COLOUR) > 0.7
    assert _share(image, unfinished, UNKNOWN_COLOUR) > 0.7
    # The unfinished run is drawn up to the last event.
    assert unfinished[2] + 2 == layout.x(3.0)


def test_slot_holds_are_bands_in_the_group_colour(tmp_path: Path) -> None:
    path = render_timeline_png(_events(), tmp_path / "timeline.png")
    assert path is not None
    layout = layout_timeline(_events())
    assert layout is not None
    colour = layout.slot_colours[GROUP]
    assert colour not in (SUCCESS_COLOUR, FAILURE_COLOUR, RETRY_COLOUR, UNKNOWN_COLOUR)
    with Image.open(path) as opened:
        image = opened.convert("RGB")
    bottom = layout.bar_bottom(202)
    band = (layout.x(0.3), bottom - SLOT_BAND + 2, layout.x(0.9), bottom - 3)
    before_hold = (layout.x(0.1) + 2, bottom - SLOT_BAND + 2, layout.x(0.2) - 3, bottom - 3)
    assert _share(image, band, colour) > 0.1
    assert _share(image, band, SUCCESS_COLOUR) == 0
    assert _share(image, before_hold, SUCCESS_COLOUR) == 1


def test_no_events_write_nothing(tmp_path: Path) -> None:
    path = tmp_path / "timeline.png"
    assert render_timeline_png([], path) is None
    assert not path.exists()
    assert layout_timeline([]) is None
