"""The language additions the seed families need, as a user meets them: exact located
errors for each misuse, run-time shape errors, and what the analyses report for summaries
whose keys and values the caller gives (reach stays exact: a summary reaches its members)."""

from __future__ import annotations

import pytest
import torch

import attndsl


def pat(body: str, params: str = "N: int") -> str:
    lines = "\n".join("    " + ln if ln else "" for ln in body.splitlines())
    return f"pattern p({params}) {{\n{lines}\n}}\n"


CASES = [
    pytest.param(pat('space grid(H, W)\nattend q.y == k.y\nsummary s(r: H) {\n    member k.y '
                     '== s.r\n    keys from H\n    attend true\n}',
                     'H: int, W: int'),
                 attndsl.AttnNameError, [
        "<string>:6:19: error: 'keys from' needs a run-time input, and 'H' is not one",
        '            keys from H',
        '                      ^',
    ], id='given-not-input'),
    pytest.param(pat('space grid(H, W)\nattend q.y == k.y\ninput kk: float[H]\nsummary s(r: '
                     'H) {\n    member k.y == s.r\n    keys from kk\n    attend true\n}',
                     'H: int, W: int'),
                 attndsl.AttnTypeError, [
        "<string>:7:19: error: 'keys from kk': the input must be declared float[batch, heads, "
        'tokens, dim] (4 dimensions), not float[H]',
        '            keys from kk',
        '                      ^~',
    ], id='given-bad-shape'),
    pytest.param(pat('space grid(H, W)\nattend q.y == k.y\ninput kk: float[*, *, H, '
                     '*]\nsummary s(r: H) {\n    member k.y == s.r\n    keys from kk\n    '
                     'keys max\n    attend true\n}',
                     'H: int, W: int'),
                 attndsl.AttnSyntaxError, [
        "<string>:8:14: error: 'keys' is given twice",
        '            keys max',
        '                 ^~~',
    ], id='given-twice'),
    pytest.param(pat('space grid(H, W)\nattend q.y == k.y\ninput kk: float[*, *, H, '
                     '*]\nsummary s(r: H) {\n    keys from kk\n    attend true\n}',
                     'H: int, W: int'),
                 attndsl.AttnSyntaxError, [
        "<string>:5:13: error: summary 's' needs a 'member' rule (which keys belong to each "
        "summary token), or both 'keys from' and 'values from'",
        '        summary s(r: H) {',
        '                ^',
    ], id='no-member-one-given'),
    pytest.param(pat('space grid(H, W)\nattend q.y == k.y\ninput kk: float[*, *, H, '
                     '*]\nsummary s(r: H) {\n    keys from kk\n    values expectation\n    '
                     'attend true\n}',
                     'H: int, W: int'),
                 attndsl.AttnSyntaxError, [
        "<string>:5:13: error: summary 's' needs a 'member' rule (which keys belong to each "
        "summary token), or both 'keys from' and 'values from'",
        '        summary s(r: H) {',
        '                ^',
    ], id='no-member-expectation'),
    pytest.param(pat('space grid(H, W)\nattend q.y == k.y\nsummary s(r: H, c: W = k.x) {\n    '
                     'member k.y == s.r\n    attend true\n}',
                     'H: int, W: int'),
                 attndsl.AttnNameError, [
        "<string>:4:28: error: 'k' cannot be used in a summary axis's value, which sees only "
        "the query 'q'",
        '        summary s(r: H, c: W = k.x) {',
        '                               ^',
    ], id='bound-axis-k'),
    pytest.param(pat('space grid(H, W)\nattend q.y == k.y\nsummary s(r: H, c: W = q.x > 0) '
                     '{\n    member k.y == s.r\n    attend true\n}',
                     'H: int, W: int'),
                 attndsl.AttnTypeError, [
        "<string>:4:28: error: summary axis 'c' is bound to a value of the query, an int; not "
        'bool',
        '        summary s(r: H, c: W = q.x > 0) {',
        '                               ^~~~~~~',
    ], id='bound-axis-bool'),
    pytest.param(pat('space grid(H, W)\nattend q.y == k.y\nsummary s(r: H) {\n    member k.y '
                     '== s.r\n    bias k.y\n    attend true\n}',
                     'H: int, W: int'),
                 attndsl.AttnNameError, [
        "<string>:6:14: error: 'k' cannot be used in a summary's 'bias', which sees only the "
        "query 'q' and 'h'",
        '            bias k.y',
        '                 ^',
    ], id='bias-k'),
    pytest.param(pat('space grid(H, W)\nattend q.y == k.y\nsummary s(r: H) {\n    member k.y '
                     '== s.r\n    bias q.y > 1\n    attend true\n}',
                     'H: int, W: int'),
                 attndsl.AttnTypeError, [
        "<string>:6:14: error: a summary's 'bias' needs a number, not bool",
        '            bias q.y > 1',
        '                 ^~~~~~~',
    ], id='bias-bool'),
    pytest.param(pat('space grid(H, W)\nattend q.y == k.y\nsummary s(r: H) {\n    member k.y '
                     '== s.r\n    queries at (s.r, 0)\n    attend true\n}',
                     'H: int, W: int'),
                 attndsl.AttnSyntaxError, [
        "<string>:6:20: error: 'queries' pooling is used only by 'values expectation'",
        '            queries at (s.r, 0)',
        '                       ^~~~~~~~',
    ], id='at-without-expectation'),
    pytest.param(pat('space grid(H, W)\nattend q.y == k.y\nsummary s(r: H) {\n    member k.y '
                     '== s.r\n    values expectation\n    queries at 1.5\n    attend true\n}',
                     'H: int, W: int'),
                 attndsl.AttnTypeError, [
        "<string>:7:20: error: 'queries at' needs the query's flat index (an int) or its "
        'coordinates (int[2]), not float',
        '            queries at 1.5',
        '                       ^~~',
    ], id='at-bad-type'),
    pytest.param(pat('space grid(H, W)\nattend q.y == k.y\nsummary s(r: H) {\n    member k.y '
                     '== s.r\n    values expectation\n    queries max\n    queries at (s.r, '
                     '0)\n    attend true\n}',
                     'H: int, W: int'),
                 attndsl.AttnSyntaxError, [
        "<string>:8:20: error: 'queries' is given twice",
        '            queries at (s.r, 0)',
        '                       ^~~~~~~~',
    ], id='at-and-pool'),
    pytest.param(pat('space seq(N)\nheads 4\ninput router: float[*, N, 3]\nroute router top 2 '
                     'shared 1 scaled q\nattend true'),
                 attndsl.AttnNameError, [
        "<string>:5:40: error: 'q' cannot be used here: this value must not depend on the "
        'query, key or head index',
        '        route router top 2 shared 1 scaled q',
        '                                           ^',
    ], id='route-scaled-runtime'),
    pytest.param(pat('space seq(N)\nheads 4\ninput router: float[*, N, 3]\nroute router top 2 '
                     'shared 1 hard 1\nattend true'),
                 attndsl.AttnTypeError, [
        "<string>:5:38: error: 'hard' needs a bool that depends only on parameters, not int",
        '        route router top 2 shared 1 hard 1',
        '                                         ^',
    ], id='route-hard-int'),
    pytest.param(pat('space seq(N)\nheads 4\ninput router: float[*, N, 3]\nroute router top 2 '
                     'shared 1 weighted N\nattend true'),
                 attndsl.AttnTypeError, [
        "<string>:5:42: error: 'weighted' needs a run-time input declared float[*, N, shared "
        'heads], not int',
        '        route router top 2 shared 1 weighted N',
        '                                             ^',
    ], id='route-weighted-param'),
    pytest.param(pat('space seq(N)\nheads 4\ninput router: float[*, N, 3]\ninput g: '
                     'float[N]\nroute router top 2 shared 1 grouped g\nattend true'),
                 attndsl.AttnTypeError, [
        "<string>:6:41: error: 'grouped' needs a run-time input declared float[*, N, 2], not "
        'float[N]',
        '        route router top 2 shared 1 grouped g',
        '                                            ^',
    ], id='route-grouped-1d'),
    pytest.param(pat('space seq(N)\nattend chunk_topk(4, 4, 1, shared = 1)'),
                 attndsl.AttnTypeError, [
        "<string>:3:41: error: 'shared' of 'chunk_topk' must be a bool parameter, not int",
        '        attend chunk_topk(4, 4, 1, shared = 1)',
        '                                            ^',
    ], id='chunk-shared-int'),
    pytest.param(pat('space seq(N)\nattend chunk_topk(4, 4, 1, budget = true)'),
                 attndsl.AttnTypeError, [
        "<string>:3:41: error: 'budget' of 'chunk_topk' must be an int parameter, not bool",
        '        attend chunk_topk(4, 4, 1, budget = true)',
        '                                            ^~~~',
    ], id='chunk-budget-bool'),
    pytest.param(pat('space seq(N)\ninput s: float[*]\nattend chunk_topk(4, 4, 1, starts = s)'),
                 attndsl.AttnTypeError, [
        "<string>:4:41: error: 'starts' of 'chunk_topk' must be a run-time input int[*] (or "
        'int[*, *], one row per batch element), not float[*]',
        '        attend chunk_topk(4, 4, 1, starts = s)',
        '                                            ^',
    ], id='chunk-starts-float'),
    pytest.param(pat('space seq(N)\ninput b: float[4, *]\nbias b[h, k]\nattend true'),
                 attndsl.AttnErrors, [
        "<string>:4:10: error: indexing input 'b' of 2 dimensions needs its dimensions after "
        "the first declared, not '*': float[4, *]",
        '        bias b[h, k]',
        '             ^~~~~~~',
        "<string>:4:12: error: the head index 'h' needs a 'heads N' declaration",
        '        bias b[h, k]',
        '               ^',
    ], id='index-star'),
    pytest.param(pat('space seq(N)\ninput b: float[4]\nbias b[h, k]\nattend true'),
                 attndsl.AttnErrors, [
        '<string>:4:10: error: float cannot be indexed',
        '        bias b[h, k]',
        '             ^~~~~~~',
        "<string>:4:12: error: the head index 'h' needs a 'heads N' declaration",
        '        bias b[h, k]',
        '               ^',
    ], id='index-too-many'),

]


