# Two commands on a fresh machine:  make demo  |  make test
VENV ?= .venv
PY := $(VENV)/bin/python
FMNIST := /usr/share/datasets/fashion-mnist
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: install system-deps demo test test-fast lint format clean

# The venv is (re)installed when pyproject.toml changes. torch is pinned first so that the CPU wheel is used where
# one is provided locally; 2.13.0 satisfies the range in pyproject.toml, so pip keeps it.
$(VENV)/.installed: pyproject.toml
	[ -x $(PY) ] || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

install: $(VENV)/.installed

# Fashion-MNIST comes from Debian's dataset-fashion-mnist (idx files under /usr/share/datasets/fashion-mnist).
system-deps:
	@[ -d $(FMNIST) ] || { $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq dataset-fashion-mnist; }

demo: install
	$(VENV)/bin/restoration demo

test: install system-deps
	$(VENV)/bin/ruff check restoration tests jobs
	$(VENV)/bin/pytest -q

test-fast: install
	$(VENV)/bin/pytest -q -m "not slow"

lint: install
	$(VENV)/bin/ruff check restoration tests jobs
	$(VENV)/bin/ruff format --check restoration tests jobs

format: install
	$(VENV)/bin/ruff check --fix restoration tests jobs
	$(VENV)/bin/ruff format restoration tests jobs

clean:
	rm -rf $(VENV) demo-output .pytest_cache
