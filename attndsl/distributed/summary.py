"""Summary tokens under context parallelism. A summary token's key and value pool a region
of keys that may span several ranks, and the queries that attend it may sit on others.
Every rank derives, from the pattern alone, which ranks hold members of each token (its
owners) and which hold queries attending it (its users); then only what is needed moves:

- each owner pools its own members (sums for a mean, the maximum for a max) and sends
  these partial pools to the token's users, which combine them;
- for Combiner's `expectation`, the owners first exchange their partial pools of the
  region's queries among themselves; each then attends the pooled query over its own
  members and sends that output and its log-sum-exp to the users, which merge them into
  one softmax over the whole region.

Every exchange is one all-to-all with variable splits (comm.send_rows), differentiable;
a rank only receives rows of tokens its queries attend. Then every rank attends them from
its own queries as the single-process driver does (semantics/attention.py)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from attndsl.distributed.comm import send_rows
from attndsl.errors import UnsupportedError
from attndsl.semantics.attention import attend, given_rows, stack_summaries
from attndsl.semantics.masks import (
    bound_tokens,
    chunks,
    queries_at,
    summary_coords,
    summary_masks,
    summary_member,
    summary_rule,
)


@dataclass(frozen=True)
class Route:
    """One exchange of per-token rows: this rank's rows `send` (positions in its own rows,
    grouped by destination), the splits, and the token of each received row."""

    send: torch.Tensor
    send_splits: tuple
    recv_splits: tuple
    recv_tokens: np.ndarray

    def args(self) -> tuple:
        return self.send, self.send_splits, self.recv_splits


def route(have: np.ndarray, want: np.ndarray, me: int, device) -> Route:
    """Rows from every rank r holding a token (have[r]) to every rank wanting it
    (want[r]); this rank's own rows are its tokens have[me] in order."""
    ranks = have.shape[0]
    mine = np.nonzero(have[me])[0]
    at = np.full(have.shape[1], -1, dtype=np.int64)
    at[mine] = np.arange(len(mine))
    send = [at[np.nonzero(have[me] & want[r])[0]] for r in range(ranks)]
    recv = [np.nonzero(have[r] & want[me])[0] for r in range(ranks)]
    return Route(torch.from_numpy(np.concatenate(send)).to(device),
                 tuple(len(x) for x in send), tuple(len(x) for x in recv),
                 np.concatenate(recv))


