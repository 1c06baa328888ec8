"""`attndsl cp-plan`: the per-rank balance and K/V traffic of each dispatch against ring
attention, an all-gather and Ulysses, from the block tables alone (no tensors, no
processes), for one pattern or the whole standard library at a given length.

Bytes are per rank and per layer call (forward K/V payload; the backward returns as much
dK/dV), for a model geometry given on the command line (default: 32 query heads, 8 K/V
heads, head dim 128, bf16). Ring attention and the all-gather use zigzag shards (their usual
load balancing for causal masks) and skip no transfer: every rank receives every other
rank's K/V. Ulysses shards heads: every rank attends the whole sequence for heads / ranks
heads after an all-to-all of Q, K and V (and one of the output back); it needs the heads to
divide evenly. Summary tokens (Combiner's regions, pooled tokens) add the partial pools
their owners send to the ranks attending them (`summary MiB`, float32, per query head:
distributed/summary.py); ring, all-gather and Ulysses hold every key and pool locally.
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch

from attndsl import caches
from attndsl.codegen.plan.tables import PAIR_LIMIT
from attndsl.distributed.dispatch import DISPATCHES
from attndsl.distributed.plan import problem, summary_traffic
from attndsl.errors import AttnError, PairLimitError, ParameterError, UnsupportedError
from attndsl.semantics.inputs import validate

SCHEMES = DISPATCHES + ("ring", "allgather", "ulysses")
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2, "fp64": 8}


def geometry(heads: int = 32, kv_heads: int = 8, head_dim: int = 128, dtype: str = "bf16"
             ) -> dict:
    if dtype not in DTYPE_BYTES:
        raise ParameterError(f"--dtype must be one of {', '.join(DTYPE_BYTES)}, not {dtype!r}")
    for name, x in (("heads", heads), ("kv-heads", kv_heads), ("head-dim", head_dim)):
        if not isinstance(x, int) or x < 1:
            raise ParameterError(f"--{name} must be a positive integer, not {x!r}")
    if heads % kv_heads:
        raise ParameterError(f"--heads ({heads}) must be a multiple of --kv-heads ({kv_heads})")
    size = DTYPE_BYTES[dtype]
    return {"heads": heads, "kv_heads": kv_heads, "head_dim": head_dim, "dtype": dtype,
            "kv_token_bytes": 2 * kv_heads * head_dim * size,
            "q_token_bytes": heads * head_dim * size}


def rows(op, inputs: dict, ranks: int, geo: dict, label: str | None = None) -> list[dict]:
    """One row per scheme for `op` with these run-time inputs on `ranks` ranks."""
    if not isinstance(ranks, int) or ranks < 1:
        raise ParameterError(f"--ranks must be a positive integer, not {ranks!r}")
    bp = op.bound
    for sub in bp.average or (bp,):
        for bs in sub.summaries:
            if bs.extended:
                raise UnsupportedError(
                    f"summary '{bs.summary.name}' of pattern '{sub.name}' is computed by the "
                    "driver (given keys or values, a bias, axes bound to the query, or "
                    "'queries at'): ContextParallel shards it, but cp-plan does not count "
                    "its traffic from the tables", bs.summary.span)
    run = validate(bp, inputs, for_mask=True)
    t0 = time.perf_counter()
    prob = problem(bp, op.block_q, op.block_k, run)
    cost = prob.costs()
    t1 = time.perf_counter()
    lays = {d: prob.layout(ranks, d) for d in DISPATCHES}
    t2 = time.perf_counter()
    kvb = geo["kv_token_bytes"]
    n = int(prob.block_tokens().sum())
    name = label or bp.name
    params = {k: (list(v) if isinstance(v, tuple) else v) for k, v in bp.values.items()}
    base = {"pattern": name, "params": params, "tokens": n, "ranks": ranks,
            "block": prob.block, "pairs_exact": prob.exact, "plan_seconds": round(t1 - t0, 3),
            "layout_seconds": round(t2 - t1, 3)}
    out = []

    def row(scheme, pairs, kv, held, feasible=True, other=None, note="", summary=None):
        pairs, kv = np.asarray(pairs, dtype=np.float64), np.asarray(kv, dtype=np.float64)
        summary = np.zeros(1) if summary is None else np.asarray(summary, dtype=np.float64)
        r = {**base, "scheme": scheme, "max_pairs": int(pairs.max()),
             "mean_pairs": float(pairs.mean()),
             "balance": float(pairs.max() / pairs.mean()) if pairs.mean() > 0 else 1.0,
             "max_kv_bytes": int(kv.max()), "mean_kv_bytes": float(kv.mean()),
             "max_summary_bytes": int(summary.max()),
             "mean_summary_bytes": float(summary.mean()),
             "max_tokens": int(held.max()), "min_tokens": int(held.min()),
             "feasible": feasible}
        if other is not None:
            r["mean_other_bytes"] = float(np.mean(other))
        if note:
            r["note"] = note
        out.append(r)

    # summary tokens: pooled in float32 (float64 inputs: float64), per query head
    sb = geo["heads"] * (8 if geo["dtype"] == "fp64" else 4)
    for d in DISPATCHES:
        lay = lays[d]
        _, got = summary_traffic(prob, lay.owner, ranks, geo["head_dim"], geo["head_dim"])
        row(d, lay.pairs(), lay.received() * kvb, lay.held(), summary=got * sb)
    zz = lays["zigzag"]
    full = (n - zz.held()) * kvb
    row("ring", zz.pairs(), full, zz.held())
    row("allgather", zz.pairs(), full, zz.held())
    held = zz.held()
    total = cost.sum()
    heads_ok = geo["heads"] % ranks == 0 and geo["kv_heads"] % ranks == 0
    per_head = _head_pairs(prob)
    if per_head is not None and geo["heads"] == len(per_head) and heads_ok:
        share = per_head.reshape(ranks, -1).sum(1)
    else:
        share = np.full(ranks, total / ranks)
    moved = (n - held) / ranks  # tokens of other ranks, for this rank's heads
    row("ulysses", share, moved * kvb, held, heads_ok,
        other=moved * 2 * geo["q_token_bytes"],
        note="" if heads_ok else f"needs heads and kv heads divisible by {ranks} ranks")
    return out


def _head_pairs(prob) -> np.ndarray | None:
    """Attended pairs per head of a per-head pattern (one table per head), else None."""
    if len(prob.parts) != 1 or len(prob.plan.tables) == 1:
        return None
    return np.array([prob.plan.row_needed(h).sum() for h in range(len(prob.plan.tables))])


def library(n: int) -> list[tuple]:
    """(file, pattern, parameters, run-time inputs) of every standard pattern at about n
    tokens: 1D patterns at n, 2D at a square grid, 3D at 16 frames."""
    side = max(8, int(math.isqrt(n)))
    cube = max(4, int(math.isqrt(n // 16)))
    rng = np.random.default_rng(0)
    lengths = []
    while sum(lengths) < n:  # documents of n/64 .. n/8 tokens
        lengths.append(int(rng.integers(max(1, n // 64), max(2, n // 8))))
    doc = torch.repeat_interleave(torch.arange(len(lengths)),
                                  torch.tensor(lengths))[:n].contiguous()
    span = max(16, 1 << max(4, (n.bit_length() + 1) // 2 + 2))
    return [
        ("sliding.attn", "sliding_window", dict(N=n, window=4096), {}),
        ("sliding.attn", "sliding_window", dict(N=n, window=4096, causal=False), {}),
        ("sliding.attn", "dilated_window", dict(N=n, window=512, dilation=4), {}),
        ("power.attn", "power_attention", dict(N=n), {}),
        ("power.attn", "block_sliding", dict(N=n), {}),
        ("power.attn", "block_dilated", dict(N=n), {}),
        ("power.attn", "longnet", dict(N=n), {}),
        ("power.attn", "power_strides", dict(N=n, window=64), {}),
        ("sparse_transformer.attn", "strided", dict(N=n, stride=1024), {}),
        ("sparse_transformer.attn", "fixed", dict(N=n, stride=1024, c=32), {}),
        ("neighborhood.attn", "na1d", dict(N=n, kernel=1023), {}),
        ("neighborhood.attn", "na2d", dict(H=side, W=side, kernel=13), {}),
        ("neighborhood.attn", "na3d", dict(T=16, H=cube, W=cube, kernel=5), {}),
        ("halo.attn", "halo2d", dict(H=side, W=side), {}),
        ("davit.attn", "window2d", dict(H=side, W=side), {}),
        ("transnext.attn", "aggregated_pooled", dict(H=side, W=side, pool=side // 16), {}),
        ("combiner.attn", "combiner_fixed", dict(N=n, span=span), {}),
        ("combiner.attn", "combiner_logsparse", dict(N=n), {}),
        ("combiner.attn", "combiner_axial", dict(H=side, W=side), {}),
        ("combiner.attn", "combiner_axial_pooled", dict(H=side, W=side), {}),
        ("combiner.attn", "combiner_mixture", dict(N=n, span=span), {}),
        ("document.attn", "document_causal", dict(N=n), {"doc": doc}),
        ("document.attn", "prefix_lm", dict(N=n), {"prefix": n // 4}),
        ("moh.attn", "moh", dict(N=n, heads=8, shared=2, topk=2), {}),
        ("dhsa.attn", "dhsa", dict(N=n), {}),
        ("davit.attn", "channel_group", dict(C=256, groups=4), {}),
    ]


def library_rows(n: int, ranks: int, geo: dict, only=None, progress=None,
                 block: int | None = None) -> list[dict]:
    """Rows for every standard pattern (a pattern the planner or context parallelism
    cannot take gets one row with scheme 'error' and the message). Without `block`, a
    pattern whose 64-token blocks would list more block pairs than the planner holds
    (dense and causal-dense patterns at a million tokens) is planned with 4x larger blocks,
    up to 1,024, and its rows say so."""
    import attndsl
    out = []
    for file, name, params, inputs in library(n):
        if only and name not in only:
            continue
        label = name + "".join(f" {k}={v}" for k, v in params.items()
                               if k not in {"N", "H", "W", "T"})
        t0 = time.perf_counter()
        try:
            op = attndsl.compile(file, pattern=name, **params)
            got = _rows_that_fit(op, inputs, ranks, geo, label, block)
        except AttnError as e:
            got = [{"pattern": label, "params": params, "ranks": ranks, "scheme": "error",
                    "error": e.message if hasattr(e, "message") else str(e)}]
        out.extend(got)
        caches.clear_all()  # plans at a million tokens take GBs; the next pattern needs none
        if progress is not None:
            progress(label, time.perf_counter() - t0)
    return out


def _rows_that_fit(op, inputs: dict, ranks: int, geo: dict, label: str,
                   block: int | None) -> list[dict]:
    b = block or 64
    while True:
        op.options(block_q=b, block_k=b)
        try:
            got = rows(op, inputs, ranks, geo, label)
        except PairLimitError:
            if block is not None or b >= 1024:
                raise
            b *= 4
            continue
        if b != (block or 64):
            for r in got:
                r["block_note"] = (f"64-token blocks would list more than {PAIR_LIMIT:,} "
                                   "block pairs")
        return got


def _mb(x) -> str:
    return f"{x / 2**20:,.1f}"


def table(rows_: list[dict]) -> str:
    """The rows as text: one block per pattern."""
    lines = []
    by = {}
    for r in rows_:
        by.setdefault(r["pattern"], []).append(r)
    for name, rs in by.items():
        if rs[0]["scheme"] == "error":
            lines.append(f"{name}: not planned: {rs[0]['error']}")
            lines.append("")
            continue
        r0 = rs[0]
        ring = next(r for r in rs if r["scheme"] == "ring")
        lines.append(f"{name}: {r0['tokens']:,} tokens, {r0['ranks']} ranks, blocks of "
                     f"{r0['block']} (tables {r0['plan_seconds']:.2f} s, layouts "
                     f"{r0['layout_seconds']:.2f} s)"
                     + ("" if r0.get("pairs_exact", True) else
                        "; pairs of PARTIAL blocks estimated from a sample")
                     + (f"; {r0['block_note']}" if r0.get("block_note") else ""))
        summ = any(r.get("mean_summary_bytes") for r in rs)
        lines.append(f"  {'scheme':<11}{'max/mean pairs':>15}{'max pairs':>16}"
                     f"{'max KV MiB':>12}{'mean KV MiB':>13}"
                     + (f"{'summary MiB':>13}" if summ else "")
                     + f"{'vs ring':>9}  tokens/rank")
        for r in rs:
            moved = r["mean_kv_bytes"] + r.get("mean_summary_bytes", 0)
            vs = moved / ring["mean_kv_bytes"] if ring["mean_kv_bytes"] else 0
            extra = "" if r.get("feasible", True) else f"  ({r['note']})"
            if r["scheme"] == "ulysses" and r.get("mean_other_bytes"):
                extra += f"  (+{_mb(r['mean_other_bytes'])} MiB of Q and output)"
            lines.append(f"  {r['scheme']:<11}{r['balance']:>15.3f}{r['max_pairs']:>16,}"
                         f"{_mb(r['max_kv_bytes']):>12}{_mb(r['mean_kv_bytes']):>13}"
                         + (f"{_mb(r.get('mean_summary_bytes', 0)):>13}" if summ else "")
                         + f"{vs:>8.1%}  {r['min_tokens']:,}..{r['max_tokens']:,}{extra}")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"
