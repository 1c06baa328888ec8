"""The CPU backend's view of a plan: query blocks grouped by the shape of their key-block
lists (one batched product per group), the PARTIAL blocks' masks, and gather indices.
Derived once per plan (caches.CPU_PLANS); kernels.py runs it."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np
import torch

from attndsl import caches
from attndsl.codegen.plan.orders import padded_perm
from attndsl.codegen.plan.tables import Plan
from attndsl.semantics.bind import BoundPattern
from attndsl.semantics.inputs import RunInputs
from attndsl.semantics.masks import chunks, context, predicate, token_mask

MASK_CACHE = 1 << 28  # PARTIAL-block mask entries kept per plan; beyond, evaluated per call
MAX_RUNS = 3  # masked slot runs per group before one run covers them all


@dataclass(eq=False)
class Group:
    """Query blocks (`rows`, increasing) with key-block lists of one length and one set of
    PARTIAL positions: kidx[i] lists row i's key blocks, increasing."""

    rows: np.ndarray  # [n] query block ids
    kidx: np.ndarray  # [n, slots] key block ids
    runs: list  # [(s0, s1)]: slot ranges that need the mask
    any_full: bool  # some slot needs no mask: no row can be empty
    contiguous: bool  # rows are consecutive
    step: int | None  # kidx[i, j] == kidx[0, 0] + i * step + j (strided views)
    rows_t: torch.Tensor = None
    kidx_t: torch.Tensor = None
    masks: list = field(default_factory=list)  # per run: ~mask [n, 1, bq, w], or None
    empty: torch.Tensor | None = None  # [n, 1, bq, 1] rows with no key at all

    @property
    def slots(self) -> int:
        return self.kidx.shape[1]


