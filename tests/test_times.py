"""runbook/times.py, the one module for times and durations: literal expectations (the
contract's forms), not values computed by the code under test."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from runbook import state, times


def test_go_nanoseconds_parse_to_microseconds_and_go_zero_time_is_never() -> None:
    parsed = times.parse_rfc3339("2026-03-04T05:06:07.123456789Z")
    assert parsed == datetime(2026, 3, 4, 5, 6, 7, 123456, tzinfo=UTC)
    assert times.parse_rfc3339("0001-01-01T00:00:00Z") is None
    assert times.parse_rfc3339("2026-03-04T07:06:07+02:00") == datetime(2026, 3, 4, 5, 6, 7,
                                                                        tzinfo=UTC)


@pytest.mark.parametrize("text", ["yesterday", "2026-03-04T05:06:07", "2026-13-04T05:06Z"])
def test_a_bad_state_time_is_an_error_not_a_guess(text: str) -> None:
    with pytest.raises(ValueError):
        times.parse_rfc3339(text)


def test_state_times_format_with_a_z_and_keep_microseconds() -> None:
    assert times.format_rfc3339(datetime(2026, 3, 4, 5, 6, 7, tzinfo=UTC)) == (
        "2026-03-04T05:06:07Z")
    assert times.format_rfc3339(datetime(2026, 3, 4, 5, 6, 7, 120000, tzinfo=UTC)) == (
        "2026-03-04T05:06:07.120000Z")
    # the state module's names are the same functions, not copies
    assert state.format_time is times.format_rfc3339
    assert state.parse_time is times.parse_rfc3339


@pytest.mark.parametrize(("seconds", "text"), [
    (float("inf"), "never"), (0, "0 s"), (89, "89 s"), (90, "2 min"), (28 * 60, "28 min"),
    (-30 * 60, "30 min"), (3 * 3600 + 7 * 60, "3 h 07 min"), (2 * 86400 + 5 * 3600, "2 d 5 h"),
])
def test_lock_ages_read_in_whole_units(seconds: float, text: str) -> None:
    assert times.rough_duration(seconds) == text


@pytest.mark.parametrize(("seconds", "text"), [
    (45, "45s"), (245, "4m 05s"), (3 * 3600 + 7 * 60, "3h 07m"), (53 * 3600, "2d 5h"),
])
def test_the_loss_window_reads_to_the_second(seconds: float, text: str) -> None:
    assert times.human_duration(seconds) == text
