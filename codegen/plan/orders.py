"""Token orders: the permutation of a space's tokens that the compiled kernels see.

1D spaces keep row-major order. 2D and 3D spaces are cut into tiles so that a block of
tokens is a compact patch (and tokens of one dilation group stay together); the planner
(tables.py) picks among these orders by measured cost. Users never see the permutation:
the backends gather into it and scatter back.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np

from attndsl.lang import ir
from attndsl.lang.walk import walk
from attndsl.semantics.bind import BoundPattern
from attndsl.semantics.evaluate import Evaluator


@dataclass(frozen=True, eq=False)
class TokenOrder:
    """A permutation of a space's tokens: perm[position] = row-major index, -1 = padding.

    A row-major range keeps `tokens` None and only its `count`: decoding one token against
    a million keys never builds (nor compares) a million-entry permutation; `perm` is made
    on first use by the backends that gather with it.

    The call's tensor holds the space's tokens in row-major order (row = token - start), or,
    for a `compact` order, exactly the order's tokens in position order, padding skipped:
    a subset of the space, such as one rank's blocks under context parallelism."""

    shape: tuple[int, ...]
    tile: tuple[int, ...]
    dilation: tuple[int, ...]
    tokens: np.ndarray | None
    identity: bool = False  # perm is start + arange(len): the kernels skip the gathers
    tile_block: int = 0  # tokens per block this order was made for
    start: int = 0  # the first token of a range of queries (decoding, chunked prefill)
    count: int = -1  # the length of a row-major range (tokens None)
    compact: bool = False  # the tensor holds the order's tokens in position order
    phase: tuple[int, ...] = ()  # tiles start at -phase[a] on axis a (() or 0s: at 0)

    def __post_init__(self):
        if self.tokens is None:
            object.__setattr__(self, "identity", True)
        else:
            object.__setattr__(self, "count", len(self.tokens))
            object.__setattr__(self, "identity", bool(
                (self.tokens == self.start + np.arange(len(self.tokens))).all()))

    @staticmethod
    def rows(shape: tuple[int, ...], block: int, start: int = 0, count: int | None = None
             ) -> TokenOrder:
        """Row-major tokens start .. start + count - 1 (all by default)."""
        count = math.prod(shape) - start if count is None else count
        return TokenOrder(tuple(shape), (block,), (1,) * len(shape), None, tile_block=block,
                          start=start, count=count)

    @functools.cached_property
    def perm(self) -> np.ndarray:
        if self.tokens is not None:
            return self.tokens
        return np.arange(self.start, self.start + self.count, dtype=np.int64)

    @property
    def length(self) -> int:
        return self.count

    def inverse(self) -> np.ndarray:
        """position of every row of the call's tensor in this order (the scatter back): of
        every row-major token, or of every token a compact order holds."""
        pos = np.nonzero(self.perm >= 0)[0]
        if self.compact:
            return pos
        inv = np.zeros(math.prod(self.shape), dtype=np.int64)
        inv[self.perm[pos]] = pos
        return inv

    def source_rows(self) -> np.ndarray:
        """The row of the call's tensor each position reads (the gather), -1 for padding."""
        valid = self.perm >= 0
        if self.compact:
            return np.where(valid, np.cumsum(valid) - 1, -1)
        return np.where(valid, self.perm - self.start, -1)

    def held_tokens(self) -> np.ndarray:
        """The row-major token each row of the call's tensor holds."""
        if self.compact:
            return self.perm[self.perm >= 0]
        n = self.count if self.identity else int((self.perm >= 0).sum())
        return np.arange(self.start, self.start + n)

    def describe(self) -> str:
        if self.identity:
            whole = self.start == 0 and self.length == math.prod(self.shape)
            return "row-major" if whole else (
                f"row-major, rows {self.start}..{self.start + self.length - 1}")
        t = "x".join(map(str, self.tile))
        d = "" if all(x == 1 for x in self.dilation) else (
            ", dilation groups " + "x".join(map(str, self.dilation)))
        held = f", {int((self.perm >= 0).sum())} tokens held" if self.compact else ""
        kind = "row-major blocks" if len(self.shape) == 1 else f"tiles {t}"
        if any(self.phase):
            kind += " from " + "x".join(str(-p) for p in self.phase)
        return f"{kind}{d}{held}"


def tile_shape(shape: tuple[int, ...], block: int) -> tuple[int, ...]:
    """Power-of-two tile dims with product `block` (or the whole space), roughly cubic."""
    t = [1] * len(shape)
    cap = [1 << max(0, math.ceil(math.log2(s))) for s in shape]
    while math.prod(t) < block:
        grow = [a for a in range(len(t)) if t[a] < cap[a]]
        if not grow:
            break
        a = min(grow, key=lambda a: (t[a], -a))
        t[a] *= 2
    return tuple(t)


