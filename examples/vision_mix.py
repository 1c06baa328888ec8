"""Four 2-D vision patterns of the standard library on one small image grid.

- na2d (NATTEN neighbourhood attention): a kernel x kernel window that shifts inward at
  the borders, so every query keeps kernel^2 keys;
- halo2d (HaloNet): block x block query tiles reading their tile grown by a halo;
- window2d (DaViT / Swin windows): non-overlapping window x window blocks;
- aggregated_pooled (TransNeXt-style): a clipped kernel x kernel window plus
  average-pooled summary tokens of the whole grid, in one softmax.

For each: keys per query (direct keys, and summary tokens for TransNeXt), then one
query's neighbourhood drawn on the grid (the bottom of `attndsl.render.text`) for a query
in the middle and one in the corner, and a forward pass of attention.

Run from anywhere: `python examples/vision_mix.py`.
"""

from __future__ import annotations

import torch

import attndsl
from attndsl import render

H = W = 10
CASES = [  # (file, pattern, parameters)
    ("neighborhood.attn", "na2d", dict(kernel=5)),
    ("halo.attn", "halo2d", dict(block=4, halo=1)),
    ("davit.attn", "window2d", dict(window=4)),
    ("transnext.attn", "aggregated_pooled", dict(kernel=3, pool=4)),
]
QUERIES = [(4, 5), (0, 0)]


def neighbourhood(op, mask, query) -> list[str]:
    """The key-grid part of render.text: '#' attended, 'Q' the query, '.' not."""
    lines = render.text(op, mask, query=query).splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("keys of query"))
    return lines[start + 1:]


def side_by_side(titles, blocks, gap=4) -> str:
    width = max(max(len(line) for line in b) for b in blocks)
    width = max(width, max(len(t) for t in titles))
    rows = [(" " * gap).join(t.ljust(width) for t in titles)]
    for i in range(max(len(b) for b in blocks)):
        rows.append((" " * gap).join((b[i] if i < len(b) else "").ljust(width)
                                     for b in blocks))
    return "\n".join(line.rstrip() for line in rows)


def main() -> None:
    ops = []
    print(f"grid {H} x {W} = {H * W} tokens\n")
    print(f"{'pattern':<12} {'parameters':<22} {'direct keys per query':<24} "
          f"{'summary tokens':<15} reach")
    for file, name, params in CASES:
        op = attndsl.compile(file, pattern=name, H=H, W=W, **params)
        mask = op.mask()
        per_query = mask.sum(-1)
        direct = f"{per_query.min()}..{per_query.max()} (mean {per_query.float().mean():.1f})"
        summaries = op.summaries()
        n_sum = sum(int(s["attend"].sum(-1).max()) for s in summaries)
        reach = op.reach().sum(-1).float().mean()
        args = ", ".join(f"{k}={v}" for k, v in params.items())
        print(f"{name:<12} {args:<22} {direct:<24} {n_sum:<15} {reach:.1f} keys")
        ops.append((op, mask))

    for query in QUERIES:
        print(f"\nkeys of query {query} ('Q' the query, '#' attended directly):")
        print(side_by_side([op.name for op, _ in ops],
                           [neighbourhood(op, mask, query) for op, mask in ops]))

    agg = ops[-1][0]
    (pooled,) = agg.summaries()
    print(f"\nTransNeXt's {pooled['member'].shape[0]} pooled tokens (keys {pooled['keys']}, "
          f"values {pooled['values']}) cover the grid in regions of "
          f"{pooled['member'].sum(-1).tolist()} tokens; every query attends all of them.")

    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, H * W, 32) for _ in range(3))
    for op, _ in ops:
        out = op(q, k, v)
        assert out.shape == q.shape and torch.isfinite(out).all()
    print(f"attention ran for all four: out {list(q.shape)} each")


if __name__ == "__main__":
    main()
