"""Block reasoning on a bound pattern without its dense mask: the one refinement engine.

The abstract interpreter (intervals.py) proves boxes of (query, key) pairs FULL or EMPTY.
`refine` walks pyramids of token groups top-down, keeps what it proves and splits the rest;
1D boxes cut by one diagonal become DiagLeaves. Two clients: `decompose` (the analysis:
FULL rectangles, diagonal leaves and small dense tiles over row-major tokens) and the
planner (codegen/plan/tables.py: block tables over any token order).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import numpy as np
import torch

from attndsl.analysis.intervals import (
    BV,
    FULL,
    FV,
    IV,
    PARTIAL,
    AbstractEvaluator,
    Deferred,
    TokIV,
    Unknown,
    classify,
    exact,
    token_box,
)
from attndsl.errors import PairLimitError, SizeLimitError
from attndsl.lang import ir
from attndsl.lang.walk import children
from attndsl.semantics import rules
from attndsl.semantics.bind import BoundPattern, bind_cached, call_values
from attndsl.semantics.evaluate import unravel
from attndsl.semantics.inputs import NONE, SELECTED, UNSELECTED, RunInputs
from attndsl.semantics.masks import chunks, token_mask


class AbstractHooks:
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

    def dynamic(self, call) -> BV:
        """A content selection: false everywhere when the run says it keeps nothing, true
        when it says it keeps everything."""
        c = self.run.content
        return BV(np.asarray(c is not UNSELECTED), np.asarray(c is not SELECTED))


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


@dataclass(frozen=True)
class QueryGroups:
    """The distinct query groups of a batch of boxes: `box` (TokIV, one entry a group) and
    `sel`, each box's group. A let that reads only the query (a hashed random block, a
    query's block) is evaluated once a group, not once a box, then spread with `sel`: a
    query group meets ~10 key groups in a BigBird-style refinement."""

    box: TokIV
    sel: np.ndarray


def _reads(e: ir.Expr, known: dict, bound: frozenset = frozenset()):
    """What e reads, for evaluating it once a query group: "q" (the query, with constants,
    run-time inputs and the lets `known` to read only the query), None (only constants)
    or False (anything else: k, h, summary tokens, pattern calls, content-dependent
    selections, a let known to read them, or a name bound outside e that is not a known
    let). `known`: let name -> what it reads (None: a static value). `bound`: the names
    that e's own let-expressions and function calls bind."""
    if isinstance(e, ir.Name):
        if e.ref == "q":
            return "q"
        if e.ref in ("k", "h", "summary"):
            return False
        if e.ref == "local" and e.id not in bound:
            return known.get(e.id, False)
        return None
    if isinstance(e, ir.Call):
        if e.ref in ("pattern", "dynamic"):
            return False
        if e.ref == "fn":  # its body reads its parameters, which the arguments give
            got = [_reads(a, known, bound) for a in e.args]
            got.append(_reads(e.body, known, frozenset(e.params)))
            return _join(got)
    if isinstance(e, ir.LetExpr):
        return _join([_reads(e.value, known, bound),
                      _reads(e.body, known, bound | {e.name})])
    return _join([_reads(x, known, bound) for x in children(e)])


def _join(reads: list):
    if False in reads:
        return False
    return "q" if "q" in reads else None


def _query_only(e: ir.Expr, known: dict) -> bool:
    """Whether e reads the query and nothing but constants, run-time inputs and the
    query-only lets in `known`."""
    return _reads(e, known) == "q"


def _hoist(e: ir.Expr, known: dict, found: list) -> None:
    """The largest sub-expressions of e that read only the query (not bare names: those
    cost nothing to look up), outermost first."""
    if isinstance(e, ir.Name | ir.IntLit | ir.FloatLit | ir.BoolLit):
        return
    if _query_only(e, known):
        found.append(e)
    elif isinstance(e, ir.LetExpr):  # its name, in its body, is not a query-only let's
        _hoist(e.value, known, found)
        _hoist(e.body, {**known, e.name: False}, found)
    else:
        for x in children(e):
            _hoist(x, known, found)


def _dynamic_lets(owner: BoundPattern):
    """The owner's lets that are not static values (those are in its env already)."""
    return [let for let in owner.checked.lets
            if not (let.name in owner.env and let.value.ty.static)]


def _let_reads(owner: BoundPattern) -> dict:
    """Let name -> what it reads (_reads; None for a static value): in order, each sees
    the earlier ones."""
    known: dict = {let.name: None for let in owner.checked.lets
                   if let.name in owner.env and let.value.ty.static}
    for let in _dynamic_lets(owner):
        known[let.name] = "q" if _query_only(let.value, known) else False
    return known


