# The README's two commands: `make run` trains the default experiment, `make test` runs the whole suite.
# Both create .venv and install regbench (editable) with everything it needs on first use.
VENV   ?= .venv
PYTHON ?= python3
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: install run test test-fast test-floor bench clean slurm-packages

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(VENV)/bin/regbench $(ARGS)

# The suite on every core (pytest-xdist), each test file on one worker (module fixtures and the SLURM cluster once).
XDIST := -n auto --dist loadfile

test: $(STAMP) slurm-packages
	$(PY) -m pytest $(XDIST) $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(PY) -m pytest $(XDIST) -m "not slow" $(PYTEST_ARGS)

# The floor lane (CI runs it after `make test`): the fast tests of the speed wing, checkpoints, TensorBoard,
# launchers and config composition on Python 3.10 with the lowest versions pyproject.toml allows, in a venv cached
# under ~/.cache/regbench/floor (scripts/floor_lane.sh says how).
test-floor: $(STAMP)
	bash scripts/floor_lane.sh $(XDIST) $(PYTEST_ARGS)

bench: $(STAMP)
	$(PY) scripts/bench_loop.py

# tests/test_slurm.py starts a throwaway single-node SLURM cluster from Debian's packages: installed here with
# apt-get when they are missing and apt-get can run (as root); otherwise those tests skip and say why.
SLURM_PACKAGES := slurmctld slurmd slurm-client munge
SLURM_BINARIES := munged slurmctld slurmd sbatch srun squeue scontrol scancel sinfo
slurm-packages:
	@missing=; for b in $(SLURM_BINARIES); do PATH="$$PATH:/usr/sbin:/sbin" command -v $$b >/dev/null 2>&1 || missing="$$missing $$b"; done; \
	if [ -z "$$missing" ]; then exit 0; fi; \
	if command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	  echo "installing SLURM for the SLURM tests (missing:$$missing): apt-get install $(SLURM_PACKAGES)"; \
	  (apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $(SLURM_PACKAGES)) >/dev/null \
	    || echo "make: could not install $(SLURM_PACKAGES); the SLURM tests will be skipped"; \
	else \
	  echo "make: SLURM is not installed (missing:$$missing) and apt-get cannot run here (needs root); the SLURM tests will be skipped"; \
	fi

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache

# TensorBoard from the venv (it is not on PATH unless the venv is activated: `. .venv/bin/activate`).
# make tb                      every run below outputs/
# make tb DIR=outputs/runs/... one run or sweep; TB_ARGS="--port 6007" passes more options
.PHONY: tb
DIR ?= outputs
tb: $(STAMP)
	$(VENV)/bin/tensorboard --logdir '$(DIR)' $(TB_ARGS)
