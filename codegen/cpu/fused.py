"""backend="cpu", fused path: ATen's CPU flash-attention kernel (the kernel behind
scaled_dot_product_attention on the CPU) run on the plan's work units.

That kernel takes q [B, H, L, D] and k, v [B, H, S, D] with any strides and an additive mask
broadcast over B and H; per (b, h, slice of 32-256 queries) it runs one BLAS product per
slice of 512 keys and an online softmax in vector registers, so scores never leave the cache,
and its backward recomputes them the same way. We hand it one unit at a time: query blocks
(its B) whose key blocks are gathered, or, when each row's key blocks are consecutive and
shift by a fixed step (sliding windows), read through one overlapping strided view with no
copy at all. A unit's rows share one mask (broadcast) when their PARTIAL blocks look alike:
rows are grouped by their mask's bytes, so a sliding window has one mask for every interior
block. Bias statements are folded into the additive mask.

Calls with dropout, a softcap, padding keys, masks that read q and k, or v's head dim unlike
q's take the generic path (kernels.py), which supports everything; so does the backward of
a call whose log-sum-exps have a gradient (summary tokens).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import torch

from attndsl import caches
from attndsl.codegen.cpu.plan import CpuPlan, Group
from attndsl.semantics.masks import bias, chunks

FLASH = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
FLASH_BWD = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward

GATHER = 1 << 21  # elements of gathered k (or of key gradients) per kernel call: 8 MiB fp32
MASK_ELEMS = 1 << 25  # additive mask elements kept per (plan, pass); beyond, built per call
DISTINCT = 16  # distinct masks in a group before its rows keep one mask each


@dataclass(eq=False)
class Unit:
    """Query blocks `rows` (increasing) with key blocks kidx[i] (one length), and their
    additive mask [1 or n, 1, bq, w] (None: every key counts; `lazy`: built per call)."""

    rows: torch.Tensor  # [n] int64
    kidx: torch.Tensor  # [n, slots] int64
    qstep: int | None  # rows[i] == rows[0] + i * qstep
    kstep: int | None  # kidx[i, j] == kidx[0, 0] + i * kstep + j
    mask: torch.Tensor | None
    empty: torch.Tensor | None  # [1 or n, bq] rows without any key (their lse is -inf)
    group: Group | None = None  # for masks built per call
    lazy: bool = False

    @property
    def n(self) -> int:
        return len(self.rows)


def eligible(cp: CpuPlan, *, dv: int, d: int, dropout: bool, padding: bool,
             content: bool) -> bool:
    """Whether a call can take the fused path (what the generic path alone supports:
    dropout, softcap, padding keys, content-dependent masks, v's head dim unlike q's)."""
    return not (dropout or padding or content or dv != d or cp.bp.softcap is not None)


def units(cp: CpuPlan, t: int, head: int | None, dtype: torch.dtype) -> tuple:
    """Work units of table t (masks with the bias of `head`, None: head-independent), in
    dtype; built once per (plan, table, head, dtype)."""
    return caches.CPU_FUSED.get_or_create((cp.plan, t, head, dtype),
                                          lambda: _units(cp, t, head, dtype))


def _units(cp: CpuPlan, t: int, head, dtype) -> tuple:
    out = []
    budget = [MASK_ELEMS]
    for grp in cp.groups[t]:
        if not grp.runs and not cp.bp.biases:
            out += _split(grp, np.arange(len(grp.rows)), None, None)
            continue
        out += _masked(cp, grp, t, head, dtype, budget)
    return tuple(out)


def row_masks(cp: CpuPlan, grp: Group, t: int, head, i0: int, i1: int, dtype
              ) -> torch.Tensor:
    """Additive masks of rows i0:i1 of a group over all its slots: [n, bq, w], -inf where
    a (query, key) pair is not attended, else the bias (0 without one)."""
    bq, bk = cp.bq, cp.bk
    n = i1 - i0
    w = grp.slots * bk
    m = torch.zeros(n, bq, w, dtype=dtype)
    for r, (s0, s1) in enumerate(grp.runs):
        off = cp.run_mask(grp, t, r, i0, i1)  # [n, 1, bq, (s1 - s0) bk], True: masked
        m[..., s0 * bk:s1 * bk].masked_fill_(off[:, 0], float("-inf"))
    if cp.bp.biases:
        rows = grp.rows_t[i0:i1]
        qi = cp.qtok[rows].view(n, bq, 1)
        ki = cp.ktok[grp.kidx_t[i0:i1]].reshape(n, 1, w)
        b = bias(cp.bp, cp.run, qi, ki, None, dtype, head=head)
        if b is not None:
            m += b
    return m


def _masked(cp, grp, t, head, dtype, budget) -> list:
    """Units of a group with masks: rows grouped by what their masks are made of (the
    PARTIAL blocks' bits, and the bias), each group with one broadcast mask."""
    n = len(grp.rows)
    per = cp.bq * grp.slots * cp.bk
    seen: dict = {}
    ids = np.zeros(n, dtype=np.int64)
    for a, b in chunks(n, per):
        sig = _signatures(cp, grp, t, head, a, b, dtype)
        for i, key in enumerate(sig):
            got = seen.get(key)
            if got is None:
                if len(seen) >= DISTINCT and len(seen) * 8 > n:
                    return _per_row(cp, grp, t, head, dtype, budget)
                got = seen[key] = (len(seen), a + i)
            ids[a + i] = got[0]
    out = []
    for idx, first in seen.values():
        sel = np.nonzero(ids == idx)[0]
        mask, empty = _with_empty(row_masks(cp, grp, t, head, first, first + 1, dtype))
        budget[0] -= per
        out += _split(grp, sel, mask, empty)
    return out


def _signatures(cp, grp, t, head, a, b, dtype) -> list:
    """A digest per row a:b of a group: equal digests, equal masks."""
    parts = [np.packbits(cp.run_mask(grp, t, r, a, b).reshape(b - a, -1).numpy(), axis=1)
             for r in range(len(grp.runs))]
    if cp.bp.biases:
        parts.append(row_masks(cp, grp, t, head, a, b, dtype).reshape(b - a, -1).numpy())
    return [hashlib.blake2b(b"".join(p[i].tobytes() for p in parts), digest_size=16).digest()
            for i in range(b - a)]


def _per_row(cp, grp, t, head, dtype, budget) -> list:
    """One mask per row: kept when the budget allows, else built per call."""
    n = len(grp.rows)
    size = n * cp.bq * grp.slots * cp.bk
    if size > budget[0]:
        return [Unit(grp.rows_t, grp.kidx_t, *_steps(grp.rows, grp.kidx), None, None, grp,
                     lazy=True)]
    budget[0] -= size
    mask, empty = _with_empty(row_masks(cp, grp, t, head, 0, n, dtype))
    return [Unit(grp.rows_t, grp.kidx_t, *_steps(grp.rows, grp.kidx), mask, empty)]


def _with_empty(m):
    """[n, bq, w] additive masks -> ([n, 1, bq, w], rows without a key [n, bq] or None)."""
    empty = torch.isneginf(m).all(-1)
    return m.unsqueeze(1), (empty if bool(empty.any()) else None)


def _split(grp: Group, sel: np.ndarray, mask, empty) -> list:
    """Rows `sel` of a group as units with one broadcast mask (or none): one strided unit
    when their rows and key blocks shift by fixed steps, else one gathered unit."""
    rows, kidx = grp.rows[sel], grp.kidx[sel]
    return [Unit(torch.from_numpy(rows), torch.from_numpy(kidx), *_steps(rows, kidx), mask,
                 empty)]


def _steps(rows: np.ndarray, kidx: np.ndarray) -> tuple:
    """(qstep, kstep): rows and key-block lists as arithmetic progressions, else None."""
    n, slots = kidx.shape
    qstep = kstep = None
    if n == 1:
        qstep = 1
    else:
        d = np.diff(rows)
        if (d == d[0]).all() and d[0] > 0:
            qstep = int(d[0])
    if bool((kidx - kidx[:, :1] == np.arange(slots)[None, :]).all()):
        if n == 1:
            kstep = 0
        else:
            d = np.diff(kidx[:, 0])
            if (d == d[0]).all() and d[0] >= 0:
                kstep = int(d[0])
    return qstep, kstep


# ------------------------------------------------------------------ views


def _rows_view(x, u: Unit, i0, i1, g0, gstride, gcount, r0, rcount):
    """Rows i0:i1 of a unit of x [G, nb, R, bq, D] for the pass's pairs and query heads:
    [n, gcount, rcount * bq, D], a view when the rows are evenly spaced, else a copy."""
    G, nb, R, bq, D = x.shape
    n = i1 - i0
    if u.qstep is not None:
        s = x.stride()
        off = x.storage_offset() + g0 * s[0] + int(u.rows[i0]) * s[1] + r0 * s[2]
        return x.as_strided((n, gcount, rcount * bq, D), (u.qstep * s[1], gstride * s[0],
                                                          s[3], s[4]), off)
    y = x[g0::gstride][:gcount, :, r0:r0 + rcount].index_select(1, u.rows[i0:i1])
    return y.permute(1, 0, 2, 3, 4).reshape(n, gcount, rcount * bq, D)


def _put_rows(dst, val, u: Unit, i0, i1, g0, gstride, gcount, r0, rcount):
    """dst [G, nb, R, bq, *] at a unit's rows i0:i1 <- val [n, gcount, rcount * bq, *]."""
    G, nb, R, bq, D = dst.shape
    n = i1 - i0
    if u.qstep is not None:
        _rows_view(dst, u, i0, i1, g0, gstride, gcount, r0, rcount).copy_(val)
        return
    sel = dst[g0::gstride][:gcount, :, r0:r0 + rcount]
    sel.index_copy_(1, u.rows[i0:i1],
                    val.reshape(n, gcount, rcount, bq, D).permute(1, 0, 2, 3, 4))


def _keys_view(x, u: Unit, i0, i1, g0, gstride, gcount):
    """Key blocks of a unit's rows i0:i1 of x [G, nkb, bk, D]: [n, gcount, w, D], one
    overlapping strided view when they shift by a fixed step, else gathered."""
    G, nkb, bk, D = x.shape
    n = i1 - i0
    slots = u.kidx.shape[1]
    if u.kstep is not None:
        s = x.stride()
        off = x.storage_offset() + g0 * s[0] + int(u.kidx[i0, 0]) * s[1]
        return x.as_strided((n, gcount, slots * bk, D), (u.kstep * s[1], gstride * s[0],
                                                         s[2], s[3]), off)
    return x.view(G * nkb, bk * D).index_select(0, _flat_idx(u, i0, i1, g0, gstride, gcount,
                                                             nkb)).view(n, gcount,
                                                                        slots * bk, D)


def _flat_idx(u: Unit, i0, i1, g0, gstride, gcount, nkb):
    """[n, gcount, slots] flat indices g * nkb + key block, flattened."""
    g = torch.arange(g0, g0 + gstride * gcount, gstride)[:gcount]
    return (g.view(1, -1, 1) * nkb + u.kidx[i0:i1].unsqueeze(1)).reshape(-1)


def _mask(cp, u: Unit, t, head, i0, i1, rcount, dtype):
    """The additive mask of rows i0:i1 for a kernel call: [1 or n, 1, rcount * bq, w]."""
    if u.lazy:  # the unit is its whole group
        m = row_masks(cp, u.group, t, head, i0, i1, dtype).unsqueeze(1)
    elif u.mask is None:
        return None
    else:
        m = u.mask if u.mask.shape[0] == 1 else u.mask[i0:i1]
    return m if rcount == 1 else m.repeat(1, 1, rcount, 1)


def _chunks(u: Unit, gcount: int, w: int, d: int, always: bool):
    """Row ranges of a unit per kernel call: gathered keys (or key gradients, `always`)
    of at most GATHER elements."""
    if u.kstep is not None and not always:
        yield 0, u.n
        return
    step = max(1, GATHER // max(1, gcount * w * d))
    for a in range(0, u.n, step):
        yield a, min(u.n, a + step)


# ------------------------------------------------------------------ forward / backward


def forward(ctx):
    """(out [G, nqb, R, bq, D], raw lse [G, nqb, R, bq] as the kernel gives it (0 for rows
    without keys: what its backward needs), lse [G, nqb, R, bq, 1] with -inf there)."""
    cp = ctx.cp
    G, nqb, R, bq, D = ctx.qs.shape
    o = torch.zeros(G, nqb, R, bq, D, dtype=ctx.cdt)
    raw = torch.zeros(G, nqb, R, bq, dtype=torch.float64 if ctx.cdt == torch.float64
                      else torch.float32)
    lse = torch.full((G, nqb, R, bq, 1), float("-inf"), dtype=ctx.cdt)
    for t, (g0, gs, gc), hsl, head in ctx.passes():
        r0 = 0 if hsl.start is None else hsl.start
        rc = R if hsl.start is None else 1
        if gc == 0 or rc == 0:
            continue
        for u in units(cp, t, _mask_head(cp, head), ctx.cdt):
            w = u.kidx.shape[1] * cp.bk
            for i0, i1 in _chunks(u, gc, w, D, False):
                q = _rows_view(ctx.qs, u, i0, i1, g0, gs, gc, r0, rc)
                k = _keys_view(ctx.k, u, i0, i1, g0, gs, gc)
                v = _keys_view(ctx.v, u, i0, i1, g0, gs, gc)
                mask = _mask(cp, u, t, _mask_head(cp, head), i0, i1, rc, ctx.cdt)
                out, l_ = FLASH(q, k, v, attn_mask=mask, scale=ctx.scale)
                _put_rows(o, out, u, i0, i1, g0, gs, gc, r0, rc)
                _put_rows(raw.unsqueeze(-1), l_.unsqueeze(-1), u, i0, i1, g0, gs, gc, r0, rc)
                l_ = l_.to(ctx.cdt)
                empty = _empty(u, i0, i1, rc, mask)
                if empty is not None:
                    l_ = l_.masked_fill(empty.view(-1, 1, rc * bq), float("-inf"))
                _put_rows(lse, l_.unsqueeze(-1), u, i0, i1, g0, gs, gc, r0, rc)
    return o, raw, lse


def _empty(u: Unit, i0, i1, rc, mask):
    """Rows without any key among rows i0:i1: [1 or n, rc * bq] bool, or None."""
    if u.lazy:
        e = torch.isneginf(mask).all(-1)[:, 0]
        return e if bool(e.any()) else None
    if u.empty is None:
        return None
    e = u.empty if u.empty.shape[0] == 1 else u.empty[i0:i1]
    return e.repeat(1, rc)


def _mask_head(cp: CpuPlan, head):
    """The head whose bias a pass's masks carry (None: the masks do not depend on it)."""
    if head is None or not any(hr is not None or owner.heads is not None
                               for owner, sc, hr in cp.bp.biases):
        return None
    return head


def backward(ctx, o, raw, do):
    """dq, dk, dv in block layout (dq for the q the user passed: the scale is applied)."""
    cp = ctx.cp
    G, nqb, R, bq, D = ctx.qs.shape
    _, nkb, bk, _ = ctx.k.shape
    dq = torch.zeros_like(ctx.qs)
    dk = torch.zeros_like(ctx.k)
    dv = torch.zeros_like(ctx.v)
    dk_f, dv_f = dk.view(G * nkb, bk * D), dv.view(G * nkb, bk * D)
    raw5 = raw.unsqueeze(-1)
    for t, (g0, gs, gc), hsl, head in ctx.passes():
        r0 = 0 if hsl.start is None else hsl.start
        rc = R if hsl.start is None else 1
        if gc == 0 or rc == 0:
            continue
        for u in units(cp, t, _mask_head(cp, head), ctx.cdt):
            slots = u.kidx.shape[1]
            w = slots * bk
            for i0, i1 in _chunks(u, gc, w, D, True):
                n = i1 - i0
                args = [_rows_view(x, u, i0, i1, g0, gs, gc, r0, rc)
                        for x in (do, ctx.qs)]
                k = _keys_view(ctx.k, u, i0, i1, g0, gs, gc)
                v = _keys_view(ctx.v, u, i0, i1, g0, gs, gc)
                out = _rows_view(o, u, i0, i1, g0, gs, gc, r0, rc)
                lse = _rows_view(raw5, u, i0, i1, g0, gs, gc, r0, rc)[..., 0]
                mask = _mask(cp, u, t, _mask_head(cp, head), i0, i1, rc, ctx.cdt)
                gq, gk, gv = FLASH_BWD(args[0], args[1], k, v, out, lse, 0.0, False,
                                       attn_mask=mask, scale=ctx.scale)
                _put_rows(dq, gq, u, i0, i1, g0, gs, gc, r0, rc)
                idx = _flat_idx(u, i0, i1, g0, gs, gc, nkb)
                dk_f.index_add_(0, idx, gk.reshape(n * gc * slots, bk * D))
                dv_f.index_add_(0, idx, gv.reshape(n * gc * slots, bk * D))
    return dq, dk, dv
