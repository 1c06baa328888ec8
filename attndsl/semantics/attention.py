"""The attention driver: the one place that says what `op(q, k, v)` computes, around a
backend's core. Every backend (reference, cpu, triton) runs through it:

    validate -> average the parts -> channel transpose -> default scale -> routing gates
    -> core.direct (the pattern's own keys: out and log-sum-exp)
    -> summary tokens (pooled here, attended by core.summary, merged through the LSE)
    -> gates -> transpose back

A core implements `check(bp, q, k, v)`, `direct(call)` and `summary(call, ks, vs, att)`,
each returning (out [B, H, Nq, Dv], lse [B, H, Nq]) with lse = -inf for rows with no key.
A core with `runs_plans = True` also runs a given plan (`call.plan`): the queries of some
blocks against the keys of others, as attndsl.distributed computes one rank's share.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from attndsl.errors import InputError, ParameterError, UnsupportedError
from attndsl.semantics.bind import BoundPattern
from attndsl.semantics.dropout import keep
from attndsl.semantics.inputs import (
    RunInputs,
    check_given,
    check_options,
    check_tensors,
    content_of,
    validate,
)
from attndsl.semantics.masks import (
    bound_tokens,
    queries_at,
    summary_coords,
    summary_masks,
    summary_member,
    summary_rule,
)


@dataclass(frozen=True)
class Options:
    """How to attend, besides the tensors and run-time inputs: the scale (None: the
    pattern's, or 1/sqrt(D)); the kernels' block sizes; `q_start`, the index of q's first
    query (q holds queries q_start .. q_start + M - 1; decoding and chunked prefill);
    `key_valid` [B, Nk] bool (False: a padding key); dropout on the attention probabilities
    at rate `dropout_p`, drawn from `seed` (semantics/dropout.py); `queries`, the queries of
    every key position when q holds only some and the pattern pools queries (summary tokens
    with `values expectation`) or reads them (chunk_topk); `softcap`, Gemma 2's
    cap * tanh(score / cap) on the scaled scores (None: the pattern's own, if any)."""

    scale: float | None = None
    block_q: int | None = None
    block_k: int | None = None
    q_start: int | None = None
    key_valid: torch.Tensor | None = None
    dropout_p: float = 0.0
    seed: int = 0
    queries: torch.Tensor | None = None
    softcap: float | None = None


@dataclass(frozen=True, eq=False)
class Call:
    """One attention call as a core sees it: q, k, v [B, H, N, D] (channel tokens already
    transposed; q holds rows q_start .. q_start + M - 1), the call's inputs, the scale,
    MoH's routing gates [B, H, M] (cores may skip work whose gates are zero; the driver
    applies them), the kernels' block sizes, padding, dropout and the softcap in force
    (the call's, else the pattern's; None: no cap)."""

    bp: BoundPattern
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    run: RunInputs
    scale: float
    gates: torch.Tensor | None
    need_lse: bool
    block_q: int | None = None
    block_k: int | None = None
    q_start: int = 0
    key_valid: torch.Tensor | None = None
    dropout_p: float = 0.0
    seed: int = 0
    queries: torch.Tensor | None = None
    softcap: float | None = None  # the call's cap (op(..., softcap=) or the pattern's)
    plan: object = None  # a Plan to run instead of planning (codegen/plan/tables.restrict)

    @property
    def rows(self) -> tuple[int, int]:
        """(first query, number of queries) of this call."""
        return self.q_start, self.q.shape[2]

    @property
    def partial(self) -> bool:
        """Only some of the queries (decoding, chunked prefill)."""
        return self.q_start != 0 or self.q.shape[2] != self.bp.nq


def attention(core, bp: BoundPattern, q, k, v, inputs: dict, opts: Options = Options()
              ) -> torch.Tensor:
    """What op(q, k, v, backend=...) computes: q's dtype and shape."""
    check_tensors(bp, q, k, v, opts.q_start)
    check_options(bp, q, k, opts)
    core.check(bp, q, k, v)
    run = validate(bp, inputs, q.device, q.shape[0], q_rows=q.shape[2])
    check_given(bp, run, q, v, getattr(core, "name", ""))
    return _attend(core, bp, q, k, v, run, opts)


def _attend(core, bp, q, k, v, run, opts: Options):
    if bp.average:
        outs = [_attend(core, sub, q, k, v, run.part(sub), opts) for sub in bp.average]
        return sum(outs) / len(outs)
    dtype = q.dtype
    queries = opts.queries
    if bp.channel:
        q, k, v = (t.transpose(-1, -2) for t in (q, k, v))
    scale = scale_of(bp, q, opts.scale)
    gates = None
    if bp.route is not None:
        gates = route_gates(bp, run, q.shape[1])
    run = run.with_content(content_of(bp, q if queries is None else queries, k))
    softcap = opts.softcap if opts.softcap is not None else bp.softcap
    call = Call(bp, q, k, v, run, float(scale), gates, bool(bp.summaries), opts.block_q,
                opts.block_k, opts.q_start or 0, opts.key_valid, opts.dropout_p, opts.seed,
                queries, None if softcap is None else float(softcap))
    out, lse = core.direct(call)
    if bp.summaries:
        tokens = summary_tokens(call)
        if tokens is not None:
            out, lse = merge_lse(out, lse, *core.summary(call, *tokens))
        first = 0  # the driver's own summaries (given, biased, bound): every backend alike
        for bs in bp.summaries:
            if bs.extended:
                out, lse = merge_lse(out, lse, *extended_summary(call, bs, first))
                first += math.prod(bs.sizes)
    if gates is not None:
        out = out * gates.to(out.dtype).unsqueeze(-1)
    if bp.channel:
        out = out.transpose(-1, -2)
    return out.to(dtype)


def scale_of(bp: BoundPattern, q, scale: float | None) -> float:
    """The call's scale: the given one, the pattern's, or 1/sqrt(D); it must fit in the
    dtype scores are computed in."""
    span = None
    if scale is None:
        scale = bp.scale if bp.scale is not None else 1.0 / math.sqrt(q.shape[-1])
        span = next((sc.span for _, sc, _ in bp.scores if sc.kind == "scale"),
                    bp.checked.span) if bp.scale is not None else None
    cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
    if float(scale) > torch.finfo(cdt).max:
        raise ParameterError(f"scale {float(scale):g} does not fit in {_name(cdt)}, in which "
                             f"{_name(q.dtype)} scores are computed (at most "
                             f"{torch.finfo(cdt).max:.4g})", span)
    return float(scale)


def _name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def merge(out_a, lse_a, out_b, lse_b, with_lse: bool = False):
    """One softmax over two disjoint key sets, from each set's output and log-sum-exp (and,
    with `with_lse`, the union's log-sum-exp: -inf where neither set has a key)."""
    dt = torch.promote_types(out_a.dtype, torch.float32)
    out_a, out_b = out_a.to(dt), out_b.to(dt)
    la, lb = lse_a.to(dt).unsqueeze(-1), lse_b.to(dt).unsqueeze(-1)
    m = torch.maximum(la, lb).detach()
    m = torch.where(torch.isinf(m), torch.zeros_like(m), m)
    wa, wb = torch.exp(la - m), torch.exp(lb - m)
    den = wa + wb
    some = den > 0
    out = (wa * out_a + wb * out_b) / torch.where(some, den, torch.ones_like(den))
    if not with_lse:
        return out
    lse = torch.where(some, m + torch.log(torch.where(some, den, torch.ones_like(den))),
                      torch.full_like(den, -math.inf))
    return out, lse.squeeze(-1)


def merge_lse(out_a, lse_a, out_b, lse_b):
    """merge() with the union's log-sum-exp."""
    return merge(out_a, lse_a, out_b, lse_b, with_lse=True)


def attend(logits, mask, values, kept=None, p_drop: float = 0.0):
    """softmax(logits | mask) @ values and the rows' log-sum-exp (natural log). A row with
    no keys gives 0 and lse -inf, with zero (never NaN) gradients. With `kept` (bool, as
    the logits), dropout: dropped probabilities are 0, kept ones scaled by 1 / (1 - p)."""
    neg = torch.finfo(logits.dtype).min
    logits = logits.masked_fill(~mask, neg)
    m = logits.amax(dim=-1, keepdim=True).detach()
    p = torch.exp(logits - m) * mask
    denom = p.sum(dim=-1, keepdim=True)
    has = denom > 0
    safe = torch.where(has, denom, torch.ones_like(denom))
    probs = p / safe
    if kept is not None:
        probs = probs * kept.to(probs.dtype) / (1.0 - p_drop)
    out = probs @ values
    lse = torch.where(has, m + torch.log(safe), torch.full_like(denom, -math.inf))
    return out, lse.squeeze(-1)


def softcapped(logits, softcap):
    return logits if softcap is None else softcap * torch.tanh(logits / softcap)


# ------------------------------------------------------------------ summary tokens


def summary_tokens(call: Call):
    """(keys [B, H, R, D], values [B, H, R, Dv], attend [.., Nq, R]) of every summary's
    non-empty regions, pooled differentiably in float32 (float64 for float64 inputs), or
    None when every region is empty."""
    bp = call.bp
    q, k, v = call.q, call.k, call.v
    if call.partial:
        q = call.queries  # pooling reads the queries at the key positions
    cdt = torch.float64 if k.dtype == torch.float64 else torch.float32
    rep = call.q.shape[1] // k.shape[1]
    qc = None if q is None else q.to(cdt)
    kc = k.to(cdt).repeat_interleave(rep, dim=1)
    vc = v.to(cdt).repeat_interleave(rep, dim=1)
    first, count = call.rows
    ks, vs, atts = [], [], []
    for bs in bp.core_summaries:
        member, att = summary_masks(bp, bs, call.run, k.device, bp.heads)
        if member.shape[0] == 0:
            continue
        if qc is None and bs.summary.values == "expectation":
            raise InputError(f"summary '{bs.summary.name}' pools queries: when q holds only "
                             "some of the queries, pass the queries of every key position "
                             "(queries=[B, H, Nk, D])", bs.summary.span)
        att = att.expand(*att.shape[:-2], bp.nq, member.shape[0])[..., first:first + count, :]
        if call.key_valid is not None:  # padding keys are absent from every region too
            member = member.view(1, 1, *member.shape) & call.key_valid.view(
                k.shape[0], 1, 1, -1)
            att = att & member.any(-1).unsqueeze(-2)  # [B, 1 or H, M, R]
        a, b = pool(bs.summary, member, qc, kc, vc, call.scale)
        ks.append(a)
        vs.append(b)
        atts.append(att)
    return stack_summaries(ks, vs, atts)


def stack_summaries(ks: list, vs: list, atts: list):
    """Every summary's (keys, values, attend) as one set of summary tokens, or None."""
    if not ks:
        return None
    # [M, R], [H, M, R] (a rule reads h) or [B, 1|H, M, R] (padding): one layout for all
    atts = [a.reshape((1,) * (4 - a.dim()) + tuple(a.shape)) for a in atts]
    # numpy's, not torch.broadcast_shapes: that imports sympy (seconds) on first use
    lead = np.broadcast_shapes(*(tuple(a.shape[:2]) for a in atts))
    atts = [a.expand(*lead, *a.shape[2:]) for a in atts]
    return torch.cat(ks, 2), torch.cat(vs, 2), torch.cat(atts, -1)


def _pool(x, member, how):
    """Pool rows of x [B, H, N, D] over each region of member [R, N] (or, per batch,
    [B, 1, R, N]) -> [B, H, R, D]; a region with no member pools to 0."""
    if how == "mean":
        w = member.to(x.dtype)
        n = w.sum(dim=-1, keepdim=True)
        return (w @ x) / torch.where(n > 0, n, torch.ones_like(n))
    if member.shape[-2] == 0:  # no region
        return x.new_zeros(*x.shape[:2], 0, x.shape[3])
    if member.dim() == 2 and bool((member.sum(0) <= 1).all()):
        return _pool_disjoint(x, member)
    outs = []
    lead = (1, 1) if member.dim() == 2 else member.shape[:2]
    step = max(1, (1 << 24) // max(1, x.numel()))
    neg = torch.tensor(-math.inf, dtype=x.dtype, device=x.device)
    for r0 in range(0, member.shape[-2], step):
        m = member[..., r0:r0 + step, :]  # [.., r, N]
        xm = torch.where(m.reshape(*lead, *m.shape[-2:], 1), x.unsqueeze(2), neg)
        outs.append(xm.amax(dim=3))
    out = torch.cat(outs, dim=2)
    some = member.any(-1).unsqueeze(-1)  # [.., R, 1]: the region has a member
    return torch.where(some, out, torch.zeros_like(out))


def _pool_disjoint(x, member):
    """Max pooling over regions that share no token (Combiner's spans, TransNeXt's
    windows): one pass over the tokens (a scatter), not one per region; the same values,
    and gradients split among tied maxima as amax's are."""
    B, H, _, D = x.shape
    R = member.shape[0]
    tok = torch.nonzero(member.any(0)).view(-1)  # tokens in some region
    reg = member[:, tok].to(torch.uint8).argmax(0)  # the region of each
    src = x.index_select(2, tok.to(x.device))
    out = torch.full((B, H, R, D), -math.inf, dtype=x.dtype, device=x.device)
    out = out.scatter_reduce(2, reg.to(x.device).view(1, 1, -1, 1).expand_as(src), src,
                             "amax", include_self=True)
    some = member.any(-1).to(x.device).view(1, 1, R, 1)
    return torch.where(some, out, torch.zeros_like(out))


def pool(summary, member, q, k, v, scale):
    """A summary's key and value rows: its keys pooled (max or mean) over each region; its
    values pooled, or (Combiner's `expectation`) the region's own attention output for the
    pooled query."""
    ks = _pool(k, member, summary.keys)
    if summary.values == "expectation":
        if q.shape[2] != k.shape[2]:
            raise UnsupportedError("'values expectation' pools queries at the key positions; "
                                   "it needs as many queries as keys", summary.span)
        qs = _pool(q, member, summary.queries)
        inner = (qs @ k.transpose(-1, -2)) * scale
        vs, _ = attend(inner, member.expand(*inner.shape), v)
    else:
        vs = _pool(v, member, summary.values)
    return ks, vs


# ------------------------------------------------------------------ routing


def route_gates(bp: BoundPattern, run: RunInputs, heads):
    """[B, H, N] gates of `route`: routed heads the softmax over each token's top-k router
    logits (1 with `hard`) times the `scaled` factor, 0 elsewhere; shared heads 1, or
    S * softmax of their `weighted` logits; with `grouped`, both groups times
    2 * softmax of the two group logits (MoH's gates)."""
    name, top, shared = bp.route
    opts = bp.route_opts
    router = run.values[name]
    B, N, E = router.shape
    gates = torch.zeros(B, N, E, dtype=torch.float64, device=router.device)
    if top > 0 and E > 0:
        vals, idx = router.double().topk(top, dim=-1)
        w = torch.ones_like(vals) if opts.hard else torch.softmax(vals, dim=-1)
        gates = gates.scatter(-1, idx, w * opts.scale)
    weights = run.values.get(opts.weighted) if opts.weighted else None
    if weights is not None:
        sg = torch.softmax(weights.double(), dim=-1) * shared
    else:
        sg = torch.ones(B, N, shared, dtype=torch.float64, device=router.device)
    groups = run.values.get(opts.grouped) if opts.grouped else None
    if groups is not None:
        g = torch.softmax(groups.double(), dim=-1) * 2
        sg, gates = sg * g[..., :1], gates * g[..., 1:]
    return torch.cat([sg, gates], dim=-1).permute(0, 2, 1)


# ------------------------------------------------------------------ the driver's summaries


def extended_summary(call: Call, bs, first: int):
    """(out [B, H, M, Dv], lse [B, H, M]) of one summary the driver computes for every
    backend: keys and values given by the caller or pooled, a `bias` on its scores (after
    the scale, before the softcap), the query's coordinates choosing its tokens (bound
    axes: only those tokens are scored), `queries at` one token. Dropout numbers its rows
    after the keys, `first` being the tokens of the driver's summaries before it."""
    return extended_attend(call, bs, *extended_tokens(call, bs), first)


def extended_tokens(call: Call, bs):
    """(keys [B, H, R, D], values [B, H, R, Dv], exists: [.., R] tokens with a member, or
    None for given keys) of a summary the driver computes."""
    bp, s = call.bp, bs.summary
    q, k, v = call.q, call.k, call.v
    B, H, M, _ = q.shape
    dev = q.device
    cdt = torch.float64 if k.dtype == torch.float64 else torch.float32
    rep = H // k.shape[1]
    kc = k.to(cdt).repeat_interleave(rep, dim=1)
    vc = v.to(cdt).repeat_interleave(rep, dim=1)
    member = None
    if s.member is not None and (s.keys_from is None or s.values_from is None):
        member = summary_member(bp, bs, call.run, dev)
        if call.key_valid is not None:  # padding keys are absent from every region too
            member = member.view(1, 1, *member.shape) & call.key_valid.view(B, 1, 1, -1)
    ks = (given_rows(call.run, s.keys_from, H, cdt) if s.keys_from is not None
          else _pool(kc, member, s.keys))
    if s.values_from is not None:
        vs = given_rows(call.run, s.values_from, H, cdt)
    elif s.values == "expectation":
        qsrc = q if not call.partial else call.queries
        if qsrc is None:
            raise InputError(f"summary '{s.name}' pools queries: when q holds only some of "
                             "the queries, pass the queries of every key position "
                             "(queries=[B, H, Nk, D])", s.span)
        qsrc = qsrc.to(cdt)
        if s.queries_at is not None:
            qs = qsrc[:, :, queries_at(bp, bs, call.run, dev)]
        else:
            if qsrc.shape[2] != kc.shape[2]:
                raise UnsupportedError("'values expectation' pools queries at the key "
                                       "positions; it needs as many queries as keys", s.span)
            qs = _pool(qsrc, member, s.queries)
        inner = (qs @ kc.transpose(-1, -2)) * call.scale
        vs, _ = attend(inner, member.expand(*inner.shape), vc)
    else:
        vs = _pool(vc, member, s.values)
    exists = None if s.keys_from is not None else member.any(-1)  # [.., R]: pooled regions
    return ks, vs, exists


def extended_attend(call: Call, bs, ks, vs, exists, first: int, qidx=None):
    """(out, lse) of call.q's queries (the tokens `qidx`, by default the call's rows)
    against a driver-computed summary's tokens (extended_tokens)."""
    bp, s = call.bp, bs.summary
    q = call.q
    B, H, M, _ = q.shape
    dev = q.device
    cdt = ks.dtype
    if qidx is None:
        first_q, count = call.rows
        qidx = torch.arange(first_q, first_q + count, device=dev)
    count = len(qidx)
    heads = torch.arange(H, device=dev).view(-1, 1, 1) if bp.heads is not None else None
    qc = q.to(cdt)
    outs, lses = [], []
    bound = any(ax.bound is not None for ax in s.axes)
    r_all = math.prod(bs.sizes)
    width = r_all if not bound else r_all // math.prod(
        n for ax, n in zip(s.axes, bs.sizes) if ax.bound is not None)
    step = max(1, (1 << 22) // max(1, B * H * width * max(ks.shape[-1], vs.shape[-1])))
    for m0 in range(0, count, step):
        m1 = min(count, m0 + step)
        rows = qidx[m0:m1]
        if bound:
            tok, valid = bound_tokens(bp, bs, call.run, rows)  # [m, R']
            coords = summary_coords(bs, dev, tok)
        else:
            tok = torch.arange(r_all, device=dev).view(1, -1)
            valid = None
            coords = {a: c.view(1, -1) for a, c in summary_coords(bs, dev).items()}
        att = torch.as_tensor(summary_rule(bp, bs, call.run, s.attend, rows.view(-1, 1),
                                           coords, heads), device=dev)
        if valid is not None:
            att = att & valid
        if exists is not None:  # [R] or, with padding, [B, 1, R]: regions with a member
            att = att & exists[..., tok]
        qm = qc[:, :, m0:m1]
        if bound:
            kg, vg = ks[:, :, tok], vs[:, :, tok]  # [B, H, m, R', D]
            logits = (qm.unsqueeze(-2) @ kg.transpose(-1, -2)).squeeze(-2)
        else:
            vg = vs
            logits = qm @ ks.transpose(-1, -2)
        logits = logits * call.scale
        if s.bias is not None:
            b = summary_rule(bp, bs, call.run, s.bias, rows.view(-1, 1), coords, heads)
            logits = logits + torch.as_tensor(b, device=dev).to(cdt)
        logits = softcapped(logits, bp.softcap)
        att = att.expand(logits.shape)
        kept = ()
        if call.dropout_p:
            bh = torch.arange(B * H, device=dev).view(B, H, 1, 1)
            ridx = call.k.shape[2] + first + tok.view((1,) * 2 + tuple(tok.shape))
            kept = (keep(call.seed, bh, rows.view(-1, 1), ridx, call.dropout_p),
                    call.dropout_p)
        if bound:
            kept = tuple(x.unsqueeze(-2) if i == 0 else x for i, x in enumerate(kept))
            o, lse = attend(logits.unsqueeze(-2), att.unsqueeze(-2), vg, *kept)
            o, lse = o.squeeze(-2), lse.squeeze(-1)
        else:
            o, lse = attend(logits, att, vg, *kept)
        outs.append(o)
        lses.append(lse)
    return torch.cat(outs, 2), torch.cat(lses, 2)


def given_rows(run: RunInputs, name: str, heads: int, cdt):
    """A given summary input [B, 1 | kv heads | H, R, D] as [B, H, R, D] in `cdt`."""
    t = run.values[name]
    return t.to(cdt).repeat_interleave(heads // t.shape[1], dim=1)
