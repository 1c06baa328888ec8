"""Block tables: build time at N = 1,048,576 and computed elements against FlexAttention.

FlexAttention's BlockMask is row-major: a block pair is computed whenever any of its entries
is attended. We count the same thing for our token orders at the same query block size (the
row-major count is exactly Flex's, as tests/test_plan.py checks against brute force), so the
ratio says how many score elements our kernels evaluate per element Flex's would.

    python bench/blocks.py [--no-write]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import attndsl  # noqa: E402
from attndsl.codegen.plan.tables import build_plan  # noqa: E402

BUILD = [
    ("sliding.attn", "sliding_window", dict(N=1 << 20, window=4096)),
    ("power.attn", "power_attention", dict(N=1 << 20)),
    ("power.attn", "block_sliding", dict(N=1 << 20)),
    ("power.attn", "longnet", dict(N=1 << 20)),
    ("neighborhood.attn", "na1d", dict(N=1 << 20, kernel=1023)),
    ("sliding.attn", "dilated_window", dict(N=1 << 20, window=512, dilation=4)),
]

RATIO = [
    ("neighborhood.attn", "na2d", dict(H=128, W=128, kernel=13)),
    ("neighborhood.attn", "na2d", dict(H=128, W=128, kernel=7, dilation=4)),
    ("neighborhood.attn", "na3d", dict(T=16, H=32, W=32, kernel=5)),
    ("power.attn", "power_attention", dict(N=16384)),
    ("sliding.attn", "sliding_window", dict(N=16384, window=1024)),
]


def _op(file, pattern, params):
    return attndsl.compile(str(ROOT / "patterns" / file), pattern, **params)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    out = {"machine": platform.machine(), "python": platform.python_version(),
           "build": [], "ratio": []}
    print("## Block-table build time, N = 1,048,576 (median of "
          f"{args.repeats} after a warm-up)\n")
    print("| pattern | seconds | full | partial | table bytes |")
    print("| --- | --- | --- | --- | --- |")
    for file, pattern, params in BUILD:
        op = _op(file, pattern, params)
        build_plan(op.bound)
        times, plan = [], None
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            plan = build_plan(op.bound)
            times.append(time.perf_counter() - t0)
        s = plan.stats()
        med = statistics.median(times)
        print(f"| {pattern}{_args(params)} | {med:.3f} | {s['full_blocks']:,} | "
              f"{s['partial_blocks']:,} | {s['block_table_bytes']:,} |")
        out["build"].append({"pattern": pattern, "params": params, "seconds": med, **s})
    print("\n## Computed score elements against FlexAttention's row-major BlockMask\n")
    print("| pattern | block | order | computed / needed | Flex computed / needed | ratio |")
    print("| --- | --- | --- | --- | --- | --- |")
    for file, pattern, params in RATIO:
        op = _op(file, pattern, params)
        for bq, bk in ((64, 64), (128, 128), (128, 16)):
            ours = build_plan(op.bound, bq, bk).stats()
            flex = build_plan(op.bound, bq, bq, order="row-major").stats()
            ratio = ours["computed_elements"] / flex["computed_elements"]
            order = ours["order_q"] + ("" if ours["order_k"] == ours["order_q"]
                                       else f" / keys {ours['order_k']}")
            print(f"| {pattern}{_args(params)} | {bq}x{bk} | {order} | {ours['waste']:.2f} | "
                  f"{flex['waste']:.2f} | {ratio:.3f} |")
            out["ratio"].append({"pattern": pattern, "params": params, "block_q": bq,
                                 "block_k": bk, "order": order, "waste": ours["waste"],
                                 "flex_waste": flex["waste"], "ratio": ratio})
    if not args.no_write:
        res = ROOT / "bench" / "results"
        res.mkdir(parents=True, exist_ok=True)
        (res / "blocks_cpu.json").write_text(json.dumps(out, indent=2, default=str))
        print(f"\nwrote {res / 'blocks_cpu.json'}")
    return 0


def _args(params) -> str:
    return "(" + ", ".join(f"{k}={v}" for k, v in params.items()) + ")"


if __name__ == "__main__":
    sys.exit(main())
