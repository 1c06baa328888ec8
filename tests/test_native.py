"""backend="cpu"'s native forward (codegen/cpu/flash.c) against the float64 reference and
against independent masks: every standard pattern it takes (head dims a multiple of 16),
bit masks and additive bias masks, GQA, batches, padding positions, empty rows, MoH gates,
masks built per call, half-precision inputs, the ATen fallback, and a failed build."""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest
import torch

import attndsl
from attndsl import caches
from attndsl.codegen.cpu import fused, native

sys.path.insert(0, os.path.dirname(__file__))
import independent  # noqa: E402
from test_cpu import STD, compare  # noqa: E402

pytestmark = pytest.mark.skipif(native.kernel() is None,
                                reason="no C compiler or no AVX2 + FMA on this machine")


@pytest.fixture
def calls(monkeypatch):
    """The native forward's calls (each test asserts the kernel really ran); the
    backward's go to calls.backward."""
    seen = _Calls()
    real_f, real_b = native.forward, native.backward

    def spy_f(args):
        seen.append(args.ntasks)
        real_f(args)

    def spy_b(args):
        seen.backward.append(args.f.ntasks)
        real_b(args)

    monkeypatch.setattr(native, "forward", spy_f)
    monkeypatch.setattr(native, "backward", spy_b)
    return seen


class _Calls(list):
    def __init__(self):
        super().__init__()
        self.backward = []


@pytest.mark.parametrize("file,pattern,params", STD,
                         ids=[f"{p}-{i}" for i, (_, p, _) in enumerate(STD)])
def test_standard_patterns_head_dim_32(file, pattern, params, calls):
    op = attndsl.compile(f"patterns/{file}", pattern, **params)
    bp = op.bound
    compare(op, dim=32, heads=4 if bp.heads in (None, 4) else bp.heads)
    mask_only = not (bp.content_dependent or bp.channel or bp.softcap is not None)
    if mask_only and not bp.summaries and not bp.average:
        assert calls and calls.backward, "the native kernels did not run"


def test_gqa_batches_head_dims_and_block_sizes(calls):
    op = attndsl.compile("patterns/sliding.attn", "sliding_window", N=150, window=33)
    for block in (16, 32, 64, 128, 256, None):
        compare(op, heads=4, kv_heads=2, dim=32, batch=2, block=block)
    compare(op, heads=6, kv_heads=1, dim=64, batch=3, block=64)
    compare(op, heads=2, dim=128, block=32)
    op = attndsl.compile("patterns/neighborhood.attn", "na2d", H=19, W=17, kernel=7)
    compare(op, heads=4, kv_heads=2, dim=48, batch=2, block=None)
    assert len(calls) >= 9 and len(calls.backward) == len(calls)


def test_unequal_query_and_key_blocks(calls):
    """Masks are kept keys-major (a row per key over the query block): query blocks longer
    and shorter than key blocks, and longer than a kernel sub-tile (64 rows, so a mask row
    is read from its middle), against an independent reference, gradients included."""
    op = attndsl.compile("patterns/sliding.attn", "sliding_window", N=300, window=45)
    for bq, bk in ((128, 16), (16, 64), (32, 128)):
        op.options(block_q=bq, block_k=bk)
        compare(op, heads=2, dim=32, block=None)
        assert op.plan("cpu").block_q == bq
    op = attndsl.compile("patterns/neighborhood.attn", "na2d", H=13, W=11, kernel=5)
    op.options(block_q=128, block_k=32)
    compare(op, heads=2, kv_heads=1, dim=16, block=None)
    assert len(calls) == 4 and len(calls.backward) == 4


