"""The step-phrase table: what an on-call engineer types for each step, and how to check it.

ACTIONS: what to type for a Given/When; CHECKS: how to check a Then by hand. Also the quick
reference, the exit codes (from runbook/errors.py, the one table) and SEED_MAP: where each
section of the old rollback guide went.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from runbook.errors import MEANINGS

TAGS = {
    "mutating": "changes the environment; on a real host only the rollback of `pytest "
                "features/rollback.feature` runs unselected, any other only when selected "
                "explicitly (-k, -m, node id)",
    "fault": "drill only: breaks things on purpose; skipped on a real host",
    "database": "about the database schema or its data",
}

# ---------------------------------------------------------------------------------------------
# Step phrases -> commands. ACTIONS: what to type for a Given/When; CHECKS: how to check a Then
# by hand. `{name}` is filled from the phrase's named group; <env>, <slot>, <version> are
# the reader's to fill.


@dataclass(frozen=True)
class Phrase:
    pattern: str
    commands: tuple[str, ...]
    kinds: tuple[str, ...] = ("given", "when", "then")

    def match(self, kind: str, text: str) -> list[str] | None:
        if kind not in self.kinds:
            return None
        found = re.search(self.pattern, text)
        if found is None:
            return None
        values = {k: v for k, v in found.groupdict().items() if v is not None}
        return [c.format(**values) for c in self.commands]


HEALTH = "runbook healthcheck <env> --slot {slot} --format {form}"
ACTIONS: tuple[Phrase, ...] = (
    Phrase(r"^I confirm the deployment state$", ("runbook status <env>",)),
    Phrase(r"^I preview the rollback$", ("runbook rollback <env> --dry-run",)),
    Phrase(r"^I force the rollback$", ("runbook rollback <env> --force",)),
    Phrase(r"^I roll back restoring", (
        "runbook rollback <env> --restore-snapshot   # or add --snapshot FILE to choose one",)),
    Phrase(r"^I roll back the migrations", (
        "runbook status <env>   # the database's schema, and the one each deployment ran with",
        "runbook snapshot create <env> --reason before-migrate-down   # a down migration "
        "drops data",
        "migrate -path <migrations dir> -database \"$DATABASE_URL\" down <N>   # golang-migrate, "
        "where the live release's migrations are; N = database schema - previous deployment's",
        "runbook rollback <env>")),
    Phrase(r"^I roll back$", ("runbook rollback <env>",)),
    Phrase(r"^I redeploy the known-good version", ("runbook deploy <env> --version <version>",)),
    Phrase(r"^I switch traffic by hand", ("runbook switch <env> --slot <slot>",)),
    Phrase(r"^I check the health of the (?P<slot>blue|green) slot as JSON",
           (HEALTH.replace("{form}", "json"),)),
    Phrase(r"^I check the health of the (?P<slot>blue|green) slot as a table",
           (HEALTH.replace("{form}", "table"),)),
    Phrase(r"^I check the health", ("runbook healthcheck <env> --slot both --format table",)),
    Phrase(r"^I ask each slot's own port for its health", (
        "curl -s http://localhost:8081/health   # blue",
        "curl -s http://localhost:8082/health   # green")),
    Phrase(r"holds the deploy lock", ("runbook unlock <env> --status",)),
    Phrase(r"releases the deploy lock", ("runbook unlock <env>   # only a dead or expired "
                                         "holder's lock is ever removed",)),
    Phrase(r"I stop the old slot as advised", (
        "ss -tn state established '( sport = :<caddy port> )'   # until its h2c clients are gone",
        "docker stop <old container>   # named in the rollback's note and by runbook status")),
    Phrase(r"^I start Caddy", ("sudo systemctl start caddy",)),
    Phrase(r"^I take a snapshot", ("runbook snapshot create <env>",)),
    Phrase(r"^I restore", ("runbook snapshot restore <env> <snapshot>",)),
    Phrase(r"^I unlock", ("runbook unlock <env>",)),
    Phrase(r"for (?:its|their) help", ("runbook --help", "runbook <command> --help")),
)

PROXY_CHECK = "curl -si http://localhost/version   # X-Togather-Slot: the slot; body: version"
OUTPUT = "# read it in the runbook command's output, or in its deployment log"
CHECKS: tuple[Phrase, ...] = (
    Phrase(r"^users saw no failed request", (
        "while sleep 0.05; do curl -s -o /dev/null -w '%{{http_code}}\\n' "
        "http://localhost/version; done | uniq -c   # in a second terminal while it runs; "
        "Ctrl-C after: only 200s",), ("then",)),
    Phrase(r"users (?:are|get)|users are still", (PROXY_CHECK,), ("then",)),
    Phrase(r"exit code", ("echo $?   # right after the runbook command",), ("then",)),
    Phrase(r"^the (?:rollback says|advice|refusal|failing health check is named)", (OUTPUT,),
           ("then",)),
    Phrase(r"^the plan shows", ("runbook rollback <env> --dry-run",), ("then",)),
    Phrase(r"JSON report", ("runbook healthcheck <env> --slot blue --format json",), ("then",)),
    Phrase(r"table has a row", ("runbook healthcheck <env> --slot green --format table",),
           ("then",)),
    Phrase(r"answers for itself on its own port", (
        "curl -s http://localhost:8081/health   # blue",
        "curl -s http://localhost:8082/health   # green"), ("then",)),
    Phrase(r"help", ("runbook <command> --help",), ("then",)),
    Phrase(r"own health check said the database", (
        "curl -s http://localhost:<its port>/health   # the slot's own answer while it runs "
        "(8081 blue, 8082 green): checks.database fails",
        "docker exec togather-db pg_isready   # while the database itself answers"), ("then",)),
    Phrase(r"health", ("runbook healthcheck <env> --slot active",), ("then",)),
    Phrase(r"deployment log", (
        # the newest run's log, not an hourly `snapshot create`'s or an unlock's (they log too)
        "tail -n 30 \"$(ls -t ~/.togather/logs/deployments/<env>_*.log | xargs grep -L "
        "'\"message\": \"\\(unlock\\|snapshot-create\\|snapshot-cleanup\\) started' "
        "| head -n 1)\"",),
        ("then",)),
    Phrase(r"snapshot", ("runbook snapshot list <env>",), ("then",)),
    Phrase(r"still answered by the old slot", (
        "ss -tn state established '( sport = :<caddy port> )'   # the load balancer's connections"
        " are still open",), ("then",)),
    Phrase(r"left running", (OUTPUT, "runbook status <env>"), ("then",)),
    Phrase(r"stopped|keeps running|running without a restart",
           ("docker ps -a --filter name=togather-",), ("then",)),
    Phrase(r"Caddyfile", ("sudo caddy validate --config /etc/caddy/Caddyfile",), ("then",)),
    Phrase(r"environment file", ("ls -l /opt/togather/.env.<env>   # unchanged time and size",),
           ("then",)),
    Phrase(r"other sites", ("curl -sI http://localhost:<other site port>/",), ("then",)),
    Phrase(r"state|schema|image|nothing has changed|matches|rollback|status",
           ("runbook status <env>",), ("then",)),
)


def actions_for(kind: str, text: str) -> list[str]:
    for phrase in ACTIONS:
        if (found := phrase.match(kind, text)) is not None:
            return found
    return []


def checks_for(kind: str, text: str) -> list[str]:
    for phrase in CHECKS:
        if (found := phrase.match(kind, text)) is not None:
            return found
    return []


QUICK_REFERENCE: tuple[tuple[str, str, str], ...] = (
    ("Confirm the deployment state", "runbook status <env>",
     "cat .../deployment-state.json | jq ."),
    ("Preview a rollback (every value, the Caddyfile diff)", "runbook rollback <env> --dry-run",
     "server deploy rollback <environment> --dry-run"),
    ("Roll back", "runbook rollback <env>", "server deploy rollback <environment>"),
    ("Roll back past the health gate and schema guard", "runbook rollback <env> --force",
     "server deploy rollback <environment> --force"),
    ("Verify health", "runbook healthcheck <env> --slot both --format table",
     "server healthcheck --slot blue --format json"),
    ("Switch traffic by hand", "runbook switch <env> --slot <slot>",
     "edit /etc/caddy/Caddyfile; systemctl reload caddy"),
    ("Redeploy a known-good version", "runbook deploy <env> --version <version>",
     "./deploy/scripts/deploy.sh <environment> --force"),
    ("Roll back past migrations, restoring a snapshot",
     "runbook rollback <env> --restore-snapshot",
     "gunzip -c <snapshot>.sql.gz | psql \"$DATABASE_URL\""),
    ("Database snapshots", "runbook snapshot list|create|restore <env>",
     "server snapshot"),
    ("Who holds the deploy lock", "runbook unlock <env> --status", ""),
)

EXIT_CODES = tuple((str(int(code)), meaning) for code, meaning in MEANINGS.items())

# ---------------------------------------------------------------------------------------------
# The seed guide (the old on-call rollback guide) -> the scenarios that now carry each part.
# Each entry is a scenario's name or the start of it (so a scenario may grow a clause).

SEED_MAP: dict[str, tuple[str, ...]] = {
    "Quick Reference": ("Run the rollback", "Preview the rollback with a dry run",
                        "Force a rollback past the health gate and the schema guard"),
    "Rollback Workflow": ("Confirm the deployment state before rolling back", "Run the rollback",
                          "Verify the health of both slots"),
    "Rollback Workflow: 1. Confirm deployment state": (
        "Confirm the deployment state before rolling back",),
    "Rollback Workflow: 2. Run rollback": ("Run the rollback",),
    "Rollback Workflow: 3. Verify health": ("Verify the health of both slots",),
    "Rollback Workflow: 4. If health fails": (
        "Health checks fail on the previous deployment",
        "Health checks fail because the previous deployment cannot reach the database"),
    "What rollback changes": ("Run the rollback, then check what it changed",),
    "Database Considerations": ("Restore a snapshot when migrations ran after the target "
                                "deployment",
                                "Schema mismatch between the previous version and the database"),
    "Troubleshooting": ("No previous deployment found",
                        "Health checks fail on the previous deployment",
                        "Health checks fail because the previous deployment cannot reach the "
                        "database",
                        "Traffic does not switch because Caddy is not running",
                        "Traffic does not switch because the Caddyfile targets the wrong port",
                        "Schema mismatch between the previous version and the database"),
    "Troubleshooting: No previous deployment found": ("No previous deployment found",),
    "Troubleshooting: Health checks fail": (
        "Health checks fail on the previous deployment",
        "Health checks fail because the previous deployment cannot reach the database"),
    "Troubleshooting: Traffic does not switch": (
        "Traffic does not switch because Caddy is not running",
        "Traffic does not switch because the Caddyfile targets the wrong port"),
    "Troubleshooting: Schema mismatch": (
        "Schema mismatch between the previous version and the database",),
    "Recovery": ("Redeploy a known-good version when the service is down and rollback cannot "
                 "help", "Switch traffic by hand to the slot you know is healthy"),
    "Recovery: Manual slot switch": ("Switch traffic by hand to the slot you know is healthy",),
    "Additional Resources": ("Every command explains itself",),
    "Getting Help": ("The deployment log and the state file say what happened",),
}
