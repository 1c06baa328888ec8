"""Binding: a checked pattern plus parameter values -> a BoundPattern with every static value
computed and every `require` verified. Masks are evaluated from here in row chunks."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from . import ir
from .checker import CheckedPattern, check_pattern
from .errors import (
    AttnNameError,
    ConstraintError,
    EvaluationError,
    InputError,
    ParameterError,
    SizeLimitError,
    did_you_mean,
)
from .evaluate import Evaluator, token

MASK_LIMIT = 1 << 28  # entries of a dense mask (heads x Nq x Nk): 256 MiB of bools
CHUNK_ELEMS = 1 << 22  # elements evaluated at once while building a mask


@dataclass(frozen=True, slots=True)
class BoundSummary:
    owner: BoundPattern
    summary: object
    sizes: tuple[int, ...]


@dataclass(eq=False)
class BoundPattern:
    checked: CheckedPattern
    module: ir.Module
    values: dict
    env: dict = field(default_factory=dict)
    qshape: tuple[int, ...] = ()
    kshape: tuple[int, ...] = ()
    heads: int | None = None
    rules: list = field(default_factory=list)  # (owner, RuleStmt, (lo, hi) | None)
    scores: list = field(default_factory=list)  # (owner, ScoreStmt, (lo, hi) | None)
    summaries: list = field(default_factory=list)
    route: tuple | None = None  # (input name, top, shared)
    average: list = field(default_factory=list)
    inputs: dict = field(default_factory=dict)  # name -> (kind, dims, optional, span)
    scale: float | None = None
    softcap: float | None = None
    cache: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.checked.name

    @property
    def nq(self) -> int:
        return math.prod(self.qshape)

    @property
    def nk(self) -> int:
        return math.prod(self.kshape)

    @property
    def channel(self) -> bool:
        return self.checked.channel

    @property
    def head_dependent(self) -> bool:
        return any(o.checked.uses_h for o in self.owners()) or any(
            hr is not None for _, _, hr in self.rules) or (
            any(p.head_dependent for p in self.average))

    @property
    def content_dependent(self) -> bool:
        return any(o.checked.uses_content for o in self.owners()) or any(
            p.content_dependent for p in self.average)

    def owners(self) -> list:
        """This pattern and every included one whose rules, summaries or scores it holds."""
        seen = {id(self): self}
        for o, _, _ in self.rules + self.scores:
            seen[id(o)] = o
        for s in self.summaries:
            seen[id(s.owner)] = s.owner
        return list(seen.values())

    # ------------------------------------------------------------------ masks
    def context(self, qidx, kidx, h=None) -> dict:
        ctx = {"q": token(qidx, self.qshape, self.checked.qspace.axes),
               "k": token(kidx, self.kshape, self.checked.kspace.axes)}
        if h is not None:
            ctx["h"] = h
        return ctx

    def lazy_lets(self) -> dict:
        """Pattern-level lets on q, k, h or inputs: evaluated when a rule first uses them."""
        return {let.name: let.value for let in self.checked.lets
                if not (let.name in self.env and let.value.ty.static)}

    def evaluator(self, ctx: dict, hooks) -> Evaluator:
        return Evaluator(self.env, ctx, hooks, self.lazy_lets())

    def predicate(self, ctx: dict, hooks) -> object:
        """The direct attend mask for the given q/k/h context (broadcast shapes)."""
        attend = within = exclude = None
        evaluators: dict[int, Evaluator] = {}
        for owner, rule, hr in self.rules:
            if id(owner) not in evaluators:
                evaluators[id(owner)] = owner.evaluator(ctx, hooks.for_owner(owner))
            val = _as_tensor(evaluators[id(owner)].eval(rule.expr))
            if hr is not None:
                h = ctx["h"]
                inside = (h >= hr[0]) & (h < hr[1])
                val = val | ~inside if rule.kind == "within" else val & inside
            if rule.kind == "attend":
                attend = val if attend is None else attend | val
            elif rule.kind == "within":
                within = val if within is None else within & val
            else:
                exclude = val if exclude is None else exclude | val
        if attend is None:
            attend = torch.zeros((), dtype=torch.bool)
        if within is not None:
            attend = attend & within
        if exclude is not None:
            attend = attend & ~exclude
        return attend

    def token_mask(self, qidx, kidx, hooks, h=None, dims: int = 3) -> torch.Tensor:
        """The direct mask at these (broadcast) query and key indices, with leading per-batch
        and per-head dimensions beyond `dims` reduced to their union."""
        val = _as_tensor(self.predicate(self.context(qidx, kidx, h), hooks))
        while val.dim() > dims:
            val = val.any(dim=0)
        return val

    def check_size(self, batch_heads: int = 1) -> None:
        n = batch_heads * self.nq * self.nk
        if n > MASK_LIMIT:
            raise SizeLimitError(
                f"a dense mask of {batch_heads} x {self.nq} x {self.nk} = {n:,} entries exceeds"
                f" the reference limit of {MASK_LIMIT:,} (2^28); the reference backend is "
                "dense by design, use smaller sizes to inspect masks", self.checked.span)


def _as_tensor(x):
    if isinstance(x, torch.Tensor):
        return x
    return torch.tensor(bool(x))


# ---------------------------------------------------------------- parameter values


def _convert(name: str, value, t: ir.Type, span):
    """A Python/numpy/torch value as the parameter's declared type, or a ParameterError."""
    def scalar(v):
        if isinstance(v, torch.Tensor | np.ndarray):
            if (v.size if isinstance(v, np.ndarray) else v.numel()) != 1:
                raise ParameterError(f"parameter '{name}' must be {t}, not an array", span)
            v = v.item()
        if isinstance(v, np.generic):
            v = v.item()
        if t.kind == "bool":
            if isinstance(v, bool):
                return v
        elif t.kind == "int":
            if isinstance(v, int) and not isinstance(v, bool):
                if abs(v) >= 1 << 63:
                    raise ParameterError(f"parameter '{name}' = {v} does not fit in 64 bits",
                                         span)
                return v
        elif t.kind == "float":
            if isinstance(v, int | float) and not isinstance(v, bool):
                if not math.isfinite(float(v)):
                    raise ParameterError(f"parameter '{name}' must be finite, not {v}", span)
                return float(v)
        raise ParameterError(f"parameter '{name}' must be {t.scalar()}, not "
                             f"{type(v).__name__} {v!r}", span)

    if t.n is None:
        if isinstance(value, tuple | list):
            raise ParameterError(f"parameter '{name}' must be {t}, not a sequence", span)
        return scalar(value)
    if isinstance(value, tuple | list):
        if len(value) != t.n:
            raise ParameterError(f"parameter '{name}' takes one value or {t.n} (one per axis),"
                                 f" not {len(value)}", span)
        return tuple(scalar(v) for v in value)
    v = scalar(value)
    return (v,) * t.n


