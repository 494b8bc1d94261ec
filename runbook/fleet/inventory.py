"""The Ansible inventory, read the way Ansible reads it (`ansible-inventory --list`), and the plan.

Never imports Ansible: the inventory's format (YAML, INI, a script or a plugin) is whatever the
user's `ansible-inventory` understands. What the fleet needs from it: the hosts in declared
order, the canary group, each host's `runbook_env`, and `fleet_lock_host`.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import shlex
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


def runner() -> Any:
    """ansible-runner (the [fleet] extra), or the same one-line refusal as a missing Ansible:
    with a system Ansible on PATH and the package installed without the extra, the inventory
    read worked, then the import failed with a traceback (exit 1) and a false "could not
    release the fleet lock" for a lock never taken."""
    try:
        import ansible_runner
    except ImportError:
        raise ConfigError("ansible-runner is not installed: the fleet commands need it to run "
                          "Ansible", "pip install 'togather-runbook[fleet]' (ansible-core + "
                          "ansible-runner)") from None
    return ansible_runner


@dataclass
class Inventory:
    path: Path
    hosts: list[str]  # every host, declared order
    groups: dict[str, list[str]]
    hostvars: dict[str, dict[str, Any]]
    canary_group: str = "canary"
    selected: list[str] = field(default_factory=list)  # the run's hosts (`select`); [] all

    @property
    def canary(self) -> list[str]:
        return list(self.groups.get(self.canary_group, []))

    def var(self, host: str, name: str, default: Any = None) -> Any:
        return self.hostvars.get(host, {}).get(name, default)

    @property
    def lock_host(self) -> str:
        """`fleet_lock_host` (the first selected host's that has it, e.g. from its group),
        else the first canary host. Read from the selection, not the whole inventory: a
        staging run (`--limit stg`) took development's fleet lock on development's host."""
        for host in [h for h in self.hosts if h in self.selected] or self.hosts:
            chosen = self.var(host, "fleet_lock_host")
            if chosen:
                if chosen not in self.hosts:
                    raise ConfigError(f"fleet_lock_host {chosen!r} is not a host of the inventory",
                                      "name one of: " + ", ".join(self.hosts))
                return str(chosen)
        return (self.canary or self.hosts)[0]

    def named(self, limit: str | None) -> set[str]:
        """The hosts `--limit` names by their own name (not through a group)."""
        items = {x.strip() for x in (limit or "").split(",")}
        return {h for h in self.hosts if h in items and h not in self.groups}

    def select(self, limit: str | None) -> list[str]:
        """Hosts (canary first, then declared order) matching `--limit` (host or group names)."""
        ordered = self.canary + [h for h in self.hosts if h not in self.canary]
        if not limit:
            self.selected = ordered
            return list(ordered)
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
        self.selected = [h for h in ordered if h in wanted]
        return list(self.selected)

    def env(self, host: str) -> str:
        """The host's `runbook_env` (the environment its runbook commands name)."""
        return str(self.var(host, "runbook_env", "production"))

    def env_arg(self, host: str) -> str:
        """The host's environment as a printed command names it, one shell word, where the
        host has not said how its own runbook names it (an older host-check, or no answer):
        the RUNBOOK_CONFIG its runbook_environment sets (the file every fleet command there
        loads; the bare name would load another or none), else its `runbook_env`. Never a
        template: the inventory's vars are not rendered here (a group's
        `/etc/togather/{{ inventory_hostname }}.toml` printed as is fails on the host), and
        only Ansible, on the host, knows what it renders to."""
        extra = self.var(host, "runbook_environment", {}) or {}
        config = extra.get("RUNBOOK_CONFIG") if isinstance(extra, dict) else None
        usable = config and "{{" not in str(config)
        return shlex.quote(str(config) if usable else self.env(host))


def read(path: Path, canary_group: str = "canary") -> Inventory:
    """The inventory as `ansible-inventory --list` gives it: computed here for a plain YAML
    file (`plain_yaml`: what costs 0.8 s as a process), through Ansible for anything else."""
    if not path.exists():
        raise UsageError(f"inventory {path} does not exist", "give the path of an Ansible "
                         "inventory (README: Several hosts)")
    data = plain_yaml(path)
    warnings = ""
    if data is None:
        data, warnings = _ansible_inventory(path)
    return _from_list(path, data, canary_group, warnings)


