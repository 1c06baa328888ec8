"""Pattern families: a checked pattern with some parameters given, the sizes of its spaces
left to each call. `compile("sliding.attn", "sliding_window", window=256)` gives one op for
every length: the size parameters (those a `space` statement names) are read from the
tensors, checked against the pattern's `require`s, and bound through `caches.BIND`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from attndsl.errors import AttnError, InputError, ParameterError
from attndsl.lang import ir
from attndsl.semantics.bind import BoundPattern, bind, bind_cached
from attndsl.semantics.evaluate import Evaluator


def _space_params(checked: ir.CheckedPattern, which: str) -> tuple[str | None, ...] | None:
    """Per axis of the query (or key) space: the parameter that alone gives its size, or
    None. Spaces taken from an averaged or included pattern map through its arguments."""
    sp = getattr(checked, which)
    if sp is not None and not sp.inherited:
        return tuple(s.id if isinstance(s, ir.Name) and s.ref == "param" else None
                     for s in sp.sizes)
    refs = [r for _, r in checked.average] + list(checked.includes)
    for ref in refs:
        if ref.checked is None:
            continue
        inner = _space_params(ref.checked, which)
        if inner is None:
            continue
        names = [p.name for p, _ in ref.checked.params]
        args = dict(zip(names, ref.args))
        args.update({kw.name: kw.value for kw in ref.kwargs})
        out = []
        for p in inner:
            a = args.get(p) if p is not None else None
            out.append(a.id if isinstance(a, ir.Name) and a.ref == "param" else None)
        return tuple(out)
    return None


def size_params(checked: ir.CheckedPattern) -> tuple[str, ...]:
    """The parameters that alone give a size of the query or key space."""
    out = []
    for axes in (_space_params(checked, "qspace") or (), _space_params(checked, "kspace")
                 or ()):
        out += [n for n in axes if n is not None and n not in out]
    return tuple(out)


@dataclass(frozen=True, eq=False)
class Family:
    """A checked pattern and the parameter values given; the size parameters not given are
    bound per call (`bind(sizes)`)."""

    checked: ir.CheckedPattern
    given: tuple  # (name, value) of the parameters given at compile time
    q_axes: tuple  # per query-space axis: its size parameter, or None
    k_axes: tuple
    shared: bool  # the query space is the key space (self-attention)

    @staticmethod
    def of(checked: ir.CheckedPattern, given: dict) -> Family:
        q = _space_params(checked, "qspace") or ()
        k = _space_params(checked, "kspace") or ()
        sp_q, sp_k = checked.qspace, checked.kspace
        shared = (sp_q is not None and sp_q is sp_k) or (sp_q is None and q == k)
        return Family(checked, tuple(given.items()), q, k, shared)

    @property
    def name(self) -> str:
        return self.checked.name

    @property
    def sizes(self) -> tuple[str, ...]:
        """The size parameters left to the call: named by a space, not given, no default."""
        given = dict(self.given)
        defaults = {p.name for p, _ in self.checked.params if p.default is not None}
        out = []
        for n in self.q_axes + self.k_axes:
            if n is not None and n not in given and n not in defaults and n not in out:
                out.append(n)
        return tuple(out)

    @property
    def fixed(self) -> bool:
        return not self.sizes

    def bind(self, sizes: dict | None = None) -> BoundPattern:
        """The bound pattern for these sizes (checked against every `require`)."""
        values = dict(self.given)
        values.update(sizes or {})
        missing = [n for n in self.sizes if n not in values]
        if missing:
            names = ", ".join(f"'{n}'" for n in missing)
            raise ParameterError(
                f"pattern '{self.name}' needs {names}: the op takes its sizes from the "
                f"tensors when called; for masks, statistics and analyses pass them, as in "
                f"{missing[0]}=...", self.checked.span)
        if not self.sizes:
            return bind(self.checked, values)
        return bind_cached(self.checked, tuple(values.items()))

    def static(self, e: ir.Expr | None):
        """The value of an expression of the given parameters (and defaults) alone, or None
        when it needs a size left to the call: what a layer can know before its first call
        (the router width of a routed pattern, its head count)."""
        if e is None:
            return None
        env = dict(self.given)
        for p, _ in self.checked.params:
            if p.name not in env and p.default is not None:
                try:
                    env[p.name] = Evaluator(env, {}).eval(p.default)
                except AttnError:
                    pass
        try:
            return Evaluator(env, {}).eval(e)
        except AttnError:
            return None

    def split(self, kwargs: dict) -> tuple[dict, dict]:
        """Keyword arguments of a call: (sizes, the rest)."""
        sizes = {n: kwargs[n] for n in self.sizes if n in kwargs}
        return sizes, {n: v for n, v in kwargs.items() if n not in sizes}

    def infer(self, q, k, sizes: dict, q_start: int | None) -> dict:
        """Size parameters from the tensors' layouts: a space of d axes reads [B, H, N, D]
        (one axis) or [B, H, *grid, D] (d axes); the key length binds a shared space when
        q holds only some queries (decoding)."""
        out = dict(sizes)
        _read(self.k_axes, k, "k", out)
        if not self.shared and q_start is None:  # else q holds only some of the queries
            _read(self.q_axes, q, "q", out)
        return out


def _read(axes, t, role: str, out: dict) -> None:
    if not axes or t is None or not hasattr(t, "dim"):
        return
    grid = t.shape[2:-1] if t.dim() >= 4 else ()
    if len(axes) > 1 and len(grid) == len(axes):
        dims = tuple(grid)
    elif len(axes) == 1 and len(grid) == 1:
        dims = (grid[0],)
    else:
        return  # a flat layout of a grid: the sizes must be given
    for n, d in zip(axes, dims):
        if n is None:
            continue
        if n in out and out[n] != d:
            raise InputError(f"{role} has {d} tokens on the axis of '{n}', but {n}={out[n]}")
        out[n] = int(d)


def flat(t, axes: int):
    """[B, H, *grid, D] -> [B, H, N, D] (a view) for a space of `axes` axes; 4-D as is."""
    if t is None or not hasattr(t, "dim") or t.dim() == 4 or axes < 2 or t.dim() != 3 + axes:
        return t
    return t.reshape(*t.shape[:2], math.prod(t.shape[2:-1]), t.shape[-1])
