"""Run-time inputs never leak into compile-time state: every cache stays within its declared
bound over many calls with changing inputs, memory stays flat, and two threads calling one
op with different inputs each get their own, correct result."""

from __future__ import annotations

import os
import resource
import threading

import pytest
import torch

import attndsl
from attndsl import caches

N = 256


def rss_bytes() -> int:
    """The process's resident set size now (Linux), else its peak."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # pragma: no cover - not Linux
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def random_docs(gen, n=N, most=8) -> torch.Tensor:
    return torch.sort(torch.randint(0, most, (n,), generator=gen)).values


def reference(doc, q, k, v):
    """document_causal from its definition: causal, within one document."""
    i = torch.arange(len(doc))
    mask = (i[None, :] <= i[:, None]) & (doc[None, :] == doc[:, None])
    s = (q @ k.transpose(-1, -2)) / q.shape[-1] ** 0.5
    return torch.softmax(s.masked_fill(~mask, float("-inf")), -1) @ v


def assert_bounded():
    for c in caches.CACHES:
        assert len(c) <= c.maxsize, f"cache '{c.name}' holds {len(c)} > {c.maxsize}"


def test_a_thousand_calls_with_new_document_ids_stay_bounded():
    op = attndsl.compile("patterns/document.attn", "document_causal", N=N)
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, N, 16, generator=gen) for _ in range(3))
    for _ in range(20):  # warm-up: allocator pools, the plan cache filled to its bound
        op(q, k, v, backend="cpu", doc=random_docs(gen))
    before = rss_bytes()
    plans_before = caches.PLANS.misses
    for i in range(1000):
        doc = random_docs(gen)
        out = op(q, k, v, backend="cpu", doc=doc)
        if i % 100 == 0:
            torch.testing.assert_close(out, reference(doc, q, k, v), atol=1e-5, rtol=1e-5)
            assert_bounded()
    assert caches.PLANS.misses - plans_before >= 1000  # every call planned its own tables
    assert_bounded()
    growth = rss_bytes() - before
    assert growth < 50 * 2**20, f"memory grew by {growth / 2**20:.1f} MiB"


def test_triton_calls_with_new_document_ids_stay_bounded():
    pytest.importorskip("triton")
    op = attndsl.compile("patterns/document.attn", "document_causal", N=64)
    op.options(block_q=16, block_k=16)
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 1, 64, 16, generator=gen) for _ in range(3))
    kernels = caches.KERNELS.misses
    for _ in range(caches.DEVICE_TABLES.maxsize + 4):
        doc = random_docs(gen, 64, 4)
        out = op(q, k, v, backend="triton", doc=doc)
        torch.testing.assert_close(out, reference(doc, q, k, v), atol=1e-4, rtol=1e-4)
    assert caches.KERNELS.misses - kernels <= 1  # one kernel serves every document layout
    assert_bounded()


def test_two_threads_with_different_inputs_get_their_own_results():
    op = attndsl.compile("patterns/document.attn", "document_causal", N=N)
    gen = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, 2, N, 16, generator=gen) for _ in range(3))
    docs = [random_docs(gen) for _ in range(2)]
    want = [reference(d, q, k, v) for d in docs]
    errors = []

    def work(j):
        for _ in range(40):
            for backend in ("cpu", "reference"):
                got = op(q, k, v, backend=backend, doc=docs[j])
                if not torch.allclose(got, want[j], atol=1e-5, rtol=1e-5):
                    errors.append((j, backend))

    threads = [threading.Thread(target=work, args=(j,)) for j in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, f"{len(errors)} wrong results, e.g. {errors[:3]}"


def test_cache_info_reports_every_cache():
    info = attndsl.Op.cache_info()
    assert {"plans", "max_plans", "kernels", "max_kernels", "hits", "misses"} <= set(info)
    assert info["plans"] <= info["max_plans"] and info["kernels"] <= info["max_kernels"]
    assert set(info["caches"]) == {c.name for c in caches.CACHES}
    assert all({"size", "maxsize", "hits", "misses"} <= set(v)
               for v in info["caches"].values())
