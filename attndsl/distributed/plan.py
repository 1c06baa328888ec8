"""The pattern's tables seen as a context-parallel problem (`Problem`), and one rank's share
of it (`RankPlan`): its tokens, the restricted plans of its local and received key blocks,
and the rows it sends. Everything here follows from the bound pattern, the block sizes,
the run-time inputs and the number of ranks, so every rank derives the same layout
independently; nothing is exchanged to agree on it."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from attndsl import caches
from attndsl.codegen.plan.orders import TokenOrder, padded_perm
from attndsl.codegen.plan.tables import Plan, plan_for, restrict
from attndsl.distributed.dispatch import Layout, layout
from attndsl.errors import UnsupportedError
from attndsl.semantics.bind import BoundPattern
from attndsl.semantics.inputs import RunInputs

# Mask entries of PARTIAL blocks counted exactly per head table (about a second of dense
# evaluation); past it, the attended pairs a dispatch balances are estimated from a sample.
COUNT_BUDGET = 1 << 24


@dataclass(frozen=True, eq=False)
class Problem:
    """A pattern's plans over one token order: (part, plan) for each averaged part (or the
    pattern itself), all with the same order and block size for queries and keys."""

    bp: BoundPattern
    parts: tuple  # ((BoundPattern, Plan), ...)

    @property
    def plan(self) -> Plan:
        return self.parts[0][1]

    @property
    def order(self) -> TokenOrder:
        return self.plan.qorder

    @property
    def block(self) -> int:
        return self.plan.block_q

    @property
    def nblocks(self) -> int:
        return self.plan.nqb

    def block_tokens(self) -> np.ndarray:
        """[blocks] real tokens of each block (padding excluded)."""
        return (padded_perm(self.order, self.block) >= 0).sum(1).astype(np.int64)

    def tables(self) -> list:
        """(offsets, indices) of the FULL and PARTIAL pairs of every head table."""
        out = []
        for _, plan in self.parts:
            for t in plan.tables:
                out += [(t.full_off, t.full_idx), (t.part_off, t.part_idx)]
        return out

    def costs(self) -> np.ndarray:
        """[blocks] attended pairs of each query block, over every head table, summary
        tokens included. Patterns whose masks read q and k count every entry of their
        static superset's PARTIAL blocks (the content decides at run time). Past
        COUNT_BUDGET mask entries of PARTIAL blocks per table the counts are estimated
        from a sample (`exact` says whether they were)."""
        return self._costs()[0]

    @property
    def exact(self) -> bool:
        return self._costs()[1]

    def _costs(self) -> tuple[np.ndarray, bool]:
        return caches.CP_LAYOUTS.get_or_create(
            (tuple(plan for _, plan in self.parts), "costs"), self._count)

    def _count(self) -> tuple[np.ndarray, bool]:
        exact = True
        cost = np.zeros(self.nblocks, dtype=np.int64)
        n = self.block_tokens()
        for _, plan in self.parts:
            for h, t in enumerate(plan.tables):
                if plan.content_dependent:
                    for off, idx in ((t.full_off, t.full_idx), (t.part_off, t.part_idx)):
                        r = np.repeat(np.arange(self.nblocks), np.diff(off.astype(np.int64)))
                        np.add.at(cost, r, n[r] * n[idx])
                else:
                    rows, ok = plan.row_estimate(h, COUNT_BUDGET)
                    cost += rows
                    exact = exact and ok
            if plan.summary is not None and plan.summary.row_needed is not None:
                cost += plan.summary.row_needed.sum(0)
        return cost, exact

    def layout(self, ranks: int, dispatch: str) -> Layout:
        return caches.CP_LAYOUTS.get_or_create(
            (tuple(plan for _, plan in self.parts), ranks, dispatch),
            lambda: layout(self.tables(), self.costs(), self.block_tokens(), ranks, dispatch))


def shardable(bp: BoundPattern) -> None:
    """Refuse, with a located error, what context parallelism cannot shard."""
    if bp.channel:
        raise UnsupportedError(f"pattern '{bp.name}' attends across channels: its tokens are "
                               "channels, not a sequence to shard", bp.checked.span)
    for sub in bp.average or (bp,):
        if sub.qshape != sub.kshape:
            raise UnsupportedError(
                f"context parallelism shards one sequence of queries and keys; pattern "
                f"'{sub.name}' has query space {sub.qshape} and key space {sub.kshape}",
                sub.checked.span)


def problem(bp: BoundPattern, block_q: int | None, block_k: int | None, run: RunInputs
            ) -> Problem:
    """The plans of `bp` (of each averaged part) for the mask's run-time inputs `run`."""
    shardable(bp)
    parts = bp.average or (bp,)
    out = []
    for sub in parts:
        plan = plan_for(sub, block_q, block_k, run.part(sub) if bp.average else run,
                        order="same")
        if plan.block_q != plan.block_k:
            raise UnsupportedError(f"context parallelism needs one block size for queries and "
                                   f"keys, not {plan.block_q} and {plan.block_k}",
                                   sub.checked.span)
        if not np.array_equal(plan.qorder.perm, plan.korder.perm) or (
                out and not np.array_equal(plan.qorder.perm, out[0][1].qorder.perm)):
            raise UnsupportedError(f"pattern '{bp.name}': queries and keys (or its averaged "
                                   "parts) are planned in different token orders; context "
                                   "parallelism needs one", bp.checked.span)
        out.append((sub, plan))
    return Problem(bp, tuple(out))


