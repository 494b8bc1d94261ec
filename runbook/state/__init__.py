"""deployment-state.json: one model for the three dialects found on real hosts.

The documented dialect, the deploy script's and the Go CLI's all describe the same facts with
different keys. Reading normalizes them, and remembers what the file said. Writing patches that
original: every key and value another tool wrote stays exactly as written (nanosecond times, slot
keys, lock fields; absent fields stay absent), and only what changed is written, in the file's
own dialect and formatting. A rewrite with no change is byte-identical, so a rewrite by us never
destroys another tool's data (the bug that made the dialects corrupt each other). Every problem
surfaces as one StateError line naming the file, the key and the fix, because an operator reads
it in the middle of an incident. One exception: a history entry another tool wrote badly that
is provably older than the previous deployment is kept unread (model.Unread), written back as
it was, in its place; a rollback passes it by with a warning (DeploymentState.passed_by).

One job a module: schema (dialects, keys, statuses, size limit), model (Deployment,
DeploymentState), reader (any dialect into the model), dialects (the model back into the
file's own dialect), writer (the file's bytes and the atomic write), records (transitions:
deploy, rollback, the lock mirror). Every name stays importable as `runbook.state.<name>`.
"""

from __future__ import annotations

import os  # noqa: F401  (tests patch runbook.state.os.replace to fail the write)

from runbook.state.dialects import format_time_as, normalized_history, to_json
from runbook.state.model import (
    Deployment,
    DeploymentState,
    Unread,
    current_operator,
    format_time,
    new_id,
    parse_time,
    rolled_back_to,
)
from runbook.state.reader import (
    NoStateFile,
    NotJSON,
    Refused,
    absent,
    content_key,
    missing_link,
    parse_state,
    read_lock,
    read_or_absent,
    read_state,
)
from runbook.state.records import (
    after_deploy,
    after_rollback,
    is_version,
    make_deployment,
    with_lock,
)
from runbook.state.schema import (
    DEFAULT_IMAGE_REPOSITORY,
    DEPLOY_SCRIPT,
    DIALECTS,
    DOCUMENTED,
    GO_CLI,
    HEALTH_STATUSES,
    MAX_STATE_BYTES,
    STATUSES,
    dialect_of,
)
from runbook.state.writer import WRITING, StateChangedError, StateWriteError, dumps, write_state

__all__ = [
    "DEFAULT_IMAGE_REPOSITORY",
    "DEPLOY_SCRIPT",
    "DIALECTS",
    "DOCUMENTED",
    "GO_CLI",
    "HEALTH_STATUSES",
    "MAX_STATE_BYTES",
    "STATUSES",
    "WRITING",
    "Deployment",
    "DeploymentState",
    "NoStateFile",
    "NotJSON",
    "Refused",
    "StateChangedError",
    "StateWriteError",
    "Unread",
    "absent",
    "after_deploy",
    "after_rollback",
    "content_key",
    "current_operator",
    "dialect_of",
    "dumps",
    "format_time",
    "format_time_as",
    "is_version",
    "make_deployment",
    "missing_link",
    "new_id",
    "normalized_history",
    "parse_state",
    "parse_time",
    "read_lock",
    "read_or_absent",
    "read_state",
    "rolled_back_to",
    "to_json",
    "with_lock",
    "write_state",
]
