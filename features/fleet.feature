Feature: Roll back several hosts at once
  When Togather runs on several hosts behind a load balancer, sharing one database, roll them
  back from your own machine with `runbook fleet rollback INVENTORY`: every host is checked
  before any is touched, the canary group goes first, then the others in batches, and the
  rollout stops at the first host that fails. Each host runs its own `runbook rollback`, with
  its own lock and journal; the fleet adds a fleet lock, a fleet journal and the database rule.

  @fleet @fault
  Scenario: Roll back the fleet, canary first, then the others in batches
    Given every host of the fleet runs a new deployment
    When I roll back the fleet
    Then the fleet rollback succeeds
    And every host of the fleet serves the previous version
    And the canary host was rolled back before any other host started
    And the other hosts went one batch after another: one host, then the rest
    And the shared database was left as it was: no host restored a snapshot
    And the fleet lock is free

  @fleet @fault
  Scenario: A failing host stops the rollout; the resume command finishes the rest
    Given every host of the fleet runs a new deployment
    And the rollback of "host2" will be interrupted before its switch
    When I roll back the fleet
    Then the fleet rollback stops with exit code 1
    And "host1" is rolled back
    And "host2" failed but still serves the new version from its old slot
    And "host3" was not started and still serves the new version
    And the fleet rollback printed the command that resumes with "host2,host3"
    And the fleet lock is free
    When the fault is gone and I run the resume command
    Then the fleet rollback succeeds
    And every host of the fleet serves the previous version
    And the resumed run did not repeat the database step

  @fleet @fault
  Scenario: A resume never rolls a host back again: the hosts its run rolled back are skipped
    Given every host of the fleet runs a new deployment
    And the rollback of "host2" will be interrupted before its switch
    When I roll back the fleet
    Then the fleet rollback stops with exit code 1
    And "host1" is rolled back
    When the fault is gone and I resume that run without --limit
    Then every host of the fleet serves the previous version
    And the fleet rollback succeeds
    And the resumed run skipped "host1", saying it was rolled back by the first run

  @fleet @fault
  Scenario: A host that cannot be reached in pre-flight changes nothing
    Given every host of the fleet runs a new deployment
    And the inventory also names a host that does not answer
    When I roll back the fleet
    Then the fleet rollback is refused with exit code 4, one line per failing host naming "unreachable"
    And no host of the fleet changed
    And the fleet lock is free

  @fleet @fault @database
  Scenario: A fleet rollback that needs a snapshot restore is refused
    Given every host of the fleet runs a new deployment
    And migrations ran on the shared database after the new deployment
    When I roll back the fleet
    Then the fleet rollback is refused with exit code 4 naming "the maintenance path"
    And no host of the fleet changed
    And the fleet lock is free

  @fleet @fault @database
  Scenario: The maintenance path drains every host, restores the snapshot once, then rolls back canary first
    Given every host of the fleet runs a new deployment
    And migrations ran on the shared database after the new deployment
    When I preview the fleet rollback on the maintenance path
    Then the plan says THE SERVICE IS DOWN on all 3 hosts, and no host of the fleet changed
    When I roll back the fleet on the maintenance path
    Then the fleet rollback succeeds
    And every host of the fleet serves the previous version
    And the canary host was rolled back before any other host started
    And the snapshot was restored exactly once, on the fleet lock host, before any host rolled back
    And the fleet lock is free
