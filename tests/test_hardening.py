"""Issue 10: no hang, no traceback, no leak of files, on any input. One test (or one table
of cases) per class of the issue, each reproducer included; the fuzzer is test_fuzz.py."""

from __future__ import annotations

import inspect
import os
import resource
import stat
import time
from pathlib import Path

import pytest
import torch

import attndsl
from attndsl import caches
from attndsl.cli import main
from attndsl.lang.scope import EXPANSION_LIMIT, RESERVED_INPUTS, RESERVED_PARAMS

ROOT = Path(__file__).resolve().parent.parent
MAX = (1 << 63) - 1


def pat(body: str, params: str = "N: int", name: str = "p") -> str:
    """A pattern whose body lines start at line 2, indented by 4."""
    lines = "\n".join("    " + ln if ln else "" for ln in body.splitlines())
    return f"pattern {name}({params}) {{\n{lines}\n}}\n"


def error_of(fn, *args, **kwargs) -> attndsl.AttnError:
    with pytest.raises(attndsl.AttnError) as info:
        fn(*args, **kwargs)
    return info.value


def mask(rule: str, n: int = 8, **inputs):
    return attndsl.compile(pat("space seq(N)\n" + rule), N=n).mask(**inputs)


@pytest.fixture
def quick():
    """The body of the test must finish in seconds (the bugs it guards against hung)."""
    t0 = time.perf_counter()
    yield
    assert time.perf_counter() - t0 < 20.0


# ------------------------------------------------------------------ 1. integer edge values

OVERFLOWS = [
    # (rule, the located expression) on tensors: each one wrapped silently, or hung
    ("attend bit_length(k + 9223372036854775807 + 1) > 0", "k + 9223372036854775807"),
    ("attend k - 9223372036854775807 - 2 < 0", "k - 9223372036854775807 - 2"),
    ("attend (k << 61) * 3 > 0", "k << 61"),
    ("attend (k + 3) ** 40 > 0", "(k + 3) ** 40"),
    ("attend (k + 2) * 4611686018427387904 > 0", "(k + 2) * 4611686018427387904"),
    ("attend ~(k + 9223372036854775800) < 0", "~(k + 9223372036854775800)"),
    ("attend -(k - 9223372036854775807 - 1) > 0", "k - 9223372036854775807 - 1"),
    ("attend floor(float(k) * 1e300) < 0", "floor(float(k) * 1e300)"),
    ("attend sum((k + 0, 9223372036854775807)) > 0", "sum((k + 0, 9223372036854775807))"),
    ("attend prod((k + 4, 4611686018427387904)) > 0", "prod((k + 4, 4611686018427387904))"),
    ("attend (k | -9223372036854775807) & (k - 2) < 0", "(k | -9223372036854775807) & (k - 2)"),
]


@pytest.mark.parametrize(("rule", "expr"), OVERFLOWS, ids=[r for r, _ in OVERFLOWS])
def test_integer_overflow_on_tensors_is_a_located_error(rule, expr, quick):
    err = error_of(mask, rule)
    assert type(err) is attndsl.EvaluationError
    assert err.message.startswith("integer overflow") or "floor" in err.message, err.message
    assert err.span.line == 3
    assert err.span.text[err.span.col - 1:].startswith(expr), str(err)


@pytest.mark.parametrize("rule", [r for r, _ in OVERFLOWS])
def test_the_same_overflow_on_python_ints(rule, quick):
    """The static twin (a parameter M instead of k: Python ints) fails the same way, at
    bind time, for some M of the 0 .. 7 that k takes."""
    static = pat(rule.replace("attend", "require").replace("k", "M")
                 + "\nspace seq(N)\nattend true", "N: int, M: int")
    failed = 0
    for m in range(8):
        try:
            attndsl.compile(static, N=1, M=m)
        except attndsl.EvaluationError as e:
            assert "overflow" in e.message, e.message
            failed += 1
        except attndsl.ConstraintError:
            pass  # no overflow for this M: the requirement is merely false
    assert failed


