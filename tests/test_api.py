"""The Python API: compile, masks of every construct, reference attention numerics."""

from __future__ import annotations

import math

import pytest
import torch

import attndsl

F64 = torch.float64


def _rand(*shape, dtype=F64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)


def _dense(q, k, v, mask, bias=None, scale=None, softcap=None):
    """Plain masked softmax attention written out, rows without keys -> 0."""
    scale = scale if scale is not None else 1 / math.sqrt(q.shape[-1])
    s = (q @ k.transpose(-1, -2)) * scale
    if bias is not None:
        s = s + bias
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    s = s.masked_fill(~mask, -math.inf)
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)
    return p @ v


def test_compile_finds_standard_patterns_by_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    a = attndsl.compile("power.attn", pattern="power_attention", N=64, block=8)
    b = attndsl.compile("patterns/power.attn", pattern="power_attention", N=64, block=8)
    assert torch.equal(a.mask(), b.mask())


def test_compile_source_text_and_single_pattern_default():
    op = attndsl.compile("pattern p(N: int) {\n space seq(N)\n attend causal()\n}", N=5)
    assert torch.equal(op.mask(), torch.ones(5, 5, dtype=torch.bool).tril())


def test_mask_is_evaluated_in_row_chunks(monkeypatch):
    from attndsl.semantics import masks
    monkeypatch.setattr(masks, "CHUNK_ELEMS", 1000)
    op = attndsl.compile("patterns/sliding.attn", pattern="sliding_window", N=300, window=7,
                         causal=False)
    i = torch.arange(300)
    assert torch.equal(op.mask(), (i[:, None] - i[None, :]).abs() < 7)


CROSS = """
## Text tokens each attend one band of image rows.
pattern bands(T: int, H: int, W: int) {
    query seq(T)
    key grid(H, W)
    attend k.y * T // H == q
}
"""


def test_cross_attention_spaces():
    op = attndsl.compile(CROSS, T=4, H=8, W=3)
    m = op.mask()
    assert m.shape == (4, 24)
    assert m.sum(1).tolist() == [6, 6, 6, 6]
    q = _rand(1, 2, 4, 16)
    k, v = _rand(1, 2, 24, 16, seed=1), _rand(1, 2, 24, 16, seed=2)
    torch.testing.assert_close(op(q, k, v), _dense(q, k, v, m))


PER_HEAD = """
const NEG = -1.0
fn slope(h: int, heads: int) -> float = 2.0 ** (-8.0 * float(h + 1) / float(heads))
pattern alibi_mix(N: int) {
    space seq(N)
    heads 4
    on heads 0..2 { attend sliding(3) }
    on heads 2..4 { attend causal() }
    bias NEG * slope(h, 4) * float(q - k)
    softcap 5.0
}
"""


def test_per_head_rules_bias_and_softcap():
    op = attndsl.compile(PER_HEAD, N=10)
    m = op.mask()
    i = torch.arange(10)
    d = i[:, None] - i[None, :]
    assert m.shape == (4, 10, 10)
    assert torch.equal(m[0], (d >= 0) & (d < 3)) and torch.equal(m[1], m[0])
    assert torch.equal(m[3], d >= 0)
    q, k, v = (_rand(2, 4, 10, 8, seed=s) for s in range(3))
    slopes = torch.tensor([2.0 ** (-8.0 * (h + 1) / 4) for h in range(4)], dtype=F64)
    bias = -slopes.view(4, 1, 1) * d.to(F64)
    torch.testing.assert_close(op(q, k, v), _dense(q, k, v, m, bias=bias, softcap=5.0))


def test_within_exclude_include_and_pattern_calls():
    src = """
    from "sliding.attn" import sliding_window
    pattern a(N: int) {
        include sliding_window(N, 4)
        exclude k == q
        attend sink(1)
    }
    pattern b(N: int) {
        space seq(N)
        attend sliding_window(N, 4) or k == 0
        within causal()
        exclude k == q
    }
    """
    m_a = attndsl.compile(src, pattern="a", N=12).mask()
    m_b = attndsl.compile(src, pattern="b", N=12).mask()
    i = torch.arange(12)
    d = i[:, None] - i[None, :]
    want = (((d >= 0) & (d < 4)) | (i[None, :] == 0)) & (d != 0)
    assert torch.equal(m_a, want) and torch.equal(m_b, want)


