"""backend="cpu" (codegen/cpu/) against the reference backend run in float64: outputs and
all three gradients for every standard pattern it runs, odd lengths, empty rows, GQA, head
dim 48, every float dtype, per-head rules with bias, softcap and scale, long rows cut into
key pieces, uncached masks, hypothesis-generated patterns, and backend="auto" on CPU."""

from __future__ import annotations

import glob
import os
import sys

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import attndsl
from attndsl import caches
from attndsl.codegen.cpu import kernels as cpu
from attndsl.codegen.cpu import plan as cpu_plan_module
from attndsl.codegen.cpu.plan import cpu_plan
from attndsl.errors import AttnError, InputError

sys.path.insert(0, os.path.dirname(__file__))
import independent  # noqa: E402
from sources import MIXED_SCALED  # noqa: E402

TOL = {torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}


def _inputs(op, batch, gen, heads=2, dim=24):
    """Run-time inputs for a standard pattern: document ids, a prefix, and random floats of
    every float input's shape (batch in a '*' first dimension; a summary's given keys and
    values [batch, heads, tokens, head dim])."""
    out = {}
    for name, (kind, dims, _opt) in op.inputs.items():
        if name == "doc":
            out[name] = torch.sort(torch.randint(0, 3, (dims[0],), generator=gen)).values
        elif name == "prefix":
            out[name] = 9
        elif kind == "float":
            shape = [batch if d is None else d for d in dims]
            if len(dims) == 4 and dims[0] is None:
                shape = [batch, heads, dims[2], dim]
            out[name] = torch.randn(*shape, generator=gen)
    return out


def _qkv(op, heads, kv_heads, dim, batch, dtype, gen):
    bp = op.bound
    if bp.channel:
        n = 5
        shapes = [(batch, heads, n, bp.nq), (batch, kv_heads, n, bp.nk),
                  (batch, kv_heads, n, bp.nk)]
    else:
        shapes = [(batch, heads, bp.nq, dim), (batch, kv_heads, bp.nk, dim),
                  (batch, kv_heads, bp.nk, dim)]
    return [torch.randn(*s, generator=gen).to(dtype).requires_grad_() for s in shapes]


def compare(op, *, heads=2, kv_heads=None, dim=24, batch=1, dtype=torch.float32, block=16,
            inputs=None, seed=0, scale=None):
    """Output and dq, dk, dv of backend='cpu' vs the float64 reference, within TOL[dtype]
    (relative to the largest reference magnitude, at least 1)."""
    if block is not None:
        op.options(block_q=block, block_k=block)
    gen = torch.Generator().manual_seed(seed)
    q, k, v = _qkv(op, heads, kv_heads or heads, dim, batch, dtype, gen)
    if inputs is None:
        inputs = _inputs(op, batch, gen, heads, dim)
    out = op(q, k, v, backend="cpu", scale=scale, **inputs)
    assert out.dtype == dtype and out.shape[:3] == q.shape[:3]
    qr, kr, vr = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = op(qr, kr, vr, backend="reference", scale=scale, **inputs)
    g = torch.randn(out.shape, generator=gen)
    grads = torch.autograd.grad(out, (q, k, v), g.to(dtype))
    rgrads = torch.autograd.grad(ref, (qr, kr, vr), g.double())
    tol = TOL[dtype] * (1 if dtype in (torch.float32, torch.float64) else 4)
    for name, a, b in zip(("out", "dq", "dk", "dv"), (out, *grads), (ref, *rgrads)):
        a = a.double()
        assert torch.isfinite(a).all(), name
        err = (a - b).abs().max().item() if a.numel() else 0.0
        mag = max(1.0, b.abs().max().item() if b.numel() else 0.0)
        assert err <= tol * mag, f"{name}: max error {err:.3g} (tolerance {tol * mag:.3g})"
    return out