@pytest.mark.parametrize(("rule", "message"), [
    ("attend (k << 63) > 0", "shift count of 63 or more overflows 64-bit integers"),
    ("attend (k << (q - 9)) > 0", "negative shift count"),
    ("attend popcount(k - 1) >= 0", "popcount of a negative number"),
    ("attend ilog2(k) >= 0", "ilog2 needs x >= 1"),
    ("attend cdiv(k, k - k) > 0", "division by zero"),
    ("attend k ** (k - 9) > 0", "negative integer exponent"),
])
def test_other_integer_edges_are_located_errors(rule, message):
    err = error_of(mask, rule)
    assert type(err) is attndsl.EvaluationError and err.message == message


def test_integer_edges_that_fit_match_python():
    """Values next to the limits, and shifts far past them, compute exactly."""
    ks = list(range(8))
    cases = {
        "bit_length(k - 9223372036854775807) == 63": [(k - MAX).bit_length() == 63 for k in ks],
        "(k >> 100) == 0": [True] * 8,
        "((k - 5) >> 1000) == -1": [k < 5 for k in ks],
        "abs(k - 9223372036854775807) == 9223372036854775807 - k": [True] * 8,
        "(k + 9223372036854775800) == 9223372036854775807": [k == 7 for k in ks],
        "popcount(k + 9223372036854775800) == 60 + popcount(k)":
            [bin(k + MAX - 7).count("1") == 60 + bin(k).count("1") for k in ks],
        "ilog2(k + 4611686018427387904) == 62": [True] * 8,
        "is_pow2(k - 9223372036854775807)": [False] * 8,
    }
    for rule, want in cases.items():
        got = mask("attend " + rule)[0].tolist()
        assert got == want, rule


def test_overflow_only_where_the_value_is_unused_is_not_an_error():
    m = mask("attend if k < 1 then k + 9223372036854775807 > 0 else k > 0")
    assert m.all()
    m = mask("attend k > 100 and (k + 9223372036854775807) > 0")
    assert not m.any()


def test_compiled_backends_agree_with_the_reference_on_overflow():
    """The interval analysis used to classify wrapped bounds FULL or EMPTY, so the CPU
    backend ran patterns the reference rejects."""
    x = torch.randn(1, 1, 64, 8)
    for rule in ("attend k + 9223372036854775806 > q",
                 "attend (q | k) + (q | k) + 4611686018427387904 * 2 > 0"):
        op = attndsl.compile(pat("space seq(N)\n" + rule), N=64)
        for backend in ("reference", "cpu"):
            err = error_of(op, x, x, x, backend=backend)
            assert type(err) is attndsl.EvaluationError and "overflow" in err.message


def test_input_holding_int64_min_is_refused():
    op = attndsl.compile(pat("space seq(N)\ninput d: int[N]\nattend d[q] == d[k]"), N=2)
    err = error_of(op.mask, d=torch.tensor([0, -(1 << 63)]))
    assert type(err) is attndsl.InputError
    assert err.message == ("run-time input 'd' holds -9223372036854775808, outside the range "
                           "of .attn integers (|value| < 2^63)")


# ------------------------------------------------------------------ 2. exponential programs


def _fn_chain(depth: int) -> str:
    return "fn e0() -> bool = k <= q\n" + "".join(
        f"fn e{i}() -> bool = e{i - 1}() or e{i - 1}()\n" for i in range(1, depth + 1))


def test_doubling_function_chains_check_in_linear_time(quick):
    assert attndsl.check(_fn_chain(60)) == {}  # 2^60 when expanded: checked at once
    src = "fn a0(x: int) -> int = x + 1\n" + "".join(
        f"fn a{i}(x: int, y: int = 2) -> int = a{i - 1}(x) + a{i - 1}(y)\n"
        for i in range(1, 60))
    assert attndsl.check(src) == {}
    consts = "const c0 = 1\n" + "".join(f"const c{i} = c{i - 1} + c{i - 1}\n"
                                        for i in range(1, 61))
    assert attndsl.check(consts) == {}
    with pytest.raises(attndsl.AttnErrors):
        attndsl.check(_fn_chain(60) + "fn bad() -> int = e60()\nfn worse() -> bool = bad\n")


