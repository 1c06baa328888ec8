"""attndsl.natten, NATTEN's API on attndsl: against a dense definition written here from
NATTEN's neighbourhood rule (tests/independent.py, always run), against natten's own CPU
forward over seeded random configurations (when natten is installed: `pip install
attndsl[natten]`), natten module state dicts, NATTEN's argument rules with exact messages,
gradients, GQA, and the cache of ops."""

from __future__ import annotations

import math
import os
import random
import sys

import pytest
import torch

import attndsl
from attndsl import caches
from attndsl import natten as an

sys.path.insert(0, os.path.dirname(__file__))
import independent as ind  # noqa: E402

F64 = torch.float64


def heads_last(shape, heads, dim, batch=2, dtype=F64, seed=0, grad=False):
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(batch, *shape, heads, dim, generator=g, dtype=dtype)
    return t.requires_grad_(grad)


def dense_na(q, k, v, kernel, stride, dilation, causal, scale=None):
    """NATTEN's neighbourhood attention, dense, on heads-last tensors: the mask of NATTEN's
    rule (independent.neighborhood), a plain masked softmax, GQA by repeating key heads."""
    shape = tuple(q.shape[1:-2])
    n = math.prod(shape)
    mask = torch.as_tensor(ind.neighborhood(shape, kernel, dilation, stride, causal))
    b, hq, d = q.shape[0], q.shape[-2], q.shape[-1]
    qf = q.reshape(b, n, hq, d).transpose(1, 2)
    kf = k.reshape(b, n, k.shape[-2], d).transpose(1, 2).repeat_interleave(hq // k.shape[-2], 1)
    vf = v.reshape(b, n, v.shape[-2], -1).transpose(1, 2).repeat_interleave(
        hq // v.shape[-2], 1)
    s = qf @ kf.transpose(-1, -2) * (d ** -0.5 if scale is None else scale)
    out = torch.softmax(s.masked_fill(~mask, -math.inf), -1) @ vf
    return out.transpose(1, 2).reshape(*q.shape[:-1], vf.shape[-1])


FNS = {1: an.na1d, 2: an.na2d, 3: an.na3d}


def random_config(rng: random.Random, na_dim: int):
    """A configuration NATTEN accepts: per axis a size, kernel, dilation, stride, causal;
    scalars or tuples (1-tuples too) at random."""
    shape, kernel, dil, stride, causal = [], [], [], [], []
    for _ in range(na_dim):
        size = rng.randint(2, 12 if na_dim == 1 else 7 if na_dim == 2 else 5)
        k = rng.randint(2, size)
        d = rng.randint(1, size // k)
        shape.append(size)
        kernel.append(k)
        dil.append(d)
        stride.append(rng.randint(1, k))
        causal.append(rng.random() < 0.3)

    def form(xs):
        if len(set(xs)) == 1 and rng.random() < 0.5:
            return xs[0]
        return tuple(xs)
    return tuple(shape), form(kernel), form(stride), form(dil), form(causal)


@pytest.mark.parametrize("na_dim", [1, 2, 3])
def test_against_the_dense_definition_with_gradients(na_dim):
    rng = random.Random(na_dim)
    for i in range(6):
        shape, kernel, stride, dil, causal = random_config(rng, na_dim)
        kv_heads = rng.choice([1, 2])
        q = heads_last(shape, 2, 8, seed=3 * i, grad=True)
        k = heads_last(shape, kv_heads, 8, seed=3 * i + 1, grad=True)
        v = heads_last(shape, kv_heads, 6, seed=3 * i + 2, grad=True)
        scale = None if i % 2 else 0.3
        out = FNS[na_dim](q, k, v, kernel, stride, dil, causal, scale)
        exp = dense_na(q, k, v, kernel, stride, dil, causal, scale)
        assert out.shape == (*q.shape[:-1], 6) and out.is_contiguous()
        torch.testing.assert_close(out, exp, rtol=1e-9, atol=1e-9)
        w = torch.randn(out.shape, generator=torch.Generator().manual_seed(i), dtype=F64)
        got = torch.autograd.grad((out * w).sum(), (q, k, v))
        want = torch.autograd.grad((exp * w).sum(), (q, k, v))
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


def test_float32_and_reference_backend():
    q, k, v = (heads_last((6, 7), 2, 16, dtype=torch.float32, seed=s) for s in range(3))
    out = an.na2d(q, k, v, (3, 5), dilation=(2, 1))
    exp = dense_na(*(t.double() for t in (q, k, v)), (3, 5), (1, 1), (2, 1), (False, False))
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), exp, rtol=1e-5, atol=1e-5)
    ref = an.na2d(q, k, v, (3, 5), dilation=(2, 1), backend="reference")
    torch.testing.assert_close(ref, out, rtol=1e-5, atol=1e-5)


def test_triton_kernels_at_a_tiny_size():
    pytest.importorskip("triton")
    dev = "cuda" if torch.cuda.is_available() else "cpu"  # TRITON_INTERPRET=1 on the CPU
    q, k, v = (heads_last((5, 6), 2, 16, dtype=torch.float32, seed=s).to(dev)
               for s in range(3))
    out = an.na2d(q, k, v, 3, stride=(1, 2), is_causal=(True, False), backend="triton")
    exp = dense_na(*(t.double().cpu() for t in (q, k, v)), 3, (1, 2), 1, (True, False))
    torch.testing.assert_close(out.double().cpu(), exp, rtol=1e-4, atol=1e-4)


def test_one_op_per_configuration_in_the_declared_cache():
    caches.NATTEN_OPS.clear()
    hits, misses = caches.NATTEN_OPS.hits, caches.NATTEN_OPS.misses
    q = heads_last((9,), 2, 8)
    an.na1d(q, q, q, 3)
    an.na1d(q, q, q, (3,), stride=1, dilation=(1,), is_causal=False)
    q2 = heads_last((12,), 2, 8)
    an.na1d(q2, q2, q2, 3)  # another length: the same family op
    assert len(caches.NATTEN_OPS) == 1
    assert (caches.NATTEN_OPS.hits - hits, caches.NATTEN_OPS.misses - misses) == (2, 1)
    an.na1d(q, q, q, 3, is_causal=True)
    assert len(caches.NATTEN_OPS) == 2


def test_module_matches_its_definition_and_trains():
    torch.manual_seed(0)
    m = an.NeighborhoodAttention2D(embed_dim=24, num_heads=3, kernel_size=(3, 5),
                                   dilation=(1, 2), is_causal=(False, True)).double()
    x = torch.randn(2, 6, 11, 24, dtype=F64, requires_grad=True)
    y = m(x)
    qkv = (x @ m.qkv.weight.T + m.qkv.bias).reshape(2, 6, 11, 3, 3, 8)
    att = dense_na(qkv[..., 0, :, :], qkv[..., 1, :, :], qkv[..., 2, :, :], (3, 5), 1,
                   (1, 2), (False, True))
    exp = att.reshape(2, 6, 11, 24) @ m.proj.weight.T + m.proj.bias
    torch.testing.assert_close(y, exp)
    y.square().mean().backward()
    assert m.qkv.weight.grad is not None and torch.isfinite(x.grad).all()
    assert [n for n, _ in m.named_parameters()] == ["qkv.weight", "qkv.bias", "proj.weight",
                                                    "proj.bias"]
    assert "kernel_size=(3, 5)" in repr(m)


# ------------------------------------------------------------------ NATTEN's own CPU forward


def _natten():
    return pytest.importorskip("natten")


@pytest.mark.parametrize("na_dim", [1, 2, 3])
def test_against_natten_cpu_forward_over_random_configurations(na_dim):
    natten = _natten()
    fn = {1: natten.na1d, 2: natten.na2d, 3: natten.na3d}[na_dim]
    rng = random.Random(100 + na_dim)
    ran = 0
    for i in range(12):
        shape, kernel, stride, dil, causal = random_config(rng, na_dim)
        heads, kv_heads = rng.choice([(2, 2), (4, 2), (2, 1)])
        q = heads_last(shape, heads, 16, dtype=torch.float32, seed=i)
        k = heads_last(shape, kv_heads, 16, dtype=torch.float32, seed=i + 50)
        v = heads_last(shape, kv_heads, 16, dtype=torch.float32, seed=i + 99)
        scale = rng.choice([None, 0.2])
        try:
            with torch.no_grad():  # NATTEN's CPU path has no backward
                want = fn(q, k, v, kernel_size=kernel, stride=stride, dilation=dil,
                          is_causal=causal, scale=scale)
        except NotImplementedError:  # e.g. 1-D causal with kernel == length: NATTEN calls
            continue                 # its FMHA, which has no causal CPU backend
        got = FNS[na_dim](q, k, v, kernel, stride, dil, causal, scale)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5,
                                   msg=f"{shape} {kernel} {stride} {dil} {causal}")
        ran += 1
    assert ran >= 9


