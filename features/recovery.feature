Feature: Recover when a rollback is not enough
  If a rollback fails and the service is down, or you have to act by hand, there are two
  ways back: switch traffic to a slot you know is healthy, or redeploy a version you know
  is good. Never take the whole compose project down: that stops the shared database too.
  Afterwards, the deployment log and the state file tell you, and the infrastructure team,
  exactly what happened.

  @mutating
  Scenario: Switch traffic by hand to the slot you know is healthy
    Given a deployment is live
    When I switch traffic by hand to the standby slot
    Then users are served by that slot
    And the state file names that slot as active
    And the slot that was live keeps running, so the switch can be undone at once
    And users saw no failed request during the switch

  @mutating @fault
  Scenario: Redeploy a known-good version when the service is down and rollback cannot help
    Given a broken version went live after a migration
    And the live slot has crashed, so users get errors
    When I roll back
    Then the rollback is refused with exit code 4 saying "migrations ran after the target deployment"
    When I redeploy the known-good version "v3"
    Then users are served version "v3"
    And the slot taking traffic is healthy
    And the state file records "v3" as the current deployment with the schema it ran with
    And users were served without a failed request from the redeploy's switch on

  @mutating
  Scenario: The deployment log and the state file say what happened
    Given migrations ran after the previous deployment
    When I roll back
    Then the rollback is refused with exit code 4 saying "migrations ran after the target deployment"
    And the deployment log of this environment has one JSON object a line, each with a timestamp, a level, a run id and a message
    And the deployment log says what the rollback attempted, why it stopped and its exit code
    And the deployment log does not show the database password
    And the state file names the live deployment and the schema each deployment ran with
    And users saw no failed request during the rollback

  Scenario: Every command explains itself
    When I ask every command for its help
    Then every command has help that says what it is for
    And the help explains:
      | command     | topics                                                        |
      | runbook     | Exit codes, rollback, status, healthcheck, switch, snapshot   |
      | rollback    | --force, --dry-run, --restore-snapshot, --to                  |
      | status      | the state file next to what really runs                       |
      | healthcheck | --slot, --format, degraded counts as healthy                  |
      | switch      | --slot, a slot you know is healthy                            |
      | deploy      | --version, --force, --dry-run                                 |
      | snapshot    | list, restore, create                                         |
