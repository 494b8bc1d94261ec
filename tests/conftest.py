"""Fixtures shared by the tests in this folder; they live, with the other shared helpers, in
tests/drill_checks.py."""

from collections.abc import Iterator

import pytest

from tests.drill_checks import baseline_stack, read_bytes, scene_stack, shared_dir, stack

__all__ = ["baseline_stack", "read_bytes", "scene_stack", "shared_dir", "stack"]


@pytest.fixture(autouse=True)
def _registered_secrets_per_test() -> Iterator[None]:
    """The secrets a test registers (runbook.redact: every DATABASE_URL read registers its
    password and its fragments) end with it: one test's `p@ss/word` made `word` a secret, so
    a later test in the same worker saw "password=" redacted as "pass***=" (order-dependent
    failures under xdist). A real run is one process with one database URL."""
    from runbook import redact

    saved = set(redact._REGISTERED)
    yield
    redact._REGISTERED.clear()
    redact._REGISTERED.update(saved)
