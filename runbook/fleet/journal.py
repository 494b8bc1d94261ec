"""The fleet journal: one JSON record per fleet run, holding each host's run record.

Written on the controller, `~/.togather/fleet/<fleet run id>.json` (or `--journal-dir`, or
RUNBOOK_FLEET_DIR): the plan (hosts, batches, lock host), each phase with its start and
duration (pre-flight, database, rollout), each host's outcome with the JSON its own
`runbook rollback` printed (steps, timings, its journal's path on that host), the database
decision (so a `--resume` never repeats it) and the resume command.

Times: `started`, `finished` and each host's `started`/`ended` are wall-clock timestamps (when),
never subtracted; every offset and duration (`offset_ms`, `duration_ms`) is measured on the
controller's monotonic clock (time.monotonic()), so a clock step during the run (NTP, a VM
resumed) cannot make one negative or hours long.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from runbook import files, procs
from runbook.errors import UsageError
from runbook.journal import scrub

if TYPE_CHECKING:
    from runbook.fleet.inventory import Batches, Inventory


def default_dir() -> Path:
    return Path(os.environ.get("RUNBOOK_FLEET_DIR") or "~/.togather/fleet").expanduser()


def new_id() -> str:
    return f"fleet_{datetime.now(UTC).strftime('%Y%m%d_%H%M%S')}_{secrets.token_hex(3)}"


class FleetJournal:
    """Written at the start of the run and again at each phase and each host's end (atomic
    replace, fsynced), so that a controller killed at any line leaves a record a `--resume`
    can read: `outcome` null means the run never finished (see `controller`)."""

    def __init__(self, fleet_run_id: str, options: Any, inventory: Inventory,
                 targets: list[str], plan: Batches, who: str) -> None:
        self.started = time.time()  # a timestamp (when), never subtracted from another
        self.began = time.monotonic()  # what every offset and duration is measured from
        self.directory: Path | None = getattr(options, "journal_dir", None)
        self._lock = threading.RLock()  # host ends are written from ansible-runner's thread
        self.on_error: Callable[[str], None] | None = None  # says a failed `save`
        self.unwritten: str | None = None  # why the last `save` failed; None: the file is whole
        self.record: dict[str, Any] = {
            "fleet_run_id": fleet_run_id, "who": who, "why": options.reason,
            "inventory": str(inventory.path), "dry_run": options.dry_run,
            "limit": options.limit, "resumed_from": options.resume,
            "lock_host": inventory.lock_host, "hosts_selected": targets,
            # each selected host's environment: a resume from another environment (the
            # journal folder is shared by all) is refused, never taken as rolled back
            "environments": {h: inventory.env(h) for h in inventory.selected or targets},
            "canary": [h for h in targets if h in inventory.canary],
            # as given: the resume command a dead run's refusal names is built from them
            "canary_group": inventory.canary_group, "batches_spec": options.batches,
            "batches": plan.batches, "started": _iso(self.started), "phases": [],
            "database": None, "hosts": {}, "outcome": None, "exit_code": None,
            "controller": {"hostname": socket.gethostname(), "pid": os.getpid(),
                           "pid_start": procs.pid_start(os.getpid())},
        }

    def set(self, **values: Any) -> None:
        with self._lock:
            self.record.update(values)

    def host(self, name: str, entry: dict[str, Any]) -> None:
        """One host's outcome (or its start), written at once (a failure said: `save`)."""
        with self._lock:
            self.record["hosts"] = {**self.record.get("hosts", {}), name: entry}
            self.save()

    def drain_answer(self, name: str, entry: dict[str, Any]) -> None:
        """One host's drain answer (what it stopped, by Id), written at once: the drain phase
        is journaled only once the restore has answered, so a controller killed meanwhile left
        no record of which containers each host's drain stopped (found by review)."""
        with self._lock:
            self.record["drain_answers"] = {**self.record.get("drain_answers", {}), name: entry}
            self.save()

    def offset_ms(self, began: float) -> int:
        """A time.monotonic() reading `began` as milliseconds since the run began."""
        return round((began - self.began) * 1000)

    def phase(self, name: str, began: float, status: str, **details: Any) -> None:
        """A phase that began at `began`, a time.monotonic() reading, and ends now: its
        offset and duration on that clock, never from two wall-clock readings (a clock
        stepped back an hour mid-phase journaled a duration of minus an hour)."""
        now = time.monotonic()
        with self._lock:
            self.record["phases"].append({"name": name, "status": status,
                                          "offset_ms": self.offset_ms(began),
                                          "duration_ms": round((now - began) * 1000),
                                          **details})

    def finish(self, outcome: str, exit_code: int, **values: Any) -> None:
        with self._lock:
            self.record.update(outcome=outcome, exit_code=exit_code,
                               finished=_iso(time.time()),
                               duration_ms=round((time.monotonic() - self.began) * 1000),
                               **values)

    def path(self, directory: Path | None = None) -> Path:
        return (directory or self.directory or default_dir()) / \
            f"{self.record['fleet_run_id']}.json"

    def write(self, directory: Path | None = None) -> Path:
        """The whole record, atomically; raises OSError (see `save`)."""
        path = self.path(directory)
        with self._lock:
            path.parent.mkdir(parents=True, exist_ok=True)
            text = json.dumps(scrub(self.record), indent=2, default=str)
            files.atomic_write(path, text.encode())
        return path

    def save(self, directory: Path | None = None) -> Path | None:
        """`write`, its failure said (`on_error`, once per cause) and kept in `unwritten`
        instead of raised; None then. Once hosts changed, the run must go on and report what
        they did: a full disk on the controller ended it "unexpected failure" (exit 5), the
        hosts' results lost and, after a maintenance restore, every host left drained (found
        by review). Each write is the whole record: a later one that succeeds makes it whole."""
        with self._lock:
            try:
                path = self.write(directory)
            except OSError as exc:
                why = f"{self.path(directory)}: {exc.strerror or exc}"
                if why != self.unwritten and self.on_error is not None:
                    self.on_error(f"could not write the fleet journal ({why})")
                self.unwritten = why
                return None
            self.unwritten = None
            return path


def load(fleet_run_id: str, directory: Path | None = None) -> dict[str, Any]:
    path = (directory or default_dir()) / f"{fleet_run_id}.json"
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        raise UsageError(f"--resume {fleet_run_id}: no readable fleet journal at {path}",
                         "copy the fleet run id from the resume command the stopped run "
                         "printed") from None
    if not isinstance(data, dict):
        raise UsageError(f"fleet journal {path} is not a fleet record", "check the id")
    return data


def _iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).isoformat(timespec="milliseconds")
