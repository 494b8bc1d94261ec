"""The fleet section of a drill report: a fleet run's timeline and each host's outcome.

Drawn from the fleet journal record (runbook/fleet/journal.py) alone: its phases (pre-flight,
drain, database) and each host's rollback, from its start to its end, grouped by batch (the
canary first). The record is reduced to what the report shows (`reduce`), so report.json
does not carry every host's dry run; the timeline reuses the run timeline's SVG. Offsets and
durations are the journal's own (the controller's monotonic clock), never one wall-clock
timestamp minus another (see `_host_times`).
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from runbook import templating
from runbook.reports.timeline import timeline_svg
from runbook.times import format_ms

HOST_STATUS = {"rolled back": "ok", "not started": "planned"}  # anything else: failed


def reduce(record: Mapping[str, Any]) -> dict[str, Any]:
    """What the report keeps of a fleet journal record."""
    hosts = record.get("hosts") or {}
    return {
        "fleet_run_id": record.get("fleet_run_id"), "started": record.get("started"),
        "outcome": record.get("outcome"), "exit_code": record.get("exit_code"),
        "dry_run": record.get("dry_run"), "resumed_from": record.get("resumed_from"),
        "lock_host": record.get("lock_host"), "canary": record.get("canary") or [],
        "batches": record.get("batches") or [],
        "duration_ms": record.get("duration_ms"),
        "database": {k: v for k, v in (record.get("database") or {}).items()
                     if k in ("host", "status", "snapshot", "reused_from", "schema guard")},
        "phases": [{k: p.get(k) for k in ("name", "status", "offset_ms", "duration_ms")}
                   for p in record.get("phases") or [] if isinstance(p, Mapping)],
        "hosts": {h: {k: v.get(k) for k in ("status", "exit_code", "message", "started",
                                            "ended", "offset_ms", "duration_ms")}
                  for h, v in hosts.items() if isinstance(v, Mapping)},
    }


def _iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).isoformat(timespec="milliseconds")


def _host_times(h: Mapping[str, Any], started: float) -> tuple[float, float | None]:
    """When a host's rollback started (epoch) and how long it took (ms): from the run's start
    plus the host's monotonic offset, and its monotonic duration, as the journal records them;
    a journal written before those were recorded has its wall-clock start and end only, which
    a clock step between them makes wrong (shown as the run recorded it)."""
    offset, took = h.get("offset_ms"), h.get("duration_ms")
    at = started + offset / 1000 if isinstance(offset, int | float) else h["started"]
    if isinstance(took, int | float):
        return at, took
    if h.get("ended") is not None and "offset_ms" not in h:  # an older journal
        return at, (h["ended"] - h["started"]) * 1000
    return at, None


def _batch_of(record: Mapping[str, Any]) -> dict[str, str]:
    out = {}
    for index, batch in enumerate(record.get("batches") or []):
        for host in batch:
            canary = host in (record.get("canary") or [])  # first, maybe split in several
            out[host] = "canary" if canary else f"batch {index + 1}"
    return out


def as_run(record: Mapping[str, Any]) -> dict[str, Any]:
    """The fleet run as a run timeline: the fleet's phases, then one row per host."""
    started = datetime.fromisoformat(str(record["started"])).timestamp()
    steps: list[dict[str, Any]] = []
    for p in record.get("phases") or []:
        if p.get("name") == "rollout" or p.get("offset_ms") is None:
            continue  # drawn as its hosts
        steps.append({"name": p["name"], "title": f"fleet {p['name']}",
                      "status": "ok" if p.get("status") in ("ok", "restored") else "failed",
                      "started_at": _iso(started + p["offset_ms"] / 1000),
                      "duration_ms": p.get("duration_ms")})
    batch = _batch_of(record)
    for host, h in (record.get("hosts") or {}).items():
        if h.get("started") is None:
            continue
        at, took = _host_times(h, started)
        steps.append({"name": f"{host} ({batch.get(host, '?')})",
                      "title": f"{host}: {h.get('status')}",
                      "status": HOST_STATUS.get(str(h.get("status")), "failed"),
                      "started_at": _iso(at), "duration_ms": round(took or 0),
                      "error": h.get("message") if h.get("status") != "rolled back" else None})
    return {"run_id": record.get("fleet_run_id"), "action": "fleet rollback",
            "outcome": record.get("outcome"), "started_at": record.get("started"),
            "steps": steps}


def section(record: Mapping[str, Any]) -> dict[str, Any]:
    """A fleet run as the report template shows it."""
    batch = _batch_of(record)
    hosts = []
    started = (datetime.fromisoformat(str(record["started"])).timestamp()
               if record.get("started") else 0.0)
    for host, h in (record.get("hosts") or {}).items():
        took = _host_times(h, started)[1] if h.get("started") else None
        hosts.append({"host": host, "batch": batch.get(host, "-"), "status": h.get("status"),
                      "exit_code": h.get("exit_code"), "took": format_ms(took),
                      "message": h.get("message") or ""})
    for host in (h for b in record.get("batches") or [] for h in b):
        if host not in (record.get("hosts") or {}):
            hosts.append({"host": host, "batch": batch.get(host, "-"),
                          "status": "not started (stopped before the rollout)",
                          "exit_code": None, "took": "-", "message": ""})
    svg = timeline_svg(as_run(record)) if record.get("started") else ""
    database = record.get("database") or {}
    return {"fleet_run_id": record.get("fleet_run_id"), "outcome": record.get("outcome"),
            "exit_code": record.get("exit_code"), "duration": format_ms(record.get("duration_ms")),
            "svg": templating.safe(svg) if svg else None, "hosts": hosts,
            "database": ", ".join(f"{k}: {v}" for k, v in database.items()) or "not judged",
            "resumed_from": record.get("resumed_from"), "dry_run": record.get("dry_run")}