@pytest.mark.parametrize("cls,shape,kw", [
    ("NeighborhoodAttention1D", (13,), dict(kernel_size=(5,), dilation=2, is_causal=True)),
    ("NeighborhoodAttention2D", (7, 9), dict(kernel_size=3, stride=(1, 2), qkv_bias=False)),
    ("NeighborhoodAttention3D", (4, 5, 6), dict(kernel_size=(2, 3, 3), is_causal=(True, False,
                                                                               False),
                                                 qk_scale=0.125)),
])
def test_a_natten_state_dict_loads_and_gives_natten_outputs(cls, shape, kw):
    natten = _natten()
    torch.manual_seed(1)
    theirs = getattr(natten, cls)(embed_dim=32, num_heads=4, **kw).eval()
    ours = getattr(an, cls)(embed_dim=32, num_heads=4, **kw).eval()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    x = torch.randn(2, *shape, 32)
    with torch.no_grad():
        want = theirs(x)
    torch.testing.assert_close(ours(x), want, rtol=1e-4, atol=1e-5)
    assert repr(ours) == repr(theirs)


# ------------------------------------------------------------------ NATTEN's rules, exact


def message(fn, *args, **kwargs) -> tuple[type, str]:
    with pytest.raises(attndsl.AttnError) as info:
        fn(*args, **kwargs)
    assert isinstance(info.value, ValueError)  # as natten raises
    return type(info.value), info.value.message


