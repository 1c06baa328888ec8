"""Front end: .attn text -> untyped IR, with lark errors turned into located AttnErrors."""

from __future__ import annotations

import ast as _pyast
import dataclasses

import lark
from lark import Token, Transformer, v_args
from lark.exceptions import UnexpectedCharacters, UnexpectedEOF, UnexpectedInput, VisitError

from attndsl import caches
from attndsl._resources import grammar_text
from attndsl.errors import AttnError, AttnSyntaxError, Span
from attndsl.lang import ir

_TOKEN_NAMES = {
    "NAME": "a name", "INT": "an integer", "FLOAT": "a number", "STRING": "a string",
    "LPAR": "'('", "RPAR": "')'", "LBRACE": "'{'", "RBRACE": "'}'", "LSQB": "'['",
    "RSQB": "']'", "COMMA": "','", "COLON": "':'", "EQUAL": "'='", "DOT": "'.'",
    "COMP_OP": "a comparison", "PLUS": "'+'", "MINUS": "'-'", "STAR": "'*'",
    "SLASH": "'/'", "DSLASH": "'//'", "PERCENT": "'%'",
    "SHIFT_OP": "'<<' or '>>'", "TILDE": "'~'", "CIRCUMFLEX": "'^'",
    "VBAR": "'|'", "AMPERSAND": "'&'", "DOUBLE_STAR": "'**'",
    "RULE_KIND": "'attend', 'exclude' or 'within'",
    "SCORE_KIND": "'bias', 'softcap' or 'scale'", "SPACE_ROLE": "'space', 'query' or 'key'",
    "POOL_ROLE": "'keys', 'values' or 'queries'", "DOC": "a doc comment", "$END": "end of file",
}


def _lark() -> lark.Lark:
    """The LALR parser of grammar/attn.lark, built once (caches.PARSER)."""
    return caches.PARSER.get_or_create("attn.lark", lambda: lark.Lark(
        grammar_text(), parser="lalr", propagate_positions=True, maybe_placeholders=True,
        start="start"))


