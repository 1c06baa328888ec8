"""Context parallelism (attndsl.distributed): gloo process groups of 2 and 4 CPU processes
against single-process references written in the tests (tests/cp_worker.py runs the ranks),
the bytes handed to the collectives against cp.stats(), the dispatches' invariants, restricted
plans, cp-plan and the errors."""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import attndsl
from attndsl import caches
from attndsl.cli import main
from attndsl.codegen.plan.tables import plan_for, restrict
from attndsl.distributed import dispatch as dsp
from attndsl.distributed.plan import problem
from attndsl.errors import AttnError, ParameterError, UnsupportedError
from attndsl.semantics.attention import Call, merge, scale_of
from attndsl.semantics.inputs import validate

sys.path.insert(0, os.path.dirname(__file__))
import cp_worker  # noqa: E402
import independent as ind  # noqa: E402

FP64 = ["sliding_window", "power_attention", "na2d", "document_causal", "per_head",
        "combiner_fixed", "combiner_logsparse", "combiner_mixture", "aggregated",
        "combiner_axial", "transnext"]
TOL = {"fp32": 5e-6, "bf16": 6e-2}


@pytest.fixture(scope="module")
def two():
    return cp_worker.run(2, FP64 + ["fp32", "bf16", "window_bound"])


@pytest.fixture(scope="module")
def four():
    return cp_worker.run(4, FP64 + ["window_bound"])


def _check_case(name, results):
    tol = TOL.get(name, 1e-12)
    for rank, res in enumerate(results):
        for key in ("out", "dq", "dk", "dv", "unshard"):
            assert res[key] < tol, (name, rank, key, res[key])
        st_, sent = res["stats"], res["sent"]
        # the payload handed to the collectives is what stats() says
        assert sent["forward/exchange"] == st_["kv_bytes_sent"] == st_["kv_bytes_moved"]
        assert sent["backward/exchange"] == st_["grad_bytes_sent"] == st_["grad_bytes_moved"]
        assert st_["grad_bytes_received"] == st_["kv_bytes_sent"]
        assert st_["kv_bytes_received"] <= st_["allgather_kv_bytes"]
        if "attended_blocks" in res:  # 1D: exactly the remote blocks attended, once each
            assert sorted(res["received"]) == res["attended_blocks"]
        if "attended" in res:
            assert set(res["attended"]) <= set(res["received"])
        assert len(set(res["received"])) == len(res["received"])
    stats = [r["stats"] for r in results]
    assert sum(s["kv_bytes_sent"] for s in stats) == sum(s["kv_bytes_received"] for s in stats)
    every = np.concatenate([r["tokens"] for r in results])  # each token on exactly one rank
    assert sorted(every.tolist()) == list(range(results[0]["n"]))
    held = [s["tokens"] for s in stats]
    assert max(held) - min(held) <= cp_worker.BLOCK


@pytest.mark.parametrize("name", FP64 + ["fp32", "bf16"])
def test_two_ranks_equal_the_single_process_reference(two, name):
    _check_case(name, two[name])


@pytest.mark.parametrize("name", FP64)
def test_four_ranks_equal_the_single_process_reference(four, name):
    _check_case(name, four[name])


def test_documents_cross_the_rank_boundaries(four):
    doc = cp_worker._doc().numpy()
    ranks_of = [{r for r, res in enumerate(four["document_causal"])
                 if np.isin(np.nonzero(doc == d)[0], res["tokens"]).any()}
                for d in range(doc.max() + 1)]
    assert max(len(s) for s in ranks_of) > 1
    assert sum(r["stats"]["kv_bytes_received"] for r in four["document_causal"]) > 0


def test_sliding_window_traffic_is_bounded_independently_of_n(two, four):
    w, block = 24, cp_worker.BLOCK
    for res in two["window_bound"] + four["window_bound"]:
        assert res["512"] == res["1024"]
        assert 0 < res["512"] <= 2 * (w + block)


