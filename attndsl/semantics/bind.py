"""Binding: a checked pattern plus parameter values -> a BoundPattern, with every static value
computed and every `require` verified.

A BoundPattern is a frozen value, equal and hashed by (pattern, parameter values): caches
anywhere may key on it, and nothing that happens at run time changes it. Run-time inputs
travel separately, as `inputs.RunInputs`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from types import MappingProxyType

import numpy as np
import torch

from attndsl import caches
from attndsl.caches import lazy
from attndsl.errors import (
    ConstraintError,
    EvaluationError,
    ParameterError,
    SizeLimitError,
    did_you_mean,
)
from attndsl.lang import ir
from attndsl.lang.walk import names
from attndsl.semantics.evaluate import Evaluator

MASK_LIMIT = 1 << 28  # entries of a dense mask (heads x Nq x Nk): 256 MiB of bools


@dataclass(frozen=True, slots=True)
class InputSpec:
    """A run-time input as bound: element kind, dims (None for '*'), optional, span."""

    kind: str
    dims: tuple
    optional: bool
    span: object


@dataclass(frozen=True, slots=True)
class RouteOptions:
    """`route`'s options as bound: routed gates times `scale`; `hard`: a kept routed head's
    gate is 1 (before the scale), not its softmax; the inputs holding the shared heads'
    logits (`weighted`) and the two groups' logits (`grouped`), or None."""

    scale: float = 1.0
    hard: bool = False
    weighted: str | None = None
    grouped: str | None = None


@dataclass(frozen=True, eq=False)
class BoundSummary:
    owner: BoundPattern
    summary: ir.Summary
    sizes: tuple[int, ...]

    @property
    def extended(self) -> bool:
        return self.summary.extended


