"""pytest plugin that loads every step module and the environment fixtures."""

pytest_plugins = ["steps.fixtures"]