STD = [
    ("sliding.attn", "sliding_window", dict(N=100, window=20)),
    ("sliding.attn", "sliding_window", dict(N=77, window=9, causal=False)),
    ("sliding.attn", "dilated_window", dict(N=90, window=5, dilation=3)),
    ("power.attn", "power_attention", dict(N=130, block=16, window=2, sink=1)),
    ("power.attn", "block_sliding", dict(N=150, block=16, window=3, sink=1)),
    ("power.attn", "block_dilated", dict(N=150, block=16, span=6)),
    ("power.attn", "longnet", dict(N=150, block=8)),
    ("power.attn", "power_strides", dict(N=100, window=4)),
    ("sparse_transformer.attn", "strided", dict(N=100, stride=10)),
    ("sparse_transformer.attn", "fixed", dict(N=100, stride=10, c=2)),
    ("neighborhood.attn", "na1d", dict(N=77, kernel=7, dilation=2)),
    ("neighborhood.attn", "na1d", dict(N=61, kernel=9, stride=3, causal=True)),
    ("neighborhood.attn", "na2d", dict(H=12, W=10, kernel=5)),
    ("neighborhood.attn", "na2d", dict(H=13, W=11, kernel=3, dilation=(2, 3))),
    ("neighborhood.attn", "na2d", dict(H=12, W=12, kernel=5, stride=2, causal=(True, False))),
    ("neighborhood.attn", "na3d", dict(T=4, H=6, W=5, kernel=3)),
    ("neighborhood.attn", "na3d", dict(T=5, H=4, W=6, kernel=(2, 3, 3), causal=(True, False,
                                                                                False))),
    ("davit.attn", "window2d", dict(H=14, W=13, window=7)),
    ("halo.attn", "halo2d", dict(H=16, W=12, block=4, halo=2)),
    ("document.attn", "document_causal", dict(N=70)),
    ("document.attn", "prefix_lm", dict(N=70)),
    ("moh.attn", "moh", dict(N=40, heads=4, shared=1, topk=2)),
    ("davit.attn", "channel_group", dict(C=64, groups=2)),
    ("llm.attn", "chunked_causal", dict(N=70, chunk=16)),
    ("llm.attn", "alibi", dict(N=50, heads=3)),
    ("longdoc.attn", "longformer", dict(N=70, window=8, globals=3)),
    ("longdoc.attn", "bigbird", dict(N=72, block=8, random=2, seed=5)),
    ("sta.attn", "sliding_tile", dict(H=8, W=9, tile=(2, 3), window=3)),
    ("sta.attn", "sliding_tile3d", dict(T=2, H=8, W=4, tile=(1, 2, 2), window=(1, 3, 1))),
    # summary tokens (merged with the direct keys through log-sum-exps), rules reading q, k
    ("combiner.attn", "combiner_axial_pooled", dict(H=7, W=9)),
    ("transnext.attn", "aggregated_pooled", dict(H=9, W=11, kernel=3, pool=4)),
    ("dhsa.attn", "dhsa_chunks", dict(N=100, block=16, chunk=12, topk=2)),
    ("dhsa.attn", "dhsa", dict(N=100, block=16, chunk=12, budget=40, local=8, sinks=4,
                               instruction=10)),
    ("combiner.attn", "combiner_fixed", dict(N=70, span=8)),
    ("combiner.attn", "combiner_logsparse", dict(N=50)),
    ("combiner.attn", "combiner_axial", dict(H=7, W=9)),
    ("combiner.attn", "combiner_mixture", dict(N=40, span=6)),
    ("transnext.attn", "aggregated", dict(H=9, W=11, heads=4, kernel=3, pool=4)),
]


@pytest.mark.parametrize("file,pattern,params", STD,
                         ids=[f"{p}-{i}" for i, (_, p, _) in enumerate(STD)])
def test_standard_patterns(file, pattern, params):
    op = attndsl.compile(f"patterns/{file}", pattern, **params)
    compare(op, heads=op.heads or 2)


