"""The reference backend: an exact, readable, dense PyTorch implementation of every construct.

It is the oracle for every faster backend: O(N^2) by design, float64 capable, and bounded
by REFERENCE_LIMIT score entries so that huge sizes fail fast instead of exhausting memory.
"""

from __future__ import annotations

import math

import torch

from .bind import CHUNK_ELEMS, BoundPattern, _Hooks, unknown_input
from .errors import EvaluationError, InputError, SizeLimitError, UnsupportedError
from .evaluate import SummaryVal, token

REFERENCE_LIMIT = 1 << 26  # batch x heads x queries x (keys + summary tokens)
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# ---------------------------------------------------------------- run-time inputs


def check_inputs(bp: BoundPattern, given: dict, device=None, batch=None,
                 for_mask: bool = False) -> dict:
    """Validate run-time inputs against their declarations; return them as tensors.

    With `for_mask`, a router input is optional: routing gates outputs, not the mask."""
    out = {}
    for name in given:
        if name not in bp.inputs:
            raise unknown_input(bp, name)
    for name, (kind, dims, optional, span) in bp.inputs.items():
        v = given.get(name)
        if v is None:
            if optional or (for_mask and bp.route is not None and name == bp.route[0]):
                out[name] = None
                continue
            shape = "" if not dims else "[" + ", ".join("*" if d is None else str(d)
                                                        for d in dims) + "]"
            raise InputError(f"pattern '{bp.name}' needs run-time input '{name}' "
                             f"({kind}{shape})", span)
        if not isinstance(v, torch.Tensor):
            try:
                v = torch.as_tensor(v)
            except (TypeError, ValueError, RuntimeError):
                raise InputError(f"run-time input '{name}' must be a tensor or number, not "
                                 f"{type(v).__name__}", span) from None
        if kind == "int" and (v.is_floating_point() or v.is_complex() or v.dtype == torch.bool):
            raise InputError(f"run-time input '{name}' must have an integer dtype, not "
                             f"{v.dtype}", span)
        if kind == "float" and not v.is_floating_point():
            raise InputError(f"run-time input '{name}' must have a floating dtype, not "
                             f"{v.dtype}", span)
        if v.dim() != len(dims) or any(d is not None and d != s for d, s in zip(dims, v.shape)):
            want = "a scalar" if not dims else "[" + ", ".join(
                "*" if d is None else str(d) for d in dims) + "]"
            must = "be a scalar, not shape" if not dims else f"have shape {want}, not"
            raise InputError(f"run-time input '{name}' must {must} {list(v.shape)}", span)
        if device is not None and v.device != device:
            raise InputError(f"run-time input '{name}' is on {v.device}, the tensors on "
                             f"{device}", span)
        if kind == "int":
            v = v.long()
        out[name] = v
    if bp.route is not None and batch is not None and out.get(bp.route[0]) is not None:
        r = out[bp.route[0]]
        if r.shape[0] != batch or r.shape[1] != bp.nq or r.shape[2] != bp.heads - bp.route[2]:
            raise InputError(f"router '{bp.route[0]}' must have shape [{batch}, {bp.nq}, "
                             f"{bp.heads - bp.route[2]}], not {list(r.shape)}",
                             bp.inputs[bp.route[0]][3])
    for sub in bp.average:
        check_inputs(sub, {k: v for k, v in given.items() if k in sub.inputs}, device, batch,
                     for_mask)
    return out


def _input_env(bp: BoundPattern, inputs: dict) -> None:
    for name, v in inputs.items():
        if v is not None and v.dim() == 0:
            bp.env[name] = v.item()
        else:
            bp.env[name] = v


# ---------------------------------------------------------------- masks


