"""Which rank owns which query blocks, and what must move: derived from the block tables
alone, so every rank computes the same layout without exchanging a byte, and `attndsl
cp-plan` evaluates it at sizes no machine here runs.

A rank owns the same blocks of queries and keys (self-attention: one token order, one block
size). Its share of the work is the attended pairs of its query blocks; the K/V it needs
are the key blocks those rows list in any head table, of which the ones another rank owns
are received, each block once.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

import numpy as np

from attndsl.errors import ParameterError, UnsupportedError

DISPATCHES = ("balanced", "contiguous", "zigzag")
# The balanced dispatch accepts a rank up to 5% above the most balanced candidate's maximum
# when that moves less K/V: a causal sliding window's first shard is cheaper than the
# others, and evening that out scatters blocks and multiplies the traffic (cp-plan shows
# both). Within the slack, the layout that receives the least wins.
BALANCE_SLACK = 0.05


@dataclass(frozen=True, eq=False)
class Layout:
    """Blocks per rank and the K/V blocks each rank receives, the same on every rank.

    `blocks[r]` are rank r's blocks (increasing: its tokens in the order of the plan);
    `need[r]` the key blocks it receives, grouped by owner (ranks in order), increasing
    within an owner: the order an all-to-all delivers them in."""

    ranks: int
    dispatch: str
    owner: np.ndarray  # [blocks] rank of each block
    cost: np.ndarray  # [blocks] attended pairs of each query block
    tokens: np.ndarray  # [blocks] real (unpadded) tokens of each block
    blocks: tuple  # per rank: its blocks, increasing
    need: tuple  # per rank: the remote key blocks it receives

    def pairs(self) -> np.ndarray:
        """[ranks] attended pairs of each rank's queries."""
        return np.bincount(self.owner, weights=self.cost.astype(np.float64),
                           minlength=self.ranks).astype(np.int64)

    def held(self) -> np.ndarray:
        """[ranks] tokens each rank holds."""
        return np.bincount(self.owner, weights=self.tokens.astype(np.float64),
                           minlength=self.ranks).astype(np.int64)

    def received(self) -> np.ndarray:
        """[ranks] key tokens each rank receives."""
        return np.array([int(self.tokens[n].sum()) for n in self.need], dtype=np.int64)

    def sent(self) -> np.ndarray:
        """[ranks] key tokens each rank sends (a block to every rank that needs it)."""
        out = np.zeros(self.ranks, dtype=np.int64)
        for n in self.need:
            np.add.at(out, self.owner[n], self.tokens[n])
        return out

    def sends(self, rank: int) -> list[np.ndarray]:
        """Per destination rank: the blocks `rank` sends it, in the order it expects."""
        return [n[self.owner[n] == rank] for n in self.need]


def assign(cost: np.ndarray, ranks: int, how: str, received=None) -> np.ndarray:
    """[blocks] the owning rank of each block. Every rank owns floor or ceil(blocks / ranks)
    blocks (its tokens equal up to one block). `received(owner)`, the most key tokens a
    rank receives under an assignment, breaks near-ties of the balanced dispatch."""
    if how not in DISPATCHES:
        raise ParameterError(f"dispatch must be one of {', '.join(DISPATCHES)}, not {how!r}")
    nb = len(cost)
    if ranks < 1:
        raise ParameterError(f"ranks must be at least 1, not {ranks}")
    if nb < ranks:
        raise UnsupportedError(f"{nb} blocks cannot be shared by {ranks} ranks (each needs at "
                               "least one): use more tokens, fewer ranks or smaller blocks")
    if how == "contiguous":
        return _contiguous(nb, ranks)
    if how == "zigzag":
        return _zigzag(nb, ranks)
    return balanced(cost, ranks, received)