@pytest.mark.parametrize("file,pattern,params", STD[-7:], ids=[p for _, p, _ in STD[-7:]])
def test_summaries_and_content_rules_in_float64_and_auto_picks_cpu(file, pattern, params,
                                                                   monkeypatch):
    op = attndsl.compile(f"patterns/{file}", pattern, **params)
    compare(op, dtype=torch.float64, heads=4, kv_heads=2)
    assert cpu.supported(op.bound)
    calls = []
    real = cpu.Cpu.direct
    monkeypatch.setattr(cpu.Cpu, "direct", lambda *a: calls.append(1) or real(*a))
    heads = op.heads or 2
    q = torch.randn(1, heads, op.bound.nq, 8)
    op(q, q, q, **_inputs(op, 1, torch.Generator().manual_seed(0), heads, 8))
    assert calls  # (an average calls it once more per part)


def test_dhsa_boundaries_gqa_and_batches():
    op = attndsl.compile("patterns/dhsa.attn", "dhsa_chunks", N=80, block=16, chunk=12, topk=2)
    bounds = torch.tensor([0, 5, 30, 31, 60])
    compare(op, dtype=torch.float64, heads=4, kv_heads=2, inputs={"boundaries": bounds})
    compare(op, heads=4, kv_heads=2, inputs={"boundaries": bounds})
    op = attndsl.compile("patterns/dhsa.attn", "dhsa_chunks", N=100, block=16, chunk=12, topk=2)
    compare(op, dtype=torch.float64, batch=2, seed=3)
    compare(op, batch=2, heads=4, kv_heads=1, block=32, seed=4)


def test_dhsa_masks_follow_q_and_k_per_call():
    """The same op on fresh q, k each call: no mask is reused from an earlier call."""
    op = attndsl.compile("patterns/dhsa.attn", "dhsa_chunks", N=64, block=8, chunk=8, topk=1)
    for seed in range(4):
        compare(op, dtype=torch.float64, seed=seed)


ONLY_SUMMARIES = """
pattern only_summaries(N: int) {
    space seq(N)
    attend k == q and q % 4 == 0
    summary r(i: cdiv(N, 8)) {
        member k // 8 == r.i
        keys mean
        values mean
        attend r.i < q // 8
    }
}"""


def test_rows_with_only_summary_tokens_or_nothing():
    op = attndsl.compile(ONLY_SUMMARIES, N=45)
    out = compare(op, dtype=torch.float64)
    assert (out[..., :8, :][..., torch.arange(8) % 4 != 0, :] == 0).all()
    compare(op, heads=4, kv_heads=2, batch=2)


def test_summaries_with_softcap_bias_and_key_pieces(monkeypatch):
    src = ONLY_SUMMARIES.replace("attend k == q and q % 4 == 0",
                                 "attend k <= q and q - k < 30\n bias -0.1 * float(q - k)\n"
                                 " softcap 4.0")
    op = attndsl.compile(src, N=70)
    compare(op, dtype=torch.float64)
    monkeypatch.setattr(cpu, "BUDGET", 16 * 16)
    compare(op, dtype=torch.float64, heads=4, kv_heads=2)


def test_every_standard_pattern_is_covered():
    names = set()
    for f in glob.glob("patterns/*.attn"):
        if os.path.basename(f) != "prelude.attn":
            names |= {p.name for p in attndsl.load(f).patterns()}
    assert names == {p for _, p, _ in STD}


def test_gqa_head_dim_48_and_batches():
    op = attndsl.compile("patterns/sliding.attn", "sliding_window", N=70, window=11)
    compare(op, heads=4, kv_heads=2, dim=48)
    compare(op, heads=6, kv_heads=1, dim=40, batch=2)
    op = attndsl.compile("patterns/neighborhood.attn", "na2d", H=9, W=7, kernel=3)
    compare(op, heads=4, kv_heads=2, dim=48, batch=2)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_dtypes(dtype):
    op = attndsl.compile("patterns/neighborhood.attn", "na2d", H=9, W=10, kernel=3)
    compare(op, dtype=dtype)


