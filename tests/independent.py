"""Independent oracle for the standard patterns, written from shared/reference/patterns.md only.

Nothing here imports attndsl.  Every mask function returns a dense numpy bool array
[Nq, Nk] (grids flattened row-major, last axis fastest).  The mixing constructs (Combiner,
DHSA, DaViT, MoH, TransNeXt) are plain torch formulas, written with loops where that keeps
them close to the text of the reference.  Sizes in the tests are small, so speed is no goal.
"""

from __future__ import annotations

import math
from itertools import product

import numpy as np
import torch

# --------------------------------------------------------------------------- helpers


def _per_axis(value, naxes):
    """One value for every axis, or one per axis."""
    if isinstance(value, (tuple, list)):
        assert len(value) == naxes
        return tuple(value)
    return (value,) * naxes


def _pairwise(n, fn):
    """Dense [n, n] bool mask from a python predicate fn(q, k)."""
    m = np.zeros((n, n), dtype=bool)
    for q in range(n):
        for k in range(n):
            m[q, k] = bool(fn(q, k))
    return m


def _combine_axes(axis_masks):
    """AND of per-axis masks over a row-major flattened grid (first axis slowest)."""
    full = np.ones((1, 1), dtype=bool)
    for am in axis_masks:
        # index (a, b) -> a * len(b) + b on both the query and the key side
        full = (full[:, None, :, None] & am[None, :, None, :]).reshape(
            full.shape[0] * am.shape[0], full.shape[1] * am.shape[1])
    return full


def grid_coords(shape):
    """Row-major coordinates of every token of a grid, in token order."""
    return list(product(*[range(n) for n in shape]))


# --------------------------------------------------------------------------- 1. neighborhood


