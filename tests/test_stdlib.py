"""The standard library against an independent oracle (tests/independent.py).

The oracle is written from shared/reference/patterns.md only; these tests use nothing of
attndsl but its public API: attndsl.compile, op.mask, op(...) and attndsl.AttnError.
"""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

sys.path.insert(0, os.path.dirname(__file__))
import independent as ind  # noqa: E402

import attndsl  # noqa: E402

PAT = "patterns"
SETTINGS = dict(deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def compile_(file, pattern, **params):
    return attndsl.compile(f"{PAT}/{file}", pattern=pattern, **params)


def as_np(mask):
    assert isinstance(mask, torch.Tensor), type(mask)
    assert mask.dtype == torch.bool, mask.dtype
    return mask.detach().cpu().numpy()


def assert_mask(op, expected, **runtime):
    got = as_np(op.mask(**runtime))
    assert got.shape == expected.shape, (got.shape, expected.shape)
    if not np.array_equal(got, expected):
        bad = np.argwhere(got != expected)
        q, k = bad[0][-2], bad[0][-1]
        raise AssertionError(
            f"{len(bad)} entries differ; first at {tuple(bad[0])}: got {got[tuple(bad[0])]}, "
            f"expected {expected[tuple(bad[0])]}; row {q} got keys "
            f"{np.nonzero(got[tuple(bad[0][:-1])])[0].tolist()} expected "
            f"{np.nonzero(expected[tuple(bad[0][:-1])])[0].tolist()} (column {k})")


def rand_qkv(B, Hq, Hkv, Nq, Nk, D, dtype=torch.float64, seed=0, grad=False):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, Nq, D, generator=g, dtype=dtype)
    k = torch.randn(B, Hkv, Nk, D, generator=g, dtype=dtype)
    v = torch.randn(B, Hkv, Nk, D, generator=g, dtype=dtype)
    if grad:
        for t in (q, k, v):
            t.requires_grad_(True)
    return q, k, v


def grads(fn, q, k, v, seed=1):
    """Output and d(sum(out*w))/d(q, k, v) for a fixed random weight w."""
    qq, kk, vv = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    out = fn(qq, kk, vv)
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype)
    gq, gk, gv = torch.autograd.grad((out * w).sum(), (qq, kk, vv), allow_unused=True)
    zero = torch.zeros_like
    return out.detach(), (gq if gq is not None else zero(qq),
                          gk if gk is not None else zero(kk),
                          gv if gv is not None else zero(vv))


def close(a, b, tol=1e-10):
    torch.testing.assert_close(a, b, atol=tol, rtol=tol)


# =========================================================================== oracle self-checks
# (these need no compiler; they pin the oracle to the claims of patterns.md)


