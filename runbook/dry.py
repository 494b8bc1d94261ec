"""Whether the plan being made is a dry run's. A dry run must change nothing on the host, so
the checks it shares with the real run ask it where they would write: Caddy's validation of
the candidate Caddyfile then gives it to Caddy without a file (the real run's pre-flight
writes a temp copy beside the Caddyfile; a dry run's used to change that folder too).

A context variable, not a flag on every call: the checks run deep under the planners, in
probe threads (runbook.probes carries the context into them)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar

_PLANNING = ContextVar("runbook_dry_run", default=False)


@contextlib.contextmanager
def planning() -> Iterator[None]:
    """The stretch in which a dry run plans."""
    token = _PLANNING.set(True)
    try:
        yield
    finally:
        _PLANNING.reset(token)


def active() -> bool:
    """Whether a dry run is planning here (in this thread, or the probe that it started)."""
    return _PLANNING.get()
