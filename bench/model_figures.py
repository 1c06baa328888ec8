"""Figures of issue 11 (one compiled pattern for a model's whole life), on the CPU backend:

1. decoding one token at N = 1,048,576 with `sliding_window(window=4096)`: wall time per
   step (the median over steps of a growing cache, each planning its one row) and the score
   elements its block tables touch, against the full forward's;
2. torch.compile(dynamic=True) of a two-layer `attndsl.nn` model called at 4 lengths: the
   number of graphs compiled;
3. the declared caches after 1,000 calls at varying lengths: entries against their bounds,
   and the process's resident memory before and after.

    python bench/model_figures.py [--json bench/results/model_figures.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import time
from pathlib import Path

import torch

import attndsl
from attndsl.codegen.plan.tables import plan_for
from attndsl.nn import Attention

M = 1 << 20


def decode_at_1m(steps: int = 9) -> dict:
    op = attndsl.compile("sliding.attn", "sliding_window", window=4096)
    h, d = 2, 64
    g = torch.Generator().manual_seed(0)
    k = torch.randn(1, h, M, d, generator=g)
    v = torch.randn(1, h, M, d, generator=g)
    times = []
    for n in range(M - steps, M + 1):  # the cache grows by one token per step
        q = torch.randn(1, h, 1, d, generator=g)
        t0 = time.perf_counter()
        out = op(q, k[:, :, :n], v[:, :, :n], backend="cpu", q_start=n - 1)
        times.append(time.perf_counter() - t0)
        assert out.shape == (1, h, 1, d)
    # the last step against a dense computation of its one row
    s = (q @ k[:, :, M - 4096:].transpose(-1, -2)) / d ** 0.5
    want = torch.softmax(s, -1) @ v[:, :, M - 4096:]
    err = (out - want).abs().max().item()
    stats = plan_for(op.bind(N=M), 16, None, rows=(M - 1, 1)).stats()  # as the CPU call
    return {"tokens": M, "window": 4096, "heads": h, "head_dim": d,
            "step_seconds_median": statistics.median(times[1:]),
            "step_seconds_min": min(times[1:]), "step_seconds_max": max(times[1:]),
            "first_step_seconds": times[0],
            "needed_elements": stats["needed_elements"],
            "computed_elements": stats["computed_elements"],
            "full_forward_needed_elements": 4096 * M - 4096 * 4095 // 2,
            "max_abs_error_vs_dense_row": err}


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = Attention(32, 2, "power.attn", "power_attention", block=4, backend="cpu")
        self.b = Attention(32, 2, "sliding.attn", "sliding_window", window=8, backend="cpu")

    def forward(self, x):
        return self.b(x + self.a(x))


def recompilations() -> dict:
    torch.manual_seed(0)
    model = Tiny()
    graphs = []

    def count(gm, example_inputs):
        graphs.append(1)
        return gm.forward

    compiled = torch.compile(model, backend=count, dynamic=True, fullgraph=True)
    lengths = [17, 64, 100, 257]
    for n in lengths:
        x = torch.randn(2, n, 32)
        torch.testing.assert_close(compiled(x), model(x))
    return {"lengths": lengths, "graphs_compiled": len(graphs)}


def rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def caches_after_many_calls(calls: int = 1000) -> dict:
    attndsl.caches.clear_all()
    op = attndsl.compile("power.attn", "power_attention", block=16)
    g = torch.Generator().manual_seed(0)
    before = rss_mib()
    t0 = time.perf_counter()
    for _ in range(calls):
        n = int(torch.randint(16, 1025, (), generator=g))
        q, k, v = (torch.randn(1, 2, n, 16, generator=g) for _ in range(3))
        op(q, k, v, backend="cpu")
    info = attndsl.Op.cache_info()
    return {"calls": calls, "lengths": "uniform in [16, 1024]",
            "seconds": time.perf_counter() - t0, "peak_rss_mib_before": before,
            "peak_rss_mib_after": rss_mib(),
            "caches": {k: v for k, v in info["caches"].items() if v["size"] or v["misses"]}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", help="write the figures here too")
    args = ap.parse_args()
    out = {"machine": platform.processor() or platform.machine(), "torch": torch.__version__,
           "threads": torch.get_num_threads()}
    out["recompilations"] = r = recompilations()
    print(f"torch.compile(dynamic=True) at lengths {r['lengths']}: "
          f"{r['graphs_compiled']} graph(s) compiled")
    out["caches"] = c = caches_after_many_calls()
    print(f"{c['calls']} calls at lengths {c['lengths']} ({c['seconds']:.1f} s): peak RSS "
          f"{c['peak_rss_mib_before']:.0f} -> {c['peak_rss_mib_after']:.0f} MiB")
    for name, v in c["caches"].items():
        print(f"    {name:<16} {v['size']:>4} / {v['maxsize']:<4} entries, {v['hits']} hits, "
              f"{v['misses']} misses")
    out["decode"] = d = decode_at_1m()
    print(f"decode one token at N={d['tokens']:,} (window {d['window']}): median "
          f"{d['step_seconds_median'] * 1e3:.1f} ms per step (min "
          f"{d['step_seconds_min'] * 1e3:.1f}, max {d['step_seconds_max'] * 1e3:.1f}; first "
          f"{d['first_step_seconds'] * 1e3:.1f}); {d['needed_elements']:,} scores needed, "
          f"{d['computed_elements']:,} computed (the full forward needs "
          f"{d['full_forward_needed_elements']:,}); max error vs a dense row "
          f"{d['max_abs_error_vs_dense_row']:.1e}")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