@dataclass(frozen=True, eq=False)
class BoundPattern:
    """A pattern bound to parameter values. Its own rules, scores and summaries are kept
    apart from those of included patterns; `rules`, `scores`, `summaries` and `inputs` give
    the whole pattern, each item with the BoundPattern (`owner`) whose values it reads."""

    checked: ir.CheckedPattern
    values: MappingProxyType  # parameters, in declaration order
    env: MappingProxyType  # parameters and static lets: the values rules may read
    qshape: tuple[int, ...]
    kshape: tuple[int, ...]
    heads: int | None
    own_rules: tuple  # (RuleStmt, head range | None)
    own_scores: tuple  # (ScoreStmt, head range | None)
    own_summaries: tuple  # (ir.Summary, sizes)
    own_inputs: MappingProxyType  # name -> InputSpec
    route: tuple | None  # (input name, top, shared)
    average: tuple  # BoundPatterns averaged
    includes: tuple  # BoundPatterns included
    scale: float | None
    softcap: float | None
    key: tuple = field(repr=False)
    route_opts: RouteOptions | None = None

    def __eq__(self, other) -> bool:
        return isinstance(other, BoundPattern) and self.key == other.key

    def __hash__(self) -> int:
        return hash(self.key)

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

    @lazy
    def rules(self) -> tuple:
        """(owner, RuleStmt, head range | None) of this pattern and every included one."""
        own = tuple((self, r, hr) for r, hr in self.own_rules)
        return own + tuple(x for sub in self.includes for x in sub.rules)

    @lazy
    def scores(self) -> tuple:
        """(owner, ScoreStmt, head range | None); included patterns give their biases."""
        own = tuple((self, s, hr) for s, hr in self.own_scores)
        return own + tuple(x for sub in self.includes for x in sub.scores
                           if x[1].kind == "bias")

    @lazy
    def biases(self) -> tuple:
        return tuple(x for x in self.scores if x[1].kind == "bias")

    @lazy
    def summaries(self) -> tuple[BoundSummary, ...]:
        own = tuple(BoundSummary(self, s, sizes) for s, sizes in self.own_summaries)
        return own + tuple(x for sub in self.includes for x in sub.summaries)

    @lazy
    def inputs(self) -> MappingProxyType:
        """Every run-time input (name -> InputSpec), included patterns' too."""
        out = {}
        for sub in self.includes:
            out.update(sub.inputs)
        out.update(self.own_inputs)
        return MappingProxyType(out)

    @lazy
    def lazy_lets(self) -> MappingProxyType:
        """Pattern-level lets on q, k, h or inputs: evaluated when a rule first uses them."""
        return MappingProxyType({let.name: let.value for let in self.checked.lets
                                 if not (let.name in self.env and let.value.ty.static)})

    @lazy
    def core_summaries(self) -> tuple[BoundSummary, ...]:
        """The summaries a core's summary kernel computes (the rest: the driver's)."""
        return tuple(bs for bs in self.summaries if not bs.extended)

    @lazy
    def mask_inputs(self) -> frozenset:
        """The run-time inputs the masks read (rules, summary member and attend rules): the
        others (scores, routing, given summary keys and values) are not needed for masks."""
        exprs = [r.expr for _, r, _ in self.rules]
        for bs in self.summaries:
            exprs += [x for x in (bs.summary.member, bs.summary.attend) if x is not None]
        exprs += [let.value for o in self.owners() for let in o.checked.lets]
        return frozenset(n.id for e in exprs for n in names(e) if n.ref == "input")

    @lazy
    def bias_inputs(self) -> frozenset:
        """The run-time inputs the direct keys' `bias` statements read (lets included)."""
        exprs = [sc.expr for _, sc, _ in self.biases]
        exprs += [let.value for o in self.owners() for let in o.checked.lets]
        return frozenset(n.id for e in exprs for n in names(e) if n.ref == "input")

    @lazy
    def head_dependent(self) -> bool:
        return any(o.checked.uses_h for o in self.owners()) or any(
            hr is not None for _, _, hr in self.rules) or (
            any(p.head_dependent for p in self.average))

    @lazy
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

    def check_size(self, batch_heads: int = 1, rows: int | None = None) -> None:
        nq = self.nq if rows is None else rows
        n = batch_heads * nq * self.nk
        if n > MASK_LIMIT:
            raise SizeLimitError(
                f"a dense mask of {batch_heads} x {nq} x {self.nk} = {n:,} entries exceeds"
                f" the reference limit of {MASK_LIMIT:,} (2^28); the reference backend is "
                "dense by design, use smaller sizes to inspect masks", self.checked.span)

    def unknown_input(self, name: str, options=()):
        """The error for an unknown keyword; `options`: the other keywords the call takes,
        also suggested (a misspelt `scale=` is no run-time input either)."""
        from attndsl.errors import AttnNameError
        return AttnNameError(f"pattern '{self.name}' has no run-time input '{name}'"
                             + did_you_mean(name, (*self.inputs, *options)), self.checked.span)


# ---------------------------------------------------------------- parameter values


def convert(name: str, value, t: ir.Type, span):
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
            if len(value) == 1:  # a 1-tuple is one axis' value (NATTEN's `kernel_size=(7,)`)
                return scalar(value[0])
            raise ParameterError(f"parameter '{name}' must be {t}, not a sequence", span)
        return scalar(value)
    if isinstance(value, tuple | list):
        if len(value) != t.n:
            raise ParameterError(f"parameter '{name}' takes one value or {t.n} (one per axis),"
                                 f" not {len(value)}", span)
        return tuple(scalar(v) for v in value)
    v = scalar(value)
    return (v,) * t.n


def bind_cached(checked: ir.CheckedPattern, values: tuple) -> BoundPattern:
    """bind() through the declared cache: a pattern called from an expression (or included)
    is bound once per parameter values, whichever interpreter asks."""
    return caches.BIND.get_or_create((checked, values), lambda: bind(checked, dict(values)))