def _sizes(n: int, parts: int) -> np.ndarray:
    """n split into `parts` sizes, the first n % parts one larger."""
    return np.full(parts, n // parts, dtype=np.int64) + (np.arange(parts) < n % parts)


def _contiguous(nb: int, ranks: int) -> np.ndarray:
    return np.repeat(np.arange(ranks), _sizes(nb, ranks))


def _zigzag(nb: int, ranks: int) -> np.ndarray:
    """2 x ranks chunks; rank r owns chunks r and 2 ranks - 1 - r (a causal mask's cheap
    head and expensive tail together)."""
    chunk = np.repeat(np.arange(2 * ranks), _sizes(nb, 2 * ranks))
    return np.minimum(chunk, 2 * ranks - 1 - chunk)


def balanced(cost: np.ndarray, ranks: int, received=None) -> np.ndarray:
    """Attended pairs balanced to within BALANCE_SLACK of the best candidate, and among those
    the layout that receives the least K/V (then the fewest shard boundaries). Candidates:
    a greedy assignment like MagiAttention's (the most expensive piece first, to the least
    loaded rank with room) over single blocks and over runs of 2, 4, ... 32 pieces per
    rank (coarser runs keep neighbouring blocks together: less to send), contiguous shards
    (the longer ones placed where they cost least) and zigzag shards. A uniform pattern such
    as a sliding window gets contiguous shards."""
    cost = np.asarray(cost, dtype=np.int64)
    lo = len(cost) // ranks
    cands = [_best_contiguous(cost, ranks), _zigzag(len(cost), ranks)]
    cands += [_greedy(cost, ranks, lo // k) for k in (2, 4, 8, 16, 32)
              if lo % k == 0 and lo // k > 1]
    cands.append(_greedy(cost, ranks, 1))
    loads = [_max_load(cost, o, ranks) for o in cands]
    tol = int(min(loads) * BALANCE_SLACK)  # near-ties, settled by the traffic
    ok = [i for i, ld in enumerate(loads) if ld <= min(loads) + tol]

    def key(i):
        runs = int((np.diff(cands[i]) != 0).sum())
        return (received(cands[i]) if received is not None else 0, runs, loads[i], i)
    return cands[min(ok, key=key)]


def _max_load(cost, owner, ranks) -> int:
    return int(np.bincount(owner, weights=cost.astype(np.float64), minlength=ranks).max())


def _best_contiguous(cost: np.ndarray, ranks: int) -> np.ndarray:
    """Contiguous shards of floor or ceil(blocks / ranks) blocks, choosing which ranks hold
    one more so that the most loaded rank carries the least (dynamic programming over the
    ranks and the longer shards used so far)."""
    nb = len(cost)
    lo, extra = nb // ranks, nb % ranks
    pre = np.concatenate([[0], np.cumsum(cost, dtype=np.int64)])
    inf = np.iinfo(np.int64).max
    best = np.full((ranks + 1, extra + 1), inf, dtype=np.int64)  # [ranks done, extras used]
    take = np.zeros((ranks + 1, extra + 1), dtype=np.int8)
    best[0, 0] = 0
    for r in range(ranks):
        e = np.arange(extra + 1)
        start = r * lo + e
        ok = best[r] < inf
        for bonus in (0, 1):
            e2 = e + bonus
            fit = ok & (e2 <= extra)
            if not fit.any():
                continue
            load = pre[np.minimum(start + lo + bonus, nb)] - pre[np.minimum(start, nb)]
            val = np.maximum(best[r], load)
            for i in np.nonzero(fit)[0]:
                if val[i] < best[r + 1, e2[i]]:
                    best[r + 1, e2[i]] = val[i]
                    take[r + 1, e2[i]] = bonus
    sizes = np.zeros(ranks, dtype=np.int64)
    e = extra
    for r in range(ranks, 0, -1):
        sizes[r - 1] = lo + int(take[r, e])
        e -= int(take[r, e])
    return np.repeat(np.arange(ranks), sizes)


def _greedy(cost: np.ndarray, ranks: int, run: int) -> np.ndarray:
    """Pieces in decreasing cost (ties in order) to the least loaded rank with room. The
    first ranks x floor(blocks / ranks) blocks come in runs of `run` blocks (`run` divides
    floor(blocks / ranks)), of which every rank takes the same number; the remaining blocks
    one by one, at most one per rank: block counts equal up to one."""
    nb = len(cost)
    lo, extra = nb // ranks, nb % ranks
    starts = np.concatenate([np.arange(0, ranks * lo, run), np.arange(ranks * lo, nb)])
    sizes = np.concatenate([np.full(ranks * lo // run, run), np.ones(extra, dtype=np.int64)])
    kind = np.concatenate([np.zeros(ranks * lo // run, dtype=np.int64),
                           np.ones(extra, dtype=np.int64)])  # 0: a run, 1: a leftover
    pre = np.concatenate([[0], np.cumsum(cost, dtype=np.int64)])
    pcost = pre[starts + sizes] - pre[starts]
    owner = np.full(nb, -1, dtype=np.int64)
    load = np.zeros(ranks, dtype=np.int64)
    runs = np.zeros(ranks, dtype=np.int64)  # blocks taken in runs
    left = np.zeros(ranks, dtype=bool)  # took a leftover block
    heaps = ([(0, r) for r in range(ranks)], [(0, r) for r in range(ranks)])

    def room(r, k):
        return runs[r] + run <= lo if k == 0 else not left[r]

    for p in np.argsort(-pcost, kind="stable").tolist():
        k = int(kind[p])
        while True:  # entries whose load changed since, or ranks now full, are stale
            ld, r = heapq.heappop(heaps[k])
            if ld == load[r] and room(r, k):
                break
        owner[starts[p]:starts[p] + sizes[p]] = r
        load[r] += int(pcost[p])
        if k == 0:
            runs[r] += run
        else:
            left[r] = True
        for kk in (0, 1):
            if room(r, kk):
                heapq.heappush(heaps[kk], (int(load[r]), r))
    return owner


def layout(tables: list, cost: np.ndarray, tokens: np.ndarray, ranks: int, how: str
           ) -> Layout:
    """The layout of `how` for block tables `tables` (every head table of every part, all
    over the same blocks: CSR offsets and indices of FULL and PARTIAL pairs)."""
    nb = len(cost)
    rows = [(np.repeat(np.arange(nb), np.diff(off.astype(np.int64))), idx)
            for off, idx in tables]

    def needs(owner):
        mark = np.zeros((ranks, nb), dtype=bool)
        for r, idx in rows:
            mark[owner[r], idx] = True
        return mark & (owner[None, :] != np.arange(ranks)[:, None])

    def received(owner):
        return int((needs(owner) * tokens[None, :]).sum(1).max())

    owner = assign(cost, ranks, how, received)
    mark = needs(owner)
    blocks, need = [], []
    for r in range(ranks):
        blocks.append(np.nonzero(owner == r)[0])
        n = np.nonzero(mark[r])[0]
        need.append(n[np.argsort(owner[n], kind="stable")])
    return Layout(ranks, how, owner, np.asarray(cost, dtype=np.int64), tokens, tuple(blocks),
                  tuple(need))
