"""Fuzz cases: grammar-aware mutants of the standard library and the documentation's
examples, and generated hostile programs. A case is a plain dict, made deterministically
from (seed, index), so any failure is reproduced by its index alone.

    case = {"index", "kind", "source", "files": {relative path: text}, "main": None or the
            file compiled by path, "roots": extra import roots}

`source` and the files may hold {OUTSIDE}: the worker puts there the absolute path of a
folder outside the case's import roots, which holds a canary file whose text must never
appear in any report.
"""

from __future__ import annotations

import random
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# one token of .attn text, as the mutators see it (comments and strings kept whole)
LEXEME = re.compile(r'#[^\n]*|"(?:[^"\\\n]|\\.)*"|0x[0-9a-fA-F]+|\d+\.\d*(?:[eE][-+]?\d+)?|'
                    r"\d+(?:[eE][-+]?\d+)?|[A-Za-z_]\w*|==|!=|<=|>=|<<|>>|//|\*\*|->|\.\.|"
                    r"\S")
NAME = re.compile(r"[A-Za-z_]\w*")
NUMBER = re.compile(r"0x[0-9a-fA-F]+|\d")

KEYWORDS = ["pattern", "fn", "const", "import", "from", "space", "query", "key", "let",
            "require", "input", "heads", "attend", "exclude", "within", "bias", "softcap",
            "scale", "summary", "member", "keys", "values", "queries", "route", "top",
            "shared", "average", "include", "on", "nnz", "when", "if", "then", "else", "in",
            "and", "or", "not", "true", "false", "seq", "grid", "volume", "channels", "int",
            "bool", "float", "optional", "q", "k", "h", "pos", "shape", "size", "index",
            "abs", "min", "max", "clamp", "cdiv", "popcount", "ilog2", "bit_length",
            "is_pow2", "all", "any", "sum", "prod", "floor", "sqrt", "exp", "log", "tanh",
            "chunk_topk", "causal", "sliding", "neighborhood", "backend", "name", "source",
            "import_roots", "__import__", "eval"]
TOKENS = ["(", ")", "{", "}", "[", "]", ",", ":", "=", "==", "<", "<=", ">>", "<<", "..", ".",
          "+", "-", "*", "/", "//", "%", "**", "~", "&", "|", "^", "->", '"x.attn"', '"',
          "\n", " ", "#", "##", "int[2]", "int[*]"] + KEYWORDS
EXTREMES = ["0", "1", "-1", "2", "3", "62", "63", "64", "65", "2147483648", "4294967296",
            "4611686018427387904", "9223372036854775807", "9223372036854775808",
            "-9223372036854775808", "-9223372036854775807 - 1", "99999999999999999999",
            "0x7fffffffffffffff", "0xffffffffffffffff", "1e308", "1e309", "-1e308",
            "1e-320", "0.0", "1.5", "(1 << 62)", "(1 << 63)", "(-1 >> 70)", "(1 << 64)"]
ODD_CHARS = ["\f", "\v", "\x1c", "\x1d", "\x1e", "\x85", "\u2028", "\u2029", "\r", "\r\n",
             "\x00", "\ufeff", "\t", "\u200b", "\u00e9", "\u2264", "\U0001f600", "\x7f",
             "\x1b[31m", "\u202e", "\\", "'", "`", "$", "@", "?", "!"]
BRACKETS = "()[]{}"
HOSTILE_PATHS = [
    "/etc/passwd", "/etc/passwd.attn", "../../../../../../etc/passwd", "/dev/zero",
    "/dev/zero.attn", "/proc/self/environ.attn", "../outside.attn", "{OUTSIDE}/secret.attn",
    "{OUTSIDE}/../outside/secret.attn", "sub/../../outside/secret.attn", "link.attn",
    "dir.attn", "a" * 300 + ".attn", "x\\x00.attn", "~/x.attn", "patterns/../../x.attn",
    "", ".attn", "/", "sliding.attn", "lib.attn", "./lib.attn", "sub/lib.attn",
    "\\\\\\\\server\\\\share\\\\x.attn", "lib.attn/", "LIB.ATTN", "lib.attn.py",
    "patterns/sliding.attn", "/" + "x/" * 200 + "y.attn",
]


