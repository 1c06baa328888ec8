"""Generates the Triton source of one bound pattern: its mask and bias functions, inlined
from the IR, and forward / backward block-sparse kernels that walk the block tables.

Structure follows the fused-attention recipe: one program per (query block, batch x head),
an inner loop over the key blocks listed for that query block (PARTIAL ones first, with
the mask; FULL ones without), online softmax in base 2 with log2(e) folded into the scale,
and the log-sum-exp saved for the backward pass. Backward recomputes probabilities: one
kernel per key block (dK, dV over the transposed table, GQA heads summed in-program) and
one per query block (dQ).

WIDEN converts bf16 operands to fp32 after loading. Only the CPU interpreter sets it: its
numpy-based tl.dot has no bfloat16 and returns garbage; GPUs use bf16 tensor cores.
"""

from __future__ import annotations

from attndsl.bind import BoundPattern

from .emit import TRITON_HELPERS, Arr, Code, Emitter, TritonDialect, prune
from .plan import Plan

LOG2E = 1.4426950408889634


def input_args(bp: BoundPattern) -> tuple[list[str], dict, dict]:
    """Kernel arguments for run-time inputs: arrays by pointer first, then scalars by value
    (names `in_<input>`); the router of `route` is applied outside the kernel."""
    arrays, scalars = {}, {}
    for owner in bp.owners():
        for name, (kind, dims, _optional, _span) in owner.inputs.items():
            if (bp.route is not None and name == bp.route[0]) or name in arrays or (
                    name in scalars):
                continue
            if dims:
                length = dims[0] if dims[0] is not None else 1 << 62
                arrays[name] = Arr(f"in_{name}", length, kind)
            else:
                scalars[name] = f"in_{name}"
    names = [a.name for a in arrays.values()] + (
        ["route_active"] if bp.route is not None else []) + list(scalars.values())
    return names, arrays, scalars


DYNAMIC_ARGS = ["dyn_keep", "dyn_chunk_of", "dyn_nb", "dyn_nc"]


def dynamic_config(bp: BoundPattern) -> dict | None:
    """chunk_topk's (block, chunk, topk, starts input) of a content-dependent pattern."""
    if not bp.content_dependent:
        return None
    names, arrays, scalars = input_args(bp)
    em = Emitter(bp, TritonDialect(), arrays, scalars)
    em.dynamic = {}
    em.predicate({"q": em.token("q_idx", bp.qshape, bp.checked.qspace.axes),
                  "k": em.token("k_idx", bp.kshape, bp.checked.kspace.axes),
                  "h": Code("h", "int")})
    return em.dynamic


def _function(name: str, bp: BoundPattern, inputs: list[str], arrays, scalars, which: str
              ) -> str:
    em = Emitter(bp, TritonDialect(), arrays, scalars)
    if bp.content_dependent:
        em.dynamic = {}
    ctx = {"q": em.token("q_idx", bp.qshape, bp.checked.qspace.axes),
           "k": em.token("k_idx", bp.kshape, bp.checked.kspace.axes),
           "h": Code("h", "int")}
    if which == "mask":
        out = em.predicate(ctx)
        if out in ("True", "False") or not em.lines:
            pass
        result = out
        tail = f"    return ({result}) & (q_idx == q_idx) & (k_idx == k_idx)"
    else:
        out = em.bias(ctx)
        result = out or "0.0"
        tail = f"    return ({result}) + 0.0 * (q_idx + k_idx).to(tl.float32)"
    args = ", ".join(["q_idx", "k_idx", "h"] + (["bh"] if which == "mask" else []) + inputs)
    body = "".join(f"    {line}\n" for line in prune(em.lines, [tail]))
    return f"@triton.jit\ndef {name}({args}):\n{body}{tail}\n"


_LOAD_KV = """\
        offs_n = n_blk * BLOCK_N + tl.arange(0, BLOCK_N)
        kin = offs_n < NK
        kv_ptr = kv_base + offs_n[:, None].to(tl.int64) * D + offs_d[None, :]
        k = tl.load(K + kv_ptr, mask=kin[:, None] & dmask[None, :], other=0.0)
        v = tl.load(V + kv_ptr, mask=kin[:, None] & dmask[None, :], other=0.0)
        if WIDEN:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
"""