def _reads_query_alone(owner: BoundPattern) -> bool:
    """Whether some of the owner's work reads only the query (a let, or a part of a let or a
    rule that _PerGroup.hoist would take): only then do its pairs' query groups pay."""
    known = _let_reads(owner)
    if "q" in known.values():
        return True
    found: list = []
    for let in _dynamic_lets(owner):
        _hoist(let.value, known, found)
    for rule in owner.checked.rules:
        _hoist(rule.expr, known, found)
    return bool(found)


def _spread(v, sel: np.ndarray):
    """A value computed once a query group, for every box (QueryGroups.sel)."""
    def take(a):
        a = np.asarray(a)
        return a if a.ndim == 0 else a[sel]

    if isinstance(v, tuple):
        return tuple(_spread(x, sel) for x in v)
    if isinstance(v, IV):  # a point per group (a hashed block) is spread once
        lo = take(v.lo)
        one = v.hi is v.lo or np.array_equal(v.lo, v.hi)
        return IV(lo, lo if one else take(v.hi), v.tag)
    if isinstance(v, BV):
        return BV(take(v.t), take(v.f))
    if isinstance(v, FV):
        return FV(take(v.lo), take(v.hi))
    if isinstance(v, TokIV):
        return TokIV(_spread(v.index, sel), _spread(v.pos, sel), v.shape, v.axes)
    raise Unknown("spread")


def abstract_lets(owner: BoundPattern, ev: AbstractEvaluator, per: _PerGroup | None = None
                  ) -> dict:
    """The owner's lets that are not static values, on `ev`'s boxes (in order: each sees
    the earlier ones; one the domain cannot model is an error only where a rule reads it).
    With `per`, what reads only the query (a let, or the largest such parts of the other
    lets and, later, of the rules: _PerGroup.hoist) is evaluated once a query group."""
    local: dict = {}
    if per is not None:
        per.known = _let_reads(owner)
    for let in _dynamic_lets(owner):
        if per is not None:
            if per.known[let.name] == "q" and per.let(let, local):
                continue
            per.known[let.name] = False
            per.hoist(let.value)
        try:
            local[let.name] = ev.eval(let.value, local)
        except Unknown:
            pass
    return local


class _PerGroup:
    """One owner's query-only work on a batch of boxes, done once a query group and spread
    to the boxes (QueryGroups): the values go into the box evaluator's `hoisted`."""

    def __init__(self, ev: AbstractEvaluator, groups: QueryGroups):
        self.ev, self.sel = ev, groups.sel
        self.gev = AbstractEvaluator(ev.env, {"q": groups.box}, ev.hooks, None)
        self.values: dict = {}  # the query-only lets, one entry a group
        self.known: dict = {}  # let name -> what it reads (_reads), set by abstract_lets

    def let(self, let: ir.LetStmt, local: dict) -> bool:
        """Evaluate a query-only let once a group (spread when a box reads it); False when
        the domain cannot (it is then evaluated as any other let)."""
        try:
            v = self.gev.eval(let.value, self.values)
        except Unknown:
            return False
        self.values[let.name] = v
        local[let.name] = Deferred(lambda: _spread(v, self.sel))
        return True

    def hoist(self, e: ir.Expr) -> None:
        """The largest parts of e that read only the query, evaluated once a group: a
        hashed random block ((h >> 11) % nb) costs its arithmetic per query group, not per
        box, and its inputs are never spread."""
        found: list = []
        _hoist(e, self.known, found)
        for x in found:
            if id(x) in self.ev.hoisted:
                continue
            try:
                v = self.gev.eval(x, self.values)
            except Unknown:
                continue  # evaluated on the boxes, where it fails (or not) as before
            self.ev.hoisted[id(x)] = (x, _spread(v, self.sel))


def abstract_predicate(bp: BoundPattern, ctx: dict, run: RunInputs = NONE, diff=None,
                       groups: QueryGroups | None = None) -> BV:
    """The (may-true, may-false) of the direct mask over the boxes in ctx (`groups`: their
    distinct query groups, QueryGroups)."""
    evaluators: dict = {}

    def value(owner, rule):
        got = evaluators.get(id(owner))
        if got is None:
            ev = AbstractEvaluator({**owner.env, **run.env}, ctx, AbstractHooks(run), diff)
            per = _PerGroup(ev, groups) if groups is not None else None
            got = evaluators[id(owner)] = (ev, abstract_lets(owner, ev, per), per)
        ev, local, per = got
        if per is not None:
            per.hoist(rule.expr)
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
                         run: RunInputs = NONE, groups: QueryGroups | None = None
                         ) -> np.ndarray:
    """EMPTY/PARTIAL/FULL for boxes of query and key tokens given per axis (TokIV), where
    q - k (flat indices) lies in [dlo, dhi] (`groups`: the boxes' distinct query groups)."""
    shape = np.broadcast(np.asarray(qbox.index.lo), np.asarray(kbox.index.lo)).shape
    ctx = {"q": qbox, "k": kbox}
    if head is not None:
        h = np.asarray(head, dtype=np.int64)
        ctx["h"] = IV(h, h)
    try:
        with np.errstate(all="ignore"):
            return np.broadcast_to(
                classify(abstract_predicate(bp, ctx, run, (dlo, dhi), groups)), shape)
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


