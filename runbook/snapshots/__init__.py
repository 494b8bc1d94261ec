"""Database snapshots: consistent dumps, honest listings, and restores that cannot lose data.

One job per module:

    store     file names, sidecars, listing, lookup, retention cleanup (no database)
    commands  pg_dump/psql as command values: shown by the plan, run by `spawn`
    stats     per-table stats in one consistent read; the data-loss window
    dump      create: pg_dump in the stats' own MVCC snapshot, gzip, sidecar
    verify    a full read of a file before anything touches the database
    replay    the one-transaction replay and the proof of its result

The package never calls the orchestrator (plans, runs): the restore as plan steps and as a
command lives in runbook/snapshot_restore.py, which calls in here. (`verify` and `replay`
name modules here; their functions are `verify.verify` and `replay.replay`.)
"""

from __future__ import annotations

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
    holds_large_objects,
    loss_window,
    table_stats,
)
from runbook.snapshots.store import (
    META_SUFFIX,
    SUFFIX,
    CleanupResult,
    FutureSnapshotError,
    Snapshot,
    SnapshotError,
    TableStats,
    UnreadSidecarError,
    before_a_move,
    cleanup,
    find,
    latest_before,
    list_snapshots,
    live_witness,
    load,
    own_snapshots,
    pre_deploy_witness,
    schema_witness,
    server_or_none,
    snapshot_stem,
    target_or_none,
    unread_in_window,
    whose,
)
from runbook.snapshots.verify import Verified
from runbook.times import human_duration

__all__ = [
    "META_SUFFIX", "SUFFIX", "CleanupResult", "DbCommand", "FutureSnapshotError", "LossWindow",
    "RestoreRun", "Snapshot", "SnapshotError", "TableLoss", "TableStats", "Target",
    "UnreadSidecarError", "Verified", "before_a_move",
    "cleanup", "create", "current_state", "dump_command", "find", "holds_large_objects",
    "human_duration", "latest_before", "list_snapshots", "live_witness", "load", "loss_window",
    "own_snapshots", "pre_deploy_snapshot", "pre_deploy_witness", "replay_command",
    "schema_witness", "server_or_none", "snapshot_stem", "table_stats", "target", "target_or_none",
    "unread_in_window", "whose",
]