def test_outputs_over_the_streaming_size(calls, monkeypatch):
    """Calls that write at least 8 MiB of rows (flash.c's STREAM) store o and dq around the
    caches (non-temporal stores, then a fence): dilated na2d, whose rows lie apart, against
    the reference, gradients included; the calls' sizes show the path really ran."""
    sizes = []
    fwd, bwd = native.forward, native.backward

    def spy_f(args):
        sizes.append(args.ntasks * args.bq * args.D * 4)
        fwd(args)

    def spy_b(args):
        sizes.append(args.f.ntasks * args.f.bq * args.f.D * 4)
        bwd(args)

    monkeypatch.setattr(native, "forward", spy_f)
    monkeypatch.setattr(native, "backward", spy_b)
    op = attndsl.compile("patterns/neighborhood.attn", "na2d", H=32, W=32, kernel=5,
                         dilation=2)
    compare(op, heads=4, dim=1024, block=None)
    assert len(sizes) == 2 and min(sizes) >= 8 << 20, sizes


def test_block_sizes_over_a_chunk_take_aten(calls):
    """Key blocks longer than flash.c's chunk (256 keys) keep ATen's kernel."""
    op = attndsl.compile("patterns/sliding.attn", "sliding_window", N=600, window=300)
    compare(op, dim=32, block=512)
    assert not calls


def test_large_windows_odd_lengths_against_independent_masks(calls):
    gen = torch.Generator().manual_seed(3)
    for n, window in ((1000, 200), (777, 64)):
        op = attndsl.compile("patterns/sliding.attn", "sliding_window", N=n, window=window)
        q, k, v = (torch.randn(2, 3, n, 64, generator=gen) for _ in range(3))
        out = op(q, k, v, backend="cpu")
        ref = independent.masked_attention(q.double(), k.double(), v.double(),
                                           independent.sliding_window(n, window))
        torch.testing.assert_close(out.double(), ref, atol=2e-6, rtol=1e-5)
    op = attndsl.compile("patterns/neighborhood.attn", "na2d", H=40, W=36, kernel=9)
    q, k, v = (torch.randn(1, 2, 1440, 32, generator=gen) for _ in range(3))
    ref = independent.masked_attention(q.double(), k.double(), v.double(),
                                       independent.na2d(40, 36, 9))
    torch.testing.assert_close(op(q, k, v, backend="cpu").double(), ref, atol=2e-6,
                               rtol=1e-5)
    assert len(calls) == 3


def test_large_scores_keep_their_digits(calls):
    """Scores in the hundreds with near ties: the softmax's exponent of (s - max) loses
    nothing to cancellation (forward and backward against float64)."""
    gen = torch.Generator().manual_seed(5)
    op = attndsl.compile("patterns/neighborhood.attn", "na2d", H=12, W=14, kernel=5)
    q, k, v = (torch.randn(1, 2, 168, 32, generator=gen, dtype=torch.float64)
               for _ in range(3))
    q = (q * 40).requires_grad_()
    k.requires_grad_()
    mask = independent.na2d(12, 14, 5)
    ref = independent.masked_attention(q, k, v, mask)
    out = op(q.float(), k.float(), v.float(), backend="cpu")
    assert ref.abs().max() > 0.5
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=1e-4)
    qf, kf = q.detach().float().requires_grad_(), k.detach().float().requires_grad_()
    got = torch.autograd.grad(op(qf, kf, v.float(), backend="cpu").sum(), (qf, kf))
    want = torch.autograd.grad(ref.sum(), (q, k))
    for a, b in zip(got, want):
        torch.testing.assert_close(a.double(), b, atol=1e-3, rtol=1e-3)
    assert calls and calls.backward


def test_empty_rows_are_exact_zeros_with_zero_gradients(calls):
    op = attndsl.compile("pattern gaps(N: int) { space seq(N) attend k <= q and q % 3 != 0 }",
                         N=70)
    out = compare(op, dim=32, block=16)
    assert (out[..., ::3, :] == 0).all()
    q, k, v = (torch.randn(1, 2, 70, 32, requires_grad=True) for _ in range(3))
    (g,) = torch.autograd.grad(op(q, k, v, backend="cpu").sum(), q)
    assert (g[..., ::3, :] == 0).all()
    op = attndsl.compile("pattern none(N: int) { space seq(N) attend false }", N=20)
    assert (compare(op, dim=16) == 0).all()


