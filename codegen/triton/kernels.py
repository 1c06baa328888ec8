"""The block-sparse attention kernels, written once. A pattern contributes only three small
functions, generated from its IR by generate.py and appended to this source:

    _mask(q_idx, k_idx, h, bh, INI, INF, DYN_KEEP, DYN_CHUNK, DYN_NB, DYN_NC) -> bool block
    _bias(q_idx, k_idx, h, INI, INF) -> float block (0 without bias statements)
    _smask(q_idx, r_idx, h, bh, SROW, INI, INF) -> bool block (summary tokens)

q_idx / k_idx are row-major token indices ([BLOCK_M, 1] and [1, BLOCK_N]; -1 for padding),
h the query head, bh = batch * H + h. Run-time inputs come packed: INI holds, per input, its
offset and length (two int64 slots each) and the int data; INF the float data.

One program per (query block, batch x head) walks the block table of its query block
(PARTIAL pairs with the mask, then FULL pairs without), with an online softmax in base 2
(log2(e) folded into the scale) and the log-sum-exp saved for the backward pass (+inf for
rows with no key). The backward recomputes probabilities: one program per key block (dK,
dV over the transposed table, the query heads of a GQA group summed in-program) and one per
query block (dQ). Constexpr switches: PERM_Q / PERM_K (tiled token orders), HAS_BIAS,
SOFTCAP, ROUTED (MoH: (query block, head) pairs whose gates are all zero skip their work),
SUMMARY (the keys are summary tokens: rows of K, V after pooling, `_smask` decides), HAS_PAD
(KVALID [B, keys] marks padding keys; the tables list per batch only blocks with a real key)
and DROPOUT (semantics/dropout.py's hash of seed, batch x head, query, key). META holds
[first query token, dropout seed, dropout threshold, key index offset] (int64).

WIDEN converts bf16 operands to fp32 after loading. Only the CPU interpreter sets it: its
numpy-based tl.dot has no bfloat16; GPUs use bf16 tensor cores.

This file is source text for the kernel cache (runtime.py): it is never imported alone.
"""

import triton
import triton.language as tl

LOG2E: tl.constexpr = 1.4426950408889634


@triton.jit
def _fdiv(a, b):
    """Python's floor division on integers."""
    b = tl.where(b == 0, 1, b)
    q = a // b
    return q - ((a % b != 0) & ((a < 0) != (b < 0))).to(q.dtype)


@triton.jit
def _fmod(a, b):
    """Python's modulo: the result has the divisor's sign."""
    b = tl.where(b == 0, 1, b)
    r = a % b
    return tl.where((r != 0) & ((r < 0) != (b < 0)), r + b, r)


@triton.jit
def _not(x):
    return x == 0


@triton.jit
def _tanh(x):
    return 2.0 * tl.sigmoid(2.0 * x) - 1.0


@triton.jit
def _in_int(INI, slot, idx):
    """Item idx (clamped into range) of run-time input `slot` (ints and bools)."""
    off = tl.load(INI + 2 * slot)
    n = tl.load(INI + 2 * slot + 1)
    return tl.load(INI + off + tl.minimum(tl.maximum(idx, 0), n - 1))


@triton.jit
def _in_float(INI, INF, slot, idx):
    """Item idx (clamped into range) of float run-time input `slot`."""
    off = tl.load(INI + 2 * slot)
    n = tl.load(INI + 2 * slot + 1)
    return tl.load(INF + off + tl.minimum(tl.maximum(idx, 0), n - 1))


@triton.jit
def _mix(x):
    """semantics/dropout.mix: a bijective mix of 32-bit values held in int64."""
    x = (((x >> 16) ^ x) * 73244475) & 0xFFFFFFFF
    x = (((x >> 16) ^ x) * 73244475) & 0xFFFFFFFF
    return (x >> 16) ^ x


@triton.jit
def _kept(META, bh, q_idx, k_idx, drop_scale):
    """Dropout's scaled keep mask of a block (semantics/dropout.keep)."""
    seed = tl.load(META + 1)
    thresh = tl.load(META + 2)
    kk = k_idx + tl.load(META + 3)  # summary rows count as keys after the direct ones
    h = _mix(_mix(_mix((bh ^ seed) & 0xFFFFFFFF) ^ (q_idx & 0xFFFFFFFF)) ^ (kk & 0xFFFFFFFF))
    return tl.where(h >= thresh, drop_scale, 0.0)


