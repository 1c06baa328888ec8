"""FlexAttention fed by attndsl: what handing attndsl's tables to Flex saves.

1. BlockMask build time: `op.block_mask()` (attndsl's tables built from the typed IR, cold:
   the plan cache is cleared before every call, then converted to Flex's layout with the
   transposed tables) against `create_block_mask(mask_mod, ...)` compiled (Flex's O(N^2)
   evaluation of the same generated mask_mod), for a causal sliding window of 4096 tokens at
   N = 16K, 64K and 1M. Each create_block_mask size runs in a child process with a time
   and memory bound; what it hits is reported.
2. Flex-CPU forward (torch.compile(flex_attention), fp32, B=1, 4 heads, D=64, no_grad) with
   Flex's own row-major BlockMask against attndsl's tiled tables (op.block_mask("tiled"),
   q, k, v through op.permute, the output through op.unpermute), na2d 128x128 kernel 13
   and na3d 16x32x32 kernel 5; the outputs are compared.

    python bench/flex_handoff.py [--repeats 5] [--no-write] [--limit 600]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import torch  # noqa: E402

import attndsl  # noqa: E402
from attndsl import caches  # noqa: E402

SIZES = [1 << 14, 1 << 16, 1 << 20]
WINDOW = 4096
FWD = [("na2d", dict(H=128, W=128, kernel=13)), ("na3d", dict(T=16, H=32, W=32, kernel=5))]
MEMORY = 12 << 30  # address-space bound of a create_block_mask child (this machine: 24 GiB)

CHILD = """
import sys, time, torch
sys.path.insert(0, {root!r})
import attndsl
from attndsl.codegen.flex import functions
from torch.nn.attention.flex_attention import create_block_mask
op = attndsl.compile("patterns/sliding.attn", "sliding_window", window={window}, N={n})
mm = functions(op.bound, op.plan().run, torch.device("cpu"))["mask_mod"]
times = []
for i in range({repeats} + 1):
    t0 = time.perf_counter()
    bm = create_block_mask(mm, None, None, {n}, {n}, device="cpu", _compile=True)
    times.append(time.perf_counter() - t0)
    print("TIME", times[-1], flush=True)