def test_outputs_left_unwritten_are_zeroed(monkeypatch, calls):
    """Outputs start uninitialised only where flash.c writes every row: with every fresh
    tensor NaN, whole query blocks without keys, MoH gates and a row subset still give
    exact zeros (and finite gradients) there, and covered patterns stay exact."""
    real_empty = torch.empty

    def nan_empty(*shape, **kw):
        t = real_empty(*shape, **kw)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", nan_empty)
    late = attndsl.compile("pattern late(N: int) { space seq(N) attend k <= q and q >= 40 }",
                           N=100)
    out = compare(late, dim=32, block=16)
    assert (out[..., :40, :] == 0).all()
    compare(attndsl.compile("patterns/neighborhood.attn", "na2d", H=12, W=10, kernel=5),
            dim=32, heads=4, kv_heads=2, batch=2, block=16)
    moh = attndsl.compile("patterns/moh.attn", "moh", N=48, heads=4, shared=1, topk=1)
    router = torch.randn(2, 48, 3)
    router[1, :, 0] = 50.0
    out = compare(moh, heads=4, batch=2, dim=32, inputs={"router": router})
    assert (out[1, 2:] == 0).all()
    sw = attndsl.compile("patterns/sliding.attn", "sliding_window", N=96, window=16)
    sw.options(block_q=16, block_k=16)
    q, k, v = (torch.randn(1, 2, 96, 32, requires_grad=True) for _ in range(3))
    for start in (50, 88):  # 88: the keys of two blocks only, held compact
        rows = sw(q[:, :, start:], k, v, backend="cpu", q_start=start)
        full = sw(q, k, v, backend="cpu")[:, :, start:]
        torch.testing.assert_close(rows, full)
        g = torch.randn(rows.shape)
        got = torch.autograd.grad(rows, (k, v), g)
        want = torch.autograd.grad(full, (k, v), g)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b)
            assert (a[:, :, :start - 16] == 0).all()
    assert len(calls) >= 6 and calls.backward


def test_bias_masks_are_added_as_floats(calls):
    op = attndsl.compile("patterns/llm.attn", "alibi", N=90, heads=4)
    compare(op, heads=4, dim=32, block=16)
    src = """
    pattern b(N: int) {
        space seq(N)
        heads 4
        attend k <= q and q - k < 40
        bias 0.05 * float(q - k) - float(h) * 0.3
    }"""
    compare(attndsl.compile(src, N=100), heads=4, kv_heads=2, dim=32, block=32)
    assert len(calls) >= 2


def test_masks_built_per_call(monkeypatch, calls):
    monkeypatch.setattr(fused, "_masked", lambda cp, grp, t, head, dtype, budget:
                        fused._per_row(cp, grp, t, head, dtype, [0]))  # every mask lazy
    monkeypatch.setattr(fused, "NATIVE_MASK", 16 * 16 * 3)
    caches.CPU_FUSED.clear()
    op = attndsl.compile("patterns/neighborhood.attn", "na2d", H=13, W=11, kernel=5)
    compare(op, heads=4, kv_heads=2, dim=32, block=16)
    caches.CPU_FUSED.clear()
    assert len(calls) > 2  # one call per few rows' masks


def test_moh_gates_skip_blocks(calls):
    op = attndsl.compile("patterns/moh.attn", "moh", N=48, heads=4, shared=1, topk=1)
    router = torch.randn(2, 48, 3)
    router[:, :32, 2] = -50.0
    router[1, :, 0] = 50.0
    out = compare(op, heads=4, batch=2, dim=32, inputs={"router": router})
    assert (out[:, 3, :32] == 0).all() and (out[1, 2:] == 0).all()
    assert calls


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs(dtype, calls):
    op = attndsl.compile("patterns/neighborhood.attn", "na2d", H=9, W=10, kernel=3)
    compare(op, dtype=dtype, dim=32)
    assert calls


