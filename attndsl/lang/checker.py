"""Type checker: resolves names, infers types, and returns the typed IR of a pattern.

All errors of a pattern are collected and raised together; an erroneous sub-expression gets
the ERROR type, which is compatible with everything, so one mistake does not cascade.
"""

from __future__ import annotations

import dataclasses
import hashlib

from attndsl.errors import AttnError, AttnNameError, AttnTypeError, ErrorSink
from attndsl.errors import did_you_mean as _dym
from attndsl.lang import ir
from attndsl.lang.builtins import BUILTINS, DYNAMIC
from attndsl.lang.ir import BOOL, FLOAT, INT, INT_LIMIT, Type
from attndsl.lang.scope import CONTEXT, ERROR, Scope, join_n, kind_ok
from attndsl.lang.statements import Statements
from attndsl.lang.walk import children, walk

MAX_EXPR_DEPTH = 160
PATTERN_LEVEL = 4  # the nesting one called or included pattern adds by itself
_IN_PROGRESS = object()


class Session:
    """One run of the checker: its error sink, the digest of the source texts it reads, and
    every pattern and constant checked so far, each checked once and handed over whole (a
    pattern call or include carries its callee's CheckedPattern, a constant its typed
    expression), so no later stage re-enters the checker."""

    def __init__(self, module: ir.Module, sink: ErrorSink | None = None):
        self.sink = sink if sink is not None else ErrorSink()
        mods = module.registry or {module.path: module}
        h = hashlib.sha256()
        for path in sorted(mods):
            h.update(f"{path}\0{mods[path].text}\0".encode())
        self.digest = h.hexdigest()[:24]
        self.patterns: dict = {}
        self.consts: dict = {}
        self.instances: dict = {}  # function bodies per (function, types, context), see
        self.recursions = 0  # recursion errors so far          # Checker._instance
        self.sizes: dict = {}  # id(node) -> (node, expanded size), see expanded()
        self.pattern_sizes: dict = {}  # CheckedPattern.key -> its expanded size
        self.too_large: set = set()  # keys of patterns over EXPANSION_LIMIT
        self.extents: dict = {}  # (file, pattern) -> the nesting its expressions add
        self.comps: dict = {}  # module path -> components(), see refers_back

    def expanded(self, root) -> tuple[int, bool]:
        """The nodes of the IR tree `root` once every function body, constant and called
        pattern is expanded in place (a called pattern counts its whole size), and whether
        it reaches a pattern already reported too large: computed on the shared DAG, once
        per node, in time linear in its size."""
        memo = self.sizes
        stack = [(root, False)]
        while stack:
            node, ready = stack.pop()
            if id(node) in memo:
                continue
            kids = list(children(node, links=True))
            if not ready:
                stack.append((node, True))
                stack.extend((k, False) for k in kids if id(k) not in memo)
                continue
            n = 1 + sum(memo[id(k)][1] for k in kids)
            over = any(memo[id(k)][2] for k in kids)
            if isinstance(node, ir.Call | ir.PatternRef):
                callee = node.callee if isinstance(node, ir.Call) else node.checked
                if callee is not None:
                    n += self.pattern_sizes.get(callee.key, 0)
                    over = over or callee.key in self.too_large
            memo[id(node)] = (node, n, over)  # the node is kept so that its id stays its own
        return memo[id(root)][1:]

    def components(self, module: ir.Module) -> tuple[dict, dict]:
        """The module's reference graph (who calls, includes or averages whom: name ->
        names) and its strongly connected components (name -> component). Two definitions
        refer to each other exactly when they share a component."""
        got = self.comps.get(module.path)
        if got is None:
            got = self.comps[module.path] = _components(module)
        return got

    def pattern(self, module: ir.Module, pdef: ir.PatternDef, depth: int = 0
                ) -> ir.CheckedPattern | None:
        """The typed IR of `pdef` (defined in `module`), checked at its first use; `depth`
        is the nesting at which it is called (see Checker.too_deep)."""
        key = (pdef.file, pdef.name)
        got = self.patterns.get(key)
        if got is _IN_PROGRESS:
            return None  # recursion: reported where it was found
        if got is None:
            self.patterns[key] = _IN_PROGRESS
            chk = Checker(module, self)
            chk.base = chk.depth = chk.peak = depth
            try:
                got = Statements(chk).check(pdef, (pdef.file, pdef.name, pdef.span.line,
                                                    pdef.span.col, self.digest), module.text)
            except _TooDeep:
                del self.patterns[key]  # checked again where it is not nested so deeply
                raise
            self.patterns[key] = got
            self.extents[key] = chk.peak - depth
        return got


