"""Content-dependent selection: DHSA's `chunk_topk` (arXiv 2510.24606), computed from a
call's q and k. The selection is kept in the call's RunInputs, never in the pattern.

Two budgets: `topk` chunks per query block (the chunks it overlaps always kept), or
`budget` tokens per query block as xiongsiheng/DHSA's `dhsa_sdpa` counts them (the `local`
most recent keys before the block's end, then the best-scoring keys, a chunk cut where the
budget ends; the first `sinks` keys spliced in). Ranks per head, or with `shared` once for
every head from q and k averaged over the heads. The last `tail` queries are in no block.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from attndsl.errors import EvaluationError, InputError
from attndsl.semantics.inputs import SELECTED, UNSELECTED


@dataclass(frozen=True)
class Selection:
    """chunk_topk's static arguments, checked."""

    block: int
    chunk: int
    topk: int
    shared: bool = False
    budget: int = 0
    local: int = 0
    sinks: int = 0
    norm: bool = True
    tail: int = 0

    @staticmethod
    def of(args: dict, span) -> Selection:
        sel = Selection(*(args[n] for n in ("block", "chunk", "topk", "shared", "budget",
                                             "local", "sinks", "norm", "tail")))
        if sel.block < 1 or sel.chunk < 1 or sel.topk < 0:
            raise EvaluationError("chunk_topk needs block >= 1, chunk >= 1 and topk >= 0", span)
        if min(sel.budget, sel.local, sel.sinks, sel.tail) < 0:
            raise EvaluationError("chunk_topk needs budget, local, sinks and tail >= 0", span)
        if sel.budget and sel.topk:
            raise EvaluationError("chunk_topk takes a budget of 'topk' chunks or of 'budget' "
                                  "tokens, not both", span)
        if not sel.budget and (sel.local or sel.sinks):
            raise EvaluationError("chunk_topk's 'local' and 'sinks' count tokens of a "
                                  "'budget'; give budget > 0", span)
        return sel