def test_disabled_and_failed_builds_keep_aten(monkeypatch, tmp_path):
    op = attndsl.compile("patterns/sliding.attn", "sliding_window", N=100, window=20)
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 100, 32, generator=gen) for _ in range(3))
    want = op(q, k, v, backend="cpu")
    monkeypatch.setattr(native, "_STATE", {})
    monkeypatch.setenv("ATTNDSL_NATIVE", "0")
    assert native.kernel() is None
    torch.testing.assert_close(op(q, k, v, backend="cpu"), want, atol=1e-6, rtol=1e-5)
    monkeypatch.setattr(native, "_STATE", {})
    monkeypatch.delenv("ATTNDSL_NATIVE")
    monkeypatch.setenv("ATTNDSL_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", "false")  # a compiler that fails
    with pytest.warns(RuntimeWarning, match="native CPU kernel could not be built"):
        assert native.kernel() is None
    assert native.kernel() is None  # reported once
    torch.testing.assert_close(op(q, k, v, backend="cpu"), want, atol=1e-6, rtol=1e-5)
    assert not list(tmp_path.glob("*.so")) and not list(tmp_path.glob("tmp*"))


def test_a_compiler_without_openmp_builds_the_pthread_pool(monkeypatch, tmp_path):
    """Where -fopenmp fails (a clang without libomp), flash.c is built without it and runs
    its own threads: same results, on more than one thread."""
    op = attndsl.compile("patterns/neighborhood.attn", "na2d", H=12, W=12, kernel=5)
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, 144, 32, generator=gen, requires_grad=True)
               for _ in range(3))
    want = op(q, k, v, backend="cpu")
    want_g = torch.autograd.grad(want.sum(), (q, k, v))
    monkeypatch.setattr(native, "_STATE", {})
    monkeypatch.setenv("ATTNDSL_CACHE", str(tmp_path))
    monkeypatch.setattr(native, "OPENMP", ("-fno-such-option-attndsl",))
    lib = native.kernel()
    assert lib is not None and not hasattr(lib, "GOMP_parallel")
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        got = op(q, k, v, backend="cpu")
        got_g = torch.autograd.grad(got.sum(), (q, k, v))
    finally:
        torch.set_num_threads(threads)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    for a, b in zip(got_g, want_g):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_calls_run_the_blocks_the_planner_chooses(calls):
    """A whole-length call plans with the CPU planner's block sizes (it once got 64 x 64
    whatever the planner chose: plan_for skipped the choice when given the call's rows)."""
    from attndsl.codegen.plan.tables import blocks_for
    op = attndsl.compile("patterns/neighborhood.attn", "na2d", H=24, W=24, kernel=7)
    want = blocks_for(op.bound, "cpu")
    assert want == (16, 16)
    caches.CPU_PLANS.clear()
    q = torch.randn(1, 2, 576, 32)
    out = op(q, q, q, backend="cpu")
    (used,) = [(p.plan.block_q, p.plan.block_k) for p in caches.CPU_PLANS.values()]
    assert used == want and out.shape == q.shape and calls


def test_tasks_run_query_blocks_in_order_per_pair_and_head(calls):
    """A thread runs consecutive tasks: they go by (batch and kv head, query head, query
    block), so neighbouring query blocks, which share key blocks, follow each other (the
    planner's units group far-apart blocks), every block of every head exactly once."""
    op = attndsl.compile("patterns/neighborhood.attn", "na2d", H=24, W=24, kernel=5,
                         dilation=2)
    caches.NATIVE_TASKS.clear()
    q = torch.randn(2, 4, 576, 16)
    op(q, q[:, :2], q[:, :2], backend="cpu")
    (entry,) = caches.NATIVE_TASKS.values()
    t = entry[0]
    key = [(int(g), int(r), int(qb)) for g, qb, r in t[:, :3]]
    assert key == sorted(key) and len(set(key)) == len(key) == 2 * 2 * 2 * 36 and calls


