# One command per task. `make run` and `make test` do all the set-up on a fresh machine.
PYTHON ?= python3
PYTEST_ARGS ?=

.PHONY: setup run test test-unit bench bench-quick lint clean

setup:
	bash infra/setup.sh

run: setup
	feed dev

test: setup
	$(PYTHON) -m pytest -q $(PYTEST_ARGS)

test-unit:
	$(PYTHON) -m pytest -q tests/unit

bench: setup
	feed bench all

bench-quick: setup
	feed bench all --quick

lint:
	$(PYTHON) -m ruff check feed fanout gateway schemas infra tests
	$(PYTHON) -m mypy feed fanout gateway schemas

clean:
	rm -rf .cache/stack build dist *.egg-info
