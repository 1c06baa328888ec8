"""Receptive-field and cost analysis: the papers' claims, and agreement with brute force."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import attndsl
from attndsl.analysis.blocks import decompose
from attndsl.analysis.formulas import nnz_formula, substitute
from attndsl.cli import main


def analyze(op, inputs=None, **kw):
    """The analysis as users get it (Op.analyze), inputs given as a dict."""
    return op.analyze(**kw, **(inputs or {}))


def _op(file, pattern, **kw):
    return attndsl.compile(f"patterns/{file}", pattern=pattern, **kw)


def brute_reach(mask: np.ndarray, query: int, layers: int) -> list[int]:
    """Reach sizes by repeated dense boolean products (the definition)."""
    reach = np.zeros(mask.shape[1], dtype=bool)
    reach[query] = True
    out = []
    for _ in range(layers):
        reach = reach | (reach.astype(np.int64) @ mask.astype(np.int64) > 0)
        out.append(int(reach.sum()))
    return out


def blocks_reached(op, a, block):
    return [math.ceil(s.reach / block) for s in a.layers]


# ------------------------------------------------------------ PowerAttention, Figure 2


def test_power_attention_figure_2():
    """arXiv 2503.03588 Fig. 2: 32K tokens = 128 blocks of 256, from the last block."""
    a = analyze(_op("power.attn", "power_attention", N=32768), layers=7)
    assert blocks_reached(None, a, 256) == [10, 35, 75, 110, 126, 128, 128]
    assert a.full_coverage_layers == 6 and a.complete


def test_block_sliding_grows_by_eight_blocks():
    a = analyze(_op("power.attn", "block_sliding", N=32768, window=9), layers=6)
    assert blocks_reached(None, a, 256) == [10, 18, 26, 34, 42, 50]


def test_block_dilated_stalls_at_half():
    a = analyze(_op("power.attn", "block_dilated", N=32768, span=20), layers=12)
    assert blocks_reached(None, a, 256)[-1] == 64
    assert a.full_coverage_layers is None and not a.complete
    assert a.never_reached_count == 32768 - 64 * 256


def test_longnet_stalls_at_80_of_128():
    a = analyze(_op("power.attn", "longnet", N=32768), layers=10)
    assert blocks_reached(None, a, 256)[-1] == 80
    assert not a.complete


def test_power_of_two_path_length_is_popcount():
    op = _op("power.attn", "power_strides", N=200, window=1)
    for i, j in [(199, 0), (150, 3), (64, 63), (100, 100 - 77)]:
        p = op.path(i, j)
        assert p.hops == bin(i - j).count("1")
        assert all(is_pow2 for is_pow2 in [(a - b) & (a - b - 1) == 0
                                           for a, b in zip(p.tokens, p.tokens[1:])])


# ------------------------------------------------------------ Sparse Transformer, windows, NA


@pytest.mark.parametrize("pattern,kw", [("strided", dict(stride=16)), ("strided", dict(stride=20)),
                                        ("fixed", dict(stride=16)),
                                        ("fixed", dict(stride=17, c=2))])
def test_sparse_transformer_full_coverage_in_two_layers(pattern, kw):
    """Child et al. 2019: stride >= sqrt(N) gives every token every earlier one in 2 layers."""
    a = analyze(_op("sparse_transformer.attn", pattern, N=256, **kw), layers=3)
    assert a.causal and a.full_coverage_layers == 2 and a.queries == "all"


@pytest.mark.parametrize("w", [2, 5, 33])
def test_sliding_window_reach_is_linear(w):
    """Longformer's l x w: L * (w - 1) + 1 tokens after L layers, capped by the start."""
    N = 400
    a = analyze(_op("sliding.attn", "sliding_window", N=N, window=w), layers=6)
    assert [s.reach for s in a.layers] == [min(L * (w - 1) + 1, N) for L in range(1, 7)]
    assert all(s.continuous for s in a.layers)


