"""Type checker: resolves names, infers types, and returns the typed IR of a pattern.

All errors of a pattern are collected and raised together; an erroneous sub-expression gets
the ERROR type, which is compatible with everything, so one mistake does not cascade.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from . import ir
from .builtins import BUILTINS, DYNAMIC
from .errors import AttnError, AttnNameError, AttnSyntaxError, AttnTypeError, ErrorSink
from .errors import did_you_mean as _dym
from .evaluate import INT_LIMIT
from .ir import BOOL, FLOAT, INT, Type

ERROR = Type("error")
SPACE_KINDS = {"seq": ("i",), "grid": ("y", "x"), "volume": ("t", "y", "x"), "channels": ("c",)}
POOLS = {"keys": ("max", "mean"), "queries": ("max", "mean"),
         "values": ("mean", "max", "expectation")}
CONTEXT = ("q", "k", "h")
MAX_EXPR_DEPTH = 160


@dataclass(frozen=True, slots=True)
class Space:
    kind: str
    sizes: tuple[ir.Expr, ...]
    axes: tuple[str, ...]
    span: object
    inherited: bool = False  # taken from an included pattern; sizes come from binding


@dataclass(frozen=True, slots=True)
class InputDecl:
    name: str
    kind: str  # int|float|bool
    dims: tuple  # () scalar; a None item is '*'
    optional: bool
    span: object


@dataclass(frozen=True, slots=True)
class Summary:
    name: str
    axes: tuple[ir.SummaryAxis, ...]
    member: ir.Expr
    attend: ir.Expr
    keys: str
    values: str
    queries: str
    span: object


@dataclass(frozen=True, slots=True)
class CheckedPattern:
    """The typed IR of one pattern; every expression in it has `ty` set."""

    name: str
    params: tuple[tuple[ir.Param, Type], ...]
    doc: str
    span: object
    file: str
    qspace: Space | None
    kspace: Space | None
    lets: tuple[ir.LetStmt, ...]
    requires: tuple[ir.RequireStmt, ...]
    inputs: tuple[InputDecl, ...]
    heads: ir.Expr | None
    rules: tuple[ir.RuleStmt, ...]
    scores: tuple[ir.ScoreStmt, ...]
    summaries: tuple[Summary, ...]
    route: ir.RouteStmt | None
    average: tuple[tuple[str, ir.PatternRef], ...]
    includes: tuple[ir.PatternRef, ...]
    uses_h: bool
    uses_content: bool
    nnz: ir.NnzStmt | None = None

    @property
    def channel(self) -> bool:
        return self.qspace is not None and self.qspace.kind == "channels"


class _Scope:
    def __init__(self, parent: _Scope | None = None):
        self.parent = parent
        self.names: dict[str, tuple[str, Type]] = {}

    def get(self, name: str):
        s = self
        while s is not None:
            if name in s.names:
                return s.names[name]
            s = s.parent
        return None

    def all_names(self):
        s, out = self, set()
        while s is not None:
            out |= set(s.names)
            s = s.parent
        return out


def _kind_ok(want: str, have: str) -> bool:
    return have == "error" or want == have or (want == "float" and have == "int")


def _join_n(a: Type, b: Type):
    if a.n is None:
        return b.n
    if b.n is None or a.n == b.n:
        return a.n
    return False


class Checker:
    def __init__(self, module: ir.Module, sink: ErrorSink):
        self.module = module
        self.sink = sink
        self.fn_stack: list[str] = []
        self.uses_h = False
        self.uses_content = False
        self.allow_context: set[str] = set()
        self.qspace: Space | None = None
        self.kspace: Space | None = None
        self.summary_axes: dict[str, tuple[str, ...]] = {}
        self.has_heads = False
        self.mask_h = False  # 'h' used by a rule (the mask differs per head), not only a bias
        self.h_span = None  # the first use of 'h', where a missing 'heads N' is reported
        self.space_roles: set[str] = {"query", "key"}  # roles some statement declares
        self.call_depth = 0  # > 0 while checking a function body for a call site
        self.misused: dict[str, object] = {}  # q/k/h misused inside such a body
        self.depth = 0  # nesting of expressions being checked
        self.pattern_name: str | None = None  # the pattern being checked
        self.bad_ref = False  # an unknown or recursive pattern reference: no follow-ups

    def err(self, cls, msg: str, span) -> Type:
        self.sink.add(cls(msg, span))
        return ERROR

    # ------------------------------------------------------------ types
    def type_of_ref(self, tref: ir.TypeRef, scope: _Scope | None = None, array=False) -> Type:
        if tref.name not in ("int", "bool", "float"):
            return self.err(AttnTypeError, f"unknown type '{tref.name}'"
                            + _dym(tref.name, ["int", "bool", "float"]), tref.span)
        if tref.dims is None:
            return Type(tref.name)
        if array:
            return Type("array", None, False, tref.name, tref.dims)
        if len(tref.dims) != 1 or not isinstance(tref.dims[0], ir.IntLit):
            return self.err(AttnTypeError, "a per-axis type takes one integer width, as in "
                            f"'{tref.name}[2]'", tref.span)
        n = tref.dims[0].value
        if not 1 <= n <= 8:
            return self.err(AttnTypeError, f"tuple width must be between 1 and 8, not {n}",
                            tref.span)
        return Type(tref.name, n)

    # ------------------------------------------------------------ expressions
    def expr(self, e: ir.Expr, scope: _Scope) -> ir.Expr:
        if self.depth >= MAX_EXPR_DEPTH:  # deep chains of calls would exhaust the stack
            return dataclasses.replace(e, ty=self.err(
                AttnTypeError, f"expression nested too deeply (more than {MAX_EXPR_DEPTH} "
                "levels, counting the bodies of called functions)", e.span))
        m = getattr(self, "e_" + type(e).__name__)
        self.depth += 1
        try:
            return m(e, scope)
        finally:
            self.depth -= 1

    @staticmethod
    def ty(e) -> Type:
        return e.ty if e.ty is not None else ERROR

    def e_IntLit(self, e, scope):
        if abs(e.value) >= INT_LIMIT:
            return dataclasses.replace(e, ty=self.err(
                AttnTypeError, f"integer {e.value} does not fit in 64 bits", e.span))
        return dataclasses.replace(e, ty=INT)

    def e_FloatLit(self, e, scope):
        return dataclasses.replace(e, ty=FLOAT)

    def e_BoolLit(self, e, scope):
        return dataclasses.replace(e, ty=BOOL)

    def e_Name(self, e, scope):
        found = scope.get(e.id)
        if found is not None:
            ref, t = found[0], found[1]
            if len(found) > 2:  # a pattern-level let: its unique name and what it depends on
                uid, deps = found[2], found[3]
                bad = sorted(deps - self.allow_context - {"input"})
                if bad and not self.call_depth:
                    return dataclasses.replace(e, ty=self.err(
                        AttnNameError, f"'{e.id}' depends on '{bad[0]}', which cannot be used "
                        + self._where(), e.span))
                if "h" in deps:
                    self.uses_h = True
                return dataclasses.replace(e, id=uid, ty=t, ref=ref)
            return dataclasses.replace(e, ty=t, ref=ref)
        if e.id in CONTEXT:
            if e.id not in self.allow_context:
                if self.call_depth:  # reported once, at the call site (see call_fn)
                    self.misused.setdefault(e.id, e.span)
                    return dataclasses.replace(e, ty=ERROR)
                return dataclasses.replace(e, ty=self.err(
                    AttnNameError, f"'{e.id}' cannot be used {self._where()}", e.span))
            if e.id == "h":
                self.uses_h = True
                self.h_span = self.h_span or e.span
                return dataclasses.replace(e, ty=Type("int", None, False), ref="h")
            sp = self.qspace if e.id == "q" else self.kspace
            if sp is None:
                if ("query" if e.id == "q" else "key") not in self.space_roles or (
                        self.bad_ref):
                    return dataclasses.replace(e, ty=ERROR)  # the pattern's error says why
                return dataclasses.replace(e, ty=self.err(
                    AttnNameError, f"'{e.id}' is used before the pattern declares its space",
                    e.span))
            return dataclasses.replace(e, ty=Type("token", len(sp.axes), False, e.id, sp.axes),
                                       ref=e.id)
        g = self.module.scope.get(e.id)
        if isinstance(g, ir.ConstDef):
            return dataclasses.replace(e, ty=self.const_type(g), ref="const:" + g.file)
        if isinstance(g, ir.FnDef | ir.PatternDef):
            kind = "function" if isinstance(g, ir.FnDef) else "pattern"
            return dataclasses.replace(e, ty=self.err(
                AttnTypeError, f"{kind} '{e.id}' must be called: '{e.id}(...)'", e.span))
        if e.id in BUILTINS or e.id in DYNAMIC:
            return dataclasses.replace(e, ty=self.err(
                AttnTypeError, f"built-in '{e.id}' must be called: '{e.id}(...)'", e.span))
        cands = scope.all_names() | set(self.module.scope) | self.allow_context
        return dataclasses.replace(e, ty=self.err(
            AttnNameError, f"unknown name '{e.id}'" + _dym(e.id, cands), e.span))

    def _where(self) -> str:
        """Where q, k or h may not appear, for messages."""
        if self.allow_context == {"k"}:
            return "in a summary's 'member' rule, which sees only the key 'k'"
        if self.allow_context == {"q", "h"}:
            return "in a summary's 'attend' rule, which sees only the query 'q' and 'h'"
        return "here: this value must not depend on the query, key or head index"

    def const_type(self, c: ir.ConstDef) -> Type:
        if c.name in self.fn_stack:
            return self.err(AttnNameError, f"constant '{c.name}' refers to itself"
                            + _through(self.fn_stack, c.name), c.span)
        self.fn_stack.append(c.name)
        saved, saved_module = self.allow_context, self.module
        self.allow_context = set()
        self.module = self.module.home(c)
        try:
            t = self.ty(self.expr(c.value, _Scope()))
        finally:
            self.allow_context = saved
            self.module = saved_module
            self.fn_stack.pop()
        return t

    def e_TupleLit(self, e, scope):
        items = tuple(self.expr(i, scope) for i in e.items)
        tys = [self.ty(i) for i in items]
        if any(t.kind == "error" for t in tys):
            return dataclasses.replace(e, items=items, ty=ERROR)
        kinds = {t.kind for t in tys}
        if any(t.n is not None or t.kind not in ("int", "bool", "float") for t in tys):
            bad = next(i for i in items if self.ty(i).n is not None
                       or self.ty(i).kind not in ("int", "bool", "float"))
            return dataclasses.replace(e, items=items, ty=self.err(
                AttnTypeError, f"tuple items must be scalars, not {self.ty(bad)}", bad.span))
        if kinds == {"int", "float"}:
            kinds = {"float"}
        if len(kinds) != 1:
            return dataclasses.replace(e, items=items, ty=self.err(
                AttnTypeError, "tuple items must all have one type (int, bool or float)",
                e.span))
        if not 1 <= len(items) <= 8:
            return dataclasses.replace(e, items=items, ty=self.err(
                AttnTypeError, "tuples have 1 to 8 items", e.span))
        static = all(t.static for t in tys)
        return dataclasses.replace(e, items=items, ty=Type(kinds.pop(), len(items), static))

    def _numeric(self, t: Type) -> Type:
        """Tokens read as their flat index in arithmetic."""
        if t.kind == "token":
            return Type("int", None, False)
        return t

    def e_Unary(self, e, scope):
        x = self.expr(e.operand, scope)
        t = self._numeric(self.ty(x))
        if t.kind == "error":
            return dataclasses.replace(e, operand=x, ty=ERROR)
        want = {"-": ("int", "float"), "~": ("int",), "not": ("bool",)}[e.op]
        if t.kind not in want:
            return dataclasses.replace(e, operand=x, ty=self.err(
                AttnTypeError, f"'{e.op}' needs {' or '.join(want)}, not {t}", x.span))
        return dataclasses.replace(e, operand=x, ty=t)

    def e_Binary(self, e, scope):
        a, b = self.expr(e.left, scope), self.expr(e.right, scope)
        ta, tb = self._numeric(self.ty(a)), self._numeric(self.ty(b))
        out = dataclasses.replace(e, left=a, right=b)
        if "error" in (ta.kind, tb.kind):
            return dataclasses.replace(out, ty=ERROR)
        n = _join_n(ta, tb)
        if n is False:
            return dataclasses.replace(out, ty=self.err(
                AttnTypeError, f"'{e.op}' on tuples of different widths ({ta} and {tb})",
                e.span))
        static = ta.static and tb.static
        op = e.op
        if op in ("and", "or"):
            for x, t in ((a, ta), (b, tb)):
                if t.kind != "bool":
                    return dataclasses.replace(out, ty=self.err(
                        AttnTypeError, f"'{op}' needs bool operands, not {t}", x.span))
            return dataclasses.replace(out, ty=Type("bool", n, static))
        if op in ("&", "|", "^", "<<", ">>"):
            for x, t in ((a, ta), (b, tb)):
                if t.kind != "int":
                    hint = " (use 'and'/'or' for bool)" if t.kind == "bool" else ""
                    return dataclasses.replace(out, ty=self.err(
                        AttnTypeError, f"'{op}' needs int operands, not {t}{hint}", x.span))
            return dataclasses.replace(out, ty=Type("int", n, static))
        for x, t in ((a, ta), (b, tb)):
            if t.kind not in ("int", "float"):
                return dataclasses.replace(out, ty=self.err(
                    AttnTypeError, f"'{op}' needs numbers, not {t}", x.span))
        kind = "float" if "float" in (ta.kind, tb.kind) or op == "/" else "int"
        return dataclasses.replace(out, ty=Type(kind, n, static))

    def e_Compare(self, e, scope):
        ops = tuple(self.expr(o, scope) for o in e.operands)
        out = dataclasses.replace(e, operands=ops)
        tys = [self._numeric(self.ty(o)) for o in ops]
        if any(t.kind == "error" for t in tys):
            return dataclasses.replace(out, ty=ERROR)
        n = None
        for i, op in enumerate(e.ops):
            ta, tb = tys[i], tys[i + 1]
            nn = _join_n(ta, tb)
            if nn is False or (n is not None and nn is not None and nn != n):
                return dataclasses.replace(out, ty=self.err(
                    AttnTypeError, f"'{op}' on tuples of different widths ({ta} and {tb})",
                    e.span))
            n = nn if nn is not None else n
            numeric = ta.kind in ("int", "float") and tb.kind in ("int", "float")
            if not numeric and not (op in ("==", "!=") and ta.kind == tb.kind == "bool"):
                return dataclasses.replace(out, ty=self.err(
                    AttnTypeError, f"cannot compare {ta} with {tb} using '{op}'", e.span))
        return dataclasses.replace(out, ty=Type("bool", n, all(t.static for t in tys)))

    def e_IfExpr(self, e, scope):
        c, a, b = (self.expr(x, scope) for x in (e.cond, e.then, e.orelse))
        out = dataclasses.replace(e, cond=c, then=a, orelse=b)
        tc, ta, tb = self.ty(c), self._numeric(self.ty(a)), self._numeric(self.ty(b))
        if "error" in (tc.kind, ta.kind, tb.kind):
            return dataclasses.replace(out, ty=ERROR)
        if tc.kind != "bool":
            return dataclasses.replace(out, ty=self.err(
                AttnTypeError, f"'if' condition must be bool, not {tc}", c.span))
        if ta.kind != tb.kind and {ta.kind, tb.kind} != {"int", "float"}:
            return dataclasses.replace(out, ty=self.err(
                AttnTypeError, f"'if' branches differ: {ta} and {tb}", e.span))
        if ta.kind not in ("int", "bool", "float"):
            return dataclasses.replace(out, ty=self.err(
                AttnTypeError, f"'if' branches must be numbers or bools, not {ta}", a.span))
        n = _join_n(ta, tb)
        n2 = _join_n(Type("x", n if n is not False else None), tc)
        if n is False or n2 is False:
            return dataclasses.replace(out, ty=self.err(
                AttnTypeError, "'if' mixes tuples of different widths", e.span))
        kind = "float" if "float" in (ta.kind, tb.kind) else ta.kind
        return dataclasses.replace(out, ty=Type(kind, n2, tc.static and ta.static and tb.static))

    def e_LetExpr(self, e, scope):
        v = self.expr(e.value, scope)
        inner = _Scope(scope)
        inner.names[e.name] = ("local", self.ty(v))
        body = self.expr(e.body, inner)
        return dataclasses.replace(e, value=v, body=body, ty=self.ty(body))

    def e_Index(self, e, scope):
        base = self.expr(e.base, scope)
        idx = self.expr(e.index, scope)
        out = dataclasses.replace(e, base=base, index=idx)
        tb, ti = self.ty(base), self._numeric(self.ty(idx))
        if "error" in (tb.kind, ti.kind):
            return dataclasses.replace(out, ty=ERROR)
        if ti.kind != "int" or ti.n is not None:
            return dataclasses.replace(out, ty=self.err(
                AttnTypeError, f"an index must be an int, not {ti}", idx.span))
        if tb.kind == "array":
            if tb.optional:
                return dataclasses.replace(out, ty=self.err(
                    AttnTypeError, f"optional input '{getattr(base, 'id', '?')}' may be absent"
                    " and cannot be indexed", base.span))
            if len(tb.dims) != 1:
                return dataclasses.replace(out, ty=self.err(
                    AttnTypeError, f"only 1-D inputs can be indexed, not {tb.space} inputs with"
                    f" {len(tb.dims)} dimensions", e.span))
            return dataclasses.replace(out, ty=Type(tb.space, None, False))
        if tb.n is not None:
            if not isinstance(idx, ir.IntLit):
                return dataclasses.replace(out, ty=self.err(
                    AttnTypeError, "a tuple index must be an integer literal", idx.span))
            if not -tb.n <= idx.value < tb.n:
                return dataclasses.replace(out, ty=self.err(
                    AttnTypeError, f"index {idx.value} is out of range for {tb}", idx.span))
            return dataclasses.replace(out, ty=tb.scalar())
        return dataclasses.replace(out, ty=self.err(
            AttnTypeError, f"{tb} cannot be indexed", base.span))

    def e_Attr(self, e, scope):
        base = self.expr(e.base, scope)
        out = dataclasses.replace(e, base=base)
        tb = self.ty(base)
        if tb.kind == "error":
            return dataclasses.replace(out, ty=ERROR)
        if tb.kind == "token":
            n = tb.n
            fields = {"pos": Type("int", n, False), "shape": Type("int", n, True),
                      "size": Type("int", None, True), "index": Type("int", None, False)}
            fields.update({a: Type("int", None, False) for a in tb.dims})
            if e.name in fields:
                return dataclasses.replace(out, ty=fields[e.name])
            return dataclasses.replace(out, ty=self.err(
                AttnNameError, f"{tb} has no field '{e.name}'" + _dym(e.name, fields), e.span))
        if tb.kind == "summary":
            if e.name in tb.dims:
                return dataclasses.replace(out, ty=Type("int", None, False))
            return dataclasses.replace(out, ty=self.err(
                AttnNameError, f"summary '{tb.space}' has no axis '{e.name}'"
                + _dym(e.name, tb.dims), e.span))
        return dataclasses.replace(out, ty=self.err(
            AttnTypeError, f"{tb} has no fields", base.span))

    # ---- calls
    def e_Call(self, e, scope):
        args = tuple(self.expr(a, scope) for a in e.args)
        kwargs = tuple(dataclasses.replace(k, value=self.expr(k.value, scope))
                       for k in e.kwargs)
        out = dataclasses.replace(e, args=args, kwargs=kwargs)
        g = self.module.scope.get(e.func)
        callable_ = isinstance(g, ir.FnDef | ir.PatternDef) or e.func in BUILTINS or (
            e.func in DYNAMIC)
        if not callable_ and (scope.get(e.func) is not None or e.func in CONTEXT):
            return dataclasses.replace(out, ty=self.err(
                AttnTypeError, f"'{e.func}' is a value, not a function", e.span))
        if isinstance(g, ir.FnDef):
            return self.call_fn(out, g)
        if isinstance(g, ir.PatternDef):
            return self.call_pattern(out, g)
        if e.func in BUILTINS:
            return self.call_builtin(out, BUILTINS[e.func])
        if e.func in DYNAMIC:
            return self.call_dynamic(out)
        cands = set(BUILTINS) | set(DYNAMIC) | {
            k for k, v in self.module.scope.items() if isinstance(v, ir.FnDef | ir.PatternDef)}
        return dataclasses.replace(out, ty=self.err(
            AttnNameError, f"unknown function '{e.func}'" + _dym(e.func, cands), e.span))

    def call_builtin(self, e, b):
        if e.kwargs:
            return dataclasses.replace(e, ty=self.err(
                AttnTypeError, f"'{b.name}' takes no keyword arguments", e.kwargs[0].span),
                ref="builtin")
        n = len(e.args)
        if n < b.min_args or (b.max_args is not None and n > b.max_args):
            want = (str(b.min_args) if b.max_args == b.min_args else
                    f"{b.min_args} or more" if b.max_args is None else
                    f"{b.min_args} to {b.max_args}")
            return dataclasses.replace(e, ty=self.err(
                AttnTypeError, f"'{b.name}' takes {want} argument"
                f"{'s' if want != '1' else ''}, not {n}", e.span), ref="builtin")
        tys = [self._numeric(self.ty(a)) for a in e.args]
        if any(t.kind == "error" for t in tys):
            return dataclasses.replace(e, ty=ERROR, ref="builtin")
        for a, t in zip(e.args, tys):
            ok = {"num": t.kind in ("int", "float"), "int": t.kind == "int",
                  "bool": t.kind == "bool", "float": t.kind in ("int", "float"),
                  "any": True}[b.arg_kind]
            if not ok:
                want = {"num": "a number", "int": "an int", "bool": "a bool",
                        "float": "a number"}[b.arg_kind]
                return dataclasses.replace(e, ty=self.err(
                    AttnTypeError, f"'{b.name}' needs {want}, not {t}", a.span), ref="builtin")
        static = all(t.static for t in tys)
        reduce = b.reduce or (b.name in ("min", "max") and n == 1)
        if reduce:
            if n != 1:
                return dataclasses.replace(e, ty=self.err(
                    AttnTypeError, f"'{b.name}' takes one tuple", e.span), ref="builtin")
            width = None
        else:
            width = None
            for t in tys:
                w = _join_n(Type("x", width), t)
                if w is False:
                    return dataclasses.replace(e, ty=self.err(
                        AttnTypeError, f"'{b.name}' mixes tuples of different widths",
                        e.span), ref="builtin")
                width = w
        if b.result == "same":
            kind = "float" if any(t.kind == "float" for t in tys) else "int"
        else:
            kind = b.result
        return dataclasses.replace(e, ty=Type(kind, width, static), ref="builtin")

    def bind_args(self, e, params: tuple[ir.Param, ...], what: str):
        """Match positional and keyword arguments to parameters; None on error."""
        names = [p.name for p in params]
        if len(e.args) > len(params):
            self.err(AttnTypeError, f"{what} takes at most {len(params)} argument"
                     f"{'s' if len(params) != 1 else ''}, not {len(e.args)}", e.span)
            return None
        bound: dict[str, ir.Expr] = dict(zip(names, e.args))
        for kw in e.kwargs:
            if kw.name not in names:
                self.err(AttnNameError, f"{what} has no parameter '{kw.name}'"
                         + _dym(kw.name, names), kw.span)
                return None
            if kw.name in bound:
                self.err(AttnTypeError, f"parameter '{kw.name}' is given twice", kw.span)
                return None
            bound[kw.name] = kw.value
        missing = [p.name for p in params if p.name not in bound and p.default is None]
        if missing:
            self.err(AttnTypeError, f"{what} is missing argument"
                     f"{'s' if len(missing) > 1 else ''} " + ", ".join(
                         f"'{m}'" for m in missing), e.span)
            return None
        return bound

    def call_fn(self, e, fn: ir.FnDef):
        if fn.name in self.fn_stack:
            return dataclasses.replace(e, ty=self.err(
                AttnTypeError, f"function '{fn.name}' calls itself"
                + _through(self.fn_stack, fn.name) + "; recursion is not allowed",
                e.span), ref="fn")
        self.call_depth += 1
        try:
            out = self._call_fn(e, fn)
        finally:
            self.call_depth -= 1
        if not self.call_depth and self.misused:
            names = " and ".join(f"'{n}'" for n in self.misused)
            self.misused = {}
            return dataclasses.replace(out, ty=self.err(
                AttnNameError, f"function '{fn.name}' uses {names}, which cannot be used "
                + self._where(), e.span))
        return out

    def _call_fn(self, e, fn: ir.FnDef):
        bound = self.bind_args(e, fn.params, f"function '{fn.name}'")
        if bound is None:
            return dataclasses.replace(e, ty=ERROR, ref="fn")
        saved_module = self.module
        try:
            self.module = self.module.home(fn)  # the body's names are those of its own file
            return self._call_fn_body(e, fn, bound)
        finally:
            self.module = saved_module

    def _call_fn_body(self, e, fn: ir.FnDef, bound):
        inner = _Scope()
        args = []
        defaults = []
        ok = True
        self.fn_stack.append(fn.name)
        try:
            for p in fn.params:
                if p.name in bound and bound[p.name].ty is not None:
                    a = bound[p.name]
                    defaults.append(False)
                else:  # a default: typed (and later evaluated) in the callee's scope
                    a = self.expr(p.default, inner)
                    defaults.append(True)
                want = self.type_of_ref(p.type)
                have = self._numeric(self.ty(a))
                if want.kind == "error" or have.kind == "error":
                    ok = False
                elif not _kind_ok(want.kind, have.kind) or (
                        want.n is not None and have.n not in (None, want.n)):
                    self.err(AttnTypeError, f"argument '{p.name}' of '{fn.name}' must be "
                             f"{want}, not {have}", a.span)
                    ok = False
                kind = want.kind if want.kind != "error" else have.kind
                inner.names[p.name] = ("local", Type(kind, have.n, have.static))
                args.append(a)
            if not ok:
                return dataclasses.replace(e, ty=ERROR, ref="fn")
            scope = inner
            lets = []
            for let in fn.lets:
                v = self.expr(let.value, scope)
                scope = _Scope(scope)
                scope.names[let.name] = ("local", self.ty(v))
                lets.append((let, v))
            body = self.expr(fn.body, scope)
            for let, v in reversed(lets):
                body = ir.LetExpr(let.span, let.name, v, body, self.ty(body))
        finally:
            self.fn_stack.pop()
        tb = self.ty(body)
        want = self.type_of_ref(fn.ret)
        if tb.kind != "error" and want.kind != "error" and not _kind_ok(want.kind, tb.kind):
            self.err(AttnTypeError, f"function '{fn.name}' returns {tb}, declared {want}",
                     fn.body.span)
            tb = ERROR
        if tb.kind not in ("error",) and want.kind == "float":
            tb = Type("float", tb.n, tb.static)
        return dataclasses.replace(e, args=tuple(args), kwargs=(), ty=tb, ref="fn",
                                   params=tuple(p.name for p in fn.params), body=body,
                                   defaults=tuple(defaults))

    def refers_back(self, target: str, span) -> bool:
        """Report (and say) whether using pattern `target` makes this pattern recursive."""
        me = self.pattern_name
        path = _ref_path(self.module, target, me) if me is not None else None
        if path is None:
            return False
        self.bad_ref = True
        self.err(AttnTypeError, f"pattern '{me}' refers to itself"
                 + _through([me] + path[:-1], me) + "; recursion is not allowed", span)
        return True

    def call_pattern(self, e, pat: ir.PatternDef):
        if self.refers_back(pat.name, e.span):
            return dataclasses.replace(e, ty=ERROR, ref="pattern")
        bound = self.bind_args(e, pat.params, f"pattern '{pat.name}'")
        if bound is None:
            return dataclasses.replace(e, ty=ERROR, ref="pattern")
        if any(isinstance(s, ir.InputStmt) for s in pat.body):
            return dataclasses.replace(e, ty=self.err(
                AttnTypeError, f"pattern '{pat.name}' takes run-time inputs, which an "
                "expression cannot pass on; use 'include' instead", e.span), ref="pattern")
        for name, a in bound.items():
            t = self.ty(a)
            if t.kind != "error" and not t.static:
                self.err(AttnTypeError, f"argument '{name}' of pattern '{pat.name}' must "
                         "depend only on parameters", a.span)
        return dataclasses.replace(e, ty=Type("bool", None, False), ref="pattern")

    def call_dynamic(self, e):
        names = DYNAMIC[e.func]
        bound = self.bind_args(e, tuple(ir.Param(n, None, None if n != "starts" else
                                                 ir.BoolLit(e.span, False), e.span)
                                        for n in names), f"'{e.func}'")
        if bound is None:
            return dataclasses.replace(e, ty=ERROR, ref="dynamic")
        for n in names[:-1]:
            t = self.ty(bound[n])
            if t.kind != "error" and (t.kind != "int" or t.n is not None or not t.static):
                self.err(AttnTypeError, f"'{n}' of '{e.func}' must be an int parameter, not "
                         f"{t}", bound[n].span)
        if "starts" in bound:
            t = self.ty(bound["starts"])
            if t.kind not in ("error", "array"):
                self.err(AttnTypeError, f"'starts' of '{e.func}' must be a run-time input "
                         f"int[*], not {t}", bound["starts"].span)
        if self.qspace is not None and self.qspace.kind != "seq":
            self.err(AttnTypeError, f"'{e.func}' needs a 'seq' space", e.span)
        self.uses_content = True
        args = tuple(bound.get(n, ir.BoolLit(e.span, False)) for n in names)
        return dataclasses.replace(e, args=args, kwargs=(), ty=Type("bool", None, False),
                                   ref="dynamic", params=names)

    # ------------------------------------------------------------ statements
    def static_int(self, e: ir.Expr, scope, what: str) -> ir.Expr:
        x = self.expr(e, scope)
        t = self.ty(x)
        if t.kind != "error" and (t.kind != "int" or t.n is not None or not t.static):
            self.err(AttnTypeError, f"{what} must be an int that depends only on parameters, "
                     f"not {'a run-time ' if not t.static else ''}{t}", x.span)
        return x

    def check_pattern(self, p: ir.PatternDef) -> CheckedPattern | None:
        self.pattern_name = p.name
        scope = _Scope()
        params = []
        seen = set()
        for prm in p.params:
            if prm.name in seen:
                self.err(AttnNameError, f"parameter '{prm.name}' is declared twice", prm.span)
            seen.add(prm.name)
            if prm.name in CONTEXT:
                self.err(AttnNameError, f"'{prm.name}' is reserved for the query, key and "
                         "head index", prm.span)
            t = self.type_of_ref(prm.type)
            if prm.default is not None:
                d = self.expr(prm.default, scope)
                td = self.ty(d)
                if td.kind != "error" and t.kind != "error" and (
                        not _kind_ok(t.kind, td.kind) or td.n not in (None, t.n)
                        or not td.static):
                    self.err(AttnTypeError, f"default of '{prm.name}' must be {t}, not {td}",
                             d.span)
                prm = dataclasses.replace(prm, default=d)
            scope.names[prm.name] = ("param", t)
            params.append((prm, t))

        lets, requires, inputs, rules, scores, summaries = [], [], [], [], [], []
        average, includes = [], []
        heads = route = nnz = None
        spaces: dict[str, Space] = {}
        self.space_roles = set()
        for s in p.body:
            if isinstance(s, ir.IncludeStmt) or (isinstance(s, ir.SpaceStmt)
                                                 and s.role == "space"):
                self.space_roles |= {"query", "key"}
            elif isinstance(s, ir.SpaceStmt):
                self.space_roles.add(s.role)

        space_failed = []  # erroneous space statements: no follow-up errors about spaces

        def visit(stmts, scope, hr):
            nonlocal heads, route, nnz
            for s in stmts:
                if isinstance(s, ir.SpaceStmt):
                    if s.kind not in SPACE_KINDS:
                        self.err(AttnNameError, f"unknown space kind '{s.kind}'"
                                 + _dym(s.kind, SPACE_KINDS), s.span)
                        space_failed.append(s)
                        self.space_roles -= {"query", "key"} if s.role == "space" else {s.role}
                        continue
                    axes = SPACE_KINDS[s.kind]
                    if len(s.sizes) != len(axes):
                        self.err(AttnTypeError, f"a {s.kind} space takes {len(axes)} size"
                                 f"{'s' if len(axes) > 1 else ''}, not {len(s.sizes)}", s.span)
                        space_failed.append(s)
                        self.space_roles -= {"query", "key"} if s.role == "space" else {s.role}
                        continue
                    sizes = tuple(self.static_int(x, scope, "a space size") for x in s.sizes)
                    roles = ("query", "key") if s.role == "space" else (s.role,)
                    sp = Space(s.kind, sizes, axes, s.span)
                    twice = [r for r in roles if r in spaces]
                    if twice:
                        self.err(AttnSyntaxError, f"the {' and '.join(twice)} space"
                                 f"{'s are' if len(twice) > 1 else ' is'} declared twice",
                                 s.span)
                    for r in roles:
                        spaces[r] = sp
                    self.qspace, self.kspace = spaces.get("query"), spaces.get("key")
                elif isinstance(s, ir.LetStmt):
                    self.allow_context = {"q", "k", "h"}
                    v = self.expr(s.value, scope)
                    scope = _Scope(scope)
                    n = sum(1 for x in lets if x.name.split("#")[0] == s.name)
                    uid = s.name if n == 0 else f"{s.name}#{n + 1}"
                    scope.names[s.name] = ("local", self.ty(v), uid, _deps(v, scope))
                    lets.append(dataclasses.replace(s, name=uid, value=v))
                elif isinstance(s, ir.RequireStmt):
                    self.allow_context = set()
                    c = self.expr(s.cond, scope)
                    t = self.ty(c)
                    if t.kind not in ("error", "bool"):
                        self.err(AttnTypeError, f"'require' needs a bool, not {t}", c.span)
                    elif t.kind == "bool" and not t.static:
                        self.err(AttnTypeError, "'require' must depend only on parameters, "
                                 "not on run-time inputs", c.span)
                    requires.append(dataclasses.replace(s, cond=c))
                elif isinstance(s, ir.InputStmt):
                    if s.name in CONTEXT or scope.get(s.name) is not None:
                        self.err(AttnNameError, f"input '{s.name}' shadows another name",
                                 s.span)
                        continue
                    self.allow_context = set()
                    t = self.type_of_ref(s.type, array=True)
                    dims = ()
                    if s.type.dims is not None:
                        dims = tuple(None if d is None else
                                     self.static_int(d, scope, "an input dimension")
                                     for d in s.type.dims)
                    if t.kind == "error":
                        continue
                    if t.kind == "array":
                        vt = Type("array", None, False, s.type.name, dims, s.optional)
                    else:
                        vt = Type(t.kind, None, False, optional=s.optional)
                        if s.optional:
                            self.err(AttnTypeError, "only array inputs can be optional",
                                     s.span)
                    scope = _Scope(scope)
                    scope.names[s.name] = ("input", vt)
                    inputs.append(InputDecl(s.name, s.type.name, dims, s.optional, s.span))
                elif isinstance(s, ir.HeadsStmt):
                    self.allow_context = set()
                    if heads is not None:
                        self.err(AttnSyntaxError, "'heads' is declared twice", s.span)
                    heads = self.static_int(s.count, scope, "the head count")
                    self.has_heads = True
                elif isinstance(s, ir.RuleStmt):
                    self.allow_context = {"q", "k", "h"}
                    before, self.uses_h = self.uses_h, False
                    x = self.expr(s.expr, scope)
                    self.mask_h = self.mask_h or self.uses_h
                    self.uses_h = self.uses_h or before
                    t = self.ty(x)
                    if t.kind != "error" and (t.kind != "bool" or t.n is not None):
                        hint = " (reduce a per-axis bool with all() or any())" if (
                            t.kind == "bool") else ""
                        self.err(AttnTypeError, f"'{s.kind}' needs a bool, not {t}{hint}",
                                 x.span)
                    rules.append(dataclasses.replace(s, expr=x, heads=hr))
                elif isinstance(s, ir.ScoreStmt):
                    self.allow_context = {"q", "k", "h"} if s.kind == "bias" else set()
                    x = self.expr(s.expr, scope)
                    t = self.ty(x)
                    if t.kind != "error" and (t.kind not in ("int", "float") or t.n):
                        self.err(AttnTypeError, f"'{s.kind}' needs a number, not {t}", x.span)
                    if s.kind != "bias" and hr is not None:
                        self.err(AttnSyntaxError, f"'{s.kind}' applies to all heads; it "
                                 "cannot be inside 'on heads'", s.span)
                    if s.kind != "bias" and any(x.kind == s.kind for x in scores):
                        self.err(AttnSyntaxError, f"'{s.kind}' is given twice", s.span)
                    scores.append(dataclasses.replace(s, expr=x, heads=hr))
                elif isinstance(s, ir.SummaryStmt):
                    summaries.append(self.summary(s, scope))
                elif isinstance(s, ir.RouteStmt):
                    self.allow_context = set()
                    if route is not None:
                        self.err(AttnSyntaxError, "a pattern routes heads once", s.span)
                    found = scope.get(s.input)
                    if found is None or found[0] != "input":
                        self.err(AttnNameError, f"'route' needs a run-time input, and "
                                 f"'{s.input}' is not one", s.span)
                    elif found[1].space != "float" or len(found[1].dims) != 3:
                        self.err(AttnTypeError, f"router '{s.input}' must be declared "
                                 "float[*, N, routed heads]", s.span)
                    top = self.static_int(s.top, scope, "'top'")
                    shared = self.static_int(s.shared, scope, "'shared'")
                    route = dataclasses.replace(s, top=top, shared=shared)
                elif isinstance(s, ir.NnzStmt):
                    self.allow_context = set()
                    if nnz is not None:
                        self.err(AttnSyntaxError, "'nnz' is given twice", s.span)
                    x = self.static_int(s.expr, scope, "'nnz'")
                    w = None
                    if s.when is not None:
                        w = self.expr(s.when, scope)
                        t = self.ty(w)
                        if t.kind != "error" and (t.kind != "bool" or t.n or not t.static):
                            self.err(AttnTypeError, "'when' needs a bool that depends only on "
                                     f"parameters, not {t}", w.span)
                    nnz = dataclasses.replace(s, expr=x, when=w)
                elif isinstance(s, ir.AverageStmt):
                    for part in s.parts:
                        average.append((part.name, self.pattern_ref(part, scope)))
                elif isinstance(s, ir.IncludeStmt):
                    includes.append(self.pattern_ref(s.ref, scope))
                    if "query" not in spaces:
                        inherited = self.included_space(s.ref)
                        if inherited is not None:
                            spaces["query"], spaces["key"] = inherited
                            self.qspace, self.kspace = inherited
                elif isinstance(s, ir.HeadBlock):
                    if hr is not None:
                        self.err(AttnSyntaxError, "'on heads' blocks cannot nest", s.span)
                    self.allow_context = set()
                    lo = self.static_int(s.heads.lo, scope, "a head range bound")
                    hi = self.static_int(s.heads.hi, scope, "a head range bound")
                    for inner in s.body:
                        if not isinstance(inner, ir.RuleStmt | ir.ScoreStmt | ir.LetStmt):
                            self.err(AttnSyntaxError, "'on heads' blocks hold attend, exclude, "
                                     "within, bias and let statements", inner.span)
                    visit([x for x in s.body if isinstance(x, ir.RuleStmt | ir.ScoreStmt
                                                           | ir.LetStmt)],
                          scope, ir.HeadRange(lo, hi, s.heads.span))
                    self.has_heads = self.has_heads or heads is not None
                    if heads is None:
                        self.err(AttnSyntaxError, "'on heads' needs a 'heads N' declaration "
                                 "before it", s.span)
            return scope

        visit(p.body, scope, None)
        qs, ks = spaces.get("query"), spaces.get("key")
        space_failed = space_failed or self.bad_ref
        if qs is None and not average and not space_failed:
            self.err(AttnSyntaxError, f"pattern '{p.name}' declares no space (add e.g. "
                     "'space seq(N)')", p.span)
        if qs is not None and ks is None and not space_failed:
            self.err(AttnSyntaxError, f"pattern '{p.name}' declares a query space but no key "
                     "space", p.span)
        if (qs is None) != (ks is None) and qs is None and not space_failed:
            self.err(AttnSyntaxError, f"pattern '{p.name}' declares a key space but no query "
                     "space", p.span)
        if qs and ks and "channels" in (qs.kind, ks.kind) and qs is not ks:
            self.err(AttnTypeError, "channel tokens attend channels of the same tensor: use "
                     "'space channels(C)'", ks.span)
        has_attend = any(r.kind == "attend" for r in rules)
        if not has_attend and not summaries and not average and not includes:
            self.err(AttnSyntaxError, f"pattern '{p.name}' attends nothing: add an 'attend' "
                     "rule", p.span)
        if average and (rules or scores or summaries or includes or route):
            self.err(AttnSyntaxError, "'average' combines whole patterns; it cannot be mixed "
                     "with rules, scores, summaries or routing in the same pattern", p.span)
        if self.uses_h and heads is None:
            self.err(AttnSyntaxError, "the head index 'h' needs a 'heads N' declaration",
                     self.h_span or p.span)
        if self.uses_content and (qs is None or ks is None or qs.kind != "seq"):
            pass
        return CheckedPattern(
            p.name, tuple(params), p.doc, p.span, p.file, qs, ks, tuple(lets),
            tuple(requires), tuple(inputs), heads, tuple(rules), tuple(scores),
            tuple(summaries), route, tuple(average), tuple(includes), self.mask_h,
            self.uses_content, nnz)

    def pattern_ref(self, ref: ir.PatternRef, scope) -> ir.PatternRef:
        g = self.module.scope.get(ref.name)
        if not isinstance(g, ir.PatternDef):
            cands = [k for k, v in self.module.scope.items() if isinstance(v, ir.PatternDef)]
            self.err(AttnNameError, f"unknown pattern '{ref.name}'" + _dym(ref.name, cands),
                     ref.span)
            self.bad_ref = True
            return ref
        if self.refers_back(ref.name, ref.span):
            return ref
        self.allow_context = set()
        call = ir.Call(ref.span, ref.name, ref.args, ref.kwargs)
        checked = self.e_Call(call, scope)
        return dataclasses.replace(ref, args=checked.args, kwargs=checked.kwargs)

    def included_space(self, ref: ir.PatternRef):
        """The (query, key) space kinds of an included pattern, sizes left to binding."""
        g = self.module.scope.get(ref.name)
        if not isinstance(g, ir.PatternDef) or ref.name in self.fn_stack:
            return None
        self.fn_stack.append(ref.name)
        try:
            sub = Checker(self.module, ErrorSink())
            sub.fn_stack = list(self.fn_stack)
            cp = sub.check_pattern(g)
        finally:
            self.fn_stack.pop()
        if cp.qspace is None or cp.kspace is None:
            return None
        q = Space(cp.qspace.kind, (), cp.qspace.axes, ref.span, True)
        k = q if cp.kspace is cp.qspace else Space(cp.kspace.kind, (), cp.kspace.axes,
                                                   ref.span, True)
        return q, k

    def summary(self, s: ir.SummaryStmt, scope) -> Summary:
        self.allow_context = set()
        axes = []
        names = set()
        for ax in s.axes:
            if ax.name in names:
                self.err(AttnNameError, f"summary axis '{ax.name}' is declared twice", ax.span)
            names.add(ax.name)
            axes.append(dataclasses.replace(
                ax, size=self.static_int(ax.size, scope, "a summary axis size")))
        inner = _Scope(scope)
        inner.names[s.name] = ("summary", Type("summary", len(axes), False, s.name,
                                               tuple(a.name for a in s.axes)))
        member = attend = None
        if s.member is None:
            self.err(AttnSyntaxError, f"summary '{s.name}' needs a 'member' rule (which keys "
                     "belong to each summary token)", s.span)
        else:
            self.allow_context = {"k"}
            member = self.expr(s.member, inner)
            self._want_bool(member, "'member'")
        if s.attend is None:
            self.err(AttnSyntaxError, f"summary '{s.name}' needs an 'attend' rule (which "
                     "queries see each summary token)", s.span)
        else:
            self.allow_context = {"q", "h"}
            before, self.uses_h = self.uses_h, False
            attend = self.expr(s.attend, inner)
            self.mask_h = self.mask_h or self.uses_h
            self.uses_h = self.uses_h or before
            self._want_bool(attend, "a summary's 'attend'")
        pools = {"keys": "mean", "values": "mean", "queries": "max"}
        seen = set()
        for role, how, sp in s.pools:
            if role in seen:
                self.err(AttnSyntaxError, f"'{role}' is given twice", sp)
            seen.add(role)
            if how not in POOLS[role]:
                self.err(AttnNameError, f"unknown {role[:-1]} pooling '{how}'"
                         + _dym(how, POOLS[role]) + f"; choose {', '.join(POOLS[role])}", sp)
                continue
            pools[role] = how
        if "queries" in seen and pools["values"] != "expectation":
            sp = next(sp for role, _, sp in s.pools if role == "queries")
            self.err(AttnSyntaxError, "'queries' pooling is used only by 'values expectation'",
                     sp)
        return Summary(s.name, tuple(axes), member, attend, pools["keys"], pools["values"],
                       pools["queries"], s.span)

    def _want_bool(self, x, what):
        t = self.ty(x)
        if t.kind != "error" and (t.kind != "bool" or t.n is not None):
            self.err(AttnTypeError, f"{what} needs a bool, not {t}", x.span)

    def check_fn(self, fn: ir.FnDef) -> None:
        """Check a function once with its declared types (calls re-check per call site)."""
        if any(p.default is not None for p in fn.params):
            pass
        self.allow_context = {"q", "k", "h"}
        self.qspace = self.qspace or Space("seq", (), ("i",), fn.span)
        self.kspace = self.kspace or self.qspace
        args = tuple(
            p.default if p.default is not None else _placeholder(self.type_of_ref(p.type),
                                                                 p.span)
            for p in fn.params)
        self.call_fn(ir.Call(fn.span, fn.name, args), fn)


def _ref_path(module: ir.Module, start: str, goal: str) -> list[str] | None:
    """Names leading from pattern or function `start` to `goal` through includes, averages
    and calls (`[start, ..., goal]`), or None."""
    stack, seen = [(start, [start])], set()
    while stack:
        name, path = stack.pop()
        if name == goal:
            return path
        d = module.scope.get(name)
        if name in seen or not isinstance(d, ir.PatternDef | ir.FnDef):
            continue
        seen.add(name)
        todo = [d.params, d.body] + ([d.lets] if isinstance(d, ir.FnDef) else [])
        while todo:
            x = todo.pop()
            if isinstance(x, tuple | list):
                todo.extend(x)
            elif dataclasses.is_dataclass(x) and not isinstance(x, Type):
                if isinstance(x, ir.Call | ir.PatternRef):
                    n = x.func if isinstance(x, ir.Call) else x.name
                    stack.append((n, path + [n]))
                todo.extend(getattr(x, f.name) for f in dataclasses.fields(x)
                            if f.name not in ("span", "ty"))
    return None


def _through(stack: list[str], name: str) -> str:
    """' through f -> g -> f' for indirect recursion, '' for direct."""
    chain = stack[stack.index(name):] + [name]
    return f" through {' -> '.join(chain)}" if len(chain) > 2 else ""


def _deps(e, scope) -> frozenset:
    """The context names (q, k, h) and run-time inputs an expression uses, through lets."""
    out = set()

    def walk(x):
        if isinstance(x, ir.Name):
            if x.ref in CONTEXT:
                out.add(x.ref)
            elif x.ref == "input":
                out.add("input")
            elif x.ref == "local":
                out.update(_let_deps(scope, x.id))
            return
        if isinstance(x, ir.Call) and x.body is not None:
            walk(x.body)
        for f in dataclasses.fields(x):
            v = getattr(x, f.name)
            if isinstance(v, ir.Expr):
                walk(v)
            elif isinstance(v, tuple):
                for y in v:
                    if isinstance(y, ir.Expr):
                        walk(y)
                    elif isinstance(y, ir.Keyword):
                        walk(y.value)
    walk(e)
    return frozenset(out)


def _let_deps(scope, uid):
    s = scope
    while s is not None:
        for entry in s.names.values():
            if len(entry) > 2 and entry[2] == uid:
                return entry[3]
        s = s.parent
    return frozenset()


def _placeholder(t: Type, span) -> ir.Expr:
    """A typed stand-in argument for checking a function body on its own."""
    if t.kind == "error":
        return ir.IntLit(span, 0, ty=t)
    return ir.Name(span, "<arg>", ty=Type(t.kind, t.n, False), ref="local")


def check_pattern(module: ir.Module, pattern: ir.PatternDef) -> CheckedPattern:
    sink = ErrorSink()
    checked = Checker(module, sink).check_pattern(pattern)
    sink.raise_if_any()
    return checked


def check_module(module: ir.Module) -> dict[str, CheckedPattern]:
    """Check every pattern and function of a module, reporting all errors together."""
    sink = ErrorSink()
    out = {}
    for item in module.items:
        if isinstance(item, ir.PatternDef):
            out[item.name] = Checker(module, sink).check_pattern(item)
        elif isinstance(item, ir.FnDef):
            Checker(module, sink).check_fn(item)
        elif isinstance(item, ir.ConstDef):
            c = Checker(module, sink)
            t = c.const_type(item)
            if t.kind != "error" and t.kind not in ("int", "bool", "float"):
                sink.add(AttnTypeError(f"constant '{item.name}' must be a number or bool",
                                       item.span))
    sink.raise_if_any()
    return out


__all__ = ["CheckedPattern", "check_module", "check_pattern", "AttnError"]
