"""What a new user meets first (issue 13): the CLI's version, help texts and options, its
messages for common mistakes (exact), the language trap of a result line glued onto a `let`,
and the wording of the analysis reports."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pytest
import torch

import attndsl
from attndsl.cli import build_parser, main
from attndsl.report import analysis_table, coverage_text

NB = "patterns/neighborhood.attn"
DOC = "patterns/document.attn"
SLIDING = "patterns/sliding.attn"


def run(capsys, *args) -> tuple[int, str, str]:
    code = main(list(args))
    out = capsys.readouterr()
    assert "Traceback" not in out.out + out.err
    return code, out.out, out.err


# ------------------------------------------------------------------ version and help


def test_version(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"attndsl {attndsl.__version__} (torch {torch.__version__}, Python ")


def test_every_verb_has_a_description():
    parser = build_parser()
    (verbs,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    assert set(verbs.choices) == {"check", "list", "mask", "show", "analyze", "compare",
                                  "compile", "bench", "cp-plan", "eval"}
    for name, sub in verbs.choices.items():
        assert sub.description and len(sub.description) > 40, name


def test_analyze_json_help_says_it_prints_the_report(capsys):
    with pytest.raises(SystemExit):
        main(["analyze", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "print the report as JSON instead (its schema: docs/analysis.md)" in text
    assert "schema instead" not in text


# ------------------------------------------------------------------ mask, show, check


def test_mask_writes_exactly_the_file_it_names(tmp_path, capsys):
    target = tmp_path / "m.txt"
    code, out, _ = run(capsys, "mask", SLIDING, "-p", "sliding_window", "--set", "N=6",
                       "--set", "window=2", "-o", str(target))
    assert code == 0 and out.startswith(f"wrote {target}: bool [6, 6]")
    assert target.exists() and not (tmp_path / "m.txt.npy").exists()
    m = np.load(target)
    i = np.arange(6)
    assert (m == ((i[:, None] - i[None, :] >= 0) & (i[:, None] - i[None, :] < 2))).all()


def test_show_query_on_a_sequence_lists_its_keys(capsys):
    code, out, _ = run(capsys, "show", "power.attn", "-p", "power_attention", "--set", "N=64",
                       "--set", "block=4", "--set", "window=1", "--set", "sink=0",
                       "--query", "41")
    # block 10: itself, blocks 9, 8, 6 and 2 back (distances 1, 2, 4, 8)
    assert code == 0
    assert out.splitlines()[-1] == "keys of query 41: 8..11, 24..27, 32..41 (18 of 64)"


@pytest.mark.parametrize("query,message", [
    ("64", "error: query 64 is out of range (0..63)\n"),
    ("-1", "error: query -1 is out of range (0..63)\n"),
    ("3,4", "error: query (3, 4) is not a coordinate of the (64,) space\n"),
])
def test_show_query_on_a_sequence_is_checked(capsys, query, message):
    code, out, err = run(capsys, "show", SLIDING, "-p", "sliding_window", "--set", "N=64",
                         "--set", "window=3", "--query", query)
    assert (code, out, err) == (1, "", message)


def test_check_refuses_an_empty_file(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    Path("empty.attn").write_text("# nothing here yet\n")
    code, out, err = run(capsys, "check", "empty.attn")
    assert (code, out) == (1, "")
    assert err == ("error: 'empty.attn' defines nothing: no pattern, fn, const or import (an "
                   "empty file?)\n")


@pytest.mark.parametrize("args,message", [
    (["--set", "N=8", "--set", "window=three"],
     "error: --set window=three: cannot read value 'three': expected an integer, a number, "
     "true/false, or a comma-separated tuple\n"),
    (["--set", "N=8", "--set", "window=2", "--input", "doc=x"],
     "error: --input doc=x: cannot read value 'x': expected an integer, a number, "
     "true/false, or a comma-separated tuple\n"),
])
def test_unreadable_values_name_their_parameter(capsys, args, message):
    code, out, err = run(capsys, "show", SLIDING, "-p", "sliding_window", *args)
    assert (code, err) == (1, message)


# ------------------------------------------------------------------ did you mean


def test_a_name_differing_only_in_case_is_suggested(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    Path("w.attn").write_text("pattern p(N: int, w: int) {\n    space seq(N)\n"
                              "    attend abs(q - k) < W\n}\n")
    code, _, err = run(capsys, "check", "w.attn")
    assert code == 1
    assert err == ("w.attn:3:25: error: unknown name 'W' (did you mean 'w'?)\n"
                   "        attend abs(q - k) < W\n"
                   "                            ^\n")
    Path("w.attn").write_text("pattern p(N: int, w: int) {\n    space seq(N)\n"
                              "    attend abs(q - k) < w\n}\n")
    code, _, err = run(capsys, "show", "w.attn", "--set", "N=8", "--set", "W=2")
    assert err.startswith("w.attn:1:9: error: pattern 'p' has no parameter 'W' (did you "
                          "mean 'w'?)\n")


def test_misspelt_call_options_are_suggested():
    op = attndsl.compile(SLIDING, "sliding_window", N=8, window=3)
    q = torch.randn(1, 1, 8, 4)
    for given, meant in (("scal", "scale"), ("Backend", "backend"), ("dropout", "dropout_p")):
        with pytest.raises(attndsl.AttnNameError) as info:
            op(q, q, q, **{given: 1})
        assert info.value.message == (f"pattern 'sliding_window' has no run-time input "
                                      f"'{given}' (did you mean '{meant}'?)")


# ------------------------------------------------------------------ compare


def test_compare_takes_patterns_inputs_and_seed(tmp_path, capsys):
    doc = tmp_path / "doc.npy"
    np.save(doc, np.repeat(np.arange(4), 16))
    code, out, _ = run(capsys, "compare", DOC, "-p", "document_causal", "-p", "prefix_lm",
                       "--set", "N=64", "--input", f"doc=@{doc}", "--input", "prefix=8",
                       "--layers", "2")
    lines = out.splitlines()
    assert code == 0 and lines[2].split()[0] == "pattern"
    # the last token sees its document (16 of 64 earlier tokens), prefix_lm all of them
    assert lines[3].split() == ["document_causal", "25.0%", "25.0%", "never"]
    assert lines[4].split() == ["prefix_lm", "100.0%", "100.0%", "never*"]
    assert lines[5].startswith("never*: the followed query reaches every token")
    args = ["compare", "dhsa.attn", "--set", "N=64", "--set", "block=8", "--set", "chunk=8",
            "--set", "topk=1", "--layers", "2"]
    seeds = [run(capsys, *args, "--seed", str(s))[1] for s in (1, 1, 2)]
    assert seeds[0] == seeds[1]


def test_compare_reports_unused_inputs_and_unknown_patterns(capsys):
    code, _, err = run(capsys, "compare", SLIDING, "-p", "sliding_window", "--set", "N=16",
                       "--set", "window=2", "--input", "doc=1")
    assert (code, err) == (1, "error: no compared pattern has run-time input doc\n")
    code, _, err = run(capsys, "compare", SLIDING, "-p", "sliding_windw", "--set", "N=16")
    assert (code, err) == (1, "error: 'patterns/sliding.attn' has no pattern 'sliding_windw' "
                              "(did you mean 'sliding_window'?)\n")


# ------------------------------------------------------------------ the language trap


@pytest.mark.parametrize("line,first,what", [
    ("(b >> 16) ^ b", "(", "a call of the value before it"),
    ("-b", "-", "a subtraction from it"),
])
def test_a_result_line_glued_onto_a_let_is_explained(line, first, what):
    src = (f"fn f(x: int) -> int {{\n    let b = x * 3\n    {line}\n}}\n\n"
           "pattern p(N: int) {\n    space seq(N)\n    attend f(q) > k\n}\n")
    with pytest.raises(attndsl.AttnSyntaxError) as info:
        attndsl.check(src)
    assert str(info.value) == (
        f"<string>:3:5: error: this line continues the 'let' on line 2: a line starting with "
        f"'{first}' is read as part of the expression above ({what}), so the function body "
        f"has no result expression; give the result a 'let' of its own and end with its "
        f"name, or start the line differently\n"
        f"        {line}\n"
        f"        ^{'~' * (len(line) - 1)}")
    fixed = src.replace(f"    {line}\n", f"    let r = {line}\n    r\n")
    assert attndsl.check(fixed)


def test_a_let_continued_on_purpose_still_works_and_patterns_are_told():
    ok = ("fn f(x: int) -> int {\n    let a = x\n          - 1\n    a\n}\n"
          "pattern p(N: int) {\n    space seq(N)\n    attend f(q) < k\n}\n")
    assert list(attndsl.check(ok)) == ["p"]
    glued = "pattern p(N: int) {\n    space seq(N)\n    let a = q\n    (a)\n    attend k < a\n}\n"
    with pytest.raises(attndsl.AttnErrors) as info:
        attndsl.check(glued)
    assert ("'q' is a value, not a function (the '(' on line 4 starts a new line, yet "
            "continues the expression before it: newlines do not end expressions)"
            in [e.message for e in info.value.errors])


# ------------------------------------------------------------------ analysis wording


def test_prefix_lm_coverage_is_explained():
    op = attndsl.compile(DOC, "prefix_lm", N=64)
    a = op.analyze(2, prefix=8)
    assert a.layers[0].reach_fraction == 1.0 and a.full_coverage_layers is None
    assert coverage_text(a) == "never*"
    lines = analysis_table(a).splitlines()
    assert lines[2].split()[:4] == ["layer", "reach", "%", "of"]
    assert "contiguous" in lines[2] and "interval" not in lines[2]
    assert lines[5] == ("  reach: tokens reached from query 63; % of full: of the tokens full "
                        "attention would give it (every key); contiguous: they form one "
                        "interval")
    assert lines[7] == ("full coverage: never; query 63 reaches every token full attention "
                        "would, but other queries stop short of theirs: the reach stops "
                        "growing after 1 layer")
    assert "diameter (longest shortest path): 1 hop" in lines


def test_one_layer_is_singular_and_grids_have_no_contiguity():
    a = attndsl.compile("combiner.attn", "combiner_fixed", N=64, span=8).analyze(2)
    assert coverage_text(a) == "1 layer"
    assert "after 1 layer\n" in analysis_table(a) + "\n"
    g = attndsl.compile(NB, "na2d", H=8, W=8, kernel=3).analyze(1)
    row = analysis_table(g).splitlines()[3].split()
    assert row[3] == "-"


TILED = """
pattern tiled(H: int, W: int, tile: int) {
    require H % tile == 0 and W % tile == 0, "the grid must be a multiple of the tile"
    space grid(H, W)
    attend same_block(tile)
}
"""


def test_growth_class_keeps_sizes_that_are_multiples_of_the_tile():
    a = attndsl.compile(TILED, H=24, W=24, tile=8).analyze(1)
    assert a.asymptotic.startswith("O(N) (fit to exact counts at N = ")
    ns = [int(x) for x in a.asymptotic.split("N = ")[1].rstrip(")").split(", ")]
    assert all(b == 2 * a for a, b in zip(ns, ns[1:]))


def test_growth_class_says_which_sizes_a_requirement_rejects():
    capped = ("pattern capped(N: int) {\n    require N <= 100, \"N must be at most 100\"\n"
              "    space seq(N)\n    attend k <= q\n}\n")
    a = attndsl.compile(capped, N=64).analyze(1)
    assert a.asymptotic == ("unknown (the pattern's constraints reject the larger sizes "
                            "N=128: N must be at most 100 (got N=128))")


# ------------------------------------------------------------------ make demo


def test_demo_table_pictures_and_summary_tokens(tmp_path, monkeypatch, capsys):
    import importlib.util

    import matplotlib.image

    path = Path(__file__).resolve().parent.parent / "examples" / "standard_library.py"
    spec = importlib.util.spec_from_file_location("standard_library_demo", path)
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    monkeypatch.setattr(demo, "OUT", tmp_path)
    monkeypatch.setattr(demo, "PARAM_WIDTH", 20)
    monkeypatch.setattr(demo, "CASES", [
        ("sliding.attn", "sliding_window", dict(N=64, window=8), {}),
        ("sliding.attn", "sliding_window", dict(N=64, window=8, causal=False), {}),
        ("combiner.attn", "combiner_fixed", dict(N=64, span=8), {}),
    ])
    assert demo.main() == 0
    lines = capsys.readouterr().out.splitlines()
    # a parameter list wider than its column continues on the next line, cut between items
    at = lines.index(" " * 21 + "causal=False") - 1
    assert lines[at].split()[:3] == ["sliding_window", "N=64,", "window=8,"]
    assert {p.name for p in tmp_path.iterdir()} == {"sliding_window.png",
                                                    "sliding_window_2.png",
                                                    "combiner_fixed.png"}
    # combiner_fixed: its summary tokens' keys in light blue beside the black direct keys
    img = matplotlib.image.imread(tmp_path / "combiner_fixed.png")[..., :3]
    blue = (abs(img - [0x9e / 255, 0xca / 255, 0xe1 / 255]).max(-1) < 0.02).sum()
    assert blue > 1000
