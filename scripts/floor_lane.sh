#!/usr/bin/env bash
# The floor lane (issue 27): regbench's fast tests (everything but the slow end-to-end runs) on the oldest Python
# and the lowest versions pyproject.toml allows (uv's `--resolution lowest-direct`: every direct dependency at its
# floor, e.g. torch 2.10 / torchvision 0.25 / hydra-core 1.3.2 / numpy 1.24), so a declared floor is a tested one.
#
#   make test-floor                    (CI runs it after `make test`)
#   FLOOR_PYTHON=/path/to/python3.10 make test-floor
#
# The virtual environment is cached outside the clone, keyed on the dependency list, the Python version and this
# script (${XDG_CACHE_HOME:-~/.cache}/regbench/floor/<key>): a second run reuses it (uv's download cache makes a
# rebuild quick too). regbench itself is not installed there: the tests import the clone's src/ (PYTHONPATH).
set -euo pipefail
cd "$(dirname "$0")/.."

MAIN_PY=${MAIN_PY:-.venv/bin/python}   # the main lane's venv: reads pyproject.toml (tomllib) and carries uv

find_floor_python() {
    local want="3.10" p
    for p in "${FLOOR_PYTHON:-}" "$(command -v "python$want" || true)" \
             "$(command -v pyenv >/dev/null && pyenv root 2>/dev/null)/versions/$want"*/bin/python"$want" \
             "${PYENV_ROOT:-$HOME/.pyenv}/versions/$want"*/bin/python"$want"; do
        if [ -n "$p" ] && [ -x "$p" ] && "$p" -c "import sys; assert sys.version_info[:2] == (3, 10)" 2>/dev/null; then
            echo "$p"; return 0
        fi
    done
    return 1
}

if ! FLOOR_PY=$(find_floor_python); then
    echo "floor lane: no Python 3.10 found (set FLOOR_PYTHON=/path/to/python3.10, or install it with pyenv:" \
         "pyenv install 3.10); the floor lane needs one" >&2
    exit 1
fi
"$MAIN_PY" -m uv --version >/dev/null 2>&1 || "$MAIN_PY" -m pip install -q "uv>=0.5"

# The direct dependencies (with the dev extra), one per line, from pyproject.toml.
DEPS=$("$MAIN_PY" - <<'EOF'
import tomllib
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
print("\n".join(project["dependencies"] + project["optional-dependencies"]["dev"]))
EOF
)
KEY=$(printf '%s\n%s\n' "$DEPS" "$("$FLOOR_PY" -VV)" | cat - "$0" | sha256sum | cut -c1-16)
VENV="${XDG_CACHE_HOME:-$HOME/.cache}/regbench/floor/$KEY"
if [ ! -f "$VENV/.installed" ]; then
    echo "floor lane: building $VENV (Python $("$FLOOR_PY" -c 'import platform; print(platform.python_version())'), lowest direct dependencies)"
    rm -rf "$VENV"
    "$MAIN_PY" -m uv venv -q -p "$FLOOR_PY" "$VENV"
    printf '%s\n' "$DEPS" > "$VENV/requirements.in"
    "$MAIN_PY" -m uv pip install -q --python "$VENV/bin/python" --resolution lowest-direct -r "$VENV/requirements.in"
    touch "$VENV/.installed"
fi
"$VENV/bin/python" - <<'EOF'
import sys, torch, torchvision, hydra, omegaconf, numpy
print(f"floor lane: Python {sys.version.split()[0]}, torch {torch.__version__}, torchvision {torchvision.__version__}, "
      f"hydra-core {hydra.__version__}, omegaconf {omegaconf.__version__}, numpy {numpy.__version__}")
EOF

# The whole fast suite (`-m "not slow"`: everything but the subprocess end-to-end runs, which the main lane has):
# the speed wing and its fallbacks, checkpoints, TensorBoard, launchers, composition, and every numpy/torchvision
# call regbench makes at their floors.
PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PATH="$VENV/bin:$PATH" \
    "$VENV/bin/python" -m pytest -m "not slow" -p no:cacheprovider "$@"
