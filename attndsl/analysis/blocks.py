"""Block classification of a bound pattern without its dense mask.

The abstract interpreter (intervals.py) proves boxes of (query, key) pairs FULL or EMPTY;
what it cannot decide is split (quadtree) and, below a minimum size, evaluated exactly.
The result is exact: a list of FULL rectangles plus small dense tiles for the rest.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from attndsl.analysis.intervals import (
    BV,
    FULL,
    IV,
    PARTIAL,
    AbstractEvaluator,
    Unknown,
    classify,
    exact,
    token_box,
)
from attndsl.semantics import rules
from attndsl.semantics.bind import BoundPattern, bind_cached, call_values
from attndsl.semantics.inputs import NONE, RunInputs
from attndsl.semantics.masks import chunks, token_mask


class _AbsHooks:
    """Pattern calls inside a rule, interpreted on the same boxes."""

    def __init__(self, run: RunInputs):
        self.run = run

    def pattern(self, ev, call, local):
        def value(a):
            v = ev.eval(a, local)
            if not exact(v):
                raise Unknown("pattern argument")
            return int(np.asarray(v.lo).reshape(-1)[0])
        sub = bind_cached(call.callee, call_values(call.callee, call, value))
        return abstract_predicate(sub, ev.ctx, self.run, ev.diff)


class _BoxDomain:
    """rules.combine over (may-true, may-false) pairs; `h` the head interval."""

    def __init__(self, h):
        self.h = h

    def false(self):
        return BV(np.asarray(False), np.asarray(True))

    def union(self, a, b):
        return BV(a.t | b.t, a.f & b.f)

    def intersect(self, a, b):
        return BV(a.t & b.t, a.f | b.f)

    def minus(self, a, b):
        return BV(a.t & b.f, a.f | b.t)

    def in_heads(self, lo, hi):
        h = self.h
        return BV((h.hi >= lo) & (h.lo < hi), (h.lo < lo) | (h.hi >= hi))

    def not_in_heads(self, lo, hi):
        x = self.in_heads(lo, hi)
        return BV(x.f, x.t)


def abstract_predicate(bp: BoundPattern, ctx: dict, run: RunInputs = NONE, diff=None) -> BV:
    """The (may-true, may-false) of the direct mask over the boxes in ctx."""
    evaluators: dict = {}

    def value(owner, rule):
        got = evaluators.get(id(owner))
        if got is None:
            ev = AbstractEvaluator({**owner.env, **run.env}, ctx, _AbsHooks(run), diff)
            local = {}
            for let in owner.checked.lets:  # in order: each let sees the earlier ones
                if let.name in owner.env and let.value.ty.static:
                    continue
                try:
                    local[let.name] = ev.eval(let.value, local)
                except Unknown:
                    pass  # only an error if a rule uses it
            got = evaluators[id(owner)] = (ev, local)
        ev, local = got
        return ev.eval(rule.expr, local)

    return rules.combine(bp.rules, value, _BoxDomain(ctx.get("h")))


def classify_boxes(bp: BoundPattern, q0, q1, k0, k1, head=None, dlo=None, dhi=None,
                   run: RunInputs = NONE) -> np.ndarray:
    """EMPTY/PARTIAL/FULL for boxes q in [q0, q1], k in [k0, k1] (inclusive, arrays).

    With dlo/dhi, only the part of each box where dlo <= q - k <= dhi is classified."""
    qbox = token_box(q0, q1, bp.qshape, bp.checked.qspace.axes, "q")
    kbox = token_box(k0, k1, bp.kshape, bp.checked.kspace.axes, "k")
    return classify_token_boxes(
        bp, qbox, kbox, np.asarray(q0) - np.asarray(k1) if dlo is None else dlo,
        np.asarray(q1) - np.asarray(k0) if dhi is None else dhi, head, run)


def classify_token_boxes(bp: BoundPattern, qbox, kbox, dlo, dhi, head=None,
                         run: RunInputs = NONE) -> np.ndarray:
    """EMPTY/PARTIAL/FULL for boxes of query and key tokens given per axis (TokIV), where
    q - k (flat indices) lies in [dlo, dhi]."""
    shape = np.broadcast(np.asarray(qbox.index.lo), np.asarray(kbox.index.lo)).shape
    ctx = {"q": qbox, "k": kbox}
    if head is not None:
        h = np.asarray(head, dtype=np.int64)
        ctx["h"] = IV(h, h)
    try:
        with np.errstate(all="ignore"):
            return np.broadcast_to(classify(abstract_predicate(bp, ctx, run, (dlo, dhi))),
                                   shape)
    except (Unknown, FloatingPointError, OverflowError, ValueError, ZeroDivisionError):
        return np.full(shape, PARTIAL, dtype=np.int8)


def diagonal_split(bp: BoundPattern, q0, q1, k0, k1, head=None, run: RunInputs = NONE):
    """For each box, a threshold c with the part q - k >= c uniform one way and q - k < c
    uniform the other (a causal diagonal, a window edge), or c = None.

    Returns (c, lower_class, upper_class) arrays; c is -2**62 where no threshold exists."""
    dlo, dhi = q0 - k1, q1 - k0
    none = np.full(q0.shape, -(1 << 62), dtype=np.int64)
    if not len(q0):
        return none, none.astype(np.int8), none.astype(np.int8)
    top = classify_boxes(bp, q0, q1, k0, k1, head, dhi, dhi, run)
    bottom = classify_boxes(bp, q0, q1, k0, k1, head, dlo, dlo, run)
    cand = (top != PARTIAL) & (bottom != PARTIAL) & (top != bottom) & (dhi > dlo)
    idx = np.nonzero(cand)[0]
    if not len(idx):
        return none, none.astype(np.int8), none.astype(np.int8)
    a0, a1, b0, b1 = q0[idx], q1[idx], k0[idx], k1[idx]
    lo, hi = dlo[idx] + 1, dhi[idx]  # smallest c in [lo, hi] with d >= c uniform
    want = top[idx]
    while True:
        open_ = lo < hi
        if not open_.any():
            break
        mid = (lo + hi) // 2
        cls = classify_boxes(bp, a0, a1, b0, b1, head, mid, dhi[idx], run)
        ok = cls == want
        hi = np.where(open_ & ok, mid, hi)
        lo = np.where(open_ & ~ok, mid + 1, lo)
    below = classify_boxes(bp, a0, a1, b0, b1, head, dlo[idx], lo - 1, run)
    good = below == bottom[idx]
    c = none.copy()
    lower = np.zeros(q0.shape, dtype=np.int8)
    upper = np.zeros(q0.shape, dtype=np.int8)
    c[idx[good]] = lo[good]
    lower[idx[good]] = want[good]
    upper[idx[good]] = bottom[idx][good]
    return c, lower, upper


def dense_tiles(bp: BoundPattern, q0, k0, bq: int, bk: int, head=None,
                run: RunInputs = NONE):
    """Exact masks of tiles starting at (q0[i], k0[i]): bool [T, bq, bk] (out of range False).

    Per-head and per-batch masks (content-dependent patterns) are reduced to their union."""
    q0 = torch.as_tensor(np.asarray(q0), dtype=torch.int64).view(-1, 1, 1)
    k0 = torch.as_tensor(np.asarray(k0), dtype=torch.int64).view(-1, 1, 1)
    out = np.zeros((q0.shape[0], bq, bk), dtype=bool)
    h = None if head is None else torch.tensor(head)
    for t0, t1 in chunks(q0.shape[0], bq * bk):
        qi = q0[t0:t1] + torch.arange(bq).view(1, -1, 1)
        ki = k0[t0:t1] + torch.arange(bk).view(1, 1, -1)
        valid = (qi < bp.nq) & (ki < bp.nk)
        qc, kc = qi.clamp(max=bp.nq - 1), ki.clamp(max=bp.nk - 1)
        val = token_mask(bp, run, qc, kc, h)
        out[t0:t1] = (val.expand(valid.shape) & valid).numpy()
    return out


def _sum_clip(lo_x, hi_x, width):
    """sum of clip(x, 0, width) for integer x in [lo_x, hi_x] (elementwise, inclusive)."""
    def tri(n):  # sum of clip(x, 0, width) for x in [.., n] with x <= n, as a prefix
        n = np.asarray(n, dtype=np.int64)
        a = np.clip(n, 0, width)
        s = a * (a + 1) // 2
        return s + np.maximum(n - width, 0) * width
    return np.where(hi_x >= lo_x, tri(hi_x) - tri(lo_x - 1), 0)


def diag_pairs(d: np.ndarray) -> np.ndarray:
    """Attended pairs of diagonal leaves [n, 7]: q0, q1, k0, k1, c, lower, upper."""
    if not len(d):
        return np.zeros(0, dtype=np.int64)
    q0, q1, k0, k1, c, lower, _ = d.T
    w = k1 - k0 + 1
    # pairs with q - k >= c: per row q, keys k0 .. min(k1, q - c): clip(q - c - k0 + 1, 0, w)
    below = _sum_clip(q0 - c - k0 + 1, q1 - c - k0 + 1, w)
    total = (q1 - q0 + 1) * w
    return np.where(lower == FULL, below, total - below)


@dataclass(frozen=True)
class Decomposition:
    """The exact mask as FULL rectangles and dense PARTIAL tiles (inclusive bounds)."""

    nq: int
    nk: int
    full: np.ndarray  # [F, 4] q0, q1, k0, k1
    tiles: np.ndarray  # [T, 2] q0, k0 of tiles of size tile x tile
    tile_masks: np.ndarray  # [T, tile, tile] bool
    tile: int
    boxes_evaluated: int
    diag: np.ndarray = None  # [G, 7] q0, q1, k0, k1, c, lower, upper: split at q - k = c

    @property
    def nnz(self) -> int:
        f = self.full
        n = int(((f[:, 1] - f[:, 0] + 1) * (f[:, 3] - f[:, 2] + 1)).sum()) if len(f) else 0
        return n + int(self.tile_masks.sum()) + int(diag_pairs(self.diag).sum())

    def dense(self) -> np.ndarray:
        m = np.zeros((self.nq, self.nk), dtype=bool)
        for q0, q1, k0, k1 in self.full:
            m[q0:q1 + 1, k0:k1 + 1] = True
        for q0, q1, k0, k1, c, lower, _ in self.diag:
            qq = np.arange(q0, q1 + 1)[:, None]
            kk = np.arange(k0, k1 + 1)[None, :]
            part = (qq - kk >= c) if lower == FULL else (qq - kk < c)
            m[q0:q1 + 1, k0:k1 + 1] |= part
        t = self.tile
        for (q0, k0), tm in zip(self.tiles, self.tile_masks):
            hq, hk = min(t, self.nq - q0), min(t, self.nk - k0)
            m[q0:q0 + hq, k0:k0 + hk] |= tm[:hq, :hk]
        return m


def decompose(bp: BoundPattern, tile: int = 16, head=None, run: RunInputs = NONE,
              max_boxes: int = 50_000_000) -> Decomposition:
    """Quadtree refinement of [0, Nq) x [0, Nk), exact at the leaves.

    Boxes the abstract interpreter decides become FULL rectangles (EMPTY ones vanish); the
    rest split in four until `tile` x `tile`, where the mask is evaluated exactly.
    """
    nq, nk = bp.nq, bp.nk
    top = 1 << max(0, math.ceil(math.log2(max(nq, nk, 1))))
    s = max(tile, min(top, 1 << max(0, math.ceil(math.log2(max(nq, nk) / 64)))))
    q0, k0 = np.meshgrid(np.arange(0, nq, s, dtype=np.int64),
                         np.arange(0, nk, s, dtype=np.int64), indexing="ij")
    q0, k0 = q0.reshape(-1), k0.reshape(-1)
    full, tiles, tile_masks, diag = [], [], [], []
    evaluated = 0
    while len(q0):
        q1 = np.minimum(q0 + s, nq) - 1
        k1 = np.minimum(k0 + s, nk) - 1
        cls = np.broadcast_to(classify_boxes(bp, q0, q1, k0, k1, head, run=run), q0.shape)
        evaluated += len(q0)
        if evaluated > max_boxes:
            from attndsl.errors import SizeLimitError
            raise SizeLimitError(f"pattern '{bp.name}' needs more than {max_boxes:,} boxes to "
                                 "decompose exactly at this size", bp.checked.span)
        f = cls == FULL
        if f.any():
            full.append(np.stack([q0[f], q1[f], k0[f], k1[f]], axis=1))
        p = cls == PARTIAL
        q0, q1, k0, k1 = q0[p], q1[p], k0[p], k1[p]
        if len(q0) and bp.nq == bp.nk and len(bp.qshape) == 1:
            c, lower, upper = diagonal_split(bp, q0, q1, k0, k1, head, run)
            g = c > -(1 << 62)
            if g.any():
                diag.append(np.stack([q0[g], q1[g], k0[g], k1[g], c[g], lower[g], upper[g]],
                                     axis=1))
                q0, q1, k0, k1 = q0[~g], q1[~g], k0[~g], k1[~g]
        if s <= tile:
            if len(q0):
                tm = dense_tiles(bp, q0, k0, s, s, head, run)
                keep = tm.any(axis=(1, 2))
                tiles.append(np.stack([q0[keep], k0[keep]], axis=1))
                tile_masks.append(tm[keep])
            break
        h = s // 2
        q0 = np.concatenate([q0, q0, q0 + h, q0 + h])
        k0 = np.concatenate([k0, k0 + h, k0, k0 + h])
        ok = (q0 < nq) & (k0 < nk)
        q0, k0 = q0[ok], k0[ok]
        s = h
    return Decomposition(
        nq, nk,
        np.concatenate(full) if full else np.zeros((0, 4), dtype=np.int64),
        np.concatenate(tiles) if tiles else np.zeros((0, 2), dtype=np.int64),
        np.concatenate(tile_masks) if tile_masks else np.zeros((0, tile, tile), dtype=bool),
        tile, evaluated,
        np.concatenate(diag) if diag else np.zeros((0, 7), dtype=np.int64))
