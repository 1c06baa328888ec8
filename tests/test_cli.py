"""The CLI on good input (bad input is in test_errors.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from attndsl.cli import main, parse_value

ROOT = Path(__file__).resolve().parent.parent
STD = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "patterns").glob("*.attn"))


def test_check_every_standard_file(capsys):
    assert main(["check", *STD]) == 0
    out = capsys.readouterr().out
    assert out.count(": ok (") == len(STD)
    assert "patterns/power.attn: ok (5 patterns)" in out


def test_list_shows_parameters_inputs_and_docs(capsys):
    assert main(["list", "patterns/document.attn"]) == 0
    out = capsys.readouterr().out
    assert "pattern document_causal(N: int)\n    input doc: int[N]\n" in out
    assert "pattern prefix_lm(N: int)\n    input prefix: int\n" in out
    assert "Prefix-LM" in out


def test_mask_writes_npy(tmp_path, capsys):
    out = tmp_path / "m.npy"
    assert main(["mask", "patterns/document.attn", "-p", "document_causal", "--set", "N=6",
                 "--input", "doc=0,0,1,1,1,2", "-o", str(out)]) == 0
    m = np.load(out)
    doc = np.array([0, 0, 1, 1, 1, 2])
    i = np.arange(6)
    assert (m == ((i[None, :] <= i[:, None]) & (doc[:, None] == doc[None, :]))).all()
    assert "10 attended pairs" in capsys.readouterr().out


def test_mask_input_from_npy(tmp_path):
    doc = tmp_path / "doc.npy"
    np.save(doc, np.array([0, 0, 0, 1]))
    out = tmp_path / "m.npy"
    assert main(["mask", "patterns/document.attn", "-p", "document_causal", "--set", "N=4",
                 "--input", f"doc=@{doc}", "-o", str(out)]) == 0
    assert np.load(out).sum() == 7


def test_show_text_draws_the_query_on_the_grid(capsys):
    assert main(["show", "patterns/neighborhood.attn", "-p", "na2d", "--set", "H=5",
                 "--set", "W=5", "--set", "kernel=3", "--query", "0,0"]) == 0
    out = capsys.readouterr().out
    grid = out.split("not attended\n", 1)[1].splitlines()
    assert grid == ["Q # # . .", "# # # . .", "# # # . .", ". . . . .", ". . . . ."]


def test_show_volume_and_png(tmp_path, capsys):
    png = tmp_path / "v.png"
    assert main(["show", "patterns/neighborhood.attn", "-p", "na3d", "--set", "T=3",
                 "--set", "H=4", "--set", "W=4", "--set", "kernel=2", "-o", str(png)]) == 0
    assert png.read_bytes()[:4] == b"\x89PNG"
    assert main(["show", "patterns/neighborhood.attn", "-p", "na3d", "--set", "T=3",
                 "--set", "H=4", "--set", "W=4", "--set", "kernel=2"]) == 0
    assert "t = 2" in capsys.readouterr().out


def test_show_content_dependent_pattern_uses_seeded_random_qk(capsys):
    args = ["show", "patterns/dhsa.attn", "-p", "dhsa_chunks", "--set", "N=32", "--set",
            "block=8", "--set", "chunk=4", "--set", "topk=1", "--seed", "3"]
    assert main(args) == 0
    first = capsys.readouterr().out
    assert main(args) == 0
    assert capsys.readouterr().out == first


def test_parse_value():
    assert parse_value("7") == 7
    assert parse_value("(7, 9)") == (7, 9)
    assert parse_value("true,false") == (True, False)
    assert parse_value("0x10") == 16
    assert parse_value("1.5") == 1.5