class _Hooks:
    """Evaluator callbacks: constants, pattern calls and content-dependent built-ins."""

    def __init__(self, bound: BoundPattern, runtime: dict | None = None):
        self.bound = bound
        self.runtime = runtime or {}

    def for_owner(self, owner):
        return self if owner is self.bound else _Hooks(owner, self.runtime)

    def const(self, name, file=None):
        return const_value(self.bound.module, name, file)

    def pattern_mask(self, ev: Evaluator, call: ir.Call, local: dict):
        pdef = self.bound.module.scope[call.func]
        values = {}
        names = [p.name for p in pdef.params]
        for n, a in zip(names, call.args):
            values[n] = ev.eval(a, local)
        for kw in call.kwargs:
            values[kw.name] = ev.eval(kw.value, local)
        key = ("pattern", call.func, tuple(sorted((k, _freeze(v)) for k, v in values.items())))
        sub = self.bound.cache.get(key)
        if sub is None:
            sub = bind_def(self.bound.module.home(pdef), pdef, values, call.span)
            if sub.summaries or sub.route or sub.average or sub.checked.channel:
                raise EvaluationError(f"pattern '{call.func}' has summaries, routing, averaging "
                                      "or channel tokens; only mask patterns can be used in an "
                                      "expression (use 'include' instead)", call.span)
            if sub.qshape != self.bound.qshape or sub.kshape != self.bound.kshape:
                raise EvaluationError(
                    f"pattern '{call.func}' has spaces {sub.qshape} x {sub.kshape}, this pattern"
                    f" {self.bound.qshape} x {self.bound.kshape}", call.span)
            self.bound.cache[key] = sub
        return sub.predicate(ev.ctx, _Hooks(sub, self.runtime))

    def dynamic(self, ev: Evaluator, call: ir.Call, args: dict):
        from .reference import chunk_topk
        return chunk_topk(self.bound, ev.ctx, args, self.runtime, call.span)


def _freeze(v):
    return tuple(v) if isinstance(v, list) else v


def const_value(module: ir.Module, name: str, file: str | None = None):
    """A constant's value, looked up in the file that defines it."""
    home = module.registry.get(file, module) if file else module
    c = home.scope[name]
    home = home.home(c)
    return Evaluator({}, {}, _ConstHooks(home)).eval(_typed_const(home, c))


class _ConstHooks:
    def __init__(self, module):
        self.module = module

    def const(self, name, file=None):
        return const_value(self.module, name, file)