@pytest.mark.parametrize("k", [3, 5, 7])
def test_neighborhood_reach_per_axis(k):
    """NA, stride 1, no dilation: min(L(k-1)+1, axis) per axis, far from the borders."""
    a = analyze(_op("neighborhood.attn", "na2d", H=41, W=45, kernel=k), layers=4)
    assert [s.reach for s in a.layers] == [min(L * (k - 1) + 1, 41) * min(L * (k - 1) + 1, 45)
                                           for L in range(1, 5)]
    a3 = analyze(_op("neighborhood.attn", "na3d", T=9, H=15, W=15, kernel=3), layers=3)
    assert [s.reach for s in a3.layers] == [min(2 * L + 1, 9) * (2 * L + 1) ** 2
                                            for L in range(1, 4)]


# ------------------------------------------------------------ mixing constructs


@pytest.mark.parametrize("pattern,kw", [("combiner_fixed", dict(N=96, span=8)),
                                        ("combiner_logsparse", dict(N=100)),
                                        ("combiner_axial", dict(H=9, W=7)),
                                        ("combiner_mixture", dict(N=64, span=8))])
def test_combiner_full_coverage_in_one_layer(pattern, kw):
    """Combiner's 'full attention capability': every earlier token in 1 layer."""
    a = analyze(_op("combiner.attn", pattern, **kw), layers=2)
    assert a.causal and a.full_coverage_layers == 1
    assert any("summary" in n for n in a.notes)


def test_channel_routing_and_dynamic_patterns_are_described():
    a = analyze(_op("davit.attn", "channel_group", C=64, groups=4), layers=1)
    assert a.full_coverage_layers == 1 and any("channel" in n for n in a.notes)
    a = analyze(_op("moh.attn", "moh", N=32, heads=4, shared=1, topk=1), layers=1)
    assert any("routing" in n for n in a.notes)
    op = _op("dhsa.attn", "dhsa_chunks", N=64, block=8, chunk=8, topk=1)
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 2, 64, 8, generator=g), torch.randn(1, 2, 64, 8, generator=g)
    with pytest.raises(attndsl.InputError):
        analyze(op, layers=2)
    a = analyze(op, layers=3, q=q, k=k)
    assert any("given tensors" in n for n in a.notes)
    m = op.mask(q=q, k=k).any(0).any(0).numpy()
    assert [s.reach for s in a.layers] == brute_reach(m, 63, 3)


# ------------------------------------------------------------ agreement with brute force

CASES = [
    ("power.attn", "power_attention", dict(N=300, block=8, window=3, sink=2)),
    ("power.attn", "longnet", dict(N=256, block=2)),
    ("sliding.attn", "dilated_window", dict(N=200, window=5, dilation=3, causal=False)),
    ("neighborhood.attn", "na2d", dict(H=11, W=13, kernel=(3, 5), dilation=(2, 1),
                                      stride=(1, 2), causal=(True, False))),
    ("neighborhood.attn", "na3d", dict(T=4, H=6, W=7, kernel=(2, 3, 3), dilation=(1, 2, 1))),
    ("halo.attn", "halo2d", dict(H=13, W=10, block=4, halo=1)),
    ("sparse_transformer.attn", "fixed", dict(N=150, stride=12, c=2)),
    ("davit.attn", "window2d", dict(H=10, W=9, window=4)),
    ("transnext.attn", "aggregated", dict(H=8, W=9, heads=2, kernel=3, pool=3)),
    ("transnext.attn", "aggregated_pooled", dict(H=8, W=9, kernel=3, pool=3)),
]