_LOAD_Q = """\
        offs_m = m_blk * BLOCK_M + tl.arange(0, BLOCK_M)
        qin = offs_m < NQ
        q_ptr = q_base + offs_m[:, None].to(tl.int64) * D + offs_d[None, :]
        q = tl.load(Q + q_ptr, mask=qin[:, None] & dmask[None, :], other=0.0)
        do = tl.load(DO + q_ptr, mask=qin[:, None] & dmask[None, :], other=0.0)
        lse = tl.load(LSE + lse_base + offs_m, mask=qin, other=float("inf"))
        delta = tl.load(DELTA + lse_base + offs_m, mask=qin, other=0.0)
        if WIDEN:
            q = q.to(tl.float32)
            do = do.to(tl.float32)
"""


_LOAD_SUM = """\
        r_pos = n_blk * BLOCK_N + tl.arange(0, BLOCK_N)
        rin = r_pos < NR
        kv_ptr = kv_base + (NKB * BLOCK_N + r_pos[:, None]).to(tl.int64) * D + offs_d[None, :]
        k = tl.load(K + kv_ptr, mask=rin[:, None] & dmask[None, :], other=0.0)
        v = tl.load(V + kv_ptr, mask=rin[:, None] & dmask[None, :], other=0.0)
        if WIDEN:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        r_idx = tl.minimum(r_pos, NR - 1)[None, :].to(tl.int64)
"""


def _summary_function(bp: BoundPattern, plan: Plan, inputs, arrays, scalars) -> str:
    """_smask(q_idx, r_idx, h, bh, SROW, ...): does the query attend summary row r_idx? Each
    summary's own `attend` rule, on its region's coordinates."""
    from .emit import SummaryCode
    em = Emitter(bp, TritonDialect(), arrays, scalars)
    q = em.token("q_idx", bp.qshape, bp.checked.qspace.axes)
    r = em.fresh("tl.load(SROW + r_idx)", "int").text
    terms = []
    for bs, (off, size) in zip(bp.summaries, plan.summary.offsets):
        local = em.fresh(f"({r}) - {off}", "int").text
        coords, rem = {}, local
        for ax, n in reversed(list(zip(bs.summary.axes, bs.sizes))):
            coords[ax.name] = Code(em.fresh(f"({rem}) % {n}", "int").text, "int")
            rem = em.fresh(f"({rem}) // {n}", "int").text
        ctx = {"q": q, "h": Code("h", "int"), "summary": SummaryCode(coords)}
        val = em.summary_predicate(bs, ctx)
        terms.append(em.fresh(f"(({r}) >= {off}) & (({r}) < {off + size}) & ({val})",
                              "bool").text)
    out = em.fresh(" | ".join(f"({t})" for t in terms), "bool").text
    tail = f"    return ({out}) & (q_idx == q_idx) & (r_idx == r_idx)"
    args = ", ".join(["q_idx", "r_idx", "h", "bh", "SROW"] + inputs)
    body = "".join(f"    {line}\n" for line in prune(em.lines, [tail]))
    return f"\n\n@triton.jit\ndef _smask({args}):\n{body}{tail}\n"


def _index(which: str, perm: bool) -> str:
    """q_idx / k_idx: original (row-major) token indices of the block's rows / columns."""
    offs, n, shape = ("offs_m", "NQ", "[:, None]") if which == "q" else (
        "offs_n", "NK", "[None, :]")
    src = "QPERM" if which == "q" else "KPERM"
    if perm:
        return (f"{which}_idx = tl.load({src} + {offs}, mask={offs} < {n}, other=-1)"
                f"{shape}.to(tl.int64)")
    return f"{which}_idx = tl.where({offs} < {n}, {offs}, -1){shape}.to(tl.int64)"


def _score(bp: BoundPattern, inputs: list[str], target: str = "s", bias: bool = True) -> str:
    """Raw q.k in `s` -> scores in base-2 units; `tcap` kept for the softcap derivative.
    Summary tokens take the softcap but not the bias (bias=False)."""
    extra = "".join(", " + a for a in inputs)
    has_bias = bias and any(sc.kind == "bias" for _, sc, _ in bp.scores)
    if not has_bias and bp.softcap is None:
        return f"{target} = {target} * qk_scale\n"
    lines = [f"{target} = {target} * sm_scale"]
    if has_bias:
        lines.append(f"{target} = {target} + _bias(q_idx, k_idx, h{extra})")
    if bp.softcap is not None:
        lines.append(f"tcap = _tanh({target} / {bp.softcap!r})")
        lines.append(f"{target} = {bp.softcap!r} * tcap")
    lines.append(f"{target} = {target} * {LOG2E!r}")
    return "\n".join(lines) + "\n"


