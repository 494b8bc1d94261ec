"""`runbook status`: what the state file claims next to what really runs, and where they differ."""

from __future__ import annotations

from typing import Any

from runbook import caddy, database, docker, health, traffic
from runbook import intent as intents
from runbook import lock as locks
from runbook import state as states
from runbook.environment import Environment, Slot
from runbook.errors import RunbookError


def _deployment(dep: states.Deployment | None) -> dict[str, Any] | None:
    if dep is None:
        return None
    return {"id": dep.id, "version": dep.version, "slot": str(dep.active_slot),
            "status": dep.status, "deployed_at": states.format_time(dep.deployed_at),
            "deployed_by": dep.deployed_by, "image": dep.image,
            "migration_version": dep.migration_version, "rollback_count": dep.rollback_count}


def gather(env: Environment) -> dict[str, Any]:
    out: dict[str, Any] = {"environment": env.name, "label": env.display,
                           "state_file": str(env.state_file), "problems": []}
    problems: list[str] = out["problems"]
    try:
        st = states.read_state(env.state_file, environment=env.name)
        out["current"] = _deployment(st.current)
        out["previous"] = _deployment(st.previous)
        out["history"] = [d.version for d in st.history]
    except RunbookError as exc:
        st = None
        out["current"] = out["previous"] = None
        problems.append(str(exc))
    slots_out: dict[str, Any] = {}
    for slot in Slot:
        config = env.slot(slot)
        try:
            info = docker.inspect(config.container)
            container = {"name": config.container, "status": info.status, "image": info.image}
        except RunbookError as exc:
            container = {"name": config.container, "status": "unknown", "error": str(exc)}
        report = health.probe(config, env.health.path, env.health.request_timeout)
        slots_out[str(slot)] = {"port": config.port, "container": container,
                                "health": report.status, "version": report.version}
    out["slots"] = slots_out
    # Which slot serves comes from what Caddy runs, never from the Caddyfile on disk.
    running: str | None = None
    try:
        now = traffic.read(env)
        running = now.slot and str(now.slot)
        out["traffic"] = {"slot": running, "source": "Caddy's running config (admin API)",
                          "dials": list(now.dials), "proxy_slot": now.proxy_slot}
        trouble = now.problem(env)
        if trouble:
            problems.append(f"{trouble}: repoint Caddy with `runbook switch {env.name} --slot "
                            "<the healthy slot>`")
    except traffic.TrafficUnknownError as exc:
        out["traffic"] = {"slot": None, "error": exc.message}
    try:
        inspection = caddy.inspect(caddy.read(env), env)
        out["caddy"] = {"caddyfile": str(env.caddy.caddyfile), "active_slot": running,
                        "file_slot": inspection.slot and str(inspection.slot),
                        "consistent": inspection.consistent,
                        "problems": list(inspection.problems),
                        "running": caddy.is_running(env)}
        if not inspection.consistent:
            problems.append("Caddyfile managed block: " + "; ".join(inspection.problems))
        if not out["caddy"]["running"]:
            problems.append(f"Caddy is not answering at {env.caddy.admin_url}")
        elif running and inspection.slot and str(inspection.slot) != running:
            problems.append(f"the Caddyfile on disk points at {inspection.slot} but Caddy runs "
                            f"{running}: a run stopped between writing it and reloading Caddy; "
                            f"`runbook rollback {env.name}` finishes or redoes it (a reload "
                            "would move traffic to what the file says)")
    except RunbookError as exc:
        out["caddy"] = {"caddyfile": str(env.caddy.caddyfile), "error": str(exc),
                        "active_slot": running}
        problems.append(str(exc))
    try:
        pending = intents.read(env)
    except RunbookError as exc:
        pending = None
        problems.append(str(exc))
    if pending is not None:
        out["interrupted"] = {"run_id": pending.run_id, "action": pending.action,
                              "phase": pending.phase.value, "summary": pending.describe()}
        took = (pending.phase is intents.Phase.COMMITTED or running == pending.to_slot)
        problems.append(
            f"an interrupted run is unfinished: {pending.describe()}; "
            + (f"traffic already moved to {pending.to_slot}: `runbook {pending.action} "
               f"{env.name}` finishes it" if took else
               f"traffic did not move: `runbook {pending.action} {env.name}` runs it again")
            + (f" (add --version {pending.to_version})" if pending.action == "deploy" else "")
            + (f" (add --slot {pending.to_slot})" if pending.action == "switch" else ""))
    try:
        schema = database.schema_version(env)
        out["database"] = {"schema_version": schema.version, "dirty": schema.dirty}
    except RunbookError as exc:
        out["database"] = {"error": str(exc)}
    held = locks.status(env)
    last = _last_run(env)
    if last is not None:
        out["last_run"] = last
    out["lock"] = ({"locked": True, "summary": held.describe(), "stale": held.stale,
                    "why": held.why, "path": str(held.path)} if held else {"locked": False})
    active = out.get("caddy", {}).get("active_slot")
    if st and st.current and active and str(st.current.active_slot) != active:
        problems.append(f"state says {st.current.active_slot} is active, Caddy sends traffic "
                        f"to {active}")
    if active and slots_out[active]["health"] not in health.OK_STATUSES:
        problems.append(f"the active slot {active} is {slots_out[active]['health']}")
    if st and st.current and active:
        running = slots_out[active]["container"].get("image")
        if running and running != st.current.image:
            problems.append(f"state says {st.current.image} is current, the active slot runs "
                            f"{running}")
    return out


