# Developer entry points. `make test` works on a fresh machine: it installs, then runs the test suite.
PYTHON ?= python3

.PHONY: install test lint

install:
	PYTHON=$(PYTHON) bash scripts/install.sh

test: install
	$(PYTHON) -m pytest -q

# Lint (ruff; config in pyproject.toml). Not yet part of `make test`.
lint:
	$(PYTHON) -m ruff check src tests bench