def chunk_topk(bp, ctx: dict, args: dict, run, span):
    """DHSA's kept keys per query block, at the query and key indices of this context."""
    content = run.content
    if content is UNSELECTED or content is SELECTED:
        shape = torch.broadcast_shapes(ctx["q"].index.shape, ctx["k"].index.shape)
        return torch.full(shape, content is SELECTED, dtype=torch.bool)
    if content is None:
        raise InputError(f"pattern '{bp.name}' depends on q and k: call mask(q=..., k=...)",
                         span)
    sel = Selection.of(args, span)
    starts = args["starts"]
    if starts is False:
        starts = None
    key = ("chunk_topk", sel, None if starts is None else id(starts))
    got = run.memo.get(key)
    if got is None:
        got = run.memo[key] = select(content[0], content[1], sel, starts, span)
    keep, first = got
    q = ctx["q"].index.to(keep.device)
    k = ctx["k"].index.to(keep.device)
    qb = torch.clamp(q // sel.block, max=max(keep.shape[2] - 1, 0))
    if keep.shape[2] == 0:  # every query is in the tail
        return torch.zeros(torch.broadcast_shapes(q.shape, k.shape), dtype=torch.bool,
                           device=keep.device)
    if (q.dim() >= 2 and q.shape[-1] == 1 and q.shape[-2] > 1 and k.dim() >= 2
            and k.shape[-2] == 1 and bool((qb == qb[..., :1, :]).all())):
        # rows of a tile in one selection block (the CPU backend's [items, rows, 1] x
        # [items, 1, keys]): gather each tile's keys once, not once per row
        got = keep[:, :, qb[..., :1, :], k]
        before = q < first
        return got if bool(before.all()) else got & before
    return keep[:, :, qb, k] & (q < first)


def select(q, k, sel: Selection, starts, span):
    """(keep [B, H or 1, query blocks, N] bool: the keys kept for each block, the number of
    queries in blocks). q, k [B, H, N, D] (k's heads repeated to q's)."""
    n = q.shape[2]
    if k.shape[2] != n:
        raise InputError("chunk_topk needs as many queries as keys", span)
    dev = q.device
    first = max(n - sel.tail, 0)
    qd, kd = q.detach().double(), k.detach().double()
    if sel.shared:
        qd, kd = qd.mean(1, keepdim=True), kd.mean(1, keepdim=True)
    bounds = _starts(starts, n, sel.chunk, q.shape[0], dev, span)  # [B or 1, L]
    rows = []
    for b in range(q.shape[0]):
        st = bounds[min(b, bounds.shape[0] - 1)]
        if sel.budget:
            rows.append(_budget(qd[b], kd[b], sel, st, first))
        else:
            rows.append(_chunks(qd[b], kd[b], sel, st, first))
    return torch.stack(rows), first


def _starts(starts, n, chunk, batch, dev, span):
    """Chunk starts as [B or 1, L]: the run-time input's rows, or every `chunk` tokens."""
    if starts is None:
        # a chunk longer than the sequence is one chunk (torch.arange's length overflows
        # for steps near 2^63 and comes back empty)
        return torch.arange(0, n, min(chunk, max(n, 1)), device=dev).view(1, -1)
    starts = starts.to(dev).long()
    if starts.dim() == 1:
        starts = starts.view(1, -1)
    if starts.dim() != 2 or starts.shape[1] == 0 or bool((starts[:, 0] != 0).any()):
        raise InputError("chunk boundaries must be a 1-D int tensor starting at 0 (or one "
                         "such row per batch element)", span)
    if starts.shape[0] not in (1, batch):
        raise InputError(f"chunk boundaries have {starts.shape[0]} rows for a batch of "
                         f"{batch}", span)
    if starts.shape[1] > 1 and bool((starts[:, 1:] <= starts[:, :-1]).any()):
        raise InputError("chunk boundaries must be strictly increasing", span)
    if int(starts[:, -1].max()) >= n:
        raise InputError(f"chunk boundary {int(starts[:, -1].max())} is past the sequence end "
                         f"({n})", span)
    return starts


def _scores(qh, kh, sel: Selection, starts, first):
    """Chunk scores [H, blocks, chunks] and each key's chunk [N]: the block's summed
    queries (a positive factor per block does not change its ranking) against each chunk's
    mean key, times sqrt(its length) with `norm` (DHSA's 'avgpool_norm')."""
    H, n, D = kh.shape
    dev = kh.device
    nb = -(-first // sel.block)
    chunk_of = torch.searchsorted(starts, torch.arange(n, device=dev), right=True) - 1
    ends = torch.cat([starts[1:], torch.tensor([n], device=dev)])
    lens = (ends - starts).double()
    ksum = torch.zeros(H, starts.numel(), D, dtype=torch.float64, device=dev)
    ksum.index_add_(1, chunk_of, kh)
    rep_k = ksum / (lens.sqrt() if sel.norm else lens).view(1, -1, 1)
    qsum = torch.zeros(H, nb, D, dtype=torch.float64, device=dev)
    qsum.index_add_(1, torch.arange(first, device=dev) // sel.block, qh[:, :first])
    return qsum @ rep_k.transpose(-1, -2), chunk_of, ends


def _later_first(s, k: int):
    """The k best of scores s [..., n] (-inf excluded), ties toward the later index, as a
    bool [..., n]."""
    order = torch.sort(s.flip(-1), dim=-1, descending=True, stable=True).indices[..., :k]
    out = torch.zeros(s.shape, dtype=torch.bool, device=s.device)
    out.scatter_(-1, s.shape[-1] - 1 - order, True)
    return out & torch.isfinite(s)


def _chunks(qh, kh, sel: Selection, starts, first):
    """`topk` chunks per block: the chunks it overlaps, and the best-scoring chunks that
    start at or before its last query; [H, blocks, N]."""
    sim, chunk_of, ends = _scores(qh, kh, sel, starts, first)
    dev = sim.device
    nb = sim.shape[1]
    b_start = torch.arange(nb, device=dev) * sel.block
    b_end = torch.clamp(b_start + sel.block, max=first)
    overlap = (starts.view(1, -1) < b_end.view(-1, 1)) & (ends.view(1, -1) > b_start.view(-1, 1))
    cand = (~overlap) & (starts.view(1, -1) <= (b_end - 1).view(-1, 1))
    keep = overlap.expand(sim.shape).clone()
    if sel.topk > 0:
        s = torch.where(cand, sim, torch.tensor(-math.inf, dtype=sim.dtype, device=dev))
        keep |= _later_first(s, sel.topk)
    return keep[:, :, chunk_of]


def _budget(qh, kh, sel: Selection, starts, first):
    """`budget` tokens per block (DHSA's dhsa_sdpa): among the keys before the block's
    padded end, the `local` most recent, then the best-scoring (by their chunk's score;
    ties toward the later key); with `sinks`, the first `sinks` keys (capped at the
    block's last key) replace the lowest-numbered of them; [H, blocks, N]."""
    sim, chunk_of, _ = _scores(qh, kh, sel, starts, first)
    H, nb, _ = sim.shape
    n = kh.shape[1]
    dev = sim.device
    tok = sim[:, :, chunk_of]  # [H, blocks, N]
    budget = min(sel.budget, n)
    keys = torch.arange(n, device=dev)
    keep = torch.zeros(H, nb, n, dtype=torch.bool, device=dev)
    neg = torch.tensor(-math.inf, dtype=torch.float64, device=dev)
    for i in range(nb):
        upper = min((i + 1) * sel.block, n)  # keys before the block's padded end
        recent = min(sel.local, budget, upper)
        row = (keys >= upper - recent) & (keys < upper)
        pick = min(budget - recent, upper - recent)
        if pick > 0:
            s = torch.where(keys < upper - recent, tok[:, i], neg)
            row = row | _later_first(s, pick)
        else:
            row = row.expand(H, n)
        if sel.sinks:
            row = row.expand(H, n)
            if sel.sinks < budget:  # the `sinks` lowest-numbered kept keys make way
                rank = torch.cumsum(row.long(), -1)
                row = row & (rank > sel.sinks)
                row = row | (keys < min(sel.sinks, upper)).view(1, -1)
            else:
                row = (keys < min(budget, upper)).view(1, -1).expand(H, n)
        keep[:, i] = row
    return keep