def test_summary_tokens_move_only_to_the_ranks_that_attend_them(two, four):
    # the rows handed to the collectives are what stats() counts, and for Combiner-
    # Logsparse what the paper's regions need: each owner's partial pools go to the
    # region's users (and, for the pooled query, to its other owners) only
    for res in (two["combiner_fixed"] + four["combiner_fixed"] + four["combiner_mixture"]
                + two["aggregated"] + four["combiner_axial"] + four["transnext"]):
        assert res["sent"]["forward/summary"] == res["stats"]["summary_bytes"]
    for results in (two["combiner_logsparse"], four["combiner_logsparse"],
                    two["combiner_axial"], four["combiner_axial"]):
        for res in results:
            assert res["sent"]["forward/summary"] == res["stats"]["summary_bytes"]
            assert res["stats"]["summary_bytes"] == res["summary_expected"]
        assert sum(r["stats"]["summary_bytes"] for r in results) > 0
    for res in two["transnext"] + four["transnext"]:  # given keys and values never move
        assert res["stats"]["summary_bytes"] == 0
    # cp-plan's count from the tables alone is the runtime's, rank by rank
    from attndsl.distributed.plan import summary_traffic
    for name in ("combiner_fixed", "combiner_logsparse", "combiner_mixture", "aggregated"):
        src, pattern, params = cp_worker.cases()[name][:3]
        op = attndsl.compile(f"patterns/{src}", pattern, **params)
        prob = problem(op.bound, cp_worker.BLOCK, cp_worker.BLOCK, validate(op.bound, {}))
        for results in (two[name], four[name]):
            ranks = len(results)
            sent, recv = summary_traffic(prob, prob.layout(ranks, "balanced").owner, ranks,
                                         8, 8)
            assert sent.sum() == recv.sum()
            # batch 2 x 2 query heads x float64
            assert [r["stats"]["summary_bytes"] for r in results] == (sent * 32).tolist()
    # an all-gather of every region's partial pools would send (ranks - 1) x 127 regions
    # x (key, query, output, log-sum-exp) rows
    gathered = 3 * 127 * 2 * 2 * 8 * (8 + 8 + 8 + 1)
    assert max(r["stats"]["summary_bytes"] for r in four["combiner_logsparse"]) < gathered / 4


# -- single-process pieces ---------------------------------------------------------------


def _cost_layout(cost, ranks, how):
    owner = dsp.assign(np.asarray(cost), ranks, how)
    counts = np.bincount(owner, minlength=ranks)
    return owner, counts


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(0, 1000), min_size=1, max_size=80), st.integers(1, 9),
       st.sampled_from(dsp.DISPATCHES))
def test_every_dispatch_gives_every_rank_floor_or_ceil_blocks(cost, ranks, how):
    if len(cost) < ranks:
        with pytest.raises(UnsupportedError, match="cannot be shared by"):
            dsp.assign(np.asarray(cost), ranks, how)
        return
    owner, counts = _cost_layout(cost, ranks, how)
    assert counts.min() >= len(cost) // ranks and counts.max() <= -(-len(cost) // ranks)
    if how == "balanced":  # never worse than contiguous shards beyond the slack
        cont = np.bincount(dsp.assign(np.asarray(cost), ranks, "contiguous"),
                           weights=np.asarray(cost, float), minlength=ranks).max()
        mine = np.bincount(owner, weights=np.asarray(cost, float), minlength=ranks).max()
        assert mine <= cont * (1 + dsp.BALANCE_SLACK) + 1e-9


def test_balanced_gives_a_sliding_window_contiguous_shards():
    op = attndsl.compile("sliding.attn", pattern="sliding_window", N=4096, window=128,
                         causal=False).options(block_q=64, block_k=64)
    prob = problem(op.bound, 64, 64, validate(op.bound, {}, for_mask=True))
    lay = prob.layout(8, "balanced")
    assert (np.diff(lay.owner) >= 0).all()
    assert lay.received().max() <= 2 * (128 + 64)


def test_balanced_evens_out_a_causal_mask_better_than_contiguous():
    op = attndsl.compile("document.attn", pattern="prefix_lm", N=2048)
    run = validate(op.bound, {"prefix": 256}, for_mask=True)
    prob = problem(op.bound, 64, 64, run)
    bal, cont = prob.layout(4, "balanced").pairs(), prob.layout(4, "contiguous").pairs()
    assert bal.sum() == cont.sum() == int(ind.prefix_lm(2048, 256).sum())
    assert bal.max() < 0.8 * cont.max()