print("BLOCKS", int(bm.kv_num_blocks.sum()), int(bm.full_kv_num_blocks.sum()), flush=True)
"""


def ours(n: int, repeats: int) -> dict:
    op = attndsl.compile(str(ROOT / "patterns/sliding.attn"), "sliding_window", window=WINDOW,
                         N=n)
    times = []
    for _ in range(repeats + 1):
        caches.PLANS.clear()
        t0 = time.perf_counter()
        bm = op.block_mask()
        times.append(time.perf_counter() - t0)
    caches.PLANS.clear()
    t0 = time.perf_counter()
    from attndsl.codegen.plan.tables import plan_for
    plan_for(op.bound, 128, 128, order="row-major")
    tables = time.perf_counter() - t0
    times = times[1:]
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times),
            "tables_only_s": tables, "blocks": int(bm.kv_num_blocks.sum()),
            "full_blocks": int(bm.full_kv_num_blocks.sum())}


def flex_build(n: int, repeats: int, limit: float) -> dict:
    code = CHILD.format(root=str(ROOT), window=WINDOW, n=n, repeats=repeats)

    def bound():
        resource.setrlimit(resource.RLIMIT_AS, (MEMORY, MEMORY))
    t0 = time.perf_counter()
    try:
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           timeout=limit, preexec_fn=bound, cwd=ROOT)
        out, err, rc = r.stdout, r.stderr, r.returncode
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        times = [float(x.split()[1]) for x in out.splitlines() if x.startswith("TIME")]
        return {"status": f"timed out after {limit:.0f} s", "calls_done": len(times),
                "times_s": times}
    times = [float(x.split()[1]) for x in out.splitlines() if x.startswith("TIME")]
    if rc != 0:
        last = (err.strip().splitlines() or ["?"])[-1]
        status = "out of memory" if "memory" in err.lower() or rc in (-9, 137) else "failed"
        return {"status": f"{status} ({last[:160]})", "seconds_before": round(
            time.perf_counter() - t0, 1), "times_s": times}
    blocks = next(x.split()[1:] for x in out.splitlines() if x.startswith("BLOCKS"))
    warm = times[1:]
    return {"status": "ok", "first_call_s": times[0], "median_s": statistics.median(warm),
            "min_s": min(warm), "max_s": max(warm), "blocks": int(blocks[0]),
            "full_blocks": int(blocks[1])}


def forward(name: str, params: dict, repeats: int) -> dict:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    from attndsl.codegen.flex import functions
    op = attndsl.compile(str(ROOT / "patterns/neighborhood.attn"), name, **params)
    n = op.bound.nq
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 4, n, 64, generator=g) for _ in range(3))
    mm = functions(op.bound, op.plan().run, torch.device("cpu"))["mask_mod"]
    t0 = time.perf_counter()
    theirs = create_block_mask(mm, None, None, n, n, device="cpu", _compile=True)
    build_theirs = time.perf_counter() - t0
    t0 = time.perf_counter()
    tiled = op.block_mask(order="tiled")
    build_ours = time.perf_counter() - t0
    fx = torch.compile(flex_attention)
    qp, kp, vp = (op.permute(x) for x in (q, k, v))

    def run_theirs():
        return fx(q, k, v, block_mask=theirs)

    def run_ours():
        return op.unpermute(fx(qp, kp, vp, block_mask=tiled))

    with torch.no_grad():
        first = {}
        for key, fn in (("flex", run_theirs), ("attndsl_tiles", run_ours)):
            t0 = time.perf_counter()
            fn()
            first[key] = time.perf_counter() - t0
        times = {"flex": [], "attndsl_tiles": []}
        for _ in range(repeats):  # interleaved
            for key, fn in (("flex", run_theirs), ("attndsl_tiles", run_ours)):
                t0 = time.perf_counter()
                out = fn()
                times[key].append(time.perf_counter() - t0)
                if key == "flex":
                    a = out
                else:
                    b = out
        diff = float((a - b).abs().max())
    blocks = {k: int((bm.kv_num_blocks + bm.full_kv_num_blocks).sum()) * bm.BLOCK_SIZE[0]
              * bm.BLOCK_SIZE[1] for k, bm in (("flex", theirs), ("attndsl_tiles", tiled))}
    res = {"pattern": name, "params": params, "tokens": n, "max_abs_diff": diff,
           "build_s": {"flex": build_theirs, "attndsl_tiles": build_ours},
           "first_call_s": first, "computed_elements": blocks}
    for key, ts in times.items():
        res[key] = {"median_ms": 1e3 * statistics.median(ts), "min_ms": 1e3 * min(ts),
                    "max_ms": 1e3 * max(ts)}
    res["speedup"] = res["flex"]["median_ms"] / res["attndsl_tiles"]["median_ms"]
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--limit", type=float, default=600.0,
                    help="seconds allowed to one create_block_mask size (child process)")
    ap.add_argument("--sizes", default=",".join(map(str, SIZES)))
    ap.add_argument("--no-forward", action="store_true", help="the build table only")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args(argv)
    from cpu_bench import machine_info
    out = {"machine": machine_info(), "load_before": os.getloadavg(), "window": WINDOW,
           "build": [], "forward": []}
    lines = ["# FlexAttention fed by attndsl (CPU)", "",
             f"{out['machine']['cpu']}, {out['machine']['logical_cores']} logical cores, "
             f"torch {out['machine']['torch']} ({out['machine']['torch_threads']} threads), "
             f"Python {out['machine']['python']}; load average before: "
             f"{', '.join(f'{x:.2f}' for x in out['load_before'])}.", "",
             f"## BlockMask build: sliding_window(window={WINDOW}), causal, BLOCK_SIZE 128", "",
             f"attndsl: op.block_mask(), cold (plan cache cleared), median of {args.repeats} "
             "after one warm-up (min-max). Flex: create_block_mask(generated mask_mod, "
             f"_compile=True) in a child process bounded to {MEMORY >> 30} GiB of address "
             f"space and {args.limit:.0f} s; median of the calls after the first (which "
             "compiles).", "",
             "| N | attndsl s (min-max) | of which tables s | create_block_mask s (min-max)"
             " | first call s | speedup | blocks (partial, full) equal |",
             "|---:|---:|---:|---:|---:|---:|---|"]
    for n in [int(x) for x in args.sizes.split(",")]:
        o = ours(n, args.repeats)
        f = flex_build(n, args.repeats, args.limit)
        out["build"].append({"N": n, "attndsl": o, "create_block_mask": f})
        if f["status"] == "ok":
            same = (f["blocks"], f["full_blocks"]) == (o["blocks"], o["full_blocks"])
            lines.append(f"| {n:,} | {o['median_s']:.4f} ({o['min_s']:.4f}-{o['max_s']:.4f}) | "
                         f"{o['tables_only_s']:.4f} | {f['median_s']:.3f} "
                         f"({f['min_s']:.3f}-{f['max_s']:.3f}) | {f['first_call_s']:.1f} | "
                         f"{f['median_s'] / o['median_s']:.0f}x | "
                         f"{'yes' if same else 'no'} ({o['blocks']:,}, {o['full_blocks']:,}"
                         f" vs {f['blocks']:,}, {f['full_blocks']:,}) |")
        else:
            lines.append(f"| {n:,} | {o['median_s']:.4f} ({o['min_s']:.4f}-{o['max_s']:.4f}) | "
                         f"{o['tables_only_s']:.4f} | {f['status']} | - | - | - |")
        print(lines[-1], flush=True)
    lines += ["", "## Flex-CPU forward: Flex's own BlockMask vs attndsl's tiled tables", "",
              "torch.compile(flex_attention), fp32, B=1, 4 heads, D=64, no_grad; median of "
              f"{args.repeats} interleaved calls after one warm-up (min-max). computed = "
              "listed blocks x 128 x 128 score elements.", "",
              "| pattern | Flex ms (min-max) | attndsl tiles ms (min-max) | speedup | computed "
              "Flex / attndsl | max abs diff |", "|---|---:|---:|---:|---:|---:|"]
    for name, params in [] if args.no_forward else FWD:
        r = forward(name, params, args.repeats)
        out["forward"].append(r)
        ce = r["computed_elements"]
        lines.append(f"| {name} {' '.join(f'{k}={v}' for k, v in params.items())} | "
                     f"{r['flex']['median_ms']:.1f} ({r['flex']['min_ms']:.1f}-"
                     f"{r['flex']['max_ms']:.1f}) | {r['attndsl_tiles']['median_ms']:.1f} "
                     f"({r['attndsl_tiles']['min_ms']:.1f}-{r['attndsl_tiles']['max_ms']:.1f})"
                     f" | {r['speedup']:.2f}x | {ce['flex'] / ce['attndsl_tiles']:.2f} | "
                     f"{r['max_abs_diff']:.2e} |")
        print(lines[-1], flush=True)
    out["load_after"] = os.getloadavg()
    lines += ["", f"Load average after: {', '.join(f'{x:.2f}' for x in out['load_after'])}."]
    text = "\n".join(lines) + "\n"
    print(text)
    if not args.no_write:
        res = ROOT / "bench" / "results"
        (res / "flex_handoff_cpu.md").write_text(text)
        (res / "flex_handoff_cpu.json").write_text(json.dumps(out, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