@triton.jit
def _token_index(PERM, offs, N, first, PERM_ON: tl.constexpr):
    """Row-major token index of each position (-1 past the end); positions are tokens
    first, first + 1, ... without a permutation."""
    idx = tl.where(offs < N, first + offs, -1).to(tl.int64)
    if PERM_ON:
        idx = tl.load(PERM + offs, mask=offs < N, other=-1).to(tl.int64)
    return idx


@triton.jit
def _scores(q, k, q_idx, k_idx, h, sm_scale, qk_scale, softcap, INI, INF,
            PREC: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr):
    """q k^T with the scale, bias and softcap, in base-2 units; and the softcap's tanh (for
    its derivative)."""
    s = tl.dot(q, tl.trans(k), input_precision=PREC)
    tcap = s
    if HAS_BIAS or SOFTCAP:
        s = s * sm_scale
        if HAS_BIAS:
            s = s + _bias(q_idx, k_idx, h, INI, INF)  # noqa: F821 (generated)
        if SOFTCAP:
            tcap = _tanh(s / softcap)
            s = softcap * tcap
        s = s * LOG2E
    else:
        s = s * qk_scale
    return s, tcap


@triton.jit
def _allowed(q_idx, k_idx, kin, h, bh, INI, INF, DYN_KEEP, DYN_CHUNK, DYN_NB, DYN_NC, SROW,
             KVALID, kv_row, offs_n, SUMMARY: tl.constexpr, HAS_PAD: tl.constexpr):
    """The pattern's mask on a PARTIAL block (padding rows and columns excluded)."""
    if SUMMARY:
        ok = (q_idx >= 0) & kin & _smask(q_idx, k_idx, h, bh, SROW, INI, INF)  # noqa: F821
    else:
        ok = (q_idx >= 0) & (k_idx >= 0) & _mask(  # noqa: F821 (generated)
            q_idx, k_idx, h, bh, INI, INF, DYN_KEEP, DYN_CHUNK, DYN_NB, DYN_NC)
    if HAS_PAD:  # a padding key (a summary region with no real key) is absent
        ok = ok & (tl.load(KVALID + kv_row + offs_n[None, :], mask=kin, other=0) != 0)
    return ok


@triton.jit
def _key_index(KPERM, offs_n, NK, PERM_K: tl.constexpr, SUMMARY: tl.constexpr):
    """The keys' indices [1, BLOCK_N]: row-major tokens, or summary row indices."""
    if SUMMARY:
        k_idx = tl.minimum(offs_n, NK - 1)[None, :].to(tl.int64)
    else:
        k_idx = _token_index(KPERM, offs_n, NK, 0, PERM_K)[None, :]
    return k_idx


@triton.jit
def _span(OFF, g, rows, blk):
    """Entries start:end of block `blk`'s row in table g of a CSR offsets array."""
    start = tl.load(OFF + g * (rows + 1) + blk)
    end = tl.load(OFF + g * (rows + 1) + blk + 1)
    return start, end


@triton.jit
def _load_rows(X, base, offs, N, offs_d, D: tl.constexpr, WIDEN: tl.constexpr):
    """Rows `offs` (those < N; others 0) of a [*, N, D] tensor at `base`."""
    ptr = base + offs[:, None].to(tl.int64) * D + offs_d[None, :]
    x = tl.load(X + ptr, mask=(offs < N)[:, None] & (offs_d < D)[None, :], other=0.0)
    if WIDEN:
        x = x.to(tl.float32)
    return x


