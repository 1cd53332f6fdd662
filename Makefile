# The README's two commands. Each sets itself up on a fresh machine: a .venv with erase and its
# dependencies, and Fashion-MNIST from Debian when apt is available (torchvision's download otherwise).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.erase-installed
FMNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
# Torch from local wheels on the project's build machines; elsewhere pip resolves the floors in pyproject.toml.
TORCH_PIN ?= torch==2.14.1 torchvision==0.29.1

.PHONY: demo demo-classifier demo-attack test setup data lint clean

setup: $(STAMP) data

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_PIN) || $(PY) -m pip install -q torch torchvision
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

data:
	@if [ -f $(FMNIST) ]; then echo "Fashion-MNIST: $(FMNIST)"; \
	elif command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	  (apt-get install -y -qq dataset-fashion-mnist || (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist)) >/dev/null \
	  && echo "Fashion-MNIST installed from Debian"; \
	else echo "no apt: erase will download Fashion-MNIST with torchvision into ./data"; fi

demo: setup
	bash scripts/demo.sh

demo-classifier: setup
	bash scripts/demo_classifier.sh

demo-attack: setup
	bash scripts/demo_attack.sh

test: setup
	$(PY) -m ruff check erase tests scripts
	$(VENV)/bin/lint-imports
	OMP_NUM_THREADS=2 $(PY) -m pytest -q tests

lint: $(STAMP)
	$(PY) -m ruff check erase tests scripts
	$(VENV)/bin/lint-imports

clean:
	rm -rf runs .pytest_cache
