"""Bad input: every mistake is a located `attndsl.AttnError` with an exact message.

Each case asserts the whole rendered report (`FILE:LINE:COL: error: MESSAGE`, the source line
and a caret line), its class, and that nothing else escapes: no Python traceback, no silently
wrong result, no code from a .attn file ever executed, no huge allocation.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import attndsl
from attndsl.cli import main

ROOT = Path(__file__).resolve().parent.parent
NB = "patterns/neighborhood.attn"
DOC = "patterns/document.attn"
DHSA = "patterns/dhsa.attn"
SLIDING = "patterns/sliding.attn"
MOH = "patterns/moh.attn"
IMPORT_SW = 'from "sliding.attn" import sliding_window\n'


def pat(body: str, params: str = "N: int", name: str = "p") -> str:
    """A pattern whose body lines start at line 2, indented by 4."""
    lines = "\n".join("    " + ln if ln else "" for ln in body.splitlines())
    return f"pattern {name}({params}) {{\n{lines}\n}}\n"


def summary(member_axis: str = "blk", extra: str = "") -> str:
    return (f"summary r(blk: 4) {{\n    member k // 4 == r.{member_axis}\n{extra}"
            "    attend r.blk < q // 4\n}")


def std(path: str, needle: str, after: str | None = None) -> str:
    """'FILE:LINE' of the line of a standard file that holds `needle` (the first one after the
    line holding `after`), so that these reports stay exact while the library grows."""
    lines = (ROOT / path).read_text().splitlines()
    if after is None:
        assert sum(needle in ln for ln in lines) == 1, needle
        start = 0
    else:
        start = next(i for i, ln in enumerate(lines) if after in ln)
    line = next(i for i in range(start, len(lines)) if needle in lines[i])
    return f"{path}:{line + 1}"


def error_of(fn, *args, **kwargs) -> attndsl.AttnError:
    with pytest.raises(attndsl.AttnError) as info:
        fn(*args, **kwargs)
    return info.value


def assert_report(err: attndsl.AttnError, cls: type, lines: list[str]) -> None:
    text = "\n".join(lines)
    assert type(err) is cls, f"{type(err).__name__}: {err}"
    assert str(err) == text
    assert err.render() == text


# ------------------------------------------------------------------ parse and check errors

CHECK_CASES = [
    # -- syntax
    pytest.param(pat("space seq(N)\nattend k <= q q"), attndsl.AttnSyntaxError, [
        "<string>:3:19: error: unexpected 'q'",
        "        attend k <= q q",
        "                      ^",
    ], id="syntax-unexpected-token"),
    pytest.param(pat("space seq(N)\nattend k <= q $ 1"), attndsl.AttnSyntaxError, [
        "<string>:3:19: error: unexpected character '$'",
        "        attend k <= q $ 1",
        "                      ^",
    ], id="syntax-unexpected-character"),
    pytest.param(pat("space seq(N)\nattend k ≤ q"), attndsl.AttnSyntaxError, [
        "<string>:3:14: error: unexpected character '≤'",
        "        attend k ≤ q",
        "                 ^",
    ], id="syntax-unicode-character"),
    pytest.param("pattern p(N: int) {\n    space seq(N)\n    attend k <= q\n",
                 attndsl.AttnSyntaxError, [
        "<string>:1:19: error: unexpected end of file: this '{' is never closed",
        "    pattern p(N: int) {",
        "                      ^",
    ], id="syntax-unclosed-brace-at-eof"),
    pytest.param("const C = 1\nfn f(x: int) -> int = x +\n\n", attndsl.AttnSyntaxError, [
        "<string>:2:26: error: unexpected end of file",
        "    fn f(x: int) -> int = x +",
        "                             ^",
    ], id="syntax-unexpected-end-of-file"),
    pytest.param("pattern p(N: int\n", attndsl.AttnSyntaxError, [
        "<string>:1:10: error: unexpected end of file: this '(' is never closed",
        "    pattern p(N: int",
        "             ^",
    ], id="syntax-unclosed-paren-at-eof"),
    pytest.param(pat("space seq(N\nattend k <= q"), attndsl.AttnSyntaxError, [
        "<string>:3:5: error: unexpected 'attend'; the '(' at line 2 is not closed",
        "        attend k <= q",
        "        ^~~~~~",
    ], id="syntax-unclosed-paren"),
    pytest.param(pat("space seq(N)\nattend (k <= q"), attndsl.AttnSyntaxError, [
        "<string>:4:1: error: unexpected '}' (expected ')', ','); the '(' at line 3 is not closed",
        "    }",
        "    ^",
    ], id="syntax-unclosed-paren-in-expression"),
    pytest.param('import "\\N"\n' + pat("space seq(N)\nattend k <= q"),
                 attndsl.AttnSyntaxError, [
        '<string>:1:8: error: invalid escape sequence in string "\\N"',
        '    import "\\N"',
        "           ^~~~",
    ], id="syntax-bad-string-escape"),
    pytest.param(pat("space seq(N)\nattend sliding(window = 3, true)"),
                 attndsl.AttnSyntaxError, [
        "<string>:3:32: error: positional argument after a keyword argument",
        "        attend sliding(window = 3, true)",
        "                                   ^~~~",
    ], id="syntax-positional-after-keyword"),
    pytest.param(pat("space seq(n = N)\nattend k <= q"), attndsl.AttnSyntaxError, [
        "<string>:2:15: error: space sizes are positional",
        "        space seq(n = N)",
        "                  ^",
    ], id="syntax-space-size-keyword"),
    pytest.param(pat("space seq(N)\nattend k <= q + 056"), attndsl.AttnSyntaxError, [
        "<string>:3:21: error: invalid integer '056' (leading zeros are not allowed)",
        "        attend k <= q + 056",
        "                        ^~~",
    ], id="syntax-integer-with-leading-zero"),
    # -- unknown names, with 'did you mean'
    pytest.param(pat("space seq(N)\nattend 0 <= q - k < widow", "N: int, window: int"),
                 attndsl.AttnNameError, [
        "<string>:3:25: error: unknown name 'widow' (did you mean 'window'?)",
        "        attend 0 <= q - k < widow",
        "                            ^~~~~",
    ], id="name-variable"),
    pytest.param(pat("space seq(N)\nattend slidng(4)"), attndsl.AttnNameError, [
        "<string>:3:12: error: unknown function 'slidng' (did you mean 'sliding'?)",
        "        attend slidng(4)",
        "               ^~~~~~~~~",
    ], id="name-function"),
    pytest.param(IMPORT_SW + pat("include sliding_windw(N, 4)"), attndsl.AttnNameError, [
        "<string>:3:13: error: unknown pattern 'sliding_windw' (did you mean 'sliding_window'?)",
        "        include sliding_windw(N, 4)",
        "                ^~~~~~~~~~~~~~~~~~~",
    ], id="name-pattern"),
    pytest.param(pat("space seq(N)\nattend k <= q and popcnt(q) == 1"), attndsl.AttnNameError, [
        "<string>:3:23: error: unknown function 'popcnt' (did you mean 'popcount'?)",
        "        attend k <= q and popcnt(q) == 1",
        "                          ^~~~~~~~~",
    ], id="name-builtin"),
    pytest.param(pat("space seq(N)\nattend sliding(4, casual = false)"),
                 attndsl.AttnNameError, [
        "<string>:3:23: error: function 'sliding' has no parameter 'casual' (did you mean "
        "'causal'?)",
        "        attend sliding(4, casual = false)",
        "                          ^~~~~~",
    ], id="name-keyword-argument"),
    pytest.param(pat("space seq(N)\nattend k <= q\n" + summary("blck")), attndsl.AttnNameError, [
        "<string>:5:26: error: summary 'r' has no axis 'blck' (did you mean 'blk'?)",
        "            member k // 4 == r.blck",
        "                             ^~~~~~",
    ], id="name-summary-axis"),
    pytest.param(pat("space grid(N, N)\nattend q.y == k.yy"), attndsl.AttnNameError, [
        "<string>:3:19: error: token<k> has no field 'yy' (did you mean 'y'?)",
        "        attend q.y == k.yy",
        "                      ^~~~",
    ], id="name-token-field"),
    pytest.param(pat("space gird(N, N)\nattend q.y == k.y"), attndsl.AttnNameError, [
        "<string>:2:5: error: unknown space kind 'gird' (did you mean 'grid'?)",
        "        space gird(N, N)",
        "        ^~~~~~~~~~~~~~~~",
    ], id="name-space-kind"),
    pytest.param(pat("space seq(N)\nattend k <= q\n" + summary(extra="    keys maxx\n")),
                 attndsl.AttnNameError, [
        "<string>:6:14: error: unknown key pooling 'maxx' (did you mean 'max'?); choose max, mean",
        "            keys maxx",
        "                 ^~~~",
    ], id="name-pooling-kind"),
    pytest.param(pat("space seq(N)\nattend k <= q", "N: integer"), attndsl.AttnTypeError, [
        "<string>:1:14: error: unknown type 'integer' (did you mean 'int'?)",
        "    pattern p(N: integer) {",
        "                 ^~~~~~~",
    ], id="name-type"),
    pytest.param('from "sliding.attn" import sliding_windo\n' + pat("space seq(N)\nattend true"),
                 attndsl.AttnNameError, [
        "<string>:1:1: error: 'sliding.attn' defines no 'sliding_windo' (did you mean "
        "'sliding_window'?)",
        '    from "sliding.attn" import sliding_windo',
        "    ^~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~",
    ], id="name-imported"),
    pytest.param(pat("space seq(N)\nrequire q < N\nattend k <= q"), attndsl.AttnNameError, [
        "<string>:3:13: error: 'q' cannot be used here: this value must not depend on the query, "
        "key or head index",
        "        require q < N",
        "                ^",
    ], id="name-q-in-require"),
    pytest.param(pat("space seq(N)\nattend k <= q\nsummary r(blk: 4) {\n"
                     "    member q // 4 == r.blk\n    attend true\n}"),
                 attndsl.AttnNameError, [
        "<string>:5:16: error: 'q' cannot be used in a summary's 'member' rule, which sees only "
        "the key 'k'",
        "            member q // 4 == r.blk",
        "                   ^",
    ], id="name-q-in-summary-member"),
    pytest.param("const C = sliding(3)\n" + pat("space seq(N)\nattend k <= q"),
                 attndsl.AttnNameError, [
        "<string>:1:11: error: function 'sliding' uses 'q' and 'k', which cannot be used here: "
        "this value must not depend on the query, key or head index",
        "    const C = sliding(3)",
        "              ^~~~~~~~~~",
    ], id="name-function-using-q-in-constant"),
    # -- types
    pytest.param(pat("space seq(N)\nattend (k <= q) + 1 > 0"), attndsl.AttnTypeError, [
        "<string>:3:13: error: '+' needs numbers, not bool",
        "        attend (k <= q) + 1 > 0",
        "                ^~~~~~",
    ], id="type-bool-in-arithmetic"),
    pytest.param(pat("space seq(N)\nattend k <= q and N"), attndsl.AttnTypeError, [
        "<string>:3:23: error: 'and' needs bool operands, not int",
        "        attend k <= q and N",
        "                          ^",
    ], id="type-int-in-and"),
    pytest.param(pat("space seq(N)\nattend (k <= q) & (k > 0)"), attndsl.AttnTypeError, [
        "<string>:3:13: error: '&' needs int operands, not bool (use 'and'/'or' for bool)",
        "        attend (k <= q) & (k > 0)",
        "                ^~~~~~",
    ], id="type-bit-op-on-bool"),
    pytest.param(pat("space grid(N, N)\nattend all(q.pos - k.pos < (1, 2, 3))"),
                 attndsl.AttnTypeError, [
        "<string>:3:16: error: '<' on tuples of different widths (int[2] and int[3])",
        "        attend all(q.pos - k.pos < (1, 2, 3))",
        "                   ^~~~~~~~~~~~~~~~~~~~~~~~~",
    ], id="type-tuple-width-mismatch"),
    pytest.param(pat("space seq(N)\nattend q - k"), attndsl.AttnTypeError, [
        "<string>:3:12: error: 'attend' needs a bool, not int",
        "        attend q - k",
        "               ^~~~~",
    ], id="type-non-bool-attend"),
    pytest.param(pat("space grid(N, N)\nattend q.pos == k.pos"), attndsl.AttnTypeError, [
        "<string>:3:12: error: 'attend' needs a bool, not bool[2] (reduce a per-axis bool with "
        "all() or any())",
        "        attend q.pos == k.pos",
        "               ^~~~~~~~~~~~~~",
    ], id="type-per-axis-attend-without-all"),
    pytest.param(pat("space seq(N)\nattend abs(q, k) < 3"), attndsl.AttnTypeError, [
        "<string>:3:12: error: 'abs' takes 1 argument, not 2",
        "        attend abs(q, k) < 3",
        "               ^~~~~~~~~",
    ], id="type-builtin-arity"),
    pytest.param(pat("space seq(N)\nattend sliding(4, true, 1)"), attndsl.AttnTypeError, [
        "<string>:3:12: error: function 'sliding' takes at most 2 arguments, not 3",
        "        attend sliding(4, true, 1)",
        "               ^~~~~~~~~~~~~~~~~~~",
    ], id="type-function-arity"),
    pytest.param(pat("space seq(N)\nattend dilated(4)"), attndsl.AttnTypeError, [
        "<string>:3:12: error: function 'dilated' is missing argument 'dilation'",
        "        attend dilated(4)",
        "               ^~~~~~~~~~",
    ], id="type-missing-function-argument"),
    pytest.param(pat("space seq(N)\nattend sliding(window = 4, window = 5)"),
                 attndsl.AttnTypeError, [
        "<string>:3:32: error: parameter 'window' is given twice",
        "        attend sliding(window = 4, window = 5)",
        "                                   ^~~~~~",
    ], id="type-duplicate-keyword"),
    pytest.param("fn even(x: int) -> bool = x % 2 == 0\n" + pat("space seq(N)\n"
                                                                "attend even(k <= q)"),
                 attndsl.AttnTypeError, [
        "<string>:4:17: error: argument 'x' of 'even' must be int, not bool",
        "        attend even(k <= q)",
        "                    ^~~~~~",
    ], id="type-function-argument"),
    pytest.param("fn f(x: int) -> bool = x + 1\n" + pat("space seq(N)\nattend f(q)"),
                 attndsl.AttnTypeError, [
        "<string>:1:24: error: function 'f' returns int, declared bool",
        "    fn f(x: int) -> bool = x + 1",
        "                           ^~~~~",
    ], id="type-function-result"),
    pytest.param(pat("space grid(N, N)\nattend q.pos[2] == k.pos[0]"), attndsl.AttnTypeError, [
        "<string>:3:18: error: index 2 is out of range for int[2]",
        "        attend q.pos[2] == k.pos[0]",
        "                     ^",
    ], id="type-tuple-index-out-of-range"),
    pytest.param(pat("space seq(N)\nattend N[0] == k"), attndsl.AttnTypeError, [
        "<string>:3:12: error: int cannot be indexed",
        "        attend N[0] == k",
        "               ^",
    ], id="type-index-an-int"),
    pytest.param(pat("space seq(N)\ninput b: int[N, N]\nattend b[q] == 0"),
                 attndsl.AttnTypeError, [
        "<string>:4:12: error: cannot compare int[N] with int using '=='",
        "        attend b[q] == 0",
        "               ^~~~~~~~~",
    ], id="type-index-2d-input"),  # b[q] is the row q of b (b[q, k] an element)
    pytest.param(pat("space seq(N / 2)\nattend k <= q"), attndsl.AttnTypeError, [
        "<string>:2:15: error: a space size must be an int that depends only on parameters, not "
        "float",
        "        space seq(N / 2)",
        "                  ^~~~~",
    ], id="type-float-space-size"),
    pytest.param(pat("space seq(N)\nattend N(3)"), attndsl.AttnTypeError, [
        "<string>:3:12: error: 'N' is a value, not a function",
        "        attend N(3)",
        "               ^~~~",
    ], id="type-value-called"),
    pytest.param(pat("space seq(N)\nattend causal"), attndsl.AttnTypeError, [
        "<string>:3:12: error: function 'causal' must be called: 'causal(...)'",
        "        attend causal",
        "               ^~~~~~",
    ], id="type-function-not-called"),
    pytest.param(pat("space seq(N)\nattend k <= q + 99999999999999999999"),
                 attndsl.AttnTypeError, [
        "<string>:3:21: error: integer 99999999999999999999 does not fit in 64 bits",
        "        attend k <= q + 99999999999999999999",
        "                        ^~~~~~~~~~~~~~~~~~~~",
    ], id="type-integer-literal-too-big"),
    pytest.param(pat("space seq(N)\nattend sliding(4, c)", "N: int, c: bool = 3"),
                 attndsl.AttnTypeError, [
        "<string>:1:29: error: default of 'c' must be bool, not int",
        "    pattern p(N: int, c: bool = 3) {",
        "                                ^",
    ], id="type-parameter-default"),
    pytest.param("fn f(x: int) -> int = f(x - 1)\n" + pat("space seq(N)\nattend f(q) == k"),
                 attndsl.AttnTypeError, [
        "<string>:1:23: error: function 'f' calls itself; recursion is not allowed",
        "    fn f(x: int) -> int = f(x - 1)",
        "                          ^~~~~~~~",
    ], id="type-recursion"),
    pytest.param("fn f(x: int) -> int = g(x)\nfn g(x: int) -> int = f(x)\n", attndsl.AttnErrors, [
        "<string>:2:23: error: function 'f' calls itself through f -> g -> f; recursion is not "
        "allowed",
        "    fn g(x: int) -> int = f(x)",
        "                          ^~~~",
        "<string>:1:23: error: function 'g' calls itself through g -> f -> g; recursion is not "
        "allowed",
        "    fn f(x: int) -> int = g(x)",
        "                          ^~~~",
    ], id="type-mutual-recursion"),
    pytest.param(pat("space seq(N)\ninclude p(N)"), attndsl.AttnTypeError, [
        "<string>:3:13: error: pattern 'p' refers to itself; recursion is not allowed",
        "        include p(N)",
        "                ^~~~",
    ], id="type-pattern-includes-itself"),
    pytest.param(pat("space seq(N)\nattend b(N)", name="a") + pat("include a(N)", name="b"),
                 attndsl.AttnErrors, [
        "<string>:3:12: error: pattern 'a' refers to itself through a -> b -> a; recursion is not "
        "allowed",
        "        attend b(N)",
        "               ^~~~",
        "<string>:6:13: error: pattern 'b' refers to itself through b -> a -> b; recursion is not "
        "allowed",
        "        include a(N)",
        "                ^~~~",
    ], id="type-patterns-refer-to-each-other"),
    # -- defined twice
    pytest.param(pat("space seq(N)\nattend k <= q", "N: int, N: int"), attndsl.AttnNameError, [
        "<string>:1:19: error: parameter 'N' is declared twice",
        "    pattern p(N: int, N: int) {",
        "                      ^",
    ], id="duplicate-parameter"),
    pytest.param(pat("space seq(N)\nattend k <= q") + pat("space seq(N)\nattend k >= q"),
                 attndsl.AttnNameError, [
        "<string>:5:9: error: 'p' is defined twice (first at line 1)",
        "    pattern p(N: int) {",
        "            ^",
    ], id="duplicate-pattern"),
    pytest.param(pat("space seq(N)\nspace seq(N)\nattend k <= q"), attndsl.AttnSyntaxError, [
        "<string>:3:5: error: the query and key spaces are declared twice",
        "        space seq(N)",
        "        ^~~~~~~~~~~~",
    ], id="duplicate-space"),
    pytest.param(pat("space seq(N)\nheads 2\nheads 4\nattend k <= q"), attndsl.AttnSyntaxError, [
        "<string>:4:5: error: 'heads' is declared twice",
        "        heads 4",
        "        ^~~~~~~",
    ], id="duplicate-heads"),
    # -- whole patterns
    pytest.param(pat("attend k <= q"), attndsl.AttnSyntaxError, [
        "<string>:1:9: error: pattern 'p' declares no space (add e.g. 'space seq(N)')",
        "    pattern p(N: int) {",
        "            ^",
    ], id="pattern-no-space"),
    pytest.param(pat("space seq(N)\nexclude k > q"), attndsl.AttnSyntaxError, [
        "<string>:1:9: error: pattern 'p' attends nothing: add an 'attend' rule",
        "    pattern p(N: int) {",
        "            ^",
    ], id="pattern-attends-nothing"),
    pytest.param(pat("space seq(N)\nattend k <= q or h == 0"), attndsl.AttnSyntaxError, [
        "<string>:3:22: error: the head index 'h' needs a 'heads N' declaration",
        "        attend k <= q or h == 0",
        "                         ^",
    ], id="pattern-h-without-heads"),
    pytest.param(pat("space seq(N)\nattend k <= q\non heads 0..2 {\n    attend true\n}"),
                 attndsl.AttnSyntaxError, [
        "<string>:4:5: error: 'on heads' needs a 'heads N' declaration before it",
        "        on heads 0..2 {",
        "        ^",
    ], id="pattern-on-heads-without-heads"),
    pytest.param(IMPORT_SW + pat("average sliding_window(N, 2), sliding_window(N, 4)\n"
                                 "attend k <= q"),
                 attndsl.AttnSyntaxError, [
        "<string>:2:9: error: 'average' combines whole patterns; it cannot be mixed with rules, "
        "scores, summaries or routing in the same pattern",
        "    pattern p(N: int) {",
        "            ^",
    ], id="pattern-average-mixed-with-rules"),
    pytest.param(IMPORT_SW + pat("average sliding_window(N, 2), sliding_window(N, 4)\n"
                                 "bias 0.5"),
                 attndsl.AttnSyntaxError, [
        "<string>:2:9: error: 'average' combines whole patterns; it cannot be mixed with rules, "
        "scores, summaries or routing in the same pattern",
        "    pattern p(N: int) {",
        "            ^",
    ], id="pattern-average-mixed-with-bias"),
    pytest.param(pat("space seq(N)\nheads 4\nattend k <= q\non heads 0..2 {\n    scale 2.0\n}"),
                 attndsl.AttnSyntaxError, [
        "<string>:6:9: error: 'scale' applies to all heads; it cannot be inside 'on heads'",
        "            scale 2.0",
        "            ^~~~~~~~~",
    ], id="pattern-scale-inside-on-heads"),
    pytest.param(pat("space seq(N)\nheads 4\nattend k <= q\nroute N top 1 shared 1"),
                 attndsl.AttnNameError, [
        "<string>:5:5: error: 'route' needs a run-time input, and 'N' is not one",
        "        route N top 1 shared 1",
        "        ^~~~~~~~~~~~~~~~~~~~~~",
    ], id="pattern-route-without-input"),
]


@pytest.mark.parametrize(("source", "cls", "lines"), CHECK_CASES)
def test_check_reports_located_error(source, cls, lines):
    assert_report(error_of(attndsl.check, source), cls, lines)


def test_too_deep_nesting_is_a_located_error_not_a_recursion_error():
    source = pat("space seq(N)\nattend\n" + "not\n" * 150 + "true")
    err = error_of(attndsl.check, source)
    assert_report(err, attndsl.AttnSyntaxError, [
        "<string>:102:5: error: expression nested too deeply (more than 100 levels); split it "
        "with 'let'",
        "        not",
        "        ^",
    ])
    long_sum = pat("space seq(N)\nattend k <= q" + " + 1" * 3000)
    err = error_of(attndsl.check, long_sum)
    assert type(err) is attndsl.AttnSyntaxError
    assert err.span.line == 3 and err.span.col == 17


def test_deep_chains_of_functions_are_a_located_error():
    fns = "".join(f"fn f{i}(x: int) -> int = f{i + 1}(x) + 1\n" for i in range(300))
    source = fns + "fn f300(x: int) -> int = x\n" + pat("space seq(N)\nattend f0(q) >= k")
    err = error_of(attndsl.compile, source, N=4)
    assert type(err) is attndsl.AttnTypeError
    assert err.message == ("expression nested too deeply (more than 160 levels, counting the "
                           "bodies of called functions)")
    assert err.span.file == "<string>"


# ------------------------------------------------------------------ binding parameters

COMPILE_CASES = [
    pytest.param(NB, dict(pattern="na2d", H=8, W=16, kernel=(3, 5), dilation=3),
                 attndsl.ConstraintError, [
        std(NB, "require kernel * dilation <= (H, W)") + ":13: error: kernel * dilation must not "
        "exceed the grid on axis 0 (got kernel=(3, 5), dilation=(3, 3), H=8, W=16)",
        '        require kernel * dilation <= (H, W), "kernel * dilation must not exceed the '
        'grid"',
        "                ^~~~~~~~~~~~~~~~~~~~~~~~~~~",
    ], id="constraint-na2d-kernel-times-dilation"),
    pytest.param(NB, dict(pattern="na1d", N=8, kernel=3, dilation=3), attndsl.ConstraintError, [
        std(NB, "require kernel * dilation <= N,") + ":13: error: kernel * dilation must not "
        "exceed the sequence length (got kernel=3, dilation=3, N=8)",
        '        require kernel * dilation <= N, "kernel * dilation must not exceed the sequence '
        'length"',
        "                ^~~~~~~~~~~~~~~~~~~~~~",
    ], id="constraint-na1d-kernel-times-dilation"),
    pytest.param(MOH, dict(N=4, heads=4, shared=5, topk=1), attndsl.ConstraintError, [
        std(MOH, "require 0 <= shared") + ":13: error: shared must be between 0 and heads (got "
        "shared=5, heads=4)",
        '        require 0 <= shared <= heads, "shared must be between 0 and heads"',
        "                ^~~~~~~~~~~~~~~~~~~~",
    ], id="constraint-moh-shared-heads"),
    pytest.param(pat("space seq(N)\nheads 4\nattend k <= q\non heads 2..6 {\n    attend true\n}"),
                 dict(N=4), attndsl.ConstraintError, [
        "<string>:5:14: error: head range 2..6 must satisfy 0 <= lo < hi <= heads (4)",
        "        on heads 2..6 {",
        "                 ^~~~",
    ], id="constraint-head-range"),
    pytest.param(pat("space seq(N - 4)\nattend k <= q"), dict(N=4), attndsl.ConstraintError, [
        "<string>:2:15: error: space size must be at least 1, not 0",
        "        space seq(N - 4)",
        "                  ^~~~~",
    ], id="constraint-space-size"),
    pytest.param(NB, dict(pattern="na1d", N=8, kernal=3), attndsl.ParameterError, [
        std(NB, "pattern na1d(") + ":9: error: pattern 'na1d' has no parameter 'kernal' (did you "
        "mean 'kernel'?)",
        "    pattern na1d(N: int, kernel: int, dilation: int = 1, stride: int = 1, causal: bool = "
        "false) {",
        "            ^~~~",
    ], id="parameter-unknown"),
    pytest.param(NB, dict(pattern="na1d", N=8), attndsl.ParameterError, [
        std(NB, "pattern na1d(") + ":9: error: pattern 'na1d' needs parameter 'kernel' (int)",
        "    pattern na1d(N: int, kernel: int, dilation: int = 1, stride: int = 1, causal: bool = "
        "false) {",
        "            ^~~~",
    ], id="parameter-missing"),
    pytest.param(NB, dict(pattern="na1d", N=8, kernel=3.5), attndsl.ParameterError, [
        std(NB, "pattern na1d(") + ":22: error: parameter 'kernel' must be int, not float 3.5",
        "    pattern na1d(N: int, kernel: int, dilation: int = 1, stride: int = 1, causal: bool = "
        "false) {",
        "                         ^~~~~~",
    ], id="parameter-float-for-int"),
    pytest.param(NB, dict(pattern="na1d", N=True, kernel=3), attndsl.ParameterError, [
        std(NB, "pattern na1d(") + ":14: error: parameter 'N' must be int, not bool True",
        "    pattern na1d(N: int, kernel: int, dilation: int = 1, stride: int = 1, causal: bool = "
        "false) {",
        "                 ^",
    ], id="parameter-bool-for-int"),
    pytest.param(NB, dict(pattern="na1d", N=8, kernel=3, causal=1), attndsl.ParameterError, [
        std(NB, "pattern na1d(") + ":71: error: parameter 'causal' must be bool, not int 1",
        "    pattern na1d(N: int, kernel: int, dilation: int = 1, stride: int = 1, causal: bool = "
        "false) {",
        "                                                                          ^~~~~~",
    ], id="parameter-int-for-bool"),
    pytest.param(NB, dict(pattern="na2d", H=8, W=8, kernel=(3, 3, 3)), attndsl.ParameterError, [
        std(NB, "pattern na2d(") + ":30: error: parameter 'kernel' takes one value or 2 (one per "
        "axis), not 3",
        "    pattern na2d(H: int, W: int, kernel: int[2], dilation: int[2] = 1, stride: int[2] = "
        "1,",
        "                                 ^~~~~~",
    ], id="parameter-tuple-length"),
    pytest.param(NB, dict(pattern="na1d", N=8, kernel=(3, 3)), attndsl.ParameterError, [
        std(NB, "pattern na1d(") + ":22: error: parameter 'kernel' must be int, not a sequence",
        "    pattern na1d(N: int, kernel: int, dilation: int = 1, stride: int = 1, causal: bool = "
        "false) {",
        "                         ^~~~~~",
    ], id="parameter-tuple-for-scalar"),
    pytest.param(NB, dict(pattern="na1d", N=1 << 70, kernel=3), attndsl.ParameterError, [
        std(NB, "pattern na1d(") + ":14: error: parameter 'N' = 1180591620717411303424 does not "
        "fit in 64 bits",
        "    pattern na1d(N: int, kernel: int, dilation: int = 1, stride: int = 1, causal: bool = "
        "false) {",
        "                 ^",
    ], id="parameter-beyond-64-bits"),
    pytest.param(NB, dict(pattern="na2", H=8), attndsl.AttnNameError, [
        "error: 'patterns/neighborhood.attn' has no pattern 'na2' (did you mean 'na2d'?)",
    ], id="parameter-unknown-pattern"),
    pytest.param(NB, {}, attndsl.ParameterError, [
        "error: 'patterns/neighborhood.attn' defines 3 patterns (na1d, na2d, na3d); choose one "
        "with pattern=...",
    ], id="parameter-no-pattern-chosen"),
    pytest.param("## only a constant\nconst C = 1\n", {}, attndsl.ParameterError, [
        "error: '<string>' defines no pattern",
    ], id="parameter-file-without-patterns"),
    pytest.param(pat("let w = N // (N - 4)\nspace seq(N)\nattend k <= q"), dict(N=4),
                 attndsl.EvaluationError, [
        "<string>:2:13: error: division by zero",
        "        let w = N // (N - 4)",
        "                ^~~~~~~~~~~~",
    ], id="evaluation-static-division-by-zero"),
    pytest.param(pat("let w = N ** 20\nspace seq(N)\nattend k <= q"), dict(N=16),
                 attndsl.EvaluationError, [
        "<string>:2:13: error: integer overflow: 1208925819614629174706176 does not fit in a "
        "signed 64-bit integer",
        "        let w = N ** 20",
        "                ^~~~~~~",
    ], id="evaluation-integer-overflow"),
    pytest.param(pat("space seq(N)\nattend k <= q\nscale (0.0 - s) ** 0.5", "N: int, s: float"),
                 dict(N=4, s=2.0), attndsl.EvaluationError, [
        "<string>:4:11: error: a negative number (-2.0) cannot be raised to a fractional power "
        "(0.5)",
        "        scale (0.0 - s) ** 0.5",
        "              ^~~~~~~~~~~~~~~~",
    ], id="evaluation-fractional-power-of-negative"),
    pytest.param(pat("space seq(floor(s * 1e308))\nattend k <= q", "s: float"), dict(s=10.0),
                 attndsl.EvaluationError, [
        "<string>:2:15: error: floor of inf is not an integer",
        "        space seq(floor(s * 1e308))",
        "                  ^~~~~~~~~~~~~~~~",
    ], id="evaluation-floor-of-infinity"),
    pytest.param(pat("space seq(N)\nattend k <= q\nscale 0.0 ** (0 - 1)"), dict(N=4),
                 attndsl.EvaluationError, [
        "<string>:4:11: error: 0 cannot be raised to a negative power (-1)",
        "        scale 0.0 ** (0 - 1)",
        "              ^~~~~~~~~~~~~~",
    ], id="evaluation-zero-to-negative-power"),
]


@pytest.mark.parametrize(("source", "params", "cls", "lines"), COMPILE_CASES)
def test_compile_reports_located_error(source, params, cls, lines):
    assert_report(error_of(attndsl.compile, source, **params), cls, lines)


# ------------------------------------------------------------------ masks, inputs, tensors

Q = torch.randn(1, 2, 8, 4)


def _doc():
    return attndsl.compile(DOC, pattern="document_causal", N=4)


def _window():
    return attndsl.compile(SLIDING, pattern="sliding_window", N=8, window=3)


RUNTIME_CASES = [
    pytest.param(lambda: attndsl.compile(pat("space seq(N)\nattend k <= q // (k - k)"),
                                         N=4).mask(),
                 attndsl.EvaluationError, [
        "<string>:3:17: error: division by zero",
        "        attend k <= q // (k - k)",
        "                    ^~~~~~~~~~~~",
    ], id="evaluation-division-by-zero-in-mask"),
    pytest.param(lambda: attndsl.compile(pat("space seq(N)\nattend (q >> (k - 2)) == 0"),
                                         N=4).mask(),
                 attndsl.EvaluationError, [
        "<string>:3:13: error: negative shift count",
        "        attend (q >> (k - 2)) == 0",
        "                ^~~~~~~~~~~~",
    ], id="evaluation-negative-shift"),
    pytest.param(lambda: attndsl.compile(pat("space seq(N)\ninput seg: int[*]\n"
                                             "attend seg[q] == seg[k]"), N=4)
                 .mask(seg=torch.tensor([0, 0, 1])),
                 attndsl.EvaluationError, [
        "<string>:4:12: error: index 3 is out of range for an input of length 3",
        "        attend seg[q] == seg[k]",
        "               ^~~~~~",
    ], id="evaluation-input-index-out-of-range"),
    pytest.param(lambda: _doc().mask(), attndsl.InputError, [
        std(DOC, "input doc:") + ":11: error: pattern 'document_causal' needs run-time input "
        "'doc' (int[4])",
        "        input doc: int[N]",
        "              ^~~",
    ], id="input-missing"),
    pytest.param(lambda: _doc().mask(doc=torch.zeros(5, dtype=torch.long)), attndsl.InputError, [
        std(DOC, "input doc:") + ":11: error: run-time input 'doc' must have shape [4], not [5]",
        "        input doc: int[N]",
        "              ^~~",
    ], id="input-wrong-shape"),
    pytest.param(lambda: _doc().mask(doc=torch.zeros(4)), attndsl.InputError, [
        std(DOC, "input doc:") + ":11: error: run-time input 'doc' must have an integer dtype, "
        "not torch.float32",
        "        input doc: int[N]",
        "              ^~~",
    ], id="input-wrong-dtype"),
    pytest.param(lambda: _doc().mask(doc=torch.zeros(4, dtype=torch.long), dco=1),
                 attndsl.AttnNameError, [
        std(DOC, "pattern document_causal(") + ":9: error: pattern 'document_causal' has no "
        "run-time input 'dco' (did you mean 'doc'?)",
        "    pattern document_causal(N: int) {",
        "            ^~~~~~~~~~~~~~~",
    ], id="input-unknown-name"),
    pytest.param(lambda: _doc().mask(doc=[0, 0, "a", 1]), attndsl.InputError, [
        std(DOC, "input doc:") + ":11: error: run-time input 'doc' must be a tensor or number, "
        "not list",
        "        input doc: int[N]",
        "              ^~~",
    ], id="input-not-a-tensor"),
    pytest.param(lambda: attndsl.compile(DOC, pattern="prefix_lm", N=4)
                 .mask(prefix=torch.tensor([1, 2])),
                 attndsl.InputError, [
        std(DOC, "input prefix") + ":11: error: run-time input 'prefix' must be a scalar, not "
        "shape [2]",
        "        input prefix: int",
        "              ^~~~~~",
    ], id="input-not-a-scalar"),
    pytest.param(lambda: attndsl.compile("patterns/dhsa.attn", "dhsa", N=16).mask(),
                 attndsl.InputError, [
        std(DHSA, "pattern dhsa(") + ":9: error: pattern 'dhsa' depends on q and k: call "
        "mask(q=..., k=...)",
        "    pattern dhsa(N: int, block: int = 128, chunk: int = 64, budget: int = 2048,",
        "            ^~~~",
    ], id="input-content-dependent-mask-without-q-k"),
    pytest.param(lambda: attndsl.compile(MOH, N=4, heads=4, shared=1, topk=1)(
                     torch.randn(1, 4, 4, 8), torch.randn(1, 4, 4, 8), torch.randn(1, 4, 4, 8),
                     router=torch.randn(2, 4, 3)),
                 attndsl.InputError, [
        std(MOH, "input router") + ":11: error: router 'router' must have shape [1, 4, 3], not "
        "[2, 4, 3]",
        "        input router: float[*, N, heads - shared]",
        "              ^~~~~~",
    ], id="input-router-shape"),
    pytest.param(lambda: _window()(Q[0], Q, Q), attndsl.InputError, [
        std(SLIDING, "pattern sliding_window(") + ":9: error: q must have 4 dimensions [batch, "
        "heads, tokens, dim], not [2, 8, 4]",
        "    pattern sliding_window(N: int, window: int, causal: bool = true) {",
        "            ^~~~~~~~~~~~~~",
    ], id="tensor-rank"),
    pytest.param(lambda: _window()(Q, Q.double(), Q.double()), attndsl.InputError, [
        std(SLIDING, "pattern sliding_window(") + ":9: error: q, k, v must share one dtype, not "
        "torch.float32, torch.float64, torch.float64",
        "    pattern sliding_window(N: int, window: int, causal: bool = true) {",
        "            ^~~~~~~~~~~~~~",
    ], id="tensor-dtype-mismatch"),
    pytest.param(lambda: _window()(Q, torch.randn(1, 2, 7, 4), torch.randn(1, 2, 7, 4)),
                 attndsl.InputError, [
        std(SLIDING, "space seq(N)", after="pattern sliding_window(") + ":5: error: k has 7 "
        "tokens; pattern 'sliding_window' has 8 keys (8)",
        "        space seq(N)",
        "        ^~~~~~~~~~~~",
    ], id="tensor-token-count"),
    pytest.param(lambda: _window()(torch.randn(1, 3, 8, 4), Q, Q), attndsl.InputError, [
        std(SLIDING, "pattern sliding_window(") + ":9: error: query heads (3) must be a multiple "
        "of key/value heads (2)",
        "    pattern sliding_window(N: int, window: int, causal: bool = true) {",
        "            ^~~~~~~~~~~~~~",
    ], id="tensor-gqa-heads"),
    pytest.param(lambda: _window()(Q.long(), Q.long(), Q.long()), attndsl.InputError, [
        std(SLIDING, "pattern sliding_window(") + ":9: error: q must be float16, bfloat16, "
        "float32 or float64, not torch.int64",
        "    pattern sliding_window(N: int, window: int, causal: bool = true) {",
        "            ^~~~~~~~~~~~~~",
    ], id="tensor-int-dtype"),
    pytest.param(lambda: _window()(Q.tolist(), Q, Q), attndsl.InputError, [
        std(SLIDING, "pattern sliding_window(") + ":9: error: q must be a torch.Tensor, not list",
        "    pattern sliding_window(N: int, window: int, causal: bool = true) {",
        "            ^~~~~~~~~~~~~~",
    ], id="tensor-not-a-tensor"),
    pytest.param(lambda: _window()(Q, torch.randn(1, 2, 8, 5), torch.randn(1, 2, 8, 5)),
                 attndsl.InputError, [
        std(SLIDING, "pattern sliding_window(") + ":9: error: q and k must have the same head "
        "dim, not 4 and 5",
        "    pattern sliding_window(N: int, window: int, causal: bool = true) {",
        "            ^~~~~~~~~~~~~~",
    ], id="tensor-head-dim"),
    pytest.param(lambda: attndsl.compile(MOH, N=8, heads=4, shared=1, topk=1)(
                     Q, Q, Q, router=torch.randn(1, 8, 3)),
                 attndsl.InputError, [
        std(MOH, "heads heads") + ":11: error: pattern 'moh' is declared for 4 heads; q has 2",
        "        heads heads",
        "              ^~~~~",
    ], id="tensor-declared-heads"),
    pytest.param(lambda: _window()(Q, Q, Q, backend="refrence"), attndsl.UnsupportedError, [
        "error: unknown backend 'refrence' (did you mean 'reference'?); the backends are "
        "reference, triton, cpu, flex, auto",
    ], id="backend-unknown"),
    pytest.param(lambda: _window()(Q, Q, Q, backend="gpu"), attndsl.UnsupportedError, [
        "error: unknown backend 'gpu': a device, not a backend; move q, k and v to the GPU and "
        "keep backend='auto' (or pass 'triton'); the backends are reference, triton, cpu, "
        "flex, auto",
    ], id="backend-not-available"),
    pytest.param(lambda: _window()(Q, Q, Q, backend="cuda"), attndsl.UnsupportedError, [
        "error: unknown backend 'cuda': a device, not a backend; move q, k and v to the GPU "
        "and keep backend='auto' (or pass 'triton'); the backends are reference, triton, cpu, "
        "flex, auto",
    ], id="backend-device-name"),
    pytest.param(lambda: _window()(Q, Q, Q, scal=0.5), attndsl.AttnNameError, [
        std(SLIDING, "pattern sliding_window(") + ":9: error: pattern 'sliding_window' has no "
        "run-time input 'scal' (did you mean 'scale'?)",
        "    pattern sliding_window(N: int, window: int, causal: bool = true) {",
        "            ^~~~~~~~~~~~~~",
    ], id="call-option-misspelt"),
    pytest.param(lambda: _window()(Q, Q, Q, scale=-1.0), attndsl.ParameterError, [
        "error: scale must be a positive number, not -1.0",
    ], id="call-negative-scale"),
    pytest.param(lambda: attndsl.compile(pat("space seq(N)\nattend k <= q\n"
                                             "summary r(i: 1 << 40) {\n    member k == r.i\n"
                                             "    attend r.i < q\n}"), N=4).summaries(),
                 attndsl.SizeLimitError, [
        "<string>:4:13: error: summary 'r' has 1,099,511,627,776 tokens; too many: its "
        "member and attend masks (1,099,511,627,776 x 4 entries) are built whole, up to "
        "268,435,456",
        "        summary r(i: 1 << 40) {",
        "                ^",
    ], id="size-summary-tokens"),
]


@pytest.mark.parametrize(("thunk", "cls", "lines"), RUNTIME_CASES)
def test_run_time_reports_located_error(thunk, cls, lines):
    assert_report(error_of(thunk), cls, lines)


def test_huge_sizes_fail_fast_without_allocating():
    t0 = time.perf_counter()
    op = attndsl.compile(NB, pattern="na1d", N=1 << 20, kernel=3)
    err = error_of(op.mask)
    assert_report(err, attndsl.SizeLimitError, [
        std(NB, "pattern na1d(") + ":9: error: a dense mask of 1 x 1048576 x 1048576 = "
        "1,099,511,627,776 entries exceeds the reference limit of 268,435,456 (2^28); the "
        "reference backend is dense by design, use smaller sizes to inspect masks",
        "    pattern na1d(N: int, kernel: int, dilation: int = 1, stride: int = 1, causal: "
        "bool = false) {",
        "            ^~~~",
    ])
    z = torch.zeros(1, 1, 1 << 20, 1)
    err = error_of(op, z, z, z, backend="reference")
    assert type(err) is attndsl.SizeLimitError
    assert err.message.startswith("the reference backend holds all 1x1x1048576x1048576 = "
                                  "1,099,511,627,776 scores at once")
    heads = attndsl.compile(pat("space seq(N)\nheads 1 << 40\nattend k <= q or h == 0"), N=4)
    assert type(error_of(heads.mask)) is attndsl.SizeLimitError
    assert time.perf_counter() - t0 < 5.0


# ------------------------------------------------------------------ files and imports


def test_import_errors_name_the_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a.attn").write_text('import "b.attn"\n' + pat("space seq(N)\nattend k <= q"))
    (tmp_path / "b.attn").write_text('import "a.attn"\nfn yes() -> bool = true\n')
    assert_report(error_of(attndsl.check, "a.attn"), attndsl.ImportFailure, [
        "b.attn:1:1: error: import cycle: a.attn -> b.attn -> a.attn",
        '    import "a.attn"',
        "    ^~~~~~~~~~~~~~~",
    ])
    (tmp_path / "c.attn").write_text('import "missing.attn"\n'
                                     'from "sliding.attn" import sliding_windo\n'
                                     + pat("space seq(N)\nattend k <= q"))
    err = error_of(attndsl.check, "c.attn")
    assert type(err) is attndsl.AttnErrors
    assert [type(e) for e in err.errors] == [attndsl.ImportFailure, attndsl.AttnNameError]
    assert str(err) == "\n".join([
        "c.attn:1:1: error: cannot find imported file 'missing.attn'",
        '    import "missing.attn"',
        "    ^~~~~~~~~~~~~~~~~~~~~",
        "c.attn:2:1: error: 'sliding.attn' defines no 'sliding_windo' (did you mean "
        "'sliding_window'?)",
        '    from "sliding.attn" import sliding_windo',
        "    ^~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~",
    ])
    (tmp_path / "d.attn").write_text(pat("space seq(N)\nattend k <= q\n}"))
    assert_report(error_of(attndsl.check, "d.attn"), attndsl.AttnSyntaxError, [
        "d.attn:5:1: error: unexpected '}' (expected 'const', 'fn', 'from', 'import', "
        "'pattern')",
        "    }",
        "    ^",
    ])
    (tmp_path / "bin.attn").write_bytes(b"\xff\xfe\x00")
    assert_report(error_of(attndsl.check, tmp_path / "bin.attn"), attndsl.AttnSyntaxError, [
        "bin.attn:1:1: error: the file is not UTF-8 text: byte 0xff (invalid start byte)",
        "    \ufffd\ufffd\ufffd",
        "    ^",
    ])
    (tmp_path / "latin1.attn").write_bytes(b"const a = 1\r\nconst b = 2\rconst caf\xe9 = 3\n")
    assert_report(error_of(attndsl.check, "latin1.attn"), attndsl.AttnSyntaxError, [
        "latin1.attn:3:10: error: the file is not UTF-8 text: byte 0xe9 (invalid "
        "continuation byte)",
        "    const caf\ufffd = 3",
        "             ^",
    ])


def test_missing_source_file_and_wrong_source_type():
    err = error_of(attndsl.check, "nofile.attn")
    assert_report(err, attndsl.ImportFailure, ["error: no such .attn file: 'nofile.attn'"])
    assert_report(error_of(attndsl.compile, None), attndsl.ImportFailure,
                  ["error: expected .attn source text or a file path, not NoneType"])


# ------------------------------------------------------------------ classes, several errors


def test_error_classes_are_exported_attn_errors():
    names = ["AttnSyntaxError", "AttnNameError", "AttnTypeError", "ConstraintError",
             "ParameterError", "InputError", "EvaluationError", "SizeLimitError",
             "UnsupportedError", "ImportFailure", "AttnErrors"]
    for name in names:
        cls = getattr(attndsl, name)
        assert issubclass(cls, attndsl.AttnError) and issubclass(cls, Exception)
        assert name in attndsl.__all__
    kinds = {p.values[-2] for p in CHECK_CASES + COMPILE_CASES + RUNTIME_CASES}
    kinds.add(attndsl.ImportFailure)  # in test_import_errors_name_the_file
    assert {getattr(attndsl, n) for n in names} == kinds  # each one is exercised


def test_every_error_of_a_file_is_reported_in_source_order():
    source = ("fn f(x: int) -> bool = x + 1\n"
              + pat("space seq(N)\nattend k <= q and widow > 0", name="a")
              + pat("space grid(N, N)\nattend q.pos == k.pos", name="b"))
    err = error_of(attndsl.check, source)
    assert type(err) is attndsl.AttnErrors
    assert [type(e) for e in err.errors] == [attndsl.AttnTypeError, attndsl.AttnNameError,
                                             attndsl.AttnTypeError]
    assert err.message == "3 errors"
    assert str(err) == "\n".join([
        "<string>:1:24: error: function 'f' returns int, declared bool",
        "    fn f(x: int) -> bool = x + 1",
        "                           ^~~~~",
        "<string>:4:23: error: unknown name 'widow'",
        "        attend k <= q and widow > 0",
        "                          ^~~~~",
        "<string>:8:12: error: 'attend' needs a bool, not bool[2] (reduce a per-axis bool with "
        "all() or any())",
        "        attend q.pos == k.pos",
        "               ^~~~~~~~~~~~~~",
    ])


@pytest.mark.parametrize(("source", "message"), [
    pytest.param(pat("space seq(N)\nlet d = (q - k) * widow + 1\nattend d < 3 and k <= q\n"
                     "bias float(d)"),
                 "unknown name 'widow'", id="unknown-name-in-a-used-let"),
    pytest.param("fn near(w: int) -> bool = abs(q - k) < wnd\n"
                 + pat("space seq(N)\nattend near(2)", name="a")
                 + pat("space seq(N)\nattend near(3) or k == 0", name="b"),
                 "unknown name 'wnd'", id="error-in-a-function-called-twice"),
    pytest.param(pat("space seq(N)\nrequire N >= 2\nattend k <= q and k > N - 4", "N: integer"),
                 "unknown type 'integer' (did you mean 'int'?)", id="ill-typed-parameter"),
    pytest.param(pat("space sequence(N)\nlet d = q - k\nattend 0 <= d < 4"),
                 "unknown space kind 'sequence'", id="unknown-space-kind"),
    pytest.param(pat("let d = q - k\nattend 0 <= d < 4"),
                 "pattern 'p' declares no space (add e.g. 'space seq(N)')", id="no-space"),
    pytest.param(pat("space grid(N, N)\nattend all(abs(q.pos - k.pos) <= (rad, 1))"),
                 "unknown name 'rad'", id="unknown-name-in-a-tuple"),
    pytest.param(IMPORT_SW + pat("include sliding_windw(N, 4)\nattend k == 0"),
                 "unknown pattern 'sliding_windw' (did you mean 'sliding_window'?)",
                 id="unknown-included-pattern"),
    pytest.param(pat("query seq(N)\nkey gird(N, N)\nattend k <= q"),
                 "unknown space kind 'gird' (did you mean 'grid'?)", id="unknown-key-space"),
])
def test_one_mistake_gives_one_error(source, message):
    err = error_of(attndsl.check, source)
    assert not isinstance(err, attndsl.AttnErrors), str(err)
    assert err.message == message


# ------------------------------------------------------------------ no Python execution


def test_attn_source_cannot_run_python(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    marker = tmp_path / "HACKED"
    attempts = {
        '__import__("os").system("touch HACKED") == 0': (
            attndsl.AttnSyntaxError, "<string>:3:23: error: unexpected '\"os\"'"),
        "__import__('os').system('touch HACKED') == 0": (
            attndsl.AttnSyntaxError, "<string>:3:23: error: unexpected character '''"),
        "q.__class__ == k": (
            attndsl.AttnNameError, "<string>:3:12: error: token<q> has no field '__class__'"),
        "N.__class__.__bases__ == k": (
            attndsl.AttnTypeError, "<string>:3:12: error: int has no fields"),
        "eval(1) == k": (
            attndsl.AttnNameError, "<string>:3:12: error: unknown function 'eval'"),
        "open(1) and exec(2)": (
            attndsl.AttnErrors, "<string>:3:12: error: unknown function 'open'"),
    }
    for expr, (cls, first) in attempts.items():
        err = error_of(attndsl.check, pat("space seq(N)\nattend " + expr))
        assert type(err) is cls
        assert str(err).split("\n")[0] == first
    # a require message is only ever text
    code = "__import__('os').system('touch HACKED')"
    err = error_of(attndsl.compile, pat(f'require N > 8, "{code}"\nspace seq(N)\nattend true'),
                   N=4)
    assert_report(err, attndsl.ConstraintError, [
        f"<string>:2:13: error: {code} (got N=4)",
        f'        require N > 8, "{code}"',
        "                ^~~~~",
    ])
    # a Python file cannot be imported at all; Python in a .attn file is read as .attn text,
    # never imported or run
    (tmp_path / "evil.py").write_text("open('HACKED', 'w').write('x')\n")
    err = error_of(attndsl.check, 'import "evil.py"\n' + pat("space seq(N)\nattend true"))
    assert_report(err, attndsl.ImportFailure, [
        "<string>:1:1: error: an import names a .attn file, not 'evil.py'",
        '    import "evil.py"',
        "    ^~~~~~~~~~~~~~~~",
    ])
    (tmp_path / "evil.attn").write_text("open('HACKED', 'w').write('x')\n")
    err = error_of(attndsl.check, 'import "evil.attn"\n' + pat("space seq(N)\nattend true"))
    assert_report(err, attndsl.AttnSyntaxError, [
        "evil.attn:1:1: error: unexpected 'open' (expected 'const', 'fn', 'from', 'import', "
        "'pattern')",
        "    open('HACKED', 'w').write('x')",
        "    ^~~~",
    ])
    assert not marker.exists()


# ------------------------------------------------------------------ CLI

BAD_FILE = ("fn f(x: int) -> bool = x + 1\n"
            "pattern p(N: int) {\n"
            "    space seq(N)\n"
            "    attend k <= q and widow > 0\n"
            "}\n")
BAD_FILE_REPORT = """\
bad.attn:1:24: error: function 'f' returns int, declared bool
    fn f(x: int) -> bool = x + 1
                           ^~~~~
