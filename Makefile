# Developer entry points. `make test` works on a fresh machine: it installs, then runs the test suite.
PYTHON ?= python3

.PHONY: install test

install:
	PYTHON=$(PYTHON) bash scripts/install.sh

test: install
	$(PYTHON) -m pytest -q
