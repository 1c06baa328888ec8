"""One compiled pattern for a model's whole life: sizes from the tensors, decoding with a
growing KV cache and chunked prefill, padding, dropout and torch.compile, on every backend
(the Triton kernels under TRITON_INTERPRET=1 at small sizes). References are written here
from the definitions, or are the same op's full call."""

from __future__ import annotations

import pytest
import torch

import attndsl
from attndsl import caches
from attndsl.errors import AttnError, InputError

BACKENDS = ["reference", "cpu", "triton"]
DT = {"reference": torch.float64, "cpu": torch.float64, "triton": torch.float32}
TOL = {"reference": 1e-12, "cpu": 1e-10, "triton": 2e-5}


def rand(*shape, dtype=torch.float64, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def close(a, b, backend):
    torch.testing.assert_close(a.double(), b.double(), atol=TOL[backend], rtol=TOL[backend])


# ------------------------------------------------------------------ sizes from tensors


def test_a_family_op_serves_every_length_and_checks_requires():
    fam = attndsl.compile("patterns/sliding.attn", "sliding_window", window=5)
    assert fam.sizes == ("N",) and "sizes from the tensors: N" in repr(fam)
    for n in (9, 64, 37):
        fixed = attndsl.compile("patterns/sliding.attn", "sliding_window", N=n, window=5)
        q, k, v = (rand(1, 2, n, 8, seed=s) for s in range(3))
        torch.testing.assert_close(fam(q, k, v, backend="cpu"), fixed(q, k, v, backend="cpu"))
        assert torch.equal(fam.mask(N=n), fixed.mask())
    assert fam.stats(N=100)["partial_blocks"] > 0
    na = attndsl.compile("patterns/neighborhood.attn", "na1d", kernel=9)
    with pytest.raises(attndsl.ConstraintError, match=r"got kernel=9, dilation=1, N=5"):
        na(rand(1, 1, 5, 4), rand(1, 1, 5, 4), rand(1, 1, 5, 4))
    with pytest.raises(attndsl.ParameterError, match="needs 'N'"):
        fam.mask()


def test_grid_layouts_and_flat_grids():
    na = attndsl.compile("patterns/neighborhood.attn", "na2d", kernel=3)
    q, k, v = (rand(2, 2, 6, 7, 8, seed=s) for s in range(3))
    out = na(q, k, v, backend="reference")
    assert out.shape == (2, 2, 6, 7, 8)
    flat = na(*(x.flatten(2, 3) for x in (q, k, v)), backend="reference", H=6, W=7)
    torch.testing.assert_close(out.flatten(2, 3), flat)
    with pytest.raises(InputError, match=r"takes H, W from the layout.*pass H=\.\.\., W="):
        na(*(x.flatten(2, 3) for x in (q, k, v)))
    fixed = attndsl.compile("patterns/neighborhood.attn", "na2d", H=6, W=7, kernel=3)
    torch.testing.assert_close(fixed(q, k, v, backend="reference"), out)


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_kernel_module_and_bounded_plans_over_many_lengths(backend):
    fam = attndsl.compile("patterns/power.attn", "power_attention", block=16)
    fam.options(block_q=16, block_k=16)
    modules = caches.KERNEL_MODULES.misses
    lengths = [16, 33, 48, 71] if backend == "triton" else [16 + 7 * i for i in range(40)]
    for n in lengths:
        q, k, v = (rand(1, 2, n, 16, dtype=DT[backend], seed=n + s) for s in range(3))
        close(fam(q, k, v, backend=backend), fam(q, k, v, backend="reference"), backend)
    if backend == "triton":
        assert caches.KERNEL_MODULES.misses - modules <= 1  # sizes are run-time arguments
        assert fam.stats(N=64)["kernel_sizes"] == "run time: N"
    info = attndsl.Op.cache_info()
    assert info["plans"] <= info["max_plans"] and info["kernels"] <= info["max_kernels"]


# ------------------------------------------------------------------ decoding


DECODE = [
    ("sliding.attn", "sliding_window", dict(window=6), {}),
    ("power.attn", "power_attention", dict(block=4, window=2), {}),
    ("document.attn", "document_causal", {}, {"doc": None}),
    ("neighborhood.attn", "na1d", dict(kernel=5, causal=True), {}),
    ("dhsa.attn", "dhsa_chunks", dict(block=4, chunk=4, topk=1), {}),
    ("moh.attn", "moh", dict(heads=2, shared=1, topk=1), {"router": None}),
    ("combiner.attn", "combiner_fixed", dict(span=4), {}),
]


def _inputs(spec, n, m=None, start=0):
    out = {}
    if "doc" in spec:
        out["doc"] = torch.arange(n) // 5
    if "router" in spec:
        out["router"] = rand(1, n, 1, seed=9)[:, start:start + (m or n)]
    return out


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("file,name,params,spec", DECODE, ids=[d[1] for d in DECODE])
def test_token_by_token_generation_equals_the_full_call(backend, file, name, params, spec):
    """Each step's output equals the last row of the full call over the cache so far; for
    causal patterns that is the full forward's row too."""
    op = attndsl.compile(f"patterns/{file}", name, **params)
    if backend == "triton":
        op.options(block_q=16, block_k=16)
    L, dt = (12 if backend == "triton" else 20), DT[backend]
    q, k, v = (rand(1, 2, L, 8, dtype=dt, seed=s) for s in range(3))
    full = op(q, k, v, backend=backend, **_inputs(spec, L))
    # moh attends every key; a dhsa block's selection reads the block's later queries
    causal = name not in ("moh", "dhsa_chunks")
    first = params.get("kernel", 1) - 1  # NATTEN needs kernel <= length: a prompt first
    steps = range(L - 4, L) if backend == "triton" else range(first, L)
    for t in steps:
        n = t + 1
        kc, vc = k[:, :, :n], v[:, :, :n]
        inputs = _inputs(spec, n)
        if "router" in spec:
            inputs["router"] = inputs["router"][:, t:n]
        got = op(q[:, :, t:n], kc, vc, backend=backend, q_start=t, queries=q[:, :, :n],
                 **inputs)
        want = op(q[:, :, :n], kc, vc, backend=backend, **_inputs(spec, n))[:, :, t:n]
        close(got, want, backend)
        if causal:
            close(got, full[:, :, t:n], backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("m", [7, 64])
def test_chunked_prefill_equals_the_full_forward(backend, m):
    op = attndsl.compile("patterns/sliding.attn", "sliding_window", window=9)
    n = 150 if backend != "triton" else 80
    q, k, v = (rand(2, 2, n, 8, dtype=DT[backend], seed=s) for s in range(3))
    full = op(q, k, v, backend=backend)
    for start in range(0, n, m):
        stop = min(n, start + m)
        got = op(q[:, :, start:stop], k[:, :, :stop], v[:, :, :stop], backend=backend,
                 q_start=start)
        close(got, full[:, :, start:stop], backend)


@pytest.mark.parametrize("n,start,m", [(600, 400, 20), (1000, 990, 10), (777, 700, 77)])
def test_a_few_rows_against_a_long_cache_gradients_on_the_cpu(n, start, m):
    """Rows that attend a few key blocks of many run in the CPU backend's compact key layout
    (only those blocks copied); outputs and gradients against the definition, dense."""
    op = attndsl.compile("patterns/sliding.attn", "sliding_window", window=32)
    q = rand(2, 3, m, 16, dtype=torch.float64, seed=0).requires_grad_()
    k, v = (rand(2, 3, n, 16, dtype=torch.float64, seed=s).requires_grad_() for s in (1, 2))
    out = op(q, k, v, backend="cpu", q_start=start)
    i, j = torch.arange(start, start + m)[:, None], torch.arange(n)[None, :]
    keep = (i - j >= 0) & (i - j < 32)
    ref = torch.softmax((q @ k.transpose(-1, -2) / 4.0).masked_fill(~keep, -torch.inf), -1) @ v
    g = rand(*ref.shape, dtype=torch.float64, seed=3)
    got = torch.autograd.grad((out * g).sum(), (q, k, v))
    want = torch.autograd.grad((ref * g).sum(), (q, k, v))
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    from attndsl.codegen.cpu.plan import cpu_plan
    from attndsl.codegen.plan.tables import plan_for
    cp = cpu_plan(plan_for(op.bind(N=n), 16, None, rows=(start, m)))
    assert cp.compact and cp.ktok.shape[0] < plan_for(op.bind(N=n), 16, None).nkb // 2


def test_decoding_one_token_at_a_million_plans_only_its_row():
    op = attndsl.compile("patterns/sliding.attn", "sliding_window", window=4096)
    bp = op.bind(N=1 << 20)
    from attndsl.codegen.plan.tables import plan_for
    plan = plan_for(bp, None, None, rows=((1 << 20) - 1, 1))
    stats = plan.stats()
    assert stats["needed_elements"] == 4096  # one query's keys, not N^2 anything
    assert stats["full_blocks"] + stats["partial_blocks"] <= 4096 // 64 + 1


def test_decoding_errors_are_clear():
    op = attndsl.compile("patterns/combiner.attn", "combiner_fixed", span=4)
    q, k, v = (rand(1, 1, 12, 8, seed=s) for s in range(3))
    with pytest.raises(InputError, match="pools queries"):
        op(q[:, :, 11:], k, v, q_start=11)
    with pytest.raises(InputError, match="past the 12 queries"):
        op(q[:, :, 10:], k, v, q_start=11)
    with pytest.raises(InputError, match="q_start must be a non-negative int"):
        op(q[:, :, 11:], k, v, q_start=-1)


# ------------------------------------------------------------------ padding


def padded_reference(q, k, v, valid, window):
    """Causal sliding window over the real keys only; a query with none gives 0."""
    n = q.shape[2]
    i = torch.arange(n)
    mask = (i[None, :] <= i[:, None]) & (i[:, None] - i[None, :] < window)
    mask = mask & valid[:, None, None, :]
    s = (q @ k.transpose(-1, -2)) / q.shape[-1] ** 0.5
    p = torch.softmax(s.masked_fill(~mask, float("-inf")), -1).nan_to_num(0.0)
    return p @ v


@pytest.mark.parametrize("backend", BACKENDS)
def test_key_padding_and_lengths(backend):
    op = attndsl.compile("patterns/sliding.attn", "sliding_window", window=20)
    n = 96
    q, k, v = (rand(3, 2, n, 8, dtype=DT[backend], seed=s).requires_grad_() for s in range(3))
    lengths = torch.tensor([96, 40, 3])
    valid = torch.arange(n)[None, :] < lengths[:, None]
    valid[0, :5] = False  # left padding too
    out = op(q, k, v, backend=backend, key_padding_mask=valid)
    want = padded_reference(q.double(), k.double(), v.double(), valid, 20)
    close(out, want, backend)
    out.sum().backward()
    assert torch.equal(q.grad[0, :, :5], torch.zeros_like(q.grad[0, :, :5]))  # no keys: 0
    right = op(q, k, v, backend=backend, lengths=lengths)
    valid[0, :5] = True
    close(right, padded_reference(q.double(), k.double(), v.double(), valid, 20), backend)
    with pytest.raises(InputError, match="key_padding_mask must have shape"):
        op(q, k, v, backend=backend, key_padding_mask=valid[:, :10])


def test_padding_drops_blocks_without_a_real_key_from_the_triton_tables():
    from attndsl.codegen.triton.runtime import _padded_tables, device_tables
    op = attndsl.compile("patterns/sliding.attn", "sliding_window", N=128, window=128)
    plan = op.options(block_q=16, block_k=16).plan()
    valid = torch.zeros(2, 128, dtype=torch.int8)
    valid[0, :40] = 1  # real keys in blocks 0..2 (block 2 half padding)
    valid[1] = 1
    part, full, _, _ = _padded_tables(plan, device_tables(plan, "cpu"), valid, plan.nkb)
    off, idx = part
    rows = plan.nqb
    b0 = idx[off[0]:off[rows]].long()
    b0_full = full[1][full[0][0]:full[0][rows]].long()
    assert set(b0.tolist()) | set(b0_full.tolist()) <= {0, 1, 2}
    assert 2 not in b0_full.tolist()  # padding makes the FULL block PARTIAL


# ------------------------------------------------------------------ dropout


def test_dropout_zero_reproducible_unbiased():
    op = attndsl.compile("patterns/sliding.attn", "sliding_window", N=32, window=8)
    q, k, v = (rand(1, 2, 32, 8, seed=s) for s in range(3))
    for backend in ("reference", "cpu"):
        base = op(q, k, v, backend=backend)
        torch.testing.assert_close(op(q, k, v, backend=backend, dropout_p=0.0), base)
        g = [torch.Generator().manual_seed(5) for _ in range(2)]
        a = op(q, k, v, backend=backend, dropout_p=0.3, generator=g[0])
        b = op(q, k, v, backend=backend, dropout_p=0.3, generator=g[1])
        assert torch.equal(a, b) and not torch.allclose(a, base)
        gen = torch.Generator().manual_seed(0)
        mean = sum(op(q, k, v, backend=backend, dropout_p=0.3, generator=gen)
                   for _ in range(600)) / 600
        assert (mean - base).abs().max() < 0.12  # unbiased: 1 / (1 - p) scaling
    c = op(q, k, v, backend="cpu", dropout_p=0.3, generator=torch.Generator().manual_seed(7))
    r = op(q, k, v, backend="reference", dropout_p=0.3,
           generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(c, r)  # one mask definition on every backend


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_dropout_gradcheck(backend):
    op = attndsl.compile("patterns/combiner.attn", "combiner_fixed", N=12, span=4)
    q, k, v = (rand(1, 1, 12, 4, seed=s).requires_grad_() for s in range(3))

    def f(q, k, v):
        return op(q, k, v, backend=backend, dropout_p=0.25,
                  generator=torch.Generator().manual_seed(3))
    assert torch.autograd.gradcheck(f, (q, k, v), atol=1e-7)


def test_dropout_on_triton_matches_the_reference():
    op = attndsl.compile("patterns/sliding.attn", "sliding_window", N=40, window=8)
    op.options(block_q=16, block_k=16)
    q, k, v = (rand(2, 2, 40, 8, dtype=torch.float32, seed=s).requires_grad_()
               for s in range(3))
    a = op(q, k, v, backend="triton", dropout_p=0.4, generator=torch.Generator().manual_seed(1))
    b = op(q.double(), k.double(), v.double(), backend="reference", dropout_p=0.4,
           generator=torch.Generator().manual_seed(1))
    close(a, b, "triton")
    ga = torch.autograd.grad(a.sum(), (q, k, v))
    qd, kd, vd = (x.detach().double().requires_grad_() for x in (q, k, v))
    b = op(qd, kd, vd, backend="reference", dropout_p=0.4,
           generator=torch.Generator().manual_seed(1))
    gb = torch.autograd.grad(b.sum(), (qd, kd, vd))
    for x, y in zip(ga, gb):
        close(x, y, "triton")


def test_bad_dropout_and_lengths_are_errors():
    op = attndsl.compile("patterns/sliding.attn", "sliding_window", N=8, window=2)
    q = rand(1, 1, 8, 4)
    with pytest.raises(InputError, match=r"dropout_p must be a number in \[0, 1\)"):
        op(q, q, q, dropout_p=1.0)
    with pytest.raises(InputError, match="lengths must be between 0 and the 8 keys"):
        op(q, q, q, lengths=torch.tensor([9]))
    with pytest.raises(InputError, match="pass key_padding_mask or lengths, not both"):
        op(q, q, q, lengths=torch.tensor([3]), key_padding_mask=torch.ones(1, 8, dtype=bool))


# ------------------------------------------------------------------ torch.compile


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_fullgraph_every_backend(backend):
    op = attndsl.compile("patterns/sliding.attn", "sliding_window", window=4)
    if backend == "triton":
        op.options(block_q=16, block_k=16)
    q = rand(1, 2, 24, 16, dtype=torch.float32).requires_grad_()

    def f(x):
        return op(x * 2, x, x, backend=backend, key_padding_mask=None).sum()

    eager = f(q)
    g_eager, = torch.autograd.grad(eager, q)
    compiled = torch.compile(f, fullgraph=True, backend="eager")
    out = compiled(q)
    g, = torch.autograd.grad(out, q)
    torch.testing.assert_close(out, eager, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(g, g_eager, atol=1e-5, rtol=1e-5)


def test_dynamic_shapes_compile_at_most_twice():
    op = attndsl.compile("patterns/sliding.attn", "sliding_window", window=4)
    count = []

    def backend(gm, example_inputs):
        count.append(1)
        return gm.forward

    @torch.compile(backend=backend, dynamic=True, fullgraph=True)
    def f(q, k, v):
        return op(q, k, v, backend="cpu") * 2

    for n in (17, 33, 64, 100):
        q, k, v = (rand(1, 2, n, 8, dtype=torch.float32, seed=s) for s in range(3))
        torch.testing.assert_close(f(q, k, v), op(q, k, v, backend="cpu") * 2)
    assert len(count) <= 2


def test_family_errors_name_the_sizes():
    op = attndsl.compile("patterns/sliding.attn", "sliding_window", window=4)
    with pytest.raises(AttnError, match="has no size 'M'"):
        attndsl.compile("patterns/sliding.attn", "sliding_window", N=8, window=4).bind(M=3)
    with pytest.raises(attndsl.ParameterError, match="needs 'N'"):
        op.stats()
