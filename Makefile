# Two commands do everything on a fresh machine:
#   make demo   set up, then train the built-in default (tiny model, sample data, 2 pipeline stages) and
#               answer one prompt before and after training
#   make test   set up, then run the test suite (starting a local Slurm cluster when the machine allows)
#   make test-slow   the family sweep: every model type transformers maps to a causal LM (docs/models.md)

PY ?= python3
VENV ?= .venv
PYTHON := $(VENV)/bin/python
TORCH ?= torch==2.13.0

.PHONY: demo test test-slow setup clean

setup: $(VENV)/.installed

$(VENV)/.installed: setup.py requirements.txt
	$(PY) -m venv $(VENV)
	$(PYTHON) -m pip install -q --upgrade pip
	$(PYTHON) -m pip install -q "$(TORCH)" -r requirements.txt -e .
	touch $@

demo: setup
	PYTHON=$(PYTHON) bash slurm/run.sh
	PYTHON=$(PYTHON) bash slurm/gen.sh --prompt "你是谁？" --compare_base true

test: setup
	$(PYTHON) -m pytest -q tests

test-slow: setup
	$(PYTHON) -m pytest -q -m slow tests

clean:
	rm -rf $(VENV) demo output
