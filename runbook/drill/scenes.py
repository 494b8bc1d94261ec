"""Drill scenes: the situations the features' Givens start from, as data.

A scene says what each slot's container runs (the version's image, running or stopped), the
deployments recorded (oldest first; the last one serves), and whether each deployment after
the first took its pre-deploy snapshot. `DrillStack.arrange` reaches a scene from whatever the
stack runs with the cheapest real operations (only what differs is changed) and then proves
it from what runs: Docker, Caddy's loaded config, the proxy's answer, Postgres.

The scenes are what the runbook's own deploys leave behind (e.g. PREVIOUS is v1, then v2,
then v3 deployed): arranging them directly spares each scenario two deploys and the reset
that undid them, while the rollbacks, deploys and switches the scenarios prove stay real.
"""

from __future__ import annotations

from dataclasses import dataclass

from runbook.drill.versions import VERSIONS, AppVersion
from runbook.environment import Slot


@dataclass(frozen=True)
class SlotScene:
    version: str  # a drill version's name (runbook/drill/versions.py)
    running: bool


@dataclass(frozen=True)
class Scene:
    name: str
    blue: SlotScene
    green: SlotScene
    history: tuple[tuple[str, Slot], ...]  # (version name, slot) deployed, oldest first
    snapshots: bool = False  # each deployment after the first took a pre-deploy snapshot

    def slot(self, slot: Slot) -> SlotScene:
        return self.blue if slot is Slot.BLUE else self.green

    def version(self, slot: Slot) -> AppVersion:
        return VERSIONS[self.slot(slot).version]

    @property
    def live(self) -> Slot:
        """The slot Caddy sends users to: the last deployment's."""
        return self.history[-1][1]

    @property
    def schema(self) -> int:
        """The database's schema: the highest any recorded deployment migrated to."""
        return max(VERSIONS[name].schema for name, _ in self.history)

    @property
    def database_key(self) -> tuple[object, ...]:
        """What the database holds in this scene: two scenes with the same key can share it
        (when Postgres proves nothing was written in between)."""
        if self.snapshots:  # the snapshots (and their deployment ids) belong to this scene
            return (self.name,)
        return ("schema", self.schema)


def baseline(version: str = "v1") -> Scene:
    """One deployment recorded: `version` on blue, serving; green runs the same version."""
    return Scene(f"baseline {version}", SlotScene(version, True), SlotScene(version, True),
                 ((version, Slot.BLUE),))


BASELINE = baseline()
# v1, v2, v3 deployed: v3 serves from blue; v2 (same schema 2) is the previous, stopped on green
PREVIOUS = Scene("previous", SlotScene("v3", True), SlotScene("v2", False),
                 (("v1", Slot.BLUE), ("v2", Slot.GREEN), ("v3", Slot.BLUE)))
# PREVIOUS as a deploy with stop_old_slot = false leaves it: v2 still running on green
PREVIOUS_RUNNING = Scene("previous, standby running", SlotScene("v3", True),
                         SlotScene("v2", True), PREVIOUS.history)
# v1, then v2 deployed (its migration took the schema to 2, after a pre-deploy snapshot): v2
# serves from green, v1 is the previous, stopped on blue
MIGRATED = Scene("migrated", SlotScene("v1", False), SlotScene("v2", True),
                 (("v1", Slot.BLUE), ("v2", Slot.GREEN)), snapshots=True)
# v1, a broken build forced live on green, then v2 deployed over it on blue: the previous
# deployment is the broken build, its container stopped on green
BROKEN_PREVIOUS = Scene("broken previous", SlotScene("v2", True), SlotScene("unhealthy", False),
                        (("v1", Slot.BLUE), ("unhealthy", Slot.GREEN), ("v2", Slot.BLUE)))
# v1, then a broken build forced live on green after its migration: its /health answers 503
# (users' pages still answer; "the live slot has crashed" makes it an outage)
BROKEN_LIVE = Scene("broken live", SlotScene("v1", False), SlotScene("unhealthy", True),
                    (("v1", Slot.BLUE), ("unhealthy", Slot.GREEN)), snapshots=True)

SCENES = {scene.name: scene for scene in (BASELINE, PREVIOUS, PREVIOUS_RUNNING, MIGRATED,
                                          BROKEN_PREVIOUS, BROKEN_LIVE)}