class _Builder(Transformer):
    """Each grammar alias maps to one method that builds an IR node."""

    def __init__(self, file: str, lines: list[str]):
        super().__init__()
        self.file = file
        self.lines = lines

    # -- spans
    def span(self, meta_or_tok) -> Span:
        if isinstance(meta_or_tok, Token):
            line, col = meta_or_tok.line, meta_or_tok.column
            eline, ecol = meta_or_tok.end_line, meta_or_tok.end_column
        else:
            line, col = meta_or_tok.line, meta_or_tok.column
            eline, ecol = meta_or_tok.end_line, meta_or_tok.end_column
        text = self.lines[line - 1] if 0 < line <= len(self.lines) else ""
        return Span(self.file, line, col, eline, ecol, text)

    def string(self, tok: Token) -> str:
        try:
            return _string(tok)
        except (SyntaxError, ValueError):  # a bad escape such as "\N" or "\u12"
            raise AttnSyntaxError(f"invalid escape sequence in string {tok}",
                                  self.span(tok)) from None

    # -- items
    def start(self, items):
        return tuple(items)

    @v_args(meta=True)
    def import_all(self, meta, c):
        return ir.Import(self.string(c[0]), None, self.span(meta))

    @v_args(meta=True)
    def import_some(self, meta, c):
        return ir.Import(self.string(c[0]), tuple(str(t) for t in c[1:]), self.span(meta))

    def doc(self, line: int) -> str:
        """The `##` lines directly above source line `line` (1-based), without the marks."""
        out = []
        i = line - 2
        while i >= 0 and self.lines[i].lstrip().startswith("##"):
            out.append(self.lines[i].lstrip()[2:].strip())
            i -= 1
        return "\n".join(reversed(out))

    @v_args(meta=True)
    def const_def(self, meta, c):
        name, value = c
        return ir.ConstDef(str(name), value, self.doc(meta.line), self.span(name), self.file)

    @v_args(meta=True)
    def fn_def(self, meta, c):
        name, params, ret, body = c
        doc = self.doc(meta.line)
        lets, expr = body
        return ir.FnDef(str(name), tuple(params or ()), ret, lets, expr, doc or "",
                        self.span(name), self.file)

    def fn_body_expr(self, c):
        return (), c[0]

    def fn_body_block(self, c):
        return tuple(c[:-1]), c[-1]

    @v_args(meta=True)
    def pattern_def(self, meta, c):
        name, params, *body = c
        return ir.PatternDef(str(name), tuple(params or ()), tuple(body), self.doc(meta.line),
                             self.span(name), self.file)

    def params(self, c):
        return tuple(c)

    @v_args(meta=True)
    def param(self, meta, c):
        return ir.Param(str(c[0]), c[1], c[2], self.span(c[0]))

    @v_args(meta=True)
    def type_scalar(self, meta, c):
        return ir.TypeRef(str(c[0]), None, self.span(meta))

    @v_args(meta=True)
    def type_array(self, meta, c):
        return ir.TypeRef(str(c[0]), tuple(c[1]), self.span(meta))

    def type_dims(self, c):
        return tuple(c)

    def dim_any(self, c):
        return None

    # -- statements
    @v_args(meta=True)
    def space_stmt(self, meta, c):
        role, kind, args = c
        for a in args:
            if isinstance(a, ir.Keyword):
                raise AttnSyntaxError("space sizes are positional", a.span)
        return ir.SpaceStmt(str(role), str(kind), tuple(args), self.span(meta))

    @v_args(meta=True)
    def let_stmt(self, meta, c):
        return ir.LetStmt(str(c[0]), c[1], self.span(c[0]))

    @v_args(meta=True)
    def require_stmt(self, meta, c):
        return ir.RequireStmt(c[0], self.string(c[1]) if c[1] is not None else None,
                              self.span(meta))

    @v_args(meta=True)
    def input_stmt(self, meta, c):
        return ir.InputStmt(str(c[0]), c[1], c[2] is not None, self.span(c[0]))

    @v_args(meta=True)
    def heads_stmt(self, meta, c):
        return ir.HeadsStmt(c[0], self.span(meta))

    @v_args(meta=True)
    def rule_stmt(self, meta, c):
        return ir.RuleStmt(str(c[0]), c[1], self.span(meta))

    @v_args(meta=True)
    def score_stmt(self, meta, c):
        return ir.ScoreStmt(str(c[0]), c[1], self.span(meta))

    @v_args(meta=True)
    def route_stmt(self, meta, c):
        name, top, shared, *opts = c
        out = ir.RouteStmt(str(name), top, shared, self.span(meta))
        for kind, val, sp in opts:
            if getattr(out, kind) is not None:
                raise AttnSyntaxError(f"'route' has two '{kind}' options", sp)
            out = dataclasses.replace(out, **{kind: val})
        return out

    @v_args(meta=True)
    def route_scaled(self, meta, c):
        return ("scaled", c[1], self.span(meta))

    @v_args(meta=True)
    def route_hard(self, meta, c):
        return ("hard", c[0], self.span(meta))

    @v_args(meta=True)
    def route_weighted(self, meta, c):
        return ("weighted", ir.Name(self.span(c[0]), str(c[0])), self.span(meta))

    @v_args(meta=True)
    def route_grouped(self, meta, c):
        return ("grouped", ir.Name(self.span(c[0]), str(c[0])), self.span(meta))

    @v_args(meta=True)
    def average_stmt(self, meta, c):
        return ir.AverageStmt(tuple(c), self.span(meta))

    @v_args(meta=True)
    def include_stmt(self, meta, c):
        return ir.IncludeStmt(c[0], self.span(meta))

    @v_args(meta=True)
    def pattern_ref(self, meta, c):
        args = c[1] or ()
        pos = tuple(a for a in args if not isinstance(a, ir.Keyword))
        kws = tuple(a for a in args if isinstance(a, ir.Keyword))
        return ir.PatternRef(str(c[0]), pos, kws, self.span(meta))

    @v_args(meta=True)
    def nnz_stmt(self, meta, c):
        return ir.NnzStmt(c[0], c[1], self.span(meta))

    @v_args(meta=True)
    def head_block(self, meta, c):
        lo, hi, *body = c
        rng = ir.HeadRange(lo, hi, _join(lo.span, hi.span))
        return ir.HeadBlock(rng, tuple(body), self.span(meta))

    @v_args(meta=True)
    def summary_stmt(self, meta, c):
        name, axes, *items = c
        member = attend = at = None
        pools, given, scores = [], [], []
        for kind, val, sp in items:
            if kind == "member":
                if member is not None:
                    raise AttnSyntaxError("summary has two 'member' rules", sp)
                member = val
            elif kind == "attend":
                if attend is not None:
                    raise AttnSyntaxError("summary has two 'attend' rules", sp)
                attend = val
            elif kind == "score":
                scores.append(val + (sp,))
            elif kind == "given":
                given.append(val + (sp,))
            elif kind == "at":
                if at is not None:
                    raise AttnSyntaxError("summary has two 'queries at' lines", sp)
                at = val
            else:
                pools.append((kind, val, sp))
        return ir.SummaryStmt(str(name), tuple(axes), member, attend, tuple(pools),
                              self.span(name), tuple(given), at, tuple(scores))

    def summary_axes(self, c):
        return tuple(c)

    @v_args(meta=True)
    def summary_axis(self, meta, c):
        return ir.SummaryAxis(str(c[0]), c[1], self.span(c[0]), c[2])

    @v_args(meta=True)
    def summary_member(self, meta, c):
        return ("member", c[0], self.span(meta))

    @v_args(meta=True)
    def summary_attend(self, meta, c):
        if str(c[0]) != "attend":
            raise AttnSyntaxError(f"a summary takes 'attend', not '{c[0]}'", self.span(c[0]))
        return ("attend", c[1], self.span(meta))

    @v_args(meta=True)
    def summary_pool(self, meta, c):
        return (str(c[0]), str(c[1]), self.span(c[1]))

    @v_args(meta=True)
    def summary_score(self, meta, c):
        if str(c[0]) != "bias":
            raise AttnSyntaxError(f"a summary takes 'bias', not '{c[0]}' ('scale' and "
                                  "'softcap' are the pattern's)", self.span(c[0]))
        return ("score", ("bias", c[1]), self.span(meta))

    @v_args(meta=True)
    def summary_given(self, meta, c):
        if str(c[0]) == "queries":
            raise AttnSyntaxError("'queries' cannot come from an input (only keys and "
                                  "values)", self.span(c[0]))
        return ("given", (str(c[0]), str(c[1])), self.span(c[1]))

    @v_args(meta=True)
    def summary_at(self, meta, c):
        if str(c[0]) != "queries":
            raise AttnSyntaxError(f"'{c[0]} at' is not a pooling; 'queries at POSITION' "
                                  "takes the query of one token", self.span(c[0]))
        return ("at", c[1], self.span(meta))

    # -- expressions
    @v_args(meta=True)
    def if_expr(self, meta, c):
        return ir.IfExpr(self.span(meta), c[0], c[1], c[2])

    @v_args(meta=True)
    def let_expr(self, meta, c):
        return ir.LetExpr(self.span(meta), str(c[0]), c[1], c[2])

    def _bin(self, meta, op, a, b):
        return ir.Binary(self.span(meta), op, a, b)

    @v_args(meta=True)
    def or_op(self, meta, c):
        return self._bin(meta, "or", c[0], c[1])

    @v_args(meta=True)
    def and_op(self, meta, c):
        return self._bin(meta, "and", c[0], c[1])

    @v_args(meta=True)
    def not_op(self, meta, c):
        return ir.Unary(self.span(meta), "not", c[0])

    @v_args(meta=True)
    def compare(self, meta, c):
        operands = tuple(c[0::2])
        ops = tuple(str(t) for t in c[1::2])
        return ir.Compare(self.span(meta), ops, operands)

    @v_args(meta=True)
    def bor_op(self, meta, c):
        return self._bin(meta, "|", c[0], c[1])

    @v_args(meta=True)
    def bxor_op(self, meta, c):
        return self._bin(meta, "^", c[0], c[1])

    @v_args(meta=True)
    def band_op(self, meta, c):
        return self._bin(meta, "&", c[0], c[1])

    @v_args(meta=True)
    def shift_op(self, meta, c):
        return self._bin(meta, str(c[1]), c[0], c[2])

    @v_args(meta=True)
    def add_op(self, meta, c):
        return self._bin(meta, str(c[1]), c[0], c[2])

    @v_args(meta=True)
    def mul_op(self, meta, c):
        return self._bin(meta, str(c[1]), c[0], c[2])

    @v_args(meta=True)
    def neg_op(self, meta, c):
        if isinstance(c[1], ir.IntLit | ir.FloatLit) and c[1].span.col == meta.column + 1:
            return type(c[1])(self.span(meta), -c[1].value)
        return ir.Unary(self.span(meta), "-", c[1])

    @v_args(meta=True)
    def invert_op(self, meta, c):
        return ir.Unary(self.span(meta), "~", c[0])

    @v_args(meta=True)
    def pow_op(self, meta, c):
        return self._bin(meta, "**", c[0], c[1])

    @v_args(meta=True)
    def call(self, meta, c):
        func, args = c
        if not isinstance(func, ir.Name):
            raise AttnSyntaxError("only named functions can be called", func.span)
        args = args or ()
        pos = tuple(a for a in args if not isinstance(a, ir.Keyword))
        kws = tuple(a for a in args if isinstance(a, ir.Keyword))
        seen_kw = False
        for a in args:
            if isinstance(a, ir.Keyword):
                seen_kw = True
            elif seen_kw:
                raise AttnSyntaxError("positional argument after a keyword argument", a.span)
        return ir.Call(self.span(meta), func.id, pos, kws)

    def args(self, c):
        return tuple(c)

    @v_args(meta=True)
    def kwarg(self, meta, c):
        return ir.Keyword(str(c[0]), c[1], self.span(c[0]))

    @v_args(meta=True)
    def index(self, meta, c):
        out = c[0]
        for i in c[1:]:  # x[i, j] is x[i][j]
            out = ir.Index(self.span(meta), out, i)
        return out

    @v_args(meta=True)
    def attr(self, meta, c):
        return ir.Attr(self.span(meta), c[0], str(c[1]))

    @v_args(meta=True)
    def int_lit(self, meta, c):
        try:
            value = int(str(c[0]), 0)
        except ValueError:  # e.g. 056: leading zeros would read as octal elsewhere
            raise AttnSyntaxError(f"invalid integer '{c[0]}' (leading zeros are not allowed)",
                                  self.span(meta)) from None
        return ir.IntLit(self.span(meta), value)

    @v_args(meta=True)
    def float_lit(self, meta, c):
        return ir.FloatLit(self.span(meta), float(str(c[0])))

    @v_args(meta=True)
    def true_lit(self, meta, c):
        return ir.BoolLit(self.span(meta), True)

    @v_args(meta=True)
    def false_lit(self, meta, c):
        return ir.BoolLit(self.span(meta), False)

    @v_args(meta=True)
    def name(self, meta, c):
        return ir.Name(self.span(meta), str(c[0]))

    @v_args(meta=True)
    def tuple_lit(self, meta, c):
        return ir.TupleLit(self.span(meta), tuple(x for x in c if x is not None))