def _ansible_inventory(path: Path) -> tuple[dict[str, Any], str]:
    """`ansible-inventory --list`'s JSON, and what it said on stderr (a source that does not
    parse is only a warning there, and an empty inventory on stdout)."""
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
    if not isinstance(data, dict):
        raise UsageError(f"ansible-inventory gave no JSON object for {path}", "fix the inventory")
    return data, proc.stderr


def _unparsed(path: Path, warnings: str) -> str | None:
    """Why an inventory with no hosts does not parse, or None when it parses (and is empty):
    a YAML file's syntax error with its line, else ansible-inventory's first plugin failure.
    Judged only once no host was found, so a file one of Ansible's plugins reads (an INI
    inventory named .yml) is never refused for what PyYAML says of it."""
    if path.suffix in (".yml", ".yaml") and path.is_file():
        with contextlib.suppress(ImportError, OSError, UnicodeDecodeError):
            import yaml

            try:
                yaml.safe_load(path.read_text())
            except yaml.constructor.ConstructorError:
                pass  # a tag PyYAML does not know (!vault): Ansible's own loader reads it
            except yaml.MarkedYAMLError as exc:
                mark = exc.problem_mark or exc.context_mark
                where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
                return f"not valid YAML: {exc.problem or exc.context}{where}"
            except yaml.YAMLError as exc:
                return f"not valid YAML: {exc}"
    if "Unable to parse" not in warnings:  # Ansible's word for a source no plugin read
        return None
    for line in warnings.splitlines():
        if "Failed to parse inventory with" in line:
            return line.split("]:", 1)[-1].strip()
    return "ansible-inventory cannot parse it"


def _from_list(path: Path, data: dict[str, Any], canary_group: str,
               warnings: str = "") -> Inventory:
    hosts: list[str] = []
    groups: dict[str, list[str]] = {}

    def walk(group: str, path: frozenset[str]) -> list[str]:
        """A group's hosts, its children's included. Each group is computed in full, whichever
        parent reaches it first: one `seen` for the whole walk gave a group under two parents
        no members in the second (found by review: `--limit east` left out the hosts of its
        child `canary`, also a top-level group). Only a cycle (a group its own ancestor) is
        cut, on its own path."""
        if group in groups:
            return groups[group]
        if group in path:
            return []
        entry = data.get(group, {})
        members = list(entry.get("hosts", []))
        for child in entry.get("children", []):
            members += walk(child, path | {group})
        unique = list(dict.fromkeys(members))
        groups[group] = unique
        return unique

    for h in walk("all", frozenset()):
        if h not in hosts:
            hosts.append(h)
    if not hosts:
        why = _unparsed(path, warnings)
        if why is not None:  # "has no hosts" sent on-call to add hosts the file holds
            raise UsageError(f"inventory {path} does not parse: {why}",
                             "fix the inventory file there (README: Several hosts)")
        raise UsageError(f"inventory {path} has no hosts", "add hosts (README: Several hosts)")
    inv = Inventory(path=path.resolve(), hosts=hosts, groups=groups,
                    hostvars=data.get("_meta", {}).get("hostvars", {}), canary_group=canary_group)
    _no_secret_on_the_command_line(inv)
    return inv


def _no_secret_on_the_command_line(inv: Inventory) -> None:
    """A host's runbook_environment rides on its SSH command line (`env NAME=VALUE runbook
    ...`), readable in `ps` by every user of the controller and of the host, and in Ansible's
    -vvv output: a secret there is refused before anything runs (found by review)."""
    from runbook.redact import holds_secret

    for host in inv.hosts:
        extra = inv.var(host, "runbook_environment", {}) or {}
        if not isinstance(extra, dict):
            continue
        for name, value in extra.items():
            if holds_secret(str(name), str(value)):
                raise UsageError(
                    f"inventory {inv.path}: {host}'s runbook_environment sets {name}, a secret, "
                    "which would be on that host's SSH command line (visible in `ps` to every "
                    "user here and there); nothing was changed",
                    f"leave {name} out: each host's runbook reads the database URL from the "
                    "app's env file ([database] env_file in the host's environment file), and "
                    "RUNBOOK_CONFIG can name that file")


