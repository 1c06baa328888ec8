"""Summary tokens as key rows of a plan: which of a summary's tokens exist (have a member
key) and which query blocks attend which blocks of them, from the typed IR.

The refinement engine (analysis/blocks.py) classifies groups of summary tokens x keys
with the summary's `member` rule and groups of query blocks x summary tokens with its
`attend` rule, top-down; only the pairs it cannot decide are evaluated. A plan so costs
what it lists, not [summary tokens x keys] and [queries x summary tokens]:
combiner_logsparse at 1M tokens declares 5.5M summary tokens (524,287 with members), whose
dense masks would hold 5.8e12 entries.

A (query block, summary block) pair is FULL when it counts (valid queries) x (block rows)
attended entries and the block holds no padding row, PARTIAL when it counts fewer, and is
not listed when it counts none: the counts decide, as for the direct tables.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from attndsl.analysis.blocks import (
    AbstractHooks,
    Bounds,
    abstract_lets,
    bounds,
    refine,
    row_major,
)
from attndsl.analysis.intervals import (
    IV,
    PARTIAL,
    AbstractEvaluator,
    SummaryIV,
    TokIV,
    Unknown,
    classify,
)
from attndsl.codegen.plan.orders import padded_perm
from attndsl.errors import PairLimitError
from attndsl.semantics.bind import BoundPattern, BoundSummary
from attndsl.semantics.evaluate import SummaryVal, token, unravel
from attndsl.semantics.inputs import RunInputs
from attndsl.semantics.masks import chunks, evaluator

REGION_LEAF = 4  # summary tokens per leaf group of the refinement
LEAF_TOKENS = 64  # queries or keys per leaf group (fewer: one block)


@dataclass(frozen=True, eq=False)
class SummaryRows:
    """The summary tokens with members, in order (summary by summary): `rows` their global
    index (summary offset + token), `offsets` per summary (first global index, tokens),
    `before` per summary the kept tokens before each of its tokens ([R + 1])."""

    rows: np.ndarray
    offsets: tuple
    before: tuple
    first: tuple  # per summary: its first row among `rows`
    owners: tuple  # (offsets, rows): per key block, the kept rows with a member in it

    @property
    def nr(self) -> int:
        return len(self.rows)


class _Judge:
    """refine's judge for one summary rule: `attend` over (query groups, summary-token
    groups), `member` over (summary-token groups, key groups)."""

    def __init__(self, bp: BoundPattern, bs: BoundSummary, run: RunInputs, head, attend: bool):
        self.owner, self.run, self.head, self.attend = bs.owner, run, head, attend
        self.expr = bs.summary.attend if attend else bs.summary.member
        self.names = tuple(ax.name for ax in bs.summary.axes)
        space = bs.owner.checked.qspace if attend else bs.owner.checked.kspace
        self.tshape, self.taxes = (bp.qshape if attend else bp.kshape), space.axes
        self.qshape, self.kshape = ((bp.qshape, bs.sizes) if attend else (bs.sizes, bp.kshape))

    def __call__(self, qb: Bounds, kb: Bounds) -> np.ndarray:
        tok, reg = (qb, kb) if self.attend else (kb, qb)
        pos = tuple(IV(tok.lo[:, a], tok.hi[:, a]) for a in range(len(self.tshape)))
        ctx = {"q" if self.attend else "k": TokIV(IV(tok.flo, tok.fhi), pos, self.tshape,
                                                  self.taxes),
               "summary": SummaryIV({n: IV(reg.lo[:, a], reg.hi[:, a])
                                     for a, n in enumerate(self.names)})}
        if self.head is not None:
            h = np.asarray(self.head, dtype=np.int64)
            ctx["h"] = IV(h, h)
        try:
            with np.errstate(all="ignore"):
                ev = AbstractEvaluator({**self.owner.env, **self.run.env}, ctx,
                                       AbstractHooks(self.run))
                got = ev.eval(self.expr, abstract_lets(self.owner, ev))
                return np.broadcast_to(classify(got), (len(qb),))
        except (Unknown, FloatingPointError, OverflowError, ValueError, ZeroDivisionError):
            return np.full(len(qb), PARTIAL, dtype=np.int8)


def _ranges(full, leaf: int, n: int, nq: int):
    """(q0, q1, r0, r1) of refine's FULL group pairs: query-side groups [q0, q1) of level-0
    groups, and the key side as [r0, r1) of items, `leaf` items per level-0 group."""
    out = [[], [], [], []]
    for lq, lk, gi, gj in full:
        out[0].append(gi << lq)
        out[1].append(np.minimum((gi + 1) << lq, nq))
        out[2].append((gj << lk) * leaf)
        out[3].append(np.minimum(((gj + 1) << lk) * leaf, n))
    z = np.zeros(0, dtype=np.int64)
    return tuple(np.concatenate(x).astype(np.int64) if x else z for x in out)


def _eval_rule(bp: BoundPattern, bs: BoundSummary, run: RunInputs, expr, tok, reg, head,
               attend: bool) -> torch.Tensor:
    """The rule at query (attend) or key (member) tokens `tok` [L, a, 1] and summary tokens
    `reg` [L, 1, b] (or [L, a, 1] and [L, 1, b] the other way round), broadcast."""
    owner = bs.owner
    coords = dict(zip((ax.name for ax in bs.summary.axes), unravel(reg, bs.sizes)))
    if attend:
        ctx = {"q": token(tok, bp.qshape, owner.checked.qspace.axes)}
    else:
        ctx = {"k": token(tok, bp.kshape, owner.checked.kspace.axes)}
    ctx["summary"] = SummaryVal(coords)
    if head is not None:
        ctx["h"] = torch.tensor(head)
    return torch.as_tensor(evaluator(owner, ctx, run).eval(expr))


def kept_rows(bp: BoundPattern, summaries, run: RunInputs, korder, bk: int, budget: list
              ) -> SummaryRows:
    """Which tokens of each summary have a member key (every token, for keys the caller
    gives), and which key blocks (of `korder`, `bk` keys each) hold members of which kept
    token: refine (summary tokens x keys) with the member rule, evaluate what it leaves."""
    rows, offsets, before, first, owned = [], [], [], [], []
    base = nkept = 0
    kperm, klev, per = leaves(bp.kshape, korder, bk)
    for bs in summaries:
        s = bs.summary
        r = math.prod(bs.sizes)
        kept = np.zeros(r, dtype=bool)
        pairs = (np.zeros(0, dtype=np.int64),) * 2
        if s.keys_from is not None:
            kept[:] = True
        elif s.member is not None:
            pairs = _members(bp, bs, run, kept, kperm, klev, per, budget)
        idx = np.nonzero(kept)[0]
        rows.append(idx + base)
        offsets.append((base, r))
        b = np.zeros(r + 1, dtype=np.int64)
        np.cumsum(kept, out=b[1:])
        before.append(b)
        owned.append((pairs[0], b[pairs[1]] + nkept))
        first.append(nkept)
        base += r
        nkept += len(idx)
    z = np.zeros(0, dtype=np.int64)
    kb = np.concatenate([o[0] for o in owned]) if owned else z
    kr = np.concatenate([o[1] for o in owned]) if owned else z
    return SummaryRows(np.concatenate(rows) if rows else z, tuple(offsets), tuple(before),
                       tuple(first), summary_csr(kb, kr, len(kperm) // per))


def _members(bp: BoundPattern, bs: BoundSummary, run: RunInputs, kept: np.ndarray, kperm,
             klev, per: int, budget: list) -> tuple[np.ndarray, np.ndarray]:
    """Marks the tokens with a member in `kept`; returns the (key block, token) pairs of
    every member's block, each once."""
    r = len(kept)
    rlev = row_major(bs.sizes, REGION_LEAF)
    ref = refine(bp, rlev, klev, None, run, judge=_Judge(bp, bs, run, None, False),
                 max_step=budget[0])
    g0, g1, k0, k1 = _ranges(ref.full, 1, len(kperm), len(rlev[0]))
    r0, r1 = np.minimum(g0 * REGION_LEAF, r), np.minimum(g1 * REGION_LEAF, r)
    mark = np.zeros(r + 1, dtype=np.int64)
    np.add.at(mark, r0, 1)
    np.add.at(mark, r1, -1)
    kept |= np.cumsum(mark[:-1]) > 0
    b0, b1 = k0 // per, (k1 - 1) // per + 1  # key blocks of each FULL box
    nr, nb = r1 - r0, b1 - b0
    if int((nr * nb).sum()) > budget[0]:
        raise PairLimitError(f"pattern '{bp.name}': the members of summary "
                             f"'{bs.summary.name}' span more than {budget[0]:,} (key block, "
                             "token) pairs at this size; use larger blocks", bs.summary.span)
    rep = np.repeat(np.arange(len(r0)), nr)
    tok = r0[rep] + _within(nr)
    rep2 = np.repeat(np.arange(len(rep)), nb[rep])
    blocks, toks = [b0[rep][rep2] + _within(nb[rep])], [tok[rep2]]
    gi, gj = ref.undecided
    size = kperm.shape[1]
    for a, b in chunks(len(gi), REGION_LEAF * size):
        reg = torch.from_numpy(gi[a:b, None] * REGION_LEAF + np.arange(REGION_LEAF))
        key = torch.from_numpy(kperm[gj[a:b]])  # [L, size]
        ok = (reg < r).view(-1, REGION_LEAF, 1) & (key >= 0).view(-1, 1, size)
        m = _eval_rule(bp, bs, run, bs.summary.member, key.clamp(min=0).view(-1, 1, size),
                       reg.clamp(max=r - 1).view(-1, REGION_LEAF, 1), None, False)
        hit = (m.expand(ok.shape) & ok).any(-1).numpy()  # [L, REGION_LEAF]
        regn = reg.numpy()
        kept[regn[hit]] = True
        blocks.append(np.broadcast_to(gj[a:b, None] // per, hit.shape)[hit])
        toks.append(regn[hit])
    kb, kt = np.concatenate(blocks), np.concatenate(toks)
    key = np.unique(kb * r + kt)  # a block met through several leaves counts once
    return key // r, key % r


def summary_csr(rows: np.ndarray, cols: np.ndarray, nrows: int) -> tuple[np.ndarray, np.ndarray]:
    """(offsets [nrows + 1], columns): each row's columns, increasing, each once."""
    ncols = int(cols.max()) + 1 if len(cols) else 1
    key = np.unique(rows * ncols + cols)
    off = np.zeros(nrows + 1, dtype=np.int64)
    np.cumsum(np.bincount(key // ncols, minlength=nrows), out=off[1:])
    return off, key % ncols


def attend_counts(bp: BoundPattern, bs: BoundSummary, run: RunInputs, head, qperm: np.ndarray,
                  qlev: list, per: int, block: int, sr: SummaryRows, at: int, budget: list):
    """(query block, summary block, attended entries) of one summary's attend rule for one
    head, entries > 0 only, and the (query block, kept row) pairs attended. The
    refinement's query leaves are `qperm` [leaves, size] (-1: padding; `per` leaves a query
    block: blocks of 1,024 queries are refined in leaves of 64, so that only 64 queries are
    evaluated against an undecided summary token). Summary blocks hold `block` kept rows
    each (all summaries' rows in order)."""
    r = math.prod(bs.sizes)
    before, first = sr.before[at], sr.first[at]
    z = np.zeros(0, dtype=np.int64)
    if before[-1] == 0:
        return z, z, z, (z, z)
    rlev = row_major(bs.sizes, REGION_LEAF)
    size = qperm.shape[1]
    qcount = (qperm >= 0).sum(1)
    qbefore = np.zeros(len(qperm) + 1, dtype=np.int64)
    np.cumsum(qcount, out=qbefore[1:])
    ref = refine(bp, qlev, rlev, head, run, judge=_Judge(bp, bs, run, head, True),
                 max_step=budget[0])
    q0, q1, r0, r1 = _ranges(ref.full, REGION_LEAF, r, len(qperm))
    c0, c1 = before[r0] + first, before[r1] + first
    some = c1 > c0
    q0, q1, c0, c1 = q0[some], q1[some], c0[some], c1[some]
    b0, b1 = q0 // per, (q1 - 1) // per + 1  # query blocks
    s0, s1 = c0 // block, (c1 - 1) // block + 1  # summary blocks
    nq, ns = b1 - b0, s1 - s0
    pairs = int((nq * ns).sum())
    nrow = c1 - c0
    if pairs > budget[0] or int((nq * nrow).sum()) > budget[0]:
        raise PairLimitError(f"pattern '{bp.name}': summary '{bs.summary.name}' is attended "
                             f"by more than {budget[0]:,} block pairs at this size; use "
                             "larger blocks", bs.summary.span)
    rep = np.repeat(np.arange(len(q0)), ns)
    s = s0[rep] + _within(ns)
    w = np.minimum(c1[rep], (s + 1) * block) - np.maximum(c0[rep], s * block)
    rep2 = np.repeat(np.arange(len(rep)), nq[rep])
    qi = b0[rep][rep2] + _within(nq[rep])
    box = rep[rep2]
    queries = (qbefore[np.minimum(q1[box], (qi + 1) * per)]
               - qbefore[np.maximum(q0[box], qi * per)])
    lq, ls, lc = [qi], [s[rep2]], [w[rep2] * queries]
    rep = np.repeat(np.arange(len(q0)), nrow)  # (query block, row) of every FULL box
    row = c0[rep] + _within(nrow)
    rep2 = np.repeat(np.arange(len(rep)), nq[rep])
    uq, ur = [b0[rep][rep2] + _within(nq[rep])], [row[rep2]]
    gi, gj = ref.undecided
    for a, b in chunks(len(gi), size * REGION_LEAF):
        qt = torch.from_numpy(qperm[gi[a:b]])  # [L, size]
        reg = torch.from_numpy(gj[a:b, None] * REGION_LEAF + np.arange(REGION_LEAF))
        m = _eval_rule(bp, bs, run, bs.summary.attend, qt.clamp(min=0).unsqueeze(-1),
                       reg.clamp(max=r - 1).unsqueeze(1), head, True)
        ok = (qt >= 0).unsqueeze(-1) & (reg < r).unsqueeze(1)
        got = (m.expand(ok.shape) & ok).sum(1).numpy()  # [L, REGION_LEAF] per summary token
        regn = np.minimum(reg.numpy(), r - 1)
        has = (got > 0) & (reg.numpy() < r) & (before[regn + 1] > before[regn])
        lq.append(np.broadcast_to(gi[a:b, None] // per, got.shape)[has])
        rows = before[regn[has]] + first
        ls.append(rows // block)
        lc.append(got[has])
        uq.append(lq[-1])
        ur.append(rows)
    return (np.concatenate(lq), np.concatenate(ls), np.concatenate(lc).astype(np.int64),
            (np.concatenate(uq), np.concatenate(ur)))


def _within(n: np.ndarray) -> np.ndarray:
    """0 .. n[i] - 1 for every i, concatenated."""
    if not len(n):
        return np.zeros(0, dtype=np.int64)
    return np.arange(int(n.sum())) - np.repeat(np.cumsum(n) - n, n)


def leaves(shape: tuple, order, block: int) -> tuple[np.ndarray, list, int]:
    """(tokens [leaves, size] of a refinement's leaf groups of `order` (-1: padding),
    their pyramid, leaves per block): LEAF_TOKENS tokens a leaf, or a whole block when
    smaller."""
    size = min(block, LEAF_TOKENS)
    perm = padded_perm(order, block).reshape(-1, size)
    if order.identity:
        return perm, row_major(shape, size, order.start, order.length), block // size
    return perm, bounds(perm, shape).pyramid(), block // size
