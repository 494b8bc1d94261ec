# Two commands do all set-up on a fresh machine: `make drill` and `make test`.
# Every step is idempotent and quick when already done.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST := $(VENV)/bin/pytest
export TESTCONTAINERS_RYUK_DISABLED := true
export PYTHONDONTWRITEBYTECODE := 1

.PHONY: setup venv docker sshd images chromium drill test lint bench clean-drills help

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

drill: setup
	$(PYTEST) features/ --report reports/drill

chromium:
	@scripts/ensure-chromium.sh

# The drill host shapes (README, "Drill host shapes"): everything against the default shape,
# then the rollback feature against each other shape (tests/test_shapes.py, in the first run,
# has the targeted checks of every trait).
SHAPES ?= container-caddy,docker-network-db,minimal-health container-caddy,caddy-reload,docker-run

test: setup lint chromium
	$(PYTEST) --report reports/drill
	@for shape in $(SHAPES); do echo "== rollback.feature --shape $$shape"; \
	  $(PYTEST) features/rollback.feature -q -p no:cacheprovider --shape $$shape || exit 1; done

bench: setup
	@for b in bench/bench_*.py; do $(PY) $$b; done

clean-drills: venv docker
	@$(PY) -m runbook.drill.cleanup
