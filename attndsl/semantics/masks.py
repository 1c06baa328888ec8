"""Masks and biases evaluated on tensors of token indices: the one concrete interpreter of a
bound pattern's rules, used by the reference backend, the planner, the CPU backend and the
analysis alike. Large grids are evaluated in chunks of at most CHUNK_ELEMS elements.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch

from attndsl.errors import EvaluationError, InputError, SizeLimitError, UnsupportedError
from attndsl.semantics import dynamic, rules
from attndsl.semantics.bind import BoundPattern, BoundSummary, bind_cached, call_values
from attndsl.semantics.evaluate import Evaluator, SummaryVal, token, unravel
from attndsl.semantics.inputs import NONE, RunInputs

CHUNK_ELEMS = 1 << 22  # elements evaluated at once (every chunked evaluation uses it)
SUMMARY_LIMIT = 1 << 28  # summary tokens x keys (or queries) of one summary's masks


def chunks(n: int, per_item: int, budget: int | None = None) -> Iterator[tuple[int, int]]:
    """(start, stop) slices of range(n), each holding at most `budget` (CHUNK_ELEMS)
    elements when one item holds `per_item` (at least one item per slice)."""
    step = max(1, (CHUNK_ELEMS if budget is None else budget) // max(1, per_item))
    for a in range(0, n, step):
        yield a, min(n, a + step)


class MaskHooks:
    """What the evaluator asks a bound pattern for: patterns called from an expression and
    content-dependent built-ins."""

    def __init__(self, bp: BoundPattern, run: RunInputs):
        self.bp = bp
        self.run = run

    def pattern(self, ev: Evaluator, call, local: dict):
        sub = bind_cached(call.callee, call_values(call.callee, call,
                                                   lambda a: ev.eval(a, local)))
        if sub.summaries or sub.route or sub.average or sub.checked.channel:
            raise EvaluationError(f"pattern '{call.func}' has summaries, routing, averaging "
                                  "or channel tokens; only mask patterns can be used in an "
                                  "expression (use 'include' instead)", call.span)
        if sub.qshape != self.bp.qshape or sub.kshape != self.bp.kshape:
            raise EvaluationError(
                f"pattern '{call.func}' has spaces {sub.qshape} x {sub.kshape}, this pattern"
                f" {self.bp.qshape} x {self.bp.kshape}", call.span)
        return predicate(sub, ev.ctx, self.run)

    def dynamic(self, ev: Evaluator, call, args: dict):
        return dynamic.chunk_topk(self.bp, ev.ctx, args, self.run, call.span)


class _TorchDomain:
    """rules.combine over bool tensors; `h` the head indices of the context."""

    def __init__(self, h):
        self.h = h

    def false(self):
        return torch.zeros((), dtype=torch.bool)

    def union(self, a, b):
        return _as_tensor(a) | _as_tensor(b)

    def intersect(self, a, b):
        return _as_tensor(a) & _as_tensor(b)

    def minus(self, a, b):
        return _as_tensor(a) & ~_as_tensor(b)

    def in_heads(self, lo, hi):
        return (self.h >= lo) & (self.h < hi)

    def not_in_heads(self, lo, hi):
        return ~self.in_heads(lo, hi)


def _as_tensor(x):
    return x if isinstance(x, torch.Tensor) else torch.tensor(bool(x))


def evaluator(bp: BoundPattern, ctx: dict, run: RunInputs = NONE) -> Evaluator:
    """An evaluator of `bp`'s expressions: its static values, the call's inputs, `ctx`."""
    return Evaluator({**bp.env, **run.env}, ctx, MaskHooks(bp, run), bp.lazy_lets)


def context(bp: BoundPattern, qidx, kidx, h=None) -> dict:
    ctx = {"q": token(qidx, bp.qshape, bp.checked.qspace.axes),
           "k": token(kidx, bp.kshape, bp.checked.kspace.axes)}
    if h is not None:
        ctx["h"] = h
    return ctx


def predicate(bp: BoundPattern, ctx: dict, run: RunInputs = NONE):
    """The direct attend mask for the q/k/h context (broadcast shapes)."""
    evaluators: dict[int, Evaluator] = {}

    def value(owner, rule):
        ev = evaluators.get(id(owner))
        if ev is None:
            ev = evaluators[id(owner)] = evaluator(owner, ctx, run)
        return _as_tensor(ev.eval(rule.expr))

    return _as_tensor(rules.combine(bp.rules, value, _TorchDomain(ctx.get("h"))))


def token_mask(bp: BoundPattern, run: RunInputs, qidx, kidx, h=None, dims: int = 3
               ) -> torch.Tensor:
    """The direct mask at these (broadcast) query and key indices, with leading per-batch
    and per-head dimensions beyond `dims` reduced to their union."""
    val = predicate(bp, context(bp, qidx, kidx, h), run)
    while val.dim() > dims:
        val = val.any(dim=0)
    return val


def bias(bp: BoundPattern, run: RunInputs, qidx, kidx, hidx, dtype, head=None):
    """The sum of the pattern's bias statements at these (broadcast) indices, or None.

    `hidx` holds the head indices (broadcast with the result), or `head` one head."""
    total = None
    for owner, sc, hr in bp.biases:
        if head is not None and hr is not None and not hr[0] <= head < hr[1]:
            continue
        h = None
        if owner.heads is not None:
            h = hidx if head is None else torch.tensor(head)
        b = torch.as_tensor(evaluator(owner, context(owner, qidx, kidx, h), run)
                            .eval(sc.expr), device=qidx.device).to(dtype)
        if hr is not None and head is None:
            b = b * ((hidx >= hr[0]) & (hidx < hr[1])).to(dtype)
        total = b if total is None else total + b
    return total


def dense_mask(bp: BoundPattern, run: RunInputs, device=None, rows: tuple | None = None,
               tokens: tuple | None = None) -> torch.Tensor:
    """[Nq, Nk], [H, Nq, Nk] (per-head) or [B, H, Nq, Nk] (content-dependent) bool mask;
    with rows = (first, count), only those queries' rows; with tokens = (query tokens,
    key tokens), int64 tensors, only those rows and columns."""
    heads = None
    if bp.head_dependent:
        heads = bp.heads
        if heads is None:
            raise UnsupportedError("per-head rules need a 'heads N' declaration",
                                   bp.checked.span)
    lead = []
    if bp.content_dependent:
        if run.content is None:
            raise InputError(f"pattern '{bp.name}' depends on q and k: call mask(q=..., k=...)",
                             bp.checked.span)
        lead = [run.content[0].shape[0], run.content[0].shape[1]]
    elif heads is not None:
        lead = [heads]
    first, count = rows if rows is not None else (0, bp.nq)
    device = device or torch.device("cpu")
    if tokens is not None:
        count = len(tokens[0])
    bp.check_size(math.prod(lead) if lead else 1, count)  # before anything of size Nk
    if tokens is not None:
        qtok, kidx = (t.to(device) for t in tokens)
        kidx = kidx.view(1, -1)
    else:
        qtok = None
        kidx = torch.arange(bp.nk, device=device).view(1, -1)
    nk = kidx.shape[1]
    out = torch.empty(lead + [count, nk], dtype=torch.bool, device=device)
    h = torch.arange(heads, device=device).view(-1, 1, 1) if heads is not None else None
    for q0, q1 in chunks(count, nk * max(1, math.prod(lead))):
        qidx = (torch.arange(first + q0, first + q1, device=device) if qtok is None
                else qtok[q0:q1]).view(-1, 1)
        val = predicate(bp, context(bp, qidx, kidx, h), run)
        out[..., q0:q1, :] = val.to(device).expand(lead + [q1 - q0, nk])
    return out


def summary_masks(bp: BoundPattern, bs: BoundSummary, run: RunInputs, device, heads,
                  rows: bool = False):
    """(member [R, Nk], attend [H?, Nq, R]) of one summary, with empty regions dropped
    (and, with `rows`, the indices of the regions kept)."""
    s = bs.summary
    owner = bs.owner
    r = math.prod(bs.sizes)
    if r * bp.nk > SUMMARY_LIMIT or r * bp.nq > SUMMARY_LIMIT:
        raise SizeLimitError(f"summary '{s.name}' has {r:,} tokens; too many: its member "
                             f"and attend masks ({r:,} x {max(bp.nq, bp.nk):,} entries) are "
                             f"built whole, up to {SUMMARY_LIMIT:,}", s.span)
    coords = summary_coords(bs, device)
    member = summary_member(bp, bs, run, device)
    keep = member.any(dim=1) if s.keys_from is None else torch.ones(
        r, dtype=torch.bool, device=device)  # given keys: every token is the caller's
    qidx = torch.arange(bp.nq, device=device).view(-1, 1)
    ctx = {"q": token(qidx, bp.qshape, owner.checked.qspace.axes),
           "summary": SummaryVal({a: c.view(1, -1) for a, c in coords.items()})}
    if heads is not None:
        ctx["h"] = torch.arange(heads, device=device).view(-1, 1, 1)
    att = torch.as_tensor(evaluator(owner, ctx, run).eval(s.attend), device=device)
    att = att.expand(*att.shape[:-2], bp.nq, r) if att.dim() >= 2 else att.expand(bp.nq, r)
    if rows:
        return member[keep], att[..., keep], torch.nonzero(keep).view(-1)
    return member[keep], att[..., keep]


def summary_coords(bs: BoundSummary, device, index=None) -> dict:
    """Axis name -> coordinate of each token (of `index`, flat token indices, or all)."""
    if index is None:
        index = torch.arange(math.prod(bs.sizes), device=device)
    return dict(zip((ax.name for ax in bs.summary.axes), unravel(index, bs.sizes)))


def summary_member(bp: BoundPattern, bs: BoundSummary, run: RunInputs, device):
    """[R, Nk] bool: the member keys of every token (none for a summary without 'member')."""
    r = math.prod(bs.sizes)
    if bs.summary.member is None:
        return torch.zeros(r, bp.nk, dtype=torch.bool, device=device)
    kidx = torch.arange(bp.nk, device=device).view(1, -1)
    ctx = {"k": token(kidx, bp.kshape, bs.owner.checked.kspace.axes),
           "summary": SummaryVal({a: c.view(-1, 1)
                                  for a, c in summary_coords(bs, device).items()})}
    member = evaluator(bs.owner, ctx, run).eval(bs.summary.member)
    return torch.as_tensor(member, device=device).expand(r, bp.nk)


def summary_rule(bp: BoundPattern, bs: BoundSummary, run: RunInputs, expr, qidx, coords,
                 heads=None):
    """A summary expression that reads the query (its `attend` rule, its `bias`) at query
    indices `qidx` and token coordinates `coords`, broadcast together (and over the heads
    [H, 1, 1] when given)."""
    ctx = {"q": token(qidx, bp.qshape, bs.owner.checked.qspace.axes),
           "summary": SummaryVal(coords)}
    if heads is not None:
        ctx["h"] = heads
    return evaluator(bs.owner, ctx, run).eval(expr)


def bound_tokens(bp: BoundPattern, bs: BoundSummary, run: RunInputs, qidx):
    """For a summary with axes bound to the query (`c: W = q.x`): the flat indices
    [M, R'] of the tokens each query may attend (the bound axes at the query's values, the
    free axes at every value) and which of them exist (a value outside its axis: none)."""
    s = bs.summary
    ctx = {"q": token(qidx.view(-1, 1), bp.qshape, bs.owner.checked.qspace.axes)}
    ev = evaluator(bs.owner, ctx, run)
    free = [n for ax, n in zip(s.axes, bs.sizes) if ax.bound is None]
    grid = unravel(torch.arange(math.prod(free), device=qidx.device), tuple(free))
    pos, valid, f = [], torch.ones(qidx.numel(), 1, dtype=torch.bool, device=qidx.device), 0
    for ax, n in zip(s.axes, bs.sizes):
        if ax.bound is None:
            pos.append(grid[f].view(1, -1))
            f += 1
            continue
        v = torch.as_tensor(ev.eval(ax.bound), device=qidx.device).long().expand(
            qidx.numel(), 1)
        valid = valid & (v >= 0) & (v < n)
        pos.append(v.clamp(0, n - 1))
    flat = torch.zeros((), dtype=torch.long, device=qidx.device)
    for p_, n in zip(pos, bs.sizes):
        flat = flat * n + p_
    width = math.prod(free)
    return flat.expand(qidx.numel(), width), valid.expand(qidx.numel(), width)


def queries_at(bp: BoundPattern, bs: BoundSummary, run: RunInputs, device):
    """[R] flat query index of each token's `queries at` position."""
    s = bs.summary
    ev = evaluator(bs.owner, {"summary": SummaryVal(summary_coords(bs, device))}, run)
    at = ev.eval(s.queries_at)
    r = math.prod(bs.sizes)
    if isinstance(at, tuple):
        for v, n in zip(at, bp.qshape):
            v = torch.as_tensor(v, device=device)
            if bool(((v < 0) | (v >= n)).any()):
                bad = int(v[(v < 0) | (v >= n)].view(-1)[0]) if v.dim() else int(v)
                raise EvaluationError(f"'queries at' gives coordinate {bad}, outside the "
                                      f"query space {list(bp.qshape)}", s.queries_at.span)
        flat = torch.zeros((), dtype=torch.long, device=device)
        for v, n in zip(at, bp.qshape):
            flat = flat * n + torch.as_tensor(v, device=device)
        return flat.expand(r)
    flat = torch.as_tensor(at, device=device).long().expand(r)
    bad = (flat < 0) | (flat >= bp.nq)
    if bool(bad.any()):
        raise EvaluationError(f"'queries at' gives query {int(flat[bad][0])}, outside the "
                              f"{bp.nq} queries", s.queries_at.span)
    return flat