def _string(tok) -> str:
    return _pyast.literal_eval(str(tok))


def _join(a: Span, b: Span) -> Span:
    return Span(a.file, a.line, a.col, b.end_line, b.end_col, a.text)


def _describe(tok: Token) -> str:
    if tok.type == "$END":
        return "end of file"
    return f"'{tok}'"


def _expected(names) -> str:
    words = sorted({_TOKEN_NAMES.get(n, f"'{n.lower()}'" if n.isupper() else n) for n in names
                    if not n.startswith("__")})
    if len(words) > 6:
        return ""
    return " (expected " + ", ".join(words) + ")" if words else ""


def _syntax_error(err: UnexpectedInput, file: str, lines: list[str]) -> AttnSyntaxError:
    line = getattr(err, "line", None) or len(lines) or 1
    col = getattr(err, "column", None) or 1
    tok = getattr(err, "token", None)
    if isinstance(err, UnexpectedEOF) or line == -1 or (tok is not None and tok.type == "$END"):
        filled = [i for i, t in enumerate(lines) if t.strip()]  # point just past the last text
        line = filled[-1] + 1 if filled else 1
        col = len(lines[line - 1].rstrip()) + 1 if filled else 1
    text = lines[line - 1] if 0 < line <= len(lines) else ""
    if isinstance(err, UnexpectedCharacters):
        ch = text[col - 1] if col - 1 < len(text) else "?"
        msg = f"unexpected character {_char(ch)}"
        span = Span(file, line, col, line, col + 1, text)
        return AttnSyntaxError(msg, span)
    unclosed = _unclosed(lines, line, col)
    glued = _glued_let(lines, line, unclosed) if tok is not None and str(tok) == "}" else None
    if glued is not None:
        return AttnSyntaxError(glued[0], Span(file, glued[1], glued[2], glued[1],
                                              len(lines[glued[1] - 1].rstrip()) + 1,
                                              lines[glued[1] - 1]))
    if tok is not None and tok.type != "$END":
        msg = f"unexpected {_describe(tok)}" + _expected(getattr(err, "expected", ()) or ())
        if unclosed and unclosed[0] in "([" and unclosed[1] < line:
            msg += f"; the '{unclosed[0]}' at line {unclosed[1]} is not closed"
        span = Span(file, line, col, line, col + max(1, len(str(tok))), text)
        return AttnSyntaxError(msg, span)
    if unclosed:  # point at the bracket that is never closed
        ch, bline, bcol = unclosed
        return AttnSyntaxError(f"unexpected end of file: this '{ch}' is never closed",
                               Span(file, bline, bcol, bline, bcol + 1, lines[bline - 1]))
    msg = "unexpected end of file" + _expected(getattr(err, "expected", ()) or ())
    return AttnSyntaxError(msg, Span(file, line, col, line, col + 1, text))


