"""Token orders and block tables: which (query block, key block) pairs a kernel visits.

Tables come from the typed IR, never from the N x N mask: the abstract interpreter
(attndsl/intervals.py) classifies groups of blocks top-down (a quadtree over block
indices, so the work follows the non-empty blocks), and only the block pairs it cannot
decide are refined exactly: 1D diagonals by binary search, the rest by evaluating the
predicate on that one block pair. The result is exact: a FULL pair has every (valid)
entry attended, a PARTIAL pair some but not all, and EMPTY pairs are never listed.

2D and 3D spaces are reordered so that a block is a compact tile (and tokens of one
dilation group stay together); the kernels see the permuted order, users never do.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass

import numpy as np
import torch

from attndsl import caches
from attndsl.analysis.blocks import bounds, classify_token_boxes, refine, row_major
from attndsl.analysis.difference import difference_only
from attndsl.analysis.intervals import FULL, IV, PARTIAL, TokIV
from attndsl.codegen.plan.orders import (
    TokenOrder,
    neighborhood_dilation,
    order_with_tile,
    padded_perm,
    tile_shape,
    tilings,
)
from attndsl.codegen.plan.summary import attend_counts, kept_rows, leaves, summary_csr
from attndsl.errors import EvaluationError, PairLimitError, ParameterError
from attndsl.semantics.bind import BoundPattern
from attndsl.semantics.inputs import NONE, SELECTED, UNSELECTED, RunInputs
from attndsl.semantics.masks import chunks, token_mask

PAIR_LIMIT = 1 << 26  # listed block pairs over all tables of one plan: ~70 bytes each
# while built (4.7 GB at the limit), so that a plan fits a 24 GB machine beside a model


# ------------------------------------------------------------------ token orders


# ------------------------------------------------------------------ block bounds


# ------------------------------------------------------------------ tables


@dataclass(frozen=True, eq=False)
class BlockTable:
    """One head's (or every head's) visited block pairs in CSR form: row r's FULL key
    blocks are full_idx[full_off[r]:full_off[r + 1]], increasing; PARTIAL ones likewise."""

    full_off: np.ndarray  # [rows + 1]
    full_idx: np.ndarray  # [nnz] int32
    part_off: np.ndarray
    part_idx: np.ndarray
    needed: int  # attended entries (the mask's nnz over valid tokens), except `uncounted`
    uncounted: np.ndarray | None = None  # [U, 2] PARTIAL pairs proven so, not yet counted
    row_needed: np.ndarray | None = None  # [rows] `needed` per row (None: not kept)


@dataclass(frozen=True, eq=False)
class SummaryPlan:
    """Summary tokens as extra key rows after the (padded) direct keys: which regions exist
    and the block tables of the queries that attend them."""

    rows: np.ndarray  # [R] global region index (summary offset + region) of each kept row
    offsets: tuple  # per summary: (first global index, number of regions)
    tables: tuple  # BlockTable per head table; columns are summary blocks
    transposed: tuple
    needed: int
    row_needed: np.ndarray | None = None  # [tables, query blocks] attended entries
    # (offsets, kept rows): per key block the rows with a member key in it, per query block
    # the rows a query of it attends under any head (None: a restricted plan's)
    owners: tuple | None = None
    users: tuple | None = None

    @property
    def nr(self) -> int:
        return len(self.rows)


@dataclass(frozen=True, eq=False)
class Plan:
    """Everything a kernel launch needs besides the tensors: token orders, block sizes and
    the CSR tables (see BlockTable). Frozen; hashed by identity (caches key on it)."""

    qorder: TokenOrder
    korder: TokenOrder
    block_q: int
    block_k: int
    tables: tuple[BlockTable, ...]  # one, or one per head
    transposed: tuple[BlockTable, ...]  # the same pairs, per key block
    build_seconds: float
    bound: BoundPattern | None = None  # to count proven-PARTIAL pairs on demand
    run: RunInputs = NONE  # the mask's run-time inputs the tables were built for
    summary: SummaryPlan | None = None
    orders_tried: tuple = ()  # (order, measured cost) of the orders the planner compared
    # content-dependent patterns: per head table, the pairs attended whatever the content
    # selects (every chunk_topk false); a call's tables are these and the static pairs its
    # selection keeps a key of
    unselected: tuple[BlockTable, ...] = ()
    selected: tuple[BlockTable, ...] = ()  # ... and with every selection keeping every key

    @property
    def content_dependent(self) -> bool:
        """Tables are a static superset, refined per call from q and k."""
        return self.bound is not None and self.bound.content_dependent

    @property
    def nsb(self) -> int:
        return 0 if self.summary is None else -(-self.summary.nr // self.block_k)

    @property
    def nqb(self) -> int:
        return -(-self.qorder.length // self.block_q)

    @property
    def nkb(self) -> int:
        return -(-self.korder.length // self.block_k)

    def needed(self) -> int:
        """The mask's nnz over all head tables (counting proven-PARTIAL pairs on demand)."""
        return sum(self.table_needed(h) for h in range(len(self.tables)))

    def table_needed(self, h: int) -> int:
        t = self.tables[h]
        if t.row_needed is None and (t.uncounted is None or not len(t.uncounted)):
            return t.needed  # an exported table: its total was counted when it was written
        return int(self.row_needed(h).sum())

    def row_needed(self, h: int) -> np.ndarray:
        """[query blocks] the attended entries of each query block in head table h: what
        context parallelism balances (proven-PARTIAL pairs counted on demand)."""
        return caches.NEEDED.get_or_create((self, h), lambda: self._count_rows(h))

    def row_estimate(self, h: int, budget: int) -> tuple[np.ndarray, bool]:
        """(row_needed(h), True) when counting it evaluates at most `budget` mask entries;
        else (an estimate, False): FULL pairs exact, and PARTIAL pairs counted on an evenly
        spread sample of `budget` entries, the others taking the sample's mean. Dense
        counting of a dilated pattern at 1M tokens takes minutes; its balance does not
        need it."""
        rows, todo = self._rows_todo(h)
        if todo is None or len(todo) * self.block_q * self.block_k <= budget:
            return self.row_needed(h), True
        return caches.NEEDED.get_or_create((self, h, budget),
                                           lambda: (self._sampled(h, rows, todo, budget),
                                                    False))

    def _rows_todo(self, h: int) -> tuple[np.ndarray, np.ndarray | None]:
        """(counted entries per query block, [U, 2] PARTIAL pairs still to count)."""
        t = self.tables[h]
        if t.row_needed is not None:
            return t.row_needed.astype(np.int64), t.uncounted
        # FULL pairs from the blocks' token counts; every PARTIAL pair to evaluate
        qn = (padded_perm(self.qorder, self.block_q) >= 0).sum(1)
        kn = (padded_perm(self.korder, self.block_k) >= 0).sum(1)
        r = np.repeat(np.arange(self.nqb), np.diff(t.full_off))
        rows = _bincount(r, qn[r] * kn[t.full_idx], self.nqb)
        r = np.repeat(np.arange(self.nqb), np.diff(t.part_off))
        return rows, np.stack([r, t.part_idx.astype(np.int64)], axis=1)

    def _counts(self, h: int, pairs: np.ndarray) -> np.ndarray:
        head = h if len(self.tables) > 1 else None
        return _dense_leaves(self.bound, self.qorder, self.korder, self.block_q,
                             self.block_k, pairs[:, 0], pairs[:, 1], head, self.run)[2]

    def _count_rows(self, h: int) -> np.ndarray:
        rows, todo = self._rows_todo(h)
        if todo is not None and len(todo):
            rows = rows + _bincount(todo[:, 0], self._counts(h, todo), self.nqb)
        return rows

    def _sampled(self, h: int, rows: np.ndarray, todo: np.ndarray, budget: int) -> np.ndarray:
        m = max(1, budget // (self.block_q * self.block_k))
        pick = np.unique(np.linspace(0, len(todo) - 1, m).astype(np.int64))
        cnt = self._counts(h, todo[pick]).astype(np.float64)
        est = np.full(len(todo), cnt.mean())
        est[pick] = cnt
        return rows + np.rint(np.bincount(todo[:, 0], weights=est, minlength=self.nqb)
                              ).astype(np.int64)

    def table_bytes(self) -> int:
        """Bytes of every CSR array a launch reads (tables, transposed, summary tables): the
        one block-table figure, reported by `compile --stats` and `analyze` alike."""
        extra = () if self.summary is None else self.summary.tables + self.summary.transposed
        return int(sum(a.nbytes for tab in self.tables + self.transposed + extra
                       for a in (tab.full_off, tab.full_idx, tab.part_off, tab.part_idx)))

    def stats(self) -> dict:
        tabs = self.tables + (self.summary.tables if self.summary is not None else ())
        full = sum(len(t.full_idx) for t in tabs)
        part = sum(len(t.part_idx) for t in tabs)
        total = self.nqb * (self.nkb + self.nsb) * len(self.tables)
        needed = self.needed() + (self.summary.needed if self.summary is not None else 0)
        computed = (full + part) * self.block_q * self.block_k
        out = {
            "block_q": self.block_q, "block_k": self.block_k,
            "tile_q": list(self.qorder.tile), "tile_k": list(self.korder.tile),
            "order_q": self.qorder.describe(), "order_k": self.korder.describe(),
            "head_tables": len(self.tables),
            "full_blocks": full, "partial_blocks": part, "empty_blocks": total - full - part,
            "computed_elements": computed, "needed_elements": needed,
            "waste": computed / needed if needed else float("inf"),
            "block_table_bytes": self.table_bytes(),
            "content_dependent": self.content_dependent,
            "summary_tokens": 0 if self.summary is None else self.summary.nr,
            "build_seconds": round(self.build_seconds, 4),
        }
        if self.orders_tried:
            out["orders_tried"] = dict(self.orders_tried)
        return out


def plan_stats(plan: Plan) -> dict:
    return plan.stats()


def _bincount(rows: np.ndarray, weights: np.ndarray, n: int) -> np.ndarray:
    """int64 sums of `weights` per row (exact: counts stay far below 2^53)."""
    if not len(rows):
        return np.zeros(n, dtype=np.int64)
    return np.bincount(rows, weights=weights, minlength=n).astype(np.int64)


def _csr(rows: np.ndarray, cols: np.ndarray, nrows: int, ncols: int
         ) -> tuple[np.ndarray, np.ndarray]:
    """CSR: idx[off[r]:off[r + 1]] are row r's columns, increasing."""
    key = np.sort(rows * ncols + cols)
    cnt = np.bincount(key // ncols, minlength=nrows)
    off = np.zeros(nrows + 1, dtype=np.int64)
    np.cumsum(cnt, out=off[1:])
    return off.astype(np.int32 if off[-1] < 2**31 else np.int64), (key % ncols).astype(
        np.int32)


def table_pair(fi, fj, pi, pj, nrows: int, ncols: int, needed: int = 0, uncounted=None,
               row_needed=None) -> tuple[BlockTable, BlockTable]:
    """A table of FULL pairs (fi, fj) and PARTIAL pairs (pi, pj), and its transpose."""
    return (BlockTable(*_csr(fi, fj, nrows, ncols), *_csr(pi, pj, nrows, ncols), needed,
                       uncounted, row_needed),
            BlockTable(*_csr(fj, fi, ncols, nrows), *_csr(pj, pi, ncols, nrows), needed,
                       uncounted))


def _dense_leaves(bp, qorder, korder, bq, bk, qi, kj, head, run):
    """Exact masks of block pairs (qi[t], kj[t]): (any, all-valid-and-true, count)."""
    qp = torch.from_numpy(padded_perm(qorder, bq))
    kp = torch.from_numpy(padded_perm(korder, bk))
    anyv = np.zeros(len(qi), dtype=bool)
    allv = np.zeros(len(qi), dtype=bool)
    cnt = np.zeros(len(qi), dtype=np.int64)
    h = None if head is None else torch.tensor(head)
    for t0, t1 in chunks(len(qi), bq * bk):
        a = qp[torch.from_numpy(qi[t0:t1])].unsqueeze(2)  # [T, bq, 1]
        b = kp[torch.from_numpy(kj[t0:t1])].unsqueeze(1)  # [T, 1, bk]
        qv, kv = a >= 0, b >= 0
        val = token_mask(bp, run, a.clamp(min=0), b.clamp(min=0), h)
        val = val.expand(a.shape[0], bq, bk)
        m = val & qv & kv
        anyv[t0:t1] = m.flatten(1).any(dim=1).numpy()
        cnt[t0:t1] = m.flatten(1).sum(dim=1).numpy()
        # FULL: no key padding and every valid query attends every key
        allv[t0:t1] = ((val | ~qv).flatten(1).all(dim=1) & kv.flatten(1).all(dim=1)
                              ).numpy()
    return anyv, allv, cnt


def _split_leaves(bp, qb0, kb0, bq, bk, gi, gj, head, run, sub=16):
    """Like _dense_leaves for contiguous 1D blocks, but each pair is first cut into sub x sub
    boxes that the abstract interpreter classifies; only undecided ones are evaluated."""
    nq, nk = bp.nq, bp.nk
    a, b = bq // sub, bk // sub
    t = np.repeat(np.arange(len(gi)), a * b)
    si = np.tile(np.repeat(np.arange(a), b), len(gi))
    sj = np.tile(np.arange(b), len(gi) * a)
    q0 = qb0.flo[gi][t] + si * sub
    k0 = kb0.flo[gj][t] + sj * sub
    ok = (q0 < nq) & (k0 < nk)
    t, q0, k0 = t[ok], q0[ok], k0[ok]
    q1, k1 = np.minimum(q0 + sub, nq) - 1, np.minimum(k0 + sub, nk) - 1
    qbox = TokIV(IV(q0, q1, ("q", 0)), (IV(q0, q1, ("q", 0)),), bp.qshape,
                 bp.checked.qspace.axes)
    kbox = TokIV(IV(k0, k1, ("k", 0)), (IV(k0, k1, ("k", 0)),), bp.kshape,
                 bp.checked.kspace.axes)
    cls = classify_token_boxes(bp, qbox, kbox, q0 - k1, q1 - k0, head, run)
    n = len(gi)
    cnt = np.zeros(n, dtype=np.int64)
    anyv = np.zeros(n, dtype=bool)
    allv = np.ones(n, dtype=bool)
    f = cls == FULL
    np.add.at(cnt, t[f], (q1[f] - q0[f] + 1) * (k1[f] - k0[f] + 1))
    anyv[t[f]] = True
    allv[t[cls == 0]] = False
    p = cls == PARTIAL
    if p.any():
        m = _eval_boxes(bp, q0[p], k0[p], sub, head, run)  # [P, sub, sub]
        m &= (q0[p][:, None, None] + np.arange(sub)[None, :, None] < nq)
        m &= (k0[p][:, None, None] + np.arange(sub)[None, None, :] < nk)
        c = m.reshape(len(m), -1).sum(axis=1)
        np.add.at(cnt, t[p], c)
        anyv[t[p][c > 0]] = True
        rows = np.minimum(q0[p] + sub, nq) - q0[p]
        cols = np.minimum(k0[p] + sub, nk) - k0[p]
        allv[t[p][c < rows * cols]] = False
    # a key block that runs past the end needs the bounds mask
    allv &= kb0.count[gj] == kb0.size[gj]
    return anyv, allv, cnt


def _eval_boxes(bp, q0, k0, sub, head, run) -> np.ndarray:
    """The exact mask of sub x sub boxes at (q0[i], k0[i]) (indices clamped in range)."""
    out = np.zeros((len(q0), sub, sub), dtype=bool)
    h = None if head is None else torch.tensor(head)
    ar = torch.arange(sub)
    for t0, t1 in chunks(len(q0), sub * sub):
        a = (torch.from_numpy(q0[t0:t1]).view(-1, 1, 1) + ar.view(1, -1, 1)).clamp(
            max=bp.nq - 1)
        b = (torch.from_numpy(k0[t0:t1]).view(-1, 1, 1) + ar.view(1, 1, -1)).clamp(
            max=bp.nk - 1)
        val = token_mask(bp, run, a, b, h)
        out[t0:t1] = val.expand(a.shape[0], sub, sub).numpy()
    return out


def _table(bp: BoundPattern, qorder, korder, bq, bk, head, run, qsel=None, budget=None):
    """Exact tables (and transposed tables); with `qsel`, only the number of block pairs
    listed for those query blocks (to compare token orders cheaply). `budget` ([pairs
    left]) is shared by every table of one plan: past it, SizeLimitError."""
    budget = [PAIR_LIMIT] if budget is None else budget
    if qsel is None:
        fast = _difference_table(bp, qorder, korder, bq, bk, head, run, budget)
        if fast is not None:
            return fast
    qlev = (row_major(bp.qshape, bq, qorder.start, qorder.length) if qorder.identity
            else bounds(padded_perm(qorder, bq), bp.qshape).pyramid())
    klev = (row_major(bp.kshape, bk) if korder.identity
            else bounds(padded_perm(korder, bk), bp.kshape).pyramid())
    if qsel is not None:
        qlev = qlev[0].take(qsel).pyramid()
    qb0, kb0 = qlev[0], klev[0]
    nqb, nkb = len(qb0), len(kb0)
    rowmajor_1d = (len(bp.qshape) == 1 and len(bp.kshape) == 1 and qorder.identity
                   and korder.identity)
    r = refine(bp, qlev, klev, head, run,
               "leaf" if rowmajor_1d and not bp.content_dependent else "none",
               max_step=PAIR_LIMIT)
    full_i, full_j, part_i, part_j = [], [], [], []
    uncounted = []
    needed = 0
    listed = 0
    count_rows, counts = [], []  # attended entries per counted pair, by query block
    for lq, lk, gi, gj in r.full:
        # expand to leaf blocks; a key block with padding needs the mask: PARTIAL
        si, sj = 1 << lq, 1 << lk
        ii = (gi[:, None] * si + np.arange(si)[None, :])
        jj = (gj[:, None] * sj + np.arange(sj)[None, :])
        ii = np.repeat(ii, sj, axis=1).reshape(-1)
        jj = np.tile(jj, (1, si)).reshape(-1)
        ok = (ii < nqb) & (jj < nkb)
        ii, jj = ii[ok], jj[ok]
        ok = (qb0.count[ii] > 0) & (kb0.count[jj] > 0)
        ii, jj = ii[ok], jj[ok]
        clean = kb0.count[jj] == kb0.size[jj]
        count_rows.append(ii)
        counts.append(qb0.count[ii] * kb0.count[jj])
        needed += int(counts[-1].sum())
        full_i.append(ii[clean])
        full_j.append(jj[clean])
        part_i.append(ii[~clean])
        part_j.append(jj[~clean])
        listed += len(ii)
        _spend(bp, budget, listed, keep=True)
    # diagonal leaves (1D, leaf level): PARTIAL, and counted in closed form
    counts.append(r.diag.pairs())
    needed += int(counts[-1].sum())
    for _, _, gi, gj in r.diag_at:  # the same order as the leaves of r.diag
        part_i.append(gi)
        part_j.append(gj)
        count_rows.append(gi)
    gi, gj = r.undecided
    if bp.content_dependent and not (run.content is UNSELECTED or run.content is SELECTED):
        # the content decides at run time: every undecided leaf may be attended
        part_i.append(gi)
        part_j.append(gj)
        gi = gj = np.zeros(0, dtype=np.int64)
    if len(gi) and qsel is None:
        # cheap proof of PARTIAL: the block pair's edge rows and columns hold both values;
        # the exact count of those pairs waits until stats() asks for it
        rows = gi
        proven = _edges_mixed(bp, qorder, korder, bq, bk, rows, gj, head, run)
        if proven.any():
            part_i.append(gi[proven])
            part_j.append(gj[proven])
            uncounted.append(np.stack([gi[proven], gj[proven]], axis=1))
            gi, gj = gi[~proven], gj[~proven]
    if len(gi):
        if rowmajor_1d:
            anyv, allv, cnt = _split_leaves(bp, qb0, kb0, bq, bk, gi, gj, head, run)
        else:
            rows = gi if qsel is None else np.asarray(qsel)[gi]
            anyv, allv, cnt = _dense_leaves(bp, qorder, korder, bq, bk, rows, gj, head, run)
        needed += int(cnt.sum())
        count_rows.append(gi)
        counts.append(cnt)
        full_i.append(gi[allv])
        full_j.append(gj[allv])
        keep = anyv & ~allv
        part_i.append(gi[keep])
        part_j.append(gj[keep])

    def cat(xs):
        return np.concatenate(xs).astype(np.int64) if xs else np.zeros(0, dtype=np.int64)

    fi, fj, pi, pj = cat(full_i), cat(full_j), cat(part_i), cat(part_j)
    if qsel is not None:
        return len(fi) + len(pi)
    _spend(bp, budget, len(fi) + len(pi))
    unc = np.concatenate(uncounted) if uncounted else None
    per_row = _bincount(cat(count_rows), np.concatenate(counts).astype(np.float64), nqb)
    return table_pair(fi, fj, pi, pj, nqb, nkb, needed, unc, per_row)


def _spend(bp: BoundPattern, budget: list, pairs: int, keep: bool = False) -> None:
    """Take `pairs` listed block pairs from a plan's budget (keep: only check)."""
    if pairs > budget[0]:
        raise PairLimitError(f"pattern '{bp.name}' visits more than {PAIR_LIMIT:,} block "
                             "pairs at this size (over all its tables); use larger blocks",
                             bp.checked.span)
    if not keep:
        budget[0] -= pairs


def _difference_table(bp: BoundPattern, qorder, korder, bq, bk, head, run, budget):
    """Exact tables of a row-major sequence whose rules read q and k only through q - k
    (analysis/difference.py), from the mask on the 2N - 1 differences: block pair (i, j)
    holds count(i - j) = sum over a, b < bq of g(bq (i - j) + a - b) attended entries, two
    running sums of g. None where that does not apply (then _table refines as usual)."""
    n = bp.nq
    if not (len(bp.qshape) == 1 and bp.qshape == bp.kshape and bq == bk and n % bq == 0
            and qorder.identity and korder.identity and qorder.start == 0
            and qorder.length == n and korder.length == n and difference_only(bp)):
        return None
    nb = n // bq
    d = np.arange(-(n - 1), n, dtype=np.int64)
    h = None if head is None else torch.tensor(head)
    g = np.zeros(len(d), dtype=np.int64)
    for a, b in chunks(len(d), 1):
        dd = torch.from_numpy(d[a:b])
        m = token_mask(bp, run, dd.clamp(min=0), (-dd).clamp(min=0), h, dims=1)
        g[a:b] = m.expand(b - a).numpy()
    c1 = np.concatenate([[0], np.cumsum(g)])
    t = np.arange(len(g))
    box = c1[t + 1] - c1[np.maximum(t + 1 - bq, 0)]  # g[t - bq + 1 .. t]
    c2 = np.concatenate([[0], np.cumsum(box)])
    delta = np.arange(-(nb - 1), nb, dtype=np.int64)
    s = bq * delta + n - 1
    cnt = c2[s + bq] - c2[s]  # box[s .. s + bq - 1]
    nz = cnt > 0
    ds, cs, full = delta[nz], cnt[nz], cnt[nz] == bq * bq
    lens = nb - np.abs(ds)
    total = int(lens.sum())
    _spend(bp, budget, total)
    first = np.cumsum(lens) - lens
    ii = np.repeat(np.maximum(ds, 0), lens) + np.arange(total) - np.repeat(first, lens)
    jj = ii - np.repeat(ds, lens)
    c = np.repeat(cs, lens)
    f = np.repeat(full, lens)
    needed = int(c.sum())
    per_row = _bincount(ii, c.astype(np.float64), nb)
    return table_pair(ii[f], jj[f], ii[~f], jj[~f], nb, nb, needed, None, per_row)


def _edges_mixed(bp, qorder, korder, bq, bk, qi, kj, head, run) -> np.ndarray:
    """Block pairs whose first/last rows and columns already hold attended and unattended
    valid entries (so the pair is PARTIAL), from at most 2 (bq + bk) evaluations instead of
    bq bk: the first row alone first (it settles a column rule, as in strided or fixed),
    then the other edges of the pairs it left open."""
    qp = torch.from_numpy(padded_perm(qorder, bq))
    kp = torch.from_numpy(padded_perm(korder, bk))
    out = np.zeros(len(qi), dtype=bool)
    h = None if head is None else torch.tensor(head)

    def edge(val, qq, kk, seen_t, seen_f):
        ok = (qq >= 0) & (kk >= 0)
        val = val.expand(ok.shape)
        seen_t |= (val & ok).flatten(1).any(1)
        seen_f |= (~val & ok).flatten(1).any(1)

    for t0, t1 in chunks(len(qi), 4 * (bq + bk)):
        a = qp[torch.from_numpy(qi[t0:t1])]  # [T, bq]
        b = kp[torch.from_numpy(kj[t0:t1])]  # [T, bk]
        # the first and last valid query of each block, against all its keys; and back
        qv = a >= 0
        first = torch.where(qv.any(1), qv.float().argmax(1), 0)
        last = bq - 1 - torch.where(qv.any(1), qv.flip(1).float().argmax(1), 0)
        seen_t = torch.zeros(len(a), dtype=torch.bool)
        seen_f = torch.zeros(len(a), dtype=torch.bool)
        row = a.gather(1, first[:, None]).unsqueeze(1)  # [T, 1, 1]
        edge(token_mask(bp, run, row.clamp(min=0), b.unsqueeze(1).clamp(min=0), h), row,
             b.unsqueeze(1), seen_t, seen_f)
        rest = torch.nonzero(~(seen_t & seen_f)).view(-1)
        if len(rest):
            a, b, last = a[rest], b[rest], last[rest]
            kv = b >= 0
            kfirst = torch.where(kv.any(1), kv.float().argmax(1), 0)
            klast = bk - 1 - torch.where(kv.any(1), kv.flip(1).float().argmax(1), 0)
            row = a.gather(1, last[:, None]).unsqueeze(1)
            cols = torch.stack([b.gather(1, kfirst[:, None]), b.gather(1, klast[:, None])], 2)
            st, sf = seen_t[rest], seen_f[rest]
            for qq, kk in ((row, b.unsqueeze(1)), (a.unsqueeze(2), cols)):
                edge(token_mask(bp, run, qq.clamp(min=0), kk.clamp(min=0), h), qq, kk, st, sf)
            seen_t[rest], seen_f[rest] = st, sf
        out[t0:t1] = (seen_t & seen_f).numpy()
    return out


def default_blocks(bp: BoundPattern) -> tuple[int, int]:
    return 64, 64


# Per target, the block sizes its planner may choose on 2D / 3D spaces and the relative
# speed of each per computed element (query block, key block): a smaller block computes
# fewer needless elements around a window but may cost more per element. Targets: "cpu",
# the native kernels (codegen/cpu/flash.c: key blocks read in place, no gathers), and
# "cpu-aten", ATen's flash kernel on gathered keys, for calls the native kernels do not
# take (codegen/cpu/kernels._target). Fitted on a 2-core AVX2 EPYC, 4 heads, D = 64:
# native forwards on na2d k13 / na3d k5 ran 64x16 and 16x16 blocks at about 0.95x and 0.85x
# the per-element rate of 64x64 (16x16 then computes 1.51 / 2.30 elements per needed one,
# against 3.13 / 4.10; forward + backward: 16x16 the fastest too, 221 / 248 ms against 271
# / 401 at 64x16); ATen's forward + backward ran 64x16 at 0.85x and 16- or 32-query
# blocks, gather-bound, at 0.36x and 0.62x, so those never pay there. Triton keeps 64 x 64
# until a GPU measures it.
BLOCK_CHOICES = {
    "cpu": (((64, 64), 1.0), ((64, 16), 0.95), ((16, 16), 0.85)),
    "cpu-aten": (((64, 64), 1.0), ((64, 16), 0.85)),
}
# On sequences (1D): square blocks, the relative speed of each per computed element, and
# what one gathered key costs in computed elements. Native forward: 32- to 256-query blocks
# within 3% per element (sliding_window, power_attention at N = 16K), no gathers. ATen's
# CPU flash kernel slices a call's queries 32 at a time below 192 of them and 64 at a time
# from there, so 256-query blocks ran 1.10x the per-element rate of 64-query ones (128:
# 1.02x; sliding_window, strided views, no gathers), while a query block whose key blocks
# are not one consecutive run has them copied (its k and v rows, once per query block):
# 19.5 elements' time per key, fitted to power_attention at N = 16K, whose forward ran 352
# / 319 / 289 ms at 64 / 128 / 256 (one thread, 2 heads, D = 64; the model gives 1 : 0.88
# : 0.79)
LINE_BLOCK_CHOICES = {
    "cpu": (((64, 64), 1.0), ((128, 128), 1.02), ((256, 256), 1.03)),
    "cpu-aten": (((64, 64), 1.0), ((128, 128), 1.02), ((256, 256), 1.10)),
}
GATHER_COST = {"cpu": 0.0, "cpu-aten": 19.5}


def blocks_for(bp: BoundPattern, target: str | None, run: RunInputs = NONE
               ) -> tuple[int, int]:
    """The block sizes a target computes `bp` with when the caller names none: on 2D / 3D
    spaces whose token order the planner chooses, the candidates of BLOCK_CHOICES with the
    least estimated time (computed elements, measured as choose_orders measures them, over
    the candidate's relative speed); otherwise default_blocks."""
    line = len(bp.qshape) == 1
    choices = (LINE_BLOCK_CHOICES if line else BLOCK_CHOICES).get(target)
    if choices is None or bp.qshape != bp.kshape:
        return default_blocks(bp)
    if line and (bp.content_dependent or bp.route is not None or bp.summaries or bp.average):
        # per-call tables (chunk_topk), gates per query block (MoH), summary rows: 64 x 64
        return default_blocks(bp)
    run = RunInputs(run.values).cpu()
    if bp.route is not None:
        run = run.without(bp.route[0])
    return caches.BLOCKS.get_or_create(
        (bp, target, run.fingerprint),
        lambda: _fastest_line_blocks(bp, run, choices, GATHER_COST[target]) if line
        else _fastest_blocks(bp, run, choices))


def _fastest_blocks(bp: BoundPattern, run: RunInputs, choices) -> tuple[int, int]:
    best, best_cost = default_blocks(bp), None
    for (bq, bk), speed in choices:
        cost = choose_orders(bp, bq, bk, run)[2] / speed
        if best_cost is None or cost < best_cost:
            best, best_cost = (bq, bk), cost
    return best


def _fastest_line_blocks(bp: BoundPattern, run: RunInputs, choices, gather: float
                         ) -> tuple[int, int]:
    """The candidate with the least estimated time over its exact tables: computed elements
    over the candidate's speed, plus `gather` per key of the query blocks whose key blocks
    are not one consecutive run (the others read keys through a view)."""
    best, best_cost = default_blocks(bp), None
    for (bq, bk), speed in choices:
        plan = plan_for(bp, bq, bk, run)
        cost = 0.0
        for tab in plan.tables:
            deg, consecutive = _row_runs(tab)
            cost += deg.sum() * bq * bk / speed + deg[~consecutive].sum() * bk * gather
        if best_cost is None or cost < best_cost:
            best, best_cost = (bq, bk), cost
    return best


def _row_runs(tab: BlockTable) -> tuple[np.ndarray, np.ndarray]:
    """Per row: its key blocks, and whether they are one consecutive run."""
    nf, npart = np.diff(tab.full_off), np.diff(tab.part_off)
    deg = (nf + npart).astype(np.int64)
    lo = np.full(len(deg), np.iinfo(np.int64).max)
    hi = np.full(len(deg), -1)
    for off, idx in ((tab.full_off, tab.full_idx), (tab.part_off, tab.part_idx)):
        off = off.astype(np.int64)
        has = off[1:] > off[:-1]  # each row's columns are increasing: its ends are its extremes
        lo[has] = np.minimum(lo[has], idx[off[:-1][has]])
        hi[has] = np.maximum(hi[has], idx[off[1:][has] - 1])
    return deg, (deg == 0) | (hi - lo + 1 == deg)


def plan_for(bp: BoundPattern, block_q: int | None, block_k: int | None,
             run: RunInputs = NONE, order: str = "auto", rows: tuple | None = None,
             target: str | None = None) -> Plan:
    """build_plan through the declared cache, keyed by the bound pattern, the block sizes,
    the order, the query rows and the fingerprint of the mask's run-time inputs (the router
    of `route` and the content are not part of the mask's tables). Without block sizes,
    `target`'s planner chooses them (blocks_for)."""
    if bp.route is not None:
        run = run.without(bp.route[0])
    if rows is not None and tuple(rows) == (0, bp.nq):
        rows = None  # every query: a whole call plans as one (and takes the chosen blocks)
    if block_q is None and block_k is None and order == "auto" and rows is None:
        block_q, block_k = blocks_for(bp, target, run)
    dq, dk = default_blocks(bp)
    bq, bk = block_q or dq, block_k or dk
    key = (bp, bq, bk, order, rows, run.fingerprint)
    return caches.PLANS.get_or_create(key, lambda: build_plan(bp, bq, bk, run, order, rows))


def build_plan(bp: BoundPattern, block_q: int | None = None, block_k: int | None = None,
               run: RunInputs = NONE, order: str = "auto", rows: tuple | None = None
               ) -> Plan:
    """Token orders and exact block tables (one per head for per-head patterns). With rows
    = (first, count), the tables of those queries only (row-major), so decoding one token
    costs what that token attends, whatever the length."""
    t0 = time.perf_counter()
    run = RunInputs(run.values).cpu()  # the tables never read the content
    dq, dk = default_blocks(bp)
    bq, bk = block_q or dq, block_k or dk
    for b in (bq, bk):
        if b < 16 or b & (b - 1):
            raise ParameterError(f"block sizes must be powers of two >= 16, not {b}")
    qorder = TokenOrder.rows(bp.qshape, bq, *(rows or (0, None)))
    korder = TokenOrder.rows(bp.kshape, bk)
    tried = {}
    if order not in ("auto", "row-major", "same"):
        raise ParameterError(f"order must be 'auto', 'same' or 'row-major', not {order!r}")
    if order == "same" and bq != bk:
        raise ParameterError(f"order 'same' needs one block size, not {bq} and {bk}")
    if order != "row-major" and len(bp.qshape) > 1 and bp.qshape == bp.kshape and rows is None:
        if order == "auto":
            qorder, korder, _ = choose_orders(bp, bq, bk, run, tried)
        else:  # one order for queries and keys (context parallelism shards tokens once)
            qorder = korder = caches.ORDERS.get_or_create(
                (bp, bq, "same", run.fingerprint), lambda: _same_order(bp, bq, run))
    heads = range(bp.heads) if bp.head_dependent else [None]
    tables, transposed = [], []
    budget = [PAIR_LIMIT]  # over every table of the plan (~70 bytes a pair while built)
    for h in heads:
        t, tt = _table(bp, qorder, korder, bq, bk, h, run, budget=budget)
        tables.append(t)
        transposed.append(tt)
    unselected = tuple(_table(bp, qorder, korder, bq, bk, h, run.with_content(UNSELECTED),
                              budget=budget)[0]
                       for h in heads) if bp.content_dependent else ()
    selected = ()
    if bp.content_dependent:
        try:
            selected = tuple(_table(bp, qorder, korder, bq, bk, h, run.with_content(SELECTED),
                                    budget=budget)[0] for h in heads)
        except EvaluationError:
            # the selection's arguments need run-time inputs these tables were planned
            # without (a plan for statistics only): per-call plans then keep every
            # selected pair PARTIAL, exact but slower
            selected = ()
    summary = (summary_plan(bp, qorder, korder, bq, bk, run, budget) if bp.core_summaries
               else None)
    return Plan(qorder, korder, bq, bk, tuple(tables), tuple(transposed),
                time.perf_counter() - t0, bp, run, summary, tuple(tried.items()), unselected,
                selected)


def summary_plan(bp: BoundPattern, qorder: TokenOrder, korder: TokenOrder, bq: int, bk: int,
                 run: RunInputs, budget: list | None = None) -> SummaryPlan:
    """The rows and attend tables of every summary a core computes (codegen/plan/summary.py:
    refined from the rules, never [queries x summary tokens] masks)."""
    budget = [PAIR_LIMIT] if budget is None else budget
    heads = bp.heads if bp.head_dependent else None
    sr = kept_rows(bp, bp.core_summaries, run, korder, bk, budget)
    nr = sr.nr
    nsb = max(1, -(-nr // bk))
    qperm, qlev, per = leaves(bp.qshape, qorder, bq)
    nqb = len(qperm) // per
    qcount = (qperm >= 0).sum(1).reshape(nqb, per).sum(1)
    tables, transposed, per_row, use_q, use_r = [], [], [], [], []
    for g in range(heads or 1):
        got = [attend_counts(bp, bs, run, g if heads else None, qperm, qlev, per, bk, sr, i,
                             budget) for i, bs in enumerate(bp.core_summaries)]
        qi, si, cnt = (np.concatenate([x[n] for x in got]) for n in range(3))
        use_q += [x[3][0] for x in got]
        use_r += [x[3][1] for x in got]
        u, inv = np.unique(qi * nsb + si, return_inverse=True)
        c = np.bincount(inv.reshape(-1), weights=cnt.astype(np.float64),
                        minlength=len(u)).astype(np.int64)
        uq, us = u // nsb, u % nsb
        full = (c == qcount[uq] * bk) & ((us + 1) * bk <= nr)
        _spend(bp, budget, len(u))
        t, tt = table_pair(uq[full], us[full], uq[~full], us[~full], nqb, nsb)
        tables.append(t)
        transposed.append(tt)
        per_row.append(_bincount(uq, c.astype(np.float64), nqb))
    per_row = np.stack(per_row)
    users = summary_csr(np.concatenate(use_q), np.concatenate(use_r), nqb)
    _spend(bp, budget, len(users[1]) + len(sr.owners[1]))
    return SummaryPlan(sr.rows, sr.offsets, tuple(tables), tuple(transposed),
                       int(per_row.sum()), per_row, sr.owners, users)


def choose_orders(bp: BoundPattern, bq: int, bk: int, run: RunInputs, tried: dict | None = None
                  ) -> tuple[TokenOrder, TokenOrder, float]:
    """The query and key token orders (row-major, or tiles of any shape, with or without
    dilation groups; key tiles may start half a tile early on an axis, so that their edges
    meet the edges of the query tiles' windows) whose blocks list the fewest computed
    elements, measured exactly on evenly spaced query blocks; and that estimate.

    Queries: each candidate with keys in its own tiles, from 0 and from half a tile early.
    Keys of another block size: each tiling from 0, then every shift of the two best."""
    ranked = caches.ORDERS.get_or_create((bp, bq, bk if bk < bq else bq, run.fingerprint),
                                         lambda: _query_orders(bp, bq, bk, run))
    if bk == bq:
        qorder, korder, cost = ranked[0]
    else:
        qorder, korder, cost = caches.ORDERS.get_or_create(
            (bp, bq, bk, "keys", run.fingerprint),
            lambda: min((_key_order(bp, q, k, c, bk, run) for q, k, c in ranked[:2]
                         if c <= 1.1 * ranked[0][2]), key=lambda x: x[2]))
    if tried is not None:  # every query candidate's estimate, and the pair chosen
        tried.update({f"queries {q.describe()}": int(round(c)) for q, _, c in ranked})
        tried[f"keys {korder.describe()}"] = int(round(cost))
    return qorder, korder, cost


def _candidates(bp: BoundPattern, block: int) -> list[TokenOrder]:
    dil = neighborhood_dilation(bp)
    cands = [TokenOrder(bp.qshape, (block,), (1,) * len(bp.qshape), np.arange(bp.nq),
                        tile_block=block)]
    for d in {None, dil} if dil and any(x > 1 for x in dil) else {None}:
        sub = bp.qshape if d is None else tuple(-(-s // x) for s, x in zip(bp.qshape, d))
        cands += [order_with_tile(bp.qshape, t, d) for t in tilings(sub, block)]
    return cands


def _shifted(o: TokenOrder, axes) -> TokenOrder:
    """`o` with its tiles starting half a tile early on `axes`."""
    return order_with_tile(o.shape, o.tile, None if all(x == 1 for x in o.dilation)
                           else o.dilation, tuple(t // 2 if a in axes else 0
                                                  for a, t in enumerate(o.tile)))


def _cost(bp, qo: TokenOrder, ko: TokenOrder, bq: int, bk: int, run, samples: int = 12
          ) -> float:
    """Computed elements of queries in `qo` against keys in `ko`, from evenly spaced query
    blocks, scaled to the query order's block count (padding costs)."""
    nqb = -(-qo.length // bq)
    sel = np.unique(np.linspace(0, nqb - 1, min(samples, nqb)).astype(np.int64))
    pairs = _table(bp, qo, ko, bq, bk, None if not bp.head_dependent else 0, run, qsel=sel)
    return pairs / len(sel) * nqb * bq * bk


def _query_orders(bp, bq, bk, run) -> list:
    """(query order, key order, cost) per candidate, cheapest first: keys in the
    candidate's own tiles, or, for smaller key blocks, in roughly cubic tiles of that size
    (a cheap stand-in for the key order chosen after), from 0 or from half a tile early;
    for those within 1.25x of the best, early on any subset of the axes too (a window's
    edges may meet a tile's edges on some axes only: na3d kernel 5 in 2x2x4 tiles)."""
    out = []
    for i, o in enumerate(_candidates(bp, bq)):
        keys = [o]
        tiled = len(o.tile) == len(o.shape) > 1
        if tiled and bk < bq:
            sub = tuple(-(-s // x) for s, x in zip(o.shape, o.dilation))
            keys = [order_with_tile(o.shape, tile_shape(sub, bk), None if all(
                x == 1 for x in o.dilation) else o.dilation)]
        if tiled and any(t > 1 for t in keys[0].tile):
            keys.append(_shifted(keys[0], range(len(o.tile))))
        out.append(min(((_cost(bp, o, ko, bq, ko.tile_block, run), i, j, o, ko)
                        for j, ko in enumerate(keys)), key=lambda x: x[:3]))
    best = min(x[0] for x in out)
    for n, (c, i, j, o, ko) in enumerate(out):  # the close ones: shifts on fewer axes too
        if c <= 1.25 * best and len(ko.tile) == len(ko.shape):
            c2, k2 = _cheapest_shift(bp, o, ko, bq, ko.tile_block, run, (c, ko), every=False)
            out[n] = (c2, i, j, o, k2)
    out.sort(key=lambda x: x[:3])
    return [(o, ko, c) for c, _, _, o, ko in out]


def _same_order(bp, block: int, run) -> TokenOrder:
    """The candidate order with the fewest computed elements when keys share it."""
    return min(((_cost(bp, o, o, block, block, run), i, o)
                for i, o in enumerate(_candidates(bp, block))), key=lambda x: x[:2])[2]


def _key_order(bp, qorder, seed, seed_cost, bk, run):
    """The key order for `qorder` (from `seed`, the stand-in the query ranking measured):
    each tiling from 0, then every shift of the two best."""
    bq = qorder.tile_block
    first = sorted(((_cost(bp, qorder, o, bq, bk, run), i, o)
                    for i, o in enumerate(_candidates(bp, bk))), key=lambda x: x[:2])
    best_cost, _, best = first[0]
    if seed.tile_block == bk and seed_cost < best_cost:
        best, best_cost = seed, seed_cost
    for _, _, o in first[:2]:
        if len(o.tile) != len(o.shape) or len(o.shape) == 1:
            continue
        best_cost, best = _cheapest_shift(bp, qorder, o, bq, bk, run, (best_cost, best))
    return qorder, best, best_cost


def _cheapest_shift(bp, qorder, ko, bq, bk, run, start, every: bool = True) -> tuple:
    """(cost, key order): the cheapest of `start` and `ko` shifted half a tile early on
    each non-empty subset of its tiled axes (all of them too, unless `every` is False:
    the caller measured that one)."""
    axes = [a for a, t in enumerate(ko.tile) if t > 1]
    best = start
    for r in range(1, len(axes) + (1 if every else 0)):
        for sub in itertools.combinations(axes, r):
            k2 = _shifted(ko, sub)
            c = _cost(bp, qorder, k2, bq, bk, run)
            if c < best[0]:
                best = (c, k2)
    return best




# ------------------------------------------------------------------ restriction


def restrict(plan: Plan, qblocks, kblocks) -> Plan:
    """The plan of the queries of blocks `qblocks` against the keys of blocks `kblocks`
    (block ids of `plan`, in the order given): the share of the work one rank does under
    context parallelism. The call's q and k hold exactly those blocks' tokens (compact
    orders); pairs whose key block is not in `kblocks` are left out, to be computed
    elsewhere and merged through the log-sum-exp. Summary tables keep their columns."""
    t0 = time.perf_counter()
    qb = np.asarray(qblocks, dtype=np.int64).reshape(-1)
    kb = np.asarray(kblocks, dtype=np.int64).reshape(-1)
    for name, b, n in (("query", qb, plan.nqb), ("key", kb, plan.nkb)):
        if len(b) and (b.min() < 0 or b.max() >= n or len(np.unique(b)) != len(b)):
            raise ParameterError(f"{name} blocks must be distinct block ids below {n}")
    qorder = _sub_order(plan.qorder, plan.block_q, qb, queries=True)
    korder = _sub_order(plan.korder, plan.block_k, kb, queries=False)
    col = np.full(plan.nkb, -1, dtype=np.int64)
    col[kb] = np.arange(len(kb))
    qn = (padded_perm(plan.qorder, plan.block_q) >= 0).sum(1)[qb]
    kn = (padded_perm(plan.korder, plan.block_k) >= 0).sum(1)[kb]
    nq, nk = len(qb), len(kb)
    tables, transposed = [], []
    for t in plan.tables:
        fi, fj = _csr_rows(t.full_off, t.full_idx, qb)
        pi, pj = _csr_rows(t.part_off, t.part_idx, qb)
        fj, pj = col[fj], col[pj]
        fi, fj, pi, pj = fi[fj >= 0], fj[fj >= 0], pi[pj >= 0], pj[pj >= 0]
        per_row = _bincount(fi, (qn[fi] * kn[fj]).astype(np.float64), nq)
        unc = np.stack([pi, pj], axis=1)  # PARTIAL pairs: counted on demand
        needed = int(per_row.sum())
        t, tt = table_pair(fi, fj, pi, pj, nq, nk, needed, unc, per_row)
        tables.append(t)
        transposed.append(tt)
    summary = plan.summary
    if summary is not None:
        stabs, strans = [], []
        nsb = plan.nsb
        for t in summary.tables:
            fi, fj = _csr_rows(t.full_off, t.full_idx, qb)
            pi, pj = _csr_rows(t.part_off, t.part_idx, qb)
            st, stt = table_pair(fi, fj, pi, pj, nq, nsb)
            stabs.append(st)
            strans.append(stt)
        rows = None if summary.row_needed is None else summary.row_needed[:, qb]
        summary = SummaryPlan(summary.rows, summary.offsets, tuple(stabs),
                              tuple(strans), 0 if rows is None else int(rows.sum()), rows)
    return Plan(qorder, korder, plan.block_q, plan.block_k, tuple(tables), tuple(transposed),
                time.perf_counter() - t0, plan.bound, plan.run, summary)


def _csr_rows(off: np.ndarray, idx: np.ndarray, rows: np.ndarray
              ) -> tuple[np.ndarray, np.ndarray]:
    """(new row, column) of every entry of the given CSR rows, the rows renumbered 0.."""
    off = off.astype(np.int64)
    start, cnt = off[rows], off[rows + 1] - off[rows]
    r = np.repeat(np.arange(len(rows)), cnt)
    first = np.cumsum(cnt) - cnt  # where each row's entries begin in the output
    pos = np.arange(int(cnt.sum())) - np.repeat(first - start, cnt)
    return r, idx[pos].astype(np.int64)


def _sub_order(order: TokenOrder, block: int, blocks: np.ndarray, queries: bool
               ) -> TokenOrder:
    """The positions of `blocks` (padding kept, so blocks stay whole). Queries that are one
    run of row-major tokens keep the plain `start` form (the kernels' fast paths); any other
    subset is compact."""
    perm = padded_perm(order, block)[blocks].reshape(-1)
    valid = perm[perm >= 0]
    run = len(valid) > 0 and bool((np.diff(valid) == 1).all()) and bool(
        (perm[:len(valid)] == valid).all())
    if queries and run and order.identity and order.start == 0:
        return TokenOrder(order.shape, order.tile, order.dilation, valid,
                          tile_block=order.tile_block, start=int(valid[0]))
    return TokenOrder(order.shape, order.tile, order.dilation, perm,
                      tile_block=order.tile_block, compact=True, phase=order.phase)
