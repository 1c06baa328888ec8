"""The call-time softcap (Gemma 2: cap * tanh(score / cap) on the scaled scores) with any
pattern, on every backend, outputs and gradients against a dense definition written here
(masks from tests/independent.py). Triton runs under TRITON_INTERPRET=1 at tiny sizes."""

from __future__ import annotations

import math
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
import independent as ind  # noqa: E402

import attndsl  # noqa: E402

DT = {"reference": torch.float64, "cpu": torch.float64, "triton": torch.float32}
TOL = {"reference": 1e-10, "cpu": 1e-9, "triton": 2e-4}


def capped_attention(q, k, v, mask, scale, cap):
    """softmax(cap * tanh(q k^T scale / cap) | mask) v, float64; rows without keys give 0."""
    q, k, v = (t.double() for t in (q, k, v))
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    s = q @ k.transpose(-1, -2) * scale
    s = cap * torch.tanh(s / cap)
    s = s.masked_fill(~mask, -math.inf)
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)
    return p @ v


CASES = [
    ("sliding.attn", "sliding_window", dict(window=5), lambda n: ind.sliding_window(n, 5),
     23),
    ("power.attn", "power_attention", dict(block=4), lambda n: ind.power_attention(n, 4),
     37),
    ("neighborhood.attn", "na2d", dict(H=6, W=5, kernel=3),
     lambda n: ind.na2d(6, 5, 3), 30),
]


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
@pytest.mark.parametrize("case", CASES, ids=[c[1] for c in CASES])
def test_softcap_any_pattern_outputs_and_gradients(backend, case):
    if backend == "triton":  # interpreted kernels are slow: one 1D and one tiled 2D case
        pytest.importorskip("triton")
        if case[1] == "power_attention":
            pytest.skip("sliding_window covers 1D under the interpreter")
    file, name, params, mask_of, n = case
    op = attndsl.compile(f"patterns/{file}", name, **params).options(block_q=16, block_k=16)
    gen = torch.Generator().manual_seed(3)
    shapes = [(2, 4, n, 16), (2, 2, n, 16), (2, 2, n, 16)]  # GQA: 4 query heads, 2 kv
    # large scores, so that the cap bends them (a dropped cap changes the output visibly)
    q, k, v = (3.0 * torch.randn(*s, generator=gen, dtype=DT[backend]) for s in shapes)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    kw = {"N": n} if "N" not in params and name != "na2d" else {}
    out = op(q, k, v, backend=backend, softcap=2.5, **kw)
    mask = torch.from_numpy(mask_of(n))
    want = capped_attention(q, k, v, mask, 1 / 4, 2.5)
    tol = TOL[backend]
    torch.testing.assert_close(out.double(), want, atol=tol, rtol=tol)
    plain = capped_attention(q, k, v, mask, 1 / 4, 1e9)
    assert (want - plain).abs().max() > 0.1  # the cap matters at these scores
    g = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    got = torch.autograd.grad(out.double(), (q, k, v), g)
    ref = torch.autograd.grad(want, (q, k, v), g)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a.double(), b.double(), atol=tol * 10, rtol=tol * 10)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_call_softcap_replaces_the_patterns_own(backend):
    src = """pattern capped(N: int) {
        space seq(N)
        attend k <= q
        softcap 50.0
    }"""
    op = attndsl.compile(src, N=12)
    gen = torch.Generator().manual_seed(0)
    q, k, v = (4 * torch.randn(1, 2, 12, 8, generator=gen, dtype=torch.float64)
               for _ in range(3))
    causal = torch.ones(12, 12, dtype=torch.bool).tril()
    torch.testing.assert_close(op(q, k, v, backend=backend),
                               capped_attention(q, k, v, causal, 8 ** -0.5, 50.0))
    torch.testing.assert_close(op(q, k, v, backend=backend, softcap=1.5),
                               capped_attention(q, k, v, causal, 8 ** -0.5, 1.5))


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_softcap_with_padding_rows_without_keys_are_zero(backend):
    op = attndsl.compile("patterns/sliding.attn", "sliding_window", window=3)
    q, k, v = (torch.randn(1, 1, 8, 4, dtype=torch.float64, requires_grad=True)
               for _ in range(3))
    valid = torch.tensor([[False, False, False, True, True, True, True, True]])
    out = op(q, k, v, backend=backend, softcap=1.0, key_padding_mask=valid)
    assert torch.equal(out[0, 0, :3], torch.zeros(3, 4, dtype=torch.float64))
    out.sum().backward()
    assert torch.equal(q.grad[0, 0, :3], torch.zeros(3, 4, dtype=torch.float64))
    assert torch.isfinite(k.grad).all() and torch.isfinite(v.grad).all()


@pytest.mark.parametrize("bad", [0, -1.0, float("nan"), float("inf"), True, "50"])
def test_bad_softcap_is_a_parameter_error(bad):
    op = attndsl.compile("patterns/sliding.attn", "sliding_window", N=8, window=3)
    q = torch.randn(1, 1, 8, 4)
    with pytest.raises(attndsl.ParameterError,
                       match=r"^error: softcap must be a positive number, not "):
        op(q, q, q, softcap=bad)


def test_softcap_through_torch_compile():
    """The call's softcap reaches the custom op of a compiled graph (and its backward)."""
    op = attndsl.compile("patterns/sliding.attn", "sliding_window", window=4)
    q, k, v = (3 * torch.randn(1, 2, 12, 8, dtype=torch.float64, requires_grad=True)
               for _ in range(3))

    def f(q, k, v):
        return op(q, k, v, backend="cpu", softcap=1.5)

    out = torch.compile(f, fullgraph=True, backend="eager")(q, k, v)
    want = capped_attention(q, k, v, torch.from_numpy(ind.sliding_window(12, 4)), 8 ** -0.5,
                            1.5)
    torch.testing.assert_close(out, want)
    g = torch.autograd.grad(out.sum(), (q, k, v))
    torch.testing.assert_close(g, torch.autograd.grad(want.sum(), (q, k, v)))
