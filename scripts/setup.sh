#!/usr/bin/env bash
# Creates .venv and installs attndsl (editable) with its test tools. Idempotent and quick on a
# second run. torch is chosen for the machine: the CUDA build where an NVIDIA GPU is visible,
# otherwise the CPU build (2.13.0 is on this project's CI machines' local disk; other
# machines fall back to PyTorch's CPU index, then to PyPI's default build).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
say() { echo "setup: $*"; }
if [ ! -x .venv/bin/python ]; then
    say "creating .venv with $("$PY" --version 2>&1)"
    "$PY" -m venv .venv
fi
. .venv/bin/activate
# pip's own progress, one line per package it collects and installs (a silent install of a
# few minutes looks like a hang)
pip_q() {
    python -m pip install --disable-pip-version-check "$@" 2>&1 \
        | grep --line-buffered -E "^(Collecting|Processing|Installing collected|Successfully|ERROR)" \
        | sed -u "s/^/    /" || true
}
if ! python -c "import torch" 2>/dev/null; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
        say "installing PyTorch, CUDA build (an NVIDIA GPU is visible): a few GB, some minutes"
        pip_q torch
    else
        say "installing PyTorch 2.13.0, CPU build (about 200 MB; a minute or two)"
        pip_q "torch==2.13.0" || true
        python -c "import torch" 2>/dev/null || pip_q torch --index-url https://download.pytorch.org/whl/cpu || true
        python -c "import torch" 2>/dev/null || pip_q torch
    fi
fi
if [ ! -f .venv/.attndsl-installed ] || [ pyproject.toml -nt .venv/.attndsl-installed ]; then
    say "installing attndsl (editable) with lark, sympy, networkx, numpy, matplotlib and the"
    say "test tools pytest, hypothesis, pytest-xdist, ruff, triton (pyproject.toml's [test])"
    pip_q -e ".[test]"
    touch .venv/.attndsl-installed
fi
python -c "import torch, attndsl; print(f'attndsl {attndsl.__version__} with torch {torch.__version__}')"
