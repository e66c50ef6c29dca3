# Fresh Linux machine: `make demo` or `make test`. Everything installs into .venv with pip
# (pip, not uv, so locally cached torch wheels are used).
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
FMNIST := /usr/share/datasets/fashion-mnist
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: venv data test test-fast demo bench clean

venv: $(STAMP)
$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	@touch $@

# Fashion-MNIST (real images) from Debian's package; used by the tests and the demo.
data: $(FMNIST)/train-images-idx3-ubyte.gz
$(FMNIST)/train-images-idx3-ubyte.gz:
	$(SUDO) apt-get update -qq
	$(SUDO) apt-get install -y -qq dataset-fashion-mnist

test: venv data
	$(PY) -m pytest

test-fast: venv data
	$(PY) -m pytest -m "not slow"

demo: venv data
	$(VENV)/bin/pipeline shard $(FMNIST) shards/fashion_mnist
	$(VENV)/bin/pipeline verify shards/fashion_mnist
	$(VENV)/bin/pipeline train --config fashion_mnist

bench: venv data
	$(VENV)/bin/pipeline bench all

clean:
	rm -rf $(VENV) .pytest_cache