TILE_ELEMS = 1 << 21  # mask elements per evaluation in dense_tiles (as before the redesign)


def dense_tiles(bp: BoundPattern, q0, k0, bq: int, bk: int, head=None,
                run: RunInputs = NONE):
    """Exact masks of tiles starting at (q0[i], k0[i]): bool [T, bq, bk] (out of range False).

    Per-head and per-batch masks (content-dependent patterns) are reduced to their union."""
    q0 = torch.as_tensor(np.asarray(q0), dtype=torch.int64).view(-1, 1, 1)
    k0 = torch.as_tensor(np.asarray(k0), dtype=torch.int64).view(-1, 1, 1)
    out = np.zeros((q0.shape[0], bq, bk), dtype=bool)
    h = None if head is None else torch.tensor(head)
    for t0, t1 in chunks(q0.shape[0], bq * bk, TILE_ELEMS):
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


# ------------------------------------------------------------------ diagonal leaves


@dataclass(frozen=True, eq=False)
class DiagLeaves:
    """Boxes [q0, q1] x [k0, k1] (flat indices, inclusive) cut by one diagonal: the pairs
    with q - k >= c are all `lower` (FULL or EMPTY), those with q - k < c all `upper`. Found
    by diagonal_split on 1D patterns: causal edges and window edges."""

    q0: np.ndarray
    q1: np.ndarray
    k0: np.ndarray
    k1: np.ndarray
    c: np.ndarray
    lower: np.ndarray
    upper: np.ndarray

    @staticmethod
    def empty() -> DiagLeaves:
        z = np.zeros(0, dtype=np.int64)
        return DiagLeaves(z, z, z, z, z, z.astype(np.int8), z.astype(np.int8))

    @staticmethod
    def concat(parts) -> DiagLeaves:
        parts = [p for p in parts if len(p)]
        if not parts:
            return DiagLeaves.empty()
        return DiagLeaves(*(np.concatenate([getattr(p, f) for p in parts])
                            for f in ("q0", "q1", "k0", "k1", "c", "lower", "upper")))

    def __len__(self) -> int:
        return len(self.q0)

    def pairs(self) -> np.ndarray:
        """Attended pairs of each leaf."""
        if not len(self):
            return np.zeros(0, dtype=np.int64)
        w = self.k1 - self.k0 + 1
        # pairs with q - k >= c: per row q, keys k0 .. min(k1, q - c)
        below = _sum_clip(self.q0 - self.c - self.k0 + 1, self.q1 - self.c - self.k0 + 1, w)
        total = (self.q1 - self.q0 + 1) * w
        return np.where(self.lower == FULL, below, total - below)

    def paint(self, rows, q_start: int) -> None:
        """OR every leaf's attended pairs into rows [Q, Nk] (a numpy array or tensor) holding
        queries q_start .. q_start + Q - 1."""
        q_end = q_start + rows.shape[0]
        tensor = isinstance(rows, torch.Tensor)
        for i in range(len(self)):
            lo, hi = max(int(self.q0[i]), q_start), min(int(self.q1[i]) + 1, q_end)
            if lo >= hi:
                continue
            k0, k1, c = int(self.k0[i]), int(self.k1[i]), int(self.c[i])
            qq = np.arange(lo, hi)[:, None]
            kk = np.arange(k0, k1 + 1)[None, :]
            part = (qq - kk >= c) if self.lower[i] == FULL else (qq - kk < c)
            rows[lo - q_start:hi - q_start, k0:k1 + 1] |= (torch.from_numpy(part) if tensor
                                                             else part)

    def attends_above_diagonal(self) -> bool:
        """Whether some leaf attends a key after its query (k > q)."""
        for i in range(len(self)):
            q0, q1, k0, k1, c = (int(x[i]) for x in (self.q0, self.q1, self.k0, self.k1,
                                                     self.c))
            # attended k > q inside the box: below the cut (k <= q - c) only when c < 0
            if self.lower[i] == FULL and c < 0 and max(q0, k0 + c) <= min(q1, k1 - 1):
                return True
            if self.lower[i] != FULL and max(q0 + 1, q0 - c + 1) <= k1:
                return True
        return False

    def reached(self, first_in_box, last_in_box):
        """For each leaf, the keys [start, end] a query set reaches through it and whether it
        reaches any: the lower part (q - k >= c) reaches keys k0 .. min(k1, m - c) from the
        set's last query m <= q1; the upper part keys max(k0, f - c + 1) .. k1 from its first
        query f >= q0. numpy or torch arrays, broadcast over leading query-set axes."""
        xp = torch if isinstance(first_in_box, torch.Tensor) else np
        q0, q1, k0, k1, c = (xp.as_tensor(x) if xp is torch else x
                             for x in (self.q0, self.q1, self.k0, self.k1, self.c))
        low = (torch.as_tensor(self.lower) if xp is torch else self.lower) == FULL
        m, f = last_in_box, first_in_box
        start = xp.where(low, k0 + 0 * m, xp.maximum(k0, f - c + 1))
        end = xp.where(low, xp.minimum(k1, m - c), k1 + 0 * f)
        hit = xp.where(low, m >= q0, f <= q1) & (end >= start)
        return start, end, hit