@pytest.mark.parametrize("kind", ["fn", "const", "call", "include", "average"])
def test_exponential_expansion_is_a_located_error(kind, quick):
    depth = 40
    if kind == "fn":
        src = _fn_chain(depth) + pat(f"space seq(N)\nattend e{depth}()")
        line, text = depth + 4, f"attend e{depth}()"
    elif kind == "const":
        src = "const c0 = 1\n" + "".join(f"const c{i} = c{i - 1} + c{i - 1}\n"
                                         for i in range(1, depth + 1))
        src += pat(f"space seq(N)\nattend k <= q + c{depth} % 2")
        line, text = depth + 4, "attend k <= q"
    else:
        body = {"call": "space seq(N)\nattend p{j}(N) or p{j}(N)",
                "include": "include p{j}(N)\ninclude p{j}(N)",
                "average": "average p{j}(N), p{j}(N)"}[kind]
        src = pat("space seq(N)\nattend k <= q", name="p0") + "".join(
            pat(body.format(j=i - 1), name=f"p{i}") for i in range(1, depth + 1))
        line, text = None, None
    err = error_of(attndsl.check, src)
    errs = err.errors if isinstance(err, attndsl.AttnErrors) else [err]
    first = errs[0]
    assert type(first) is attndsl.AttnTypeError
    assert f"expands to more than {EXPANSION_LIMIT:,} expression nodes" in first.message
    if line is not None:
        assert first.span.line == line
    if text is not None:
        assert first.span.text.strip().startswith(text)
    assert len(errs) <= 2  # reported where the limit is passed, not at every later use


def test_expansion_below_the_limit_and_let_chains_compile_and_agree(quick):
    want = [[k <= q for k in range(6)] for q in range(6)]
    src = _fn_chain(8) + pat("space seq(N)\nattend e8()")
    assert attndsl.compile(src, N=6).mask().tolist() == want
    lets = pat("space seq(N)\nlet a0 = q - k\n" + "\n".join(
        f"let a{i} = a{i - 1} + a{i - 1}" for i in range(1, 41)) + "\nattend a40 >= 0")
    op = attndsl.compile(lets, N=6)  # each let is evaluated once: linear, not 2^40
    assert op.mask().tolist() == want
    x = torch.randn(1, 1, 6, 4)
    assert torch.allclose(op(x, x, x, backend="cpu"), op(x, x, x, backend="reference"))


def test_shared_function_bodies_keep_their_effects_at_every_call_site():
    """A body checked once still makes every caller head-dependent or content-dependent,
    and a misused context name is reported at each call site."""
    src = ("fn g() -> bool = h == 0 or k <= q\n"
           + pat("space seq(N)\nheads 2\nattend g()\nexclude g() and k == 0", name="a"))
    assert attndsl.compile(src, pattern="a", N=4).mask().shape == (2, 4, 4)
    src = ("fn g() -> bool = h == 0\n"
           + pat("space seq(N)\nattend k <= q or g()", name="a"))
    err = error_of(attndsl.check, src)
    assert err.message == "the head index 'h' needs a 'heads N' declaration"
    src = ("fn g() -> bool = k == 0\n" + pat(
        "space seq(N)\nrequire g()\nrequire g() or N > 0\nattend g()\n"
        "summary r(i: 2) {\n    member g()\n    attend g()\n}", name="a"))
    err = error_of(attndsl.check, src)
    here = ("function 'g' uses 'k', which cannot be used here: this value must not depend "
            "on the query, key or head index")
    assert [(e.span.line, e.message) for e in err.errors] == [
        (4, here), (5, here),
        (9, "function 'g' uses 'k', which cannot be used in a summary's 'attend' rule, "
            "which sees only the query 'q' and 'h'"),
    ]


