"""Per-call block tables of content-dependent patterns (chunk_topk, DHSA).

A plan of such a pattern lists a static superset: every pair causality allows. A call's
selection (semantics/dynamic.py) keeps a few chunks per query block; the pairs worth
computing are the superset's pairs whose query rows meet a selection row that kept a key of
the key block, plus the pairs attended whatever the selection keeps (`plan.unselected`).
Both compiled backends compute only those: Triton per (batch, head), the CPU on their union.
"""

from __future__ import annotations

import numpy as np
import torch

from attndsl.codegen.plan.tables import BlockTable, Plan, table_pair
from attndsl.lang import ir
from attndsl.lang.walk import walk
from attndsl.semantics.dynamic import Selection, select


def pair_matrix(tab: BlockTable, nqb: int, nkb: int, full: bool = True, part: bool = True
                ) -> torch.Tensor:
    """bool [nqb, nkb]: the pairs a table lists (FULL, PARTIAL or both)."""
    m = torch.zeros(nqb, nkb, dtype=torch.bool)
    for on, off, idx in ((full, tab.full_off, tab.full_idx), (part, tab.part_off,
                                                                tab.part_idx)):
        if on:
            r = np.repeat(np.arange(nqb), np.diff(off))
            m[torch.from_numpy(r), torch.from_numpy(idx.astype(np.int64))] = True
    return m


def selection(plan: Plan, conf: dict, q: torch.Tensor, k: torch.Tensor, starts):
    """The call's selection as the kernels read it: keep [B, H, rows + 1, N] (a last row
    that keeps nothing, for the tail's queries), each query's row [N], the row count + 1,
    N, and the block pairs it keeps a key of, bool [B, H, nqb, nkb]."""
    conf = {c: v for c, v in conf.items() if c != "starts"}
    dev = q.device
    with torch.no_grad():
        keep, first = select(q.detach(), k.detach(), Selection(**conf), starts,
                             _call_span(plan.bound))
        n = q.shape[2]
        B, H = q.shape[0], q.shape[1]
        keep = torch.cat([keep.expand(B, H, *keep.shape[2:]),
                          torch.zeros(B, H, 1, n, dtype=torch.bool, device=dev)], 2)
        nb = keep.shape[2]
        toks = torch.arange(n, device=dev)
        row_of = torch.where(toks < first, toks // conf["block"], nb - 1)
        qmap = _row_map(plan, row_of, nb, n)
        cols = torch.arange(plan.nkb * plan.block_k, device=dev).clamp(max=n - 1)
        cmap = torch.zeros(n, plan.nkb, device=dev)
        cmap[cols, cols // plan.block_k] = 1.0
        sel = (qmap @ keep.float() @ cmap) > 0
    return keep, row_of, nb, n, sel


def _row_map(plan: Plan, row_of: torch.Tensor, nb: int, n: int) -> torch.Tensor:
    """float [nqb, nb]: 1 where a query block holds a query of that selection row."""
    rows = torch.arange(plan.nqb * plan.block_q, device=row_of.device).clamp(max=n - 1)
    qmap = torch.zeros(plan.nqb, nb, device=row_of.device)
    qmap[rows // plan.block_q, row_of[rows]] = 1.0
    return qmap


def _call_span(bp):
    """Where the pattern calls chunk_topk (bad boundaries are reported there)."""
    for _, rule, _ in () if bp is None else bp.rules:
        for x in walk(rule.expr):
            if isinstance(x, ir.Call) and x.ref == "dynamic" and x.func == "chunk_topk":
                return x.span
    return None


def whole_blocks(plan: Plan, keep: torch.Tensor, row_of: torch.Tensor, n: int
                 ) -> torch.Tensor:
    """bool [B, H, nqb, nkb]: the pairs whose every query's selection row keeps every key of
    the key block (there chunk_topk is true throughout)."""
    B, H, nb, _ = keep.shape
    pad = plan.nkb * plan.block_k - n
    kk = torch.nn.functional.pad(keep, (0, pad), value=True)
    kfull = kk.view(B, H, nb, plan.nkb, plan.block_k).all(-1).float()  # [B, H, nb, nkb]
    return (_row_map(plan, row_of, nb, n) @ (1.0 - kfull)) == 0


def selected_plan(plan: Plan, conf: dict, q: torch.Tensor, k: torch.Tensor, starts) -> Plan:
    """`plan` with the pairs the call's selection keeps for some batch, one table per query
    head (one for all when the heads select alike), and those attended whatever it keeps.
    FULL: those FULL whatever it keeps, and those FULL when it keeps everything where every
    batch keeps the whole key block; every other pair is PARTIAL (its mask, evaluated per
    call, is exact)."""
    nqb, nkb = plan.nqb, plan.nkb
    keep, row_of, _, n, sel = selection(plan, conf, q, k, starts)
    with torch.no_grad():
        whole = whole_blocks(plan, keep, row_of, n).all(0).cpu()  # [H, nqb, nkb]
    sel = sel.any(0).cpu()
    if bool((sel == sel[:1]).all()) and bool((whole == whole[:1]).all()):
        sel, whole = sel[:1], whole[:1]
    free = plan.unselected[0]
    free_full = pair_matrix(free, nqb, nkb, part=False)
    free_any = pair_matrix(free, nqb, nkb)
    dense = pair_matrix(plan.tables[0], nqb, nkb)
    sel_full = pair_matrix(plan.selected[0], nqb, nkb, part=False) if plan.selected else None
    tables, transposed = [], []
    for h in range(sel.shape[0]):
        full = free_full | (whole[h] & sel_full) if sel_full is not None else free_full
        part = ((sel[h] & dense) | free_any) & ~full
        fi, fj = (x.numpy() for x in torch.nonzero(full, as_tuple=True))
        pi, pj = (x.numpy() for x in torch.nonzero(part, as_tuple=True))
        t, tt = table_pair(fi, fj, pi, pj, nqb, nkb, plan.tables[0].needed)
        tables.append(t)
        transposed.append(tt)
    return Plan(plan.qorder, plan.korder, plan.block_q, plan.block_k, tuple(tables),
                tuple(transposed), plan.build_seconds, plan.bound, plan.run, plan.summary,
                plan.orders_tried, plan.unselected, plan.selected)