def _last_run(env: Environment) -> dict[str, Any] | None:
    """The newest run record: its outcome, and a stale lock it took over (said here too)."""
    import json

    try:
        records = sorted(env.runs_dir.glob("*.json"), key=lambda p: p.stat().st_mtime)
    except OSError:
        return None
    for record in reversed(records[-5:]):
        try:
            data = json.loads(record.read_text())
        except (OSError, ValueError):
            continue
        context = data.get("context") or {}
        return {"run_id": data.get("run_id"), "action": data.get("action"),
                "outcome": data.get("outcome"), "exit_code": data.get("exit_code"),
                "finished_at": data.get("finished_at"),
                "took_over": context.get("stale_lock_taken_over")}
    return None


def render(data: dict[str, Any]) -> str:
    lines = [f"Environment {data['label']} ({data['state_file']})"]
    for key in ("current", "previous"):
        dep = data.get(key)
        lines.append(f"  {key:<9} " + (f"{dep['version']} on {dep['slot']} ({dep['status']}, "
                                         f"{dep['deployed_at']} by {dep['deployed_by']}, "
                                         f"schema {dep['migration_version']})" if dep else "none"))
    caddy_info = data.get("caddy", {})
    lines.append(f"  traffic   {caddy_info.get('active_slot') or 'unknown'} "
                 f"(Caddy {'answering' if caddy_info.get('running') else 'NOT answering'})")
    for slot, info in data["slots"].items():
        c = info["container"]
        lines.append(f"  {slot:<9} {c['name']}: {c['status']}, {c.get('image') or '-'}, "
                     f"port {info['port']}, health {info['health']}")
    db = data.get("database", {})
    lines.append("  database  " + (f"schema {db['schema_version']}"
                                   + (" (dirty)" if db.get("dirty") else "")
                                   if "schema_version" in db else db.get("error", "unknown")))
    lock = data.get("lock", {})
    lines.append("  lock      " + ("free" if not lock.get("locked") else str(lock.get("summary")
                                                                              or lock)))
    last = data.get("last_run")
    if last:
        lines.append(f"  last run  {last['action']} {last['run_id']}: {last['outcome']} (exit "
                     f"{last['exit_code']})" + (f"; it {last['took_over']}" if last['took_over']
                                                else ""))
    if data["problems"]:
        lines.append("Problems:")
        lines += [f"  ! {p}" for p in data["problems"]]
    else:
        lines.append("No problems found: the state file matches what runs.")
    return "\n".join(lines)
