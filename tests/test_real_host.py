"""A real host works: the rollback feature run as typed, `--env <file>`, against a host.

The "host" is a drill stack started OUTSIDE pytest's fixtures, as a machine would be, with a
previous deployment arranged as a drill scene (DrillStack.arrange, proved from what runs).
Its environment file is written WITHOUT drill permission, so the features treat it as a real
host: Givens only check, fault scenarios are skipped with their reason, `pytest features/`
and `pytest features/recovery.feature` change nothing (every mutating scenario is skipped,
saying how to select it), `pytest features/rollback.feature` performs the rollback, and an
explicitly selected scenario (-k) runs.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from runbook import environment as envmod
from runbook import state as states
from runbook.drill import http as drill_http
from runbook.drill import scenes
from runbook.drill.stack import DrillStack
from runbook.drill.versions import VERSIONS

pytestmark = pytest.mark.docker
REPO_ROOT = Path(__file__).resolve().parents[1]
V2, V3 = VERSIONS["v2"], VERSIONS["v3"]


def through_proxy(proxy_url: str) -> tuple[str | None, str]:
    response = drill_http.get(f"{proxy_url}/version", headers={"Connection": "close"}, timeout=5)
    return response.headers.get("X-Togather-Slot"), response.json()["version"]


@pytest.mark.long
def test_rollback_feature_runs_on_a_real_host(tmp_path: Path) -> None:
    stack = DrillStack().start()
    try:
        env = stack.env
        stack.arrange(scenes.PREVIOUS)  # v3 live on blue, v2 (same schema) the previous one
        assert through_proxy(env.caddy.proxy_url) == ("blue", V3.tag)
        host = env.with_(allows_faults=False, label=f"host {stack.run_id}")
        env_file = tmp_path / "host.toml"
        env_file.write_text(envmod.to_toml(host))
        assert "allows_faults" not in env_file.read_text()

        def run_pytest(*args: str) -> tuple[int, str]:
            proc = subprocess.run(
                [sys.executable, "-m", "pytest", *args, f"--env={env_file}",
                 "-p", "no:cacheprovider", "-rs"],
                cwd=REPO_ROOT, capture_output=True, text=True, timeout=600, env=child_env,
                check=False)
            return proc.returncode, proc.stdout + proc.stderr

        def run_features(*args: str) -> tuple[str, str]:
            code, output = run_pytest(*args)
            assert code == 0, output
            return output, output.strip().splitlines()[-1]

        def mutating_skips(output: str) -> list[str]:
            return re.findall(r"SKIPPED \[1\] (features/\w+\.feature):\d+: changes the host: "
                              r"on a real host a mutating scenario runs unselected only", output)

        def load_skips(output: str, feature: str) -> list[str]:
            return re.findall(rf"SKIPPED \[1\] features/{feature}.feature:\d+: not provable on "
                              r"a real host: it needs the drill's simulated users", output)

        child_env = {k: v for k, v in os.environ.items() if k != "RUNBOOK_CONFIG"}
        state_before = env.state_file.read_bytes()

        # a whole folder: read-only scenarios run, no mutating one does
        output, summary = run_features("features/")
        assert sorted(mutating_skips(output)) == ["features/recovery.feature",
                                                  "features/recovery.feature",
                                                  "features/rollback.feature"], output
        # every fleet scenario injects faults into a drill fleet: never run on a real host
        fleet = len(re.findall(r"^\s*Scenario:", (REPO_ROOT / "features/fleet.feature").read_text(),
                               re.M))
        fleet_skips = re.findall(r"SKIPPED \[1\] features/fleet\.feature:\d+: [^\n]*drill only",
                                 output)
        assert fleet >= 1 and len(fleet_skips) == fleet, output
        # and every single-host @fault scenario (tags on the line above its Scenario:)
        faults = sum(len(re.findall(r"^\s*@[^\n]*@fault\b[^\n]*\n\s*Scenario:",
                                    path.read_text(), re.M))
                     for path in (REPO_ROOT / "features").glob("*.feature")
                     if path.name != "fleet.feature")
        assert re.search(r"\b4 passed\b", summary) \
            and re.search(rf"\b{3 + faults + fleet} skipped\b", summary), (faults, summary)
        assert through_proxy(env.caddy.proxy_url) == ("blue", V3.tag)
        assert env.state_file.read_bytes() == state_before
        # naming recovery.feature: neither the manual switch nor the redeploy runs
        output, summary = run_features("features/recovery.feature")
        assert mutating_skips(output) == ["features/recovery.feature"] * 2, output
        assert "injects faults: drill only" in output, output
        assert re.search(r"\b1 passed\b", summary) and re.search(r"\b3 skipped\b", summary), \
            summary
        assert through_proxy(env.caddy.proxy_url) == ("blue", V3.tag)
        assert env.state_file.read_bytes() == state_before

        # naming rollback.feature performs the rollback, as documented, in the outage it is
        # for: the live slot is down (users get 502). Found by review: with the first failure
        # ending a real host's run, a Confirm that demanded "no problems" stopped it here
        stack.docker("stop", env.slot("blue").container)
        assert drill_http.get(f"{env.caddy.proxy_url}/version", timeout=5).status_code == 502
        output, summary = run_features("features/rollback.feature")

        # the rollback really happened: users get v2 from green, and the state file says so
        assert through_proxy(env.caddy.proxy_url) == ("green", V2.tag)
        st = states.read_state(env.state_file)
        assert st.current is not None and st.previous is not None
        assert (st.current.version, st.current.active_slot) == (V2.tag, "green")
        assert (st.previous.version, st.previous.status) == (V3.tag, "rolled_back")
        # the fault scenarios never ran there, and the output says why
        skipped = re.findall(r"SKIPPED \[1\] features/rollback.feature:\d+: injects faults: "
                             r"drill only", output)
        assert len(skipped) == 2, output
        # its last step needs the drill's simulated users: skipped after every other one passed
        assert len(load_skips(output, "rollback")) == 1, output
        assert re.search(r"\b3 passed\b", summary) and re.search(r"\b3 skipped\b", summary), \
            summary

        # the header names the environment file the run acts on
        assert f"runbook: --env {env_file}: {env_file}" in output, output

        # found by review: typed again (its last step was reported skipped), it rolled
        # forward to the release just left. The preview, now before the rollback, is refused
        # (the previous deployment is the one rolled back from), and on a real host the
        # first failure ends the run: the rollback is never tried, nothing changes
        state_after = env.state_file.read_bytes()
        code, output = run_pytest("features/rollback.feature")
        assert code == 1, output
        assert "is the one this host was rolled back from" in output, output
        assert re.search(r"\b1 failed\b", output) and "stopping after 1 failures" in output, \
            output
        assert through_proxy(env.caddy.proxy_url) == ("green", V2.tag)
        assert env.state_file.read_bytes() == state_after

        # found by review: any -k or -m counted as selecting, so a negative filter ran every
        # mutating scenario (the manual switch, then the rollback); one run performs at most
        # one, and the integration tests never run against a host
        for args, said in ((["features/", "-m", "not fleet"],
                            "scenarios that change the host are selected"),
                           ([], "runs the runbook's features only"),
                           (["features/rollback.feature", "-n", "2"],
                            "-n (pytest-xdist) is for the drill")):
            code, output = run_pytest(*args)
            assert code == 2, output
            assert said in output, output
        assert through_proxy(env.caddy.proxy_url) == ("green", V2.tag)
        assert env.state_file.read_bytes() == state_after

        # an explicitly selected mutating scenario runs: the manual switch, back to blue
        output, summary = run_features("features/recovery.feature", "-k", "hand")
        assert len(load_skips(output, "recovery")) == 1, output  # the switch itself ran
        assert re.search(r"\b1 skipped\b", summary) and "passed" not in summary, summary
        assert through_proxy(env.caddy.proxy_url) == ("blue", V3.tag)  # switched by hand

        # a plan that warns is not run on a host (nobody is at a prompt to answer it): here
        # Caddy runs a header the Caddyfile does not have (loaded through the admin API), so
        # the plan warns that the switch would drop it. v2, older, is a real rollback now.
        text = env.caddy.caddyfile.read_text()
        drifted = text.replace(f'header X-Drill-Run "{stack.run_id}"',
                               'header X-Drill-Run "loaded-by-hand"')
        assert drifted != text
        drill_http.post(f"{env.caddy.admin_url}/load", content=drifted,
                        headers={"Content-Type": "text/caddyfile"}, timeout=10
                        ).raise_for_status()
        state_before = env.state_file.read_bytes()
        code, output = run_pytest("features/rollback.feature")
        assert code == 1, output
        assert "not run, its plan warns" in output and "differs from" in output, output
        assert f"`runbook rollback {env_file}`, whose prompt asks" in output, output
        assert through_proxy(env.caddy.proxy_url) == ("blue", V3.tag)
        assert env.state_file.read_bytes() == state_before
    finally:
        stack.stop()
