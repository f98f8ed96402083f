"""Helpers shared by task_workflow's management commands: tables, durations, timestamps."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from typing import Any

#: Units accepted by :func:`parse_duration`.
DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)([smhd]?)")


def parse_duration(text: str) -> float:
    """Seconds from ``"90"``, ``"90s"``, ``"30m"``, ``"2h"``, ``"1d"`` or ``"1h30m"``.

    Raises ``ValueError`` naming the accepted forms.
    """
    compact = str(text).strip().lower().replace(" ", "")
    parts = _DURATION_PART.findall(compact)
    rebuilt = "".join(number + unit for number, unit in parts)
    # A bare number is allowed only alone ("90"), not inside "1h30".
    if not parts or rebuilt != compact or any(not unit for _, unit in parts[:-1]):
        raise ValueError(
            f"not a duration: {text!r} (use seconds, or a number with s, m, h or d: "
            "'90', '30m', '2h', '1d', '1h30m')"
        )
    if len(parts) > 1 and not parts[-1][1]:
        raise ValueError(f"not a duration: {text!r} (every part of a combined duration needs a unit)")
    return sum(float(number) * DURATION_UNITS[unit or "s"] for number, unit in parts)


def format_duration(seconds: float | None, *, with_seconds: bool = True) -> str:
    """``42.0s``, ``12m05s``, ``2h03m05s`` (``2h03m`` without seconds), ``3d04h05m``;
    ``-`` for ``None``; negative durations get a leading ``-``."""
    if seconds is None:
        return "-"
    sign = "-" if seconds < 0 else ""
    seconds = abs(seconds)
    if seconds < 60:
        return f"{sign}{seconds:.1f}s" if with_seconds else f"{sign}{int(seconds)}s"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    days, hours = divmod(hours, 24)
    if days:
        return f"{sign}{days}d{hours:02d}h{minutes:02d}m"
    if hours:
        return f"{sign}{hours}h{minutes:02d}m{secs:02d}s" if with_seconds else f"{sign}{hours}h{minutes:02d}m"
    return f"{sign}{minutes}m{secs:02d}s"


def iso_timestamp(timestamp: float | None) -> str | None:
    """A Unix timestamp as ISO 8601 in UTC (``None`` stays ``None``)."""
    if timestamp is None:
        return None
    return datetime.fromtimestamp(timestamp, tz=UTC).isoformat()


def format_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A plain-text table: left-aligned columns separated by two spaces, a dashed rule
    under the header, no trailing spaces."""
    widths = [len(header) for header in headers]
    for row in rows:
        for index, cell in enumerate(row):
            widths[index] = max(widths[index], len(cell))

    def line(cells: Sequence[str]) -> str:
        return "  ".join(cell.ljust(width) for cell, width in zip(cells, widths, strict=True)).rstrip()

    return "\n".join([line(headers), line(["-" * width for width in widths]), *(line(row) for row in rows)])


def shorten(text: str, limit: int) -> str:
    """``text`` cut to ``limit`` characters with an ellipsis when longer."""
    return text if len(text) <= limit else text[: limit - 1] + "…"


def json_list(items: Iterable[Any]) -> str:
    """A JSON list with one compact object per line: valid JSON for machines, greppable for
    people, and much cheaper than ``indent=`` for tens of thousands of objects."""
    lines = [json.dumps(item, ensure_ascii=False, separators=(", ", ": ")) for item in items]
    return "[\n" + ",\n".join(lines) + "\n]" if lines else "[]"
