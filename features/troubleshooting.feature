Feature: Troubleshoot a rollback that does not go through
  When a rollback stops, it says why in one line, gives the fix and exits with a code that
  tells you what happened (1 failed safely, 3 locked, 4 precondition not met); nothing is
  left half done and traffic stays on a slot that answers. Each case below is caused on
  purpose on a drill, so you see the diagnosis you will get, then the fix that works.
  Start with `runbook status`: it compares the state file with what really runs.

  @mutating @fault
  Scenario: No previous deployment found
    Given no previous deployment is recorded
    When I roll back
    Then the rollback is refused with exit code 4 saying "No previous deployment found"
    And the advice is to redeploy a known-good version
    And nothing has changed
    When I redeploy the known-good version "v3"
    Then users are served version "v3"
    And users saw no failed request during the redeploy

  @mutating @fault
  Scenario: Health checks fail on the previous deployment
    Given a previous deployment exists whose build is broken
    When I roll back
    Then the rollback fails safely with exit code 1
    And the failing health check is named
    And users are still served by the healthy slot
    And users saw no failed request during the rollback
    And nothing has changed
    When I redeploy the known-good version "v3"
    Then users are served version "v3"
    And the slot taking traffic is healthy
    And users saw no failed request during the redeploy

  @mutating @fault
  Scenario: Health checks fail because the previous deployment cannot reach the database
    Its code is not the cause: the rollback stops safely, names the database check that fails
    and says how to check the slot's logs and its connection to the database.
    Given a previous deployment exists that cannot reach the database
    When I roll back
    Then the rollback fails safely with exit code 1
    And the rollback says the previous deployment cannot reach the database, and how to check it
    And the previous deployment's own health check said the database was unreachable, while the database answered
    And users are still served by the healthy slot
    And users saw no failed request during the rollback
    And nothing has changed

  @mutating @fault
  Scenario: Traffic does not switch because Caddy is not running
    Given a previous deployment exists
    And Caddy is not running
    When I confirm the deployment state
    Then the status says Caddy is not answering
    When I roll back
    Then the rollback is refused with exit code 4 saying "Caddy is not running"
    And the advice says how to start Caddy
    And nothing has changed
    When I start Caddy again
    And I roll back
    Then users are served the previous version from the other slot

  @mutating @fault
  Scenario: Traffic does not switch because the Caddyfile targets the wrong port
    Given a deployment is live
    And the Caddyfile sends traffic to a port where no slot listens
    When I confirm the deployment state
    Then the status names the wrong port
    And users get an error from the proxy
    When I switch traffic by hand to the slot the state file names as active
    Then users are served by that slot
    When I confirm the deployment state
    Then what really runs matches the state file

  @mutating @fault @database
  Scenario: Schema mismatch between the previous version and the database
    Given migrations ran after the previous deployment
    When I roll back
    Then the rollback is refused with exit code 4 saying "migrations ran after the target deployment"
    And nothing has changed
    When I confirm the deployment state
    Then the status shows the database schema ahead of the previous deployment's
    When I roll back the migrations to the schema the previous deployment ran with
    And I roll back
    Then users are served the previous version from the other slot
    And the slot taking traffic is healthy
    And users saw no failed request during the rollback

  @mutating @fault
  Scenario: The old slot stays up for a load balancer's HTTP/2 connections
    A Caddy that also takes cleartext HTTP/2 (h2c) never moves the h2c connections it holds to
    the new config: their requests keep reaching the old slot after the switch. The rollback
    waits for them (`[rollback] drain_timeout_seconds`, 10 s unless set), then leaves the old
    slot running for them instead of answering them 502, and says how to finish.
    Given a previous deployment exists
    And Caddy also takes cleartext HTTP/2 from a load balancer that keeps its connections open
    And the old slot's stop waits at most 1 second for Caddy's previous config
    And the load balancer holds a connection opened before the rollback
    When I roll back
    Then users are served the previous version from the other slot
    And the load balancer's connection is still answered by the old slot, not cut
    And the old slot was left running, and the rollback said how to stop it
    And users saw no failed request during the rollback
    And the status names the old slot as left running for those connections
    When the load balancer closes its connection and I stop the old slot as advised
    Then the status no longer names it
