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
    Bounds,
    _AbsHooks,
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
from attndsl.errors import SizeLimitError
from attndsl.semantics.bind import BoundPattern, BoundSummary
from attndsl.semantics.evaluate import SummaryVal, token, unravel
from attndsl.semantics.inputs import RunInputs
from attndsl.semantics.masks import chunks, evaluator

REGION_LEAF = 4  # summary tokens per leaf group of the refinement
KEY_LEAF = 64  # keys per leaf group when deciding which summary tokens have members
QUERY_LEAF = 64  # queries per leaf group of the attend refinement


@dataclass(frozen=True, eq=False)
class SummaryRows:
    """The summary tokens with members, in order (summary by summary): `rows` their global
    index (summary offset + token), `offsets` per summary (first global index, tokens),
    `before` per summary the kept tokens before each of its tokens ([R + 1])."""

    rows: np.ndarray
    offsets: tuple
    before: tuple
    first: tuple  # per summary: its first row among `rows`

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
                                       _AbsHooks(self.run))
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


def kept_rows(bp: BoundPattern, summaries, run: RunInputs) -> SummaryRows:
    """Which tokens of each summary have a member key (every token, for keys the caller
    gives): refine (summary tokens x keys) with the member rule, evaluate what it leaves."""
    rows, offsets, before, first = [], [], [], []
    base = nkept = 0
    for bs in summaries:
        s = bs.summary
        r = math.prod(bs.sizes)
        kept = np.zeros(r, dtype=bool)
        if s.keys_from is not None:
            kept[:] = True
        elif s.member is not None:
            _members(bp, bs, run, kept)
        idx = np.nonzero(kept)[0]
        rows.append(idx + base)
        offsets.append((base, r))
        b = np.zeros(r + 1, dtype=np.int64)
        np.cumsum(kept, out=b[1:])
        before.append(b)
        first.append(nkept)
        base += r
        nkept += len(idx)
    return SummaryRows(np.concatenate(rows) if rows else np.zeros(0, dtype=np.int64),
                       tuple(offsets), tuple(before), tuple(first))


def _members(bp: BoundPattern, bs: BoundSummary, run: RunInputs, kept: np.ndarray) -> None:
    r = len(kept)
    rlev = row_major(bs.sizes, REGION_LEAF)
    klev = row_major(bp.kshape, KEY_LEAF)
    ref = refine(bp, rlev, klev, None, run, judge=_Judge(bp, bs, run, None, False))
    mark = np.zeros(r + 1, dtype=np.int64)
    q0, q1, _, _ = _ranges(ref.full, 1, 0, len(rlev[0]))
    np.add.at(mark, np.minimum(q0 * REGION_LEAF, r), 1)
    np.add.at(mark, np.minimum(q1 * REGION_LEAF, r), -1)
    kept |= np.cumsum(mark[:-1]) > 0
    gi, gj = ref.undecided
    for a, b in chunks(len(gi), REGION_LEAF * KEY_LEAF):
        reg = torch.from_numpy(gi[a:b, None] * REGION_LEAF + np.arange(REGION_LEAF))
        key = torch.from_numpy(gj[a:b, None] * KEY_LEAF + np.arange(KEY_LEAF))
        ok = (reg < r).view(-1, REGION_LEAF, 1) & (key < bp.nk).view(-1, 1, KEY_LEAF)
        m = _eval_rule(bp, bs, run, bs.summary.member, key.clamp(max=bp.nk - 1).view(
            -1, 1, KEY_LEAF), reg.clamp(max=r - 1).view(-1, REGION_LEAF, 1), None, False)
        hit = (m.expand(ok.shape) & ok).any(-1)  # [L, REGION_LEAF]
        kept[reg[hit].numpy()] = True


def attend_counts(bp: BoundPattern, bs: BoundSummary, run: RunInputs, head, qperm: np.ndarray,
                  qlev: list, per: int, block: int, sr: SummaryRows, at: int, budget: list):
    """(query block, summary block, attended entries) of one summary's attend rule for one
    head, entries > 0 only. The refinement's query leaves are `qperm` [leaves, size] (-1:
    padding; `per` leaves a query block: blocks of 1,024 queries are refined in leaves of
    64, so that only 64 queries are evaluated against an undecided summary token). Summary
    blocks hold `block` kept rows each (all summaries' rows in order)."""
    r = math.prod(bs.sizes)
    before, first = sr.before[at], sr.first[at]
    z = np.zeros(0, dtype=np.int64)
    if before[-1] == 0:
        return z, z, z
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
    if pairs > budget[0]:
        raise SizeLimitError(f"pattern '{bp.name}': summary '{bs.summary.name}' is attended "
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
        ls.append((before[regn[has]] + first) // block)
        lc.append(got[has])
    return np.concatenate(lq), np.concatenate(ls), np.concatenate(lc).astype(np.int64)


def _within(n: np.ndarray) -> np.ndarray:
    """0 .. n[i] - 1 for every i, concatenated."""
    if not len(n):
        return np.zeros(0, dtype=np.int64)
    return np.arange(int(n.sum())) - np.repeat(np.cumsum(n) - n, n)


def query_leaves(bp: BoundPattern, qorder, bq: int) -> tuple[np.ndarray, list, int]:
    """(tokens [leaves, size] of the refinement's query leaves, their pyramid, leaves per
    query block): QUERY_LEAF queries a leaf, or a whole block when smaller."""
    size = min(bq, QUERY_LEAF)
    qperm = padded_perm(qorder, bq).reshape(-1, size)
    if qorder.identity:
        return qperm, row_major(bp.qshape, size, qorder.start, qorder.length), bq // size
    return qperm, bounds(qperm, bp.qshape).pyramid(), bq // size