def corpus() -> list[tuple[str, str]]:
    """(name, text) of every standard pattern file and every ```attn block of the docs."""
    out = [(p.name, p.read_text()) for p in sorted((ROOT / "patterns").glob("*.attn"))]
    for doc in sorted((ROOT / "docs").glob("*.md")):
        blocks = re.findall(r"```attn\n(.*?)```", doc.read_text(), re.S)
        out += [(f"{doc.name}#{i}", b) for i, b in enumerate(blocks)]
    return out


def doc_files() -> dict[str, str]:
    """The documentation's `# file: NAME` blocks, written beside every case so that the
    examples' imports of one another resolve."""
    out = {}
    for name, text in corpus():
        m = re.match(r"# file: (\S+)", text)
        if m and "#" in name:
            out[m.group(1)] = text
    return out


CORPUS = corpus()


# ------------------------------------------------------------------ token-level mutations


def _lexemes(text: str) -> list[re.Match]:
    return list(LEXEME.finditer(text))


def _splice(text: str, m: re.Match, new: str) -> str:
    return text[:m.start()] + new + text[m.end():]


def mutate(text: str, rng: random.Random) -> tuple[str, str]:
    """One mutation of `text`, and its name."""
    lex = _lexemes(text)
    if not lex:
        return text + rng.choice(TOKENS), "insert"
    m = rng.choice(lex)
    op = rng.choice(["delete", "duplicate", "swap", "near-miss", "extreme", "bracket",
                     "char", "nest", "insert", "line", "byte"])
    if op == "delete":
        return _splice(text, m, ""), op
    if op == "duplicate":
        return _splice(text, m, m.group() + " " + m.group()), op
    if op == "swap":
        i = lex.index(m)
        if i + 1 < len(lex):
            a, b = lex[i], lex[i + 1]
            return (text[:a.start()] + b.group() + text[a.end():b.start()] + a.group()
                    + text[b.end():]), op
        return _splice(text, m, ""), op
    if op == "near-miss":
        names = [x for x in lex if NAME.fullmatch(x.group())]
        if not names:
            return _splice(text, m, rng.choice(KEYWORDS)), op
        m = rng.choice(names)
        word = m.group()
        how = rng.randrange(4)
        i = rng.randrange(len(word))
        if how == 0:
            word = word[:i] + word[i + 1:]
        elif how == 1:
            word = word[:i] + rng.choice("abcdefghijklmnopqrstuvwxyz_0") + word[i:]
        elif how == 2:
            word = word[:i] + rng.choice("abcdefghijklmnopqrstuvwxyz") + word[i + 1:]
        else:
            word = rng.choice(KEYWORDS + [x.group() for x in names])
        return _splice(text, m, word or "_"), op
    if op == "extreme":
        nums = [x for x in lex if NUMBER.match(x.group())]
        m = rng.choice(nums) if nums else m
        return _splice(text, m, rng.choice(EXTREMES)), op
    if op == "bracket":
        i = rng.randrange(len(text) + 1)
        if rng.random() < 0.5:
            return text[:i] + rng.choice(BRACKETS) + text[i:], op
        at = [j for j, c in enumerate(text) if c in BRACKETS]
        if at:
            j = rng.choice(at)
            return text[:j] + text[j + 1:], op
        return text[:i] + "(" + text[i:], op
    if op == "char":
        i = rng.randrange(len(text) + 1)
        return text[:i] + rng.choice(ODD_CHARS) + text[i:], op
    if op == "nest":
        n = rng.choice([30, 60, 99, 100, 101, 150, 400, 2000])
        how = rng.randrange(4)
        if how == 0:
            return _splice(text, m, "(" * n + m.group() + ")" * n), op
        if how == 1:
            return _splice(text, m, "not " * n + m.group()), op
        if how == 2:
            return _splice(text, m, m.group() + " + 1" * n), op
        return _splice(text, m, "-" * n + m.group()), op
    if op == "insert":
        return text[:m.start()] + rng.choice(TOKENS) + " " + text[m.start():], op
    if op == "line":
        lines = text.split("\n")
        i, j = rng.randrange(len(lines)), rng.randrange(len(lines))
        how = rng.randrange(3)
        if how == 0:
            del lines[i]
        elif how == 1:
            lines.insert(j, lines[i])
        else:
            lines[i], lines[j] = lines[j], lines[i]
        return "\n".join(lines), op
    i = rng.randrange(len(text))
    return text[:i] + chr(rng.randrange(1, 0x3000)) + text[i + 1:], op


