"""The statement pass of the checker: one method per statement of a pattern body, building
the pattern's CheckedPattern. Expressions are checked by `checker.Checker`."""

from __future__ import annotations

import dataclasses

from attndsl.errors import AttnNameError, AttnSyntaxError, AttnTypeError
from attndsl.errors import did_you_mean as _dym
from attndsl.lang import ir
from attndsl.lang.ir import Type
from attndsl.lang.scope import (
    CONTEXT,
    EXPANSION_LIMIT,
    POOLS,
    RESERVED_INPUTS,
    RESERVED_PARAMS,
    SPACE_KINDS,
    Scope,
    kind_ok,
)
from attndsl.lang.walk import walk


class Statements:
    """Checks one pattern's parameters and statements with the expression checker `chk`
    (whose per-pattern state, such as the spaces and which context names an expression may
    use, the statements set as they go)."""

    def __init__(self, chk):
        self.chk = chk
        self.lets: list = []
        self.requires: list = []
        self.inputs: list = []
        self.rules: list = []
        self.scores: list = []
        self.summaries: list = []
        self.average: list = []
        self.includes: list = []
        self.heads = self.route = self.nnz = None
        self.spaces: dict[str, ir.Space] = {}
        self.space_failed: list = []  # erroneous space statements: no follow-up errors

    def err(self, cls, msg, span):
        return self.chk.err(cls, msg, span)

    # ------------------------------------------------------------ the pattern
    def check(self, p: ir.PatternDef, key: tuple, text: str | None) -> ir.CheckedPattern:
        chk = self.chk
        chk.pattern_name = p.name
        scope = Scope()
        params = []
        seen = set()
        for prm in p.params:
            if prm.name in seen:
                self.err(AttnNameError, f"parameter '{prm.name}' is declared twice", prm.span)
            seen.add(prm.name)
            if prm.name in CONTEXT:
                self.err(AttnNameError, f"'{prm.name}' is reserved for the query, key and "
                         "head index", prm.span)
            elif prm.name in RESERVED_PARAMS:
                self.err(AttnNameError, f"'{prm.name}' cannot name a parameter: it is a "
                         f"keyword of {RESERVED_PARAMS[prm.name]}", prm.span)
            t = chk.type_of_ref(prm.type)
            if prm.default is not None:
                d = chk.expr(prm.default, scope)
                td = chk.ty(d)
                if td.kind != "error" and t.kind != "error" and (
                        not kind_ok(t.kind, td.kind) or td.n not in (None, t.n)
                        or not td.static):
                    self.err(AttnTypeError, f"default of '{prm.name}' must be {t}, not {td}",
                             d.span)
                prm = dataclasses.replace(prm, default=d)
            scope.names[prm.name] = ("param", t)
            params.append((prm, t))
        chk.space_roles = set()
        for s in p.body:
            if isinstance(s, ir.IncludeStmt) or (isinstance(s, ir.SpaceStmt)
                                                 and s.role == "space"):
                chk.space_roles |= {"query", "key"}
            elif isinstance(s, ir.SpaceStmt):
                chk.space_roles.add(s.role)
        self.visit(p.body, scope, None)
        return self.finish(p, tuple(params), key, text)

    def visit(self, stmts, scope: Scope, hr) -> Scope:
        for s in stmts:
            scope = getattr(self, "s_" + type(s).__name__)(s, scope, hr)
        return scope

    def finish(self, p: ir.PatternDef, params, key, text) -> ir.CheckedPattern:
        chk = self.chk
        qs, ks = self.spaces.get("query"), self.spaces.get("key")
        failed = bool(self.space_failed) or chk.bad_ref
        if qs is None and not self.average and not failed:
            self.err(AttnSyntaxError, f"pattern '{p.name}' declares no space (add e.g. "
                     "'space seq(N)')", p.span)
        if qs is not None and ks is None and not failed:
            self.err(AttnSyntaxError, f"pattern '{p.name}' declares a query space but no key "
                     "space", p.span)
        if (qs is None) != (ks is None) and qs is None and not failed:
            self.err(AttnSyntaxError, f"pattern '{p.name}' declares a key space but no query "
                     "space", p.span)
        if qs and ks and "channels" in (qs.kind, ks.kind) and qs is not ks:
            self.err(AttnTypeError, "channel tokens attend channels of the same tensor: use "
                     "'space channels(C)'", ks.span)
        has_attend = any(r.kind == "attend" for r in self.rules)
        if not (has_attend or self.summaries or self.average or self.includes):
            self.err(AttnSyntaxError, f"pattern '{p.name}' attends nothing: add an 'attend' "
                     "rule", p.span)
        if self.average and (self.rules or self.scores or self.summaries or self.includes
                             or self.route):
            self.err(AttnSyntaxError, "'average' combines whole patterns; it cannot be mixed "
                     "with rules, scores, summaries or routing in the same pattern", p.span)
        if chk.uses_h and self.heads is None:
            self.err(AttnSyntaxError, "the head index 'h' needs a 'heads N' declaration",
                     chk.h_span or p.span)
        cp = ir.CheckedPattern(
            p.name, params, p.doc, p.span, p.file, qs, ks, tuple(self.lets),
            tuple(self.requires), tuple(self.inputs), self.heads, tuple(self.rules),
            tuple(self.scores), tuple(self.summaries), self.route, tuple(self.average),
            tuple(self.includes), chk.mask_h, chk.uses_content, self.nnz, key, text)
        self.expansion(cp)
        return cp

    def expansion(self, cp: ir.CheckedPattern) -> None:
        """Record the pattern's expanded size (Session.expanded); report the statement at
        which it passes EXPANSION_LIMIT, unless it is that large only through a pattern
        already reported (one error, where the size is made)."""
        session = self.chk.session
        parts = [(prm.span, [prm.default]) for prm, _ in cp.params]
        for sp in {id(x): x for x in (cp.qspace, cp.kspace) if x is not None}.values():
            parts.append((sp.span, list(sp.sizes)))
        parts += [(x.span, [x.value]) for x in cp.lets]
        parts += [(x.span, [x.cond]) for x in cp.requires]
        parts += [(x.span, list(x.dims)) for x in cp.inputs]
        if cp.heads is not None:
            parts.append((cp.heads.span, [cp.heads]))
        for x in cp.rules + cp.scores:
            parts.append((x.span, [x.expr] + ([x.heads.lo, x.heads.hi] if x.heads else [])))
        for x in cp.summaries:
            parts.append((x.span, [a.size for a in x.axes] + [x.member, x.attend]))
        if cp.route is not None:
            parts.append((cp.route.span, [cp.route.top, cp.route.shared]))
        if cp.nnz is not None:
            parts.append((cp.nnz.span, [cp.nnz.expr, cp.nnz.when]))
        parts += [(ref.span, [ref]) for ref in [r for _, r in cp.average] + list(cp.includes)]
        total, inherited = 0, False
        for span, exprs in sorted(parts, key=lambda x: (x[0].line, x[0].col)):
            for x in exprs:
                if x is not None:
                    n, over = session.expanded(x)
                    total += n
                    inherited = inherited or over
            if total > EXPANSION_LIMIT:
                session.too_large.add(cp.key)
                if not inherited:
                    self.err(AttnTypeError, f"pattern '{cp.name}' expands to more than "
                             f"{EXPANSION_LIMIT:,} expression nodes by here (counting "
                             "every call of a function or pattern, every include and every "
                             "constant as a copy of what it names); call fewer functions or "
                             "patterns", span)
                break
        session.pattern_sizes[cp.key] = total

    # ------------------------------------------------------------ one method per statement
    def s_SpaceStmt(self, s: ir.SpaceStmt, scope, hr):
        chk = self.chk
        if s.kind not in SPACE_KINDS:
            self.err(AttnNameError, f"unknown space kind '{s.kind}'"
                     + _dym(s.kind, SPACE_KINDS), s.span)
            self._space_failed(s)
            return scope
        axes = SPACE_KINDS[s.kind]
        if len(s.sizes) != len(axes):
            self.err(AttnTypeError, f"a {s.kind} space takes {len(axes)} size"
                     f"{'s' if len(axes) > 1 else ''}, not {len(s.sizes)}", s.span)
            self._space_failed(s)
            return scope
        sizes = tuple(chk.static_int(x, scope, "a space size") for x in s.sizes)
        roles = ("query", "key") if s.role == "space" else (s.role,)
        sp = ir.Space(s.kind, sizes, axes, s.span)
        twice = [r for r in roles if r in self.spaces]
        if twice:
            self.err(AttnSyntaxError, f"the {' and '.join(twice)} space"
                     f"{'s are' if len(twice) > 1 else ' is'} declared twice", s.span)
        for r in roles:
            self.spaces[r] = sp
        chk.qspace, chk.kspace = self.spaces.get("query"), self.spaces.get("key")
        return scope

    def _space_failed(self, s):
        self.space_failed.append(s)
        self.chk.space_roles -= {"query", "key"} if s.role == "space" else {s.role}

    def s_LetStmt(self, s: ir.LetStmt, scope, hr):
        chk = self.chk
        chk.allow_context = {"q", "k", "h"}
        v = chk.expr(s.value, scope)
        scope = Scope(scope)
        n = sum(1 for x in self.lets if x.name.split("#")[0] == s.name)
        uid = s.name if n == 0 else f"{s.name}#{n + 1}"
        scope.names[s.name] = ("local", chk.ty(v), uid, _deps(v, scope))
        self.lets.append(dataclasses.replace(s, name=uid, value=v))
        return scope

    def s_RequireStmt(self, s: ir.RequireStmt, scope, hr):
        chk = self.chk
        chk.allow_context = set()
        c = chk.expr(s.cond, scope)
        t = chk.ty(c)
        if t.kind not in ("error", "bool"):
            self.err(AttnTypeError, f"'require' needs a bool, not {t}", c.span)
        elif t.kind == "bool" and not t.static:
            self.err(AttnTypeError, "'require' must depend only on parameters, not on "
                     "run-time inputs", c.span)
        self.requires.append(dataclasses.replace(s, cond=c))
        return scope

    def s_InputStmt(self, s: ir.InputStmt, scope, hr):
        chk = self.chk
        if s.name in CONTEXT or scope.get(s.name) is not None:
            self.err(AttnNameError, f"input '{s.name}' shadows another name", s.span)
            return scope
        if s.name in RESERVED_INPUTS:  # reported, and declared all the same (no follow-ups)
            self.err(AttnNameError, f"'{s.name}' cannot name a run-time input: it is a "
                     f"keyword of {RESERVED_INPUTS[s.name]}, where inputs are passed",
                     s.span)
        chk.allow_context = set()
        t = chk.type_of_ref(s.type, array=True)
        dims = ()
        if s.type.dims is not None:
            dims = tuple(None if d is None else chk.static_int(d, scope, "an input dimension")
                         for d in s.type.dims)
        if t.kind == "error":
            return scope
        if t.kind == "array":
            vt = Type("array", None, False, s.type.name, dims, s.optional)
        else:
            vt = Type(t.kind, None, False, optional=s.optional)
            if s.optional:
                self.err(AttnTypeError, "only array inputs can be optional", s.span)
        scope = Scope(scope)
        scope.names[s.name] = ("input", vt)
        self.inputs.append(ir.InputDecl(s.name, s.type.name, dims, s.optional, s.span))
        return scope

    def s_HeadsStmt(self, s: ir.HeadsStmt, scope, hr):
        self.chk.allow_context = set()
        if self.heads is not None:
            self.err(AttnSyntaxError, "'heads' is declared twice", s.span)
        self.heads = self.chk.static_int(s.count, scope, "the head count")
        return scope

    def s_RuleStmt(self, s: ir.RuleStmt, scope, hr):
        chk = self.chk
        chk.allow_context = {"q", "k", "h"}
        before, chk.uses_h = chk.uses_h, False
        x = chk.expr(s.expr, scope)
        chk.mask_h = chk.mask_h or chk.uses_h
        chk.uses_h = chk.uses_h or before
        t = chk.ty(x)
        if t.kind != "error" and (t.kind != "bool" or t.n is not None):
            hint = " (reduce a per-axis bool with all() or any())" if t.kind == "bool" else ""
            self.err(AttnTypeError, f"'{s.kind}' needs a bool, not {t}{hint}", x.span)
        self.rules.append(dataclasses.replace(s, expr=x, heads=hr))
        return scope

    def s_ScoreStmt(self, s: ir.ScoreStmt, scope, hr):
        chk = self.chk
        chk.allow_context = {"q", "k", "h"} if s.kind == "bias" else set()
        x = chk.expr(s.expr, scope)
        t = chk.ty(x)
        if t.kind != "error" and (t.kind not in ("int", "float") or t.n):
            self.err(AttnTypeError, f"'{s.kind}' needs a number, not {t}", x.span)
        if s.kind != "bias" and hr is not None:
            self.err(AttnSyntaxError, f"'{s.kind}' applies to all heads; it cannot be inside "
                     "'on heads'", s.span)
        if s.kind != "bias" and any(x.kind == s.kind for x in self.scores):
            self.err(AttnSyntaxError, f"'{s.kind}' is given twice", s.span)
        self.scores.append(dataclasses.replace(s, expr=x, heads=hr))
        return scope

    def s_SummaryStmt(self, s: ir.SummaryStmt, scope, hr):
        chk = self.chk
        chk.allow_context = set()
        axes = []
        names = set()
        for ax in s.axes:
            if ax.name in names:
                self.err(AttnNameError, f"summary axis '{ax.name}' is declared twice", ax.span)
            names.add(ax.name)
            chk.allow_context = set()
            size = chk.static_int(ax.size, scope, "a summary axis size")
            bound = None
            if ax.bound is not None:  # `c: W = q.x`: the query's own coordinate
                chk.allow_context = {"q"}
                chk.where = "in a summary axis's value, which sees only the query 'q'"
                bound = chk.expr(ax.bound, scope)
                chk.where = None
                t = chk.ty(bound)
                if t.kind != "error" and (t.kind != "int" or t.n is not None):
                    self.err(AttnTypeError, f"summary axis '{ax.name}' is bound to a value of "
                             f"the query, an int; not {t}", bound.span)
            axes.append(dataclasses.replace(ax, size=size, bound=bound))
        inner = Scope(scope)
        inner.names[s.name] = ("summary", Type("summary", len(axes), False, s.name,
                                               tuple(a.name for a in s.axes)))
        given = {}
        for role, name, sp in s.given:
            if role in given:
                self.err(AttnSyntaxError, f"'{role}' is given twice", sp)
            given[role] = name
            found = scope.get(name)
            if found is None or found[0] != "input":
                self.err(AttnNameError, f"'{role} from' needs a run-time input, and '{name}' "
                         "is not one", sp)
            elif (found[1].kind != "array" or found[1].space != "float"
                  or len(found[1].dims) != 4 or found[1].optional):
                self.err(AttnTypeError, f"'{role} from {name}': the input must be declared "
                         f"float[batch, heads, tokens, dim] (4 dimensions), not "
                         f"{found[1]}", sp)
        member = attend = None
        if s.member is None:
            if len(given) < 2:
                self.err(AttnSyntaxError, f"summary '{s.name}' needs a 'member' rule (which "
                         "keys belong to each summary token)" + (
                             "" if not given else ", or both 'keys from' and 'values from'"),
                         s.span)
        else:
            chk.allow_context = {"k"}
            member = chk.expr(s.member, inner)
            self._want_bool(member, "'member'")
        if s.attend is None:
            self.err(AttnSyntaxError, f"summary '{s.name}' needs an 'attend' rule (which "
                     "queries see each summary token)", s.span)
        else:
            chk.allow_context = {"q", "h"}
            before, chk.uses_h = chk.uses_h, False
            attend = chk.expr(s.attend, inner)
            chk.mask_h = chk.mask_h or chk.uses_h
            chk.uses_h = chk.uses_h or before
            self._want_bool(attend, "a summary's 'attend'")
            stype = inner.names[s.name][1]
            for ax in axes:  # a bound axis: the query attends only its own coordinate's tokens
                if ax.bound is None or chk.ty(ax.bound).kind == "error":
                    continue
                sp = ax.bound.span
                coord = ir.Attr(sp, ir.Name(sp, s.name, stype, "summary"), ax.name,
                                Type("int", None, False))
                same = ir.Compare(sp, ("==",), (coord, ax.bound), Type("bool", None, False))
                attend = ir.Binary(attend.span, "and", attend, same, Type("bool", None, False))
        bias = None
        for _kind, expr, sp in s.scores:
            chk.allow_context = {"q", "h"}
            chk.where = "in a summary's 'bias', which sees only the query 'q' and 'h'"
            x = chk.expr(expr, inner)
            chk.where = None
            t = chk.ty(x)
            if t.kind != "error" and (t.kind not in ("int", "float") or t.n):
                self.err(AttnTypeError, f"a summary's 'bias' needs a number, not {t}", x.span)
            if bias is not None:
                kind = "float" if "float" in (chk.ty(bias).kind, t.kind) else "int"
                x = ir.Binary(sp, "+", bias, x, Type(kind, None, False))
            bias = x
        pools = {"keys": "mean", "values": "mean", "queries": "max"}
        pools.update({role: "input" for role in given})
        seen = set(given)
        for role, how, sp in s.pools:
            if role in seen:
                self.err(AttnSyntaxError, f"'{role}' is given twice", sp)
            seen.add(role)
            if how not in POOLS[role]:
                self.err(AttnNameError, f"unknown {role[:-1]} pooling '{how}'"
                         + _dym(how, POOLS[role]) + f"; choose {', '.join(POOLS[role])}", sp)
                continue
            pools[role] = how
        at = None
        if s.at is not None:
            if "queries" in seen:
                self.err(AttnSyntaxError, "'queries' is given twice", s.at.span)
            seen.add("queries")
            chk.allow_context = set()
            at = chk.expr(s.at, inner)
            t = chk.ty(at)
            n = None if self.chk.qspace is None else len(self.chk.qspace.axes)
            if t.kind != "error" and (t.kind != "int" or t.n not in (None, n)):
                self.err(AttnTypeError, "'queries at' needs the query's flat index (an int) or "
                         f"its coordinates (int[{n}]), not {t}", at.span)
        if "queries" in seen and pools["values"] != "expectation":
            sp = at.span if at is not None else next(
                sp for role, _, sp in s.pools if role == "queries")
            self.err(AttnSyntaxError, "'queries' pooling is used only by 'values expectation'",
                     sp)
        self.summaries.append(ir.Summary(
            s.name, tuple(axes), member, attend, pools["keys"], pools["values"],
            pools["queries"], s.span, given.get("keys"), given.get("values"), at, bias))
        return scope

    def _want_bool(self, x, what):
        t = self.chk.ty(x)
        if t.kind != "error" and (t.kind != "bool" or t.n is not None):
            self.err(AttnTypeError, f"{what} needs a bool, not {t}", x.span)

    def s_RouteStmt(self, s: ir.RouteStmt, scope, hr):
        chk = self.chk
        chk.allow_context = set()
        if self.route is not None:
            self.err(AttnSyntaxError, "a pattern routes heads once", s.span)
        found = scope.get(s.input)
        if found is None or found[0] != "input":
            self.err(AttnNameError, f"'route' needs a run-time input, and '{s.input}' is not "
                     "one", s.span)
        elif found[1].space != "float" or len(found[1].dims) != 3:
            self.err(AttnTypeError, f"router '{s.input}' must be declared "
                     "float[*, N, routed heads]", s.span)
        top = chk.static_int(s.top, scope, "'top'")
        shared = chk.static_int(s.shared, scope, "'shared'")
        scaled = hard = None
        if s.scaled is not None:
            scaled = chk.expr(s.scaled, scope)
            t = chk.ty(scaled)
            if t.kind != "error" and (t.kind not in ("int", "float") or t.n is not None
                                      or not t.static):
                self.err(AttnTypeError, "'scaled' needs a number that depends only on "
                         f"parameters, not {t}", scaled.span)
        if s.hard is not None:
            hard = chk.expr(s.hard, scope)
            t = chk.ty(hard)
            if t.kind != "error" and (t.kind != "bool" or t.n is not None or not t.static):
                self.err(AttnTypeError, "'hard' needs a bool that depends only on parameters, "
                         f"not {t}", hard.span)
        opts = {}
        for what, name in (("weighted", s.weighted), ("grouped", s.grouped)):
            if name is None:
                continue
            x = chk.expr(name, scope)
            opts[what] = x
            t = chk.ty(x)
            if t.kind != "error" and (x.ref != "input" or t.kind != "array"
                                      or t.space != "float" or len(t.dims) != 3):
                want = "shared heads" if what == "weighted" else "2"
                self.err(AttnTypeError, f"'{what}' needs a run-time input declared float[*, N,"
                         f" {want}], not {t}", x.span)
        self.route = dataclasses.replace(s, top=top, shared=shared, scaled=scaled, hard=hard,
                                         **opts)
        return scope

    def s_NnzStmt(self, s: ir.NnzStmt, scope, hr):
        chk = self.chk
        chk.allow_context = set()
        if self.nnz is not None:
            self.err(AttnSyntaxError, "'nnz' is given twice", s.span)
        x = chk.static_int(s.expr, scope, "'nnz'")
        w = None
        if s.when is not None:
            w = chk.expr(s.when, scope)
            t = chk.ty(w)
            if t.kind != "error" and (t.kind != "bool" or t.n or not t.static):
                self.err(AttnTypeError, "'when' needs a bool that depends only on parameters, "
                         f"not {t}", w.span)
        self.nnz = dataclasses.replace(s, expr=x, when=w)
        return scope

    def s_AverageStmt(self, s: ir.AverageStmt, scope, hr):
        for part in s.parts:
            self.average.append((part.name, self.chk.pattern_ref(part, scope)))
        return scope

    def s_IncludeStmt(self, s: ir.IncludeStmt, scope, hr):
        ref = self.chk.pattern_ref(s.ref, scope)
        self.includes.append(ref)
        if "query" not in self.spaces and ref.checked is not None:
            cp = ref.checked
            if cp.qspace is not None and cp.kspace is not None:
                q = ir.Space(cp.qspace.kind, (), cp.qspace.axes, s.ref.span, True)
                k = q if cp.kspace is cp.qspace else ir.Space(
                    cp.kspace.kind, (), cp.kspace.axes, s.ref.span, True)
                self.spaces["query"], self.spaces["key"] = q, k
                self.chk.qspace, self.chk.kspace = q, k
        return scope

    def s_HeadBlock(self, s: ir.HeadBlock, scope, hr):
        chk = self.chk
        if hr is not None:
            self.err(AttnSyntaxError, "'on heads' blocks cannot nest", s.span)
        chk.allow_context = set()
        lo = chk.static_int(s.heads.lo, scope, "a head range bound")
        hi = chk.static_int(s.heads.hi, scope, "a head range bound")
        inner_ok = ir.RuleStmt | ir.ScoreStmt | ir.LetStmt
        for inner in s.body:
            if not isinstance(inner, inner_ok):
                self.err(AttnSyntaxError, "'on heads' blocks hold attend, exclude, within, bias "
                         "and let statements", inner.span)
        self.visit([x for x in s.body if isinstance(x, inner_ok)], scope,
                   ir.HeadRange(lo, hi, s.heads.span))
        if self.heads is None:
            self.err(AttnSyntaxError, "'on heads' needs a 'heads N' declaration before it",
                     s.span)
        return scope  # lets inside the block stay inside it


def _deps(e, scope: Scope, memo: dict | None = None) -> frozenset:
    """The context names (q, k, h) and run-time inputs an expression uses, through lets and
    the bodies of called functions (each shared body read once)."""
    memo = {} if memo is None else memo
    out = set()
    for x in walk(e, enter=lambda n: True):
        if isinstance(x, ir.Name):
            if x.ref in CONTEXT:
                out.add(x.ref)
            elif x.ref == "input":
                out.add("input")
            elif x.ref == "local":
                out.update(scope.let_deps(x.id))
        elif isinstance(x, ir.Call) and x.body is not None:
            if id(x.body) not in memo:
                memo[id(x.body)] = (x.body, _deps(x.body, scope, memo))
            out |= memo[id(x.body)][1]
    return frozenset(out)
