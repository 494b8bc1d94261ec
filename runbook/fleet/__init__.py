"""Fleet rollback (issue 13): the single-host rollback driven across an Ansible inventory.

The controller (`runbook fleet rollback INVENTORY`) reads the inventory with
`ansible-inventory --list`, plans the order (canary group, then batches), and runs the
playbooks shipped in `playbooks/` through ansible-runner (Ansible is a subprocess, never
imported). On each host the playbooks run the installed `runbook`: `runbook fleet host-check`
(read-only pre-flight), `runbook fleet lock` (the fleet lock on one host) and
`runbook rollback ENV --format json --yes`, so the single-host transaction, lock and journal
stay the one implementation.
"""

from __future__ import annotations

FLEET_PROTOCOL = 8  # 2: `host-check --take-lock` (the lock host's take and check in one);
# 3: host-check says the current deployment (a resume refuses a host changed since);
# 4: ... and the release it was rolled back from (a fresh run refuses to roll it forward);
# 5: `host-check --schema-restored-first` (maintenance: every check past the schema guard)
# 6: `drain --fleet-run --holder` (the drain journaled on the host, under its deploy lock)
# 7: `host-check --end-sessions` (the maintenance restore planned as it runs) and its
#    `maintenance` plans (drain, restore, the rollback after it): the maintenance dry run
#    shows every step the run takes
# 8: the drain answers `stopped_ids` and `drain --undo` takes NAME@ID (it starts only the
#    container the drain stopped, by its Id): an older host refused NAME@ID as "not an app
#    slot" after its drain, leaving it DOWN
# (not bumped for host-check's dry_run steps and rendered plan: the controller shows an
# older host's summary line instead, so it requires neither; nor for its environment_arg:
# the controller names an older host's environment as the inventory does)
"""What the controller and a host's `runbook fleet` commands agree on; bumped when one side
starts to require something of the other (a JSON field, an option), not for a field the
controller can do without. A host answering another protocol is refused in pre-flight."""