def _partial(x, member, how):
    """x [B, H, n, D] pooled over each region's local members (member [R, n], every row
    with one at least): sums for a mean, the maximum for a max."""
    if how == "mean":
        return member.to(x.dtype) @ x
    outs = []
    step = max(1, (1 << 24) // max(1, x.numel()))
    neg = torch.tensor(-torch.inf, dtype=x.dtype, device=x.device)
    for r0 in range(0, member.shape[0], step):
        m = member[r0:r0 + step]  # [r, n]
        outs.append(torch.where(m.view(1, 1, *m.shape, 1), x.unsqueeze(2), neg).amax(dim=3))
    if not outs:
        return x.new_zeros(*x.shape[:2], 0, x.shape[3])
    return torch.cat(outs, dim=2)


def _combine(rows, tokens: np.ndarray, into: np.ndarray, how: str, count):
    """Received partial pools rows [B, H, m, D] of `tokens` combined per token of `into`
    (sorted; `count` [R] members of every token)."""
    pos = torch.from_numpy(np.searchsorted(into, tokens)).to(rows.device)
    shape = (*rows.shape[:2], len(into), rows.shape[3])
    if how == "mean":
        total = rows.new_zeros(shape).index_add(2, pos, rows)
        n = count[torch.from_numpy(into).to(count.device)].clamp(min=1).to(rows.dtype)
        return total / n.view(-1, 1)
    idx = pos.view(1, 1, -1, 1).expand(rows.shape)
    return rows.new_zeros(shape).scatter_reduce(2, idx, rows, "amax", include_self=False)


def _merge(out, lse, tokens: np.ndarray, into: np.ndarray):
    """One softmax over every owner's share of a region's keys, from each share's output
    [B, H, m, D] and log-sum-exp [B, H, m] (received rows of `tokens`), per token of
    `into`."""
    pos = torch.from_numpy(np.searchsorted(into, tokens)).to(out.device)
    shape = (*out.shape[:2], len(into))
    m = lse.detach().new_full(shape, -torch.inf).scatter_reduce(
        2, pos.view(1, 1, -1).expand(lse.shape), lse.detach(), "amax")
    m = torch.where(torch.isinf(m), torch.zeros_like(m), m)
    w = torch.exp(lse - m.index_select(2, pos))
    den = w.new_zeros(shape).index_add(2, pos, w)
    num = out.new_zeros((*shape, out.shape[3])).index_add(2, pos, w.unsqueeze(-1) * out)
    return num / torch.where(den > 0, den, torch.ones_like(den)).unsqueeze(-1)


@dataclass(frozen=True)
class Local:
    """One call's float copies of this rank's q, k, v (k, v repeated to q's heads), its
    token indices, every rank's tokens, its rank and the collectives' group and byte
    counter: what every summary's exchange reads."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    tokens: torch.Tensor  # this rank's token indices (LongTensor)
    held: list  # per rank, its token indices (numpy)
    me: int
    group: object
    counter: list


def local(q, k, v, tokens, held, group, counter) -> Local:
    cdt = torch.float64 if k.dtype == torch.float64 else torch.float32
    rep = q.shape[1] // k.shape[1]
    return Local(q.to(cdt), k.to(cdt).repeat_interleave(rep, dim=1),
                 v.to(cdt).repeat_interleave(rep, dim=1), tokens, held,
                 dist.get_rank(group), group, counter)


def _exchange(s, member, want: np.ndarray, loc: Local, scale, dep, query_at=None):
    """(pooled keys [B, H, U, D] or None (given), values [B, H, U, Dv] or None (given), dep)
    of one summary's tokens `used` = want[me] (in order): owners (ranks holding a member
    key of a token some rank wants) send partial pools to the ranks wanting it; for an
    `expectation`, the owners first share the pooled query (or, with `query_at` [R], the
    query at that token, from the rank holding it), attend over their own members and send
    (output, log-sum-exp) shares, merged into one softmax."""
    me, dev = loc.me, loc.k.device
    cpu = member.cpu()
    have = np.stack([cpu[:, torch.from_numpy(t)].any(1).numpy() for t in loc.held])
    have &= want.any(0)  # a token no query attends is never pooled
    used, mine = np.nonzero(want[me])[0], np.nonzero(have[me])[0]
    own = member[torch.from_numpy(mine).to(member.device)][:, loc.tokens]  # [mine, n]
    count = member.sum(-1)
    out = route(have, want, me, dev)
    args = (loc.group, loc.counter)
    key = val = None
    if s.keys_from is None:
        got, dep = send_rows(_partial(loc.k, own, s.keys), dep, *out.args(), *args)
        key = _combine(got, out.recv_tokens, used, s.keys, count)
    if s.values_from is not None:
        return key, val, dep
    if s.values != "expectation":
        got, dep = send_rows(_partial(loc.v, own, s.values), dep, *out.args(), *args)
        return key, _combine(got, out.recv_tokens, used, s.values, count), dep
    if query_at is None:
        peers = route(have, have, me, dev)  # owners to owners
        got, dep = send_rows(_partial(loc.q, own, s.queries), dep, *peers.args(), *args)
        qs = _combine(got, peers.recv_tokens, mine, s.queries, count)
    else:  # one query per token, from the rank holding it to the token's owners
        holder = np.full(sum(len(t) for t in loc.held), -1, dtype=np.int64)
        for rank, t in enumerate(loc.held):
            holder[t] = rank
        qhave = np.zeros_like(have)
        qhave[holder[query_at], np.arange(len(query_at))] = True
        qhave &= have.any(0)
        row = np.full(len(holder), -1, dtype=np.int64)
        row[loc.tokens.cpu().numpy()] = np.arange(len(loc.tokens))
        sel = torch.from_numpy(row[query_at[np.nonzero(qhave[me])[0]]]).to(dev)
        peers = route(qhave, have, me, dev)
        got, dep = send_rows(loc.q.index_select(2, sel), dep, *peers.args(), *args)
        qs = _combine(got, peers.recv_tokens, mine, "mean", torch.ones_like(count))
    inner = (qs @ loc.k.transpose(-1, -2)) * scale
    o, lse = attend(inner, own.expand(*inner.shape), loc.v)
    got, dep = send_rows(torch.cat([o, lse.unsqueeze(-1)], -1), dep, *out.args(), *args)
    return key, _merge(got[..., :-1], got[..., -1], out.recv_tokens, used), dep


def summary_tokens(bp, loc: Local, run, scale, dep):
    """((keys [B, H, R', D], values [B, H, R', Dv], attend [.., n, R']) of the summary
    tokens this rank's queries attend (the driver's summary_tokens restricted to them), or
    None; and `dep` after its collectives (comm.order))."""
    ks, vs, atts = [], [], []
    for bs in bp.core_summaries:
        s = bs.summary
        member, att = summary_masks(bp, bs, run, loc.k.device, bp.heads)
        if member.shape[0] == 0:
            continue
        if s.values == "expectation" and bp.nq != bp.nk:
            raise UnsupportedError("'values expectation' pools queries at the key positions; "
                                   "it needs as many queries as keys", s.span)
        att = att.expand(*att.shape[:-2], bp.nq, member.shape[0])
        cpu_att = att.cpu()  # users: the ranks holding a query attending a token
        want = np.stack([cpu_att[..., torch.from_numpy(t), :].flatten(0, -2).any(0).numpy()
                         for t in loc.held])
        key, val, dep = _exchange(s, member, want, loc, scale, dep)
        used = torch.from_numpy(np.nonzero(want[loc.me])[0]).to(att.device)
        ks.append(key)
        vs.append(val)
        atts.append(att[..., loc.tokens, :][..., used])
    return stack_summaries(ks, vs, atts), dep


def extended_tokens(bp, bs, loc: Local, run, scale, dep):
    """(keys [B, H, R, D], values [B, H, R, Dv], exists [R] or None, dep) of a summary the
    driver computes (semantics/attention.extended_tokens), exact at every token this rank's
    queries may attend and 0 elsewhere: given keys and values are read from the inputs
    (whole on every rank); pooled ones move as in summary_tokens (_exchange)."""
    s = bs.summary
    dev = loc.k.device
    B, H = loc.q.shape[:2]
    r = math.prod(bs.sizes)
    member = None
    if s.member is not None and (s.keys_from is None or s.values_from is None):
        member = summary_member(bp, bs, run, dev)  # [R, N]
    exists = None if s.keys_from is not None else member.any(-1)
    want = np.stack([_may_attend(bp, bs, run, torch.from_numpy(t).to(dev), exists)
                     for t in loc.held])
    key = val = None
    if member is not None:
        at = None if s.queries_at is None else queries_at(bp, bs, run, dev).cpu().numpy()
        key, val, dep = _exchange(s, member, want, loc, scale, dep, at)
    used = torch.from_numpy(np.nonzero(want[loc.me])[0]).to(dev)

    def full(rows):
        return rows.new_zeros(B, H, r, rows.shape[3]).index_copy(2, used, rows)

    cdt = loc.k.dtype
    ks = given_rows(run, s.keys_from, H, cdt) if key is None else full(key)
    vs = given_rows(run, s.values_from, H, cdt) if val is None else full(val)
    return ks, vs, exists, dep


def _may_attend(bp, bs, run, qidx, exists) -> np.ndarray:
    """[R] bool: the tokens some query of `qidx` attends under some head (the attend rule;
    with bound axes, over the tokens the query's coordinates choose), with a member."""
    r = math.prod(bs.sizes)
    dev = qidx.device
    out = torch.zeros(r, dtype=torch.bool, device=dev)
    bound = any(ax.bound is not None for ax in bs.summary.axes)
    heads = torch.arange(bp.heads, device=dev).view(-1, 1, 1) if bp.heads else None
    coords = {a: c.view(1, -1) for a, c in summary_coords(bs, dev).items()}
    for a, b in chunks(len(qidx), r):
        rows = qidx[a:b]
        if bound:
            tok, valid = bound_tokens(bp, bs, run, rows)  # [m, R']
            att = torch.as_tensor(summary_rule(bp, bs, run, bs.summary.attend,
                                               rows.view(-1, 1), summary_coords(bs, dev, tok),
                                               heads), device=dev)
            att = att.expand(*att.shape[:-2], *tok.shape).reshape(-1, *tok.shape)
            out[tok[att.any(0) & valid]] = True
        else:
            att = torch.as_tensor(summary_rule(bp, bs, run, bs.summary.attend,
                                               rows.view(-1, 1), coords, heads), device=dev)
            out |= att.expand(*att.shape[:-2], len(rows), r).reshape(-1, r).any(0)
    if exists is not None:
        out &= exists
    return out.cpu().numpy()

