#!/usr/bin/env bash
# A tour of the attndsl command line on the standard library (patterns/).
#
#   . .venv/bin/activate && bash examples/cli_tour.sh
#
# Works from any directory; pictures and masks go to out/cli_tour/ under the repository.
# Each command starts Python and imports torch (a second or two), so the tour is short.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="$ROOT/out/cli_tour"
mkdir -p "$OUT"
cd "$ROOT"

# The attndsl command: on PATH when the venv is active, else the checkout's venv.
if command -v attndsl >/dev/null 2>&1; then
    ATTNDSL=(attndsl)
    PYTHON=python
elif [ -x "$ROOT/.venv/bin/attndsl" ]; then
    ATTNDSL=("$ROOT/.venv/bin/attndsl")
    PYTHON="$ROOT/.venv/bin/python"
else
    echo "attndsl is not installed: run 'make setup' and '. .venv/bin/activate'" >&2
    exit 1
fi

step() {
    printf '\n$ attndsl %s\n' "$*"
    "${ATTNDSL[@]}" "$@"
}

echo "== check: parse, type-check, and check the constraints of default parameters"
step check patterns/*.attn

echo
echo "== list: patterns, parameters, defaults, run-time inputs and doc comments"
step list patterns/document.attn

echo
echo "== show: the mask as text; on a grid, also one query's keys (--query y,x)."
echo "   Per-axis values are comma lists (dilation=1,2); a standard file may be named alone."
step show neighborhood.attn -p na2d --set H=5 --set W=6 --set kernel=3 --set dilation=1,2 \
    --query 2,3


echo
echo "== show -o: a PNG picture (the mask, and one query's keys on the grid)"
step show patterns/neighborhood.attn -p na2d --set H=16 --set W=16 --set kernel=5 \
    --set dilation=2 --query 8,8 -o "$OUT/na2d.png"

echo
echo "== mask -o: the dense bool mask as .npy ([Nq, Nk]; [heads, Nq, Nk] when per head)."
echo "   Run-time inputs: --input NAME=VALUE (a number or a comma list) or NAME=@file.npy"
step mask patterns/document.attn -p document_causal --set N=8 \
    --input doc=0,0,0,1,1,2,2,2 -o "$OUT/document_causal.npy"
"$PYTHON" - "$OUT/document_causal.npy" <<'PY'
import sys

import numpy as np

m = np.load(sys.argv[1])
print(f"loaded document_causal.npy: {m.dtype} {list(m.shape)}")
print("\n".join(" ".join("#" if x else "." for x in row) for row in m))
PY

echo
echo "files in $OUT:"
ls -1 "$OUT"
