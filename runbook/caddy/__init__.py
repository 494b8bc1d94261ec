"""The Caddy adapter: point the managed Caddyfile block at a slot, prove it, or put it back.

    text    the managed block as text: find, inspect, rewrite, diff (pure)
    admin   Caddy itself: read the file, validate, reload, is it running, verify via the proxy
    switch  the switch's plan, backup, write and undo
    errors  CaddyError, CaddyNotRunningError

`from runbook.caddy import X` works for every public name below (`__all__`).
"""

from __future__ import annotations

from runbook.caddy.admin import (
    QUICK_RETRIES,
    ReloadCommand,
    Unreloadable,
    VerifyResult,
    adapt,
    adapt_as_reload,
    admin_address,
    check_imports,
    check_running,
    dropped_sites,
    first_difference,
    is_running,
    no_slot_header,
    read,
    read_bytes,
    reload,
    reload_action,
    reload_command,
    running_problem,
    seen_by_caddy,
    served_sites,
    slot_header_problem,
    validate,
    validate_command,
    verify,
    write_atomically,
)
from runbook.caddy.errors import (
    CaddyError,
    CaddyNotRunningError,
)
from runbook.caddy.switch import (
    SwitchPlan,
    apply,
    backup_path,
    plan_switch,
    restore,
    write_backup,
    write_config,
)
from runbook.caddy.text import (
    END_MARKER,
    SLOT_HEADER,
    START_MARKER,
    FileImport,
    Inspection,
    SlotHeader,
    Upstream,
    active_slot,
    file_imports,
    find_block,
    inspect,
    rewrite,
    unified_diff,
)

__all__ = [
    "END_MARKER",
    "QUICK_RETRIES",
    "SLOT_HEADER",
    "START_MARKER",
    "CaddyError",
    "CaddyNotRunningError",
    "FileImport",
    "Inspection",
    "ReloadCommand",
    "SlotHeader",
    "SwitchPlan",
    "Unreloadable",
    "Upstream",
    "VerifyResult",
    "active_slot",
    "adapt",
    "adapt_as_reload",
    "admin_address",
    "apply",
    "backup_path",
    "check_imports",
    "check_running",
    "dropped_sites",
    "file_imports",
    "find_block",
    "first_difference",
    "inspect",
    "is_running",
    "no_slot_header",
    "plan_switch",
    "read",
    "read_bytes",
    "reload",
    "reload_action",
    "reload_command",
    "restore",
    "rewrite",
    "running_problem",
    "seen_by_caddy",
    "served_sites",
    "slot_header_problem",
    "unified_diff",
    "validate",
    "validate_command",
    "verify",
    "write_atomically",
    "write_backup",
    "write_config",
]
