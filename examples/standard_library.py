"""The main job: compile every standard pattern, check it, summarise its masks and analyse it.

Run with `make demo` (or `python examples/standard_library.py` in the venv). Prints one row
per pattern (its mask, then its receptive field when stacked, then its compiled kernels'
block tables) and writes a picture of each mask to out/standard_library/.
"""

from __future__ import annotations

import sys
import textwrap
import time
from pathlib import Path

import torch

import attndsl
from attndsl import render
from attndsl.report import COVERAGE_NOTE, coverage_text

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "out" / "standard_library"

# (file, pattern, parameters, run-time inputs) at sizes the dense reference handles quickly
CASES = [
    ("neighborhood.attn", "na1d", dict(N=256, kernel=7, dilation=2), {}),
    ("neighborhood.attn", "na2d", dict(H=32, W=32, kernel=7, dilation=2), {}),
    ("neighborhood.attn", "na2d", dict(H=24, W=40, kernel=(5, 9), stride=(1, 3),
                                       causal=(True, False)), {}),
    ("neighborhood.attn", "na3d", dict(T=8, H=16, W=16, kernel=(3, 5, 5),
                                       causal=(True, False, False)), {}),
    ("sliding.attn", "sliding_window", dict(N=1024, window=128), {}),
    ("sliding.attn", "dilated_window", dict(N=1024, window=32, dilation=4), {}),
    ("power.attn", "power_attention", dict(N=4096, block=64), {}),
    ("power.attn", "block_sliding", dict(N=4096, block=64), {}),
    ("power.attn", "block_dilated", dict(N=4096, block=64), {}),
    ("power.attn", "longnet", dict(N=4096, block=16), {}),
    ("power.attn", "power_strides", dict(N=1024, window=16), {}),
    ("sparse_transformer.attn", "strided", dict(N=1024, stride=32), {}),
    ("sparse_transformer.attn", "fixed", dict(N=1024, stride=32, c=2), {}),
    ("halo.attn", "halo2d", dict(H=32, W=32), {}),
    ("combiner.attn", "combiner_fixed", dict(N=1024, span=32), {}),
    ("combiner.attn", "combiner_logsparse", dict(N=1024), {}),
    ("combiner.attn", "combiner_axial", dict(H=32, W=32), {}),
    ("combiner.attn", "combiner_mixture", dict(N=1024, span=32), {}),
    ("dhsa.attn", "dhsa", dict(N=1024, block=64, chunk=32, budget=256, local=64, sinks=16,
                               instruction=64), {}),
    ("davit.attn", "channel_group", dict(C=256, groups=4), {}),
    ("davit.attn", "window2d", dict(H=28, W=28), {}),
    ("moh.attn", "moh", dict(N=512, heads=8, shared=2, topk=2), {}),
    ("transnext.attn", "aggregated", dict(H=32, W=32, heads=4), {}),
    ("document.attn", "document_causal", dict(N=1024),
     {"doc": torch.repeat_interleave(torch.arange(4), torch.tensor([300, 200, 400, 124]))}),
    ("document.attn", "prefix_lm", dict(N=1024), {"prefix": 256}),
    ("llm.attn", "chunked_causal", dict(N=1024, chunk=128), {}),
    ("llm.attn", "alibi", dict(N=1024, heads=8), {}),
    ("longdoc.attn", "longformer", dict(N=1024, window=64, globals=2), {}),
    ("longdoc.attn", "bigbird", dict(N=1024, block=32), {}),
    ("sta.attn", "sliding_tile", dict(H=24, W=24, tile=4, window=3), {}),
    ("sta.attn", "sliding_tile3d", dict(T=4, H=12, W=12, tile=(2, 4, 4), window=(1, 3, 3)),
     {}),
]
PARAM_WIDTH = 44  # longer parameter lists continue on the next line


