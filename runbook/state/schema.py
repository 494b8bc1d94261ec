"""What a deployment-state.json may hold: the three dialects, the keys the model owns, the
statuses, the size limit; and which dialect a document is in (its keys give it away)."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

DOCUMENTED, DEPLOY_SCRIPT, GO_CLI = "documented", "deploy-script", "go-cli"
DIALECTS = (DOCUMENTED, DEPLOY_SCRIPT, GO_CLI)
MAX_STATE_BYTES = 8 * 1024 * 1024  # a real file is a few KiB; anything this big is not ours
HEALTH_STATUSES = ("healthy", "degraded", "unhealthy", "unknown")
STATUSES = ("active", "deploying", "failed", "rolled_back", "superseded")
DEFAULT_IMAGE_REPOSITORY = "togather-server"

_VERSION = re.compile(r"[0-9a-f]{7}")
_COMMIT = re.compile(r"[0-9a-f]{40}")

# Keys the model owns; everything else rides along in `extra` untouched.
_DEPLOYMENT_KEYS = frozenset({
    "id", "version", "git_commit", "deployed_at", "deployed_by", "active_slot", "slot",
    "health_status", "status", "migrations_run", "rollback_count", "docker_image",
    "migration_version", "live_since",
})
_TOP_KEYS = frozenset({
    "environment", "current_deployment", "previous_deployment", "deployment_history", "lock",
})
# The documented lock; a writer adds the Go CLI's `expires_at` (same time) after its own key.
_LOCK_ORDER = ("locked", "lock_id", "locked_by", "locked_at", "lock_expires_at", "expires_at",
               "deployment_id", "run_id", "pid", "pid_start", "hostname", "reason")
_LOCK_TIME_KEYS = ("locked_at", "lock_expires_at")
# The Go CLI's lock struct, in its field order; its zero times mean "not set".
_GO_LOCK_ORDER = ("locked", "locked_at", "locked_by", "reason", "expires_at")
_GO_ZERO = "0001-01-01T00:00:00Z"


def read_by_the_runbook(path: Sequence[str | int]) -> bool:
    """Whether the value at `path` in a state file is one the reader reads (a key the model
    owns, the `environment` the deploy script stamps on a deployment, the lock's), not
    another tool's key riding along in `extra`."""
    match tuple(path):
        case (key,):
            return key in _TOP_KEYS
        case ("current_deployment" | "previous_deployment", key) | (
                "deployment_history", int(), key):
            return key in _DEPLOYMENT_KEYS or key == "environment"
        case ("lock", key):
            return key in _LOCK_ORDER
    return False


def go_lock(lock: Mapping[str, Any]) -> bool:
    """A lock in the Go CLI's dialect: its `expires_at` comes first. Every writer of the
    runbook's puts the expiry under both names, its dialect's own first (_GO_LOCK_ORDER or
    _LOCK_ORDER), so the order still tells a Go CLI file from a documented one."""
    keys = [k for k in lock if k in ("expires_at", "lock_expires_at")]
    return bool(keys) and keys[0] == "expires_at"


def dialect_of(doc: Mapping[str, Any]) -> str:
    """Which tool wrote this document: its keys give it away (CONTRACTS: three dialects)."""
    deps = [doc.get("current_deployment"), doc.get("previous_deployment")]
    history = doc.get("deployment_history")
    if isinstance(history, list):
        deps += history
    objects = [d for d in deps if isinstance(d, Mapping)]
    lock = doc.get("lock")
    if ((isinstance(lock, Mapping) and go_lock(lock))
            or any("slot" in d for d in objects)):  # ours carry `active_slot` beside it
        return GO_CLI
    if (any(k in doc for k in ("active_slot", "slots", "last_deployment"))
            or any("environment" in d for d in objects)):
        return DEPLOY_SCRIPT
    return DOCUMENTED
