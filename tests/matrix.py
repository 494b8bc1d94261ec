"""The failure matrices' two sizes: `make test` runs a representative sample of each (every
kind of failure once), the nightly drill every cell (RUNBOOK_KILL_MATRIX=full, set by
.github/workflows/nightly-drill.yml). README, "What runs where", lists both."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TypeVar

import pytest

FULL = os.environ.get("RUNBOOK_KILL_MATRIX") == "full"
T = TypeVar("T")

# a test whose kind of failure the sample already covers: run every night, not in make test
nightly = pytest.mark.skipif(
    not FULL, reason="a cell of the full failure matrix: the nightly drill runs it "
                     "(RUNBOOK_KILL_MATRIX=full); make test runs a sample of its kind")


def sample(every: Sequence[T], picked: Sequence[T]) -> list[T]:
    """Every cell nightly, `picked` (each kind of failure once) otherwise."""
    missing = [cell for cell in picked if cell not in every]
    assert not missing, f"sample cells not in the matrix: {missing}"
    return list(every) if FULL else list(picked)