def main() -> int:
    OUT.mkdir(parents=True, exist_ok=True)
    files = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "patterns").glob("*.attn"))
    for f in files:
        attndsl.check(ROOT / f)
    print(f"checked {len(files)} files in patterns/: every pattern parses and type-checks\n")
    head = (f"{'pattern':<20} {'parameters':<44} {'queries x keys':>15} {'pairs':>11} "
            f"{'density':>8} {'keys/query min/mean/max':>24} {'summaries':>9} {'ms':>6}")
    print(head)
    print("-" * len(head))
    g = torch.Generator().manual_seed(0)
    analyses = []
    seen: dict[str, int] = {}
    for file, name, params, inputs in CASES:
        t0 = time.perf_counter()
        op = attndsl.compile(ROOT / "patterns" / file, pattern=name, **params)
        content = {}
        if op.bound.content_dependent:
            content = {"q": torch.randn(1, 1, op.bound.nq, 32, generator=g),
                       "k": torch.randn(1, 1, op.bound.nk, 32, generator=g)}
        mask = op.mask(**content, **inputs)
        m = mask
        while m.dim() > 2:
            m = m.any(0)
        reach = op.reach(**inputs) if op.summaries(**inputs) else m
        while reach.dim() > 2:
            reach = reach.any(0)
        ms = (time.perf_counter() - t0) * 1e3
        per = m.sum(1)
        nsum = sum(s["member"].shape[0] for s in op.summaries(**inputs))
        ptxt = textwrap.wrap(", ".join(f"{k}={v}" for k, v in params.items()), PARAM_WIDTH,
                             break_long_words=False) or [""]
        shape = f"{op.bound.nq}x{op.bound.nk}"
        print(f"{name:<20} {ptxt[0]:<{PARAM_WIDTH}} {shape:>15} {int(m.sum()):>11,} "
              f"{float(m.float().mean()):>8.2%} "
              f"{int(per.min()):>8}/{float(per.float().mean()):>7.1f}/{int(per.max()):<7} "
              f"{nsum:>9} {ms:>6.0f}")
        for more in ptxt[1:]:
            print(f"{'':<20} {more}")
        if nsum:
            print(f"{'':<20} with summary tokens, every query reaches "
                  f"{float(reach.sum(1).float().mean()):.1f} keys on average")
        seen[name] = seen.get(name, 0) + 1  # a second case of a pattern: name_2.png
        picture = f"{name}.png" if seen[name] == 1 else f"{name}_{seen[name]}.png"
        render.plot(op, mask, str(OUT / picture), reach=reach if nsum else None)
        analyses.append((name, op.analyze(layers=2, **inputs, q=content.get("q"),
                                       k=content.get("k"))))
    print("\nstacked (attndsl analyze): receptive field of the last token (or the grid "
          "centre) after 1 and 2 layers;\nfull coverage: layers until every query reaches all "
          "that full attention would give it")
    head = (f"{'pattern':<20} {'after 1 layer':>14} {'after 2 layers':>15} "
            f"{'full coverage':>14}  growth of the pair count")
    print(head)
    print("-" * (len(head) + 20))
    covs = [coverage_text(a) for _, a in analyses]
    for (name, a), cov in zip(analyses, covs):
        print(f"{name:<20} {a.layers[0].reach_fraction:>14.1%} {a.layers[1].reach_fraction:>15.1%}"
              f" {cov:>14}  {a.asymptotic.split(' (')[0]}")
    if "never*" in covs:
        print(COVERAGE_NOTE)
    print("\ncompiled kernels (attndsl compile --stats): token order, 64 x 64 blocks, score "
          "elements the kernels compute per attended one, and against FlexAttention's "
          "row-major block mask at the same block size")
    from attndsl.codegen.plan.tables import build_plan
    from attndsl.semantics.inputs import validate
    head = (f"{'pattern':<20} {'order':<34} {'full':>7} {'partial':>8} {'computed/needed':>16}"
            f" {'vs Flex':>8} {'build ms':>9}")
    print(head)
    print("-" * len(head))
    for file, name, params, inputs in CASES:
        op = attndsl.compile(ROOT / "patterns" / file, pattern=name, **params)
        s = op.stats("triton", **inputs)  # what `compile --stats` reports (the CPU's: 2D/3D
        # patterns may take 64 x 16 blocks there, docs/kernels.md)
        flex_computed = sum(
            build_plan(b, 64, 64, validate(b, inputs, for_mask=True), order="row-major")
            .stats()["computed_elements"] for b in (op.bound.average or [op.bound]))
        # Flex cannot express summary tokens or content-dependent selection: no ratio there
        vs = ("-" if s["content_dependent"] or s.get("summary_tokens")
              else f"{s['computed_elements'] / flex_computed:.2f}x")
        waste = "at run time" if s["content_dependent"] else f"{s['waste']:.2f}"
        print(f"{name:<20} {s['order_q'][:34]:<34} {s['full_blocks']:>7,} "
              f"{s['partial_blocks']:>8,} {waste:>16} {vs:>8} {s['build_seconds'] * 1e3:>9.0f}")
    shown = OUT.relative_to(ROOT) if OUT.is_relative_to(ROOT) else OUT
    print(f"\npictures of every mask: {shown}/ (direct keys black, keys "
          "reached through summary tokens blue)")
    print("a text picture, for example `attndsl show patterns/neighborhood.attn -p na2d "
          "--set H=9 --set W=9 --set kernel=3 --set dilation=2`:")
    op = attndsl.compile(ROOT / "patterns" / "neighborhood.attn", pattern="na2d", H=9, W=9,
                         kernel=3, dilation=2)
    print(render.text(op, op.mask(), width=40).split("\n", 1)[0])
    print("\n".join(render.text(op, op.mask(), width=40).splitlines()[-10:]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