class _TooDeep(Exception):
    """A called pattern nests too deeply at its call site; reported there (call_pattern)."""


class Checker:
    """Types and resolves the expressions of one pattern (or function) in `module`."""

    def __init__(self, module: ir.Module, session: Session):
        self.module = module
        self.session = session
        self.sink = session.sink
        self.fn_stack: list[str] = []
        self.uses_h = False
        self.uses_content = False
        self.allow_context: set[str] = set()
        self.where: str | None = None  # where q, k or h may not appear, when not the default
        self.qspace: ir.Space | None = None
        self.kspace: ir.Space | None = None
        self.summary_axes: dict[str, tuple[str, ...]] = {}
        self.mask_h = False  # 'h' used by a rule (the mask differs per head), not only a bias
        self.h_span = None  # the first use of 'h', where a missing 'heads N' is reported
        self.space_roles: set[str] = {"query", "key"}  # roles some statement declares
        self.call_depth = 0  # > 0 while checking a function body for a call site
        self.misused: dict[str, object] = {}  # q/k/h misused inside such a body
        self.depth = 0  # nesting of expressions being checked
        self.peak = 0  # the deepest nesting reached (what a shared function body adds)
        self.base = 0  # the nesting of the call site this pattern is checked for
        self.pattern_name: str | None = None  # the pattern being checked
        self.bad_ref = False  # an unknown or recursive pattern reference: no follow-ups

    def err(self, cls, msg: str, span) -> Type:
        self.sink.add(cls(msg, span))
        return ERROR

    # ------------------------------------------------------------ types
    def type_of_ref(self, tref: ir.TypeRef, scope: Scope | None = None, array=False) -> Type:
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
    def too_deep(self, span, what: str = "functions") -> Type:
        """Nesting beyond MAX_EXPR_DEPTH, counting the bodies of called functions and
        patterns (which every interpreter, this checker included, recurses into): an error
        here, or, while checking a pattern for a call site, at that call site."""
        if self.base:
            raise _TooDeep()
        return self.err(AttnTypeError, f"expression nested too deeply (more than "
                        f"{MAX_EXPR_DEPTH} levels, counting the bodies of called {what})",
                        span)

    def expr(self, e: ir.Expr, scope: Scope) -> ir.Expr:
        if self.depth >= MAX_EXPR_DEPTH:  # deep chains of calls would exhaust the stack
            return dataclasses.replace(e, ty=self.too_deep(e.span))
        m = getattr(self, "e_" + type(e).__name__)
        self.depth += 1
        if self.depth > self.peak:
            self.peak = self.depth
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
            v = self.const(g)
            return dataclasses.replace(e, ty=ERROR if v is None else self.ty(v),
                                       ref="const:" + g.file, value=v)
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
        if self.where is not None:
            return self.where
        if self.allow_context == {"k"}:
            return "in a summary's 'member' rule, which sees only the key 'k'"
        if self.allow_context == {"q", "h"}:
            return "in a summary's 'attend' rule, which sees only the query 'q' and 'h'"
        return "here: this value must not depend on the query, key or head index"

    def const(self, c: ir.ConstDef) -> ir.Expr | None:
        """The typed defining expression of constant `c` (checked once per session), or
        None when it refers to itself."""
        key = (c.file, c.name)
        got = self.session.consts.get(key)
        if got is not None:
            return got
        if c.name in self.fn_stack:
            self.session.recursions += 1
            self.err(AttnNameError, f"constant '{c.name}' refers to itself"
                     + _through(self.fn_stack, c.name), c.span)
            return None
        self.fn_stack.append(c.name)
        saved, saved_module = self.allow_context, self.module
        self.allow_context = set()
        self.module = self.module.home(c)
        try:
            got = self.expr(c.value, Scope())
        finally:
            self.allow_context = saved
            self.module = saved_module
            self.fn_stack.pop()
        self.session.consts[key] = got
        return got

    def const_type(self, c: ir.ConstDef) -> Type:
        v = self.const(c)
        return ERROR if v is None else self.ty(v)

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
        n = join_n(ta, tb)
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
            nn = join_n(ta, tb)
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
        n = join_n(ta, tb)
        n2 = join_n(Type("x", n if n is not False else None), tc)
        if n is False or n2 is False:
            return dataclasses.replace(out, ty=self.err(
                AttnTypeError, "'if' mixes tuples of different widths", e.span))
        kind = "float" if "float" in (ta.kind, tb.kind) else ta.kind
        return dataclasses.replace(out, ty=Type(kind, n2, tc.static and ta.static and tb.static))

    def e_LetExpr(self, e, scope):
        v = self.expr(e.value, scope)
        inner = Scope(scope)
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
            if not tb.dims:
                return dataclasses.replace(out, ty=self.err(
                    AttnTypeError, f"input '{_array_name(base)}' is indexed with more indices "
                    "than it has dimensions", e.span))
            if len(tb.dims) > 1:  # x[i, j]: the rows of x[i], then an element
                if any(d is None for d in tb.dims[1:]):
                    return dataclasses.replace(out, ty=self.err(
                        AttnTypeError, f"indexing input '{_array_name(base)}' of "
                        f"{len(tb.dims)} dimensions needs its dimensions after the first "
                        f"declared, not '*': {tb}", e.span))
                return dataclasses.replace(out, ty=Type("array", None, False, tb.space,
                                                        tb.dims[1:]))
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
            first = (e.args[0].span if e.args else e.kwargs[0].span if e.kwargs else e.span)
            glued = (f" (the '(' on line {first.line} starts a new line, yet continues the "
                     "expression before it: newlines do not end expressions)"
                     if first.line > e.span.line else "")
            return dataclasses.replace(out, ty=self.err(
                AttnTypeError, f"'{e.func}' is a value, not a function{glued}", e.span))
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
                w = join_n(Type("x", width), t)
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
            self.session.recursions += 1
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
        inner = Scope()
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
                elif not kind_ok(want.kind, have.kind) or (
                        want.n is not None and have.n not in (None, want.n)):
                    self.err(AttnTypeError, f"argument '{p.name}' of '{fn.name}' must be "
                             f"{want}, not {have}", a.span)
                    ok = False
                kind = want.kind if want.kind != "error" else have.kind
                inner.names[p.name] = ("local", Type(kind, have.n, have.static))
                args.append(a)
            if not ok:
                return dataclasses.replace(e, ty=ERROR, ref="fn")
        finally:
            self.fn_stack.pop()
        body, tb = self._instance(e, fn, inner)
        return dataclasses.replace(e, args=tuple(args), kwargs=(), ty=tb, ref="fn",
                                   params=tuple(p.name for p in fn.params), body=body,
                                   defaults=tuple(defaults))

    def _instance(self, e, fn: ir.FnDef, inner: Scope):
        """(typed body, result type) of `fn` for these parameter types, checked once per
        session for each (function, parameter types, allowed context names, spaces, pattern)
        and shared by every call site, so that checking stays linear in the program's size
        however often a function is called. A shared instance replays what checking its
        body did to the checker: uses of 'h' and of content, misused context names, depth."""
        key = (id(fn), tuple(inner.names[p.name][1] for p in fn.params),
               frozenset(self.allow_context), _space_key(self.qspace),
               _space_key(self.kspace), frozenset(self.space_roles), self.bad_ref,
               self.pattern_name)
        got = self.session.instances.get(key)
        if got is not None:
            body, tb, extent, uses_h, h_span, content, misused, bad_ref = got
            if self.depth + extent >= MAX_EXPR_DEPTH:
                return body, self.too_deep(e.span)
            self.peak = max(self.peak, self.depth + extent)
            self.uses_h = self.uses_h or uses_h
            self.h_span = self.h_span or h_span
            self.uses_content = self.uses_content or content
            self.bad_ref = self.bad_ref or bad_ref
            for n, sp in misused.items():
                self.misused.setdefault(n, sp)
            return body, tb
        saved = (self.peak, self.uses_h, self.h_span, self.uses_content, self.misused,
                 self.bad_ref)
        self.peak, self.uses_h, self.h_span, self.uses_content, self.misused = (
            self.depth, False, None, False, {})
        recursions = self.session.recursions
        try:
            body, tb = self._check_body(fn, inner)
        finally:
            mine = (self.peak - self.depth, self.uses_h, self.h_span, self.uses_content,
                    self.misused, self.bad_ref and not saved[5])
            self.peak = max(saved[0], self.peak)
            self.uses_h = saved[1] or self.uses_h
            self.h_span = saved[2] or self.h_span
            self.uses_content = saved[3] or self.uses_content
            merged = dict(saved[4])
            for n, sp in self.misused.items():
                merged.setdefault(n, sp)
            self.misused = merged
        if self.session.recursions == recursions:  # a recursive body is never shared
            self.session.instances[key] = (body, tb, *mine)
        return body, tb

    def _check_body(self, fn: ir.FnDef, inner: Scope):
        self.fn_stack.append(fn.name)
        try:
            scope = inner
            lets = []
            for let in fn.lets:
                v = self.expr(let.value, scope)
                scope = Scope(scope)
                scope.names[let.name] = ("local", self.ty(v))
                lets.append((let, v))
            body = self.expr(fn.body, scope)
            for let, v in reversed(lets):
                body = ir.LetExpr(let.span, let.name, v, body, self.ty(body))
        finally:
            self.fn_stack.pop()
        tb = self.ty(body)
        want = self.type_of_ref(fn.ret)
        if tb.kind != "error" and want.kind != "error" and not kind_ok(want.kind, tb.kind):
            self.err(AttnTypeError, f"function '{fn.name}' returns {tb}, declared {want}",
                     fn.body.span)
            tb = ERROR
        if tb.kind not in ("error",) and want.kind == "float":
            tb = Type("float", tb.n, tb.static)
        return body, tb

    def refers_back(self, target: str, span) -> bool:
        """Report (and say) whether using pattern `target` makes this pattern recursive."""
        me = self.pattern_name
        if me is None:
            return False
        succ, comp = self.session.components(self.module)
        if target != me and (comp.get(target) is None or comp.get(target) != comp.get(me)):
            return False  # not in a cycle with this pattern: no need to look for a path
        path = _ref_path(succ, target, me)
        if path is None:
            return False
        self.bad_ref = True
        self.session.recursions += 1
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
        key = (pat.file, pat.name)
        try:
            callee = self.session.pattern(self.module.home(pat), pat,
                                          self.depth + PATTERN_LEVEL)
        except _TooDeep:
            callee = None
            extent = MAX_EXPR_DEPTH
        else:
            extent = self.session.extents.get(key, 0)
        if self.depth + extent >= MAX_EXPR_DEPTH:
            self.bad_ref = True  # no follow-up errors (an include gives no spaces)
            return dataclasses.replace(e, ty=self.too_deep(e.span, "functions and patterns"),
                                       ref="pattern")
        self.peak = max(self.peak, self.depth + extent)
        return dataclasses.replace(e, ty=Type("bool", None, False), ref="pattern",
                                   callee=callee)

    def call_dynamic(self, e):
        spec = DYNAMIC[e.func]
        names = tuple(spec)
        bound = self.bind_args(e, tuple(ir.Param(n, None, None if kind[1] is None else
                                                 _literal(kind[1], e.span), e.span)
                                        for n, kind in spec.items()), f"'{e.func}'")
        if bound is None:
            return dataclasses.replace(e, ty=ERROR, ref="dynamic")
        for n, (kind, _default) in spec.items():
            if n not in bound:
                continue
            t = self.ty(bound[n])
            if t.kind == "error":
                continue
            if kind == "input":
                if t.kind != "array" or t.space != "int" or len(t.dims) not in (1, 2):
                    self.err(AttnTypeError, f"'{n}' of '{e.func}' must be a run-time input "
                             f"int[*] (or int[*, *], one row per batch element), not {t}",
                             bound[n].span)
            elif t.kind != kind or t.n is not None or not t.static:
                self.err(AttnTypeError, f"'{n}' of '{e.func}' must be {_a(kind)} {kind} "
                         f"parameter, not {t}", bound[n].span)
        if self.qspace is not None and self.qspace.kind != "seq":
            self.err(AttnTypeError, f"'{e.func}' needs a 'seq' space", e.span)
        self.uses_content = True
        args = tuple(bound.get(n, _literal(spec[n][1] if spec[n][1] is not None else False,
                                           e.span)) for n in names)
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
        return dataclasses.replace(ref, args=checked.args, kwargs=checked.kwargs,
                                   checked=checked.callee)

    def check_fn(self, fn: ir.FnDef) -> None:
        """Check a function once with its declared types (calls re-check per call site)."""
        self.allow_context = {"q", "k", "h"}
        self.qspace = self.qspace or ir.Space("seq", (), ("i",), fn.span)
        self.kspace = self.kspace or self.qspace
        args = tuple(
            p.default if p.default is not None else _placeholder(self.type_of_ref(p.type),
                                                                 p.span)
            for p in fn.params)
        self.call_fn(ir.Call(fn.span, fn.name, args), fn)


