"""Fixtures shared by the tests in this folder; they live, with the other shared helpers, in
tests/drill_checks.py."""

from tests.drill_checks import baseline_stack, scene_stack, shared_dir, stack

__all__ = ["baseline_stack", "scene_stack", "shared_dir", "stack"]