@pytest.mark.parametrize("src,cls,lines", CASES)
def test_misuse_is_a_located_error(src, cls, lines):
    with pytest.raises(attndsl.AttnError) as info:
        attndsl.check(src)
    assert type(info.value) is cls
    assert info.value.render() == "\n".join(lines)


def _render(fn):
    with pytest.raises(attndsl.InputError) as info:
        fn()
    return info.value.render().split("\n")


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_given_summary_inputs_are_checked_before_running(backend):
    op = attndsl.compile("transnext.attn", "aggregated", H=4, W=4, heads=2, pool=2)
    q = torch.randn(1, 2, 16, 4)
    inputs = dict(local_bias=torch.zeros(2, 9), pool_keys=torch.zeros(1, 2, 4, 4),
                  pool_values=torch.zeros(1, 2, 4, 4), pool_bias=torch.zeros(2, 16, 4))
    bad = dict(inputs, pool_keys=torch.zeros(1, 2, 3, 4))
    assert _render(lambda: op(q, q, q, backend=backend, **bad)) == [
        "patterns/transnext.attn:28:11: error: run-time input 'pool_keys' must have shape "
        "[*, *, 4, *], not [1, 2, 3, 4]",
        "        input pool_keys: float[*, *, PH * PW, *]",
        "              ^~~~~~~~~",
    ]
    bad = dict(inputs, pool_values=torch.zeros(1, 3, 4, 4))
    assert _render(lambda: op(q, q, q, backend=backend, **bad))[0] == (
        "patterns/transnext.attn:29:11: error: summary 'pooled' takes its values from "
        "'pool_values', which must have shape [1, heads (1, or a divisor of 2), 4, 4], not "
        "[1, 3, 4, 4]")