def _typed_const(module, c):
    from .checker import Checker
    from .errors import ErrorSink
    sink = ErrorSink()
    ch = Checker(module, sink)
    ch.allow_context = set()
    from .checker import _Scope
    e = ch.expr(c.value, _Scope())
    sink.raise_if_any()
    return e


def bind_def(module: ir.Module, pdef: ir.PatternDef, values: dict, call_span=None
             ) -> BoundPattern:
    return bind(check_pattern(module, pdef), module, values, call_span)


def bind(checked: CheckedPattern, module: ir.Module, values: dict, call_span=None
         ) -> BoundPattern:
    """Bind parameter values, evaluate static lets, check every `require`."""
    span = call_span or checked.span
    names = [p.name for p, _ in checked.params]
    for k in values:
        if k not in names:
            raise ParameterError(f"pattern '{checked.name}' has no parameter '{k}'"
                                 + did_you_mean(k, names), span)
    bp = BoundPattern(checked, module, {})
    hooks = _Hooks(bp)
    env = bp.env
    for p, t in checked.params:
        if p.name in values:
            env[p.name] = _convert(p.name, values[p.name], t, call_span or p.span)
        elif p.default is not None:
            dv = Evaluator(env, {}, hooks).eval(p.default)
            env[p.name] = _convert(p.name, dv, t, p.default.span)
        else:
            raise ParameterError(f"pattern '{checked.name}' needs parameter '{p.name}' ({t})",
                                 span)
    bp.values = dict(env)
    ev = Evaluator(env, {}, hooks)

    def sizes_of(space):
        out = []
        for x in space.sizes:
            v = ev.eval(x)
            if v < 1:
                raise ConstraintError(f"space size must be at least 1, not {v}", x.span)
            out.append(v)
        return tuple(out)

    # lets and requires interleave in source order; evaluate statically what can be
    static_lets = [let for let in checked.lets if let.value.ty.static]
    pending_requires = list(checked.requires)
    _eval_static(checked, ev, env, static_lets, pending_requires)
    inherited = checked.qspace is None or checked.qspace.inherited
    if not inherited:
        bp.qshape = sizes_of(checked.qspace)
        bp.kshape = sizes_of(checked.kspace)
    if checked.heads is not None:
        bp.heads = ev.eval(checked.heads)
        if bp.heads < 1:
            raise ConstraintError(f"head count must be at least 1, not {bp.heads}",
                                  checked.heads.span)
    for rule in checked.rules:
        bp.rules.append((bp, rule, _head_range(ev, rule.heads, bp.heads)))
    for sc in checked.scores:
        if sc.kind == "scale":
            bp.scale = float(ev.eval(sc.expr))
            if not bp.scale > 0 or not math.isfinite(bp.scale):
                raise ConstraintError(f"scale must be a positive number, not {bp.scale}",
                                      sc.span)
        elif sc.kind == "softcap":
            bp.softcap = float(ev.eval(sc.expr))
            if not bp.softcap > 0 or not math.isfinite(bp.softcap):
                raise ConstraintError(f"softcap must be a positive number, not {bp.softcap}",
                                      sc.span)
        bp.scores.append((bp, sc, _head_range(ev, sc.heads, bp.heads)))
    for s in checked.summaries:
        sizes = []
        for ax in s.axes:
            v = ev.eval(ax.size)
            if v < 1:
                raise ConstraintError(f"summary axis '{ax.name}' must have at least 1 entry, "
                                      f"not {v}", ax.size.span)
            sizes.append(v)
        bp.summaries.append(BoundSummary(bp, s, tuple(sizes)))
    for d in checked.inputs:
        dims = tuple(None if x is None else ev.eval(x) for x in d.dims)
        bp.inputs[d.name] = (d.kind, dims, d.optional, d.span)
    if checked.route is not None:
        top, shared = ev.eval(checked.route.top), ev.eval(checked.route.shared)
        if bp.heads is None:
            raise ConstraintError("'route' needs a 'heads N' declaration", checked.route.span)
        if not 0 <= shared <= bp.heads:
            raise ConstraintError(f"shared heads must be between 0 and {bp.heads}, not "
                                  f"{shared}", checked.route.shared.span)
        if not 0 <= top <= bp.heads - shared:
            raise ConstraintError(f"'top' must be between 0 and {bp.heads - shared} (the routed"
                                  f" heads), not {top}", checked.route.top.span)
        bp.route = (checked.route.input, top, shared)
    for _name, ref in checked.average:
        sub = _bind_ref(module, ref, ev)
        bp.average.append(sub)
    for ref in checked.includes:
        sub = _bind_ref(module, ref, ev)
        if inherited and not bp.qshape:
            bp.qshape, bp.kshape = sub.qshape, sub.kshape
        if (sub.qshape, sub.kshape) != (bp.qshape, bp.kshape):
            raise EvaluationError(f"included pattern '{ref.name}' has spaces {sub.qshape} x "
                                  f"{sub.kshape}, this pattern {bp.qshape} x {bp.kshape}",
                                  ref.span)
        if sub.average or sub.route:
            raise EvaluationError(f"pattern '{ref.name}' averages or routes; it cannot be "
                                  "included", ref.span)
        bp.rules.extend(sub.rules)
        bp.scores.extend(x for x in sub.scores if x[1].kind == "bias")
        bp.summaries.extend(sub.summaries)
        bp.inputs.update(sub.inputs)
        bp.scale = bp.scale if bp.scale is not None else sub.scale
        bp.softcap = bp.softcap if bp.softcap is not None else sub.softcap
        if bp.heads is None:
            bp.heads = sub.heads
    if bp.average:
        first = bp.average[0]
        for sub in bp.average[1:]:
            if (sub.qshape, sub.kshape) != (first.qshape, first.kshape):
                raise EvaluationError("averaged patterns must have the same spaces: "
                                      f"{first.qshape} and {sub.qshape}", checked.span)
        if checked.qspace is not None and (first.qshape, first.kshape) != (bp.qshape,
                                                                           bp.kshape):
            raise EvaluationError("averaged patterns must have this pattern's spaces",
                                  checked.span)
        bp.qshape, bp.kshape = first.qshape, first.kshape
        if checked.qspace is None:
            bp.checked = _with_spaces(bp.checked, first.checked)
    return bp


