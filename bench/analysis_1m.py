"""Benchmark: receptive-field analysis of 1,048,576-token patterns over 12 layers.

Prints, per pattern, the wall time of the analysis (`attndsl.analysis.reach.analyze`:
decomposition, 12 hops of the chosen query, coverage, cost and closed-form check), of the
decomposition alone, and of `op.analyze` (what `attndsl analyze` runs: the analysis plus the
compiled kernels' block tables it reports), each the median of 3 runs after one warm-up
analysis (imports, sympy caches). The
issue's target: under a second for translation-invariant and block-structured patterns;
irregular patterns take the sparse path and are timed at 65,536 tokens.

    python bench/analysis_1m.py [--json bench/results/analysis_1m.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

import attndsl
from attndsl.analysis.blocks import decompose
from attndsl.analysis.reach import analyze
from attndsl.caches import clear_all

ROOT = Path(__file__).resolve().parent.parent
M = 1 << 20
CASES = [
    ("sliding.attn", "sliding_window", dict(N=M, window=4096), "translation-invariant"),
    ("power.attn", "power_attention", dict(N=M), "block-structured"),
    ("power.attn", "block_sliding", dict(N=M), "block-structured"),
    ("power.attn", "block_dilated", dict(N=M), "block-structured"),
    ("neighborhood.attn", "na1d", dict(N=M, kernel=1023), "translation-invariant"),
    ("power.attn", "longnet", dict(N=1 << 16), "irregular (bit operations)"),
    ("sparse_transformer.attn", "fixed", dict(N=1 << 16, stride=256), "irregular (columns)"),
    ("sparse_transformer.attn", "strided", dict(N=1 << 16, stride=256),
     "periodic diagonals"),
]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--layers", type=int, default=12)
    args = ap.parse_args()
    rows = []
    warm = attndsl.compile(ROOT / "patterns" / "power.attn", pattern="power_attention", N=4096,
                           block=64)
    warm.analyze(layers=2, progress=False)
    print(f"{'pattern':<16} {'N':>9} {'kind':<27} {'decompose s':>11} {'analyze s':>10} "
          f"{'op.analyze s':>12} {'reach after L':>14} {'coverage':>9}")
    for file, name, params, kind in CASES:
        op = attndsl.compile(ROOT / "patterns" / file, pattern=name, **params)
        t_dec, t_an, t_op = [], [], []
        for _ in range(3):
            t0 = time.perf_counter()
            d = decompose(op.bound)
            t_dec.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            a = analyze(op.bound, layers=args.layers, progress=False)
            t_an.append(time.perf_counter() - t0)
            clear_all()  # the block tables are built afresh, as on a first `attndsl analyze`
            t0 = time.perf_counter()
            op.analyze(layers=args.layers, progress=False)
            t_op.append(time.perf_counter() - t0)
        t_dec, t_an, t_op = sorted(t_dec)[1], sorted(t_an)[1], sorted(t_op)[1]
        cov = a.full_coverage_layers if a.full_coverage_layers is not None else "-"
        print(f"{name:<16} {op.bound.nq:>9,} {kind:<27} {t_dec:>11.3f} {t_an:>10.3f} "
              f"{t_op:>12.3f} {a.layers[-1].reach:>14,} {cov!s:>9}")
        rows.append({"pattern": name, "params": params, "kind": kind, "tokens": op.bound.nq,
                     "layers": args.layers, "decompose_seconds": t_dec,
                     "analyze_seconds": t_an, "op_analyze_seconds": t_op,
                     "rectangles": len(d.full),
                     "diagonal_leaves": len(d.diag), "tiles": len(d.tiles),
                     "reach": [s.reach for s in a.layers],
                     "full_coverage_layers": a.full_coverage_layers})
    meta = {"machine": platform.machine(), "processor": platform.processor(),
            "python": platform.python_version(), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "attndsl": attndsl.__version__}
    print(f"\n{meta}")
    if args.json:
        Path(args.json).write_text(json.dumps({"meta": meta, "results": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