def na_axis_window(L, k, s, d, causal, x):
    """(group, start, end) of query coordinate x on one axis, literally as in section 1."""
    g = x % d
    xp = x // d
    Lg = L // d + (1 if g < L % d else 0)
    left = k // 2
    _right = k // 2 + k % 2 - 1  # noqa: F841 (in the reference; implied by start/end)
    if not causal:
        leader = min((xp // s) * s + s // 2, Lg - 1)
        start = min(max(leader - left, 0), Lg - k)
        end = start + k
    else:
        leader = min((xp // s) * s + s - 1, Lg - 1)
        start = max(leader - (k - 1), 0)
        end = min(xp + 1, Lg)
    return g, start, end


def na_axis_mask(L, k, s=1, d=1, causal=False):
    """[L, L] neighbour relation on one axis."""
    m = np.zeros((L, L), dtype=bool)
    for x in range(L):
        g, start, end = na_axis_window(L, k, s, d, causal, x)
        for y in range(L):
            m[x, y] = (y % d == g) and (start <= y // d < end)
    return m


def na_valid(shape, kernel, dilation=1, stride=1):
    """The section-1 constraints, per axis."""
    n = len(shape)
    ks, ds, ss = _per_axis(kernel, n), _per_axis(dilation, n), _per_axis(stride, n)
    return all(k >= 2 and s >= 1 and d >= 1 and k * d <= L and s <= k
               for L, k, d, s in zip(shape, ks, ds, ss))


def neighborhood(shape, kernel, dilation=1, stride=1, causal=False):
    n = len(shape)
    ks, ds, ss, cs = (_per_axis(kernel, n), _per_axis(dilation, n),
                      _per_axis(stride, n), _per_axis(causal, n))
    return _combine_axes([na_axis_mask(L, k, s, d, c)
                          for L, k, s, d, c in zip(shape, ks, ss, ds, cs)])


def na1d(N, kernel, dilation=1, stride=1, causal=False):
    return neighborhood((N,), kernel, dilation, stride, causal)


def na2d(H, W, kernel, dilation=1, stride=1, causal=False):
    return neighborhood((H, W), kernel, dilation, stride, causal)


def na3d(T, H, W, kernel, dilation=1, stride=1, causal=False):
    return neighborhood((T, H, W), kernel, dilation, stride, causal)


def neighborhood_bruteforce(shape, kernel, dilation=1, stride=1, causal=False):
    """Same relation, evaluated token pair by token pair (cross-checks _combine_axes)."""
    n = len(shape)
    ks, ds, ss, cs = (_per_axis(kernel, n), _per_axis(dilation, n),
                      _per_axis(stride, n), _per_axis(causal, n))
    coords = grid_coords(shape)
    m = np.zeros((len(coords), len(coords)), dtype=bool)
    for qi, qc in enumerate(coords):
        wins = [na_axis_window(L, k, s, d, c, x)
                for L, k, s, d, c, x in zip(shape, ks, ss, ds, cs, qc)]
        for ki, kc in enumerate(coords):
            m[qi, ki] = all(y % d == g and st <= y // d < en
                            for (g, st, en), y, d in zip(wins, kc, ds))
    return m


# --------------------------------------------------------------------------- 2. sliding windows
# The 1-D patterns are written with broadcasting: q is a column of query indices, k a row of
# key indices, and the rule is the formula of patterns.md verbatim.


def _qk(N):
    idx = np.arange(N, dtype=np.int64)
    return idx[:, None], idx[None, :]


def sliding_window(N, window, causal=True):
    q, k = _qk(N)
    if causal:
        return (0 <= q - k) & (q - k < window)
    return np.abs(q - k) < window


def dilated_window(N, window, dilation, causal=True):
    q, k = _qk(N)
    t = q - k
    if not causal:
        t = np.abs(t)
    return (0 <= t) & (t < window * dilation) & (t % dilation == 0)


# --------------------------------------------------------------------------- 3. PowerAttention


def _is_pow2_or_zero(x):
    return (x & (x - 1)) == 0


def power_attention(N, block=256, window=5, sink=1):
    q, k = _qk(N)
    blk = q // block - k // block
    return (q >= k) & ((blk < window) | _is_pow2_or_zero(blk) | (k < block * sink))


def block_sliding(N, block=256, window=9, sink=1):
    q, k = _qk(N)
    blk = q // block - k // block
    return (q >= k) & ((blk < window) | (k < block * sink))


def block_dilated(N, block=256, span=20):
    q, k = _qk(N)
    blk = q // block - k // block
    return (q >= k) & (blk % 2 == 0) & (blk < span)


LONGNET_SR = ((8, 1), (16, 2), (32, 4), (64, 8), (128, 16))


def longnet(N, block=256):
    q, k = _qk(N)
    qb, kb = q // block, k // block
    t1, t2 = qb | kb, qb ^ kb
    allowed = np.zeros((N, N), dtype=bool)
    for s, r in LONGNET_SR:
        allowed |= (t2 < s) & ((t1 & (r - 1)) == 0)
    return (q >= k) & allowed


def power_strides(N, window):
    q, k = _qk(N)
    t = q - k
    return ((0 <= t) & (t < window)) | ((t > 0) & ((t & (t - 1)) == 0))


# block-level versions (one entry per block pair), for the reachability claims
def power_attention_blocks(nblocks, window=5, sink=1):
    return _pairwise(nblocks, lambda qb, kb: qb >= kb and (
        qb - kb < window or _is_pow2_or_zero(qb - kb) or kb < sink))


# --------------------------------------------------------------------------- 4. Sparse Transformer


def strided(N, stride):
    q, k = _qk(N)
    return (k <= q) & ((q - k < stride) | ((q - k) % stride == 0))


def fixed(N, stride, c=1):
    q, k = _qk(N)
    return (k <= q) & ((q // stride == k // stride) | (k % stride >= stride - c))


# --------------------------------------------------------------------------- 5. HaloNet


def halo2d(H, W, block=8, halo=3):
    coords = grid_coords((H, W))
    m = np.zeros((H * W, H * W), dtype=bool)
    for qi, (y, x) in enumerate(coords):
        by, bx = y // block, x // block
        for ki, (yk, xk) in enumerate(coords):
            m[qi, ki] = (by * block - halo <= yk < (by + 1) * block + halo
                         and bx * block - halo <= xk < (bx + 1) * block + halo)
    return m


# --------------------------------------------------------------------------- 8. DaViT window part


def window2d(H, W, window=7):
    coords = grid_coords((H, W))
    m = np.zeros((H * W, H * W), dtype=bool)
    for qi, (y, x) in enumerate(coords):
        for ki, (yk, xk) in enumerate(coords):
            m[qi, ki] = y // window == yk // window and x // window == xk // window
    return m


# --------------------------------------------------------------------------- 11. documents


def document_causal(N, doc):
    doc = [int(d) for d in doc]
    return _pairwise(N, lambda q, k: k <= q and doc[q] == doc[k])


def prefix_lm(N, prefix):
    prefix = int(prefix)
    return _pairwise(N, lambda q, k: k <= q or k < prefix)


# --------------------------------------------------------------------------- attention helpers


def masked_attention(q, k, v, mask, scale=None):
    """Plain masked softmax attention; rows without keys give 0.  mask broadcasts to
    [B, H, Nq, Nk].  k/v heads are repeated for GQA."""
    hq, hkv = q.shape[1], k.shape[1]
    if hq != hkv:
        k = k.repeat_interleave(hq // hkv, dim=1)
        v = v.repeat_interleave(hq // hkv, dim=1)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = (q @ k.transpose(-1, -2)) * scale
    mask = torch.as_tensor(mask, dtype=torch.bool).expand_as(s)
    s = s.masked_fill(~mask, float("-inf"))
    has = mask.any(-1, keepdim=True)
    p = torch.softmax(torch.where(has, s, torch.zeros_like(s)), dim=-1)
    p = torch.where(mask, p, torch.zeros_like(p))
    return p @ v


# --------------------------------------------------------------------------- 6. Combiner


def combiner_fixed_structure(N, span):
    """For each query i: (direct keys, list of regions), causal Fixed(span)."""
    out = []
    for i in range(N):
        direct = [j for j in range(N) if j // span == i // span and j <= i]
        regions = [list(range(r * span, min((r + 1) * span, N))) for r in range(i // span)]
        out.append((direct, regions))
    return out


def combiner_logsparse_structure(N):
    out = []
    for p in range(N):
        direct = [p] + ([p - 1] if p % 2 == 1 else [])
        regions = []
        bit = 1  # 'l' in patterns.md: one region for every set bit l >= 1 of p
        while (1 << bit) <= p:
            if (p >> bit) & 1:
                lo = (p // (1 << (bit + 1))) * (1 << (bit + 1))
                regions.append(list(range(lo, lo + (1 << bit))))
            bit += 1
        out.append((sorted(direct), regions))
    return out


def combiner_axial_structure(H, W):
    out = []
    for i in range(H * W):
        row = i // W
        direct = [j for j in range(row * W, (row + 1) * W) if j <= i]
        regions = [list(range(r * W, (r + 1) * W)) for r in range(row)]
        out.append((direct, regions))
    return out


def combiner_from_structure(q, k, v, structure, scale=None):
    """Section 6 formula, one query at a time.  q, k, v: [B, H, N, D] (same heads)."""
    B, H, N, D = q.shape
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    rows = []
    for i, (direct, regions) in enumerate(structure):
        regions = [r for r in regions if len(r) > 0]  # regions with no keys do not exist
        qi = q[:, :, i, :]                                        # [B, H, D]
        logits, values = [], []
        for j in direct:
            logits.append((qi * k[:, :, j, :]).sum(-1) * scale)  # [B, H]
            values.append(v[:, :, j, :])                         # [B, H, D]
        for reg in regions:
            idx = torch.tensor(reg)
            k_r = k[:, :, idx, :]                                 # [B, H, n, D]
            v_r = v[:, :, idx, :]
            k_omega = k_r.max(dim=2).values                       # max-pool of the keys
            q_omega = q[:, :, idx, :].max(dim=2).values           # max-pool of the queries
            inner = torch.softmax((k_r * q_omega[:, :, None, :]).sum(-1) * scale, dim=-1)
            v_omega = (inner[..., None] * v_r).sum(2)             # local expectation
            logits.append((qi * k_omega).sum(-1) * scale)
            values.append(v_omega)
        p = torch.softmax(torch.stack(logits, -1), dim=-1)       # [B, H, M]
        rows.append((p[..., None] * torch.stack(values, 2)).sum(2))
    return torch.stack(rows, 2)


def combiner_fixed(q, k, v, span):
    return combiner_from_structure(q, k, v, combiner_fixed_structure(q.shape[2], span))


def combiner_logsparse(q, k, v):
    return combiner_from_structure(q, k, v, combiner_logsparse_structure(q.shape[2]))


def combiner_axial(q, k, v, H, W):
    return combiner_from_structure(q, k, v, combiner_axial_structure(H, W))


def combiner_mixture(q, k, v, span):
    return 0.5 * (combiner_fixed(q, k, v, span) + combiner_logsparse(q, k, v))


# --------------------------------------------------------------------------- 7. DHSA


def dhsa_chunks(N, chunk=64, boundaries=None):
    """List of (start, end) chunks."""
    if boundaries is None:
        starts = list(range(0, N, chunk))
    else:
        starts = [int(b) for b in boundaries]
    ends = starts[1:] + [N]
    return list(zip(starts, ends))


def dhsa_keep(qh, kh, N, block, chunks, topk):
    """keep[b] (a set of chunk indices) for one batch element and one head.
    qh, kh: [N, D]."""
    nb = -(-N // block)
    keep = []
    reps_k = [math.sqrt(e - s) * kh[s:e].mean(0) for s, e in chunks]
    for b in range(nb):
        bs, be = b * block, min((b + 1) * block, N)
        rep_q = math.sqrt(be - bs) * qh[bs:be].mean(0)
        overlap = {c for c, (s, e) in enumerate(chunks) if s < be and e > bs}
        last_tok = min(N - 1, (b + 1) * block - 1)
        cand = [c for c, (s, e) in enumerate(chunks) if c not in overlap and s <= last_tok]
        scores = {c: float(rep_q @ reps_k[c]) for c in cand}
        # highest score first; ties toward the later chunk
        ranked = sorted(cand, key=lambda c: (-scores[c], -c))
        keep.append(overlap | set(ranked[:topk]))
    return keep


def dhsa_mask(q, k, block=128, chunk=64, topk=4, boundaries=None):
    """[B, H, N, N] bool.  q, k: [B, H, N, D]."""
    B, H, N, _ = q.shape
    chunks = dhsa_chunks(N, chunk, boundaries)
    chunk_of = np.zeros(N, dtype=np.int64)
    for c, (s, e) in enumerate(chunks):
        chunk_of[s:e] = c
    out = np.zeros((B, H, N, N), dtype=bool)
    for bi in range(B):
        for h in range(H):
            keep = dhsa_keep(q[bi, h].double(), k[bi, h].double(), N, block, chunks, topk)
            for qi in range(N):
                kb = keep[qi // block]
                for ki in range(qi + 1):
                    out[bi, h, qi, ki] = chunk_of[ki] in kb
    return out


def dhsa_attention(q, k, v, block=128, chunk=64, topk=4, boundaries=None):
    mask = torch.from_numpy(dhsa_mask(q, k, block, chunk, topk, boundaries))
    return masked_attention(q, k, v, mask)


# --------------------------------------------------------------------------- 8. DaViT channel


def davit_channel_group(q, k, v):
    """q, k, v: [B, G, N, Cg] -> [B, G, N, Cg]."""
    Cg = q.shape[-1]
    logits = torch.einsum("bgnc,bgnd->bgcd", q, k) * Cg ** -0.5   # A[c, c'] before softmax
    A = torch.softmax(logits, dim=-1)
    return torch.einsum("bgcd,bgnd->bgnc", A, v)


# --------------------------------------------------------------------------- 9. MoH


def moh_gates(router, heads, shared, topk):
    """[B, N, heads] gates."""
    B, N, R = router.shape
    assert R == heads - shared
    gates = torch.zeros(B, N, heads, dtype=router.dtype)
    gates[..., :shared] = 1.0
    for b in range(B):
        for n in range(N):
            r = router[b, n]
            top = torch.topk(r, topk).indices
            w = torch.softmax(r[top], dim=0)
            for i, h in enumerate(top.tolist()):
                gates[b, n, shared + h] = w[i]
    return gates


def moh_attention(q, k, v, router, heads, shared, topk):
    B, H, N, D = q.shape
    gates = moh_gates(router, heads, shared, topk)                 # [B, N, H]
    dense = masked_attention(q, k, v, torch.ones(N, N, dtype=torch.bool))
    return dense * gates.permute(0, 2, 1)[..., None]


# --------------------------------------------------------------------------- 10. TransNeXt


def transnext_window(H, W, kernel=3):
    r = kernel // 2
    coords = grid_coords((H, W))
    m = np.zeros((H * W, H * W), dtype=bool)
    for qi, (y, x) in enumerate(coords):
        for ki, (yk, xk) in enumerate(coords):
            m[qi, ki] = abs(yk - y) <= r and abs(xk - x) <= r
    return m


def transnext_pool_regions(H, W, pool):
    regions = []
    for py in range(0, H, pool):
        for px in range(0, W, pool):
            regions.append([y * W + x for y in range(py, min(py + pool, H))
                            for x in range(px, min(px + pool, W))])
    return regions


def transnext_aggregated(q, k, v, H, W, kernel=3, pool=4):
    """q, k, v [B, heads, H*W, D]: one softmax over window keys and all pooled tokens."""
    B, Hh, N, D = q.shape
    scale = 1.0 / math.sqrt(D)
    win = torch.from_numpy(transnext_window(H, W, kernel))
    regions = transnext_pool_regions(H, W, pool)
    kp = torch.stack([k[:, :, r, :].mean(2) for r in regions], 2)   # [B, Hh, P, D]
    vp = torch.stack([v[:, :, r, :].mean(2) for r in regions], 2)
    s_win = (q @ k.transpose(-1, -2)) * scale
    s_win = s_win.masked_fill(~win, float("-inf"))
    s_pool = (q @ kp.transpose(-1, -2)) * scale
    p = torch.softmax(torch.cat([s_win, s_pool], -1), dim=-1)
    return p[..., :N] @ v + p[..., N:] @ vp