def test_lengths_not_multiple_of_block_and_block_sizes():
    for n, block in ((33, 16), (47, 32), (16, 16), (1, 16), (150, 64), (150, None)):
        op = attndsl.compile("patterns/sliding.attn", "sliding_window", N=n, window=5)
        compare(op, block=block)
    op = attndsl.compile("patterns/power.attn", "power_attention", N=100, block=8)
    compare(op.options(block_q=32, block_k=16), block=None)
    assert cpu_plan(op.plan()).plan.block_q == 32


def test_empty_rows_give_zero_and_finite_gradients():
    op = attndsl.compile("pattern gaps(N: int) { space seq(N) attend k <= q and q % 3 != 0 }",
                         N=40)
    out = compare(op)
    assert (out[..., ::3, :] == 0).all()


def test_nothing_attended():
    op = attndsl.compile("pattern none(N: int) { space seq(N) attend false }", N=20)
    out = compare(op)
    assert (out == 0).all()


def test_per_head_rules_bias_softcap_and_scale():
    op = attndsl.compile(MIXED_SCALED, N=50)
    compare(op, heads=4)
    compare(op, heads=4, kv_heads=2, batch=2)
    assert len(cpu_plan(op.plan()).plan.tables) == 4


def test_bias_on_some_heads_with_one_table_and_gqa():
    src = """
    pattern b(N: int) {
        space seq(N)
        heads 4
        attend k <= q and q - k < 20
        on heads 1..3 { bias 0.1 * float(q - k) }
        bias float(h) * 0.2 - 0.01 * float(k)
        softcap 3.0
    }"""
    op = attndsl.compile(src, N=45)
    compare(op, heads=4, kv_heads=2, scale=0.5)


def test_average_of_patterns_runs_each_part():
    src = """from "sliding.attn" import sliding_window, dilated_window
    pattern avg(N: int) {
        average sliding_window(N, 5), dilated_window(N, 3, 2)
    }"""
    compare(attndsl.compile(src, N=50))


def test_runtime_inputs_change_the_plan():
    op = attndsl.compile("patterns/document.attn", "document_causal", N=48)
    a = torch.tensor([0] * 16 + [1] * 32)
    b = torch.tensor([0] * 40 + [1] * 8)
    compare(op, inputs={"doc": a})
    compare(op, inputs={"doc": b})
    pa, pb = cpu_plan(op.plan(doc=a)), cpu_plan(op.plan(doc=b))
    assert pa is not pb and pa is cpu_plan(op.plan(doc=a.clone()))


def test_moh_gates_zero_heads():
    op = attndsl.compile("patterns/moh.attn", "moh", N=48, heads=4, shared=1, topk=1)
    router = torch.randn(2, 48, 3)
    router[:, :32, 2] = -50.0
    router[1, :, 0] = 50.0
    out = compare(op, heads=4, batch=2, inputs={"router": router})
    assert (out[:, 3, :32] == 0).all() and (out[1, 2:] == 0).all()


def test_long_rows_in_key_pieces_and_small_items(monkeypatch):
    """Items far below a row's size: rows split into key pieces merged by log-sum-exp,
    (batch, head) pairs split across items, one row per item."""
    for budget, strided in ((16 * 16 * 3, 16), (16 * 16 * 40, 16), (4096, 16), (4096, 1)):
        monkeypatch.setattr(cpu, "BUDGET", budget)
        monkeypatch.setattr(cpu, "STRIDED_GROUPS", strided)
        op = attndsl.compile("patterns/sliding.attn", "sliding_window", N=100, window=40)
        compare(op, heads=4, kv_heads=2, dim=16, batch=3)
        op = attndsl.compile("pattern gaps(N: int) { space seq(N) attend k <= q and "
                             "q % 3 != 0 and (q - k) % 5 != 1 }", N=60)
        compare(op)


