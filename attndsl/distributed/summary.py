"""Summary tokens under context parallelism. A summary's key and value pool a region of
keys that may span every rank: each rank pools its own members (sums for a mean, a masked
maximum for a max, and for Combiner's `expectation` the region's attention over its own
keys with its log-sum-exp); the partial results are gathered (a few rows per region) and
combined, differentiably, into the same tokens the single-process driver pools. Then every
rank attends them from its own queries as the driver does (semantics/attention.py)."""

from __future__ import annotations

import math

import torch

from attndsl.distributed.comm import gather
from attndsl.errors import UnsupportedError
from attndsl.semantics.attention import attend, stack_summaries
from attndsl.semantics.masks import summary_masks


def _partial(x, member, how):
    """x [B, H, n, D] pooled over each region's local members (member [R, n]): sums for a
    mean, the maximum (-inf without a local member) for a max."""
    if how == "mean":
        return member.to(x.dtype) @ x
    outs = []
    step = max(1, (1 << 24) // max(1, x.numel()))
    neg = torch.tensor(-math.inf, dtype=x.dtype, device=x.device)
    for r0 in range(0, member.shape[0], step):
        m = member[r0:r0 + step]  # [r, n]
        outs.append(torch.where(m.view(1, 1, *m.shape, 1), x.unsqueeze(2), neg).amax(dim=3))
    if not outs:
        return x.new_zeros(*x.shape[:2], 0, x.shape[3])
    return torch.cat(outs, dim=2)


def _combine(part, how, count, group, counter):
    """The pooled rows from every rank's partial pools; `count` [R] members per region."""
    every = gather(part, group, counter)  # [ranks, B, H, R, D]
    if how == "mean":
        return every.sum(0) / count.clamp(min=1).to(part.dtype).view(-1, 1)
    return every.amax(0)


def _merge(out, lse, group, counter):
    """One softmax over every rank's share of a region's keys, from each share's output
    [B, H, R, D] and log-sum-exp [B, H, R] (-inf: no key on that rank)."""
    outs = gather(out, group, counter)
    lses = gather(lse, group, counter).unsqueeze(-1)
    m = lses.amax(0, keepdim=True).detach()
    m = torch.where(torch.isinf(m), torch.zeros_like(m), m)
    w = torch.exp(lses - m)
    den = w.sum(0)
    return (w * outs).sum(0) / torch.where(den > 0, den, torch.ones_like(den))


def summary_tokens(bp, q, k, v, run, scale, tokens, group, counter):
    """(keys [B, H, R, D], values [B, H, R, Dv], attend [.., n, R]) of every summary's
    non-empty regions for this rank's queries (the driver's summary_tokens), or None. q, k,
    v hold this rank's tokens (`tokens`, a LongTensor of their indices)."""
    cdt = torch.float64 if k.dtype == torch.float64 else torch.float32
    rep = q.shape[1] // k.shape[1]
    qc = q.to(cdt)
    kc = k.to(cdt).repeat_interleave(rep, dim=1)
    vc = v.to(cdt).repeat_interleave(rep, dim=1)
    ks, vs, atts = [], [], []
    for bs in bp.summaries:
        s = bs.summary
        member, att = summary_masks(bp, bs, run, k.device, bp.heads)
        if member.shape[0] == 0:
            continue
        mine = member[:, tokens]  # [R, n]
        count = member.sum(-1)
        key = _combine(_partial(kc, mine, s.keys), s.keys, count, group, counter)
        if s.values == "expectation":
            if bp.nq != bp.nk:
                raise UnsupportedError("'values expectation' pools queries at the key "
                                       "positions; it needs as many queries as keys", s.span)
            qs = _combine(_partial(qc, mine, s.queries), s.queries, count, group, counter)
            inner = (qs @ kc.transpose(-1, -2)) * scale
            o, lse = attend(inner, mine.expand(*inner.shape), vc)
            val = _merge(o, lse, group, counter)
        else:
            val = _combine(_partial(vc, mine, s.values), s.values, count, group, counter)
        att = att.expand(*att.shape[:-2], bp.nq, member.shape[0])[..., tokens, :]
        ks.append(key)
        vs.append(val)
        atts.append(att)
    return stack_summaries(ks, vs, atts)
