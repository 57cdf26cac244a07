# Developer entry points. `make test` works on a fresh machine: it installs, lints, then runs the tests.
PYTHON ?= python3

.PHONY: install test lint

install:
	PYTHON=$(PYTHON) bash scripts/install.sh

# Lint (ruff: pycodestyle, pyflakes, isort, bugbear, pyupgrade; config in pyproject.toml).
lint:
	$(PYTHON) -m ruff check src tests bench

test: install
	$(MAKE) lint PYTHON=$(PYTHON)
	$(PYTHON) -m pytest -q