def _refs(d) -> list[str]:
    """The names a pattern or function calls, includes or averages."""
    tops = list(d.params) + (list(d.lets) + [d.body] if isinstance(d, ir.FnDef)
                             else list(d.body))
    return [x.func if isinstance(x, ir.Call) else x.name for top in tops for x in walk(top)
            if isinstance(x, ir.Call | ir.PatternRef)]


def _components(module: ir.Module) -> tuple[dict, dict]:
    """(name -> names it refers to, name -> strongly connected component), found by
    Kosaraju's algorithm without recursion."""
    defs = {n: d for n, d in module.scope.items() if isinstance(d, ir.PatternDef | ir.FnDef)}
    succ = {n: list(dict.fromkeys(m for m in _refs(d) if m in defs)) for n, d in defs.items()}
    pred: dict = {n: [] for n in defs}
    for n, ms in succ.items():
        for m in ms:
            pred[m].append(n)
    order, seen = [], set()
    for root in defs:
        if root in seen:
            continue
        seen.add(root)
        stack = [(root, iter(succ[root]))]
        while stack:
            n, it = stack[-1]
            m = next((m for m in it if m not in seen), None)
            if m is None:
                order.append(n)
                stack.pop()
            else:
                seen.add(m)
                stack.append((m, iter(succ[m])))
    comp: dict = {}
    for root in reversed(order):
        if root in comp:
            continue
        comp[root] = root
        stack = [root]
        while stack:
            for m in pred[stack.pop()]:
                if m not in comp:
                    comp[m] = root
                    stack.append(m)
    return succ, comp