def test_boundaries_per_batch_element_are_checked():
    op = attndsl.compile("dhsa.attn", "dhsa", N=8, block=4, chunk=2, budget=3, local=1,
                         sinks=1, instruction=2)
    q = torch.randn(2, 2, 8, 4)
    for bad, msg in ((torch.tensor([[0, 3], [0, 4], [0, 5]]),
                      "chunk boundaries have 3 rows for a batch of 2"),
                     (torch.tensor([[0, 3], [1, 4]]),
                      "chunk boundaries must be a 1-D int tensor starting at 0 (or one such "
                      "row per batch element)"),
                     (torch.tensor([[0, 3, 3]]), "chunk boundaries must be strictly increasing")):
        first = _render(lambda bad=bad: op(q, q, q, boundaries=bad))[0]
        assert first == "patterns/dhsa.attn:28:29: error: " + msg


def test_reach_of_given_and_bound_summaries():
    """Combiner-Axial: (r, c) reads row r' through the summary (r', c), whose members are
    all of row r': every earlier token is reached. TransNeXt: the adaptive-pool regions
    overlap on odd grids; with the window, the whole grid is reached."""
    op = attndsl.compile("combiner.attn", "combiner_axial", H=3, W=4)
    assert torch.equal(op.reach(), torch.ones(12, 12, dtype=torch.bool).tril())
    (s,) = op.summaries()
    attend = s["attend"]  # [queries, (row, column) tokens]
    want = torch.zeros(12, 12, dtype=torch.bool)
    for qi in range(12):
        for r in range(qi // 4):
            want[qi, r * 4 + qi % 4] = True
    assert torch.equal(attend, want)
    op = attndsl.compile("transnext.attn", "aggregated", H=5, W=5, heads=2, pool=2)
    (s,) = op.summaries()
    rows = [[0, 1, 2], [2, 3, 4]]
    want = torch.zeros(4, 25, dtype=torch.bool)
    for py in range(2):
        for px in range(2):
            for y in rows[py]:
                for x in rows[px]:
                    want[py * 2 + px, y * 5 + x] = True
    assert torch.equal(s["member"], want)
    assert bool(op.reach().all())
