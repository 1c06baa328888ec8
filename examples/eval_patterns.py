"""Rank the standard 1D patterns on multi-query associative recall (MQAR), with `attndsl eval`.

Tiny 2-layer transformers (d_model 64, 4 heads) built from `attndsl.nn.Attention` layers are
trained on the CPU, one per pattern and seed, beside a dense-attention control, on MQAR at
N = 128 with a vocabulary of 256 and 8 key-value pairs (batch 64, AdamW lr 3e-3). The
control's first run trains for `--budget` seconds (default 300); its step count becomes
every run's, and each pattern is also scored at the step where its FLOPs equal the
control's. The report splits accuracy by query-to-value distance and marks, for every band,
whether each pattern's analysed 2-layer reach covers it (docs/eval.md).

    python examples/eval_patterns.py                      # the full size: 70-85 min (1 thread)
    python examples/eval_patterns.py --out bench/results  # also writes .json, .txt and .png
    python examples/eval_patterns.py --quick              # seconds: a smoke run

Results depend on the machine only through the step count (fix it with --steps K to repeat
a run exactly: one torch thread, fixed seeds).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import attndsl
from attndsl.evaluation import evaluate

# (file, pattern, parameters): the probe (power_attention, sliding_window(32),
# block_sliding, strided(16)) and a dilated window, whose 2-layer reach at N = 128 ranges
# from every earlier token to no key-value pair at all (a dilation of 2 never reads the odd
# offsets: a key next to its value is out of reach at every distance)
PATTERNS = [
    ("power.attn", "power_attention", dict(block=8, window=2)),
    ("sliding.attn", "sliding_window", dict(window=32)),
    ("sliding.attn", "dilated_window", dict(window=16, dilation=2)),
    ("power.attn", "block_sliding", dict(block=8, window=3)),
    ("sparse_transformer.attn", "strided", dict(stride=16)),
]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    how = ap.add_mutually_exclusive_group()
    how.add_argument("--budget", type=float, default=None,
                     help="seconds of the control's first run (default 300)")
    how.add_argument("--steps", type=int, default=None, help="training steps of every run")
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--quick", action="store_true",
                    help="a seconds-sized smoke run (3 patterns; N 64, vocab 64, 4 pairs, "
                    "10 steps, 1 seed)")
    ap.add_argument("--out", type=Path, default=None,
                    help="folder for eval_mqar_cpu.json, .txt and .png")
    ap.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None)
    args = ap.parse_args(argv)

    size = dict(seq_len=128, vocab=256, items=8)
    steps, budget, seeds = args.steps, args.budget, args.seeds
    if args.quick:
        size = dict(seq_len=64, vocab=64, items=4, test_sequences=128)
        steps, budget, seeds = steps or 10, None, 1
    elif steps is None and budget is None:
        budget = 300.0
    chosen = PATTERNS[:3] if args.quick else PATTERNS
    ops = [attndsl.compile(f, p, **params) for f, p, params in chosen]
    res = evaluate(*ops, task="mqar", layers=2, steps=steps, budget=budget, seeds=seeds,
                   d_model=64, heads=4, batch=64, lr=3e-3, progress=args.progress, **size)
    stem = None
    if args.out is not None:  # the results first: the report can be made again from them
        args.out.mkdir(parents=True, exist_ok=True)
        stem = args.out / ("eval_mqar_cpu_quick" if args.quick else "eval_mqar_cpu")
        res.save(stem.with_suffix(".json"))
    report = res.text()
    print(report)
    if stem is not None:
        stem.with_suffix(".txt").write_text(report + "\n")
        res.plot(stem.with_suffix(".png"))
        print(f"wrote {stem}.json, .txt and .png")
    return 130 if res.interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
