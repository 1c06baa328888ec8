"""backend="cpu", the fast paths: flash.c's native kernels (native_attention,
native_backward: tasks over the plan's units, q, k, v read in place), and where they do not
apply, ATen's CPU flash-attention kernel (the kernel behind scaled_dot_product_attention on
the CPU) run on the plan's work units; `path` decides which a call takes.

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
from attndsl.codegen.cpu import native
from attndsl.codegen.cpu.plan import CpuPlan, Group, cpu_plan
from attndsl.semantics.masks import bias, chunks

FLASH = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
FLASH_BWD = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward

GATHER = 1 << 21  # elements of gathered k per forward kernel call: 8 MiB in fp32
GRADS = 1 << 20  # elements of key gradients per backward kernel call (fresh buffers the
# kernel zeroes: small ones are reused by the allocator instead of page-faulted each time;
# 2^20 ran fwd + bwd 1.2-1.4x faster than 2^18 on sliding_window, power_attention and na2d
# at 16K tokens, and 2^22 no faster, on a 2-core AVX2 EPYC)
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
    part: torch.Tensor | None = None  # [slots] uint8, 1 where the mask is not 0 (None: all)
    kmask: torch.Tensor | None = None  # the mask keys-major (_keys_major), for flash.c

    @property
    def n(self) -> int:
        return len(self.rows)


def path(bp, *, d: int, dv: int, cdt: torch.dtype, dropout: bool, padding: bool,
         content: bool, softcap, blocks: tuple | None = None) -> str:
    """The one place that decides how a call runs: "native" (flash.c), "fused" (ATen's
    flash kernel, this module) or "generic" (kernels.py, which supports everything: dropout,
    a softcap, padding keys, content-dependent masks, v's head dim unlike q's). `blocks`:
    the plan's (bq, bk), None before planning (when it picks the planner's target)."""
    if dropout or padding or content or dv != d or softcap is not None:
        return "generic"
    if native.kernel() is None or not native.usable(*(blocks or (16, 16)), d, cdt):
        return "fused"
    return "native"


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
        made = _masked(cp, grp, t, head, dtype, budget)
        if not cp.bp.biases:  # the mask is 0 outside the PARTIAL slots
            part = torch.zeros(grp.slots, dtype=torch.uint8)
            for s0, s1 in grp.runs:
                part[s0:s1] = 1
            for u in made:
                u.part = part
        out += made
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


def active_blocks(cp: CpuPlan, gates: torch.Tensor, hkv: int) -> torch.Tensor | None:
    """MoH's routing gates [B, H, M] -> [B * hkv, H / hkv, nqb]: query blocks with some
    non-zero gate (None when all are)."""
    B, H, M = gates.shape
    if M <= int(cp.qpos.max()):  # not one gate per query row: compute everything
        return None
    nz = gates != 0
    act = (nz[:, :, cp.qpos] & cp.qvalid).any(-1)  # [B, H, nqb]
    if bool(act.all()):
        return None
    return act.view(B * hkv, H // hkv, -1)


# ------------------------------------------------------------------ kernel calls


@dataclass
class Piece:
    """One kernel call: query blocks `rows` with key blocks `kidx`, for the (batch, kv head)
    pairs g0, g0 + gs, ... (gc of them) and query heads r0 .. r0 + rc - 1 of each."""

    rows: torch.Tensor
    kidx: torch.Tensor
    qstep: int | None
    kstep: int | None
    mask: torch.Tensor | None  # [1 or n, 1, rc * bq, w]
    empty: torch.Tensor | None  # [1 or n, rc * bq]
    g0: int
    gs: int
    gc: int
    r0: int
    rc: int

    @property
    def n(self) -> int:
        return len(self.rows)


def _pieces(ctx, active, backward: bool):
    """Every kernel call of a forward or backward. `active` [G, R, nqb] (MoH's gates): the
    (pair, query head, query block)s to compute, or None for all."""
    cp = ctx.cp
    R, D = ctx.qs.shape[2], ctx.qs.shape[4]
    for t, (g0, gs, gc), hsl, head in ctx.passes():
        r0 = 0 if hsl.start is None else hsl.start
        rc = R if hsl.start is None else 1
        if gc == 0 or rc == 0:
            continue
        mh = _mask_head(cp, head)
        for u in units(cp, t, mh, ctx.cdt):
            w = u.kidx.shape[1] * cp.bk
            if active is None:
                for i0, i1 in _row_chunks(u.n, u.kstep is not None and not backward, gc, w, D,
                                          backward):
                    mask, empty = _mask(cp, u, t, mh, i0, i1, rc, ctx.cdt)
                    for a, b in _pair_chunks(gc, (i1 - i0) * w * D, backward):
                        yield Piece(u.rows[i0:i1], u.kidx[i0:i1], u.qstep, u.kstep, mask,
                                    empty, g0 + a * gs, gs, b - a, r0, rc)
                continue
            for a in range(gc):
                g = g0 + a * gs
                for r in range(r0, r0 + rc):
                    yield from _active_pieces(cp, u, t, mh, ctx.cdt, active[g, r], g, r, w, D,
                                              backward)


def _active_pieces(cp, u: Unit, t, mh, dtype, act, g, r, w, d, backward):
    """The calls of one (pair, query head) over a unit's query blocks whose gates are not
    all 0 (the others' outputs stay 0; the driver multiplies them by their gates)."""
    keep = act[u.rows]
    if not bool(keep.any()):
        return
    whole = bool(keep.all())
    for i0, i1 in _row_chunks(u.n, False, 1, w, d, backward):
        sel = torch.nonzero(keep[i0:i1]).view(-1)
        if len(sel) == 0:
            continue
        mask, empty = _mask(cp, u, t, mh, i0, i1, 1, dtype)
        if whole:
            yield Piece(u.rows[i0:i1], u.kidx[i0:i1], u.qstep, u.kstep, mask, empty, g, 1, 1,
                        r, 1)
            continue
        if mask is not None and mask.shape[0] > 1:
            mask = mask[sel]
        if empty is not None and empty.shape[0] > 1:
            empty = empty[sel]
        yield Piece(u.rows[i0:i1][sel], u.kidx[i0:i1][sel], None,
                    0 if u.kstep == 0 else None, mask, empty, g, 1, 1, r, 1)


def _row_chunks(n: int, whole: bool, gcount: int, w: int, d: int, backward: bool):
    """Row ranges per call: all rows (strided keys, forward), else gathered keys of at
    most GATHER elements, or key gradients of at most GRADS."""
    if whole:
        yield 0, n
        return
    step = max(1, (GRADS if backward else GATHER) // max(1, gcount * w * d))
    for a in range(0, n, step):
        yield a, min(n, a + step)


def _pair_chunks(gcount: int, per_pair: int, backward: bool):
    """(batch, kv head) pair ranges per call: key gradients of at most GRADS elements."""
    step = max(1, GRADS // max(1, per_pair)) if backward else gcount
    for a in range(0, gcount, step):
        yield a, min(gcount, a + step)


def _mask(cp, u: Unit, t, head, i0, i1, rcount, dtype):
    """(additive mask [1 or n, 1, rcount * bq, w] or None, rows without keys [1 or n,
    rcount * bq] or None) of rows i0:i1 of a unit."""
    if u.lazy:  # the unit is its whole group
        m = row_masks(cp, u.group, t, head, i0, i1, dtype).unsqueeze(1)
        e = torch.isneginf(m).all(-1)[:, 0]
        e = e if bool(e.any()) else None
    elif u.mask is None:
        return None, None
    else:
        m = u.mask if u.mask.shape[0] == 1 else u.mask[i0:i1]
        e = u.empty if u.empty is None or u.empty.shape[0] == 1 else u.empty[i0:i1]
    if rcount > 1:
        m = m.repeat(1, 1, rcount, 1)
        e = None if e is None else e.repeat(1, rcount)
    return m, e


# ------------------------------------------------------------------ views


def _rows_view(x, p: Piece):
    """A piece's rows of x [G, nb, R, bq, D]: [n, gc, rc * bq, D], a view when the rows
    are evenly spaced, else a copy."""
    G, nb, R, bq, D = x.shape
    if p.qstep is not None:
        s = x.stride()
        off = x.storage_offset() + p.g0 * s[0] + int(p.rows[0]) * s[1] + p.r0 * s[2]
        return x.as_strided((p.n, p.gc, p.rc * bq, D), (p.qstep * s[1], p.gs * s[0], s[3],
                                                        s[4]), off)
    y = x[p.g0::p.gs][:p.gc, :, p.r0:p.r0 + p.rc].index_select(1, p.rows)
    return y.permute(1, 0, 2, 3, 4).reshape(p.n, p.gc, p.rc * bq, D)


def _put_rows(dst, val, p: Piece):
    """dst [G, nb, R, bq, *] at a piece's rows <- val [n, gc, rc * bq, *]."""
    G, nb, R, bq, D = dst.shape
    if p.qstep is not None:
        _rows_view(dst, p).copy_(val)
        return
    sel = dst[p.g0::p.gs][:p.gc, :, p.r0:p.r0 + p.rc]
    sel.index_copy_(1, p.rows, val.reshape(p.n, p.gc, p.rc, bq, D).permute(1, 0, 2, 3, 4))


def _keys_view(x, p: Piece):
    """A piece's key blocks of x [G, nkb, bk, D]: [n, gc, w, D], one overlapping strided
    view when they shift by a fixed step, else gathered."""
    G, nkb, bk, D = x.shape
    slots = p.kidx.shape[1]
    if p.kstep is not None:
        s = x.stride()
        off = x.storage_offset() + p.g0 * s[0] + int(p.kidx[0, 0]) * s[1]
        return x.as_strided((p.n, p.gc, slots * bk, D), (p.kstep * s[1], p.gs * s[0], s[2],
                                                         s[3]), off)
    g = torch.arange(p.g0, p.g0 + p.gs * p.gc, p.gs)[:p.gc]
    idx = (g.view(1, -1, 1) * nkb + p.kidx.unsqueeze(1)).reshape(-1)
    return x.view(G * nkb, bk * D).index_select(0, idx).view(p.n, p.gc, slots * bk, D)


def _add_keys(dst, val, p: Piece):
    """dst [G, nkb, bk, D] at a piece's key blocks += val [n, gc, slots * bk, D], one row
    or one key slot at a time (whichever are fewer; neither repeats a key block, so plain
    adds through views, or short index_add_s, do)."""
    G, nkb, bk, D = dst.shape
    n, gc = p.n, p.gc
    slots = p.kidx.shape[1]
    if val.transpose(1, 2).is_contiguous():  # the kernel's layout [n, w, gc, D]
        val = val.transpose(1, 2).view(n, slots, bk, gc, D).permute(0, 3, 1, 2, 4)
    else:
        val = val.reshape(n, gc, slots, bk, D)
    s = dst.stride()
    if p.kstep == 0:  # every row reads the same key blocks
        first = int(p.kidx[0, 0])
        dst[p.g0::p.gs][:gc, first:first + slots].add_(val.sum(0))
        return
    if p.kstep is not None:
        base = dst.storage_offset() + p.g0 * s[0] + int(p.kidx[0, 0]) * s[1]
        if n <= slots:
            for i in range(n):
                dst.as_strided((gc, slots, bk, D), (p.gs * s[0], s[1], s[2], s[3]),
                               base + i * p.kstep * s[1]).add_(val[i])
        else:
            for j in range(slots):
                dst.as_strided((n, gc, bk, D), (p.kstep * s[1], p.gs * s[0], s[2], s[3]),
                               base + j * s[1]).add_(val[:, :, j])
        return
    flat = dst.view(G * nkb, bk * D)
    g = torch.arange(p.g0, p.g0 + p.gs * gc, p.gs)[:gc]
    if n <= slots:
        for i in range(n):
            idx = (g.view(-1, 1) * nkb + p.kidx[i].view(1, -1)).reshape(-1)
            flat.index_add_(0, idx, val[i].reshape(gc * slots, bk * D))
    else:
        for j in range(slots):
            idx = (p.kidx[:, j].view(-1, 1) + g.view(1, -1) * nkb).reshape(-1)
            flat.index_add_(0, idx, val[:, :, j].reshape(n * gc, bk * D))


# ------------------------------------------------------------------ forward / backward


def forward(ctx, active=None):
    """(out [G, nqb, R, bq, D], raw lse [G, nqb, R, bq] as the kernel gives it (0 for rows
    without keys: what its backward needs), lse [G, nqb, R, bq, 1] with -inf there)."""
    G, nqb, R, bq, D = ctx.qs.shape
    o = torch.zeros(G, nqb, R, bq, D, dtype=ctx.cdt)
    raw = torch.zeros(G, nqb, R, bq, 1, dtype=torch.float64 if ctx.cdt == torch.float64
                      else torch.float32)
    lse = torch.full((G, nqb, R, bq, 1), float("-inf"), dtype=ctx.cdt)
    for p in _pieces(ctx, active, False):
        out, l_ = FLASH(_rows_view(ctx.qs, p), _keys_view(ctx.k, p), _keys_view(ctx.v, p),
                        attn_mask=p.mask, scale=ctx.scale)
        _put_rows(o, out, p)
        l_ = l_.unsqueeze(-1)
        _put_rows(raw, l_, p)
        l_ = l_.to(ctx.cdt)
        if p.empty is not None:
            l_ = l_.masked_fill(p.empty.view(-1, 1, p.rc * bq, 1), float("-inf"))
        _put_rows(lse, l_, p)
    return o, raw, lse


def _mask_head(cp: CpuPlan, head):
    """The head whose bias a pass's masks carry (None: the masks do not depend on it)."""
    if head is None or not any(hr is not None or owner.heads is not None
                               for owner, sc, hr in cp.bp.biases):
        return None
    return head


def backward(ctx, o, raw, do, active=None):
    """dq, dk, dv in block layout (dq for the q the user passed: the scale is applied)."""
    dq = torch.zeros_like(ctx.qs)
    dk = torch.zeros_like(ctx.k)
    dv = torch.zeros_like(ctx.v)
    for p in _pieces(ctx, active, True):
        gq, gk, gv = FLASH_BWD(_rows_view(do, p), _rows_view(ctx.qs, p), _keys_view(ctx.k, p),
                               _keys_view(ctx.v, p), _rows_view(o, p),
                               _rows_view(raw, p)[..., 0], 0.0, False, attn_mask=p.mask,
                               scale=ctx.scale)
        _put_rows(dq, gq, p)
        _add_keys(dk, gk, p)
        _add_keys(dv, gv, p)
    return dq, dk, dv


# ------------------------------------------------------------------ native forward

NATIVE_MASK = 1 << 22  # mask elements built per native call for units whose masks are lazy


def native_attention(cp: CpuPlan, q, k, v, scale: float, active=None):
    """The forward through flash.c, reading q, k, v [B, H(kv), N, D] (fp32) where they lie
    (no packed copies): (out [B, H, Nq, D], lse [B, H, Nq], -inf for rows without a key)."""
    B, H, Nq, D = q.shape
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    if _rows_written(cp, B, k.shape[1], H // k.shape[1], Nq, active):
        out = torch.empty(B, H, Nq, D, dtype=torch.float32)
        lse = torch.empty(B, H, Nq, dtype=torch.float32)
    else:
        out = torch.zeros(B, H, Nq, D, dtype=torch.float32)
        lse = torch.full((B, H, Nq), float("-inf"), dtype=torch.float32)
    qvalid = cp.qvalid.to(torch.uint8)
    for tasks, _alive in _task_batches(cp, B, k.shape[1], H // k.shape[1], active):
        native.forward(_fwd_args(cp, q, out, lse, k, v, tasks, scale, qvalid))
    return out, lse


def native_backward(cp: CpuPlan, q, k, v, out, lse, dout, scale: float, active=None):
    """dq, dk, dv (fp32, q's and k's layouts) through flash.c, from the native forward's
    out and lse; each thread adds key gradients into its own accumulators (at most
    ACC_BYTES of them: fewer threads beyond), summed into dk and dv at the end."""
    B, H, Nq, D = q.shape
    HKV, Nk = k.shape[1], k.shape[2]
    q, k, v, dout = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v, dout))
    G, nkb, bk = B * HKV, cp.ktok.shape[0], cp.bk
    per = max(1, 2 * G * nkb * bk * D * 4)
    threads = max(1, min(torch.get_num_threads(), ACC_BYTES // per))
    acc = caches.WORKSPACE.get("acc", (threads, 2, G, nkb, bk, D), torch.float32)
    touched = torch.zeros(threads, G, nkb, dtype=torch.uint8)
    new = torch.empty if _rows_written(cp, B, HKV, H // HKV, Nq, active) else torch.zeros
    dq = new(B, H, Nq, D, dtype=torch.float32)
    qvalid = cp.qvalid.to(torch.uint8)
    for tasks, _alive in _task_batches(cp, B, HKV, H // HKV, active):
        f = _fwd_args(cp, q, out, lse, k, v, tasks, scale, qvalid)
        f.threads = threads
        native.backward(native.BwdArgs(f, dout.data_ptr(), *dout.stride()[:3], dq.data_ptr(),
                                       acc.data_ptr(), touched.data_ptr(), G))
    kvalid = cp.kvalid.to(torch.uint8)
    # every row of k at one valid block position: unpack writes each row once
    whole = not cp.compact and int(kvalid.sum()) == Nk
    new = torch.empty if whole else torch.zeros
    dk, dv = (new(B, HKV, Nk, D, dtype=torch.float32) for _ in range(2))
    native.unpack(acc[:, 0], touched, cp.kpos, kvalid, dk, assign=whole)
    native.unpack(acc[:, 1], touched, cp.kpos, kvalid, dv, assign=whole)
    return dq, dk, dv


def native_computed(plan) -> int | None:
    """The score elements flash.c's forward (and its backward, alike) computes for a CPU
    plan per batch element over its tables (one kv head each; masks that differ per head
    over one table: head 0's), as it runs them (native.count: its chunks' live keys), or
    None where it does not run the whole plan (no kernel, blocks it does not take, per-call
    masks, summary or channel tokens)."""
    cp = cpu_plan(plan)
    bp = cp.bp
    if (native.kernel() is None or bp.content_dependent or bp.summaries or bp.channel
            or not native.usable(cp.bq, cp.bk, 16, torch.float32)):
        return None
    T = len(plan.tables)
    none = torch.empty(1, T, 0, 16)  # no q, k, v or output: the count reads tasks and masks
    qvalid = cp.qvalid.to(torch.uint8)
    return sum(native.count(_fwd_args(cp, none, none, none, none, none, tasks, 1.0, qvalid))
               for tasks, _alive in _task_batches(cp, 1, T, 1, None))


ACC_BYTES = 1 << 30  # the backward's per-thread key-gradient accumulators, all threads


def _fwd_args(cp, q, out, lse, k, v, tasks, scale, qvalid) -> native.FwdArgs:
    B, H, Nq, D = q.shape
    return native.FwdArgs(
        q.data_ptr(), out.data_ptr(), lse.data_ptr(), q.stride(0), q.stride(1), q.stride(2),
        Nq, cp.qpos.data_ptr(), qvalid.data_ptr(), k.data_ptr(), v.data_ptr(),
        *k.stride()[:3], *v.stride()[:3], cp.kpos.data_ptr(), tasks.data_ptr(),
        tasks.shape[0], H, v.shape[1], H // v.shape[1], cp.plan.nqb, cp.bq, D,
        cp.ktok.shape[0], cp.bk, scale, 0, int(not cp.bp.biases))


def _task_batches(cp: CpuPlan, B: int, HKV: int, R: int, active):
    """(tasks [T, 8] int64, the tensors their addresses point into) for flash.c: one batch
    for every unit whose masks are kept (made once per plan and shape), one per NATIVE_MASK
    elements of lazy masks."""
    kept, alive, lazy, _ = _plan_tasks(cp, B, HKV, R)
    for u, t, mh, gl, heads in lazy:
        w = u.kidx.shape[1] * cp.bk
        step = max(1, NATIVE_MASK // (cp.bq * w))
        for i0 in range(0, u.n, step):
            i1 = min(u.n, i0 + step)
            m = row_masks(cp, u.group, t, mh, i0, i1, torch.float32).unsqueeze(1)
            m = _keys_major(m, not cp.bp.biases)
            yield _alive(_unit_tasks(cp, u, m, i0, i1, gl, heads), active), (u, m)
    if kept is not None:
        yield _alive(kept, active), alive


def _rows_written(cp: CpuPlan, B: int, HKV: int, R: int, Nq: int, active) -> bool:
    """Whether flash.c writes every row of the call's outputs (o, lse, dq): a task for every
    (pair, query head, query block), every row of q at one valid position, no MoH gate."""
    return (active is None and _plan_tasks(cp, B, HKV, R)[3]
            and int(cp.qvalid.sum()) == Nq)


def _plan_tasks(cp: CpuPlan, B: int, HKV: int, R: int) -> tuple:
    """_build_tasks, once per (plan, batch, kv heads, query heads per kv head)."""
    return caches.NATIVE_TASKS.get_or_create((cp.plan, B, HKV, R),
                                             lambda: _build_tasks(cp, B, HKV, R))


def _build_tasks(cp: CpuPlan, B: int, HKV: int, R: int) -> tuple:
    """(the tasks of the units whose masks are kept or None, the units they point into,
    (unit, table, mask head, pairs, heads) of each unit whose masks are built per call,
    whether some unit covers every (pair, query head, query block))."""
    done: list = []
    alive: list = []
    lazy: list = []
    seen = torch.zeros(B * HKV, R, cp.plan.nqb, dtype=torch.bool)
    for t, (g0, gs, gc), hsl, head in cp.passes(B, HKV, R):
        heads = list(range(R)) if hsl.start is None else [hsl.start]
        if gc == 0 or not heads:
            continue
        gl = torch.arange(g0, g0 + gs * gc, gs)[:gc]
        mh = _mask_head(cp, head)
        for u in units(cp, t, mh, torch.float32):
            seen[gl.view(-1, 1, 1), torch.tensor(heads).view(1, -1, 1), u.rows.view(1, 1, -1)] = 1
            if u.lazy:
                lazy.append((u, t, mh, gl, heads))
                continue
            if u.mask is not None and u.kmask is None:
                u.kmask = _keys_major(u.mask, not cp.bp.biases)
            alive.append(u)
            done.append(_unit_tasks(cp, u, u.kmask, 0, u.n, gl, heads))
    return _local(torch.cat(done)) if done else None, tuple(alive), tuple(lazy), bool(seen.all())


def _local(tasks: torch.Tensor) -> torch.Tensor:
    """Tasks by (pair, query head, query block): units group query blocks by their key-list
    shape, far apart in space, but a thread runs consecutive tasks, and neighbouring query
    blocks of one head share most key blocks, which then stay in its L2 (one new key block a
    task instead of 2.25 on dilated na2d; 3-10% faster forwards on na2d, na3d and dilated
    na2d, in-process A/B, 2-core EPYC)."""
    if not len(tasks):
        return tasks
    key = (tasks[:, 0] * (int(tasks[:, 2].max()) + 1) + tasks[:, 2]) * (
        int(tasks[:, 1].max()) + 1) + tasks[:, 1]
    return tasks[torch.argsort(key, stable=True)]


def _alive(tasks: torch.Tensor, active) -> torch.Tensor:
    """The tasks whose (pair, query head, query block) MoH's gates keep (all: active None)."""
    return tasks if active is None else tasks[active[tasks[:, 0], tasks[:, 2], tasks[:, 1]]]


def _keys_major(mask: torch.Tensor, bits: bool) -> torch.Tensor:
    """Additive masks [..., bq, w] -> flash.c's keys-major masks [..., w, mw] (key j's
    entries for the block's queries in one row; mw: bq rounded up to 16, the padding
    masked), with `bits` one bit an entry, 1 where attended ([..., w, mw / 8] uint8, entry i:
    bit i % 8 of byte i // 8; 32 times fewer bytes to read), else the floats."""
    bq = mask.shape[-2]
    mt = torch.nn.functional.pad(mask.transpose(-1, -2), (0, -bq % 16),
                                 value=float("-inf")).contiguous()
    if not bits:
        return mt
    return torch.from_numpy(np.packbits((mt == 0).numpy(), axis=-1, bitorder="little"))


def _unit_tasks(cp, u: Unit, mask, i0, i1, gl, heads) -> torch.Tensor:
    """flash.c's tasks for rows i0:i1 of a unit (mask: theirs keys-major, [1 or i1 - i0, 1,
    w, mw] floats, or their bits), for (batch, kv head) pairs gl and query heads `heads`."""
    n, slots = i1 - i0, u.kidx.shape[1]
    cols = torch.empty(n, 8, dtype=torch.int64)
    cols[:, 1] = u.rows[i0:i1]
    cols[:, 3] = u.kidx.data_ptr() + torch.arange(i0, i1) * (slots * 8)
    cols[:, 4] = slots
    if mask is None:
        cols[:, 5] = 0
    else:
        per = 0 if mask.shape[0] == 1 else mask[0].numel() * mask.element_size()
        cols[:, 5] = mask.data_ptr() + torch.arange(n) * per
    cols[:, 6] = 0 if mask is None else mask.shape[-1] * (8 if mask.dtype == torch.uint8 else 1)
    cols[:, 7] = 0 if u.part is None else u.part.data_ptr()
    out = cols.view(1, 1, n, 8).repeat(len(gl), len(heads), 1, 1)
    out[..., 0] = gl.view(-1, 1, 1)
    out[..., 2] = torch.tensor(heads).view(1, -1, 1)
    return out.view(-1, 8)