def test_oracle_na_counts_and_bruteforce():
    rng = np.random.default_rng(0)
    for _ in range(200):
        n = int(rng.integers(1, 4))
        shape = tuple(int(rng.integers(2, 10 if n < 3 else 6)) for _ in range(n))
        ks = tuple(int(rng.integers(2, L + 1)) for L in shape)
        ds = tuple(int(rng.integers(1, L // k + 1)) for L, k in zip(shape, ks))
        ss = tuple(int(rng.integers(1, k + 1)) for k in ks)
        cs = tuple(bool(rng.random() < 0.4) for _ in shape)
        m = ind.neighborhood(shape, ks, ds, ss, cs)
        assert np.array_equal(m, ind.neighborhood_bruteforce(shape, ks, ds, ss, cs))
        assert m.diagonal().all()
        assert (ind.neighborhood(shape, ks, ds, ss, False).sum(1) == np.prod(ks)).all()


def test_oracle_power_claims():
    bm = ind.power_attention_blocks(128, 5, 1)
    assert bm[-1].sum() == 10
    assert _reach(bm, 6) == [10, 35, 75, 110, 126, 128]


def test_oracle_combiner_tiles():
    for N in (1, 2, 3, 17, 64, 100):
        for p, (d, regs) in enumerate(ind.combiner_logsparse_structure(N)):
            assert sorted(d + [j for r in regs for j in r]) == list(range(p + 1))
    for p, (d, regs) in enumerate(ind.combiner_fixed_structure(23, 5)):
        assert sorted(d + [j for r in regs for j in r]) == list(range(p + 1))
    for p, (d, regs) in enumerate(ind.combiner_axial_structure(4, 5)):
        assert sorted(d + [j for r in regs for j in r]) == list(range(p + 1))


def _reach(block_mask, layers, start=None):
    """Blocks reachable from the last block after 1..layers layers (bool [n, n] q-by-k)."""
    n = block_mask.shape[0]
    r = np.zeros(n, dtype=bool)
    r[n - 1 if start is None else start] = True
    out = []
    for _ in range(layers):
        r = r | block_mask[r].any(0)
        out.append(int(r.sum()))
    return out


# =========================================================================== 1. neighborhood

NA1D_CASES = [
    # N, kernel, dilation, stride, causal
    (2, 2, 1, 1, False), (7, 3, 1, 1, False), (7, 7, 1, 1, False), (8, 2, 4, 1, False),
    (9, 3, 2, 1, False), (10, 3, 3, 1, False), (11, 4, 2, 2, False), (13, 5, 2, 5, False),
    (12, 4, 1, 4, False), (12, 4, 1, 3, False), (17, 3, 5, 3, False), (16, 6, 2, 4, False),
    (7, 3, 1, 1, True), (9, 4, 2, 1, True), (12, 4, 1, 4, True), (13, 5, 2, 3, True),
    (10, 10, 1, 10, True), (10, 2, 5, 2, True), (64, 7, 3, 2, False), (63, 8, 7, 8, True),
]


@pytest.mark.parametrize("N,kernel,dilation,stride,causal", NA1D_CASES)
def test_na1d_cases(N, kernel, dilation, stride, causal):
    op = compile_("neighborhood.attn", "na1d", N=N, kernel=kernel, dilation=dilation,
                  stride=stride, causal=causal)
    assert_mask(op, ind.na1d(N, kernel, dilation, stride, causal))


def test_na1d_defaults():
    op = compile_("neighborhood.attn", "na1d", N=11, kernel=5)
    assert_mask(op, ind.na1d(11, 5))
    assert (as_np(op.mask()).sum(1) == 5).all()


NA2D_CASES = [
    # H, W, kernel, dilation, stride, causal
    (8, 9, 3, 2, 1, False),          # the example of the API
    (5, 7, (3, 5), 1, 1, False),
    (6, 11, (3, 5), (2, 2), (1, 2), (True, False)),
    (9, 4, 3, (3, 1), (3, 2), False),
    (7, 7, 7, 1, 7, False),          # kernel == axis, stride == kernel
    (10, 12, (4, 3), (2, 4), (4, 3), (False, True)),
    (12, 12, 5, 2, (2, 5), True),
    (3, 12, (2, 6), (1, 2), (2, 1), (True, True)),
    (11, 6, (2, 3), (5, 2), (1, 3), (False, True)),
    (12, 5, (6, 5), (2, 1), (5, 1), (True, False)),
]


@pytest.mark.parametrize("H,W,kernel,dilation,stride,causal", NA2D_CASES)
def test_na2d_cases(H, W, kernel, dilation, stride, causal):
    op = compile_("neighborhood.attn", "na2d", H=H, W=W, kernel=kernel, dilation=dilation,
                  stride=stride, causal=causal)
    assert_mask(op, ind.na2d(H, W, kernel, dilation, stride, causal))


NA3D_CASES = [
    (4, 5, 6, 3, 1, 1, False),
    (6, 6, 6, (2, 3, 4), (3, 2, 1), (1, 2, 4), (True, False, False)),
    (5, 4, 6, (3, 2, 3), (1, 2, 2), (3, 1, 2), (False, True, True)),
    (3, 6, 5, 3, 1, (1, 3, 1), True),
    (6, 5, 4, (2, 2, 2), (3, 2, 2), 2, (False, False, True)),
]


@pytest.mark.parametrize("T,H,W,kernel,dilation,stride,causal", NA3D_CASES)
def test_na3d_cases(T, H, W, kernel, dilation, stride, causal):
    op = compile_("neighborhood.attn", "na3d", T=T, H=H, W=W, kernel=kernel,
                  dilation=dilation, stride=stride, causal=causal)
    assert_mask(op, ind.na3d(T, H, W, kernel, dilation, stride, causal))


@st.composite
def na_params(draw, ndim, max_len):
    shape = tuple(draw(st.integers(2, max_len)) for _ in range(ndim))
    if draw(st.booleans()):  # one value for all axes
        Lmin = min(shape)
        k = draw(st.integers(2, Lmin))
        d = draw(st.integers(1, Lmin // k))
        s = draw(st.integers(1, k))
        c = draw(st.booleans())
        # also sometimes pass the 'one value' as a tuple
        return shape, k, d, s, c
    ks = tuple(draw(st.integers(2, L)) for L in shape)
    ds = tuple(draw(st.integers(1, L // k)) for L, k in zip(shape, ks))
    ss = tuple(draw(st.integers(1, k)) for k in ks)
    cs = tuple(draw(st.booleans()) for _ in shape)
    return shape, ks, ds, ss, cs


@settings(max_examples=60, **SETTINGS)
@given(na_params(1, 64))
def test_na1d_hypothesis(p):
    (N,), k, d, s, c = p
    scalar = lambda x: x[0] if isinstance(x, tuple) else x  # noqa: E731
    op = compile_("neighborhood.attn", "na1d", N=N, kernel=scalar(k), dilation=scalar(d),
                  stride=scalar(s), causal=scalar(c))
    assert_mask(op, ind.na1d(N, scalar(k), scalar(d), scalar(s), scalar(c)))


@settings(max_examples=60, **SETTINGS)
@given(na_params(2, 12))
def test_na2d_hypothesis(p):
    (H, W), k, d, s, c = p
    op = compile_("neighborhood.attn", "na2d", H=H, W=W, kernel=k, dilation=d, stride=s,
                  causal=c)
    assert_mask(op, ind.na2d(H, W, k, d, s, c))


@settings(max_examples=40, **SETTINGS)
@given(na_params(3, 6))
def test_na3d_hypothesis(p):
    (T, H, W), k, d, s, c = p
    op = compile_("neighborhood.attn", "na3d", T=T, H=H, W=W, kernel=k, dilation=d,
                  stride=s, causal=c)
    assert_mask(op, ind.na3d(T, H, W, k, d, s, c))


def test_na_noncausal_prod_kernel_keys():
    op = compile_("neighborhood.attn", "na3d", T=5, H=6, W=4, kernel=(3, 5, 2),
                  dilation=(1, 1, 2), stride=(2, 1, 2))
    assert (as_np(op.mask()).sum(1) == 30).all()


NA_BAD = [
    ("na1d", dict(N=8, kernel=1)),                        # k >= 2
    ("na1d", dict(N=8, kernel=9)),                        # k*d <= L
    ("na1d", dict(N=8, kernel=3, dilation=3)),            # 9 > 8
    ("na1d", dict(N=8, kernel=3, stride=4)),              # s <= k
    ("na1d", dict(N=8, kernel=3, stride=0)),              # s >= 1
    ("na1d", dict(N=8, kernel=3, dilation=0)),            # d >= 1
    ("na2d", dict(H=8, W=9, kernel=3, dilation=3)),       # 9 > 8 on H only
    ("na2d", dict(H=8, W=9, kernel=(3, 5), dilation=(1, 2))),  # 10 > 9 on W
    ("na2d", dict(H=8, W=9, kernel=(3, 1))),              # kernel 1 on W
    ("na2d", dict(H=8, W=9, kernel=3, stride=(1, 4))),    # stride > kernel on W
    ("na2d", dict(H=8, W=9, kernel=(3, 3), stride=(4, 1))),
    ("na2d", dict(H=4, W=4, kernel=5)),
    ("na3d", dict(T=3, H=6, W=6, kernel=(4, 3, 3))),      # 4 > 3 on T
    ("na3d", dict(T=6, H=6, W=6, kernel=3, dilation=(1, 1, 3))),
    ("na3d", dict(T=6, H=6, W=6, kernel=(2, 2, 2), stride=(1, 3, 1))),
]


@pytest.mark.parametrize("pattern,params", NA_BAD)
def test_na_constraint_errors(pattern, params):
    with pytest.raises(attndsl.AttnError):
        op = compile_("neighborhood.attn", pattern, **params)
        op.mask()  # errors may surface at compile or at first use, but must be AttnError


# =========================================================================== 2. sliding windows


@pytest.mark.parametrize("N,window,causal", [
    (1, 1, True), (7, 1, True), (16, 4, True), (17, 4, False), (33, 33, True), (33, 40, False),
    (20, 5, False),
])
def test_sliding_window_cases(N, window, causal):
    op = compile_("sliding.attn", "sliding_window", N=N, window=window, causal=causal)
    assert_mask(op, ind.sliding_window(N, window, causal))


def test_sliding_window_default_causal():
    op = compile_("sliding.attn", "sliding_window", N=12, window=3)
    assert_mask(op, ind.sliding_window(12, 3, True))


@pytest.mark.parametrize("N,window,dilation,causal", [
    (16, 4, 2, True), (17, 3, 3, False), (30, 5, 4, True), (9, 9, 1, False), (31, 2, 7, True),
])
def test_dilated_window_cases(N, window, dilation, causal):
    op = compile_("sliding.attn", "dilated_window", N=N, window=window, dilation=dilation,
                  causal=causal)
    assert_mask(op, ind.dilated_window(N, window, dilation, causal))


@settings(max_examples=40, **SETTINGS)
@given(st.integers(1, 64), st.integers(1, 20), st.integers(1, 6), st.booleans(), st.booleans())
def test_windows_hypothesis(N, window, dilation, causal, use_dilated):
    if use_dilated:
        op = compile_("sliding.attn", "dilated_window", N=N, window=window, dilation=dilation,
                      causal=causal)
        assert_mask(op, ind.dilated_window(N, window, dilation, causal))
    else:
        op = compile_("sliding.attn", "sliding_window", N=N, window=window, causal=causal)
        assert_mask(op, ind.sliding_window(N, window, causal))


# =========================================================================== 3. PowerAttention


POWER_CASES = [
    # pattern, params (N and small blocks so that the block structure shows)
    ("power_attention", dict(N=64, block=4, window=2, sink=1)),
    ("power_attention", dict(N=61, block=3, window=3, sink=2)),
    ("power_attention", dict(N=50, block=7, window=1, sink=0)),
    ("power_attention", dict(N=40, block=1, window=5, sink=1)),
    ("block_sliding", dict(N=64, block=4, window=3, sink=1)),
    ("block_sliding", dict(N=45, block=5, window=2, sink=0)),
    ("block_sliding", dict(N=33, block=4, window=9, sink=2)),
    ("block_dilated", dict(N=64, block=4, span=8)),
    ("block_dilated", dict(N=47, block=3, span=5)),
    ("block_dilated", dict(N=20, block=1, span=20)),
    ("longnet", dict(N=64, block=1)),
    ("longnet", dict(N=63, block=2)),
    ("longnet", dict(N=50, block=3)),
    ("power_strides", dict(N=64, window=1)),
    ("power_strides", dict(N=45, window=3)),
    ("power_strides", dict(N=33, window=5)),
]

POWER_FN = {"power_attention": ind.power_attention, "block_sliding": ind.block_sliding,
            "block_dilated": ind.block_dilated, "longnet": ind.longnet,
            "power_strides": ind.power_strides}


@pytest.mark.parametrize("pattern,params", POWER_CASES)
def test_power_cases(pattern, params):
    op = compile_("power.attn", pattern, **params)
    assert_mask(op, POWER_FN[pattern](**params))


@pytest.mark.parametrize("pattern", ["power_attention", "block_sliding", "block_dilated",
                                     "longnet"])
def test_power_defaults(pattern):
    # default block 256 with N = 600: three blocks, the last partial
    op = compile_("power.attn", pattern, N=600)
    exp = {"power_attention": lambda: ind.power_attention(600),
           "block_sliding": lambda: ind.block_sliding(600),
           "block_dilated": lambda: ind.block_dilated(600),
           "longnet": lambda: ind.longnet(600)}[pattern]()
    assert_mask(op, exp)


@settings(max_examples=50, **SETTINGS)
@given(st.sampled_from(list(POWER_FN)), st.integers(1, 64), st.integers(1, 9),
       st.integers(1, 10), st.integers(0, 3), st.integers(1, 12))
def test_power_hypothesis(pattern, N, block, window, sink, span):
    params = {"power_attention": dict(N=N, block=block, window=window, sink=sink),
              "block_sliding": dict(N=N, block=block, window=window, sink=sink),
              "block_dilated": dict(N=N, block=block, span=span),
              "longnet": dict(N=N, block=block),
              "power_strides": dict(N=N, window=window)}[pattern]
    op = compile_("power.attn", pattern, **params)
    assert_mask(op, POWER_FN[pattern](**params))


def test_power_paper_claims():
    """Fig. 2 at block level: 128 blocks; block size 4 keeps the mask small."""
    B = 4
    N = 128 * B

    def blocks(pattern, **kw):
        m = as_np(compile_("power.attn", pattern, N=N, block=B, **kw).mask())
        return m[B - 1::B, ::B]  # last token of each query block, first of each key block

    pa = blocks("power_attention", window=5, sink=1)
    assert pa[-1].sum() == 10
    assert _reach(pa, 6) == [10, 35, 75, 110, 126, 128]
    bs = blocks("block_sliding", window=9, sink=1)
    assert _reach(bs, 4) == [10, 18, 26, 34]
    assert _reach(blocks("block_dilated", span=20), 40)[-1] == 64
    assert _reach(blocks("longnet"), 40)[-1] == 80


# =========================================================================== 4. Sparse Transformer


@pytest.mark.parametrize("N,stride", [(1, 1), (16, 4), (17, 4), (30, 6), (64, 8), (20, 1),
                                      (13, 13)])
def test_strided_cases(N, stride):
    op = compile_("sparse_transformer.attn", "strided", N=N, stride=stride)
    assert_mask(op, ind.strided(N, stride))


@pytest.mark.parametrize("N,stride,c", [(16, 4, 1), (17, 4, 2), (30, 6, 3), (64, 8, 1),
                                        (20, 5, 5), (13, 3, 1)])
def test_fixed_cases(N, stride, c):
    op = compile_("sparse_transformer.attn", "fixed", N=N, stride=stride, c=c)
    assert_mask(op, ind.fixed(N, stride, c))


def test_fixed_default_c():
    op = compile_("sparse_transformer.attn", "fixed", N=23, stride=5)
    assert_mask(op, ind.fixed(23, 5, 1))


@settings(max_examples=40, **SETTINGS)
@given(st.integers(1, 64), st.integers(1, 12), st.integers(1, 12), st.booleans())
def test_sparse_transformer_hypothesis(N, stride, c, use_fixed):
    if use_fixed:
        c = min(c, stride)
        op = compile_("sparse_transformer.attn", "fixed", N=N, stride=stride, c=c)
        assert_mask(op, ind.fixed(N, stride, c))
    else:
        op = compile_("sparse_transformer.attn", "strided", N=N, stride=stride)
        assert_mask(op, ind.strided(N, stride))


# =========================================================================== 5. HaloNet


@pytest.mark.parametrize("H,W,block,halo", [(8, 8, 4, 1), (9, 7, 4, 2), (12, 12, 3, 3),
                                            (5, 11, 2, 0), (6, 6, 8, 3), (10, 7, 3, 5)])
def test_halo_cases(H, W, block, halo):
    op = compile_("halo.attn", "halo2d", H=H, W=W, block=block, halo=halo)
    assert_mask(op, ind.halo2d(H, W, block, halo))


def test_halo_defaults():
    op = compile_("halo.attn", "halo2d", H=12, W=10)
    assert_mask(op, ind.halo2d(12, 10, 8, 3))


@settings(max_examples=40, **SETTINGS)
@given(st.integers(1, 12), st.integers(1, 12), st.integers(1, 6), st.integers(0, 4))
def test_halo_hypothesis(H, W, block, halo):
    op = compile_("halo.attn", "halo2d", H=H, W=W, block=block, halo=halo)
    assert_mask(op, ind.halo2d(H, W, block, halo))


# =========================================================================== DaViT window2d


@pytest.mark.parametrize("H,W,window", [(7, 7, 7), (14, 7, 7), (9, 12, 4), (5, 8, 3),
                                        (12, 5, 5), (3, 3, 7)])
def test_window2d_cases(H, W, window):
    op = compile_("davit.attn", "window2d", H=H, W=W, window=window)
    assert_mask(op, ind.window2d(H, W, window))


def test_window2d_default():
    op = compile_("davit.attn", "window2d", H=10, W=15)
    assert_mask(op, ind.window2d(10, 15, 7))


@settings(max_examples=30, **SETTINGS)
@given(st.integers(1, 12), st.integers(1, 12), st.integers(1, 8))
def test_window2d_hypothesis(H, W, window):
    op = compile_("davit.attn", "window2d", H=H, W=W, window=window)
    assert_mask(op, ind.window2d(H, W, window))


# =========================================================================== 11. documents


def test_document_causal_cases():
    for doc in ([0] * 9, [0, 0, 1, 1, 1, 2, 3, 3, 3], [5, 5, 2, 2, 2, 2, 7, 1, 1],
                list(range(9)), [0, 1, 0, 1, 0, 1, 0, 1, 0]):
        op = compile_("document.attn", "document_causal", N=9)
        assert_mask(op, ind.document_causal(9, doc), doc=torch.tensor(doc))


@settings(max_examples=30, **SETTINGS)
@given(st.lists(st.integers(0, 3), min_size=1, max_size=40))
def test_document_causal_hypothesis(doc):
    op = compile_("document.attn", "document_causal", N=len(doc))
    assert_mask(op, ind.document_causal(len(doc), doc), doc=torch.tensor(doc))


@pytest.mark.parametrize("N,prefix", [(10, 0), (10, 1), (10, 4), (10, 10), (17, 16)])
def test_prefix_lm_cases(N, prefix):
    op = compile_("document.attn", "prefix_lm", N=N)
    assert_mask(op, ind.prefix_lm(N, prefix), prefix=prefix)
    assert_mask(op, ind.prefix_lm(N, prefix), prefix=torch.tensor(prefix))


# =========================================================================== reference outputs

# (file, pattern, params, runtime inputs, oracle mask)
REF_CASES = [
    ("neighborhood.attn", "na1d", dict(N=13, kernel=5, dilation=2, stride=2), {},
     lambda: ind.na1d(13, 5, 2, 2)),
    ("neighborhood.attn", "na1d", dict(N=12, kernel=3, causal=True), {},
     lambda: ind.na1d(12, 3, causal=True)),
    ("neighborhood.attn", "na2d", dict(H=5, W=6, kernel=(3, 4), dilation=(1, 1),
                                       stride=(1, 2), causal=(True, False)), {},
     lambda: ind.na2d(5, 6, (3, 4), 1, (1, 2), (True, False))),
    ("neighborhood.attn", "na3d", dict(T=3, H=4, W=3, kernel=2, dilation=(1, 2, 1)), {},
     lambda: ind.na3d(3, 4, 3, 2, (1, 2, 1))),
    ("sliding.attn", "sliding_window", dict(N=20, window=4), {},
     lambda: ind.sliding_window(20, 4)),
    ("sliding.attn", "dilated_window", dict(N=20, window=3, dilation=3, causal=False), {},
     lambda: ind.dilated_window(20, 3, 3, False)),
    ("power.attn", "power_attention", dict(N=40, block=3, window=2, sink=1), {},
     lambda: ind.power_attention(40, 3, 2, 1)),
    ("power.attn", "block_dilated", dict(N=30, block=2, span=6), {},
     lambda: ind.block_dilated(30, 2, 6)),
    ("power.attn", "longnet", dict(N=30, block=1), {}, lambda: ind.longnet(30, 1)),
    ("power.attn", "power_strides", dict(N=30, window=2), {}, lambda: ind.power_strides(30, 2)),
    ("sparse_transformer.attn", "strided", dict(N=21, stride=4), {},
     lambda: ind.strided(21, 4)),
    ("sparse_transformer.attn", "fixed", dict(N=21, stride=4, c=2), {},
     lambda: ind.fixed(21, 4, 2)),
    ("halo.attn", "halo2d", dict(H=6, W=5, block=2, halo=1), {}, lambda: ind.halo2d(6, 5, 2, 1)),
    ("davit.attn", "window2d", dict(H=5, W=6, window=4), {}, lambda: ind.window2d(5, 6, 4)),
    ("document.attn", "document_causal", dict(N=12),
     dict(doc=torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2, 3, 4, 4])),
     lambda: ind.document_causal(12, [0, 0, 0, 1, 1, 2, 2, 2, 2, 3, 4, 4])),
    ("document.attn", "prefix_lm", dict(N=12), dict(prefix=5), lambda: ind.prefix_lm(12, 5)),
]
REF_IDS = [f"{c[1]}-{i}" for i, c in enumerate(REF_CASES)]


@pytest.mark.parametrize("file,pattern,params,runtime,oracle", REF_CASES, ids=REF_IDS)
@pytest.mark.parametrize("heads,D", [((2, 2), 16), ((4, 2), 48)])
def test_reference_output_and_grads(file, pattern, params, runtime, oracle, heads, D):
    op = compile_(file, pattern, **params)
    mask = torch.from_numpy(oracle())
    N = mask.shape[0]
    Hq, Hkv = heads
    q, k, v = rand_qkv(2, Hq, Hkv, N, N, D, seed=N + D)

    out = op(q, k, v, backend="reference", **runtime)
    assert out.shape == (2, Hq, N, D)
    assert out.dtype == torch.float64
    assert torch.isfinite(out).all()
    has = mask.any(-1)
    # against torch's SDPA on rows that have keys
    kr, vr = k.repeat_interleave(Hq // Hkv, 1), v.repeat_interleave(Hq // Hkv, 1)
    sdpa = torch.nn.functional.scaled_dot_product_attention(q, kr, vr, attn_mask=mask)
    close(out[:, :, has], sdpa[:, :, has])
    assert (out[:, :, ~has] == 0).all()

    # gradients against the oracle's masked softmax
    got, g_got = grads(lambda a, b, c: op(a, b, c, backend="reference", **runtime), q, k, v)
    exp, g_exp = grads(lambda a, b, c: ind.masked_attention(a, b, c, mask), q, k, v)
    close(got, exp)
    for a, b in zip(g_got, g_exp):
        assert torch.isfinite(a).all()
        close(a, b)


def test_reference_float32():
    op = compile_("neighborhood.attn", "na2d", H=6, W=7, kernel=3, dilation=2)
    mask = torch.from_numpy(ind.na2d(6, 7, 3, 2))
    q, k, v = rand_qkv(1, 2, 2, 42, 42, 32, dtype=torch.float32)
    out = op(q, k, v, backend="reference")
    assert out.dtype == torch.float32
    exp = ind.masked_attention(q.double(), k.double(), v.double(), mask)
    torch.testing.assert_close(out.double(), exp, atol=1e-5, rtol=1e-5)


# =========================================================================== empty rows
# No standard pattern has a query without keys: NA always contains the query itself
# (causal windows end at x'+1 and start at or before x'), the causal 1-D patterns all keep
# t = 0, halo/window2d keep the query's own block, document_causal and prefix_lm keep k == q,
# DHSA keeps the query's own chunk.  So this test writes a tiny pattern of its own
# (strictly causal plus a run-time document id) into a temporary directory.

EMPTY_ROW_SRC = """
pattern strictly_causal_docs(N: int) {
  space seq(N)
  input doc: int[N]
  attend k.i < q.i and doc[q.i] == doc[k.i]
}
"""


def test_queries_without_keys_give_zero_output_and_zero_grads(tmp_path):
    path = tmp_path / "empty_rows.attn"
    path.write_text(EMPTY_ROW_SRC)
    N = 10
    doc = [0, 0, 0, 1, 2, 2, 3, 3, 3, 3]      # rows 0, 3, 4, 6 have no key
    op = attndsl.compile(str(path), pattern="strictly_causal_docs", N=N)
    mask = torch.tensor([[k < q and doc[q] == doc[k] for k in range(N)] for q in range(N)])
    empty = ~mask.any(-1)
    assert empty.tolist() == [i in (0, 3, 4, 6) for i in range(N)]
    assert torch.equal(op.mask(doc=torch.tensor(doc)), mask)
    for heads in ((2, 2), (4, 2)):
        q, k, v = rand_qkv(2, heads[0], heads[1], N, N, 8, seed=4)
        fn = lambda a, b, c: op(a, b, c, backend="reference", doc=torch.tensor(doc))  # noqa
        out, (gq, gk, gv) = grads(fn, q, k, v)
        assert torch.isfinite(out).all()
        assert (out[:, :, empty] == 0).all()
        for gr in (gq, gk, gv):
            assert torch.isfinite(gr).all()
        assert (gq[:, :, empty] == 0).all()        # an empty query row has no gradient
        exp, g_exp = grads(lambda a, b, c: ind.masked_attention(a, b, c, mask), q, k, v)
        close(out, exp)
        for a, b in zip((gq, gk, gv), g_exp):
            close(a, b)
        # the keys only an empty row could see: row 0 sees nothing, so nothing flows to k/v
        # from it; key 9 is attended by nobody (strictly causal), so its k and v grads are 0
        assert (gk[:, :, 9] == 0).all() and (gv[:, :, 9] == 0).all()


# =========================================================================== 6. Combiner


def _combiner_check(op, fn, N, D=8, B=2, H=2, seed=0):
    q, k, v = rand_qkv(B, H, H, N, N, D, seed=seed)
    got, g_got = grads(lambda a, b, c: op(a, b, c, backend="reference"), q, k, v)
    exp, g_exp = grads(fn, q, k, v)
    assert got.shape == (B, H, N, D)
    close(got, exp, 1e-10)
    for a, b in zip(g_got, g_exp):
        assert torch.isfinite(a).all()
        close(a, b, 1e-8)


@pytest.mark.parametrize("N,span", [(1, 1), (7, 3), (16, 4), (17, 4), (20, 5), (9, 9), (12, 1)])
def test_combiner_fixed(N, span):
    op = compile_("combiner.attn", "combiner_fixed", N=N, span=span)
    _combiner_check(op, lambda q, k, v: ind.combiner_fixed(q, k, v, span), N, seed=N + span)


@pytest.mark.parametrize("N", [1, 2, 3, 8, 13, 16, 33])
def test_combiner_logsparse(N):
    op = compile_("combiner.attn", "combiner_logsparse", N=N)
    _combiner_check(op, ind.combiner_logsparse, N, seed=N)


@pytest.mark.parametrize("H,W", [(1, 5), (4, 4), (3, 7), (6, 2), (5, 1)])
def test_combiner_axial(H, W):
    op = compile_("combiner.attn", "combiner_axial_pooled", H=H, W=W)
    _combiner_check(op, lambda q, k, v: ind.combiner_axial(q, k, v, H, W), H * W, seed=H * W)


@pytest.mark.parametrize("N,span", [(8, 2), (17, 4), (24, 5), (31, 6)])
def test_combiner_mixture(N, span):
    op = compile_("combiner.attn", "combiner_mixture", N=N, span=span)
    _combiner_check(op, lambda q, k, v: ind.combiner_mixture(q, k, v, span), N, seed=N * span)


@settings(max_examples=10, **SETTINGS)
@given(st.integers(1, 6), st.integers(1, 6), st.integers(0, 1000))
def test_combiner_axial_hypothesis(H, W, seed):
    op = compile_("combiner.attn", "combiner_axial_pooled", H=H, W=W)
    q, k, v = rand_qkv(1, 2, 2, H * W, H * W, 4, seed=seed)
    close(op(q, k, v, backend="reference"), ind.combiner_axial(q, k, v, H, W), 1e-10)


@settings(max_examples=15, **SETTINGS)
@given(st.integers(1, 24), st.integers(1, 8), st.sampled_from(["fixed", "logsparse", "mixture"]),
       st.integers(0, 1000))
def test_combiner_hypothesis(N, span, variant, seed):
    if variant == "logsparse":
        op = compile_("combiner.attn", "combiner_logsparse", N=N)
        fn = ind.combiner_logsparse
    else:
        op = compile_("combiner.attn", f"combiner_{variant}", N=N, span=span)
        oracle = getattr(ind, f"combiner_{variant}")

        def fn(q, k, v):
            return oracle(q, k, v, span)
    q, k, v = rand_qkv(1, 2, 2, N, N, 4, seed=seed)
    close(op(q, k, v, backend="reference"), fn(q, k, v), 1e-10)


def test_combiner_head_dim_48():
    op = compile_("combiner.attn", "combiner_fixed", N=10, span=3)
    _combiner_check(op, lambda q, k, v: ind.combiner_fixed(q, k, v, 3), 10, D=48, B=1, H=1)


# =========================================================================== 7. DHSA


def _dhsa_case(N, block, chunk, topk, B=2, H=2, D=8, seed=0, boundaries=None, ints=False):
    g = torch.Generator().manual_seed(seed)
    if ints:  # exact arithmetic: many exact ties in the chunk scores
        q = torch.randint(-2, 3, (B, H, N, D), generator=g).double()
        k = torch.randint(-2, 3, (B, H, N, D), generator=g).double()
    else:
        q = torch.randn(B, H, N, D, generator=g, dtype=torch.float64)
        k = torch.randn(B, H, N, D, generator=g, dtype=torch.float64)
    v = torch.randn(B, H, N, D, generator=g, dtype=torch.float64)
    op = compile_("dhsa.attn", "dhsa_chunks", N=N, block=block, chunk=chunk, topk=topk)
    rt = {} if boundaries is None else dict(boundaries=torch.tensor(boundaries))
    exp_mask = ind.dhsa_mask(q, k, block, chunk, topk, boundaries)
    assert_mask_runtime = as_np(op.mask(q=q, k=k, **rt))
    assert assert_mask_runtime.shape == (B, H, N, N)
    if not np.array_equal(assert_mask_runtime, exp_mask):
        bad = np.argwhere(assert_mask_runtime != exp_mask)[0]
        raise AssertionError(f"dhsa mask differs at {tuple(bad)}: got "
                             f"{np.nonzero(assert_mask_runtime[tuple(bad[:3])])[0].tolist()} "
                             f"expected {np.nonzero(exp_mask[tuple(bad[:3])])[0].tolist()}")
    return op, q, k, v, rt, torch.from_numpy(exp_mask)


@pytest.mark.parametrize("N,block,chunk,topk", [
    (16, 4, 4, 1), (32, 8, 4, 2), (30, 7, 5, 3), (33, 8, 3, 4), (40, 16, 4, 2),
    (24, 4, 8, 1), (20, 3, 2, 10), (17, 17, 4, 2), (12, 1, 1, 3), (64, 16, 8, 4),
    (20, 4, 3, 0), (9, 20, 4, 2), (10, 3, 20, 2),
])
def test_dhsa_mask_and_output(N, block, chunk, topk):
    op, q, k, v, rt, mask = _dhsa_case(N, block, chunk, topk, seed=N * block + chunk)
    out = op(q, k, v, backend="reference", **rt)
    close(out, ind.masked_attention(q, k, v, mask))


def test_dhsa_defaults():
    # defaults block=128, chunk=64, topk=4 on N=400: 4 blocks, 7 chunks (last partial)
    B, H, N, D = 1, 2, 400, 4
    q, k, v = rand_qkv(B, H, H, N, N, D, seed=3)
    op = compile_("dhsa.attn", "dhsa_chunks", N=N)
    assert np.array_equal(as_np(op.mask(q=q, k=k)), ind.dhsa_mask(q, k, 128, 64, 4))


@pytest.mark.parametrize("N,block,boundaries,topk", [
    (20, 4, [0, 3, 5, 11, 12, 19], 2),
    (20, 4, [0], 2),
    (24, 6, [0, 1, 2, 3, 10, 17, 18], 3),
    (16, 5, [0, 7, 8, 15], 1),
])
def test_dhsa_boundaries(N, block, boundaries, topk):
    op, q, k, v, rt, mask = _dhsa_case(N, block, 4, topk, boundaries=boundaries, seed=N)
    close(op(q, k, v, backend="reference", **rt), ind.masked_attention(q, k, v, mask))


def test_dhsa_ties_break_toward_later_chunk():
    # all keys identical: every candidate chunk has the same score; topk=1 keeps the latest
    N, block, chunk = 16, 4, 4
    q = torch.randn(1, 1, N, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    k = torch.ones(1, 1, N, 4, dtype=torch.float64)
    op = compile_("dhsa.attn", "dhsa_chunks", N=N, block=block, chunk=chunk, topk=1)
    got = as_np(op.mask(q=q, k=k))[0, 0]
    # block 3 (queries 12..15): own chunk 3 plus the latest earlier chunk, chunk 2
    assert got[15].tolist() == [False] * 8 + [True] * 8
    assert np.array_equal(got, ind.dhsa_mask(q, k, block, chunk, 1)[0, 0])


@settings(max_examples=30, **SETTINGS)
@given(st.integers(1, 64), st.sampled_from([1, 4, 16]), st.sampled_from([1, 4, 16]),
       st.integers(1, 5), st.integers(0, 10_000))
def test_dhsa_hypothesis_integer_ties(N, block, chunk, topk, seed):
    # Exact arithmetic needs every block and chunk to have a square size (sqrt(|C|) exact):
    # N is a multiple of both (a partial block of 2 tokens would bring sqrt(2) and turn
    # mathematical ties into rounding noise, where no tie rule can be tested).
    m = max(block, chunk)
    N = max(m, (N // m) * m)
    _dhsa_case(N, block, chunk, topk, B=1, H=2, D=3, seed=seed, ints=True)


@settings(max_examples=20, **SETTINGS)
@given(st.integers(2, 48), st.integers(1, 12), st.integers(1, 9), st.integers(1, 4),
       st.integers(0, 10_000), st.booleans())
def test_dhsa_hypothesis(N, block, chunk, topk, seed, use_bounds):
    bounds = None
    if use_bounds:
        rng = np.random.default_rng(seed)
        cuts = sorted(set(rng.integers(1, N, size=int(rng.integers(0, N))).tolist()))
        bounds = [0] + cuts
    _dhsa_case(N, block, chunk, topk, B=1, H=2, D=4, seed=seed, boundaries=bounds)


def test_dhsa_grads():
    op, q, k, v, rt, mask = _dhsa_case(24, 4, 3, 2, seed=5)
    got, g_got = grads(lambda a, b, c: op(a, b, c, backend="reference"), q, k, v)
    # the mask is a discrete function of q and k: gradients flow through the softmax only
    exp, g_exp = grads(lambda a, b, c: ind.masked_attention(a, b, c, mask), q, k, v)
    close(got, exp)
    for a, b in zip(g_got, g_exp):
        close(a, b)


# =========================================================================== 8. DaViT channel


@pytest.mark.parametrize("C,groups,N", [(8, 1, 5), (12, 3, 7), (16, 4, 1), (32, 2, 10),
                                        (96, 2, 6)])
def test_davit_channel_group(C, groups, N):
    Cg = C // groups
    op = compile_("davit.attn", "channel_group", C=C, groups=groups)
    m = op.mask()
    assert m.dtype == torch.bool and tuple(m.shape) == (Cg, Cg) and bool(m.all())
    q, k, v = rand_qkv(2, groups, groups, N, N, Cg, seed=C + N)
    got, g_got = grads(lambda a, b, c: op(a, b, c, backend="reference"), q, k, v)
    exp, g_exp = grads(ind.davit_channel_group, q, k, v)
    assert got.shape == (2, groups, N, Cg)
    close(got, exp)
    for a, b in zip(g_got, g_exp):
        close(a, b)


# =========================================================================== 9. MoH


@pytest.mark.parametrize("N,heads,shared,topk", [(8, 4, 1, 1), (10, 6, 2, 2), (7, 5, 0, 3),
                                                 (9, 4, 2, 2), (6, 3, 0, 3)])
def test_moh(N, heads, shared, topk):
    if heads - shared < topk:
        pytest.skip("invalid")
    op = compile_("moh.attn", "moh", N=N, heads=heads, shared=shared, topk=topk, normalised=True)
    B, D = 2, 8
    q, k, v = rand_qkv(B, heads, heads, N, N, D, seed=N + heads)
    router = torch.randn(B, N, heads - shared, dtype=torch.float64,
                         generator=torch.Generator().manual_seed(9))
    got, g_got = grads(lambda a, b, c: op(a, b, c, backend="reference", router=router), q, k, v)
    exp, g_exp = grads(lambda a, b, c: ind.moh_attention(a, b, c, router, heads, shared, topk),
                       q, k, v)
    close(got, exp)
    for a, b in zip(g_got, g_exp):
        assert torch.isfinite(a).all()
        close(a, b)
    gates = ind.moh_gates(router, heads, shared, topk)        # [B, N, heads]
    off = (gates == 0).permute(0, 2, 1)                        # [B, heads, N]
    if heads - shared > topk:
        assert off.any()
    assert (got[off] == 0).all()
    assert (got[~off].abs().sum(-1) > 0).all()


def test_moh_gate_zero_head_gives_zero_rows():
    # routed head 0 never wins: its rows are exactly 0 for every token
    N, heads, shared, topk = 6, 4, 1, 1
    op = compile_("moh.attn", "moh", N=N, heads=heads, shared=shared, topk=topk, normalised=True)
    q, k, v = rand_qkv(1, heads, heads, N, N, 8, seed=2)
    router = torch.zeros(1, N, 3, dtype=torch.float64)
    router[..., 0] = -5.0
    router[..., 1] = torch.linspace(-1, 1, N, dtype=torch.float64)
    out = op(q, k, v, backend="reference", router=router)
    assert (out[:, 1] == 0).all()  # head 1 = routed head 0
    close(out, ind.moh_attention(q, k, v, router, heads, shared, topk))


@settings(max_examples=15, **SETTINGS)
@given(st.integers(1, 7), st.data(), st.integers(1, 10), st.integers(0, 1000))
def test_moh_hypothesis(heads, data, N, seed):
    shared = data.draw(st.integers(0, heads))
    topk = data.draw(st.integers(0, heads - shared))
    op = compile_("moh.attn", "moh", N=N, heads=heads, shared=shared, topk=topk, normalised=True)
    q, k, v = rand_qkv(2, heads, heads, N, N, 4, seed=seed)
    router = torch.randn(2, N, heads - shared, dtype=torch.float64,
                         generator=torch.Generator().manual_seed(seed + 1))
    close(op(q, k, v, backend="reference", router=router),
          ind.moh_attention(q, k, v, router, heads, shared, topk))


# =========================================================================== 10. TransNeXt


@pytest.mark.parametrize("H,W,kernel,pool", [(8, 8, 3, 4), (6, 9, 3, 4), (7, 5, 5, 2),
                                             (5, 5, 3, 3), (4, 10, 3, 5), (3, 3, 3, 4)])
def test_transnext(H, W, kernel, pool):
    op = compile_("transnext.attn", "aggregated_pooled", H=H, W=W, kernel=kernel, pool=pool)
    assert_mask(op, ind.transnext_window(H, W, kernel))
    q, k, v = rand_qkv(2, 2, 2, H * W, H * W, 8, seed=H * W + pool)
    got, g_got = grads(lambda a, b, c: op(a, b, c, backend="reference"), q, k, v)
    exp, g_exp = grads(lambda a, b, c: ind.transnext_aggregated(a, b, c, H, W, kernel, pool),
                       q, k, v)
    close(got, exp)
    for a, b in zip(g_got, g_exp):
        close(a, b)


@settings(max_examples=15, **SETTINGS)
@given(st.integers(1, 9), st.integers(1, 9), st.sampled_from([1, 3, 5, 7]), st.integers(1, 6),
       st.integers(0, 1000))
def test_transnext_hypothesis(H, W, kernel, pool, seed):
    op = compile_("transnext.attn", "aggregated_pooled", H=H, W=W, kernel=kernel, pool=pool)
    assert_mask(op, ind.transnext_window(H, W, kernel))
    q, k, v = rand_qkv(1, 2, 2, H * W, H * W, 4, seed=seed)
    close(op(q, k, v, backend="reference"), ind.transnext_aggregated(q, k, v, H, W, kernel, pool))


def test_transnext_defaults():
    op = compile_("transnext.attn", "aggregated_pooled", H=9, W=8)
    assert_mask(op, ind.transnext_window(9, 8, 3))
    q, k, v = rand_qkv(1, 2, 2, 72, 72, 8, seed=1)
    close(op(q, k, v, backend="reference"), ind.transnext_aggregated(q, k, v, 9, 8, 3, 4))


# =========================================================================== API errors


def test_unknown_pattern_is_attn_error():
    with pytest.raises(attndsl.AttnError):
        compile_("neighborhood.attn", "na4d", N=8, kernel=3)


def test_missing_parameter_is_attn_error():
    with pytest.raises(attndsl.AttnError):
        compile_("neighborhood.attn", "na2d", H=8, kernel=3).mask()


def test_unknown_parameter_is_attn_error():
    with pytest.raises(attndsl.AttnError):
        compile_("neighborhood.attn", "na1d", N=8, kernel=3, kernal=3).mask()


def test_wrong_axis_count_is_attn_error():
    with pytest.raises(attndsl.AttnError):
        compile_("neighborhood.attn", "na2d", H=8, W=8, kernel=(3, 3, 3)).mask()


def test_missing_file_is_attn_error():
    with pytest.raises(attndsl.AttnError):
        attndsl.compile("patterns/no_such_file.attn", pattern="x", N=3)


def test_wrong_tensor_shape_is_attn_error():
    op = compile_("sliding.attn", "sliding_window", N=8, window=3)
    q, k, v = rand_qkv(1, 2, 2, 9, 9, 4)
    with pytest.raises(attndsl.AttnError):
        op(q, k, v, backend="reference")
    q, k, v = rand_qkv(1, 3, 2, 8, 8, 4)  # Hq not a multiple of Hkv
    with pytest.raises(attndsl.AttnError):
        op(q, k, v, backend="reference")


def test_missing_runtime_input_is_attn_error():
    op = compile_("document.attn", "document_causal", N=8)
    with pytest.raises(attndsl.AttnError):
        op.mask()


BAD_PARAMS = [
    ("power.attn", "power_attention", dict(N=8, block=0)),       # block of 0 tokens
    ("power.attn", "longnet", dict(N=8, block=0)),
    ("sparse_transformer.attn", "strided", dict(N=8, stride=0)),
    ("sparse_transformer.attn", "fixed", dict(N=8, stride=0)),
    ("halo.attn", "halo2d", dict(H=4, W=4, block=0)),
    ("davit.attn", "window2d", dict(H=4, W=4, window=0)),
    ("davit.attn", "channel_group", dict(C=4, groups=0)),
    ("davit.attn", "channel_group", dict(C=10, groups=3)),      # Cg = C / groups channels
    ("transnext.attn", "aggregated_pooled", dict(H=4, W=4, pool=0)),
    ("transnext.attn", "aggregated", dict(H=4, W=4, heads=1, pool=5)),  # no pooled token
    ("dhsa.attn", "dhsa_chunks", dict(N=8, block=0)),
    ("dhsa.attn", "dhsa_chunks", dict(N=8, chunk=0)),
    ("dhsa.attn", "dhsa", dict(N=8, budget=0)),
    ("moh.attn", "moh", dict(N=4, heads=4, shared=1, topk=4)),  # only 3 routed heads
    ("moh.attn", "moh", dict(N=4, heads=4, shared=5, topk=0)),  # more shared than heads
]


@pytest.mark.parametrize("file,pattern,params", BAD_PARAMS)
def test_bad_parameters_are_attn_errors(file, pattern, params):
    with pytest.raises(attndsl.AttnError):
        compile_(file, pattern, **params).mask()


def test_bad_runtime_inputs_are_attn_errors():
    q, k, v = rand_qkv(1, 2, 2, 8, 8, 4)
    op = compile_("document.attn", "document_causal", N=8)
    with pytest.raises(attndsl.AttnError):
        op.mask(doc=torch.zeros(7, dtype=torch.long))            # wrong length
    op = compile_("moh.attn", "moh", N=8, heads=2, shared=1, topk=1, normalised=True)
    with pytest.raises(attndsl.AttnError):
        op(q, k, v, backend="reference")                           # router missing
    with pytest.raises(attndsl.AttnError):
        op(q, k, v, backend="reference", router=torch.randn(1, 8, 2, dtype=torch.float64))
    op = compile_("dhsa.attn", "dhsa_chunks", N=8, block=4, chunk=2, topk=1)
    with pytest.raises(attndsl.AttnError):
        op.mask()                                                   # needs q and k
    for bad in ([1, 3], [0, 3, 3, 5], [0, 5, 2]):                  # first is 0, increasing
        with pytest.raises(attndsl.AttnError):
            op.mask(q=q, k=k, boundaries=torch.tensor(bad))