def test_deep_chains_of_patterns_are_a_located_error_not_a_recursion_error(quick):
    for body in ("space seq(N)\nattend p{j}(N)", "include p{j}(N)"):
        src = pat("space seq(N)\nattend k <= q", name="p0") + "".join(
            pat(body.format(j=i - 1), name=f"p{i}") for i in range(1, 600))
        err = error_of(attndsl.compile, src, pattern="p599", N=4)
        assert err.message == ("expression nested too deeply (more than 160 levels, counting "
                               "the bodies of called functions and patterns)")
        assert "p598(N)" in err.span.text and err.span.file == "<string>"
    src = pat("space seq(N)\nattend k <= q", name="p0") + "".join(
        pat(f"space seq(N)\nattend p{i - 1}(N)", name=f"p{i}") for i in range(1, 30))
    assert attndsl.compile(src, pattern="p29", N=4).mask().sum() == 10


def test_long_recursion_cycles_are_reported_quickly_and_briefly(quick):
    n = 400
    src = "".join(pat(f"space seq(N)\nattend p{(i + 1) % n}(N)", name=f"p{i}")
                  for i in range(n))
    err = error_of(attndsl.check, src)
    assert len(err.errors) == n
    assert err.errors[0].message == (
        "pattern 'p0' refers to itself through p0 -> p1 -> p2 -> p3 -> p4 -> ... (391 more) "
        "-> p396 -> p397 -> p398 -> p399 -> p0; recursion is not allowed")


# ------------------------------------------------------------------ 3. one line model

ODD = ["\x0c", "\x0b", "\x1c", "\x1d", "\x1e", "\x85", "\u2028", "\u2029", "\r", "\r\n",
       "\ufeff"]


@pytest.mark.parametrize("ch", ODD, ids=[f"U+{ord(c[-1]):04X}" + ("-crlf" if len(c) > 1
                                                                     else "") for c in ODD])
def test_odd_characters_before_an_error_keep_the_right_line(ch):
    line_end = ch in ("\r", "\r\n")
    head = "const a = 1" + (ch if line_end else "\n# " + ch + "\n") + "const b = 2\n"
    src = head + pat("space seq(N)\nattend k <= q q")
    err = error_of(attndsl.check, src)
    assert type(err) is attndsl.AttnSyntaxError
    lines = str(err).split("\n")
    assert lines[1] == "        attend k <= q q"
    assert lines[2] == "                      ^"
    assert lines[0].endswith("error: unexpected 'q'")
    want = 5 if line_end else 6
    assert lines[0].startswith(f"<string>:{want}:19:")


@pytest.mark.parametrize("ch", ["\x0b", "\x1c", "\x85", "\u2028", "\x00", "\u200b"])
def test_unprintable_characters_are_named_and_shown_as_one_column(ch):
    src = "pattern p(N: int) {\n    space seq(N)\n    attend k <=" + ch + " q\n}\n"
    err = error_of(attndsl.check, src)
    assert err.message == f"unexpected character U+{ord(ch):04X}"
    assert str(err).split("\n")[1:] == ["        attend k <=\ufffd q", "                   ^"]
    assert err.span.line == 3