def _with_spaces(checked, other):
    import dataclasses
    return dataclasses.replace(checked, qspace=other.qspace, kspace=other.kspace)


def _bind_ref(module, ref, ev):
    pdef = module.scope[ref.name]
    home = module.home(pdef)
    values = {}
    for p, a in zip(pdef.params, ref.args):
        values[p.name] = ev.eval(a)
    for kw in ref.kwargs:
        values[kw.name] = ev.eval(kw.value)
    return bind_def(home, pdef, values, ref.span)


def _head_range(ev, hr, heads):
    if hr is None:
        return None
    lo, hi = ev.eval(hr.lo), ev.eval(hr.hi)
    if not 0 <= lo < hi <= (heads or 0):
        raise ConstraintError(f"head range {lo}..{hi} must satisfy 0 <= lo < hi <= heads "
                              f"({heads})", hr.span)
    return (lo, hi)


def _eval_static(checked, ev, env, static_lets, requires):
    """Evaluate static lets and requires in source order, naming the values a failure saw."""
    items = sorted(static_lets + requires, key=lambda s: (s.span.line, s.span.col))
    for req in items:
        if isinstance(req, ir.LetStmt):
            env[req.name] = ev.eval(req.value)
            continue
        ok = ev.eval(req.cond)
        if isinstance(ok, tuple):
            bad_axes = [i for i, x in enumerate(ok) if not x]
            ok = not bad_axes
        else:
            bad_axes = []
        if not ok:
            mentioned = []
            for n in _names_in(req.cond):
                if n in env and n not in mentioned:
                    mentioned.append(n)
            vals = ", ".join(f"{n}={_show(env[n])}" for n in mentioned)
            msg = req.message or "requirement failed"
            where = f" on axis {', '.join(map(str, bad_axes))}" if bad_axes else ""
            raise ConstraintError(f"{msg}{where}" + (f" (got {vals})" if vals else ""),
                                  req.cond.span)


def _show(v):
    if isinstance(v, tuple):
        return "(" + ", ".join(_show(x) for x in v) + ")"
    if isinstance(v, bool):
        return "true" if v else "false"
    return str(v)


def _names_in(e):
    import dataclasses
    if isinstance(e, ir.Name):
        yield e.id
        return
    if isinstance(e, ir.Call) and e.ref == "fn":
        for a in e.args:
            yield from _names_in(a)
        return
    for f in dataclasses.fields(e):
        v = getattr(e, f.name)
        if isinstance(v, ir.Expr):
            yield from _names_in(v)
        elif isinstance(v, tuple):
            for x in v:
                if isinstance(x, ir.Expr):
                    yield from _names_in(x)
                elif isinstance(x, ir.Keyword):
                    yield from _names_in(x.value)


def unknown_input(bp: BoundPattern, name: str):
    return AttnNameError(f"pattern '{bp.name}' has no run-time input '{name}'"
                         + did_you_mean(name, bp.inputs), bp.checked.span)


__all__ = ["BoundPattern", "bind", "InputError", "CHUNK_ELEMS"]
