"""Golden files: the typed IR of every standard pattern, printed."""

from __future__ import annotations

from pathlib import Path

import pytest

import attndsl
from attndsl.lang.printer import expr_source, pattern_tree

ROOT = Path(__file__).resolve().parent.parent
STD = sorted(p for p in (ROOT / "patterns").glob("*.attn") if p.name != "prelude.attn")
CASES = [(f.name, name) for f in STD for name in attndsl.check(f"patterns/{f.name}")]


@pytest.mark.parametrize("file,pattern", CASES, ids=[c[1] for c in CASES])
def test_typed_ir(golden, file, pattern):
    checked = attndsl.check(f"patterns/{file}")[pattern]
    golden(f"ir/{pattern}.txt", pattern_tree(checked))


def test_every_standard_pattern_has_a_golden_file():
    names = {p for _, p in CASES}
    files = {p.stem for p in (ROOT / "tests" / "golden" / "ir").glob("*.txt")}
    assert names == files


def test_expr_source_round_trips():
    """Printing an expression and parsing it again gives the same printed text."""
    from attndsl.lang.parser import parse_text
    exprs = ["a + b * c", "(a + b) * c", "-a ** 2", "(-a) ** 2", "a - (b - c)", "a - b - c",
             "not a < b and c", "if a then b else c", "x[0].y", "f(a, b = 2)", "(1,)",
             "a << 1 | b & 3 ^ c", "1 <= a < b", "let t = a in t + 1", "2 ** 3 ** 2"]
    for text in exprs:
        item = parse_text(f"const Z = {text}", "<t>")[0]
        printed = expr_source(item.value)
        again = parse_text(f"const Z = {printed}", "<t>")[0]
        assert expr_source(again.value) == printed, text
