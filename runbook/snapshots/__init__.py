"""Database snapshots: consistent dumps, honest listings, and restores that cannot lose data.

One job per module:

    store     file names, sidecars, listing, lookup, retention cleanup (no database)
    commands  pg_dump/psql as command values: shown by the plan, run by `spawn`
    stats     per-table stats in one consistent read; the data-loss window
    dump      create: pg_dump in the stats' own MVCC snapshot, gzip, sidecar
    verify    a full read of a file before anything touches the database
    replay    the one-transaction replay and the proof of its result

The package never calls the orchestrator (plans, runs): the restore as plan steps and as a
command lives in runbook/snapshot_restore.py, which calls in here. `restore`, `restore_steps`
and `start_step` are still reachable as `runbook.snapshots.<name>` for older callers; they
are loaded on first use, so importing this package does not import the orchestrator.
(`verify` and `replay` name modules here; their functions are `verify.verify` and
`replay.replay`.)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from runbook.snapshots.commands import (
    DbCommand,
    Target,
    dump_command,
    replay_command,
    target,
)
from runbook.snapshots.dump import create, pre_deploy_snapshot
from runbook.snapshots.replay import RestoreRun
from runbook.snapshots.stats import (
    LossWindow,
    TableLoss,
    current_state,
    loss_window,
    table_stats,
)
from runbook.snapshots.store import (
    META_SUFFIX,
    SUFFIX,
    CleanupResult,
    Snapshot,
    SnapshotError,
    TableStats,
    cleanup,
    find,
    latest_before,
    list_snapshots,
    load,
    snapshot_stem,
)
from runbook.snapshots.verify import Verified
from runbook.times import human_duration

if TYPE_CHECKING:
    from runbook.snapshot_restore import restore, restore_steps, start_step

__all__ = [
    "META_SUFFIX", "SUFFIX", "CleanupResult", "DbCommand", "LossWindow", "RestoreRun",
    "Snapshot", "SnapshotError", "TableLoss", "TableStats", "Target", "Verified", "cleanup",
    "create", "current_state", "dump_command", "find", "human_duration", "latest_before",
    "list_snapshots", "load", "loss_window", "pre_deploy_snapshot", "replay_command", "restore",
    "restore_steps", "snapshot_stem", "start_step", "table_stats", "target",
]

_MOVED = frozenset({"restore", "restore_steps", "start_step"})


def __getattr__(name: str) -> Any:
    """Forward the restore's plan-level names to runbook/snapshot_restore.py, on first use."""
    if name in _MOVED:
        from runbook import snapshot_restore

        return getattr(snapshot_restore, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
