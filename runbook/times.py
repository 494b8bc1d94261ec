"""Times and durations as the runbook writes and reads them: one module, so every file agrees.

- `format_utc` / `parse_utc`: RFC 3339 in UTC with a Z (sidecars, reports, snapshot names);
  `parse_utc` is lenient (None for anything unreadable) because it reads other tools' files.
- `format_ms_utc`: the journal's form, milliseconds and a Z, so times in one report compare
  as text.
- `format_rfc3339` / `parse_rfc3339`: the state file's times, strict (a bad time there is an
  error to report, not to guess past), microseconds kept, Go's zero time read as "never".
- `human_duration`: "4m 05s", for the data-loss window shown to people.
- `rough_duration`: "28 min", for lock ages and expiries (judged at a glance, not to the second).
"""

from __future__ import annotations

import re
from datetime import UTC, datetime

_ZERO_TIME = "0001-01-01T00:00:00"  # Go's time.Time{}: "never", not year one
_TIME_SHAPE = re.compile(r"\d{4}-\d{2}-\d{2}[T ]\d{2}:\d{2}")


def now() -> datetime:
    return datetime.now(UTC)


def format_utc(value: datetime) -> str:
    """`2026-01-02T03:04:05Z`: whole seconds, UTC."""
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def format_ms_utc(value: datetime | None = None) -> str:
    """`2026-01-02T03:04:05.678Z`: UTC with milliseconds (now when not given)."""
    when = (value or now()).astimezone(UTC)
    return when.strftime("%Y-%m-%dT%H:%M:%S") + f".{when.microsecond // 1000:03d}Z"


def format_rfc3339(value: datetime) -> str:
    """RFC 3339 in UTC with a Z (microseconds when there are any): the form every state file
    dialect accepts."""
    text = value.astimezone(UTC).isoformat()
    return text.removesuffix("+00:00") + "Z"


def parse_rfc3339(value: str) -> datetime | None:
    """Parse an RFC 3339 time; None for Go's zero time. Raises ValueError when invalid."""
    text = value.strip()
    if text.startswith(_ZERO_TIME):
        return None
    if not _TIME_SHAPE.match(text):
        raise ValueError("not an RFC 3339 date-time")
    # Go writes nanoseconds; Python keeps microseconds.
    text = re.sub(r"(\.\d{6})\d+", r"\1", text)
    parsed = datetime.fromisoformat(text)
    if parsed.tzinfo is None:
        raise ValueError("has no timezone")
    return parsed.astimezone(UTC)  # also rejects times that do not exist in UTC


def parse_utc(value: object) -> datetime | None:
    """An ISO 8601 / RFC 3339 text as an aware datetime; None when absent or unreadable.

    A time without an offset is taken as UTC (older sidecars wrote naive times). Go's zero
    time (0001-01-01T00:00:00Z, what a Go tool writes for "not set") is None, as
    `parse_rfc3339` reads it: as a year-1 date, a fresh snapshot's `expires_at` made it
    expired, so cleanup deleted it.
    """
    if not isinstance(value, str) or not value:
        return None
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    if parsed.year == 1:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def human_duration(seconds: float) -> str:
    """45s, 4m 05s, 3h 07m, 2d 5h: precise enough to judge, short enough to read."""
    seconds = max(0, int(seconds))
    if seconds < 60:
        return f"{seconds}s"
    minutes, sec = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m {sec:02d}s"
    hours, minutes = divmod(minutes, 60)
    if hours < 48:
        return f"{hours}h {minutes:02d}m"
    return f"{hours // 24}d {hours % 24}h"


def rough_duration(seconds: float) -> str:
    """never, 45 s, 28 min, 3 h 07 min, 2 d 5 h: lock ages and expiries, whole units."""
    if seconds == float("inf"):
        return "never"
    s = int(abs(seconds))
    if s < 90:
        return f"{s} s"
    if s < 90 * 60:
        return f"{round(s / 60)} min"
    if s < 48 * 3600:
        return f"{s // 3600} h {s % 3600 // 60:02d} min"
    return f"{s // 86400} d {s % 86400 // 3600} h"


def format_ms(ms: float | None) -> str:
    """123 ms, 4.21 s, 2 min 05 s: step durations in reports, read at a glance."""
    if ms is None:
        return "-"
    if ms < 1000:
        return f"{round(ms)} ms"
    if ms < 60_000:
        return f"{ms / 1000:.2f} s"
    minutes, seconds = divmod(round(ms / 1000), 60)
    return f"{minutes} min {seconds:02d} s"