def bind(checked: ir.CheckedPattern, values: dict, call_span=None) -> BoundPattern:
    """Bind parameter values, evaluate static lets, check every `require`."""
    span = call_span or checked.span
    names_ = [p.name for p, _ in checked.params]
    for k in values:
        if k not in names_:
            raise ParameterError(f"pattern '{checked.name}' has no parameter '{k}'"
                                 + did_you_mean(k, names_), span)
    env: dict = {}
    for p, t in checked.params:
        if p.name in values:
            env[p.name] = convert(p.name, values[p.name], t, call_span or p.span)
        elif p.default is not None:
            dv = Evaluator(env, {}).eval(p.default)
            env[p.name] = convert(p.name, dv, t, p.default.span)
        else:
            raise ParameterError(f"pattern '{checked.name}' needs parameter '{p.name}' ({t})",
                                 span)
    params = dict(env)
    ev = Evaluator(env, {})

    def sizes_of(space):
        out = []
        for x in space.sizes:
            v = ev.eval(x)
            if v < 1:
                raise ConstraintError(f"space size must be at least 1, not {v}", x.span)
            out.append(v)
        return tuple(out)

    # lets and requires interleave in source order; evaluate statically what can be
    _eval_static(checked, ev, env)
    inherited = checked.qspace is None or checked.qspace.inherited
    qshape = kshape = ()
    if not inherited:
        qshape, kshape = sizes_of(checked.qspace), sizes_of(checked.kspace)
    heads = None
    if checked.heads is not None:
        heads = ev.eval(checked.heads)
        if heads < 1:
            raise ConstraintError(f"head count must be at least 1, not {heads}",
                                  checked.heads.span)
    rules = tuple((rule, _head_range(ev, rule.heads, heads)) for rule in checked.rules)
    scale = softcap = None
    scores = []
    for sc in checked.scores:
        if sc.kind == "scale":
            scale = float(ev.eval(sc.expr))
            if not scale > 0 or not math.isfinite(scale):
                raise ConstraintError(f"scale must be a positive number, not {scale}",
                                      sc.span)
        elif sc.kind == "softcap":
            softcap = float(ev.eval(sc.expr))
            if not softcap > 0 or not math.isfinite(softcap):
                raise ConstraintError(f"softcap must be a positive number, not {softcap}",
                                      sc.span)
        scores.append((sc, _head_range(ev, sc.heads, heads)))
    summaries = []
    for s in checked.summaries:
        sizes = []
        for ax in s.axes:
            v = ev.eval(ax.size)
            if v < 1:
                raise ConstraintError(f"summary axis '{ax.name}' must have at least 1 entry, "
                                      f"not {v}", ax.size.span)
            sizes.append(v)
        summaries.append((s, tuple(sizes)))
    inputs = {}
    for d in checked.inputs:
        dims = tuple(None if x is None else ev.eval(x) for x in d.dims)
        for x, n in zip(d.dims, dims):
            if n is not None and n < 0:
                raise ConstraintError(f"an input dimension must be at least 0, not {n}",
                                      x.span)
        inputs[d.name] = InputSpec(d.kind, dims, d.optional, d.span)
    route = route_opts = None
    if checked.route is not None:
        top, shared = ev.eval(checked.route.top), ev.eval(checked.route.shared)
        if heads is None:
            raise ConstraintError("'route' needs a 'heads N' declaration", checked.route.span)
        if not 0 <= shared <= heads:
            raise ConstraintError(f"shared heads must be between 0 and {heads}, not "
                                  f"{shared}", checked.route.shared.span)
        if not 0 <= top <= heads - shared:
            raise ConstraintError(f"'top' must be between 0 and {heads - shared} (the routed"
                                  f" heads), not {top}", checked.route.top.span)
        route = (checked.route.input, top, shared)
        r = checked.route
        scale_r = 1.0 if r.scaled is None else float(ev.eval(r.scaled))
        if not math.isfinite(scale_r) or not scale_r > 0:
            raise ConstraintError(f"'scaled' must be a positive number, not {scale_r}",
                                  r.scaled.span)
        route_opts = RouteOptions(scale_r, False if r.hard is None else bool(ev.eval(r.hard)),
                                  None if r.weighted is None else r.weighted.id,
                                  None if r.grouped is None else r.grouped.id)
    average = tuple(_bind_ref(ref, ev) for _name, ref in checked.average)
    includes = []
    for ref in checked.includes:
        sub = _bind_ref(ref, ev)
        if inherited and not qshape:
            qshape, kshape = sub.qshape, sub.kshape
        if (sub.qshape, sub.kshape) != (qshape, kshape):
            raise EvaluationError(f"included pattern '{ref.name}' has spaces {sub.qshape} x "
                                  f"{sub.kshape}, this pattern {qshape} x {kshape}", ref.span)
        if sub.average or sub.route:
            raise EvaluationError(f"pattern '{ref.name}' averages or routes; it cannot be "
                                  "included", ref.span)
        includes.append(sub)
        scale = scale if scale is not None else sub.scale
        softcap = softcap if softcap is not None else sub.softcap
        if heads is None:
            heads = sub.heads
    if average:
        first = average[0]
        for sub in average[1:]:
            if (sub.qshape, sub.kshape) != (first.qshape, first.kshape):
                raise EvaluationError("averaged patterns must have the same spaces: "
                                      f"{first.qshape} and {sub.qshape}", checked.span)
        if checked.qspace is not None and (first.qshape, first.kshape) != (qshape, kshape):
            raise EvaluationError("averaged patterns must have this pattern's spaces",
                                  checked.span)
        qshape, kshape = first.qshape, first.kshape
        if checked.qspace is None:
            checked = _with_spaces(checked, first.checked)
    key = (checked.key, tuple(params.items()))
    return BoundPattern(checked, MappingProxyType(params), MappingProxyType(env), qshape,
                        kshape, heads, rules, tuple(scores), tuple(summaries),
                        MappingProxyType(inputs), route, average, tuple(includes), scale,
                        softcap, key, route_opts)


