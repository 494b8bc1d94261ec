"""The per-environment deploy lock, shared with the shell tooling.

The lock is the directory `env.lock_path` (what the deploy script mkdirs), holding `locked_at`
(epoch seconds, which the shell tooling reads) and `holder.json` (who, why, which process),
mirrored into the state file's `lock` object for tools that only read that. What the old
tooling got wrong and this module does not:

- a crashed holder's lock expires (after env.lock_stale_after) and a lock whose process died
  on this host is stale at once; a lock held by a live process is never removed, not even with
  force;
- stealing a stale lock is race-free: contenders on this host serialize on an flock'd guard
  file, and the stale directory is renamed away and checked by inode before a new one is made,
  so a lock someone else just created is never the one taken away.

Two modules: policy (who holds it and whether it may be taken over; read-only) and holding
(acquire, refresh, release, unlock, the guard). Every name stays importable as
`runbook.lock.<name>`.
"""

from __future__ import annotations

from runbook.lock.holding import (
    GUARD_TIMEOUT,
    Lock,
    _entomb,
    acquire,
    guard_path,
    refusal,
    refusing_holder,
    release,
    removal_refusal,
    status,
    unlock,
)
from runbook.lock.policy import (
    EMPTY_DIR_GRACE,
    FUTURE_SLACK,
    HOLDER,
    LOCKED_AT,
    Holder,
    Ident,
    LockStatus,
    lock_dir_problem,
    lock_dir_refusal,
    suspended_fix,
)

__all__ = [
    "EMPTY_DIR_GRACE", "FUTURE_SLACK", "GUARD_TIMEOUT", "HOLDER", "LOCKED_AT", "Holder",
    "Ident", "Lock", "LockStatus", "_entomb", "acquire", "guard_path", "lock_dir_problem",
    "lock_dir_refusal", "refusal",
    "refusing_holder", "release", "removal_refusal", "status", "suspended_fix", "unlock",
]