_GROUP_KEYS = frozenset({"hosts", "vars", "children"})
_PLAIN_NAME = re.compile(r"[A-Za-z0-9_.@-]+")  # no ranges, ports, patterns or spaces


def plain_yaml(path: Path) -> dict[str, Any] | None:
    """`ansible-inventory --list`'s JSON for a plain YAML inventory file, or None when only
    Ansible can say (then it is asked).

    Plain means what Ansible's `yaml` inventory plugin reads with nothing else involved: a
    `.yml`/`.yaml` file that is not executable, no `group_vars`/`host_vars` beside it, no
    ANSIBLE_INVENTORY_* or ANSIBLE_CONFIG override in the environment, no ansible.cfg (working
    directory, home, /etc/ansible), groups of only `hosts`/`vars`/`children`, host and group
    names without ranges, ports or patterns, plain YAML values (no tags such as !vault). Each
    host's vars are merged the way Ansible does: `all` first, then its groups by depth and
    name, then the host's own (no ansible_group_priority: a file using it goes to Ansible).
    tests/test_fleet.py compares the result with the real `ansible-inventory` output.
    """
    import os

    try:
        import yaml  # PyYAML: ansible-core's own dependency (the [fleet] extra)
    except ImportError:
        return None
    if (path.suffix not in (".yml", ".yaml") or not path.is_file()
            or os.access(path, os.X_OK) or (path.parent / "group_vars").exists()
            or (path.parent / "host_vars").exists()
            or any(Path(cfg).expanduser().exists()
                   for cfg in ("ansible.cfg", "~/.ansible.cfg", "/etc/ansible/ansible.cfg"))
            or any(k.startswith(("ANSIBLE_INVENTORY", "ANSIBLE_CONFIG")) for k in os.environ)):
        return None
    try:
        doc = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, OSError, UnicodeDecodeError):
        return None  # Ansible's own loader says what is wrong (or reads what we cannot)
    if not isinstance(doc, dict) or not doc:
        return None
    groups: dict[str, dict[str, Any]] = {}  # name -> {hosts, children, vars, parents}
    host_vars: dict[str, dict[str, Any]] = {}
    order: list[str] = []

    def group(name: str) -> dict[str, Any]:
        return groups.setdefault(name, {"hosts": [], "children": [], "vars": {},
                                        "parents": set()})

    def walk(name: Any, entry: Any, parent: str | None) -> bool:
        if not isinstance(name, str) or not _PLAIN_NAME.fullmatch(name):
            return False
        g = group(name)
        if parent is not None:
            g["parents"].add(parent)
            if name not in groups[parent]["children"]:
                groups[parent]["children"].append(name)
        if entry is None:
            return True
        if not isinstance(entry, dict) or not set(entry) <= _GROUP_KEYS:
            return False
        gvars = entry.get("vars") or {}
        hosts = entry.get("hosts") or {}
        children = entry.get("children") or {}
        if not all(isinstance(x, dict) for x in (gvars, hosts, children)):
            return False
        if "ansible_group_priority" in gvars:
            return False
        g["vars"].update(gvars)
        for host, hvars in hosts.items():
            if not isinstance(host, str) or not _PLAIN_NAME.fullmatch(host):
                return False
            if hvars is not None and not isinstance(hvars, dict):
                return False
            if host not in g["hosts"]:
                g["hosts"].append(host)
            if host not in host_vars:
                host_vars[host] = {}
                order.append(host)
            host_vars[host].update(hvars or {})
        return all(walk(child, sub, name) for child, sub in children.items())

    group("all")
    for name, entry in doc.items():
        if name in ("all", "ungrouped"):
            if not walk(name, entry, None if name == "all" else "all"):
                return None
        elif not walk(name, entry, "all"):
            return None
    if "ungrouped" not in groups:
        group("ungrouped")["parents"].add("all")
        groups["all"]["children"].insert(0, "ungrouped")
    elif "ungrouped" in groups["all"]["children"]:
        groups["all"]["children"].remove("ungrouped")
        groups["all"]["children"].insert(0, "ungrouped")
    # hosts listed only under `all` are `ungrouped`, as Ansible files them
    grouped = {h for n, g in groups.items() if n not in ("all", "ungrouped") for h in g["hosts"]}
    groups["ungrouped"]["hosts"] = [h for h in groups["all"]["hosts"] + groups["ungrouped"]
                                    ["hosts"] if h not in grouped]
    groups["all"]["hosts"] = []

    def depth(name: str, seen: frozenset[str] = frozenset()) -> int:
        if name in seen:
            raise ValueError(name)  # a cycle: Ansible's to judge
        parents = groups[name]["parents"]
        return 0 if not parents else 1 + max(depth(p, seen | {name}) for p in parents)

    def members(name: str) -> set[str]:
        out = set(groups[name]["hosts"])
        for child in groups[name]["children"]:
            out |= members(child)
        return out

    try:
        ranked = sorted(groups, key=lambda n: (depth(n), n))
        of_host = {n: members(n) for n in groups}
    except (ValueError, RecursionError):
        return None
    meta: dict[str, dict[str, Any]] = {}
    for host in order:
        merged: dict[str, Any] = {}
        for name in ranked:
            if name == "all" or host in of_host[name]:
                merged.update(groups[name]["vars"])
        merged.update(host_vars[host])
        if merged:  # as Ansible lists them: a host without vars has no entry
            meta[host] = merged
    out: dict[str, Any] = {"_meta": {"hostvars": meta}}
    for name, g in groups.items():
        listed: dict[str, Any] = {}
        if g["hosts"]:
            listed["hosts"] = list(g["hosts"])
        if g["children"]:
            listed["children"] = list(g["children"])
        if listed or name == "all":
            out[name] = listed
    return out


