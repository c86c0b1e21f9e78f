# One command per task. `make run` and `make test` do all the set-up on a fresh machine:
# infra/setup.sh installs the system packages and a project virtualenv (.venv) with exactly the
# versions of requirements/dev.lock; every target below runs in that virtualenv.
VENV ?= $(CURDIR)/.venv
PYTHON := $(VENV)/bin/python
PYTEST_ARGS ?=
export PATH := $(VENV)/bin:$(PATH)
export FEED_VENV := $(VENV)

.PHONY: setup run test test-unit bench bench-quick lint lock clean

setup:
	bash infra/setup.sh

run: setup
	$(PYTHON) -m feed.cli dev

test: setup
	$(PYTHON) -m pytest -q $(PYTEST_ARGS)

test-unit: setup
	$(PYTHON) -m pytest -q tests/unit

bench: setup
	$(PYTHON) -m feed.cli bench all

bench-quick: setup
	$(PYTHON) -m feed.cli bench all --quick

# ruff (lint and format) over everything; mypy --strict (pyproject.toml) over the product.
LINT_PATHS := feed fanout gateway schemas infra bench tests
lint: setup
	$(PYTHON) -m ruff check $(LINT_PATHS)
	$(PYTHON) -m ruff format --check $(LINT_PATHS)
	$(PYTHON) -m mypy feed fanout gateway schemas

# Re-resolve pyproject.toml's dependencies into requirements/*.lock (then commit both).
lock:
	bash infra/lock.sh

clean:
	rm -rf .cache/stack build dist *.egg-info