# ------------------------------------------------------------------ generated programs

PAT = "pattern {name}({params}) {{\n{body}\n}}\n"


def _pat(name: str, body: str, params: str = "N: int") -> str:
    body = "\n".join("    " + ln for ln in body.split("\n"))
    return PAT.format(name=name, params=params, body=body)


def exponential(rng: random.Random) -> str:
    """Definitions that each use the previous one twice: 2^depth when expanded."""
    depth = rng.choice([8, 12, 16, 22, 30, 40])
    kind = rng.choice(["fn", "fn-int", "const", "call", "include", "average", "let"])
    if kind == "fn":
        src = "fn e0() -> bool = k <= q\n" + "".join(
            f"fn e{i}() -> bool = e{i - 1}() or e{i - 1}()\n" for i in range(1, depth + 1))
        return src + _pat("p", f"space seq(N)\nattend e{depth}()")
    if kind == "fn-int":
        src = "fn e0(x: int) -> int = x + 1\n" + "".join(
            f"fn e{i}(x: int) -> int = e{i - 1}(x) + e{i - 1}(x)\n" for i in range(1, depth + 1))
        return src + _pat("p", f"space seq(N)\nattend e{depth}(q) % 7 == k % 7")
    if kind == "const":
        src = "const c0 = 1\n" + "".join(f"const c{i} = c{i - 1} + c{i - 1}\n"
                                         for i in range(1, depth + 1))
        return src + _pat("p", f"space seq(N)\nattend k <= q + c{depth} % 3")
    if kind == "let":
        lets = "\n".join(f"let a{i} = a{i - 1} + a{i - 1}" for i in range(1, depth + 1))
        return _pat("p", f"space seq(N)\nlet a0 = q - k\n{lets}\nattend a{depth} >= 0")
    src = _pat("p0", "space seq(N)\nattend k <= q")
    for i in range(1, depth + 1):
        if kind == "call":
            body = f"space seq(N)\nattend p{i - 1}(N) or p{i - 1}(N)"
        elif kind == "include":
            body = f"include p{i - 1}(N)\ninclude p{i - 1}(N)"
        else:
            body = f"average p{i - 1}(N), p{i - 1}(N)"
        src += _pat(f"p{i}", body)
    return src


def deep_chain(rng: random.Random) -> str:
    """A long chain of definitions, each using the next once."""
    n = rng.choice([50, 120, 170, 400, 1500])
    kind = rng.choice(["fn", "const", "call", "include"])
    if kind == "fn":
        src = "fn f0() -> int = 1\n" + "".join(f"fn f{i}() -> int = f{i - 1}() + 1\n"
                                              for i in range(1, n + 1))
        return src + _pat("p", f"space seq(N)\nattend k <= q + f{n}() % 2")
    if kind == "const":
        src = "const c0 = 1\n" + "".join(f"const c{i} = c{i - 1} + 1\n"
                                         for i in range(1, n + 1))
        return src + _pat("p", f"space seq(N)\nattend k <= q + c{n} % 2")
    src = _pat("p0", "space seq(N)\nattend k <= q")
    for i in range(1, n + 1):
        body = (f"space seq(N)\nattend p{i - 1}(N)" if kind == "call"
                else f"include p{i - 1}(N)")
        src += _pat(f"p{i}", body)
    return src


def recursive(rng: random.Random) -> str:
    kind = rng.randrange(7)
    if kind == 0:
        return "fn f(x: int) -> int = f(x - 1)\n" + _pat("p", "space seq(N)\nattend f(q) > k")
    if kind == 1:
        return ("fn f(x: int) -> int = g(x)\nfn g(x: int) -> int = f(x) + 1\n"
                + _pat("p", "space seq(N)\nattend g(q) > k"))
    if kind == 2:
        return "const A = B + 1\nconst B = A\n" + _pat("p", "space seq(N)\nattend k < A")
    if kind == 3:
        return _pat("p", "space seq(N)\ninclude p(N)\nattend k <= q")
    if kind == 4:
        return (_pat("a", "space seq(N)\nattend b(N)") + _pat("b", "space seq(N)\nattend a(N)"))
    if kind == 5:
        return (_pat("a", "include b(N)") + _pat("b", "average a(N), a(N)"))
    return ("fn f() -> bool = p(4)\n" + _pat("p", "space seq(N)\nattend f()"))


