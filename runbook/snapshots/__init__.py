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

Each name loads its module the first time it is used (PEP 562 `__getattr__`), so code that
needs one module imports that one: `runbook status` judges the snapshot folder's room through
`room` (store, commands) and no longer loads the dump, verify and replay machinery with it
(~45 M instructions, 3% of each status, counted with cachegrind; issue 14 item 2).
"""

from __future__ import annotations

from types import ModuleType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the same names for type checkers; at run time __getattr__ loads them
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
        default_pick,
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
    "cleanup", "create", "current_state", "default_pick", "dump_command", "find",
    "holds_large_objects", "human_duration", "latest_before", "list_snapshots", "live_witness",
    "load", "loss_window", "own_snapshots", "pre_deploy_snapshot", "pre_deploy_witness",
    "replay_command", "schema_witness", "server_or_none", "snapshot_stem", "table_stats",
    "target", "target_or_none", "unread_in_window", "whose",
]

# the module of the package each name comes from (a module's own name: the module itself)
_HOMES: dict[str, str] = {
    **dict.fromkeys(("DbCommand", "Target", "dump_command", "replay_command", "target",
                     "commands"), "commands"),
    **dict.fromkeys(("create", "pre_deploy_snapshot", "dump"), "dump"),
    **dict.fromkeys(("RestoreRun", "replay"), "replay"),
    **dict.fromkeys(("LossWindow", "TableLoss", "current_state", "holds_large_objects",
                     "loss_window", "table_stats", "stats"), "stats"),
    **dict.fromkeys(("META_SUFFIX", "SUFFIX", "CleanupResult", "FutureSnapshotError",
                     "Snapshot", "SnapshotError", "TableStats", "UnreadSidecarError",
                     "before_a_move", "cleanup", "default_pick", "find", "latest_before",
                     "list_snapshots", "live_witness", "load", "own_snapshots",
                     "pre_deploy_witness", "schema_witness", "server_or_none", "snapshot_stem",
                     "target_or_none", "unread_in_window", "whose", "store"), "store"),
    **dict.fromkeys(("Verified", "verify"), "verify"),
    "give_back": "give_back", "room": "room", "sessions": "sessions",
    "human_duration": "times",
}


def __getattr__(name: str) -> Any:
    """A name of the package, imported from its module when first asked for, then kept here
    as the eager import kept it. Also reached by `from runbook.snapshots import room` (the
    import system asks for the attribute before importing the submodule)."""
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    # one import statement per module, not importlib.import_module(home): the import graph's
    # oracle (tests/test_import_graph.py) reads its edges from these
    module: ModuleType
    if home == "commands":
        import runbook.snapshots.commands
        module = runbook.snapshots.commands
    elif home == "dump":
        import runbook.snapshots.dump
        module = runbook.snapshots.dump
    elif home == "give_back":
        import runbook.snapshots.give_back
        module = runbook.snapshots.give_back
    elif home == "replay":
        import runbook.snapshots.replay
        module = runbook.snapshots.replay
    elif home == "room":
        import runbook.snapshots.room
        module = runbook.snapshots.room
    elif home == "sessions":
        import runbook.snapshots.sessions
        module = runbook.snapshots.sessions
    elif home == "stats":
        import runbook.snapshots.stats
        module = runbook.snapshots.stats
    elif home == "store":
        import runbook.snapshots.store
        module = runbook.snapshots.store
    elif home == "verify":
        import runbook.snapshots.verify
        module = runbook.snapshots.verify
    else:
        import runbook.times
        module = runbook.times
    value = module if name == home else getattr(module, name)
    globals()[name] = value
    return value
