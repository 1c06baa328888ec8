"""Content-dependent selection: DHSA's `chunk_topk` (arXiv 2510.24606), computed from a
call's q and k. The selection is kept in the call's RunInputs, never in the pattern."""

from __future__ import annotations

import math

import torch

from attndsl.errors import EvaluationError, InputError


def chunk_topk(bp, ctx: dict, args: dict, run, span):
    """DHSA's kept chunks per query block, upsampled to the tokens of this context."""
    content = run.content
    if content is None:
        raise InputError(f"pattern '{bp.name}' depends on q and k: call mask(q=..., k=...)",
                         span)
    block, chunk, topk = args["block"], args["chunk"], args["topk"]
    starts = args["starts"]
    if starts is False:
        starts = None
    if block < 1 or chunk < 1 or topk < 0:
        raise EvaluationError("chunk_topk needs block >= 1, chunk >= 1 and topk >= 0", span)
    key = ("chunk_topk", block, chunk, topk, None if starts is None else id(starts))
    got = run.memo.get(key)
    if got is None:
        got = run.memo[key] = keep_chunks(content[0], content[1], block, chunk, topk, starts,
                                          span)
    keep, chunk_of = got
    q = ctx["q"].index
    k = ctx["k"].index
    qb = (q // block).to(keep.device)
    ck = chunk_of.to(keep.device)[k.to(keep.device)]
    return keep[:, :, qb, ck]


def keep_chunks(q, k, block, chunk, topk, starts, span):
    """(keep [B, H, query blocks, chunks] bool, chunk of each key [N]): every query block
    keeps the chunks it overlaps and the `topk` earlier chunks whose length-normalised mean
    key best matches its length-normalised mean query (ties: the later chunk)."""
    n = q.shape[2]
    if k.shape[2] != n:
        raise InputError("chunk_topk needs as many queries as keys", span)
    dev = q.device
    if starts is None:
        starts = torch.arange(0, n, chunk, device=dev)
    else:
        starts = starts.to(dev).long()
        if starts.dim() != 1 or starts.numel() == 0 or int(starts[0]) != 0:
            raise InputError("chunk boundaries must be a 1-D int tensor starting at 0", span)
        if starts.numel() > 1 and bool((starts[1:] <= starts[:-1]).any()):
            raise InputError("chunk boundaries must be strictly increasing", span)
        if int(starts[-1]) >= n:
            raise InputError(f"chunk boundary {int(starts[-1])} is past the sequence end "
                             f"({n})", span)
    ends = torch.cat([starts[1:], torch.tensor([n], device=dev)])
    nc = starts.numel()
    chunk_of = torch.searchsorted(starts, torch.arange(n, device=dev), right=True) - 1
    nb = -(-n // block)
    b_start = torch.arange(nb, device=dev) * block
    b_end = torch.clamp(b_start + block, max=n)
    # length-normalised means: sqrt(|C|) * mean = sum / sqrt(|C|)
    qd, kd = q.double(), k.double()
    bid = torch.arange(n, device=dev) // block
    qsum = torch.zeros(q.shape[0], q.shape[1], nb, q.shape[3], dtype=torch.float64, device=dev)
    qsum.index_add_(2, bid, qd)
    ksum = torch.zeros(k.shape[0], k.shape[1], nc, k.shape[3], dtype=torch.float64, device=dev)
    ksum.index_add_(2, chunk_of, kd)
    rep_q = qsum / torch.sqrt((b_end - b_start).double()).view(1, 1, -1, 1)
    rep_k = ksum / torch.sqrt((ends - starts).double()).view(1, 1, -1, 1)
    sim = rep_q @ rep_k.transpose(-1, -2)  # [B, H, nb, nc]
    overlap = (starts.view(1, -1) < b_end.view(-1, 1)) & (ends.view(1, -1) > b_start.view(-1, 1))
    cand = (~overlap) & (starts.view(1, -1) <= (b_end - 1).view(-1, 1))
    keep = overlap.expand(sim.shape).clone()
    if topk > 0:
        # ties break toward the later chunk: reverse, stable sort descending
        s = torch.where(cand, sim, torch.tensor(-math.inf, dtype=sim.dtype, device=dev))
        rev = s.flip(-1)
        order = torch.sort(rev, dim=-1, descending=True, stable=True).indices
        top = order[..., :topk]
        idx = nc - 1 - top
        picked = torch.zeros_like(keep)
        picked.scatter_(-1, idx, True)
        keep |= picked & cand
    return keep, chunk_of