def test_file_line_endings_and_encoding(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    body = pat("space seq(N)\nattend k <= q q")
    for name, data in (("cr.attn", body.replace("\n", "\r")),
                       ("crlf.attn", body.replace("\n", "\r\n")),
                       ("bom.attn", "\ufeff" + body)):
        (tmp_path / name).write_bytes(data.encode())
        err = error_of(attndsl.check, Path(name))
        assert str(err) == (f"{name}:3:19: error: unexpected 'q'\n"
                            "        attend k <= q q\n                      ^")
    (tmp_path / "bad.attn").write_bytes(b"const a = 1\nconst b = 2 # \xc3\x28 oops\n")
    err = error_of(attndsl.check, Path("bad.attn"))
    assert str(err) == ("bad.attn:2:15: error: the file is not UTF-8 text: byte 0xc3 (invalid "
                        "continuation byte)\n    const b = 2 # \ufffd( oops\n"
                        "                  ^")


def test_a_long_line_is_quoted_around_the_caret():
    err = error_of(attndsl.check, pat("space seq(N)\nattend k <= q" + " + 1" * 500 + " $"))
    _, line, caret = str(err).split("\n")
    assert len(line) <= 4 + 160 and line.startswith("    ...")
    assert line[len(caret) - 1] == "$"


# ------------------------------------------------------------------ 4, 5. imports

P = pat("space seq(N)\nattend k <= q")


def test_a_very_long_import_path_is_a_located_error(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    long = "a" * 300 + ".attn"
    err = error_of(attndsl.check, f'import "{long}"\n' + P)
    assert type(err) is attndsl.ImportFailure and err.span.line == 1
    assert err.message == f"cannot read imported file '{long[:77]}...': File name too long"
    (tmp_path / "main.attn").write_text(f'import "{long}"\n' + P)
    assert main(["check", "main.attn"]) == 1
    out = capsys.readouterr().err
    assert out.startswith("main.attn:1:1: error: cannot read imported file")
    err = error_of(attndsl.check, 'import "x\\x00y.attn"\n' + P)
    assert err.message == "an import names a .attn file, not 'x\x00y.attn'"
    assert str(err).split("\n")[0].endswith("not 'x\\x00y.attn'")  # printed escaped
    err = error_of(attndsl.compile, "/" + "d/" * 3000 + "x.attn")
    assert type(err) is attndsl.ImportFailure and err.message.startswith("no such .attn file")


@pytest.mark.parametrize("stmt", ['import "/etc/passwd"', 'from "/etc/passwd" import x',
                                  'import "../../../../../../../etc/passwd"'])
def test_files_that_are_not_attn_are_never_read(stmt, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    err = error_of(attndsl.check, stmt + "\n" + P)
    assert type(err) is attndsl.ImportFailure
    assert "root:" not in str(err)
    assert err.message == f"an import names a .attn file, not '{stmt.split(chr(34))[1]}'"
    (tmp_path / "m.attn").write_text(stmt + "\n" + P)
    assert main(["check", "m.attn"]) == 1
    assert "root:" not in capsys.readouterr().err


@pytest.fixture
def project(tmp_path, monkeypatch):
    """tmp/project/main.attn, tmp/outside/secret.attn (not .attn text), a link to it."""
    proj, outside = tmp_path / "project", tmp_path / "outside"
    (proj / "lib").mkdir(parents=True)
    outside.mkdir()
    (outside / "secret.attn").write_text("TOP SECRET = 1\n")
    (outside / "helpers.attn").write_text("fn yes() -> bool = true\n")
    (proj / "lib" / "ok.attn").write_text("fn near() -> bool = abs(q - k) <= 1\n")
    os.symlink(outside / "secret.attn", proj / "link.attn")
    monkeypatch.chdir(proj)
    return proj, outside


@pytest.mark.parametrize("path", ["../outside/secret.attn", "{outside}/secret.attn",
                                  "lib/../../outside/secret.attn"])
def test_files_outside_the_import_roots_are_refused_unread(project, path):
    proj, outside = project
    path = path.format(outside=outside)
    shown = path if len(path) <= 80 else path[:77] + "..."
    for stmt in (f'import "{path}"', f'from "{path}" import x'):
        (proj / "main.attn").write_text(stmt + "\n" + P)
        for source in (Path("main.attn"), stmt + "\n" + P):
            err = error_of(attndsl.check, source)
            assert type(err) is attndsl.ImportFailure and "SECRET" not in str(err)
            assert err.message == (
                f"'{shown}' is outside the folders imports may read (the named file's folder "
                "and the standard library); allow another with import_roots=[...] or "
                "--import-root")
    err = error_of(attndsl.check, 'import "link.attn"\n' + P)
    assert err.message == ("imported file 'link.attn' is a link to a file outside the folders "
                           "imports may read")
    assert "SECRET" not in str(err)


def test_import_roots_opt_in(project, capsys):
    proj, outside = project
    src = f'from "{outside}/helpers.attn" import yes\nimport "lib/ok.attn"\n' + pat(
        "space seq(N)\nattend yes() and near()")
    (proj / "main.attn").write_text(src)
    assert type(error_of(attndsl.check, src)) is attndsl.ImportFailure
    op = attndsl.compile(src, N=3, import_roots=[outside])
    assert op.mask().sum() == 7
    assert attndsl.check(Path("main.attn"), import_roots=str(outside))
    assert main(["check", "main.attn"]) == 1
    capsys.readouterr()
    assert main(["check", "--import-root", str(outside), "main.attn"]) == 0
    assert main(["mask", "main.attn", "--set", "N=3", "-o", str(proj / "m.npy"),
                 "--import-root", str(outside)]) == 0


def test_a_str_source_is_a_path_only_when_it_names_an_attn_file(tmp_path, monkeypatch):
    """Text a service passes on from a user is never taken for a file name."""
    monkeypatch.chdir(tmp_path)
    err = error_of(attndsl.check, "/etc/passwd")
    assert type(err) is attndsl.AttnSyntaxError and "root:" not in str(err)
    assert str(err).split("\n")[1] == "    /etc/passwd"
    (tmp_path / "notes.txt").write_text("first row\nsecond row\n")
    err = error_of(attndsl.check, Path("notes.txt"))  # a file the caller named: one line
    assert "first row" in str(err) and "second" not in str(err)


# ------------------------------------------------------------------ 6. reserved names


def _keywords(fn) -> set[str]:
    return {p.name for p in inspect.signature(fn).parameters.values()
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def test_reserved_names_cover_every_keyword_beside_inputs_and_parameters():
    from attndsl.api import Op
    from attndsl.codegen.export import export
    takes_inputs = [Op.__call__, Op.mask, Op.summaries, Op.reach, Op.analyze, Op.path,
                    Op.plan, Op.kernel, Op.source, Op.stats, Op.block_mask, Op.score_mod,
                    Op.permute, Op.unpermute, export]
    assert set().union(*map(_keywords, takes_inputs)) <= set(RESERVED_INPUTS) | {"q", "k"}
    assert _keywords(attndsl.compile) <= set(RESERVED_PARAMS)


@pytest.mark.parametrize("name", sorted(RESERVED_INPUTS))
def test_reserved_input_names_are_located_errors(name):
    err = error_of(attndsl.check, pat(f"space seq(N)\ninput {name}: int[N]\n"
                                      f"attend {name}[q] == {name}[k]"))
    assert type(err) is attndsl.AttnNameError and err.span.line == 3
    assert err.message == (f"'{name}' cannot name a run-time input: it is a keyword of "
                           f"{RESERVED_INPUTS[name]}, where inputs are passed")


@pytest.mark.parametrize("name", sorted(RESERVED_PARAMS))
def test_reserved_parameter_names_are_located_errors(name):
    err = error_of(attndsl.check, pat("space seq(N)\nattend k <= q", f"N: int, {name}: int"))
    assert err.message == (f"'{name}' cannot name a parameter: it is a keyword of "
                           "attndsl.compile(...)")


def test_names_that_are_positional_in_the_api_can_be_used(tmp_path):
    src = pat("space seq(source)\ninput v: int[source]\ninput self: int[source]\n"
              "input op: int[source]\nattend v[q] == v[k] and self[k] <= op[q]", "source: int")
    op = attndsl.compile(src, source=4)
    d = {"v": torch.tensor([0, 0, 1, 1]), "self": torch.zeros(4, dtype=torch.long),
         "op": torch.ones(4, dtype=torch.long)}
    x = torch.randn(1, 1, 4, 8)
    out = op(x, x, x, backend="cpu", **d)
    assert torch.allclose(out, op(x, x, x, backend="reference", **d))
    assert op.mask(**d).sum() == 8


# ------------------------------------------------------------------ 7. the kernel cache


@pytest.fixture
def cache(tmp_path, monkeypatch):
    d = tmp_path / "kernels"
    monkeypatch.setenv("ATTNDSL_CACHE", str(d))
    caches.clear_all()
    yield d
    caches.clear_all()


def _sliding():
    return attndsl.compile("patterns/sliding.attn", pattern="sliding_window", N=33,
                           window=4).options(block_q=16, block_k=16)


def test_cache_directory_is_private_and_a_shared_one_is_refused(cache):
    src = _sliding().source()
    assert stat.S_IMODE(cache.stat().st_mode) == 0o700
    (entry,) = cache.glob("attndsl_*.py")
    assert entry.read_text() == src and stat.S_IMODE(entry.stat().st_mode) == 0o600
    caches.clear_all()
    cache.chmod(0o777)
    err = error_of(_sliding().source)
    assert type(err) is attndsl.UnsupportedError
    assert err.message.startswith(f"the kernel cache directory '{cache}' can be written by "
                                  "other users (mode 777)")


@pytest.mark.parametrize("how", ["corrupted", "planted", "emptied"])
def test_a_bad_cache_entry_is_rebuilt_not_run(cache, how, tmp_path):
    src = _sliding().source()
    (entry,) = cache.glob("attndsl_*.py")
    marker = tmp_path / "RAN"
    entry.write_text({"corrupted": src[: len(src) // 2] + "\n)))\n",
                      "planted": f"open({str(marker)!r}, 'w').write('x')\n" + src,
                      "emptied": ""}[how])
    caches.clear_all()  # forgets the module imported from the entry, as a new process would
    op = _sliding()
    assert op.source() == src
    assert entry.read_text() == src and not marker.exists()
    x = torch.randn(1, 1, 33, 16)
    assert torch.allclose(op(x, x, x, backend="triton"), op(x, x, x, backend="reference"),
                          atol=1e-5)


def test_export_names_must_be_identifiers(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    args = ["compile", str(ROOT / "patterns/sliding.attn"), "-p", "sliding_window", "--set",
            "N=16", "--set", "window=2", "-o", str(out)]
    for bad in ("../x", "x.y", "class", "a/b", ""):
        assert main([*args, "--name", bad]) == 1
        assert capsys.readouterr().err == (
            "error: the module name must be a Python identifier (the module is imported as "
            f"`import NAME` and written to DIR/NAME.py), not {bad!r}\n")
    assert not (tmp_path / "x.py").exists() and not list(tmp_path.glob("**/*.py"))


# ------------------------------------------------------------------ 8. tensors

SW = ("patterns/sliding.attn", "sliding_window", {"N": 32, "window": 4})
BACKENDS = ("reference", "cpu", "triton")


def _op(spec=SW):
    return attndsl.compile(spec[0], pattern=spec[1], **spec[2])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("shapes", "message"), [
    (((1, 1, 32, 0), (1, 1, 32, 0), (1, 1, 32, 4)), "q and k must have a head dim of at "
                                                    "least 1, not 0"),
    (((1, 1, 32, 4), (1, 1, 32, 4), (1, 1, 32, 0)), "v must have a head dim of at least 1, "
                                                    "not 0"),
])
def test_zero_head_dims_are_input_errors(backend, shapes, message):
    q, k, v = (torch.randn(s) for s in shapes)
    err = error_of(_op(), q, k, v, backend=backend)
    assert type(err) is attndsl.InputError and err.message == message


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_query_heads_and_batches_give_empty_results(backend):
    for b, h in ((1, 0), (0, 1)):
        q = torch.randn(b, h, 32, 4)
        kv = torch.randn(b, 1, 32, 4)
        assert _op()(q, kv, kv, backend=backend).shape == (b, h, 32, 4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_scales_beyond_the_compute_dtype_are_parameter_errors(backend):
    x = torch.randn(1, 1, 32, 4)
    err = error_of(_op(), x, x, x, backend=backend, scale=1e308)
    assert type(err) is attndsl.ParameterError
    assert err.message == ("scale 1e+308 does not fit in float32, in which float32 scores are "
                           "computed (at most 3.403e+38)")
    if backend != "triton":  # float64 scores hold it
        y = x.double()
        assert _op()(y, y, y, backend=backend, scale=1e300).shape == y.shape
    err = error_of(attndsl.compile(pat("space seq(N)\nscale 1e300\nattend true"), N=4),
                   x[:, :, :4], x[:, :, :4], x[:, :, :4], backend=backend)
    assert type(err) is attndsl.ParameterError and err.span.line == 3


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["sparse", "meta", "nested"])
def test_unreadable_tensors_are_input_errors(backend, kind):
    x = torch.randn(1, 1, 32, 4)
    t = {"sparse": lambda: x.to_sparse(), "meta": lambda: x.to("meta"),
         "nested": lambda: torch.nested.nested_tensor([x[0, 0]], layout=torch.jagged)}[kind]()
    err = error_of(_op(), t, x, x, backend=backend)
    assert type(err) is attndsl.InputError
    assert err.message == {"sparse": "q must be a dense tensor, not a sparse_coo one (use "
                                     ".to_dense())",
                           "meta": "q is on the meta device, which holds no values",
                           "nested": "q must be a dense tensor, not a nested one (use "
                                     ".to_dense())"}[kind]
    doc = attndsl.compile("patterns/document.attn", pattern="document_causal", N=4)
    z = torch.zeros(4, 1, dtype=torch.long)
    ids = {"sparse": lambda: z.to_sparse(), "meta": lambda: z.to("meta"),
           "nested": lambda: torch.nested.nested_tensor([z], layout=torch.jagged)}[kind]()
    err = error_of(doc.mask, doc=ids)
    assert type(err) is attndsl.InputError and err.message.startswith("run-time input 'doc' ")


def _maxrss_mib() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024


@pytest.mark.parametrize("backend", BACKENDS)
def test_huge_expanded_tensors_fail_before_allocating(backend, quick):
    before = _maxrss_mib()
    n = 1 << 31
    op = attndsl.compile("patterns/sliding.attn", pattern="sliding_window", N=n, window=4)
    x = torch.zeros(1, 1, 1, 64).expand(1, 1, n, 64)
    err = error_of(op, x, x, x, backend=backend)
    assert type(err) is attndsl.SizeLimitError
    assert "limit" in err.message and "2^" in err.message
    doc = attndsl.compile("patterns/document.attn", pattern="document_causal", N=n)
    err = error_of(doc, x, x, x, backend=backend,
                   doc=torch.zeros(1, dtype=torch.int32).expand(n))
    assert type(err) is attndsl.SizeLimitError
    err = error_of(doc.mask, doc=torch.zeros(1, dtype=torch.int32).expand(n))
    assert err.message == ("run-time input 'doc' has 2,147,483,648 elements, over the limit "
                           "of 268,435,456 (2^28)")
    assert _maxrss_mib() - before < 1024


def test_triton_refuses_a_value_head_dim_unlike_the_query_one():
    q, v = torch.randn(1, 1, 32, 4), torch.randn(1, 1, 32, 8)
    err = error_of(_op(), q, q, v, backend="triton")
    assert err.message == ("the Triton backend needs v's head dim equal to q's (4), not 8; "
                           "use backend='cpu' or 'reference'")
    assert _op()(q, q, v, backend="cpu").shape == (1, 1, 32, 8)


def test_compiled_kernels_take_literals_past_int32():
    """Found by the fuzzer: Triton typed 2147483648 as uint32, which int64 code cannot
    divide by (a traceback from the interpreter's type checks)."""
    op = attndsl.compile(pat("space seq(N)\nattend (q + 2147483648 * k) // 2147483648 <= q"),
                         N=16).options(block_q=16, block_k=16)
    x = torch.randn(1, 1, 16, 16)
    assert torch.allclose(op(x, x, x, backend="triton"), op(x, x, x, backend="reference"),
                          atol=1e-5)


def test_a_chunk_longer_than_the_sequence_is_one_chunk():
    # chunk = 2^63 - 1 made torch.arange's length overflow into no chunk at all, and the
    # selection an IndexError (the long fuzz run, seed 2026, cases 16109 and 95228)
    q = torch.randn(1, 1, 8, 8, dtype=torch.float64)
    huge = attndsl.compile("patterns/dhsa.attn", "dhsa_chunks", N=8, block=8,
                           chunk=(1 << 63) - 1)
    whole = attndsl.compile("patterns/dhsa.attn", "dhsa_chunks", N=8, block=8, chunk=8)
    for backend in ("reference", "cpu"):
        assert torch.equal(huge(q, q, q, backend=backend), whole(q, q, q, backend=backend))