def test_masks_evaluated_per_call_when_too_many(monkeypatch):
    monkeypatch.setattr(cpu_plan_module, "MASK_CACHE", 0)
    caches.CPU_PLANS.clear()
    op = attndsl.compile("pattern gaps(N: int) { space seq(N) attend k <= q and q % 3 != 0 }",
                         N=40)
    out = compare(op)
    assert (out[..., ::3, :] == 0).all()
    op = attndsl.compile("patterns/neighborhood.attn", "na2d", H=10, W=9, kernel=3)
    compare(op, heads=4, kv_heads=2)


def test_realistic_size_default_blocks_strided_windows():
    op = attndsl.compile("patterns/sliding.attn", "sliding_window", N=1100, window=200)
    compare(op, heads=2, dim=32, block=None)
    groups = cpu_plan(op.plan()).groups[0]
    assert any(g.step == 1 and len(g.rows) > 1 for g in groups)  # read through views


def test_sequences_get_larger_blocks_where_key_gathers_dominate():
    # power_attention's query blocks read scattered key blocks (copied per query block for
    # ATen's kernel, which a call that needs gradients runs): that planner takes 128-token
    # blocks, a sliding window (read through views) keeps 64
    from attndsl.codegen.plan.tables import plan_for
    op = attndsl.compile("patterns/power.attn", "power_attention", N=1100, block=128, window=3)
    plan = plan_for(op.bound, None, None, target="cpu-aten")
    assert (plan.block_q, plan.block_k) == (128, 128)
    out = compare(op, heads=2, dim=32, block=None)
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 2, 1100, 32, generator=gen, dtype=torch.float64) for _ in "qkv")
    mask = independent.power_attention(1100, block=128, window=3)
    ref = independent.masked_attention(q, k, v, mask)
    assert torch.allclose(op(q, k, v, backend="cpu"), ref, atol=1e-12)
    assert out.shape == (1, 2, 1100, 32)
    op = attndsl.compile("patterns/sliding.attn", "sliding_window", N=1100, window=200)
    assert op.plan(backend="cpu").block_q == 64
    assert plan_for(op.bound, None, None, target="cpu-aten").block_q == 64
    assert op.plan(backend="triton").block_q == 64  # the CPU's model only


def test_auto_picks_cpu_for_cpu_tensors(monkeypatch):
    op = attndsl.compile("patterns/neighborhood.attn", "na2d", H=8, W=9, kernel=3)
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 2, 72, 16, generator=gen) for _ in range(3))
    assert torch.equal(op(q, k, v), op(q, k, v, backend="cpu"))
    calls = []
    real = cpu.Cpu.direct
    monkeypatch.setattr(cpu.Cpu, "direct", lambda *a: calls.append(1) or real(*a))
    op(q, k, v)
    assert calls == [1]


def test_errors_are_attn_errors():
    op = attndsl.compile("patterns/sliding.attn", "sliding_window", N=20, window=3)
    x = torch.randn(1, 1, 21, 8)
    with pytest.raises(InputError, match="q has 21 tokens"):
        op(x, x, x, backend="cpu")
    with pytest.raises(InputError, match="torch.Tensor"):
        op([1.0], x, x, backend="cpu")
    with pytest.raises(AttnError, match="unknown backend 'cpus'"):
        op(x, x, x, backend="cpus")


def test_no_grad_and_inference_mode():
    op = attndsl.compile("patterns/sliding.attn", "sliding_window", N=40, window=6)
    q = torch.randn(1, 2, 40, 16)
    want = op(q, q, q, backend="reference")
    with torch.no_grad():
        assert torch.allclose(op(q, q, q, backend="cpu"), want, atol=1e-5)
    with torch.inference_mode():
        assert torch.allclose(op(q, q, q, backend="cpu"), want, atol=1e-5)