def dense_mask(bp: BoundPattern, inputs: dict, content=None, device=None) -> torch.Tensor:
    """[Nq, Nk], [H, Nq, Nk] (per-head) or [B, H, Nq, Nk] (content-dependent) bool mask."""
    heads = None
    if bp.head_dependent:
        heads = bp.heads
        if heads is None:
            raise UnsupportedError("per-head rules need a 'heads N' declaration",
                                   bp.checked.span)
    lead = []
    if bp.content_dependent:
        if content is None:
            raise InputError(f"pattern '{bp.name}' depends on q and k: call mask(q=..., k=...)",
                             bp.checked.span)
        lead = [content[0].shape[0], content[0].shape[1]]
    elif heads is not None:
        lead = [heads]
    bp.check_size(math.prod(lead) if lead else 1)
    device = device or torch.device("cpu")
    for owner in bp.owners():
        _input_env(owner, inputs)
    hooks = _Hooks(bp, {"inputs": inputs, "content": content})
    out = torch.empty(lead + [bp.nq, bp.nk], dtype=torch.bool, device=device)
    rows = max(1, CHUNK_ELEMS // max(1, bp.nk * max(1, math.prod(lead))))
    kidx = torch.arange(bp.nk, device=device).view(1, -1)
    h = torch.arange(heads, device=device).view(-1, 1, 1) if heads is not None else None
    for q0 in range(0, bp.nq, rows):
        q1 = min(bp.nq, q0 + rows)
        qidx = torch.arange(q0, q1, device=device).view(-1, 1)
        val = bp.predicate(bp.context(qidx, kidx, h), hooks)
        out[..., q0:q1, :] = val.to(device).expand(lead + [q1 - q0, bp.nk])
    return out


def summary_masks(bp: BoundPattern, bs, inputs, device, heads, rows: bool = False):
    """(member [R, Nk], attend [H?, Nq, R]) of one summary, with empty regions dropped
    (and, with `rows`, the indices of the regions kept)."""
    s = bs.summary
    owner = bs.owner
    hooks = _Hooks(owner, {"inputs": inputs})
    sizes = bs.sizes
    r = math.prod(sizes)
    if r * bp.nk > (1 << 28) or r * bp.nq > (1 << 28):
        raise SizeLimitError(f"summary '{s.name}' has {r:,} tokens; too many for the "
                             "reference backend", s.span)
    ridx = torch.arange(r, device=device)
    coords = {}
    rem = ridx
    for ax, size in reversed(list(zip(s.axes, sizes))):
        coords[ax.name] = rem % size
        rem = rem // size
    kidx = torch.arange(bp.nk, device=device).view(1, -1)
    ctx = {"k": token(kidx, bp.kshape, owner.checked.kspace.axes),
           "summary": SummaryVal({a: c.view(-1, 1) for a, c in coords.items()})}
    member = owner.evaluator(ctx, hooks).eval(s.member)
    member = torch.as_tensor(member, device=device).expand(r, bp.nk)
    keep = member.any(dim=1)
    qidx = torch.arange(bp.nq, device=device).view(-1, 1)
    ctx = {"q": token(qidx, bp.qshape, owner.checked.qspace.axes),
           "summary": SummaryVal({a: c.view(1, -1) for a, c in coords.items()})}
    if heads is not None:
        ctx["h"] = torch.arange(heads, device=device).view(-1, 1, 1)
    att = torch.as_tensor(owner.evaluator(ctx, hooks).eval(s.attend), device=device)
    att = att.expand(*att.shape[:-2], bp.nq, r) if att.dim() >= 2 else att.expand(bp.nq, r)
    if rows:
        return member[keep], att[..., keep], torch.nonzero(keep).view(-1)
    return member[keep], att[..., keep]


# ---------------------------------------------------------------- DHSA


def chunk_topk(bp: BoundPattern, ctx: dict, args: dict, runtime: dict, span):
    """DHSA's kept chunks per query block, upsampled to the tokens of this context."""
    content = runtime.get("content")
    if content is None:
        raise InputError(f"pattern '{bp.name}' depends on q and k: call mask(q=..., k=...)",
                         span)
    block, chunk, topk = args["block"], args["chunk"], args["topk"]
    starts = args["starts"]
    if block < 1 or chunk < 1 or topk < 0:
        raise EvaluationError("chunk_topk needs block >= 1, chunk >= 1 and topk >= 0", span)
    key = ("chunk_topk", block, chunk, topk, id(content[0]), id(content[1]),
           None if starts is None or starts is False else id(starts))
    keep_and_ids = bp.cache.get(key)
    if keep_and_ids is None:
        keep_and_ids = _dhsa_keep(content[0], content[1], block, chunk, topk,
                                  None if starts is None or starts is False else starts, span)
        bp.cache.clear()
        bp.cache[key] = keep_and_ids
    keep, chunk_of = keep_and_ids
    q = ctx["q"].index
    k = ctx["k"].index
    qb = (q // block).to(keep.device)
    ck = chunk_of.to(keep.device)[k.to(keep.device)]
    return keep[:, :, qb, ck]


def _dhsa_keep(q, k, block, chunk, topk, starts, span):
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


# ---------------------------------------------------------------- attention


def check_tensors(bp: BoundPattern, q, k, v):
    at = bp.checked.span  # errors point at the pattern, or at its space or heads statement
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise InputError(f"{name} must be a torch.Tensor, not {type(t).__name__}", at)
        if t.dim() != 4:
            raise InputError(f"{name} must have 4 dimensions [batch, heads, tokens, dim], not "
                             f"{list(t.shape)}", at)
        if t.dtype not in FLOAT_DTYPES:
            raise InputError(f"{name} must be float16, bfloat16, float32 or float64, not "
                             f"{t.dtype}", at)
    if not (q.dtype == k.dtype == v.dtype):
        raise InputError(f"q, k, v must share one dtype, not {q.dtype}, {k.dtype}, {v.dtype}",
                         at)
    if not (q.device == k.device == v.device):
        raise InputError(f"q, k, v must be on one device, not {q.device}, {k.device}, "
                         f"{v.device}", at)
    if not (q.shape[0] == k.shape[0] == v.shape[0]):
        raise InputError(f"q, k, v must share the batch size, not {q.shape[0]}, {k.shape[0]},"
                         f" {v.shape[0]}", at)
    if k.shape[1] != v.shape[1] or k.shape[2] != v.shape[2]:
        raise InputError(f"k and v must have the same heads and tokens, not {list(k.shape)} "
                         f"and {list(v.shape)}", at)
    if k.shape[1] == 0 or q.shape[1] % k.shape[1]:
        raise InputError(f"query heads ({q.shape[1]}) must be a multiple of key/value heads "
                         f"({k.shape[1]})", at)
    if bp.channel:
        if q.shape[2] != k.shape[2]:
            raise InputError("channel attention needs q and k with the same positions, not "
                             f"{q.shape[2]} and {k.shape[2]}", at)
        if q.shape[3] != bp.nq or k.shape[3] != bp.nk or v.shape[3] != bp.nk:
            raise InputError(f"channel tokens: the last dimension must be the {bp.nq} channels"
                             f" of a group, not q {q.shape[3]}, k {k.shape[3]}, v "
                             f"{v.shape[3]}", at)
    else:
        if q.shape[3] != k.shape[3]:
            raise InputError(f"q and k must have the same head dim, not {q.shape[3]} and "
                             f"{k.shape[3]}", at)
        if q.shape[2] != bp.nq:
            raise InputError(f"q has {q.shape[2]} tokens; pattern '{bp.name}' has {bp.nq} "
                             f"queries {_shape(bp.qshape)}", _space_span(bp, "qspace"))
        if k.shape[2] != bp.nk:
            raise InputError(f"k has {k.shape[2]} tokens; pattern '{bp.name}' has {bp.nk} keys "
                             f"{_shape(bp.kshape)}", _space_span(bp, "kspace"))
    if bp.heads is not None and q.shape[1] != bp.heads:
        raise InputError(f"pattern '{bp.name}' is declared for {bp.heads} heads; q has "
                         f"{q.shape[1]}",
                         bp.checked.heads.span if bp.checked.heads is not None else at)


def _space_span(bp: BoundPattern, which: str):
    sp = getattr(bp.checked, which)
    return sp.span if sp is not None else bp.checked.span


def _shape(s):
    return "(" + " x ".join(map(str, s)) + ")"


def attention(bp: BoundPattern, q, k, v, inputs: dict, scale: float | None = None):
    """Dense attention with every construct of the pattern; returns q's dtype and shape."""
    check_tensors(bp, q, k, v)
    inputs = check_inputs(bp, inputs, q.device, q.shape[0])
    if bp.average:
        outs = [attention(sub, q, k, v, {n: x for n, x in inputs.items() if n in sub.inputs},
                          scale) for sub in bp.average]
        return sum(outs) / len(outs)
    dtype = q.dtype
    cdt = torch.float64 if dtype == torch.float64 else torch.float32
    if bp.channel:
        q, k, v = (t.transpose(-1, -2) for t in (q, k, v))
    rep = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(rep, dim=1)
    v = v.repeat_interleave(rep, dim=1)
    B, H, Nq, D = q.shape
    Nk = k.shape[2]
    r_total = sum(math.prod(s.sizes) for s in bp.summaries)
    n = B * H * Nq * (Nk + r_total)
    if n > REFERENCE_LIMIT:
        raise SizeLimitError(f"the reference backend holds all {B}x{H}x{Nq}x{Nk + r_total} = "
                             f"{n:,} scores at once, over its limit of {REFERENCE_LIMIT:,} "
                             "(2^26); use smaller sizes", bp.checked.span)
    qc, kc, vc = q.to(cdt), k.to(cdt), v.to(cdt)
    if scale is None:
        scale = bp.scale if bp.scale is not None else 1.0 / math.sqrt(D)
    content = (q, k) if bp.content_dependent else None
    mask = dense_mask(bp, inputs, content, q.device)
    logits = (qc @ kc.transpose(-1, -2)) * scale
    hidx = torch.arange(H, device=q.device).view(-1, 1, 1)
    for owner, sc, hr in bp.scores:
        if sc.kind != "bias":
            continue
        kidx = torch.arange(Nk, device=q.device).view(1, -1)
        qidx = torch.arange(Nq, device=q.device).view(-1, 1)
        ctx = owner.context(qidx, kidx, hidx if owner.heads is not None else None)
        ev = owner.evaluator(ctx, _Hooks(owner, {"inputs": inputs}))
        b = torch.as_tensor(ev.eval(sc.expr), device=q.device).to(cdt)
        if hr is not None:
            b = b * ((hidx >= hr[0]) & (hidx < hr[1])).to(cdt)
        logits = logits + b
    if bp.softcap is not None:
        logits = bp.softcap * torch.tanh(logits / bp.softcap)
    mask = mask.expand(B, H, Nq, Nk)
    values = vc
    for bs in bp.summaries:
        member, att = summary_masks(bp, bs, inputs, q.device, bp.heads)
        if member.shape[0] == 0:
            continue
        ks, vs = _summarise(bs.summary, member, qc, kc, vc, scale)
        sl = (qc @ ks.transpose(-1, -2)) * scale
        if bp.softcap is not None:
            sl = bp.softcap * torch.tanh(sl / bp.softcap)
        logits = torch.cat([logits, sl], dim=-1)
        mask = torch.cat([mask, att.expand(B, H, Nq, member.shape[0])], dim=-1)
        values = torch.cat([values, vs], dim=-2)
    out = safe_softmax_av(logits, mask, values)
    if bp.route is not None:
        out = out * route_gates(bp, inputs[bp.route[0]], H).to(cdt).unsqueeze(-1)
    if bp.channel:
        out = out.transpose(-1, -2)
    return out.to(dtype)


def safe_softmax_av(logits, mask, values):
    """softmax(logits | mask) @ values; a row with no keys gives 0 and finite gradients."""
    neg = torch.finfo(logits.dtype).min
    logits = logits.masked_fill(~mask, neg)
    m = logits.amax(dim=-1, keepdim=True).detach()
    p = torch.exp(logits - m) * mask
    denom = p.sum(dim=-1, keepdim=True)
    p = p / torch.where(denom > 0, denom, torch.ones_like(denom))
    return p @ values


def _pool(x, member, how):
    """Pool rows of x [B, H, N, D] over each region of member [R, N] -> [B, H, R, D]."""
    if how == "mean":
        w = member.to(x.dtype)
        return (w @ x) / w.sum(dim=1, keepdim=True)
    outs = []
    step = max(1, (1 << 24) // max(1, x.numel()))
    neg = torch.tensor(-math.inf, dtype=x.dtype, device=x.device)
    for r0 in range(0, member.shape[0], step):
        m = member[r0:r0 + step]  # [r, N]
        xm = torch.where(m.view(1, 1, *m.shape, 1), x.unsqueeze(2), neg)
        outs.append(xm.amax(dim=3))
    return torch.cat(outs, dim=2)


def _summarise(summary, member, q, k, v, scale):
    ks = _pool(k, member, summary.keys)
    if summary.values == "expectation":
        if q.shape[2] != k.shape[2]:
            raise UnsupportedError("'values expectation' pools queries at the key positions; "
                                   "it needs as many queries as keys", summary.span)
        qs = _pool(q, member, summary.queries)
        inner = (qs @ k.transpose(-1, -2)) * scale
        vs = safe_softmax_av(inner, member.expand(*inner.shape), v)
    else:
        vs = _pool(v, member, summary.values)
    return ks, vs


def route_gates(bp: BoundPattern, router, heads):
    """[B, H, N] gates: shared heads 1; routed heads softmax over their top-k logits."""
    _, top, shared = bp.route
    B, N, E = router.shape
    gates = torch.zeros(B, N, E, dtype=torch.float64, device=router.device)
    if top > 0 and E > 0:
        vals, idx = router.double().topk(top, dim=-1)
        gates.scatter_(-1, idx, torch.softmax(vals, dim=-1))
    ones = torch.ones(B, N, shared, dtype=torch.float64, device=router.device)
    return torch.cat([ones, gates], dim=-1).permute(0, 2, 1)
