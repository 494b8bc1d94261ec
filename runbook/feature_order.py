"""The on-call order of the features, shared by the living docs and the drill reports."""

from __future__ import annotations

from pathlib import Path

# The rollback workflow first, then the database, troubleshooting, recovery, getting help.
# Feature files not named here follow, alphabetically.
FEATURE_ORDER = ("rollback", "database", "troubleshooting", "recovery", "getting-help",
                 "getting_help", "help")


def feature_sort_key(path: Path) -> tuple[int, str]:
    try:
        return FEATURE_ORDER.index(path.stem), path.name
    except ValueError:
        return len(FEATURE_ORDER), path.name