_TERMS = [
    "abs(q - k) < {a}", "k <= q", "(q - k) % {b} == 0", "k < {a}", "q // {b} == k // {b}",
    "(q ^ k) < {a}", "is_pow2(q - k)", "q - k >= {a}", "k % {b} == {c}",
]


@st.composite
def random_patterns(draw):
    n_terms = draw(st.integers(1, 3))
    parts = []
    for _ in range(n_terms):
        t = draw(st.sampled_from(_TERMS))
        b = draw(st.integers(1, 7))
        parts.append("(" + t.format(a=draw(st.integers(0, 30)), b=b,
                                    c=draw(st.integers(0, b - 1))) + ")")
    ops = [draw(st.sampled_from([" and ", " or "])) for _ in parts[1:]]
    expr = parts[0] + "".join(o + p for o, p in zip(ops, parts[1:]))
    if draw(st.booleans()):
        expr = f"not ({expr})"
    return expr, draw(st.integers(1, 90))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(random_patterns(), st.sampled_from([16, 32]), st.integers(8, 40), st.integers(1, 2))
def test_hypothesis_random_patterns(pat, block, dim, kv_heads):
    expr, n = pat
    op = attndsl.compile(f"pattern r(N: int) {{ space seq(N) attend {expr} }}", N=n)
    compare(op, block=block, dim=dim, heads=2, kv_heads=kv_heads)


def test_dhsa_computes_only_the_blocks_its_selection_keeps(monkeypatch):
    """A call's plan lists the static pairs some batch element's selection keeps a key of
    (one table per head, or one when the heads select alike), and the result stays the
    reference's, batch by batch and head by head, with and without whole kept blocks."""
    from attndsl.codegen.cpu import plan as cpu_plan_mod
    seen = []
    real = cpu_plan_mod._derive
    monkeypatch.setattr(cpu_plan_mod, "_derive",
                        lambda bp, plan, run: seen.append(plan) or real(bp, plan, run))
    for name, kw in (("dhsa_chunks", dict(N=512, block=64, chunk=64, topk=1)),
                     ("dhsa", dict(N=512, block=64, chunk=64, budget=192, local=64,
                                   sinks=64, instruction=16))):
        op = attndsl.compile("patterns/dhsa.attn", name, **kw)
        seen.clear()
        compare(op, dtype=torch.float64, batch=2, heads=4, seed=5)
        static = op.plan(backend="cpu")
        calls = [p for p in seen if p.bound is not None and p.bound.name == name
                 and p is not static]
        assert calls
        pairs = [sum(len(t.full_idx) + len(t.part_idx) for t in p.tables) / len(p.tables)
                 for p in calls]
        every = len(static.tables[0].full_idx) + len(static.tables[0].part_idx)
        assert max(pairs) < 0.75 * every, (pairs, every)
        # chunks of one key block each: kept chunks of earlier blocks are FULL pairs
        assert any(len(t.full_idx) for p in calls for t in p.tables)


@pytest.mark.parametrize("blocks", [(64, 16), (16, 16), None])
def test_shifted_key_tiles_match_the_reference(blocks):
    """Key tiles that start half a tile early (padding before the first row and column),
    on both the fused path (fp32) and the generic one (fp64), forward and backward; None:
    the CPU planner's own block sizes."""
    op = attndsl.compile("patterns/neighborhood.attn", "na2d", H=33, W=40, kernel=5)
    op.options(block_q=blocks and blocks[0], block_k=blocks and blocks[1])
    if blocks is not None:
        assert op.plan(backend="cpu").korder.phase == (2, 2)
    for dtype in (torch.float32, torch.float64):
        compare(op, dtype=dtype, batch=2, heads=4, kv_heads=2, block=None)
    op3 = attndsl.compile("patterns/neighborhood.attn", "na3d", T=6, H=9, W=10, kernel=3)
    op3.options(block_q=blocks and blocks[0], block_k=blocks and blocks[1])
    compare(op3, dtype=torch.float32, block=None)