def _ref_path(succ: dict, start: str, goal: str) -> list[str] | None:
    """The shortest chain of references from `start` to `goal` (`[start, ..., goal]`), or
    None."""
    parent = {start: None}
    frontier = [start]
    while frontier:
        nxt = []
        for n in frontier:
            if n == goal:
                path = []
                while n is not None:
                    path.append(n)
                    n = parent[n]
                return path[::-1]
            for m in succ.get(n, ()):
                if m not in parent:
                    parent[m] = n
                    nxt.append(m)
        frontier = nxt
    return None


def _space_key(sp: ir.Space | None):
    return None if sp is None else (sp.kind, sp.axes)


def _through(stack: list[str], name: str) -> str:
    """' through f -> g -> f' for indirect recursion, '' for direct; a long chain is shown
    by its ends."""
    chain = stack[stack.index(name):] + [name]
    if len(chain) > 12:
        chain = chain[:5] + [f"... ({len(chain) - 10} more)"] + chain[-5:]
    return f" through {' -> '.join(chain)}" if len(chain) > 2 else ""


def _placeholder(t: Type, span) -> ir.Expr:
    """A typed stand-in argument for checking a function body on its own."""
    if t.kind == "error":
        return ir.IntLit(span, 0, ty=t)
    return ir.Name(span, "<arg>", ty=Type(t.kind, t.n, False), ref="local")