def test_empty_rows_give_zero_and_finite_gradients():
    op = attndsl.compile("pattern p(N: int) {\n space seq(N)\n attend k < q\n}", N=6)
    q, k, v = (_rand(1, 2, 6, 8, seed=s).requires_grad_() for s in range(3))
    out = op(q, k, v)
    assert torch.equal(out[:, :, 0], torch.zeros_like(out[:, :, 0]))
    out.square().sum().backward()
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all()
    assert torch.equal(q.grad[:, :, 0], torch.zeros_like(q.grad[:, :, 0]))


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 2e-3),
                                       (torch.bfloat16, 2e-2)])
def test_dtypes_gqa_and_head_dim_48(dtype, tol):
    op = attndsl.compile("patterns/neighborhood.attn", pattern="na2d", H=5, W=7, kernel=3,
                         dilation=(1, 2))
    q = _rand(2, 4, 35, 48, dtype=dtype)
    k, v = _rand(2, 2, 35, 48, dtype=dtype, seed=1), _rand(2, 2, 35, 48, dtype=dtype, seed=2)
    out = op(q, k, v, backend="reference")
    assert out.dtype == dtype and out.shape == q.shape
    m = op.mask()
    want = _dense(q.double(), k.double().repeat_interleave(2, 1),
                  v.double().repeat_interleave(2, 1), m)
    torch.testing.assert_close(out.double(), want, atol=tol, rtol=tol)


def test_gradients_match_dense_formula():
    op = attndsl.compile("patterns/power.attn", pattern="power_attention", N=40, block=4,
                         window=2)
    q, k, v = (_rand(1, 2, 40, 16, seed=s).requires_grad_() for s in range(3))
    g = _rand(1, 2, 40, 16, seed=9)
    grads = torch.autograd.grad((op(q, k, v) * g).sum(), (q, k, v))
    want = torch.autograd.grad((_dense(q, k, v, op.mask()) * g).sum(), (q, k, v))
    for a, b in zip(grads, want):
        torch.testing.assert_close(a, b)


def test_scale_argument_and_default():
    op = attndsl.compile("patterns/sliding.attn", pattern="sliding_window", N=9, window=3)
    q, k, v = (_rand(1, 1, 9, 4, seed=s) for s in range(3))
    torch.testing.assert_close(op(q, k, v, scale=0.3), _dense(q, k, v, op.mask(), scale=0.3))


def test_summaries_and_reach():
    op = attndsl.compile("patterns/combiner.attn", pattern="combiner_fixed", N=12, span=4)
    (s,) = op.summaries()
    assert s["member"].shape == (3, 12) and s["attend"].shape == (12, 3)
    assert s["keys"] == "max" and s["values"] == "expectation"
    i = torch.arange(12)
    assert torch.equal(op.reach(), i[None, :] <= i[:, None])


def test_logsparse_summaries_tile_the_prefix():
    op = attndsl.compile("patterns/combiner.attn", pattern="combiner_logsparse", N=37)
    direct = op.mask().to(torch.int64)
    (s,) = op.summaries()
    via = s["attend"].to(torch.int64) @ s["member"].to(torch.int64)
    i = torch.arange(37)
    assert torch.equal(direct + via, (i[None, :] <= i[:, None]).to(torch.int64))


def test_op_metadata():
    op = attndsl.compile("patterns/moh.attn", pattern="moh", N=8, heads=4, shared=1, topk=2)
    assert op.heads == 4 and op.query_shape == (8,) and op.inputs["router"][1] == (None, 8, 3)
    assert "Mixture-of-Head" in op.doc
    assert op.params == {"N": 8, "heads": 4, "shared": 1, "topk": 2, "normalised": False,
                         "hard": False}
    assert "moh(N=8" in repr(op)


def test_parameters_accept_numpy_and_torch_scalars():
    import numpy as np
    a = attndsl.compile("patterns/neighborhood.attn", pattern="na1d", N=np.int64(12),
                        kernel=torch.tensor(3))
    assert a.mask().sum(1).tolist() == [3] * 12
