"""pytest plugin that loads every step module and the environment fixtures."""

pytest_plugins = [
    "steps.fixtures",  # drill_stack (session) and environment (session)
    "steps.world",  # the per-scenario world; resets the drill before each scenario
    "steps.givens",  # arrange on a drill, check on a real host
    "steps.actions",  # what the on-call does; --dry-run prints mutating ones as plans
    "steps.outcomes",  # what the on-call checks afterwards
    "steps.h2c",  # a load balancer holding h2c connections through the switch
    "steps.fleet",  # features/fleet.feature: the drill fleet (session, started lazily)
    "steps.report_plugin",  # --report DIR: the drill report (HTML, JSON, junit, cucumber)
]