bad.attn:4:23: error: unknown name 'widow'
        attend k <= q and widow > 0
                          ^~~~~
"""


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "bad.attn").write_text(BAD_FILE)
    (tmp_path / "good.attn").write_text(pat("space seq(N)\nattend k <= q"))
    (tmp_path / "defaults.attn").write_text(
        pat("require w <= N, \"w must not exceed N\"\nspace seq(N)\nattend k <= q",
            "N: int = 4, w: int = 8"))
    return tmp_path


def test_cli_check_prints_every_error_with_caret(in_tmp, capsys):
    assert main(["check", "bad.attn"]) == 1
    out = capsys.readouterr()
    assert out.err == BAD_FILE_REPORT
    assert out.out == ""


def test_cli_check_good_and_bad_files(in_tmp, capsys):
    assert main(["check", "good.attn"]) == 0
    assert capsys.readouterr().out == "good.attn: ok (1 pattern)\n"
    assert main(["check", "good.attn", "bad.attn", "defaults.attn"]) == 1
    out = capsys.readouterr()
    assert out.out == "good.attn: ok (1 pattern)\n"
    assert out.err == BAD_FILE_REPORT + (
        "defaults.attn:2:13: error: w must not exceed N (got w=8, N=4)\n"
        '        require w <= N, "w must not exceed N"\n'
        "                ^~~~~~\n")


@pytest.mark.parametrize(("args", "report"), [
    pytest.param(["mask", NB, "-p", "na1d", "--set", "N=abc", "--set", "kernel=3"],
                 "error: --set N=abc: cannot read value 'abc': expected an integer, a number, "
                 "true/false, or a comma-separated tuple\n", id="set-not-a-value"),
    pytest.param(["mask", NB, "-p", "na1d", "--set", "N"],
                 "error: --set takes NAME=VALUE, not 'N'\n", id="set-without-equals"),
    pytest.param(["show", NB, "-p", "na1d", "--set", "N=8", "--set", "kernel=3,3"],
                 std(NB, "pattern na1d(") + ":22: error: parameter 'kernel' must be int, not a "
                 "sequence\n"
                 "    pattern na1d(N: int, kernel: int, dilation: int = 1, stride: int = 1, "
                 "causal: bool = false) {\n"
                 "                         ^~~~~~\n", id="set-tuple-for-scalar"),
    pytest.param(["show", NB, "-p", "na1d", "--set", "N=8", "--set", "kernal=3"],
                 std(NB, "pattern na1d(") + ":9: error: pattern 'na1d' has no parameter "
                 "'kernal' (did you mean 'kernel'?)\n"
                 "    pattern na1d(N: int, kernel: int, dilation: int = 1, stride: int = 1, "
                 "causal: bool = false) {\n"
                 "            ^~~~\n", id="set-unknown-parameter"),
    pytest.param(["show", NB, "-p", "na3", "--set", "N=8"],
                 "error: 'patterns/neighborhood.attn' has no pattern 'na3' (did you mean "
                 "'na3d'?)\n", id="unknown-pattern"),
    pytest.param(["show", DOC, "-p", "document_causal", "--set", "N=4", "--input", "doc=1.5,2"],
                 std(DOC, "input doc:") + ":11: error: run-time input 'doc' must have an "
                 "integer dtype, not torch.float32\n"
                 "        input doc: int[N]\n"
                 "              ^~~\n", id="input-wrong-dtype"),
    pytest.param(["show", DOC, "-p", "document_causal", "--set", "N=4", "--input", "doc"],
                 "error: --input takes NAME=VALUE, not 'doc'\n", id="input-without-equals"),
    pytest.param(["show", NB, "-p", "na2d", "--set", "H=8", "--set", "W=8", "--set", "kernel=3",
                  "--width", "0"],
                 "error: --width must be at least 2, not 0\n", id="show-width"),
    pytest.param(["show", NB, "-p", "na2d", "--set", "H=8", "--set", "W=8", "--set", "kernel=3",
                  "--query", "9,9"],
                 "error: query (9, 9) is not a coordinate of the (8, 8) space\n",
                 id="show-query-outside"),
    pytest.param(["show", "patterns/dhsa.attn", "-p", "dhsa", "--set", "N=16", "--dim", "-1"],
                 "error: --dim must be at least 1, not -1\n", id="show-dim"),
    pytest.param(["mask", NB, "-p", "na1d", "--set", "N=1048576", "--set", "kernel=3"],
                 std(NB, "pattern na1d(") + ":9: error: a dense mask of 1 x 1048576 x 1048576 "
                 "= 1,099,511,627,776 entries exceeds the reference limit of 268,435,456 "
                 "(2^28); the reference backend is dense by design, use smaller sizes to "
                 "inspect masks\n"
                 "    pattern na1d(N: int, kernel: int, dilation: int = 1, stride: int = 1, "
                 "causal: bool = false) {\n"
                 "            ^~~~\n", id="mask-too-large"),
])
def test_cli_bad_options_exit_1_with_a_message(args, report, tmp_path, capsys):
    if args[0] == "mask":
        args = [*args, "-o", str(tmp_path / "m.npy")]
    assert main(args) == 1
    out = capsys.readouterr()
    assert out.err == report
    assert "Traceback" not in out.err + out.out


def test_cli_unwritable_output_is_a_message(tmp_path, capsys):
    target = tmp_path / "no" / "such" / "dir" / "m.npy"
    args = ["mask", SLIDING, "-p", "sliding_window", "--set", "N=8", "--set", "window=3"]
    assert main([*args, "-o", str(target)]) == 1
    assert capsys.readouterr().err == f"error: No such file or directory: '{target}'\n"


def test_console_script_check_bad_file(in_tmp):
    exe = shutil.which("attndsl") or str(Path(sys.executable).parent / "attndsl")
    proc = subprocess.run([exe, "check", "bad.attn"], capture_output=True, text=True,
                          timeout=120, cwd=in_tmp)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stdout + proc.stderr
    assert proc.stderr == BAD_FILE_REPORT


# ------------------------------------------------------------------ random mutations

STD_TEXTS = {p.name: p.read_text() for p in sorted((ROOT / "patterns").glob("*.attn"))}
TOKENS = ["(", ")", "{", "}", "[", "]", ",", ":", "=", "==", "<", "<=", ">>", "<<", "..", ".",
          "+", "-", "*", "/", "//", "%", "**", "~", "&", "|", "^", "and", "or", "not", "if",
          "then", "else", "let", "in", "q", "k", "h", "N", "0", "1", "2", "-1", "1.5", "true",
          "false", "attend", "exclude", "within", "space", "seq", "grid", "heads", "require",
          "input", "summary", "member", "include", "average", "on", "fn", "pattern", "const",
          "import", '"x.attn"', '"', "\n", " ", "#", "##", "int", "bool", "float", "int[2]",
          "all", "any", "pos", "shape", "optional", "route", "bias", "scale", "keys", "values",
          "1 << 62", "99999999999999999999", "$", "@"]
LEXEME = re.compile(r"\w+|[^\w\s]")


@st.composite
def mutated_source(draw):
    name = draw(st.sampled_from(sorted(STD_TEXTS)))
    text = STD_TEXTS[name]
    for _ in range(draw(st.integers(1, 3))):
        how = draw(st.sampled_from(["delete", "insert", "replace", "replace-token",
                                    "delete-token"]))
        if how in ("replace-token", "delete-token"):
            lexemes = list(LEXEME.finditer(text))
            m = lexemes[draw(st.integers(0, len(lexemes) - 1))]
            new = draw(st.sampled_from(TOKENS)) if how == "replace-token" else ""
            text = text[:m.start()] + new + text[m.end():]
            continue
        i = draw(st.integers(0, len(text)))
        new = draw(st.sampled_from(TOKENS)) if how != "delete" else ""
        text = text[:i] + new + text[i + (how != "insert"):]
    return text + "\n"


def _small(t: attndsl.lang.ir.Type):
    value = {"int": 4, "bool": False, "float": 0.5}.get(t.kind, 4)
    return value if t.n is None else (value,) * t.n


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated_source())
def test_mutated_standard_files_check_or_raise_attn_error(source):
    try:
        checked = attndsl.check(source)
    except attndsl.AttnError as e:
        assert str(e)  # renders
        return
    for name, cp in list(checked.items())[:2]:
        params = {p.name: _small(t) for p, t in cp.params if p.default is None}
        try:
            op = attndsl.compile(source, pattern=name, **params)
            if op.bound.nq * op.bound.nk <= 1 << 12 and not op.inputs:
                op.mask(**({"q": torch.randn(1, op.heads or 1, op.bound.nq, 4),
                            "k": torch.randn(1, op.heads or 1, op.bound.nk, 4)}
                           if op.bound.content_dependent else {}))
        except attndsl.AttnError as e:
            assert str(e)