def _quiet_env() -> dict[str, str]:
    import os

    return {**os.environ, "ANSIBLE_DEPRECATION_WARNINGS": "False",
            "ANSIBLE_INVENTORY_UNPARSED_WARNING": "False", "ANSIBLE_NOCOLOR": "1"}


@dataclass
class Batches:
    """The rollout's batches: the canary group alone, then the rest per the batch spec."""

    batches: list[list[str]] = field(default_factory=list)
    split: bool = False  # a batch was larger than MAX_FORKS hosts and was split

    @property
    def serial(self) -> list[int]:
        return [len(b) for b in self.batches]


def batches(ordered: list[str], canary: list[str], spec: str = DEFAULT_BATCHES) -> Batches:
    """`1,25%,100%`: a count or a percentage of the non-canary hosts, the last one repeating.

    No batch holds more than MAX_FORKS hosts (a larger one is split): Ansible starts at most
    that many at once, and it judges a batch's failures only once all its hosts have run, so
    the hosts of a larger batch that waited for a fork would start after a failure."""
    sizes: list[str] = [s.strip() for s in spec.split(",")]
    if not any(sizes):
        raise UsageError(f"--batches {spec!r} is empty", f"e.g. {DEFAULT_BATCHES}")
    if not all(sizes):  # `1,,2` was taken as `1,2`: every item must be a count (README)
        raise UsageError(f"--batches {spec!r} has an empty item", "give a count or a "
                         f"percentage between each pair of commas, e.g. {DEFAULT_BATCHES}")
    first = [h for h in ordered if h in canary]
    rest = [h for h in ordered if h not in canary]
    total = len(rest)
    counts = [_batch_size(item, total) for item in sizes]  # every item judged, used or not
    out = Batches([first] if first else [])
    i = 0
    while rest:
        n = counts[min(i, len(counts) - 1)]
        out.batches.append(rest[:n])
        rest = rest[n:]
        i += 1
    if any(len(b) > MAX_FORKS for b in out.batches):
        out.split = True
        out.batches = [b[j:j + MAX_FORKS] for b in out.batches
                       for j in range(0, len(b), MAX_FORKS)]
    return out


def _batch_size(item: str, total: int) -> int:
    """One `--batches` item as a number of hosts: a count, or a percentage of `total`."""
    try:
        if item.endswith("%"):
            share = float(item[:-1])
            if not math.isfinite(share) or share <= 0:
                raise ValueError(item)  # inf% (no integer), nan%, 0% or below
            n = max(1, math.floor(total * share / 100))
        else:
            n = int(item)
    except ValueError:
        raise UsageError(f"--batches item {item!r} is neither a count nor a percentage "
                         "above 0", f"e.g. {DEFAULT_BATCHES}") from None
    if n < 1:
        raise UsageError(f"--batches item {item!r} is below 1", f"e.g. {DEFAULT_BATCHES}")
    return n