@dataclass(eq=False)
class CpuPlan:
    """A Plan plus what the CPU backend derives from it once: groups, masks, indices. Built
    once per plan (caches.CPU_PLANS) and only read afterwards."""

    bp: BoundPattern
    plan: Plan
    run: RunInputs
    groups: list  # per table: [Group]
    qtok: torch.Tensor  # [nqb, bq] row-major token of each position (pads: 0)
    qpos: torch.Tensor  # [nqb, bq] the row of q each position reads (pads: 0)
    ktok: torch.Tensor  # [nkb, bk]
    kpos: torch.Tensor  # [nkb, bk] the row of k each position reads (pads: 0)
    qvalid: torch.Tensor  # [nqb, bq] bool
    kvalid: torch.Tensor
    qinv: torch.Tensor | None  # token -> position (None: identity order)
    kinv: torch.Tensor | None
    keyless: list  # per table: query blocks with no key block
    cache_masks: bool = True
    # keys held in a compact layout of only the blocks some table lists (when at most half
    # of them: decoding, chunked prefill): ktok/kvalid and the groups' kidx index that
    # layout, so a step costs what its rows attend, never the cache's length
    compact: bool = False

    @property
    def bq(self) -> int:
        return self.plan.block_q

    @property
    def bk(self) -> int:
        return self.plan.block_k

    @property
    def head_mode(self) -> bool:
        """One pass per query head: per-head tables, or a bias that may read h."""
        return len(self.plan.tables) > 1 or any(
            hr is not None or owner.heads is not None
            for owner, sc, hr in self.bp.scores if sc.kind == "bias")

    def passes(self, B: int, HKV: int, R: int) -> list:
        """(table, (first, stride, count) of the (batch, kv head) pairs, query-head slice,
        head or None): one pass, or one per query head (head_mode)."""
        if not self.head_mode:
            return [(0, (0, 1, B * HKV), slice(None), None)]
        per_head = len(self.plan.tables) > 1
        return [((h if per_head else 0), (h // R, HKV, B), slice(h % R, h % R + 1), h)
                for h in range(HKV * R)]

    def run_mask(self, grp: Group, t: int, run: int, i0: int, i1: int) -> torch.Tensor:
        """~mask of rows i0:i1 of a group over one run of its slots: [n, 1, bq, w]."""
        m = grp.masks[run] if run < len(grp.masks) else None
        if m is not None:
            return m[i0:i1]
        return self._eval_mask(grp, t, run, i0, i1)

    def _eval_mask(self, grp, t, run, i0, i1):
        bp = self.bp
        s0, s1 = grp.runs[run]
        bq, bk = self.bq, self.bk
        h = torch.tensor(t) if len(self.plan.tables) > 1 else None
        out = torch.empty(i1 - i0, 1, bq, (s1 - s0) * bk, dtype=torch.bool)
        for a0, b0 in chunks(i1 - i0, bq * (s1 - s0) * bk):
            a, b = i0 + a0, i0 + b0
            rows = grp.rows_t[a:b]
            kb = grp.kidx_t[a:b, s0:s1]
            qi = self.qtok[rows].unsqueeze(2)  # [n, bq, 1]
            ki = self.ktok[kb].reshape(b - a, 1, -1)  # [n, 1, w]
            val = token_mask(bp, self.run, qi, ki, h)
            val = val & self.qvalid[rows].unsqueeze(2) & self.kvalid[kb].reshape(b - a, 1, -1)
            out[a - i0:b - i0, 0] = ~val
        return out

    def content_mask(self, grp, t, run, i0, i1, crun: RunInputs, hkv: int, gsl: slice,
                     hsl: slice):
        """~mask of a content-dependent pattern (it reads q and k): rows i0:i1 of a group over
        one run of its slots, for (batch, kv head) pairs gsl and query heads hsl of each GQA
        group: [Gc, n, rq, bq, w] (or [1, n, 1, bq, w], broadcast, when every batch and head
        has the same mask)."""
        bp = self.bp
        s0, s1 = grp.runs[run]
        h = torch.tensor(t) if len(self.plan.tables) > 1 else None
        n = i1 - i0
        rows = grp.rows_t[i0:i1]
        kb = grp.kidx_t[i0:i1, s0:s1]
        qi = self.qtok[rows].unsqueeze(2)  # [n, bq, 1]
        ki = self.ktok[kb].reshape(n, 1, -1)  # [n, 1, w]
        val = predicate(bp, context(bp, qi, ki, h), crun)
        qv, kv = self.qvalid[rows], self.kvalid[kb]
        if not bool(qv.all()):  # padding rows or keys (past the end): a pass each, if any
            val = val & qv.unsqueeze(2)
        if not bool(kv.all()):
            val = val & kv.reshape(n, 1, -1)
        while val.dim() < 5:
            val = val.unsqueeze(0)
        if val.shape[0] == 1 and val.shape[1] == 1:
            # one mask for every batch and head (a selection shared by the heads): returned
            # broadcastable, [1, n, 1, bq, w], never copied per head
            return ~val[0, 0].expand(n, self.bq, ki.shape[-1]).unsqueeze(1).unsqueeze(0)
        B, H = crun.content[0].shape[:2]
        val = val.expand(B, H, n, self.bq, ki.shape[-1])
        val = val.reshape(B * hkv, H // hkv, *val.shape[2:])[gsl, hsl]
        return ~val.transpose(1, 2)


def cpu_plan(plan: Plan, cache: bool = True) -> CpuPlan:
    """What the CPU backend derives from a plan, built once per plan (or, for a call's own
    plan, which no other call shares, every time)."""
    if not cache:
        return _derive(plan.bound, plan, plan.run)
    return caches.CPU_PLANS.get_or_create(plan, lambda: _derive(plan.bound, plan, plan.run))


def _positions(order, block, used=None):
    """Each position's row-major token (padding: a real token), the row of the call's
    tensor it reads, validity, and the inverse (None: identity); with `used`, the rows of
    those blocks only (a row-major range never reads a perm)."""
    nb = -(-order.length // block)
    if order.identity:
        ids = (torch.arange(nb, dtype=torch.int64) if used is None
               else torch.from_numpy(used))
        tok = order.start + ids.view(-1, 1) * block + torch.arange(block).view(1, -1)
        valid = tok < order.start + order.length
        tok = tok.clamp_(max=max(order.start, order.start + order.length - 1))
        return tok, tok - order.start, valid, None
    perm = padded_perm(order, block)
    src = np.full(perm.size, -1, dtype=np.int64)
    src[:order.length] = order.source_rows()
    src = src.reshape(perm.shape)
    if used is not None:
        perm, src = perm[used], src[used]
    tok = torch.from_numpy(np.maximum(perm, 0))
    valid = torch.from_numpy(perm >= 0)
    pos = torch.from_numpy(np.maximum(src, 0))
    return tok, pos, valid, torch.from_numpy(order.inverse())


def _derive(bp: BoundPattern, plan: Plan, run: RunInputs) -> CpuPlan:
    qtok, qpos, qvalid, qinv = _positions(plan.qorder, plan.block_q)
    used = np.unique(np.concatenate([np.asarray(x, dtype=np.int64) for t in plan.tables
                                     for x in (t.full_idx, t.part_idx)]))
    tables = plan.tables
    if 2 * len(used) <= plan.nkb:  # keys in a compact layout of the listed blocks only
        where = np.full(plan.nkb, -1, dtype=np.int64)
        where[used] = np.arange(len(used))
        tables = [dataclasses.replace(t, full_idx=where[t.full_idx], part_idx=where[t.part_idx])
                  for t in tables]
    else:
        used = None
    ktok, kpos, kvalid, kinv = _positions(plan.korder, plan.block_k, used)
    groups = [_groups(t, plan.nqb) for t in tables]
    keyless = [torch.from_numpy(np.nonzero((np.diff(t.full_off) + np.diff(t.part_off)) == 0)[0])
               for t in plan.tables]
    cp = CpuPlan(bp, plan, run, groups, qtok, qpos, ktok, kpos, qvalid, kvalid, qinv, kinv,
                 keyless)
    cp.compact = used is not None
    total = sum(len(g.rows) * (s1 - s0) for gs in groups for g in gs for s0, s1 in g.runs)
    cp.cache_masks = (not bp.content_dependent
                      and total * plan.block_q * plan.block_k <= MASK_CACHE)
    for t, gs in enumerate(groups):
        for g in gs:
            if not cp.cache_masks:
                g.masks = [None] * len(g.runs)
                continue
            g.masks = [cp._eval_mask(g, t, r, 0, len(g.rows)) for r in range(len(g.runs))]
            if not g.any_full and g.runs:
                hit = torch.zeros(len(g.rows), 1, plan.block_q, dtype=torch.bool)
                for m in g.masks:
                    hit |= (~m).any(dim=-1)
                if not hit.all():
                    g.empty = (~hit).unsqueeze(-1)
    return cp


def _groups(table, nqb: int) -> list[Group]:
    """Query blocks grouped by (number of key blocks, positions of the PARTIAL ones)."""
    fo, fi = table.full_off.astype(np.int64), table.full_idx.astype(np.int64)
    po, pi = table.part_off.astype(np.int64), table.part_idx.astype(np.int64)
    nf, npart = np.diff(fo), np.diff(po)
    deg = nf + npart
    cols = np.concatenate([fi, pi])
    flag = np.concatenate([np.zeros(len(fi), dtype=bool), np.ones(len(pi), dtype=bool)])
    rr = np.concatenate([np.repeat(np.arange(nqb), nf), np.repeat(np.arange(nqb), npart)])
    order = np.lexsort((cols, rr))
    cols, flag = cols[order], flag[order]
    off = np.zeros(nqb + 1, dtype=np.int64)
    np.cumsum(deg, out=off[1:])
    by_key: dict = {}
    for r in np.nonzero(deg)[0]:
        f = flag[off[r]:off[r + 1]]
        by_key.setdefault((int(deg[r]), np.packbits(f).tobytes()), []).append(r)
    out = []
    for (d, _), rs in sorted(by_key.items(), key=lambda kv: kv[1][0]):
        rs = np.asarray(rs, dtype=np.int64)
        kidx = cols[off[rs][:, None] + np.arange(d)[None, :]]
        f = flag[off[rs[0]]:off[rs[0]] + d]
        runs = []
        for j in np.nonzero(f)[0].tolist():
            if runs and runs[-1][1] == j:
                runs[-1][1] = j + 1
            else:
                runs.append([j, j + 1])
        if len(runs) > MAX_RUNS:
            runs = [[runs[0][0], runs[-1][1]]]
        runs = [tuple(r) for r in runs]
        covered = sum(b - a for a, b in runs)
        contiguous = bool((np.diff(rs) == 1).all())
        step = None
        inner = bool((kidx - kidx[:, :1] == np.arange(d)[None, :]).all())
        if contiguous and inner:
            s = np.diff(kidx[:, 0])
            if len(s) == 0:
                step = 0
            elif (s == s[0]).all() and s[0] >= 0:
                step = int(s[0])
        out.append(Group(rs, kidx, runs, bool(covered < d), contiguous, step,
                          torch.from_numpy(rs), torch.from_numpy(kidx)))
    return out