@pytest.mark.parametrize("backend", ["cpu", "reference", "triton"])
def test_restricted_plans_merge_into_the_whole_attention(backend):
    """A query block subset against two key block subsets (compact token orders), merged
    through the log-sum-exp, is the whole attention of those queries: outputs and
    gradients, on every core that runs plans."""
    from attndsl.api import core_for
    if backend == "triton":
        pytest.importorskip("triton")
    dtype = torch.float32 if backend == "triton" else torch.float64
    tol = 2e-5 if backend == "triton" else 1e-12
    op = attndsl.compile("power.attn", pattern="power_attention", N=200, block=16, window=2,
                         sink=1)
    bp = op.bound
    plan = plan_for(bp, 16, 16, validate(bp, {}, for_mask=True))
    qb, ka, kb = [1, 4, 7, 12], [0, 4, 5, 12], [1, 2, 3, 6, 7, 8, 9, 10, 11]
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 200, 8, generator=g, dtype=torch.float64).requires_grad_()
               for _ in "qkv")

    def rows(blocks):
        return torch.cat([torch.arange(b * 16, min(200, b * 16 + 16)) for b in blocks])
    go = torch.randn(1, 2, len(rows(qb)), 8, generator=g, dtype=torch.float64)
    ref = ind.masked_attention(q, k, v, torch.from_numpy(ind.power_attention(200, 16, 2, 1)))
    want = torch.autograd.grad((ref[:, :, rows(qb)] * go).sum(), (q, k, v))
    core = core_for(backend, bp, q.to(dtype))
    parts = []
    for keys in (ka, kb):
        sub = restrict(plan, qb, keys)
        call = Call(bp, q[:, :, rows(qb)].to(dtype), k[:, :, rows(keys)].to(dtype),
                    v[:, :, rows(keys)].to(dtype), validate(bp, {}), scale_of(bp, q, None),
                    None, True, 16, 16, plan=sub)
        parts.append(core.direct(call))
    out = merge(*parts[0], *parts[1])
    assert (out.double() - ref[:, :, rows(qb)]).abs().max() < tol
    got = torch.autograd.grad((out.double() * go).sum(), (q, k, v))
    for name, a, b in zip("qkv", got, want):
        assert (a - b).abs().max() < tol, name


def test_restrict_rejects_bad_block_ids():
    op = attndsl.compile("sliding.attn", pattern="sliding_window", N=64, window=8)
    plan = plan_for(op.bound, 16, 16, validate(op.bound, {}, for_mask=True))
    with pytest.raises(ParameterError, match="key blocks must be distinct block ids below 4"):
        restrict(plan, [0], [1, 1])


def test_context_parallel_needs_an_initialised_group():
    from attndsl.distributed import ContextParallel
    op = attndsl.compile("sliding.attn", pattern="sliding_window", N=64, window=8)
    with pytest.raises(UnsupportedError, match="needs torch.distributed initialised"):
        ContextParallel(op)


def test_one_rank_group_in_process(tmp_path):
    """A one-process gloo group: no exchange, the plain attention, errors located."""
    import torch.distributed as dist

    from attndsl.distributed import ContextParallel
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "s"), 1), rank=0,
                            world_size=1)
    try:
        op = attndsl.compile("sliding.attn", pattern="sliding_window", N=50, window=7)
        with pytest.raises(ParameterError, match="dispatch must be one of"):
            ContextParallel(op, dispatch="zigzg")
        cp = ContextParallel(op)
        g = torch.Generator().manual_seed(1)
        q, k, v = (torch.randn(1, 2, 50, 4, generator=g, dtype=torch.float64) for _ in "qkv")
        out = cp(cp.shard(q), cp.shard(k), cp.shard(v))
        ref = ind.masked_attention(q, k, v, torch.from_numpy(ind.sliding_window(50, 7)))
        assert torch.allclose(cp.unshard(out), ref, atol=1e-12)
        s = cp.stats()
        assert s["kv_bytes_received"] == s["kv_bytes_sent"] == 0 and s["tokens"] == 50
        with pytest.raises(AttnError, match="rank 0 holds 50 tokens"):
            cp(q[:, :, :40], k[:, :, :40], v[:, :, :40])
        with pytest.raises(AttnError, match="has 40 tokens on axis -2, not 50"):
            cp.shard(q[:, :, :40])
        # new document ids per call: the layouts and rank plans stay bounded
        docs = attndsl.compile("document.attn", pattern="document_causal", N=48)
        cpd = ContextParallel(docs)
        x = torch.randn(1, 1, 48, 4, dtype=torch.float64)
        for i in range(24):
            doc = torch.repeat_interleave(torch.arange(2), torch.tensor([1 + i, 47 - i]))
            xl = cpd.shard(x, doc=doc)
            out = cpd.unshard(cpd(xl, xl, xl, doc=doc), doc=doc)
            ref = ind.masked_attention(x, x, x, torch.from_numpy(
                ind.document_causal(48, doc.tolist())))
            assert torch.allclose(out, ref, atol=1e-12)
        for c in caches.CACHES:
            assert len(c) <= c.maxsize, c.name
        dyn = attndsl.compile("dhsa.attn", pattern="dhsa", N=256)
        with pytest.raises(UnsupportedError, match="chooses its keys from q and k"):
            ContextParallel(dyn)
    finally:
        dist.destroy_process_group()