@triton.jit
def _key_block(IDX, j, K, V, KPERM, kv_base, NK, offs_d, D: tl.constexpr,
               BLOCK_N: tl.constexpr, WIDEN: tl.constexpr, PERM_K: tl.constexpr,
               SUMMARY: tl.constexpr):
    """The j-th key block of a table row: its positions, keys, values and key indices."""
    offs_n = tl.load(IDX + j) * BLOCK_N + tl.arange(0, BLOCK_N)
    k = _load_rows(K, kv_base, offs_n, NK, offs_d, D, WIDEN)
    v = _load_rows(V, kv_base, offs_n, NK, offs_d, D, WIDEN)
    return offs_n, k, v, _key_index(KPERM, offs_n, NK, PERM_K, SUMMARY)


@triton.jit
def _grads(q, k, v, do, lse, delta, q_idx, k_idx, kin, h, bh, sm_scale, qk_scale, softcap,
           INI, INF, DYN_KEEP, DYN_CHUNK, DYN_NB, DYN_NC, SROW, KVALID, kv_row, offs_n, META,
           drop_scale, MASKED: tl.constexpr, PREC: tl.constexpr, HAS_BIAS: tl.constexpr,
           SOFTCAP: tl.constexpr, SUMMARY: tl.constexpr, HAS_PAD: tl.constexpr,
           DROPOUT: tl.constexpr):
    """The backward's recomputed probabilities (after dropout) and score gradients of one
    block: dV takes P Z, dS = P (Z dP - delta) with Z dropout's scaled keep mask."""
    s, tcap = _scores(q, k, q_idx, k_idx, h, sm_scale, qk_scale, softcap, INI, INF, PREC,
                      HAS_BIAS, SOFTCAP)
    p = tl.math.exp2(s - lse[:, None])
    if MASKED:
        msk = _allowed(q_idx, k_idx, kin[None, :], h, bh, INI, INF, DYN_KEEP, DYN_CHUNK, DYN_NB,
                       DYN_NC, SROW, KVALID, kv_row, offs_n, SUMMARY, HAS_PAD)
        p = tl.where(msk, p, 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision=PREC)
    pz = p
    if DROPOUT:
        z = _kept(META, bh, q_idx, k_idx, drop_scale)
        pz = p * z
        dp = dp * z
    ds = p * (dp - delta[:, None])
    if SOFTCAP:
        ds = ds * (1.0 - tcap * tcap)
    return pz, ds