def test_an_output_edited_in_place_is_caught(calls):
    """The native backward reads the forward's output: editing it in place is an error,
    never a silently wrong gradient."""
    op = attndsl.compile("patterns/sliding.attn", "sliding_window", N=64, window=9)
    q = torch.randn(1, 2, 64, 16, requires_grad=True)
    out = op(q, q, q, backend="cpu")
    out.mul_(2.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()
    assert calls


def test_reproducible_across_calls_and_python_threads(calls):
    """Output and dQ are bitwise the same from call to call, also with calls running at
    once on several Python threads; on one torch thread dK and dV are too."""
    import threading
    op = attndsl.compile("patterns/neighborhood.attn", "na2d", H=24, W=24, kernel=7)
    gen = torch.Generator().manual_seed(2)
    xs = [tuple(torch.randn(1, 2, 576, 32, generator=gen, requires_grad=True)
                for _ in range(3)) for _ in range(3)]

    def call(i):
        q, k, v = xs[i]
        o = op(q, k, v, backend="cpu")
        return (o.detach(), *torch.autograd.grad(o.sum(), (q, k, v)))

    want = [call(i) for i in range(3)]
    got: list = [None] * 3
    ts = [threading.Thread(target=lambda i=i: got.__setitem__(i, call(i))) for i in range(3)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    for w, g in zip(want, got):
        assert torch.equal(w[0], g[0]) and torch.equal(w[1], g[1])
        for a, b in zip(w[2:], g[2:]):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        one = [call(0), call(0)]
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(*one))
    assert calls and calls.backward


def _native_elements(op, mask) -> int:
    """The elements flash.c's kernels should compute, from the plan's tables and orders and
    an independent mask [Nq, Nk]: per query block of 16 rows (one chunk: at most 16 key
    blocks), 16 x its keys that some valid query of the block attends where at least one
    key in 8 is dead, else 16 x all its keys."""
    plan = op.plan("cpu")
    bq, bk, t = plan.block_q, plan.block_k, plan.tables[0]
    assert bq == bk == 16 and len(plan.tables) == 1
    qp = np.full(plan.nqb * bq, -1)
    qp[:len(plan.qorder.perm)] = plan.qorder.perm
    kp = np.full(plan.nkb * bk, -1)
    kp[:len(plan.korder.perm)] = plan.korder.perm
    total = 0
    for r in range(plan.nqb):
        blocks = np.concatenate([t.full_idx[t.full_off[r]:t.full_off[r + 1]],
                                 t.part_idx[t.part_off[r]:t.part_off[r + 1]]])
        if not len(blocks):
            continue
        assert len(blocks) <= 16
        qs = qp[r * bq:(r + 1) * bq]
        ks = np.concatenate([kp[b * bk:(b + 1) * bk] for b in blocks])
        sub = mask[qs[qs >= 0]][:, np.where(ks >= 0, ks, 0)] & (ks >= 0)
        w, live = len(ks), int(sub.any(axis=0).sum())
        total += bq * (live if (w - live) * 8 >= w else w)
    return total


def test_keys_no_query_attends_leave_the_kernels(calls):
    """In 16-query tiles with bit masks, keys that no query of the tile attends leave their
    chunk in the forward and the backward (flash.c's live_keys, where at least one key in 8
    is dead): here the dilated na2d computes 42% fewer elements (29% at 128 x 128), as the
    kernel counts them (op.stats' native_elements, checked against a count from an
    independent mask); its outputs and gradients stay exact."""
    op = attndsl.compile("patterns/neighborhood.attn", "na2d", H=72, W=68, kernel=7,
                         dilation=4)
    op.options(block_q=16, block_k=16)
    mask = independent.na2d(72, 68, 7, 4)
    st = op.stats("cpu")
    fe = st["native_elements"]
    assert fe == _native_elements(op, mask)
    assert st["needed_elements"] < fe < 0.6 * st["computed_elements"], st
    compare(op, heads=1, dim=16, block=None)  # gradients too (against the reference)
    gen = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 2, 72 * 68, 32, generator=gen, dtype=torch.float64)
               for _ in range(3))
    ref = independent.masked_attention(q, k, v, mask)
    out = op(*(x.float() for x in (q, k, v)), backend="cpu")
    torch.testing.assert_close(out.double(), ref, atol=2e-6, rtol=1e-5)
    # a pattern whose tiles attend every key of their blocks computes them all
    op = attndsl.compile("patterns/sliding.attn", "sliding_window", N=300, window=45)
    st = op.stats("cpu")
    assert st["native_elements"] == st["computed_elements"]
    assert len(calls) == 2 and calls.backward