Q1 = heads_last((6,), 2, 8)
Q2 = heads_last((5, 6), 2, 8)
ARG, INP = an.NattenArgumentError, an.NattenInputError


@pytest.mark.parametrize("call,cls,text", [
    (lambda: an.na1d(Q1, Q1, Q1, 1), ARG,
     "invalid kernel_size 1: expected an integer or a tuple of 1 integer (one per token "
     "axis), all >= 2"),
    (lambda: an.na2d(Q2, Q2, Q2, (3, 3, 3)), ARG,
     "invalid kernel_size (3, 3, 3): expected an integer or a tuple of 2 integers (one per "
     "token axis), all >= 2"),
    (lambda: an.na1d(Q1, Q1, Q1, 3, stride=0), ARG,
     "invalid stride 0: expected an integer or a tuple of 1 integer (one per token axis), "
     "all >= 1"),
    (lambda: an.na1d(Q1, Q1, Q1, 3, dilation=True), ARG,
     "invalid dilation True: expected an integer or a tuple of 1 integer (one per token "
     "axis), all >= 1"),
    (lambda: an.na2d(Q2, Q2, Q2, 3, is_causal=(True, 1)), ARG,
     "invalid is_causal (True, 1): expected a bool or a tuple of 2 bools"),
    (lambda: an.na2d(Q2, Q2, Q2, 3, stride=(1, 4)), ARG,
     "stride must not exceed kernel_size on any axis, got kernel_size=(3, 3), "
     "stride=(1, 4)"),
    (lambda: an.na1d(Q1, Q1, Q1, 4, dilation=2), INP,
     "kernel_size * dilation must not exceed the input size on any axis, got input size "
     "(6,), kernel_size=(4,), dilation=(2,)"),
    (lambda: an.na1d(Q1, Q1, Q1, 3, scale=0.0), ARG,
     "scale must be a positive number or None, not 0.0"),
    (lambda: an.na2d(Q1, Q1, Q1, 3), INP,
     "na2d takes 5-D tensors [batch, X, Y, heads, head_dim], got 4-D [2, 6, 2, 8]"),
    (lambda: an.na1d(Q1, Q1, Q1[..., :1, :], 3), INP,
     "key and value must have the same number of heads, got 2 and 1"),
    (lambda: an.na1d(heads_last((6,), 3, 8), Q1, Q1, 3), INP,
     "the key/value heads (2) must divide the query heads (3)"),
    (lambda: an.na1d(Q1, Q1[..., :4], Q1, 3), INP,
     "query and key must have the same head_dim, got 8 and 4"),
    (lambda: an.na1d(Q1, Q1[:, :5], Q1, 3), INP,
     "query, key and value must have the same token layout, got (6,), (5,), (6,)"),
    (lambda: an.na1d(Q1, Q1.float(), Q1, 3), INP,
     "query, key and value must have one dtype, got torch.float64, torch.float32, "
     "torch.float64"),
    (lambda: an.NeighborhoodAttention1D(30, 4, 3), ARG,
     "num_heads must divide embed_dim, got embed_dim=30, num_heads=4"),
    (lambda: an.NeighborhoodAttention2D(32, 4, 3)(torch.randn(1, 5, 32)), INP,
     "NeighborhoodAttention2D takes [batch, X, Y, embed_dim] (4-D), got 3-D [1, 5, 32]"),
    (lambda: an.NeighborhoodAttention1D(32, 4, 3)(torch.randn(1, 5, 16)), INP,
     "expected embed_dim 32 on the last axis, got 16 ([1, 5, 16])"),
    (lambda: an.NeighborhoodAttention1D(32, 4, 3, qk_scale=-1.0), ARG,
     "qk_scale must be a positive number or None, not -1.0"),
])
def test_natten_rules_with_exact_messages(call, cls, text):
    assert message(call) == (cls, text)