# ------------------------------------------------------------------ groups of tokens


BIG = np.int64(1 << 62)
TOP_GROUPS = 64  # groups per side where the quadtree starts
JUDGE_CHUNK = 1 << 18  # boxes a judge classifies in one call of the abstract interpreter
PROBE_SAMPLE = 1024  # pairs probed first when more are eligible ...
PROBE_WORTH = 1 / 16  # ... and the share of one-sided splits in them that makes the rest worth it


@dataclass(frozen=True, eq=False)
class Bounds:
    """Per group of token positions (a block, or neighbouring blocks merged): per-axis
    coordinate ranges, flat-index range, valid tokens, positions (valid or padding)."""

    lo: np.ndarray  # [G, axes]
    hi: np.ndarray
    flo: np.ndarray  # [G]
    fhi: np.ndarray
    count: np.ndarray
    size: np.ndarray

    def __len__(self) -> int:
        return len(self.count)

    @staticmethod
    def concat(parts) -> Bounds:
        return Bounds(*(np.concatenate([getattr(p, n) for p in parts])
                        for n in ("lo", "hi", "flo", "fhi", "count", "size")))

    def take(self, idx) -> Bounds:
        return Bounds(self.lo[idx], self.hi[idx], self.flo[idx], self.fhi[idx],
                      self.count[idx], self.size[idx])

    def coarser(self) -> Bounds:
        """Pairs of neighbouring groups merged (odd tail kept)."""
        n = len(self)
        a = np.arange(0, n, 2)
        b = np.minimum(a + 1, n - 1)
        two = b != a
        return Bounds(np.minimum(self.lo[a], self.lo[b]), np.maximum(self.hi[a], self.hi[b]),
                      np.minimum(self.flo[a], self.flo[b]),
                      np.maximum(self.fhi[a], self.fhi[b]),
                      self.count[a] + np.where(two, self.count[b], 0),
                      self.size[a] + np.where(two, self.size[b], 0))

    def pyramid(self) -> list[Bounds]:
        """This level and coarser ones until at most TOP_GROUPS groups are left."""
        levels = [self]
        while len(levels[-1]) > TOP_GROUPS:
            levels.append(levels[-1].coarser())
        return levels

    def box(self, shape, axes, role) -> TokIV:
        """The groups as boxes for the abstract interpreter (1D: tagged with the role, so
        that q - k keeps its exact range)."""
        if len(shape) == 1:
            iv = IV(self.flo, self.fhi, (role, 0))
            return TokIV(iv, (iv,), tuple(shape), axes)
        pos = tuple(IV(self.lo[:, a], self.hi[:, a]) for a in range(len(shape)))
        return TokIV(IV(self.flo, self.fhi), pos, tuple(shape), axes)


def bounds(perm: np.ndarray, shape: tuple[int, ...]) -> Bounds:
    """Bounds of blocks of positions: perm [blocks, block] holds the row-major token at each
    position, -1 for padding."""
    valid = perm >= 0
    coords = unravel(np.where(valid, perm, 0), shape)
    lo = np.stack([np.where(valid, c, BIG).min(axis=1) for c in coords], axis=1)
    hi = np.stack([np.where(valid, c, -BIG).max(axis=1) for c in coords], axis=1)
    flo = np.where(valid, perm, BIG).min(axis=1)
    fhi = np.where(valid, perm, -BIG).max(axis=1)
    size = np.full(len(perm), perm.shape[1])  # positions a kernel loads, past the end included
    return Bounds(lo, hi, flo, fhi, valid.sum(axis=1), size)


