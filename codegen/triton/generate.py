"""Generates the pattern-specific part of a Triton kernel module: `_mask`, `_bias` and
`_smask`, inlined from the bound pattern's IR by the emitter (codegen/emit.py). The kernels
that call them are fixed (kernels.py); `module_source` puts the two together."""

from __future__ import annotations

import math
from pathlib import Path

from attndsl import caches
from attndsl.codegen.emit import (
    Code,
    Emitter,
    NeedsSizes,
    SummaryCode,
    TritonDialect,
    input_layout,
    prune,
)
from attndsl.semantics.bind import BoundPattern
from attndsl.semantics.family import size_params

KERNELS = Path(__file__).with_name("kernels.py")
MASK_ARGS = "q_idx, k_idx, h, bh, INI, INF, DYN_KEEP, DYN_CHUNK, DYN_NB, DYN_NC"
BIAS_ARGS = "q_idx, k_idx, h, INI, INF"
SMASK_ARGS = "q_idx, r_idx, h, bh, SROW, INI, INF"


def _emitter(bp: BoundPattern, sizes: tuple = ()) -> tuple[Emitter, dict]:
    em = Emitter(bp, TritonDialect(), input_layout(bp, sizes), sizes)
    if bp.content_dependent:
        em.dynamic = {}
    ctx = {"q": em.token("q_idx", em.space_shape(bp.checked.qspace), bp.checked.qspace.axes),
           "k": em.token("k_idx", em.space_shape(bp.checked.kspace), bp.checked.kspace.axes),
           "h": Code("h", "int")}
    return em, ctx


def _function(name: str, args: str, em: Emitter, tail: str) -> str:
    body = "".join(f"    {line}\n" for line in prune(em.lines, [tail]))
    return f"@triton.jit\ndef {name}({args}):\n{body}{tail}\n"


def dynamic_config(bp: BoundPattern) -> dict | None:
    """chunk_topk's (block, chunk, topk, starts input) of a content-dependent pattern."""
    if not bp.content_dependent:
        return None
    em, ctx = _emitter(bp)
    em.predicate(ctx)
    return em.dynamic


def summary_offsets(bp: BoundPattern) -> list[tuple[int, int]]:
    """(first global region index, regions) of each summary: summary rows are numbered
    summary by summary, region by region (row-major over the summary's axes)."""
    out, base = [], 0
    for bs in bp.core_summaries:
        size = math.prod(bs.sizes)
        out.append((base, size))
        base += size
    return out


def _smask(bp: BoundPattern, sizes: tuple = ()) -> str:
    """Does query q_idx attend summary row r_idx? Each summary's own `attend` rule, on its
    region's coordinates; False for a pattern without summaries."""
    em = Emitter(bp, TritonDialect(), input_layout(bp, sizes), sizes)
    if not bp.core_summaries:
        tail = "    return (q_idx < 0) & (r_idx < 0)"
        return _function("_smask", SMASK_ARGS, em, tail)
    q = em.token("q_idx", em.space_shape(bp.checked.qspace), bp.checked.qspace.axes)
    r = em.fresh("tl.load(SROW + r_idx)", "int").text
    terms = []
    off = 0  # summary rows are numbered summary by summary, region by region
    for bs in bp.core_summaries:
        axis_sizes = em.summary_sizes(bs) if sizes else bs.sizes
        size = axis_sizes[0]
        for n in axis_sizes[1:]:
            size = em.binop("*", size, n, bs.summary.span)
        local = em.fresh(f"({r}) - ({em.text(off)})", "int").text
        coords, rem = {}, local
        for ax, n in reversed(list(zip(bs.summary.axes, axis_sizes))):
            coords[ax.name] = Code(em.fresh(f"({rem}) % ({em.text(n)})", "int").text, "int")
            rem = em.fresh(f"({rem}) // ({em.text(n)})", "int").text
        ctx = {"q": q, "h": Code("h", "int"), "summary": SummaryCode(coords)}
        val = em.summary_predicate(bs, ctx)
        end = em.binop("+", off, size, bs.summary.span)
        terms.append(em.fresh(f"(({r}) >= ({em.text(off)})) & (({r}) < ({em.text(end)})) & "
                              f"({val})", "bool").text)
        off = end
    out = terms[0] if len(terms) == 1 else em.fresh(" | ".join(f"({t})" for t in terms),
                                                     "bool").text
    tail = f"    return ({out}) & (q_idx == q_idx) & (r_idx == r_idx)"
    return _function("_smask", SMASK_ARGS, em, tail)


def functions(bp: BoundPattern, generic: bool = True) -> str:
    """The generated functions of one pattern (what golden files hold). `generic`: the
    sizes of the spaces are read at run time (KERNEL_SIZES names them), so one module serves
    every size; patterns that need them folded fall back to one module per size."""
    sizes = size_params(bp.checked) if generic else ()
    try:
        return _functions(bp, sizes)
    except NeedsSizes:
        return _functions(bp, ())


def _functions(bp: BoundPattern, sizes: tuple) -> str:
    em, ctx = _emitter(bp, sizes)
    out = em.predicate(ctx)
    mask = _function("_mask", MASK_ARGS, em,
                     f"    return ({out}) & (q_idx == q_idx) & (k_idx == k_idx)")
    em, ctx = _emitter(bp, sizes)
    out = em.bias(ctx) or "0.0"
    bias = _function("_bias", BIAS_ARGS, em,
                     f"    return ({out}) + 0.0 * (q_idx + k_idx).to(tl.float32)")
    smask = _smask(bp, sizes)
    given = ", ".join(f"{k}={v}" for k, v in bp.values.items() if k not in sizes)
    what = (f"every {', '.join(sizes)}" if sizes else
            ", ".join(f"{k}={v}" for k, v in bp.values.items() if k in size_params(bp.checked))
            or "its sizes")
    return (f"# ---- generated by attndsl for pattern '{bp.name}' ({given}), for {what}\n"
            f"KERNEL_SIZES = {tuple(sizes)!r}\n\n\n"
            + mask + "\n\n" + bias + "\n\n" + smask)


def kernel_sizes(bp: BoundPattern) -> str:
    """Whether one kernel module serves every size ("run time: N") or each size has its own
    ("compile time", with the reason the pattern's semantics force it)."""
    sizes = size_params(bp.checked)
    if not sizes:
        return "compile time: the sizes are not parameters"
    try:
        Emitter(bp, TritonDialect(), input_layout(bp, sizes), sizes)
        _functions(bp, sizes)
    except NeedsSizes as e:
        return f"compile time: {e}"
    return "run time: " + ", ".join(sizes)


def kernel_key(bp: BoundPattern) -> tuple:
    """What a kernel module depends on: the pattern and its parameters but the sizes (a
    module that folds them is keyed by them too, see module_source)."""
    sizes = set(size_params(bp.checked))
    return (bp.checked, tuple((k, v) for k, v in bp.values.items() if k not in sizes))


def module_source(bp: BoundPattern) -> str:
    """The whole kernel module: the fixed kernels, then the pattern's functions. Cached by
    kernel_key when the module serves every size, else by the bound pattern."""
    def build():
        return KERNELS.read_text().rstrip("\n") + "\n\n\n" + functions(bp)
    text = caches.KERNEL_SOURCES.get_or_create(kernel_key(bp), build)
    if "KERNEL_SIZES = ()" in text and size_params(bp.checked):
        text = caches.KERNEL_SOURCES.get_or_create(bp, build)
    return text
