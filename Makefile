# Two commands do all set-up on a fresh machine: `make drill` and `make test`.
# Every step is idempotent and quick when already done.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST := $(VENV)/bin/pytest
export TESTCONTAINERS_RYUK_DISABLED := true
# Byte-code caches on (__pycache__ is ignored by git), even where the machine's environment
# turns them off: every `runbook` process the tests start would otherwise compile the
# package again (~0.15 s a start on 2 cores).
unexport PYTHONDONTWRITEBYTECODE

.PHONY: setup venv docker sshd images chromium drill test shapes shapes-run shapes-report lint bench clean-drills help

help:
	@echo "make drill   run every runbook feature against an ephemeral blue/green stack;"
	@echo "             the drill report goes to reports/drill/report.html"
	@echo "make test    the whole suite (lint, unit, integration, features)"
	@echo "make images  build the drill images locally (no registry needed)"
	@echo "make bench   run the benchmarks in bench/ and print their figures"

$(VENV)/.installed: pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	@$(PY) -m pip install -q --disable-pip-version-check -e '.[dev]'
	@touch $@

venv: $(VENV)/.installed

docker:
	@scripts/ensure-docker.sh

sshd:
	@scripts/ensure-sshd.sh

images: venv docker
	@$(PY) -m runbook.drill.images build

setup: venv docker sshd images

lint: venv
	@$(VENV)/bin/ruff check runbook steps tests conftest.py bench
	@$(VENV)/bin/mypy --strict runbook --exclude runbook/drill/app
	@$(VENV)/bin/mypy runbook/drill/app

# pytest-xdist: WORKERS processes, each with its own drill stack (its own run id, ports and
# temp dir); the drill report is merged into one. The drill: 2 on a 2-core machine (its
# scenarios keep both cores busy; a third stack only queued: bench/FIGURES-HISTORY.md). The
# whole suite: 4, whose tests wait more on Docker, Caddy and the apps (2 workers left the cores a
# third idle; 4 cut the main run from 9 min 35 s to 7 min 42 s, bench/FIGURES-HISTORY.md run 21).
WORKERS ?= 2
XDIST := -n $(WORKERS) --dist loadgroup
TEST_WORKERS ?= 4

drill: setup
	$(PYTEST) features/ $(XDIST) --report reports/drill

chromium:
	@scripts/ensure-chromium.sh

# The drill host shapes (README, "Drill host shapes"): everything against the default shape,
# then SHAPE_TESTS (below) against each group of traits below (together they cover the
# six; h2c's own proofs are tests/test_h2c.py); tests/test_shapes.py, in the first run, has the
# targeted checks of those five at once). On a docker-run host `runbook deploy` has no compose and refuses (exit 4,
# nothing changed: test_rollback.py proves it there), so the three scenarios that end with
# "I redeploy the known-good version" (`runbook deploy`) are deselected on docker-run shapes;
# their refusals are proved there by test_rollback.py. The kill matrix runs its sample here
# (RUNBOOK_KILL_MATRIX=full: every cell, as the nightly drill does). The fleet scenarios run
# once, in the first run: the drill fleet has its own shape (sshd per host) and ignores --shape.
SHAPES ?= container-caddy,docker-network-db,minimal-health,h2c container-caddy,caddy-reload,docker-run
# What runs per shape group: in make test a representative sample (the rollback feature and
# tests/test_rollback.py: every rollback path, refusal and proof on that host's shape); the
# nightly drill sets SHAPE_TESTS="features/ tests/test_rollback.py tests/test_disk_full.py"
# (every feature, and the full-disk cells, per shape).
SHAPE_TESTS ?= features/rollback.feature tests/test_rollback.py
# ... less the tests marked any_shape (they read nothing a shape changes: CLI output, the lock,
# Docker's own refusals), run on the default shape only; nightly: SHAPE_MARKS="not fleet".
SHAPE_MARKS ?= not fleet and not any_shape
# ... and each group runs its share of those tests under tests/ (conftest.py --shape-share:
# every 2nd, one group from the first, the other from the second; the features whole), so
# each runs once on a non-default shape; the nightly drill sets SHAPE_SHARE= (every test on
# every group).
SHAPE_SHARE ?= yes
NEEDS_COMPOSE_DEPLOY := \
  --deselect features/troubleshooting.feature::test_no_previous_deployment_found \
  --deselect features/troubleshooting.feature::test_health_checks_fail_on_the_previous_deployment \
  --deselect features/recovery.feature::test_redeploy_a_knowngood_version_when_the_service_is_down_and_rollback_cannot_help

# The shape groups run beside the main run (they fill the cores its workers leave idle, most
# of all at its end, when the last worker finishes alone); their output is printed after it.
test: setup lint chromium
	@rm -rf reports/shapes; $(MAKE) --no-print-directory shapes-run & shapes=$$!; \
	$(PYTEST) -n $(TEST_WORKERS) --dist loadgroup --durations=20 --report reports/drill; status=$$?; \
	wait $$shapes; $(MAKE) --no-print-directory shapes-report || status=1; exit $$status

# The shape groups run side by side, one pytest (one drill stack) each: two stacks instead of
# a worker pair's four, and the cores are shared either way. Each group's output is printed
# when both have finished; the target fails if either did.
shapes: setup
	@rm -rf reports/shapes; $(MAKE) --no-print-directory shapes-run
	@$(MAKE) --no-print-directory shapes-report

# A job a non-interactive shell starts with `&` ignores SIGINT, so a Ctrl-C of `make test`
# stopped the main run and left the shape groups running to their end: each pytest gets
# SIGINT's default back (coreutils env >= 8.31; without it, as before).
DEFAULT_INT := $(shell env --default-signal=INT true 2>/dev/null && echo env --default-signal=INT)

shapes-run:
	@mkdir -p reports/shapes; groups=$$(echo $(SHAPES) | wc -w); k=0; for shape in $(SHAPES); do \
	  k=$$((k + 1)); \
	  case $$shape in *docker-run*) extra="$(NEEDS_COMPOSE_DEPLOY)";; *) extra="";; esac; \
	  [ -z "$(SHAPE_SHARE)" ] || extra="$$extra --shape-share $$k/$$groups"; \
	  ( $(DEFAULT_INT) $(PYTEST) $(SHAPE_TESTS) -q -p no:cacheprovider -m "$(SHAPE_MARKS)" --shape $$shape $$extra \
	      > reports/shapes/$$shape.log 2>&1; echo $$? > reports/shapes/$$shape.rc ) & \
	done; wait

shapes-report:
	@status=0; for shape in $(SHAPES); do \
	  echo "== $(SHAPE_TESTS) --shape $$shape"; cat reports/shapes/$$shape.log; \
	  [ "$$(cat reports/shapes/$$shape.rc 2>/dev/null)" = 0 ] || status=1; done; exit $$status

bench: setup
	@for b in bench/bench_*.py; do $(PY) $$b; done

clean-drills: venv docker
	@$(PY) -m runbook.drill.cleanup
