"""A read-only probe running in a thread while the planner does something else (its own
module: pre-flight and the traffic reading both use it, and neither may import the other at
call time)."""

from __future__ import annotations

import contextvars
import threading
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class Probe(Generic[T]):
    """A read-only probe running in a thread while the planner does something else.

    Why: pre-flight is a handful of independent questions to Caddy, Docker, Postgres and a few
    processes, each mostly waiting on a socket; asked one after the other they were most of
    the time before traffic moved. `result()` returns its value or raises its exception where
    the planner asks for it, so the first failure reported is the one the sequential order
    would have reported. Probes must be read-only (they may run although an earlier one
    failed) and bounded by their own timeouts.
    """

    def __init__(self, fn: Callable[[], T], name: str = "probe") -> None:
        self._fn = fn
        # the planner's context goes with it: a dry run's checks must know they are one
        # (runbook.dry), and a thread starts with an empty context
        self._context = contextvars.copy_context()
        self._value: T | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=f"runbook-{name}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self._value = self._context.run(self._fn)
        except BaseException as exc:  # handed to the planner by result()
            self._error = exc

    def settle(self, timeout: float) -> None:
        """Give a probe whose result is no longer wanted (the plan failed) a moment to end,
        so a refused run does not exit under a half-done connection."""
        self._thread.join(timeout)

    @property
    def done(self) -> bool:
        return not self._thread.is_alive()

    def result(self) -> T:
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._value  # type: ignore[return-value]