@dataclass(frozen=True, eq=False)
class RankPlan:
    """One rank's share: its tokens (local rows, in order), per part the restricted plans
    of its queries against its own keys and against the received ones, and the all-to-all
    layout (token rows per destination and per source)."""

    problem: Problem
    layout: Layout
    rank: int
    tokens: np.ndarray  # [n] the token each local row holds
    local: tuple  # per part: Plan, my query blocks x my key blocks
    remote: tuple  # per part: Plan, my query blocks x received key blocks (or None)
    send_rows: np.ndarray  # local rows sent, grouped by destination rank
    send_splits: tuple  # rows to each rank
    recv_splits: tuple  # rows from each rank
    recv_tokens: np.ndarray  # the token each received row holds

    @property
    def moves(self) -> bool:
        """Whether any rank sends any key: otherwise no rank joins an exchange."""
        return any(len(n) for n in self.layout.need)


def rank_plan(prob: Problem, ranks: int, rank: int, dispatch: str) -> RankPlan:
    """`rank`'s share of `prob` under `dispatch` (cached per plans, ranks, rank, dispatch)."""
    return caches.CP_PLANS.get_or_create(
        (tuple(plan for _, plan in prob.parts), ranks, rank, dispatch),
        lambda: _rank_plan(prob, ranks, rank, dispatch))


def _rank_plan(prob: Problem, ranks: int, rank: int, dispatch: str) -> RankPlan:
    lay = prob.layout(ranks, dispatch)
    perm = padded_perm(prob.order, prob.block)
    ntok = prob.block_tokens()
    mine = lay.blocks[rank]
    first = np.zeros(prob.nblocks, dtype=np.int64)  # local row of each of my blocks' first token
    first[mine] = np.cumsum(ntok[mine]) - ntok[mine]
    tokens = perm[mine].reshape(-1)
    tokens = tokens[tokens >= 0]
    sends = lay.sends(rank)
    rows = [np.concatenate([first[b] + np.arange(ntok[b]) for b in s]) if len(s) else
            np.zeros(0, dtype=np.int64) for s in sends]
    need = lay.need[rank]
    recv_splits = tuple(int(ntok[need[lay.owner[need] == s]].sum()) for s in range(ranks))
    recv = perm[need].reshape(-1)
    local = tuple(restrict(plan, mine, mine) for _, plan in prob.parts)
    remote = tuple(restrict(plan, mine, need) if len(need) else None for _, plan in prob.parts)
    return RankPlan(prob, lay, rank, tokens, local, remote,
                    np.concatenate(rows).astype(np.int64), tuple(len(r) for r in rows),
                    recv_splits, recv[recv >= 0])


def summary_traffic(prob: Problem, owner: np.ndarray, ranks: int, dim: int, vdim: int
                    ) -> tuple[np.ndarray, np.ndarray]:
    """([ranks] elements sent, [ranks] elements received) per batch row and query head for
    the summary tokens (summary.py's exchanges), with blocks on ranks `owner` [blocks]: each
    owner of a token sends its pooled key and its value share ((output, log-sum-exp) for
    an `expectation`) to every other user, and for an expectation its pooled query to every
    other owner. Exact: a rank holds whole blocks, and the plan lists per block the rows
    it holds members of (owners) or attends (users)."""
    sent = np.zeros(ranks, dtype=np.int64)
    recv = np.zeros(ranks, dtype=np.int64)
    for sub, plan in prob.parts:
        s = plan.summary
        if s is None or s.owners is None or s.nr == 0:
            continue
        nr = s.nr
        which = np.searchsorted([o[0] for o in s.offsets], s.rows, side="right") - 1
        expect = np.array([bs.summary.values == "expectation" for bs in sub.core_summaries])
        w_out = np.where(expect[which], dim + dim + 1, dim + vdim)
        w_peer = np.where(expect[which], dim, 0)
        own = _rank_rows(s.owners, owner, nr)
        use = _rank_rows(s.users, owner, nr)
        own = own[np.isin(own % nr, use % nr)]  # a token no query attends is never pooled
        nu = np.bincount(use % nr, minlength=nr)
        no = np.bincount(own % nr, minlength=nr)
        o_rank, o_row = own // nr, own % nr
        u_rank, u_row = use // nr, use % nr
        o_uses = np.isin(own, use)
        u_owns = np.isin(use, own)
        peer = (no[o_row] - 1) * w_peer[o_row]
        sent += np.bincount(o_rank, weights=(nu[o_row] - o_uses) * w_out[o_row] + peer,
                            minlength=ranks).astype(np.int64)
        recv += np.bincount(o_rank, weights=peer, minlength=ranks).astype(np.int64)
        recv += np.bincount(u_rank, weights=(no[u_row] - u_owns) * w_out[u_row],
                            minlength=ranks).astype(np.int64)
    return sent, recv


def _rank_rows(table: tuple, owner: np.ndarray, nr: int) -> np.ndarray:
    """rank * nr + row, each once, of a per-block CSR of rows."""
    off, idx = table
    blocks = np.repeat(np.arange(len(off) - 1), np.diff(off))
    return np.unique(owner[blocks].astype(np.int64) * nr + idx)