def _with_spaces(checked, other):
    import dataclasses
    return dataclasses.replace(checked, qspace=other.qspace, kspace=other.kspace)


def _bind_ref(ref: ir.PatternRef, ev: Evaluator) -> BoundPattern:
    """An included or averaged pattern, bound to its (static) arguments."""
    pdef_params = [p.name for p, _ in ref.checked.params]
    values = {n: ev.eval(a) for n, a in zip(pdef_params, ref.args)}
    for kw in ref.kwargs:
        values[kw.name] = ev.eval(kw.value)
    try:
        return bind_cached(ref.checked, tuple(values.items()))
    except ParameterError as e:  # the call site is where the values came from
        raise ParameterError(e.message, ref.span) from None


def call_values(callee: ir.CheckedPattern, call: ir.Call, evaluate) -> tuple:
    """The parameter values of a pattern called from an expression, as a cache key."""
    values = {p.name: evaluate(a) for (p, _), a in zip(callee.params, call.args)}
    for kw in call.kwargs:
        values[kw.name] = evaluate(kw.value)
    return tuple(values.items())


def _head_range(ev, hr, heads):
    if hr is None:
        return None
    lo, hi = ev.eval(hr.lo), ev.eval(hr.hi)
    if not 0 <= lo < hi <= (heads or 0):
        raise ConstraintError(f"head range {lo}..{hi} must satisfy 0 <= lo < hi <= heads "
                              f"({heads})", hr.span)
    return (lo, hi)


def _eval_static(checked, ev, env):
    """Evaluate static lets and requires in source order, naming the values a failure saw."""
    static_lets = [let for let in checked.lets if let.value.ty.static]
    items = sorted(static_lets + list(checked.requires),
                   key=lambda s: (s.span.line, s.span.col))
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
    """Names a require reads, in order (a called function's arguments, not its body)."""
    return [n.id for n in names(e)]