def check_pattern(module: ir.Module, pattern: ir.PatternDef) -> ir.CheckedPattern:
    """The typed IR of one pattern of `module` (and of everything it uses)."""
    session = Session(module)
    checked = session.pattern(module, pattern)
    session.sink.raise_if_any()
    return checked


def check_module(module: ir.Module) -> dict[str, ir.CheckedPattern]:
    """Check every pattern, function and constant of a module, reporting all errors
    together."""
    session = Session(module)
    sink = session.sink
    out = {}
    for item in module.items:
        if isinstance(item, ir.PatternDef):
            out[item.name] = session.pattern(module, item)
        elif isinstance(item, ir.FnDef):
            Checker(module, session).check_fn(item)
        elif isinstance(item, ir.ConstDef):
            t = Checker(module, session).const_type(item)
            if t.kind != "error" and t.kind not in ("int", "bool", "float"):
                sink.add(AttnTypeError(f"constant '{item.name}' must be a number or bool",
                                       item.span))
    sink.raise_if_any()
    return out


__all__ = ["AttnError", "Session", "check_module", "check_pattern"]


def _array_name(base) -> str:
    while isinstance(base, ir.Index):
        base = base.base
    return getattr(base, "id", "?")


def _literal(value, span) -> ir.Expr:
    """A default argument of a built-in as a literal node."""
    if isinstance(value, bool):
        return ir.BoolLit(span, value)
    return ir.IntLit(span, value)


def _a(word: str) -> str:
    return "an" if word[:1] in "aeiou" else "a"