def _indent(text: str, n: int) -> str:
    """Shift every line right by n spaces (left, for n < 0)."""
    if n < 0:
        return "".join(line[-n:] + "\n" for line in text.splitlines())
    return "".join(" " * n + line + "\n" if line.strip() else "\n"
                   for line in text.splitlines())


def generate(bp: BoundPattern, plan: Plan) -> str:
    """The whole generated module: imports, helpers, mask, bias and the three kernels."""
    inputs, arrays, scalars = input_args(bp)
    if bp.content_dependent:
        inputs = inputs + DYNAMIC_ARGS
    extra = "".join(", " + a for a in inputs)
    perm_q, perm_k = not plan.qorder.identity, not plan.korder.identity
    mask_fn = _function("_mask", bp, inputs, arrays, scalars, "mask")
    bias_fn = _function("_bias", bp, inputs, arrays, scalars, "bias")
    score = _score(bp, inputs)
    plain = _score(bp, inputs, bias=False)
    cap = bp.softcap is not None
    has_sum = plan.summary is not None
    smask_fn = _summary_function(bp, plan, inputs, arrays, scalars) if has_sum else ""
    smask_line = ("msk = (q_idx >= 0) & rin[None, :] & "
                  f"_smask(q_idx, r_idx, h, bh, SROW{extra})")
    # MoH: a (query block, head) whose routing gates are all zero does no work
    skip = ("    end = tl.where(tl.load(route_active + bh * NQB + m_blk) != 0, end, start)\n"
            if bp.route is not None else "")
    mask_line = f"msk = (q_idx >= 0) & (k_idx >= 0) & _mask(q_idx, k_idx, h, bh{extra})"

    def fwd_loop(kind: str, summary: bool = False) -> str:
        masked = kind == "PART"
        if summary:
            body = _LOAD_SUM + "        s = tl.dot(q, tl.trans(k), input_precision=PREC)\n"
            body += _indent(plain, 8)
            if masked:
                body += f"        {smask_line}\n        s = tl.where(msk, s, float('-inf'))\n"
        else:
            body = _LOAD_KV + "        s = tl.dot(q, tl.trans(k), input_precision=PREC)\n"
            body += "        " + _index("k", perm_k) + "\n"
            body += _indent(score, 8)
            if masked:
                body += f"        {mask_line}\n        s = tl.where(msk, s, float('-inf'))\n"
        body += """\
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.math.exp2(m_i - m_use)
        p = tl.math.exp2(s - m_use[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
        m_i = m_new
"""
        tab = ("S" if summary else "") + kind
        return (f"    start = tl.load({tab}_OFF + g * (NQB + 1) + m_blk)\n"
                f"    end = tl.load({tab}_OFF + g * (NQB + 1) + m_blk + 1)\n"
                + skip +
                f"    for j in range(start, end):\n"
                f"        n_blk = tl.load({tab}_IDX + j)\n" + body)

    def grad_core(masked: bool, summary: bool = False) -> str:
        body = "        s = tl.dot(q, tl.trans(k), input_precision=PREC)\n"
        body += _indent(plain if summary else score, 8)
        body += "        p = tl.math.exp2(s - lse[:, None])\n"
        if masked:
            line = smask_line if summary else mask_line
            body += f"        {line}\n        p = tl.where(msk, p, 0.0)\n"
        body += "        dp = tl.dot(do, tl.trans(v), input_precision=PREC)\n"
        body += "        ds = p * (dp - delta[:, None])\n"
        if cap:
            body += "        ds = ds * (1.0 - tcap * tcap)\n"
        return body

    def dkdv_loop(kind: str, summary: bool = False) -> str:
        masked = kind == "PART"
        body = (_indent(_LOAD_Q, 4)
                + "            " + _index("q", perm_q) + "\n"
                + _indent(grad_core(masked, summary), 4)
                + "            dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PREC)\n"
                "            dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PREC)\n")
        if bp.route is not None:  # MoH: query blocks whose gates are all zero add nothing
            body = ("            if tl.load(route_active + bh * NQB + m_blk) != 0:\n"
                    + _indent(body, 4))
        tab, rows = ("TS" + kind, "NSB") if summary else ("T" + kind, "NKB")
        return (f"        start = tl.load({tab}_OFF + g * ({rows} + 1) + n_blk)\n"
                f"        end = tl.load({tab}_OFF + g * ({rows} + 1) + n_blk + 1)\n"
                f"        for j in range(start, end):\n"
                f"            m_blk = tl.load({tab}_IDX + j)\n" + body)

    def dq_loop(kind: str, summary: bool = False) -> str:
        masked = kind == "PART"
        tab = ("S" if summary else "") + kind
        load = _LOAD_SUM if summary else (_LOAD_KV + "        " + _index("k", perm_k) + "\n")
        return (f"    start = tl.load({tab}_OFF + g * (NQB + 1) + m_blk)\n"
                f"    end = tl.load({tab}_OFF + g * (NQB + 1) + m_blk + 1)\n"
                + skip +
                f"    for j in range(start, end):\n"
                f"        n_blk = tl.load({tab}_IDX + j)\n"
                + load
                + grad_core(masked, summary)
                + "        dq += tl.dot(ds.to(k.dtype), k, input_precision=PREC)\n")

    def both(loop) -> str:
        out = loop("PART") + loop("FULL")
        if has_sum:
            out += loop("PART", True) + loop("FULL", True)
        return out

    sum_args = (", SROW, NR, NSB, SPART_OFF, SPART_IDX, SFULL_OFF, SFULL_IDX"
                if has_sum else "")
    common = (f"Q, K, V, QPERM, KPERM, PART_OFF, PART_IDX, FULL_OFF, FULL_IDX, tab_sb, tab_sh,"
              f" sm_scale, qk_scale, H, HKV, NQ, NK, NQB, NKB, NKX{extra}{sum_args}")
    tables_t = "TPART_OFF, TPART_IDX, TFULL_OFF, TFULL_IDX"
    consts = ("D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, "
              "BLOCK_D: tl.constexpr, PREC: tl.constexpr, WIDEN: tl.constexpr")
    header = f'''"""Generated by attndsl from pattern '{bp.name}'
({_params(bp)}).

Token order: queries {plan.qorder.describe()}, keys {plan.korder.describe()}; blocks
{plan.block_q} x {plan.block_k}. Do not edit: regenerate with `attndsl compile`.
"""

import triton
import triton.language as tl
'''
    fwd = f'''
@triton.jit
def attn_fwd({common}, O, LSE, {consts}):
    m_blk = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    hk = h // (H // HKV)
    g = b * tab_sb + h * tab_sh
    offs_m = m_blk * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < D
    qin = offs_m < NQ
    q_base = bh * NQ * D
    kv_base = (b * HKV + hk) * NKX * D
    q = tl.load(Q + q_base + offs_m[:, None].to(tl.int64) * D + offs_d[None, :],
                mask=qin[:, None] & dmask[None, :], other=0.0)
    if WIDEN:
        q = q.to(tl.float32)
    {_index("q", perm_q)}
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
{both(fwd_loop)}    has = l_i > 0
    out = acc / tl.where(has, l_i, 1.0)[:, None]
    tl.store(O + q_base + offs_m[:, None].to(tl.int64) * D + offs_d[None, :],
             out.to(O.dtype.element_ty), mask=qin[:, None] & dmask[None, :])
    lse = tl.where(has, m_i + tl.math.log2(tl.where(has, l_i, 1.0)), float("inf"))
    tl.store(LSE + bh * NQ + offs_m, lse, mask=qin)


@triton.jit
def attn_bwd_dkdv({common}, DO, LSE, DELTA, DK, DV, {tables_t}, {consts}):
    n_blk = tl.program_id(0)
    bhk = tl.program_id(1).to(tl.int64)
    b = bhk // HKV
    hk = bhk % HKV
    rep = H // HKV
    offs_n = n_blk * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < D
    kin = offs_n < NK
    kv_base = bhk * NKX * D
    kv_ptr = kv_base + offs_n[:, None].to(tl.int64) * D + offs_d[None, :]
    k = tl.load(K + kv_ptr, mask=kin[:, None] & dmask[None, :], other=0.0)
    v = tl.load(V + kv_ptr, mask=kin[:, None] & dmask[None, :], other=0.0)
    if WIDEN:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    {_index("k", perm_k)}
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    for r in range(rep):
        h = hk * rep + r
        bh = b * H + h
        g = b * tab_sb + h * tab_sh
        q_base = (b * H + h) * NQ * D
        lse_base = (b * H + h) * NQ
{dkdv_loop("PART")}{dkdv_loop("FULL")}    dk = dk * sm_scale
    tl.store(DK + kv_ptr, dk.to(DK.dtype.element_ty), mask=kin[:, None] & dmask[None, :])
    tl.store(DV + kv_ptr, dv.to(DV.dtype.element_ty), mask=kin[:, None] & dmask[None, :])


@triton.jit
def attn_bwd_dq({common}, DO, LSE, DELTA, DQ, {consts}):
    m_blk = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    hk = h // (H // HKV)
    g = b * tab_sb + h * tab_sh
    offs_m = m_blk * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < D
    qin = offs_m < NQ
    q_base = bh * NQ * D
    lse_base = bh * NQ
    kv_base = (b * HKV + hk) * NKX * D
    q_ptr = q_base + offs_m[:, None].to(tl.int64) * D + offs_d[None, :]
    q = tl.load(Q + q_ptr, mask=qin[:, None] & dmask[None, :], other=0.0)
    do = tl.load(DO + q_ptr, mask=qin[:, None] & dmask[None, :], other=0.0)
    lse = tl.load(LSE + lse_base + offs_m, mask=qin, other=float("inf"))
    delta = tl.load(DELTA + lse_base + offs_m, mask=qin, other=0.0)
    if WIDEN:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    {_index("q", perm_q)}
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
{both(dq_loop)}    tl.store(DQ + q_ptr, (dq * sm_scale).to(DQ.dtype.element_ty),
             mask=qin[:, None] & dmask[None, :])
'''
    tables_ts = "TSPART_OFF, TSPART_IDX, TSFULL_OFF, TSFULL_IDX"
    if has_sum:
        fwd += f'''

@triton.jit
def attn_bwd_dkdv_sum({common}, DO, LSE, DELTA, DK, DV, {tables_ts}, {consts}):
    n_blk = tl.program_id(0)
    bhk = tl.program_id(1).to(tl.int64)
    b = bhk // HKV
    hk = bhk % HKV
    rep = H // HKV
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < D
    kv_base = bhk * NKX * D
{_indent(_LOAD_SUM, -4)}    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    for r in range(rep):
        h = hk * rep + r
        bh = b * H + h
        g = b * tab_sb + h * tab_sh
        q_base = (b * H + h) * NQ * D
        lse_base = (b * H + h) * NQ
{dkdv_loop("PART", True)}{dkdv_loop("FULL", True)}    dk = dk * sm_scale
    tl.store(DK + kv_ptr, dk.to(DK.dtype.element_ty), mask=rin[:, None] & dmask[None, :])
    tl.store(DV + kv_ptr, dv.to(DV.dtype.element_ty), mask=rin[:, None] & dmask[None, :])
'''
    return (header + TRITON_HELPERS + "\n\n" + mask_fn + "\n\n" + bias_fn + smask_fn
            + _wrap_defs(fwd))


def _wrap_defs(text: str, width: int = 99) -> str:
    """Break long `def` lines after commas, aligned under the opening parenthesis."""
    import textwrap
    out = []
    for line in text.splitlines():
        if line.startswith("def ") and len(line) > width:
            head, rest = line.split("(", 1)
            pad = " " * (len(head) + 1)
            out.extend(textwrap.wrap(rest, width, initial_indent=head + "(",
                                     subsequent_indent=pad, break_on_hyphens=False,
                                     break_long_words=False))
        else:
            out.append(line)
    return "\n".join(out) + "\n"


def _params(bp: BoundPattern) -> str:
    return ", ".join(f"{k}={v}" for k, v in bp.values.items())
