# The README's two commands: `make run` trains the default experiment, `make test` runs the whole suite.
# Both create .venv and install regbench (editable) with everything it needs on first use.
VENV   ?= .venv
PYTHON ?= python3
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: install run test test-fast bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(VENV)/bin/regbench $(ARGS)

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

bench: $(STAMP)
	$(PY) scripts/bench_loop.py

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache

# TensorBoard from the venv (it is not on PATH unless the venv is activated: `. .venv/bin/activate`).
# make tb                      every run below outputs/
# make tb DIR=outputs/runs/... one run or sweep; TB_ARGS="--port 6007" passes more options
.PHONY: tb
DIR ?= outputs
tb: $(STAMP)
	$(VENV)/bin/tensorboard --logdir '$(DIR)' $(TB_ARGS)