def make_order(shape: tuple[int, ...], block: int, dilation: tuple[int, ...] | None = None,
               tile: tuple[int, ...] | None = None, phase: tuple[int, ...] | None = None
               ) -> TokenOrder:
    """Row-major for 1D; for 2D/3D, dilation groups one after another, each cut into tiles
    of `block` tokens (padded to whole tiles), tiles row-major, tokens row-major inside.

    `phase` shifts the tile grid: on axis a the first tile holds tile[a] - phase[a] tokens
    (the rest is padding), so that key tiles can line up with the edges of the windows of
    query tiles (a 13-wide window of an 8-wide tile spans 20 tokens from 6 before it:
    exactly five 4-wide tiles from -2, six from 0)."""
    n = len(shape)
    if n == 1:
        return TokenOrder(tuple(shape), (block,), (1,), np.arange(shape[0], dtype=np.int64),
                          tile_block=block)
    dil = tuple(dilation or (1,) * n)
    sub = tuple(-(-s // d) for s, d in zip(shape, dil))  # largest dilation-group extent
    tile = tile or tile_shape(sub, block)
    ph = tuple(phase or (0,) * n)
    parts = []
    strides = np.cumprod((1,) + tuple(reversed(shape)))[:-1][::-1]
    for g in np.ndindex(*dil):
        ext = [len(range(gi, s, d)) for gi, s, d in zip(g, shape, dil)]
        padded = [-(-(e + p) // t) * t for e, t, p in zip(ext, tile, ph)]
        # coordinates of the padded group grid in tile order
        grids = np.meshgrid(*[np.arange(p) for p in padded], indexing="ij")
        c = [x.reshape(-1) for x in grids]
        tid = np.zeros_like(c[0])
        inner = np.zeros_like(c[0])
        for a in range(n):
            tid = tid * (padded[a] // tile[a]) + c[a] // tile[a]
            inner = inner * tile[a] + c[a] % tile[a]
        order = np.lexsort((inner, tid))
        c = [x[order] - p for x, p in zip(c, ph)]
        ok = np.ones(len(order), dtype=bool)
        flat = np.zeros(len(order), dtype=np.int64)
        for a in range(n):
            ok &= (c[a] >= 0) & (c[a] < ext[a])
            flat += (g[a] + c[a] * dil[a]) * int(strides[a])
        parts.append(np.where(ok, flat, -1))
    return TokenOrder(tuple(shape), tile, dil, np.concatenate(parts), tile_block=block,
                      phase=ph if any(ph) else ())


def padded_perm(order: TokenOrder, block: int) -> np.ndarray:
    """[blocks, block]: the row-major token at each position, -1 for padding (a whole last
    block, and the order's own padding)."""
    nb = -(-order.length // block)
    perm = np.full(nb * block, -1, dtype=np.int64)
    perm[:order.length] = order.perm
    return perm.reshape(nb, block)


def tilings(shape, block):
    """Every power-of-two tile shape with `block` tokens that fits the space."""
    caps = [max(0, math.ceil(math.log2(s))) for s in shape]
    total = int(math.log2(block))
    out = []

    def rec(a, left, acc):
        if a == len(shape) - 1:
            if left <= caps[a]:
                out.append(tuple(1 << e for e in acc + [left]))
            return
        for e in range(min(left, caps[a]) + 1):
            rec(a + 1, left - e, acc + [e])
    rec(0, total, [])
    return out or [tile_shape(shape, block)]


def order_with_tile(shape, tile, dilation, phase=None):
    return make_order(shape, math.prod(tile), dilation, tile=tile, phase=phase)


def neighborhood_dilation(bp: BoundPattern) -> tuple[int, ...] | None:
    """The per-axis dilation of the pattern's `neighborhood(...)` call (the prelude's
    neighbourhood rule, which the IR keeps as a call), if it has one with a static value."""
    found = set()
    for owner, rule, _ in bp.rules:
        for x in walk(rule.expr):
            if not (isinstance(x, ir.Call) and x.ref == "fn" and x.func == "neighborhood"
                    and "dilation" in x.params):
                continue
            arg = x.args[x.params.index("dilation")]
            if not arg.ty.static:
                return None
            d = Evaluator(dict(owner.env), {}).eval(arg)
            d = (d,) * len(bp.qshape) if isinstance(d, int) else tuple(d)
            found.add(d)
    if len(found) != 1:
        return None
    d = found.pop()
    if len(d) != len(bp.qshape) or any(not isinstance(x, int) or x < 1 for x in d):
        return None
    return d