def _glued_let(lines: list[str], line: int, unclosed) -> tuple[str, int, int] | None:
    """A fn block whose result line starts with '(' or '-' right after a `let`: newlines do
    not end expressions, so that line became part of the let's value (a call, a
    subtraction) and the body ends without a result. (message, line, column) of that line,
    or None when the '}' at `line` closes something else."""
    if unclosed is None or unclosed[0] != "{" or "->" not in lines[unclosed[1] - 1]:
        return None  # not the body of a fn (`fn f(...) -> T {`)
    last_let, glued = None, None
    for ln in range(unclosed[1] + 1, line + 1):
        text = lines[ln - 1].split("#", 1)[0].strip()
        if ln == line:
            text = text.split("}", 1)[0].strip()
        if text.startswith("let ") or text == "let":
            last_let, glued = ln, None
        elif last_let is not None and glued is None and text[:1] in ("(", "-"):
            glued = ln
    if glued is None:
        return None
    text = lines[glued - 1]
    first = text[len(text) - len(text.lstrip())] if text.strip() else "("
    col = len(text) - len(text.lstrip()) + 1
    what = "a call of the value before it" if first == "(" else "a subtraction from it"
    return (f"this line continues the 'let' on line {last_let}: a line starting with "
            f"'{first}' is read as part of the expression above ({what}), so the function "
            f"body has no result expression; give the result a 'let' of its own and end "
            f"with its name, or start the line differently", glued, col)