def imports(rng: random.Random) -> tuple[str, dict, str | None, tuple]:
    """(source, files, main, roots): import cycles, diamonds and hostile paths."""
    p = _pat("p", "space seq(N)\nattend k <= q")
    kind = rng.randrange(6)
    files = {"lib.attn": "fn near(w: int) -> bool = abs(q - k) <= w\n",
             "sub/lib.attn": "const W = 2\n"}
    if kind == 0:  # a cycle
        files.update({"a.attn": 'import "b.attn"\nfn fa() -> bool = true\n',
                      "b.attn": 'import "c.attn"\nfn fb() -> bool = true\n',
                      "c.attn": 'import "a.attn"\nfn fc() -> bool = true\n'})
        return 'import "a.attn"\n' + p, files, None, ()
    if kind == 1:  # a diamond, through a file compiled by path
        files.update({"top.attn": 'import "l.attn"\nimport "r.attn"\n' + p,
                      "l.attn": 'import "base.attn"\n', "r.attn": 'import "base.attn"\n',
                      "base.attn": "fn yes() -> bool = true\n"})
        return "", files, "top.attn", ()
    path = rng.choice(HOSTILE_PATHS)
    stmt = rng.choice([f'import "{path}"', f'from "{path}" import near, W, x'])
    if kind == 2:  # a hostile path in an imported file
        files["mid.attn"] = stmt + "\n"
        return 'import "mid.attn"\n' + p, files, None, ()
    if kind == 3:  # a hostile path in the file compiled by path
        files["main.attn"] = stmt + "\n" + p
        return "", files, "main.attn", ()
    if kind == 4:  # the outside folder allowed: its canary is then the user's own file
        return stmt + "\n" + p, files, None, ("{OUTSIDE}",)
    return stmt + "\n" + p, files, None, ()


def reserved(rng: random.Random) -> str:
    name = rng.choice(["backend", "scale", "name", "op", "v", "source", "layers", "query",
                       "flex", "self", "pattern", "import_roots", "target", "head_dim",
                       "progress", "keep_sets", "q", "k", "h"])
    if rng.random() < 0.5:
        return _pat("p", f"space seq(N)\ninput {name}: int[N]\nattend k <= q + {name}[q]")
    return _pat("p", "space seq(N)\nattend k <= q + " + name, f"N: int, {name}: int = 1")


def generated(rng: random.Random):
    kind = rng.choice(["exponential", "deep", "recursive", "imports", "reserved"])
    files, main, roots = {}, None, ()
    if kind == "exponential":
        src = exponential(rng)
    elif kind == "deep":
        src = deep_chain(rng)
    elif kind == "recursive":
        src = recursive(rng)
    elif kind == "imports":
        src, files, main, roots = imports(rng)
    else:
        src = reserved(rng)
    return kind, src, files, main, roots


def make_case(seed: int, index: int) -> dict:
    """The case `index` of a run seeded `seed`."""
    rng = random.Random(f"{seed}:{index}")
    files, main, roots = {}, None, ()
    if rng.random() < 0.25:
        kind, src, files, main, roots = generated(rng)
        if rng.random() < 0.3 and src:
            src, op = mutate(src, rng)
            kind += "+" + op
    else:
        name, src = rng.choice(CORPUS)
        ops = []
        for _ in range(rng.choice([0, 1, 1, 1, 1, 2, 3])):  # 0: the original, new values
            src, op = mutate(src, rng)
            ops.append(op)
        kind = f"{name}:{'+'.join(ops) or 'as is'}"
        if rng.random() < 0.1:  # the mutant as a file compiled by path
            files, main = {"main.attn": src}, "main.attn"
            src = ""
    return {"index": index, "kind": kind, "source": src, "files": files, "main": main,
            "roots": roots, "seed": rng.randrange(1 << 30)}
