"""Receptive-field and cost analysis of a bound pattern, stacked over layers.

The attention graph has an edge q -> k when query q attends key k (directly, or through a
summary token whose region holds k). After l layers, query q has seen every token reachable
from q in at most l hops (its own token counts at hop 0, the residual stream).

Nothing N x N is materialised: the mask is decomposed exactly (blocks.py) into FULL
rectangles and small dense tiles, and one hop of a set of queries costs O(N + rectangles +
tile entries), done for many queries at once with torch.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from attndsl.analysis.blocks import Decomposition, DiagLeaves, decompose
from attndsl.analysis.formulas import growth_class, nnz_formula
from attndsl.errors import InputError, ParameterError, UnsupportedError
from attndsl.semantics.bind import BoundPattern
from attndsl.semantics.evaluate import unravel
from attndsl.semantics.inputs import declared, validate
from attndsl.semantics.masks import summary_masks, token_mask

ALL_QUERIES_LIMIT = 1024  # above this, statistics over all queries use a sample
SAMPLE = 16
SAMPLE_LIMIT = 1 << 16  # above this, only the chosen query is followed
DENSE_LIMIT = 1 << 24  # graphs up to this many (query, key) pairs step by dense products


# ------------------------------------------------------------------ results


@dataclass(frozen=True)
class LayerStats:
    layer: int
    reach: int  # tokens reachable from the chosen query within `layer` hops
    reach_fraction: float  # of the tokens full attention would reach
    continuous: bool  # the reached keys form one interval (1-D spaces)
    min_reach: int  # over all (or sampled) queries
    mean_reach: float
    max_reach: int
    covered_queries: int  # queries that reach all their full-attention tokens


@dataclass(frozen=True)
class Analysis:
    """A frozen, JSON-ready summary; `to_json()` gives the documented schema."""

    pattern: str
    params: dict
    query_shape: tuple
    key_shape: tuple
    query: int
    causal: bool
    layers: tuple[LayerStats, ...]
    full_coverage_layers: int | None
    coverage_checked_layers: int
    diameter: int | None  # longest shortest path among reachable pairs (evaluated queries)
    complete: bool
    never_reached: tuple[int, ...]
    never_reached_count: int
    queries: str  # "all" or "sampled (n)"
    nnz: int
    density: float
    heads: int
    head_dim: int
    flops_forward: float
    flops_backward: float
    block_table_bytes: int
    formula_nnz: str | None
    formula_density: str | None
    formula_verified: bool | None
    asymptotic: str
    method: str
    notes: tuple[str, ...]
    seconds: float
    reach_sets: tuple = field(default=(), repr=False, compare=False)

    def to_json(self) -> dict:
        return {
            "schema": "attndsl.analysis/1",
            "pattern": self.pattern,
            "params": {k: list(v) if isinstance(v, tuple) else v for k, v in self.params.items()},
            "query_shape": list(self.query_shape),
            "key_shape": list(self.key_shape),
            "query": self.query,
            "causal": self.causal,
            "layers": [{"layer": s.layer, "reach": s.reach,
                        "reach_fraction": s.reach_fraction, "continuous": s.continuous,
                        "min_reach": s.min_reach, "mean_reach": s.mean_reach,
                        "max_reach": s.max_reach, "covered_queries": s.covered_queries}
                       for s in self.layers],
            "full_coverage_layers": self.full_coverage_layers,
            "coverage_checked_layers": self.coverage_checked_layers,
            "diameter": self.diameter,
            "complete": self.complete,
            "never_reached": list(self.never_reached),
            "never_reached_count": self.never_reached_count,
            "queries": self.queries,
            "nnz": self.nnz,
            "density": self.density,
            "heads": self.heads,
            "head_dim": self.head_dim,
            "flops_forward": self.flops_forward,
            "flops_backward": self.flops_backward,
            "block_table_bytes": self.block_table_bytes,
            "formula_nnz": self.formula_nnz,
            "formula_density": self.formula_density,
            "formula_verified": self.formula_verified,
            "asymptotic": self.asymptotic,
            "method": self.method,
            "notes": list(self.notes),
            "seconds": self.seconds,
        }


# ------------------------------------------------------------------ the graph


class Graph:
    """One hop of many query sets at once, from an exact decomposition of the mask."""

    def __init__(self, nq: int, nk: int, parts: list[Decomposition], summaries=()):
        self.nq, self.nk = nq, nk
        self.diag = DiagLeaves.concat([p.diag for p in parts])
        self._dq0, self._dq1 = torch.as_tensor(self.diag.q0), torch.as_tensor(self.diag.q1)
        full = [p.full for p in parts if len(p.full)]
        self.full = torch.as_tensor(np.concatenate(full)) if full else torch.zeros(
            (0, 4), dtype=torch.int64)
        self._full_np = self.full.numpy()
        self.tiles = []
        for p in parts:
            if len(p.tiles):
                starts = torch.as_tensor(p.tiles)
                masks = torch.as_tensor(p.tile_masks)
                t = p.tile
                r = torch.arange(t)
                qi = (starts[:, 0:1] + r).clamp(max=nq - 1)  # [T, t]
                ki = starts[:, 1:2] + r
                mf = masks.to(torch.float32) * (ki < nk).view(-1, 1, t)  # drop cols >= Nk
                self.tiles.append((starts, masks, t, qi, ki.clamp(max=nk - 1), mf))
        # summary tokens: q -> summary (attend [Nq, R]) -> keys of its region (member [R, Nk])
        self.summaries = [(a.to(torch.float32), m.to(torch.float32)) for a, m in summaries]
        # small graphs: one dense float matrix, so many queries step by one BLAS product
        self.dense = None
        if nq * nk <= DENSE_LIMIT:
            rows = torch.zeros(nq, nk, dtype=torch.bool)
            for p in parts:
                p.paint(rows, 0)
            a = rows.to(torch.float32)
            for att, mem in self.summaries:
                a = torch.maximum(a, ((att @ mem) > 0).to(torch.float32))
            self.dense = a

    def step(self, R: torch.Tensor) -> torch.Tensor:
        """Keys attended by any query in each row of R (bool [Q, Nq]) -> bool [Q, Nk]."""
        if self.dense is not None:
            return (R.to(torch.float32) @ self.dense) > 0
        if R.shape[0] <= 32:  # few sets: one at a time on 1-D numpy arrays is fastest
            return torch.stack([torch.from_numpy(self.step1(r.numpy())) for r in R])
        return self._step_batch(R)

    def step1(self, S: np.ndarray) -> np.ndarray:
        """One set of queries (bool [Nq]) -> the keys they attend (bool [Nk])."""
        nq, nk = self.nq, self.nk
        P = np.zeros(nq + 1, dtype=np.int64)
        np.cumsum(S, out=P[1:])
        diff = np.zeros(nk + 2, dtype=np.int64)
        if len(self.full):
            f = self._full_np
            hit = (P[f[:, 1] + 1] - P[f[:, 0]]) > 0
            diff += np.bincount(f[hit, 2], minlength=nk + 2)
            diff -= np.bincount(f[hit, 3] + 1, minlength=nk + 2)
        if len(self.diag):
            d = self.diag
            idx = np.arange(nq)
            last = np.maximum.accumulate(np.where(S, idx, -1))
            first = np.minimum.accumulate(np.where(S, idx, nq)[::-1])[::-1]
            s_, e_, hit = d.reached(first[d.q0], last[d.q1])
            diff += np.bincount(s_[hit], minlength=nk + 2)
            diff -= np.bincount(e_[hit] + 1, minlength=nk + 2)
        keys = np.cumsum(diff)[:nk] > 0
        for starts, _masks, t, qi, ki, mf in self.tiles:
            q0 = starts[:, 0].numpy()
            live = np.nonzero((P[np.minimum(q0 + t, nq)] - P[q0]) > 0)[0]
            if not len(live):
                continue
            rows = torch.from_numpy(S[qi[live].numpy()].astype(np.float32))  # [T', t]
            got = torch.einsum("ti,tij->tj", rows, mf[live]) > 0
            kk = ki[live].numpy()[got.numpy()]
            keys[kk] = True
        if self.summaries:
            r = torch.from_numpy(S).to(torch.float32).view(1, -1)
            for att, mem in self.summaries:
                via = (r @ att) > 0
                keys |= (((via.to(torch.float32) @ mem) > 0)[0]).numpy()
        return keys

    def _step_batch(self, R: torch.Tensor) -> torch.Tensor:
        Q = R.shape[0]
        out = torch.zeros(Q, self.nk + 1, dtype=torch.int32)
        P = torch.zeros(Q, self.nq + 1, dtype=torch.int32)
        torch.cumsum(R, dim=1, dtype=torch.int32, out=P[:, 1:])
        if len(self.full):
            f = self.full
            hit = ((P[:, f[:, 1] + 1] - P[:, f[:, 0]]) > 0).to(torch.int32)  # [Q, F]
            out.index_add_(1, f[:, 2], hit)
            out.index_add_(1, f[:, 3] + 1, -hit)
        acc = torch.zeros(Q, self.nk, dtype=torch.int32)
        for starts, _masks, t, qi, ki, mf in self.tiles:
            # only tiles whose query rows meet R matter
            q0 = starts[:, 0]
            live = ((P[:, (q0 + t).clamp(max=self.nq)] - P[:, q0]) > 0).any(dim=0)
            live = live.nonzero().view(-1)
            step = max(1, (1 << 22) // max(1, Q * t * t))
            for t0 in range(0, len(live), step):
                sel = live[t0:t0 + step]
                sub = R[:, qi[sel]].to(torch.float32)  # [Q, T', t]
                got = torch.einsum("qti,tij->qtj", sub, mf[sel])
                acc.index_add_(1, ki[sel].reshape(-1), got.reshape(Q, -1).to(torch.int32))
        if len(self.diag):
            idx = torch.arange(self.nq)
            last = torch.cummax(torch.where(R, idx, -1), dim=1).values  # last member <= i
            first = torch.cummin(torch.where(R, idx, self.nq).flip(1), dim=1).values.flip(1)
            s_, e_, hit = self.diag.reached(first[:, self._dq0], last[:, self._dq1])
            rows = torch.arange(Q).view(-1, 1).expand_as(s_)
            flat = out.view(-1)
            w = self.nk + 1
            flat.index_add_(0, (rows * w + s_.clamp(0, self.nk))[hit],
                            torch.ones(int(hit.sum()), dtype=torch.int32))
            flat.index_add_(0, (rows * w + (e_ + 1).clamp(0, self.nk))[hit],
                            -torch.ones(int(hit.sum()), dtype=torch.int32))
        keys = (torch.cumsum(out, dim=1)[:, :self.nk] > 0) | (acc > 0)
        for att, mem in self.summaries:
            via = (R.to(torch.float32) @ att) > 0
            keys |= ((via.to(torch.float32) @ mem) > 0)
        return keys


def _union_parts(bp, run, tile):
    heads = range(bp.heads) if bp.head_dependent and bp.heads else [None]
    return [decompose(bp, tile=tile, head=h, run=run) for h in heads]


def build_graph(bp: BoundPattern, inputs: dict, content=None, tile: int = 16):
    """The exact attention graph of a pattern (union over heads and averaged parts)."""
    subs = bp.average or [bp]
    parts, summaries = [], []
    for sub in subs:
        run = validate(sub, declared(sub, inputs), for_mask=True, content=content)
        parts += _union_parts(sub, run, tile)
        for bs in sub.summaries:
            mem, att = summary_masks(sub, bs, run, torch.device("cpu"),
                                     sub.heads if sub.head_dependent else None)
            while att.dim() > 2:
                att = att.any(dim=0)
            summaries.append((att, mem))
    return Graph(bp.nq, bp.nk, parts, summaries), parts, summaries


# ------------------------------------------------------------------ analysis


def _default_query(bp: BoundPattern) -> int:
    shape = bp.qshape
    if len(shape) == 1:
        return shape[0] - 1
    idx = 0
    for s in shape:
        idx = idx * s + s // 2
    return idx


def _is_causal(parts, nq, nk) -> bool:
    """Every attended pair has k <= q."""
    if nq != nk:
        return False
    for p in parts:
        if p.diag.attends_above_diagonal():
            return False
        if len(p.full) and bool((p.full[:, 3] > p.full[:, 0]).any()):
            return False
        if len(p.tiles):
            t = p.tile
            r = np.arange(t)
            qq = p.tiles[:, 0, None, None] + r[None, :, None]
            kk = p.tiles[:, 1, None, None] + r[None, None, :]
            if bool((p.tile_masks & (kk > qq)).any()):
                return False
    return True


def _targets(causal: bool, queries: torch.Tensor, nk: int) -> torch.Tensor:
    """What full attention reaches: [Q, Nk] bool."""
    if causal:
        return torch.arange(nk).view(1, -1) <= queries.view(-1, 1)
    return torch.ones(len(queries), nk, dtype=torch.bool)


class _Progress:
    def __init__(self, total: int, enabled: bool, label: str):
        self.total, self.enabled, self.label = total, enabled, label
        self.t0 = time.perf_counter()

    def update(self, i: int) -> None:
        if not self.enabled:
            return
        width = 30
        done = int(width * i / max(1, self.total))
        sys.stderr.write(f"\r{self.label} [{'#' * done}{'.' * (width - done)}] {i}/{self.total}"
                         f" {time.perf_counter() - self.t0:5.1f}s")
        sys.stderr.flush()

    def stage(self, what: str) -> None:
        """Name a step that comes before the layers (the decomposition of a large irregular
        mask can take seconds), so that the bar does not sit silent."""
        if self.enabled:
            sys.stderr.write(f"\r{self.label}: {what} ({time.perf_counter() - self.t0:.1f}s)")
            sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            sys.stderr.write("\n")


def analyze(bp: BoundPattern, layers: int = 4, query=None, head_dim: int = 64,
            inputs: dict | None = None, q=None, k=None, progress: bool | None = None,
            coverage_limit: int = 64, keep_sets: bool = False, table_bytes: int = -1
            ) -> Analysis:
    """Receptive field, coverage and cost of `bp` stacked `layers` times; `table_bytes` is
    the compiled plan's block-table size (codegen.plan.tables.plan_stats), reported as is."""
    t0 = time.perf_counter()
    inputs = dict(inputs or {})
    if not isinstance(layers, int) or layers < 1:
        raise ParameterError(f"layers must be a positive integer, not {layers!r}")
    notes = []
    content = None
    if bp.content_dependent:
        if q is None or k is None:
            raise InputError(f"pattern '{bp.name}' depends on q and k: analyze(q=..., k=...)")
        rep = q.shape[1] // k.shape[1]
        content = (q, k.repeat_interleave(rep, dim=1))
        notes.append("the mask depends on q and k: this analysis holds for the given tensors "
                     "(union over batch and heads)")
    if bp.head_dependent:
        notes.append(f"per-head rules: a token counts as reached when any of the {bp.heads} "
                     "heads reaches it")
    if bp.channel:
        notes.append("channel tokens: the tokens are the channels of a group; every channel "
                     "token mixes all spatial positions, so one layer is global over space")
    if bp.route is not None:
        _, top, shared = bp.route
        notes.append(f"head routing: {shared} shared heads always run and each token routes to "
                     f"{top} more; routing gates outputs but not which keys a running head "
                     "sees" + (", and with no shared head a token may skip a layer's "
                               "attention entirely" if shared == 0 else ""))
    if bp.average:
        notes.append("averaged factorizations: the graph is the union of the parts")
    if bp.summaries or any(s.summaries for s in bp.average):
        notes.append("summary tokens: attending a summary of region R reaches every token of R "
                     "in the same layer")
    nq, nk = bp.nq, bp.nk
    checked = max(layers, coverage_limit) if nq == nk else 1
    bar = _Progress(checked, bool(progress if progress is not None else (
        nq > 1 << 16 and sys.stderr.isatty())), f"analyzing {bp.name}")
    bar.stage("decomposing the mask")
    graph, parts, summaries = build_graph(bp, inputs, content)
    causal = _is_causal(parts, nq, nk) and all(_summary_causal(a, m) for a, m in summaries)
    if query is None:
        query = _default_query(bp)
    query = _query_index(bp, query)
    if nq <= ALL_QUERIES_LIMIT:
        qs = torch.arange(nq)
        queries = "all"
    elif nq > SAMPLE_LIMIT:
        qs = torch.tensor([query])
        queries = "the chosen query only"
        notes.append(f"above {SAMPLE_LIMIT:,} tokens, min/mean/max reach and coverage refer "
                     "to the chosen query only, and coverage is searched within the requested "
                     "layers")
        coverage_limit = layers
    else:
        qs = torch.unique(torch.cat([torch.linspace(0, nq - 1, SAMPLE).round().long(),
                                     torch.tensor([query])]))
        queries = f"sampled ({len(qs)} evenly spaced)"
        notes.append(f"min/mean/max reach and coverage use {len(qs)} evenly spaced queries "
                     f"(exact over all queries up to {ALL_QUERIES_LIMIT} tokens)")
    if nq != nk:
        notes.append("cross-attention: one layer only maps queries to keys; deeper layers "
                     "assume the key space is the previous layer's query space only when the "
                     "spaces agree, so only layer 1 is meaningful here")
    qpos = int((qs == query).nonzero()[0, 0])
    R = torch.zeros(len(qs), nq, dtype=torch.bool)
    R[torch.arange(len(qs)), qs] = True
    target = _targets(causal, qs, nk)
    tsize = target.sum(dim=1)
    stats = []
    sets = []
    coverage = None
    checked = bar.total = max(layers, coverage_limit) if nq == nk else 1
    prev = R
    fixpoint = None
    prev_cnt = np.ones(len(qs), dtype=np.int64)
    tsz = tsize.numpy()
    for layer in range(1, checked + 1):
        reached = graph.step(prev)
        if nq == nk:
            reached = reached | prev
        rn = reached.numpy()
        cnt = np.count_nonzero(rn, axis=1)
        # reach only grows and stays inside the full-attention field (or is the whole
        # key set), so counts decide coverage and the fixpoint
        cover = cnt >= tsz if causal or nq != nk else cnt == nk
        if coverage is None and bool(cover.all()):
            coverage = layer
        if layer <= layers:
            row = rn[qpos]
            n_row = int(cnt[qpos])
            first = int(np.argmax(row))
            last = nk - 1 - int(np.argmax(row[::-1]))
            cont = n_row == 0 or last - first + 1 == n_row
            stats.append(LayerStats(layer, n_row, n_row / max(1, int(tsz[qpos])), cont,
                                    int(cnt.min()), float(cnt.mean()), int(cnt.max()),
                                    int(cover.sum())))
            if keep_sets:
                sets.append(reached[qpos].clone())
        bar.update(layer)
        if nq == nk and np.array_equal(cnt, prev_cnt):
            fixpoint = layer
            break
        prev_cnt = cnt
        prev = reached
        if coverage is not None and layer >= layers:
            break
    bar.close()
    final = prev if fixpoint is None else reached
    missing = (target & ~final[: len(qs)])
    never = missing[qpos].nonzero().view(-1)
    complete = coverage is not None or (fixpoint is not None and not bool(missing.any()))
    if coverage is None and fixpoint is None:
        notes.append(f"coverage not reached within {checked} layers and the reach was still "
                     "growing; raise coverage_limit for a longer search")
    # when the query set converged before `layers`, later layers equal the last one
    while len(stats) < layers and stats:
        last = stats[-1]
        stats.append(LayerStats(len(stats) + 1, last.reach, last.reach_fraction,
                                last.continuous, last.min_reach, last.mean_reach,
                                last.max_reach, last.covered_queries))
        if keep_sets:
            sets.append(sets[-1])
    nnz_heads = sum(_nnz(p) for p in parts)
    nnz_union = _nnz_union(parts, nq, nk)
    nsum = sum(int(a.sum()) for a, _ in summaries)
    heads = bp.heads or 1
    per_head = nnz_heads if bp.head_dependent else nnz_union * heads
    flops = 4.0 * (per_head + nsum * heads) * head_dim
    formula, formula_density, verified = _formula(bp, nnz_union)
    asym = growth_class(bp)
    nfull, ntiles = sum(len(p.full) for p in parts), sum(len(p.tiles) for p in parts)
    method = (f"exact decomposition: {nfull:,} FULL rectangle{'s' if nfull != 1 else ''} "
              f"proved by interval reasoning, {ntiles:,} dense {parts[0].tile}x"
              f"{parts[0].tile} tile{'s' if ntiles != 1 else ''} where reasoning could not "
              "decide")
    return Analysis(
        bp.name, dict(bp.values), tuple(bp.qshape), tuple(bp.kshape), query, causal,
        tuple(stats), coverage, checked,
        coverage if coverage is not None else (fixpoint - 1 if fixpoint else None), complete,
        tuple(int(x) for x in never[:64]),
        int(len(never)), queries, nnz_union, nnz_union / (nq * nk), heads, head_dim, flops,
        2.5 * flops, table_bytes, formula, formula_density, verified,
        asym, method, tuple(notes), time.perf_counter() - t0, tuple(sets))


