Feature: Roll back a deployment
  Use this when a deployment fails or its health checks stay unhealthy. A rollback puts the
  previous deployment back in front of users: it gets the previous version running in the
  standby slot, waits until that slot is healthy, points Caddy at it, proves through Caddy
  that users reach it, records the rollback in the deployment state and stops (but keeps)
  the slot that was live. Confirm the state first; preview with --dry-run when unsure; use
  --force only when you know why the checks refuse. A rollback never touches the database
  schema (restoring a snapshot is a separate, explicit choice), the environment file, the
  database server or anything else Caddy serves.

  Scenario: Confirm the deployment state before rolling back
    Given a previous deployment exists
    When I confirm the deployment state
    Then the state file names the live deployment, its slot and its image
    And the state file says whether a previous deployment is recorded to roll back to
    And what really runs matches the state file

  Scenario: Preview the rollback with a dry run
    Given a previous deployment exists
    When I preview the rollback
    Then the plan shows every value it would use
    And the plan shows the exact Caddyfile change
    And nothing has changed

  @mutating
  Scenario: Run the rollback, then check what it changed and what it did not
    Given a previous deployment exists
    When I roll back
    Then users are served the previous version from the other slot
    And the slot taking traffic changed and runs the previous version's image
    And the slot taking traffic is healthy
    And the deployment state records the rollback
    And the slot that was live is stopped but kept
    But the database schema version is the same as before
    And the environment file is byte for byte the same
    And everything in the Caddyfile outside the managed block is byte for byte the same
    And the shared database kept running without a restart
    And the other sites on this host still answer as before
    And users saw no failed request during the rollback

  @mutating @fault
  Scenario: Force a rollback past the health gate and the schema guard, never past a lock
    Given migrations ran after the previous deployment
    When I roll back
    Then the rollback is refused with exit code 4 saying "migrations ran after the target deployment"
    When another on-call holds the deploy lock
    And I force the rollback
    Then the rollback is refused with exit code 3 saying "deploy lock"
    And nothing has changed
    When the other on-call releases the deploy lock
    And I force the rollback
    Then users are served the previous version from the other slot
    And the rollback says it skipped the health gate and the schema guard
    And the health check of the slot taking traffic names the schema mismatch
    And users saw no failed request during the rollback

  Scenario: Verify the health of both slots
    Given a deployment is live
    When I check the health of the blue slot as JSON
    Then the JSON report names the slot, its status, its version and every check
    When I check the health of the green slot as a table
    Then the table has a row for the slot with its status, its version and its checks
    When I ask each slot's own port for its health
    Then every running slot answers for itself on its own port
    And the slot taking traffic is healthy

  @mutating @fault @database
  Scenario: Restore a snapshot when migrations ran after the target deployment
    Given customer data was recorded before the migration
    And migrations ran after the previous deployment
    And orders were taken after the migration
    When I roll back
    Then the rollback is refused with exit code 4 saying "migrations ran after the target deployment"
    And the refusal names the snapshot to restore and the data that would be lost
    When I roll back restoring that snapshot
    Then users are served the previous version from the other slot
    And the database is back at the schema the previous version ran with
    And the data is what the snapshot held, as announced