# -- cp-plan -------------------------------------------------------------------------------


def test_cp_plan_json_rows(capsys):
    rc = main(["cp-plan", "patterns/sliding.attn", "-p", "sliding_window", "--set", "N=8192",
               "--set", "window=256", "--ranks", "8", "--json"])
    assert rc == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["scheme"] for r in rows] == ["balanced", "contiguous", "zigzag", "ring",
                                            "allgather", "ulysses"]
    for r in rows:
        for key in ("max_pairs", "mean_pairs", "max_kv_bytes", "mean_kv_bytes"):
            assert key in r
    by = {r["scheme"]: r for r in rows}
    kv = 2 * 8 * 128 * 2  # default geometry: 8 K/V heads, dim 128, bf16, K and V
    assert by["ring"]["max_kv_bytes"] == (8192 - 1024) * kv
    # a causal window of 256 tokens: the previous rank's last 256 keys, block-rounded
    assert by["balanced"]["max_kv_bytes"] <= (256 + 64) * kv
    assert by["balanced"]["mean_pairs"] == int(ind.sliding_window(8192, 256).sum()) / 8


def test_cp_plan_text_and_errors(capsys):
    assert main(["cp-plan", "patterns/power.attn", "-p", "power_attention", "--set", "N=4096",
                 "--ranks", "4"]) == 0
    out = capsys.readouterr().out
    assert "power_attention" in out and "ring" in out and "vs ring" in out
    assert main(["cp-plan", "patterns/sliding.attn", "-p", "sliding_window", "--set",
                 "N=256", "--set", "window=8", "--ranks", "8", "--block", "64"]) == 1
    assert "4 blocks cannot be shared by 8 ranks" in capsys.readouterr().err
    assert main(["cp-plan", "--ranks", "4"]) == 1
    assert "cp-plan needs a FILE" in capsys.readouterr().err
    assert main(["cp-plan", "patterns/combiner.attn", "-p", "combiner_axial", "--set", "H=16",
                 "--set", "W=16", "--ranks", "2"]) == 1
    assert "cp-plan does not count its traffic" in capsys.readouterr().err


def test_context_parallelism_plans_one_token_order_for_queries_and_keys():
    # na2d's CPU/auto planner starts key tiles half a tile early (an order of its own);
    # sharding needs one order, so context parallelism plans with order="same"
    op = attndsl.compile("patterns/neighborhood.attn", "na2d", H=96, W=96, kernel=7)
    auto = plan_for(op.bound, 64, 64, validate(op.bound, {}, for_mask=True))
    assert not np.array_equal(auto.qorder.perm, auto.korder.perm)
    prob = problem(op.bound, 64, 64, validate(op.bound, {}, for_mask=True))
    plan = prob.parts[0][1]
    assert np.array_equal(plan.qorder.perm, plan.korder.perm) and len(plan.qorder.tile) == 2
    assert plan.needed() == int(ind.na2d(96, 96, 7).sum())
    with pytest.raises(ParameterError, match="order 'same' needs one block size"):
        plan_for(op.bound, 64, 16, validate(op.bound, {}, for_mask=True), order="same")


def test_cp_plan_library_takes_larger_blocks_past_the_pair_limit(monkeypatch):
    from attndsl.codegen.plan import tables
    from attndsl.distributed import report
    monkeypatch.setattr(tables, "PAIR_LIMIT", 2000)  # 64-token blocks of 4,096: 2,080 pairs
    monkeypatch.setattr(report, "PAIR_LIMIT", 2000)
    rows = report.library_rows(4096, 4, report.geometry(), only={"moh"})
    assert rows[0]["scheme"] == "balanced" and rows[0]["block"] == 256
    assert "64-token blocks would list more than 2,000 block pairs" in report.table(rows)
    rows = report.library_rows(4096, 4, report.geometry(), only={"moh"}, block=64)
    assert rows[0]["scheme"] == "error" and "use larger blocks" in rows[0]["error"]