def _summary_causal(att, mem) -> bool:
    """Each query attends only summaries whose keys are all <= the query."""
    if att.shape[0] != mem.shape[1]:
        return False
    last = torch.where(mem.any(dim=1), mem.shape[1] - 1 - mem.flip(1).to(torch.int64).argmax(
        dim=1), torch.full((mem.shape[0],), -1))
    q = torch.arange(att.shape[0]).view(-1, 1)
    return not bool((att & (last.view(1, -1) > q)).any())


def _query_index(bp: BoundPattern, query) -> int:
    shape = bp.qshape
    if isinstance(query, tuple | list):
        if len(query) != len(shape) or any(not 0 <= c < s for c, s in zip(query, shape)):
            raise ParameterError(f"query {tuple(query)} is not a coordinate of the "
                                 f"{tuple(shape)} space")
        idx = 0
        for c, s in zip(query, shape):
            idx = idx * s + c
        return idx
    if not isinstance(query, int) or not 0 <= query < math.prod(shape):
        raise ParameterError(f"query must be a token index in 0..{math.prod(shape) - 1} or a "
                             f"coordinate, not {query!r}")
    return query


def _nnz(p: Decomposition) -> int:
    return p.nnz


def _nnz_union(parts, nq, nk) -> int:
    if len(parts) == 1:
        return parts[0].nnz
    total = 0
    step = max(1, (1 << 24) // max(1, nk))
    for q0 in range(0, nq, step):
        rows = torch.zeros(min(step, nq - q0), nk, dtype=torch.bool)
        for p in parts:
            p.paint(rows, q0)
        total += int(rows.sum())
    return total


# ------------------------------------------------------------------ formulas


def _formula(bp: BoundPattern, exact_nnz: int):
    f = nnz_formula(bp)
    if f is None:
        return None, None, None
    expr, value, density = f
    return str(expr), str(density), value == exact_nnz


# ------------------------------------------------------------------ paths


@dataclass(frozen=True)
class Path:
    """A shortest hop path: path[0] attends path[1] attends ... path[-1]."""

    source: int
    target: int
    tokens: tuple[int, ...] | None  # None: target never reached
    hops: int | None
    engine: str

    def describe(self, shape: tuple[int, ...]) -> str:
        """The path as text; grid tokens also show their coordinates in `shape`."""
        if self.tokens is None:
            return f"token {self.target} is never reached from query {self.source}"
        coords = [coords_text(shape, t) for t in self.tokens]
        return " -> ".join(coords) + f"  ({self.hops} hop{'s' if self.hops != 1 else ''})"


def coords_text(shape: tuple[int, ...], t: int) -> str:
    """'t' for 1-D spaces, 't(y,x)' for grids."""
    if len(shape) == 1:
        return str(t)
    return str(t) + "(" + ",".join(map(str, unravel(t, shape))) + ")"


def _column(bp: BoundPattern, graph: Graph, key: int, inputs, content) -> torch.Tensor:
    """Queries that attend `key` directly or through a summary token: bool [Nq]."""
    col = torch.zeros(bp.nq, dtype=torch.bool)
    for sub in bp.average or [bp]:
        run = validate(sub, declared(sub, inputs), for_mask=True, content=content)
        heads = range(sub.heads) if sub.head_dependent and sub.heads else [None]
        for h in heads:
            val = token_mask(sub, run, torch.arange(sub.nq).view(-1, 1),
                             torch.tensor([[key]]), None if h is None else torch.tensor(h),
                             dims=2)
            col |= val.expand(sub.nq, 1)[:, 0]
    for att, mem in graph.summaries:
        col |= (att @ mem[:, key:key + 1])[:, 0] > 0
    return col


def shortest_path(bp: BoundPattern, source, target, inputs: dict | None = None, q=None, k=None,
                  max_hops: int = 4096) -> Path:
    """The shortest chain of 'attends' from query `source` to token `target`."""
    import networkx as nx
    inputs = dict(inputs or {})
    src, dst = _query_index(bp, source), _query_index(bp, target)
    if bp.nq != bp.nk:
        raise UnsupportedError("paths need a pattern whose queries and keys are the same "
                               "tokens")
    content = None
    if bp.content_dependent:
        if q is None or k is None:
            raise InputError(f"pattern '{bp.name}' depends on q and k: pass q=..., k=...")
        content = (q, k.repeat_interleave(q.shape[1] // k.shape[1], dim=1))
    graph, parts, summaries = build_graph(bp, inputs, content)
    nnz = sum(p.nnz for p in parts) + sum(int(a.sum()) * m.shape[1] for a, m in summaries)
    if nnz <= 1_000_000 and bp.nq * bp.nk <= 1 << 24:
        g = nx.DiGraph()
        g.add_nodes_from(range(bp.nq))
        for p in parts:
            m = p.dense()
            qq, kk = np.nonzero(m)
            g.add_edges_from(zip(qq.tolist(), kk.tolist()))
        for att, mem in summaries:
            via = (att.to(torch.float32) @ mem.to(torch.float32)) > 0
            qq, kk = via.nonzero(as_tuple=True)
            g.add_edges_from(zip(qq.tolist(), kk.tolist()))
        g.remove_edges_from(nx.selfloop_edges(g))
        try:
            tokens = nx.shortest_path(g, src, dst)
        except nx.NetworkXNoPath:
            return Path(src, dst, None, None, "networkx")
        return Path(src, dst, tuple(tokens), len(tokens) - 1, "networkx")
    # large graphs: layered search with bit sets, then walk back through the layers
    R = torch.zeros(1, bp.nq, dtype=torch.bool)
    R[0, src] = True
    layers = [R[0].clone()]
    while not bool(R[0, dst]):
        nxt = R | graph.step(R)
        if torch.equal(nxt, R) or len(layers) > max_hops:
            return Path(src, dst, None, None, "bitset search")
        R = nxt
        layers.append(R[0].clone())
    path = [dst]
    for h in range(len(layers) - 1, 0, -1):
        col = _column(bp, graph, path[-1], inputs, content)
        cand = (layers[h - 1] & col).nonzero().view(-1)
        path.append(int(cand[-1]))
    path.reverse()
    return Path(src, dst, tuple(path), len(path) - 1, "bitset search")


__all__ = ["Analysis", "LayerStats", "Path", "analyze", "build_graph", "shortest_path"]
