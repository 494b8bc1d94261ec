"""The Ansible inventory, read the way Ansible reads it (`ansible-inventory --list`), and the plan.

Never imports Ansible: the inventory's format (YAML, INI, a script or a plugin) is whatever the
user's `ansible-inventory` understands. What the fleet needs from it: the hosts in declared
order, the canary group, each host's `runbook_env`, and `fleet_lock_host`.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from runbook.errors import ConfigError, UsageError

DEFAULT_BATCHES = "1,25%,100%"
MAX_FORKS = 8  # well below sshd's default MaxStartups (10:30:100)


def ansible_tool(name: str) -> str:
    """An Ansible executable: beside this interpreter (the [fleet] extra) or on PATH."""
    beside = Path(sys.executable).with_name(name)
    found = str(beside) if beside.exists() else shutil.which(name)
    if not found:
        raise ConfigError(f"{name} is not installed: the fleet commands need Ansible",
                          "pip install 'togather-runbook[fleet]' (ansible-core + ansible-runner)")
    return found


@dataclass
class Inventory:
    path: Path
    hosts: list[str]  # every host, declared order
    groups: dict[str, list[str]]
    hostvars: dict[str, dict[str, Any]]
    canary_group: str = "canary"

    @property
    def canary(self) -> list[str]:
        return list(self.groups.get(self.canary_group, []))

    def var(self, host: str, name: str, default: Any = None) -> Any:
        return self.hostvars.get(host, {}).get(name, default)

    @property
    def lock_host(self) -> str:
        """`fleet_lock_host` (any host's var, e.g. from group all), else the first canary host."""
        for host in self.hosts:
            chosen = self.var(host, "fleet_lock_host")
            if chosen:
                if chosen not in self.hosts:
                    raise ConfigError(f"fleet_lock_host {chosen!r} is not a host of the inventory",
                                      "name one of: " + ", ".join(self.hosts))
                return str(chosen)
        return (self.canary or self.hosts)[0]

    def select(self, limit: str | None) -> list[str]:
        """Hosts (canary first, then declared order) matching `--limit` (host or group names)."""
        ordered = self.canary + [h for h in self.hosts if h not in self.canary]
        if not limit:
            return ordered
        wanted: set[str] = set()
        for item in (x.strip() for x in limit.split(",")):
            if not item:
                continue
            if item in self.groups:
                wanted.update(self.groups[item])
            elif item in self.hosts:
                wanted.add(item)
            else:
                raise UsageError(f"--limit names {item!r}, which is neither a host nor a group "
                                 "of the inventory", "hosts: " + ", ".join(self.hosts))
        return [h for h in ordered if h in wanted]


def read(path: Path, canary_group: str = "canary") -> Inventory:
    if not path.exists():
        raise UsageError(f"inventory {path} does not exist", "give the path of an Ansible "
                         "inventory (README: Several hosts)")
    proc = subprocess.run([ansible_tool("ansible-inventory"), "-i", str(path), "--list"],
                          capture_output=True, text=True, check=False, timeout=120,
                          env=_quiet_env())
    if proc.returncode != 0 or not proc.stdout.strip():
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise UsageError(f"ansible-inventory cannot read {path}: {last}",
                         "fix the inventory (README: Several hosts)")
    try:
        data = json.loads(proc.stdout)
    except ValueError:
        raise UsageError(f"ansible-inventory gave no JSON for {path}",
                         "fix the inventory") from None
    hosts: list[str] = []
    groups: dict[str, list[str]] = {}

    def walk(group: str, seen: set[str]) -> list[str]:
        if group in seen:
            return []
        seen.add(group)
        entry = data.get(group, {})
        members = list(entry.get("hosts", []))
        for child in entry.get("children", []):
            members += walk(child, seen)
        unique = list(dict.fromkeys(members))
        groups[group] = unique
        return unique

    for h in walk("all", set()):
        if h not in hosts:
            hosts.append(h)
    if not hosts:
        raise UsageError(f"inventory {path} has no hosts", "add hosts (README: Several hosts)")
    inv = Inventory(path=path.resolve(), hosts=hosts, groups=groups,
                    hostvars=data.get("_meta", {}).get("hostvars", {}), canary_group=canary_group)
    return inv


def _quiet_env() -> dict[str, str]:
    import os

    return {**os.environ, "ANSIBLE_DEPRECATION_WARNINGS": "False",
            "ANSIBLE_INVENTORY_UNPARSED_WARNING": "False", "ANSIBLE_NOCOLOR": "1"}


@dataclass
class Batches:
    """The rollout's batches: the canary group alone, then the rest per the batch spec."""

    batches: list[list[str]] = field(default_factory=list)

    @property
    def serial(self) -> list[int]:
        return [len(b) for b in self.batches]


def batches(ordered: list[str], canary: list[str], spec: str = DEFAULT_BATCHES) -> Batches:
    """`1,25%,100%`: a count or a percentage of the non-canary hosts, the last one repeating."""
    sizes: list[str] = [s.strip() for s in spec.split(",") if s.strip()]
    if not sizes:
        raise UsageError(f"--batches {spec!r} is empty", f"e.g. {DEFAULT_BATCHES}")
    first = [h for h in ordered if h in canary]
    rest = [h for h in ordered if h not in canary]
    out = Batches([first] if first else [])
    i = 0
    total = len(rest)
    while rest:
        item = sizes[min(i, len(sizes) - 1)]
        try:
            n = (max(1, math.floor(total * float(item[:-1]) / 100)) if item.endswith("%")
                 else int(item))
        except ValueError:
            raise UsageError(f"--batches item {item!r} is neither a count nor a percentage",
                             f"e.g. {DEFAULT_BATCHES}") from None
        if n < 1:
            raise UsageError(f"--batches item {item!r} is below 1", f"e.g. {DEFAULT_BATCHES}")
        out.batches.append(rest[:n])
        rest = rest[n:]
        i += 1
    return out