def _char(ch: str) -> str:
    """A character for a message: itself in quotes, or its code point when it would not
    show (control characters, separators, format characters)."""
    if ch.isprintable() and not ch.isspace():
        return f"'{ch}'"
    return f"U+{ord(ch):04X}"


def _unclosed(lines: list[str], line: int, col: int):
    """The innermost bracket still open before (line, col), as (char, line, col), or None."""
    stack = []
    for ln, text in enumerate(lines[:line], 1):
        end = col - 1 if ln == line else len(text)
        i = 0
        while i < end:
            ch = text[i]
            if ch == "#":
                break
            if ch == '"':  # skip a string, honouring backslash escapes
                i += 1
                while i < len(text) and text[i] != '"':
                    i += 2 if text[i] == "\\" else 1
            elif ch in "([{":
                stack.append((ch, ln, i + 1))
            elif ch in ")]}" and stack:
                stack.pop()
            i += 1
    return stack[-1] if stack else None


MAX_DEPTH = 100  # nesting levels of the syntax tree; deeper input would exhaust the stack


def _too_deep(tree: lark.Tree):
    """The first subtree nested deeper than MAX_DEPTH, found without recursion, or None."""
    stack = [(tree, 0)]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_DEPTH:
            return node
        stack.extend((c, depth + 1) for c in reversed(node.children)
                     if isinstance(c, lark.Tree))  # leftmost first
    return None


def normalize(text: str) -> str:
    """The text as the grammar reads it: a leading byte-order mark dropped and every line
    ending ('\r\n' or a lone '\r') made '\n'."""
    if text.startswith("\ufeff"):
        text = text[1:]
    return text.replace("\r\n", "\n").replace("\r", "\n")


def source_lines(text: str) -> list[str]:
    """The one line model of every stage: lines end at '\n' only, as lark counts them (not
    str.splitlines(), which also splits at form feeds, U+2028 and others), so that a line
    number always names the line that is shown."""
    return normalize(text).split("\n")


def parse_text(text: str, file: str = "<string>") -> tuple:
    """Parse one file's text into a tuple of top-level IR items."""
    text = normalize(text)
    lines = text.split("\n")
    try:
        tree = _lark().parse(text)
    except UnexpectedInput as err:
        raise _syntax_error(err, file, lines) from None
    deep = _too_deep(tree)
    if deep is not None:
        raise AttnSyntaxError(f"expression nested too deeply (more than {MAX_DEPTH} levels); "
                              "split it with 'let'", _Builder(file, lines).span(deep.meta))
    try:
        return _Builder(file, lines).transform(tree)
    except VisitError as err:
        if isinstance(err.orig_exc, AttnError):
            raise err.orig_exc from None
        raise