@triton.jit
def attn_fwd(Q, K, V, QPERM, KPERM, PART_OFF, PART_IDX, FULL_OFF, FULL_IDX, tab_sb, tab_sh,
             sm_scale, qk_scale, softcap, H, HKV, NQ, NK, NQB, NKB, NKX,
             INI, INF, DYN_KEEP, DYN_CHUNK, DYN_NB, DYN_NC, ROUTE, SROW, KVALID, META,
             drop_scale, OUT, LSE,
             D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
             BLOCK_D: tl.constexpr, PREC: tl.constexpr, WIDEN: tl.constexpr,
             PERM_Q: tl.constexpr, PERM_K: tl.constexpr, HAS_BIAS: tl.constexpr,
             SOFTCAP: tl.constexpr, ROUTED: tl.constexpr, SUMMARY: tl.constexpr,
             HAS_PAD: tl.constexpr, DROPOUT: tl.constexpr):
    m_blk = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    g = b * tab_sb + h * tab_sh
    offs_m = m_blk * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    kv_base = (b * HKV + h // (H // HKV)) * NKX * D
    q = _load_rows(Q, bh * NQ * D, offs_m, NQ, offs_d, D, WIDEN)
    q_idx = _token_index(QPERM, offs_m, NQ, tl.load(META), PERM_Q)[:, None]
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for masked in tl.static_range(2):  # PARTIAL blocks with the mask, then FULL ones
        if masked == 0:
            OFF = PART_OFF
            IDX = PART_IDX
        else:
            OFF = FULL_OFF
            IDX = FULL_IDX
        start, end = _span(OFF, g, NQB, m_blk)
        if ROUTED:
            end = tl.where(tl.load(ROUTE + bh * NQB + m_blk) != 0, end, start)
        for j in range(start, end):
            offs_n, k, v, k_idx = _key_block(IDX, j, K, V, KPERM, kv_base, NK, offs_d, D,
                                             BLOCK_N, WIDEN, PERM_K, SUMMARY)
            s, tcap = _scores(q, k, q_idx, k_idx, h, sm_scale, qk_scale, softcap, INI, INF,
                              PREC, HAS_BIAS, SOFTCAP)
            if masked == 0:
                msk = _allowed(q_idx, k_idx, (offs_n < NK)[None, :], h, bh, INI, INF,
                               DYN_KEEP, DYN_CHUNK, DYN_NB, DYN_NC, SROW, KVALID, b * NKX,
                               offs_n, SUMMARY, HAS_PAD)
                s = tl.where(msk, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.math.exp2(m_i - m_use)
            p = tl.math.exp2(s - m_use[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            if DROPOUT:
                p = p * _kept(META, bh, q_idx, k_idx, drop_scale)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
            m_i = m_new
    has = l_i > 0
    out = acc / tl.where(has, l_i, 1.0)[:, None]
    qin = offs_m < NQ
    tl.store(OUT + bh * NQ * D + offs_m[:, None].to(tl.int64) * D + offs_d[None, :],
             out.to(OUT.dtype.element_ty), mask=qin[:, None] & (offs_d < D)[None, :])
    lse = tl.where(has, m_i + tl.math.log2(tl.where(has, l_i, 1.0)), float("inf"))
    tl.store(LSE + bh * NQ + offs_m, lse, mask=qin)


@triton.jit
def attn_bwd_dkdv(Q, K, V, QPERM, KPERM, PART_OFF, PART_IDX, FULL_OFF, FULL_IDX, tab_sb,
                  tab_sh, sm_scale, qk_scale, softcap, H, HKV, NQ, NK, NQB, NKB, NKX,
                  INI, INF, DYN_KEEP, DYN_CHUNK, DYN_NB, DYN_NC, ROUTE, SROW, KVALID, META,
                  drop_scale, DO, LSE, DELTA, DK, DV, TPART_OFF, TPART_IDX, TFULL_OFF, TFULL_IDX,
                  D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  BLOCK_D: tl.constexpr, PREC: tl.constexpr, WIDEN: tl.constexpr,
                  PERM_Q: tl.constexpr, PERM_K: tl.constexpr, HAS_BIAS: tl.constexpr,
                  SOFTCAP: tl.constexpr, ROUTED: tl.constexpr, SUMMARY: tl.constexpr,
             HAS_PAD: tl.constexpr, DROPOUT: tl.constexpr):
    n_blk = tl.program_id(0)
    bhk = tl.program_id(1).to(tl.int64)
    b = bhk // HKV
    rep = H // HKV
    offs_n = n_blk * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    kin = offs_n < NK
    k = _load_rows(K, bhk * NKX * D, offs_n, NK, offs_d, D, WIDEN)
    v = _load_rows(V, bhk * NKX * D, offs_n, NK, offs_d, D, WIDEN)
    k_idx = _key_index(KPERM, offs_n, NK, PERM_K, SUMMARY)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    for r in range(rep):  # the query heads of this GQA group, summed
        h = (bhk % HKV) * rep + r
        bh = b * H + h
        g = b * tab_sb + h * tab_sh
        for masked in tl.static_range(2):
            if masked == 0:
                OFF = TPART_OFF
                IDX = TPART_IDX
            else:
                OFF = TFULL_OFF
                IDX = TFULL_IDX
            start, end = _span(OFF, g, NKB, n_blk)
            for j in range(start, end):
                m_blk = tl.load(IDX + j)
                active = True
                if ROUTED:  # query blocks whose gates are all zero add nothing
                    active = tl.load(ROUTE + bh * NQB + m_blk) != 0
                if active:
                    offs_m = m_blk * BLOCK_M + tl.arange(0, BLOCK_M)
                    q = _load_rows(Q, bh * NQ * D, offs_m, NQ, offs_d, D, WIDEN)
                    do = _load_rows(DO, bh * NQ * D, offs_m, NQ, offs_d, D, WIDEN)
                    lse = tl.load(LSE + bh * NQ + offs_m, mask=offs_m < NQ, other=float("inf"))
                    delta = tl.load(DELTA + bh * NQ + offs_m, mask=offs_m < NQ, other=0.0)
                    q_idx = _token_index(QPERM, offs_m, NQ, tl.load(META), PERM_Q)[:, None]
                    p, ds = _grads(q, k, v, do, lse, delta, q_idx, k_idx, kin, h, bh,
                                   sm_scale, qk_scale, softcap, INI, INF, DYN_KEEP, DYN_CHUNK,
                                   DYN_NB, DYN_NC, SROW, KVALID, b * NKX, offs_n, META,
                                   drop_scale, masked == 0, PREC, HAS_BIAS, SOFTCAP, SUMMARY,
                                   HAS_PAD, DROPOUT)
                    dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PREC)
                    dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PREC)
    dk = dk * sm_scale
    kv_ptr = bhk * NKX * D + offs_n[:, None].to(tl.int64) * D + offs_d[None, :]
    keep = kin[:, None] & (offs_d < D)[None, :]
    tl.store(DK + kv_ptr, dk.to(DK.dtype.element_ty), mask=keep)
    tl.store(DV + kv_ptr, dv.to(DV.dtype.element_ty), mask=keep)


@triton.jit
def attn_bwd_dq(Q, K, V, QPERM, KPERM, PART_OFF, PART_IDX, FULL_OFF, FULL_IDX, tab_sb, tab_sh,
                sm_scale, qk_scale, softcap, H, HKV, NQ, NK, NQB, NKB, NKX,
                INI, INF, DYN_KEEP, DYN_CHUNK, DYN_NB, DYN_NC, ROUTE, SROW, KVALID, META,
                drop_scale, DO, LSE, DELTA, DQ,
                D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_D: tl.constexpr, PREC: tl.constexpr, WIDEN: tl.constexpr,
                PERM_Q: tl.constexpr, PERM_K: tl.constexpr, HAS_BIAS: tl.constexpr,
                SOFTCAP: tl.constexpr, ROUTED: tl.constexpr, SUMMARY: tl.constexpr,
             HAS_PAD: tl.constexpr, DROPOUT: tl.constexpr):
    m_blk = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    g = b * tab_sb + h * tab_sh
    offs_m = m_blk * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    qin = offs_m < NQ
    kv_base = (b * HKV + h // (H // HKV)) * NKX * D
    q = _load_rows(Q, bh * NQ * D, offs_m, NQ, offs_d, D, WIDEN)
    do = _load_rows(DO, bh * NQ * D, offs_m, NQ, offs_d, D, WIDEN)
    lse = tl.load(LSE + bh * NQ + offs_m, mask=qin, other=float("inf"))
    delta = tl.load(DELTA + bh * NQ + offs_m, mask=qin, other=0.0)
    q_idx = _token_index(QPERM, offs_m, NQ, tl.load(META), PERM_Q)[:, None]
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for masked in tl.static_range(2):
        if masked == 0:
            OFF = PART_OFF
            IDX = PART_IDX
        else:
            OFF = FULL_OFF
            IDX = FULL_IDX
        start, end = _span(OFF, g, NQB, m_blk)
        if ROUTED:
            end = tl.where(tl.load(ROUTE + bh * NQB + m_blk) != 0, end, start)
        for j in range(start, end):
            offs_n, k, v, k_idx = _key_block(IDX, j, K, V, KPERM, kv_base, NK, offs_d, D,
                                             BLOCK_N, WIDEN, PERM_K, SUMMARY)
            p, ds = _grads(q, k, v, do, lse, delta, q_idx, k_idx, offs_n < NK, h, bh, sm_scale,
                           qk_scale, softcap, INI, INF, DYN_KEEP, DYN_CHUNK, DYN_NB, DYN_NC,
                           SROW, KVALID, b * NKX, offs_n, META, drop_scale, masked == 0,
                           PREC, HAS_BIAS, SOFTCAP, SUMMARY, HAS_PAD, DROPOUT)
            dq += tl.dot(ds.to(k.dtype), k, input_precision=PREC)
    tl.store(DQ + bh * NQ * D + offs_m[:, None].to(tl.int64) * D + offs_d[None, :],
             (dq * sm_scale).to(DQ.dtype.element_ty), mask=qin[:, None] & (offs_d < D)[None, :])
