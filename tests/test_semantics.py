"""Language semantics that once went wrong: scoping, imports, defaults, guards, doc comments."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import attndsl


def _mask(src, **kw):
    return attndsl.compile(src, **kw).mask().int().tolist()


def test_imported_functions_resolve_names_in_their_own_file(tmp_path, monkeypatch):
    (tmp_path / "lib").mkdir()
    (tmp_path / "lib" / "helpers.attn").write_text(
        "const W = 2\nfn near() -> bool = abs(q - k) < W\n"
        "pattern near_pattern(N: int) {\n    space seq(N)\n    attend near()\n}\n")
    main = tmp_path / "main.attn"
    main.write_text('from "lib/helpers.attn" import near, near_pattern\nconst W = 1\n'
                    "pattern a(N: int) {\n    space seq(N)\n    attend near()\n}\n"
                    "pattern b(N: int) {\n    include near_pattern(N)\n}\n")
    monkeypatch.chdir(tmp_path)
    i = np.arange(5)
    want = (abs(i[:, None] - i[None, :]) < 2).astype(int).tolist()
    assert attndsl.compile("main.attn", pattern="a", N=5).mask().int().tolist() == want
    assert attndsl.compile("main.attn", pattern="b", N=5).mask().int().tolist() == want


def test_a_users_helper_does_not_change_the_prelude():
    src = ("fn na_axis(x: int, y: int, L: int, kernel: int, stride: int, dilation: int, "
           "causal: bool) -> bool = true\n"
           "pattern p(N: int) {\n    space seq(N)\n    attend neighborhood(3)\n}\n")
    assert attndsl.compile(src, N=6).mask().sum() == 18


def test_function_defaults_see_earlier_parameters_not_the_caller():
    src = ("fn band(lo: int, hi: int = lo + 1) -> bool = lo <= q - k < hi\n"
           "pattern p(N: int) {\n    space seq(N)\n    let lo = 2\n"
           "    attend let lo = 3 in band(0)\n}\n")
    assert _mask(src, N=3) == np.eye(3, dtype=int).tolist()


def test_pattern_lets_are_scoped_in_order_and_per_head_block():
    src = ("pattern p(N: int) {\n    space seq(N)\n    let d = q - k\n    attend d == 0\n"
           "    let d = k\n    attend d == 2\n}\n")
    assert _mask(src, N=3) == [[1, 0, 1], [0, 1, 1], [0, 0, 1]]
    src = ("pattern p(N: int) {\n    space seq(N)\n    heads 2\n    let d = q - k\n"
           "    on heads 0..1 { let d = k  attend d == 2 }\n    attend d == 0\n}\n")
    assert _mask(src, N=3) == [[[1, 0, 1], [0, 1, 1], [0, 0, 1]],
                               [[1, 0, 0], [0, 1, 0], [0, 0, 1]]]


def test_lets_on_keys_work_in_summaries_and_lets_on_queries_are_rejected_there():
    src = ("pattern p(N: int) {\n    space seq(N)\n    let kb = k // 2\n    attend k == q\n"
           "    summary r(i: 2) {\n        member kb == r.i\n        attend true\n    }\n}\n")
    (s,) = attndsl.compile(src, N=4).summaries()
    assert s["member"].int().tolist() == [[1, 1, 0, 0], [0, 0, 1, 1]]
    bad = src.replace("let kb = k // 2", "let kb = q // 2")
    with pytest.raises(attndsl.AttnNameError, match="'kb' depends on 'q'"):
        attndsl.compile(bad, N=4)


def test_tensor_or_and_if_guard_their_other_side():
    src = "pattern p(N: int) {\n    space seq(N)\n    attend k == 0 or q % k == 0\n}\n"
    i = np.arange(5)
    with np.errstate(divide="ignore"):
        want = ((i[None, :] == 0) | (i[:, None] % np.maximum(i[None, :], 1) == 0))
    assert _mask(src, N=5) == want.astype(int).tolist()
    src = ("pattern p(N: int) {\n    space seq(N)\n"
           "    attend if k > 0 then q // k >= 1 else true\n}\n")
    assert attndsl.compile(src, N=4).mask().shape == (4, 4)
    src = "pattern p(N: int) {\n    space seq(N)\n    attend q % (k - 1) == 0\n}\n"
    with pytest.raises(attndsl.EvaluationError, match="modulo by zero"):
        attndsl.compile(src, N=4).mask()


def test_doc_comments_are_only_the_lines_right_above_a_definition():
    src = ("const A = 1  ## not a doc\n\n## The doc.\n## Second line.\n"
           "pattern p(N: int) {\n    space seq(N)\n    attend causal()  ## a note\n}\n"
           "## trailing\n")
    assert attndsl.compile(src, N=2).doc == "The doc.\nSecond line."


def test_require_on_run_time_input_and_pattern_calls_with_inputs_are_rejected():
    with pytest.raises(attndsl.AttnTypeError, match="only on parameters"):
        attndsl.check("pattern p(N: int) {\n space seq(N)\n input n: int\n"
                      " require n >= 0\n attend true\n}\n")
    src = ("pattern a(N: int) {\n space seq(N)\n input x: int\n attend k < x\n}\n"
           "pattern b(N: int) {\n space seq(N)\n attend a(N)\n}\n")
    with pytest.raises(attndsl.AttnTypeError, match="use 'include' instead"):
        attndsl.check(src)


def test_scale_twice_and_head_only_in_bias():
    with pytest.raises(attndsl.AttnSyntaxError, match="'scale' is given twice"):
        attndsl.check("pattern p(N: int) {\n space seq(N)\n scale 0.5\n scale 2.0\n"
                      " attend true\n}\n")
    op = attndsl.compile("pattern p(N: int) {\n space seq(N)\n heads 2\n attend true\n"
                         " bias float(h)\n}\n", N=3)
    assert op.mask().shape == (3, 3)
    q = torch.randn(1, 2, 3, 4, dtype=torch.float64)
    assert op(q, q, q).shape == q.shape


def test_stdlib_fallback_only_for_bare_names():
    with pytest.raises(attndsl.ImportFailure, match="no/such/dir/sliding.attn"):
        attndsl.check('import "no/such/dir/sliding.attn"\n'
                      "pattern p(N: int) {\n space seq(N)\n attend sliding_window(N, 2)\n}\n")


def test_reach_of_content_dependent_pattern_and_array_parameters():
    op = attndsl.compile("dhsa.attn", "dhsa_chunks", N=16, block=4, chunk=4, topk=1)
    q = torch.randn(1, 1, 16, 8)
    assert op.reach(q=q, k=q).shape == (1, 1, 16, 16)
    with pytest.raises(attndsl.ParameterError):
        attndsl.compile("sliding.attn", pattern="sliding_window", N=np.array([3, 4]),
                        window=2)


def test_tensor_products_that_overflow_are_errors():
    src = "pattern p(N: int) {\n space seq(N)\n attend (q + (1 << 61)) * 4 > 0\n}\n"
    with pytest.raises(attndsl.EvaluationError, match="overflow"):
        attndsl.compile(src, N=2).mask()


@pytest.mark.parametrize("regions,tokens", [(5, 40), (7, 33), (1, 8)])
def test_max_pooling_over_disjoint_regions_matches_its_definition(regions, tokens):
    # the one-pass scatter (Combiner spans) against max over each region's members, written
    # here; ties (half-integer values) must split the gradient the same way
    import math

    from attndsl.semantics.attention import _pool
    gen = torch.Generator().manual_seed(regions * tokens)
    reg = torch.randint(-1, regions, (tokens,), generator=gen)  # -1: in no region
    member = torch.stack([reg == r for r in range(regions)])
    x = torch.randn(2, 3, tokens, 4, generator=gen, dtype=torch.float64)
    for data in (x, torch.round(x * 2) / 2):
        data = data.clone().requires_grad_()
        got = _pool(data, member, "max")
        want = torch.where(member.view(1, 1, regions, tokens, 1), data.unsqueeze(2),
                           torch.tensor(-math.inf, dtype=data.dtype)).amax(3)
        want = torch.where(member.any(-1).view(1, 1, -1, 1), want, torch.zeros_like(want))
        w = torch.arange(got.numel(), dtype=got.dtype).view(got.shape)
        assert torch.equal(got, want)
        assert torch.equal(torch.autograd.grad((got * w).sum(), data)[0],
                           torch.autograd.grad((want * w).sum(), data)[0])