class RowMajorLevel:
    """Level `level` of the pyramid of row-major tokens start .. start + n - 1 in blocks of
    `block` (the last block padded), in closed form: group g holds the 2**level consecutive
    blocks from g * 2**level on, one flat range. `take` computes only the groups asked for
    (a refinement touches few of a long sequence's groups); the whole level, as Bounds
    attributes, is built the first time one is read."""

    def __init__(self, shape: tuple[int, ...], block: int, start: int, n: int, level: int):
        self.shape, self.block, self.start, self.n, self.span = shape, block, start, n, 1 << level
        self.nb = -(-n // block)

    def __len__(self) -> int:
        return -(-self.nb // self.span)

    def take(self, g) -> Bounds:
        if isinstance(g, slice):
            g = np.arange(len(self), dtype=np.int64)[g]
        g = np.asarray(g)
        g = np.nonzero(g)[0] if g.dtype == bool else g.astype(np.int64, copy=False)
        span, block = self.span, self.block
        flo = self.start + g * span * block
        fhi = np.minimum(flo + span * block, self.start + self.n) - 1
        size = (np.minimum((g + 1) * span, self.nb) - g * span) * block
        if len(self.shape) == 1:
            lo, hi = flo[:, None], fhi[:, None]
        else:
            box = token_box(flo, fhi, self.shape, tuple(range(len(self.shape))))
            lo = np.stack([np.broadcast_to(p.lo, flo.shape) for p in box.pos], axis=1)
            hi = np.stack([np.broadcast_to(p.hi, flo.shape) for p in box.pos], axis=1)
        return Bounds(lo, hi, flo, fhi, fhi - flo + 1, size)

    @functools.cached_property
    def _all(self) -> Bounds:
        return self.take(slice(None))

    lo = property(lambda self: self._all.lo)
    hi = property(lambda self: self._all.hi)
    flo = property(lambda self: self._all.flo)
    fhi = property(lambda self: self._all.fhi)
    count = property(lambda self: self._all.count)
    size = property(lambda self: self._all.size)


def row_major(shape: tuple[int, ...], block: int, start: int = 0,
              count: int | None = None) -> list[RowMajorLevel]:
    """The pyramid of row-major tokens start .. start + count - 1 (all by default) in blocks
    of `block`, up to the first level of at most TOP_GROUPS groups."""
    n = math.prod(shape) - start if count is None else count
    levels = [RowMajorLevel(tuple(shape), block, start, n, 0)]
    while len(levels[-1]) > TOP_GROUPS:
        levels.append(RowMajorLevel(tuple(shape), block, start, n, len(levels)))
    return levels


# ------------------------------------------------------------------ the refinement


@dataclass(frozen=True, eq=False)
class Refinement:
    """What the quadtree decided: FULL group pairs at their level, diagonal leaves, and the
    leaf pairs (level 0) it could not decide."""

    full: tuple  # (level_q, level_k, gi, gj) per batch of FULL group pairs
    diag: DiagLeaves
    diag_at: tuple  # (level_q, level_k, gi, gj) of each batch of diagonal leaves
    undecided: tuple  # (gi, gj) leaf pairs
    evaluated: int


class PatternJudge:
    """Classifies pairs of groups (Bounds) of query and key tokens for a pattern's direct
    mask: refine's default. Another judge (a summary's member or attend rule,
    codegen/plan/summary.py) gives `qshape`, `kshape` and the same call."""

    def __init__(self, bp: BoundPattern, head, run: RunInputs):
        self.bp, self.head, self.run = bp, head, run
        self.qshape, self.kshape = bp.qshape, bp.kshape
        # takes the pairs' distinct query groups (refine passes them) where something reads
        # only the query: elsewhere finding the groups would be work for nothing
        self.grouped = _reads_query_alone(bp)

    def __call__(self, qb: Bounds, kb: Bounds, groups: tuple | None = None) -> np.ndarray:
        """groups: (the distinct query groups as Bounds, each pair's group among them)."""
        n = len(qb)
        if n > JUDGE_CHUNK:
            out = np.empty(n, dtype=np.int8)
            for a in range(0, n, JUDGE_CHUNK):
                at = slice(a, a + JUDGE_CHUNK)
                out[at] = self(qb.take(at), kb.take(at),
                               None if groups is None else (groups[0], groups[1][at]))
            return out
        bp = self.bp
        axes = bp.checked.qspace.axes
        qg = None if groups is None else QueryGroups(groups[0].box(bp.qshape, axes, "q"),
                                                     groups[1])
        return classify_token_boxes(bp, qb.box(bp.qshape, axes, "q"),
                                    kb.box(bp.kshape, bp.checked.kspace.axes, "k"),
                                    qb.flo - kb.fhi, qb.fhi - kb.flo, self.head, self.run, qg)


def refine(bp: BoundPattern, qlev: list[Bounds], klev: list[Bounds], head=None,
           run: RunInputs = NONE, diag: str = "none", max_boxes: int | None = None,
           max_step: int | None = None, judge=None) -> Refinement:
    """The one refinement engine: classify pairs of groups top-down (the coarsest levels of
    both pyramids first), keep FULL ones, split PARTIAL ones into their children, and stop
    at the leaf groups. With diag="all" ("leaf"), PARTIAL pairs of every level (of the leaf
    level) are first tried as diagonal leaves (1D row-major spaces only).

    A PARTIAL pair is split on both sides, except where that does not prune: when every
    child of a split is PARTIAL again, each is probed (_probe) and may be split on one side
    only. (A row's hashed random blocks make every pair PARTIAL until its query group is one
    block; splitting only the queries gets there without splitting every key group on the
    way: 3x fewer pairs on the BigBird-style pattern of bench/cpu_bench.py at 262,144
    tokens.) A large step probes a spread sample first, and the rest only if the sample
    splits one side often enough: longnet's probes all answer "both" and then cost little.
    The frontier mixes levels; each step classifies all of it in one call of the abstract
    interpreter, whose cost is far more per call than per box (`max_step` bounds that
    call's boxes, and so its memory). `judge` classifies the pairs (PatternJudge by
    default)."""
    judge = PatternJudge(bp, head, run) if judge is None else judge
    lq0, lk0 = len(qlev) - 1, len(klev) - 1
    gi, gj = np.meshgrid(np.arange(len(qlev[lq0])), np.arange(len(klev[lk0])), indexing="ij")
    n0 = gi.size
    _step_fits(bp, n0, max_step)
    # frontier: level q, level k, group q, group k, the split it came from (-1: none)
    front = (np.full(n0, lq0), np.full(n0, lk0), gi.reshape(-1), gj.reshape(-1),
             np.full(n0, -1))
    nq_at = np.array([len(x) for x in qlev])
    nk_at = np.array([len(x) for x in klev])
    qgather, kgather = _Gather(qlev), _Gather(klev)

    def grouped(lq, gi):  # the pairs' distinct query groups, for a judge that takes them
        g = _query_groups(lq, gi, nq_at) if getattr(judge, "grouped", False) else None
        return None if g is None else (qgather(g[0], g[1]), g[2])

    full, diags, diag_at, und_i, und_j = [], [], [], [], []
    evaluated = next_id = 0
    while len(front[0]):
        lq, lk, gi, gj, par = front
        qb, kb = qgather(lq, gi), kgather(lk, gj)
        live = (qb.count > 0) & (kb.count > 0)
        if not live.all():
            lq, lk, gi, gj, par = lq[live], lk[live], gi[live], gj[live], par[live]
            qb, kb = qb.take(live), kb.take(live)
        evaluated += len(gi)
        if max_boxes is not None and evaluated > max_boxes:
            raise SizeLimitError(f"pattern '{bp.name}' needs more than {max_boxes:,} boxes "
                                 "to decompose exactly at this size", bp.checked.span)
        if not len(gi):
            break
        groups = grouped(lq, gi)
        cls = judge(qb, kb) if groups is None else judge(qb, kb, groups)
        f = np.nonzero(cls == FULL)[0]
        for l1, l2, at in _by_level(lq[f], lk[f]):
            full.append((l1, l2, gi[f[at]], gj[f[at]]))
        p = cls == PARTIAL
        probe = _unpruned(par, p)
        keep = np.nonzero(p)[0]  # positions in qb, kb of the pairs still open
        if diag != "none":
            t = keep if diag == "all" else keep[(lq[keep] == 0) & (lk[keep] == 0)]
            if len(t):
                c, lower, upper = diagonal_split(bp, qb.flo[t], qb.fhi[t], kb.flo[t],
                                                 kb.fhi[t], head, run)
                ok = c > -(1 << 62)
                g, c, lower, upper = t[ok], c[ok], lower[ok], upper[ok]
                for l1, l2, at in _by_level(lq[g], lk[g]):
                    a = g[at]
                    diags.append(DiagLeaves(qb.flo[a], qb.fhi[a], kb.flo[a], kb.fhi[a],
                                            c[at], lower[at], upper[at]))
                    diag_at.append((l1, l2, gi[a], gj[a]))
                if len(g):
                    keep = np.setdiff1d(keep, g, assume_unique=True)
        leaf = (lq[keep] == 0) & (lk[keep] == 0)
        und_i.append(gi[keep[leaf]])
        und_j.append(gj[keep[leaf]])
        s = keep[~leaf]
        lq, lk, gi, gj, probe = lq[s], lk[s], gi[s], gj[s], probe[s]
        side = np.where((lq > 0) & (lk > 0), 3, np.where(lq > 0, 1, 2)).astype(np.int8)
        probe &= side == 3
        if probe.any():
            at = np.nonzero(probe)[0]
            if len(at) > PROBE_SAMPLE:  # worth probing every pair? ask a spread sample first
                few = at[np.linspace(0, len(at) - 1, PROBE_SAMPLE).astype(np.int64)]
                got = _probe(judge, qb.take(s[few]), kb.take(s[few]),
                             grouped(lq[few], gi[few]))
                side[few] = got
                at = at[np.isin(at, few, invert=True)] if (got != 3).mean() >= PROBE_WORTH \
                    else at[:0]
            if len(at):
                side[at] = _probe(judge, qb.take(s[at]), kb.take(s[at]),
                                  grouped(lq[at], gi[at]))
        _step_fits(bp, int(np.where(side == 3, 4, 2).sum()), max_step)
        front = _children(nq_at, nk_at, lq, lk, gi, gj, side, next_id)
        next_id += len(gi)
    z = np.zeros(0, dtype=np.int64)
    return Refinement(tuple(full), DiagLeaves.concat(diags), tuple(diag_at),
                      (np.concatenate(und_i) if und_i else z,
                       np.concatenate(und_j) if und_j else z), evaluated)


def _step_fits(bp: BoundPattern, boxes: int, max_step: int | None) -> None:
    """Refuse a step of more than max_step boxes before they (and their intervals) take
    GBs."""
    if max_step is not None and boxes > max_step:
        raise PairLimitError(f"pattern '{bp.name}' has more than {max_step:,} block pairs to "
                             "classify at once at this size; use larger blocks",
                             bp.checked.span)


class _Gather:
    """Group g[i] of level lev[i] for every i, as one Bounds: taken level by level (a
    closed-form level computes only the groups asked for)."""

    def __init__(self, levels: list[Bounds]):
        self.levels = levels

    def __call__(self, lev: np.ndarray, g: np.ndarray) -> Bounds:
        if not len(lev) or (lev == lev[0]).all():
            return self.levels[int(lev[0]) if len(lev) else 0].take(g)
        at = [np.nonzero(lev == u)[0] for u in np.unique(lev).tolist()]
        got = Bounds.concat([self.levels[int(lev[a[0]])].take(g[a]) for a in at])
        where = np.empty(len(lev), dtype=np.int64)
        where[np.concatenate(at)] = np.arange(len(lev))
        return got.take(where)


def _query_groups(lq: np.ndarray, gi: np.ndarray, nq_at: np.ndarray):
    """(levels, groups, each pair's row among them) of the distinct query groups of a step's
    pairs, or None when they are not at most half as many as the pairs (QueryGroups)."""
    sel = np.empty(len(lq), dtype=np.int64)
    levels, groups, off = [], [], 0
    one = not len(lq) or (lq == lq[0]).all()
    for lev in ([int(lq[0])] if one and len(lq) else np.unique(lq).tolist()):
        at = slice(None) if one else np.nonzero(lq == lev)[0]
        g = gi[at]
        used = np.zeros(int(nq_at[lev]), dtype=bool)
        used[g] = True
        idx = np.flatnonzero(used)
        sel[at] = off + (np.cumsum(used) - 1)[g]
        levels.append(np.full(len(idx), lev))
        groups.append(idx)
        off += len(idx)
    if 2 * off > len(lq):
        return None
    return np.concatenate(levels), np.concatenate(groups), sel


def _by_level(lq: np.ndarray, lk: np.ndarray):
    """(level q, level k, positions) for each pair of levels present, coarsest first."""
    if not len(lq):
        return []
    if (lq == lq[0]).all() and (lk == lk[0]).all():
        return [(int(lq[0]), int(lk[0]), np.arange(len(lq)))]
    key = lq.astype(np.int64) * 4096 + lk
    return [(u // 4096, u % 4096, np.nonzero(key == u)[0])
            for u in np.unique(key)[::-1].tolist()]


def _unpruned(parent: np.ndarray, partial: np.ndarray) -> np.ndarray:
    """Pairs whose split left every live sibling PARTIAL (and more than one)."""
    out = np.zeros(len(parent), dtype=bool)
    two = parent >= 0
    if not two.any():
        return out
    ids = parent[two]
    ids = ids - ids.min()  # split ids are consecutive within a step: no sort needed
    n = np.bincount(ids)
    k = np.bincount(ids, weights=partial[two], minlength=len(n))
    out[two] = ((n == k) & (n > 1))[ids]
    return out


def _probe(judge, qb: Bounds, kb: Bounds, groups: tuple | None = None) -> np.ndarray:
    """Which side of each PARTIAL pair to split: 1 the query side (its first and its last
    query alone are each decided, its first or its last key alone is not), 2 the key side
    (the other way round), 3 both. (Both ends: a diagonal edge through a box leaves one of
    its end rows whole and cuts an end column; such a box is best split on both sides.)
    The four probes of every pair go to the abstract interpreter in one call (`groups`: the
    pairs' distinct query groups and each pair's, as PatternJudge takes them)."""
    n = len(qb)
    qs = Bounds.concat([_point(qb.flo, judge.qshape), _point(qb.fhi, judge.qshape), qb, qb])
    ks = Bounds.concat([kb, kb, _point(kb.flo, judge.kshape), _point(kb.fhi, judge.kshape)])
    if groups is None:
        cls = judge(qs, ks)
    else:  # the probes' query groups: each group's first query, its last, itself (twice)
        gb, sel = groups
        m = len(gb)
        gq = Bounds.concat([_point(gb.flo, judge.qshape), _point(gb.fhi, judge.qshape), gb])
        cls = judge(qs, ks, (gq, np.concatenate([sel, m + sel, 2 * m + sel, 2 * m + sel])))
    decided = (cls != PARTIAL).reshape(4, n)
    by_q, by_k = decided[0] & decided[1], decided[2] & decided[3]
    return np.where(by_q & ~by_k, 1, np.where(by_k & ~by_q, 2, 3)).astype(np.int8)


def _point(flat: np.ndarray, shape) -> Bounds:
    """One token per group: the group of each flat index alone."""
    c = np.stack(unravel(flat, shape), axis=1)
    one = np.ones(len(flat), dtype=np.int64)
    return Bounds(c, c, flat, flat, one, one)


def _children(nq_at, nk_at, lq, lk, gi, gj, side, first_id: int):
    """The children of PARTIAL pairs at levels (lq, lk) split on `side` (1 the query side,
    2 the key side, 3 both): (levels q, levels k, gi, gj, the split each came from, an id
    from first_id on)."""
    sq, sk = (side & 1) > 0, (side & 2) > 0
    nq, nk = lq - sq, lk - sk
    i0, j0 = np.where(sq, gi * 2, gi), np.where(sk, gj * 2, gj)
    ilim, jlim = nq_at[nq], nk_at[nk]
    at, da, db = [], [], []
    for a in (0, 1):
        for b in (0, 1):
            ok = (i0 + a < ilim) & (j0 + b < jlim)
            if a:
                ok &= sq
            if b:
                ok &= sk
            at.append(np.nonzero(ok)[0])
            da.append(np.full(len(at[-1]), a))
            db.append(np.full(len(at[-1]), b))
    at = np.concatenate(at)
    return (nq[at], nk[at], i0[at] + np.concatenate(da), j0[at] + np.concatenate(db),
            first_id + at)


# ------------------------------------------------------------------ decomposition


@dataclass(frozen=True)
class Decomposition:
    """The exact mask as FULL rectangles, diagonal leaves and dense tiles (inclusive
    bounds)."""

    nq: int
    nk: int
    full: np.ndarray  # [F, 4] q0, q1, k0, k1
    tiles: np.ndarray  # [T, 2] q0, k0 of tiles of size tile x tile
    tile_masks: np.ndarray  # [T, tile, tile] bool
    tile: int
    boxes_evaluated: int
    diag: DiagLeaves = field(default_factory=DiagLeaves.empty)

    @property
    def nnz(self) -> int:
        f = self.full
        n = int(((f[:, 1] - f[:, 0] + 1) * (f[:, 3] - f[:, 2] + 1)).sum()) if len(f) else 0
        return n + int(self.tile_masks.sum()) + int(self.diag.pairs().sum())

    def paint(self, rows, q_start: int) -> None:
        """OR the attended pairs of queries q_start .. q_start + len(rows) - 1 into rows."""
        q_end = q_start + rows.shape[0]
        tensor = isinstance(rows, torch.Tensor)
        self.diag.paint(rows, q_start)
        for a, b, c, d in self.full:
            lo, hi = max(a, q_start), min(b + 1, q_end)
            if lo < hi:
                rows[lo - q_start:hi - q_start, c:d + 1] = True
        t = self.tile
        for (a, c), m in zip(self.tiles, self.tile_masks):
            lo, hi = max(a, q_start), min(a + t, q_end)
            if lo < hi:
                w = min(t, rows.shape[1] - c)
                part = m[lo - a:hi - a, :w]
                rows[lo - q_start:hi - q_start, c:c + w] |= (torch.as_tensor(part) if tensor
                                                             else part)

    def dense(self) -> np.ndarray:
        m = np.zeros((self.nq, self.nk), dtype=bool)
        self.paint(m, 0)
        return m


def decompose(bp: BoundPattern, tile: int = 16, head=None, run: RunInputs = NONE,
              max_boxes: int = 50_000_000) -> Decomposition:
    """The exact mask of [0, Nq) x [0, Nk) from the refinement of row-major `tile`-token
    groups: FULL group pairs become rectangles, diagonal leaves stay, and the undecided
    tile x tile pairs are evaluated exactly."""
    qlev, klev = row_major(bp.qshape, tile), row_major(bp.kshape, tile)
    qb, kb = qlev[0], klev[0]
    one_d = bp.nq == bp.nk and len(bp.qshape) == 1
    r = refine(bp, qlev, klev, head, run, "all" if one_d else "none", max_boxes)
    rects = []
    for lq, lk, gi, gj in r.full:
        a, b = qlev[lq].take(gi), klev[lk].take(gj)
        rects.append(np.stack([a.flo, a.fhi, b.flo, b.fhi], axis=1))
    gi, gj = r.undecided
    q0, k0 = qb.take(gi).flo, kb.take(gj).flo
    tm = dense_tiles(bp, q0, k0, tile, tile, head, run)
    keep = tm.any(axis=(1, 2))
    return Decomposition(
        bp.nq, bp.nk,
        np.concatenate(rects) if rects else np.zeros((0, 4), dtype=np.int64),
        np.stack([q0[keep], k0[keep]], axis=1).astype(np.int64),
        tm[keep], tile, r.evaluated, r.diag)