@pytest.mark.parametrize("file,pattern,kw", CASES, ids=[c[1] for c in CASES])
def test_decomposition_is_exact_and_reach_matches_brute_force(file, pattern, kw):
    op = _op(file, pattern, **kw)
    m = op.mask().numpy()
    d = decompose(op.bound)
    assert np.array_equal(d.dense(), m) and d.nnz == int(m.sum())
    a = analyze(op, layers=3, query=op.bound.nq // 3)
    reach = op.reach().numpy()
    assert [s.reach for s in a.layers] == brute_reach(reach, op.bound.nq // 3, 3)
    assert a.nnz == int(m.sum())


def test_document_ids_and_per_head_rules():
    op = _op("document.attn", "document_causal", N=40)
    doc = torch.tensor([0] * 9 + [1] * 20 + [2] * 11)
    a = analyze(op, layers=2, inputs={"doc": doc}, query=20)
    assert [s.reach for s in a.layers] == [12, 12]  # tokens 9..20 of document 1
    src = """
    pattern two(N: int) {
        space seq(N)
        heads 2
        on heads 0..1 { attend sliding(2) }
        on heads 1..2 { attend causal() and q - k == 5 }
    }
    """
    op = attndsl.compile(src, N=30)
    m = op.mask().any(0).numpy()
    a = analyze(op, layers=3)
    assert [s.reach for s in a.layers] == brute_reach(m, 29, 3)
    assert a.nnz == int(m.sum())


def test_all_query_statistics_match_brute_force():
    op = _op("power.attn", "power_attention", N=96, block=4, window=2, sink=1)
    m = op.mask().numpy()
    a = analyze(op, layers=3)
    sizes = np.array([brute_reach(m, q, 3) for q in range(96)])
    for layer, s in enumerate(a.layers):
        assert s.min_reach == sizes[:, layer].min() and s.max_reach == sizes[:, layer].max()
        assert s.mean_reach == pytest.approx(sizes[:, layer].mean())


# ------------------------------------------------------------ cost and formulas


def test_cost_fields():
    op = _op("sliding.attn", "sliding_window", N=1000, window=10)
    a = analyze(op, layers=1, head_dim=32)
    assert a.nnz == int(op.mask().sum())
    assert a.density == pytest.approx(a.nnz / 1e6)
    assert a.flops_forward == 4 * a.nnz * 32 and a.flops_backward == 2.5 * a.flops_forward
    assert a.formula_verified is True and a.asymptotic.startswith("O(N) ")
    # the compiled kernels' tables (64-token blocks): 16 query blocks, each with itself and
    # the previous block, listed per query block and per key block, int32 indices + offsets
    assert a.block_table_bytes == 2 * 4 * (16 + 15) + 4 * 4 * 17
    assert a.block_table_bytes == op.stats()["block_table_bytes"]


@pytest.mark.parametrize("file,pattern,kw,cls", [
    ("power.attn", "power_attention", dict(N=4096, block=16), "O(N log N)"),
    ("moh.attn", "moh", dict(N=64, heads=2, shared=1, topk=1), "O(N^2)"),
    ("neighborhood.attn", "na2d", dict(H=16, W=16, kernel=5), "O(N)"),
])
def test_growth_class(file, pattern, kw, cls):
    assert analyze(_op(file, pattern, **kw), layers=1).asymptotic.startswith(cls + " ")


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(N=st.integers(1, 400), w=st.integers(1, 120), causal=st.booleans())
def test_sliding_window_density_formula(N, w, causal):
    op = _op("sliding.attn", "sliding_window", N=N, window=w, causal=causal)
    expr, value, density = nnz_formula(op.bound)
    exact = int(op.mask().sum())
    assert value == exact and int(substitute(expr, op.bound)) == exact
    assert substitute(density, op.bound) == exact / (N * N) or \
        abs(float(substitute(density, op.bound)) - exact / (N * N)) < 1e-12


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(N=st.integers(1, 700), block=st.integers(1, 48), window=st.integers(1, 9),
       sink=st.integers(0, 3))
def test_power_attention_density_formula(N, block, window, sink):
    op = _op("power.attn", "power_attention", N=N, block=block, window=window, sink=sink)
    expr, value, density = nnz_formula(op.bound)
    exact = int(decompose(op.bound).nnz)
    assert value == exact and int(substitute(expr, op.bound)) == exact
    assert abs(float(substitute(density, op.bound)) - exact / (N * N)) < 1e-12


@pytest.mark.parametrize("file,pattern,kw", [
    ("sparse_transformer.attn", "strided", dict(N=333, stride=17)),
    ("davit.attn", "window2d", dict(H=23, W=17, window=5)),
    ("davit.attn", "channel_group", dict(C=96, groups=4)),
    ("neighborhood.attn", "na3d", dict(T=5, H=9, W=8, kernel=(3, 5, 3), dilation=(1, 1, 2))),
    ("moh.attn", "moh", dict(N=50, heads=4, shared=1, topk=2)),
])
def test_other_closed_forms(file, pattern, kw):
    op = _op(file, pattern, **kw)
    expr, value, _ = nnz_formula(op.bound)
    assert value == int(op.mask().sum()) == int(substitute(expr, op.bound))


def test_formula_does_not_apply_outside_its_condition():
    assert nnz_formula(_op("neighborhood.attn", "na1d", N=20, kernel=3, causal=True)
                       .bound) is None


# ------------------------------------------------------------ interfaces


def test_op_analyze_is_frozen_and_json_has_the_schema():
    op = _op("sliding.attn", "sliding_window", N=64, window=4)
    a = op.analyze(layers=3, query=63, keep_sets=True)
    assert a.reach_sets[1].nonzero().view(-1).tolist() == list(range(57, 64))
    with pytest.raises(AttributeError):
        a.nnz = 1
    j = a.to_json()
    assert j["layers"][0] == {"layer": 1, "reach": 4, "reach_fraction": 4 / 64,
                              "continuous": True, "min_reach": 1, "mean_reach": j["layers"][0][
                                  "mean_reach"], "max_reach": 4, "covered_queries": 4}
    for key in ("full_coverage_layers", "nnz", "density", "flops_forward", "flops_backward",
                "block_table_bytes", "formula_nnz", "asymptotic", "method", "diameter"):
        assert key in j
    json.dumps(j)


def test_cli_analyze_json_and_plot(tmp_path, capsys):
    png = tmp_path / "r.png"
    assert main(["analyze", "patterns/power.attn", "-p", "power_attention", "--set",
                 "N=4096", "--set", "block=64", "--layers", "6", "--json", "--plot",
                 str(png), "--path", "4095", "0"]) == 0
    j = json.loads(capsys.readouterr().out)
    m = _op("power.attn", "power_attention", N=4096, block=64).mask().numpy()
    assert [x["reach"] for x in j["layers"]] == brute_reach(m, 4095, 6)
    assert j["full_coverage_layers"] == 5 and j["path"]["hops"] == 1
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_cli_analyze_table_and_grid_plot(tmp_path, capsys):
    png = tmp_path / "g.png"
    assert main(["analyze", "patterns/neighborhood.attn", "-p", "na2d", "--set", "H=12",
                 "--set", "W=12", "--set", "kernel=3", "--layers", "3", "--query", "6,6",
                 "--plot", str(png)]) == 0
    out = capsys.readouterr().out
    assert "receptive field of query 78(6,6) over 3 layers" in out
    assert "closed form: nnz = H*W*kernel_0*kernel_1 (matches the exact count)" in out
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_cli_compare(tmp_path, capsys):
    png = tmp_path / "c.png"
    assert main(["compare", "patterns/power.attn:power_attention",
                 "patterns/power.attn:block_sliding", "--set", "N=2048", "--set", "block=16",
                 "--layers", "4", "--plot", str(png)]) == 0
    out = capsys.readouterr().out
    assert "power_attention" in out and "block_sliding" in out
    assert png.read_bytes()[:4] == b"\x89PNG"
    assert main(["compare", "patterns/power.attn:longnet", "--set", "N=64", "--set",
                 "nope=1"]) == 1
    assert "no compared pattern has parameter nope" in capsys.readouterr().err
