"""backend="cpu": block-sparse attention on the CPU, from the same exact block tables as the
compiled kernels (codegen/plan/); plan.py groups the work. Most calls run flash.c's native
kernels or ATen's flash kernel (fused.py; fused.path decides); this module is the Cpu core,
the autograd function, and the generic path, in batched matrix products, described here.

Query blocks whose key-block lists have the same length and the same PARTIAL positions form a
group. A group is cut into work items of at most BUDGET scores; an item is one batched product
Q K^T over [query block rows, its gathered key blocks], the score modifications (scale, bias,
softcap), the mask on its PARTIAL key blocks only, a softmax and one batched product with V.
Every (batch, kv head) pair of one item shares one product, the query heads of a GQA group
stacked as rows, so K and V are never repeated. Groups whose key blocks are consecutive,
shifting windows (sliding windows) read K and V through strided views instead of gathers.
Rows too long for one item are cut into key pieces merged through their log-sum-exps.

The backward (a custom autograd.Function that keeps only q, k, v, the output and the split
rows' log-sum-exps) recomputes each item's probabilities: dV = P^T dO, dS = P (dO V^T -
rowsum(dO O)) (times 1 - tanh^2 under a softcap), dQ = dS K scale, dK = dS^T Q scale, the key
gradients scattered into their key blocks.

Patterns whose masks read q and k (DHSA's chunk_topk) evaluate their PARTIAL blocks' masks
per call, per (batch, head), on the blocks the call's selection keeps for some batch or
head (codegen/plan/dynamic.py), out of the plan's static superset. The rows'
log-sum-exps are an output when the driver merges summary tokens through them, and the
backward differentiates them too (delta - dlse).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from attndsl.codegen.cpu import fused
from attndsl.codegen.cpu.plan import CpuPlan, Group, cpu_plan
from attndsl.codegen.emit import dynamic_config
from attndsl.codegen.plan.dynamic import selected_plan
from attndsl.codegen.plan.tables import plan_for
from attndsl.errors import InputError, SizeLimitError, UnsupportedError
from attndsl.reference import Reference
from attndsl.semantics.bind import BoundPattern
from attndsl.semantics.dropout import keep
from attndsl.semantics.masks import bias

BUDGET = 1 << 20  # scores per work item (4 MiB in float32): the working set stays in cache
CPU_LIMIT = 1 << 31  # elements of q, k, v and the output held at once (checked before any)
TOKEN_LIMIT = 1 << 26  # queries or keys of one space the CPU backend plans for
STRIDED_GROUPS = 16  # at most this many (batch, kv head) products per strided item


# ------------------------------------------------------------------ entry point


class Cpu:
    """The core of backend='cpu' (the Core protocol of semantics/attention.py): the direct
    keys block-sparse, the few summary tokens densely as the reference does."""

    name = "cpu"
    summary = Reference.summary
    runs_plans = True  # runs call.plan when given (semantics/attention.Call)

    def check(self, bp: BoundPattern, q, k, v) -> None:
        if q.device.type != "cpu":
            raise InputError(f"backend 'cpu' takes CPU tensors, not {q.device}; use "
                             "backend='triton' or 'reference'", bp.checked.span)
        if bp.head_dependent and bp.heads is None:
            raise UnsupportedError("per-head rules need a 'heads N' declaration",
                                   bp.checked.span)
        held = cpu_elements(q, k, v)
        if held > CPU_LIMIT:
            raise SizeLimitError(f"the CPU backend holds q, k, v and the output in block layout"
                                 f" ({held:,} elements), over its limit of {CPU_LIMIT:,} "
                                 "(2^31); use smaller sizes", bp.checked.span)
        if max(bp.nq, bp.nk) > TOKEN_LIMIT:
            raise SizeLimitError(f"the CPU backend plans {max(bp.nq, bp.nk):,} tokens, over its "
                                 f"limit of {TOKEN_LIMIT:,} (2^26) per space", bp.checked.span)

    def direct(self, call):
        bp = call.bp
        cdt = torch.float64 if call.q.dtype == torch.float64 else torch.float32
        mask_run = call.run if bp.route is None else call.run.without(bp.route[0])
        bq = call.block_q
        if bq is None and call.partial and call.rows[1] <= 16:
            bq = 16  # decoding: a block of a few rows, not 64 rows of which one is real
        plan = call.plan or plan_for(bp, bq, call.block_k, mask_run, rows=call.rows,
                                     target=_target(call, cdt))
        cp = cpu_plan(plan)
        content = None
        if bp.content_dependent:  # the PARTIAL blocks' masks read q and k: per call
            content = tuple(x.detach() for x in call.run.content)
            conf = dynamic_config(bp)
            if (call.plan is None and not call.partial and plan.unselected
                    and len(plan.tables) == 1 and conf is not None):
                # only the blocks the call's selection keeps (for some batch or head)
                starts = call.run.values.get(conf["starts"]) if conf.get("starts") else None
                cp = cpu_plan(selected_plan(plan, conf, *content, starts), cache=False)
        extra = _Extra(call.key_valid, call.seed if call.dropout_p else None, call.dropout_p,
                       call.softcap, call.gates)
        out, lse = _Attention.apply(call.q, call.k, call.v, cp, call.scale, cdt, content,
                                    call.need_lse, extra)
        return out, (lse if call.need_lse else None)


def _target(call, cdt) -> str:
    """The planner a call's blocks come from: "cpu" when flash.c runs it, else "cpu-aten"
    (tables.BLOCK_CHOICES)."""
    way = fused.path(call.bp, d=call.q.shape[-1], dv=call.v.shape[-1], cdt=cdt,
                     dropout=bool(call.dropout_p), padding=call.key_valid is not None,
                     content=call.bp.content_dependent, softcap=call.softcap)
    return "cpu" if way == "native" else "cpu-aten"


@dataclass(frozen=True)
class _Extra:
    """Per-call additions to the plan's masks: padding keys [B, Nk], dropout, the softcap."""

    key_valid: torch.Tensor | None = None
    seed: int | None = None
    p: float = 0.0
    softcap: float | None = None
    gates: torch.Tensor | None = None  # MoH's [B, H, M]: query blocks whose gates are all 0
    # are skipped (the driver multiplies the output by the gates)


def cpu_elements(q, k, v) -> int:
    """What a call holds at once, in elements: q, k and v copied into block layout and
    the output [B, H, Nq, Dv] (channel tokens: q's shape, the same count)."""
    B, H, Nq, _ = q.shape
    return q.numel() + k.numel() + v.numel() + B * H * Nq * v.shape[3]


def supported(bp: BoundPattern) -> bool:
    """Whether backend='cpu' runs this pattern (what backend='auto' asks)."""
    if bp.average:
        return all(supported(sub) for sub in bp.average)
    return not (bp.head_dependent and bp.heads is None)


# ------------------------------------------------------------------ layouts


def _to_blocks(x, tok, order_identity, groups, cdt):
    """[B, Hx, N, D] -> [B * groups, nb, Hx / groups, block, D] in the plan's token order
    (tok: [nb, block], the token at each position; padding positions hold a real token's
    row), converted to cdt (a view of x when that is the same layout; never written to)."""
    B, Hx, N, D = x.shape
    nb, block = tok.shape
    if order_identity and nb * block == N and Hx == groups and x.dtype == cdt and (
            x.is_contiguous()):
        return x.view(B * groups, nb, 1, block, D)  # the same layout: no copy
    if not (order_identity and nb * block == N):
        x = x.index_select(2, tok.reshape(-1))
    out = torch.empty(B, groups, nb, Hx // groups, block, D, dtype=cdt)
    out.permute(0, 1, 3, 2, 4, 5).copy_(x.reshape(B, groups, Hx // groups, nb, block, D))
    return out.view(B * groups, nb, Hx // groups, block, D)


def _positions_of_blocks(x, B, groups):
    """[B * groups, nb, r, block, D] -> [B, groups * r, nb * block, D], in position order."""
    _, nb, r, block, D = x.shape
    return x.view(B, groups, nb, r, block, D).permute(0, 1, 3, 2, 4, 5).reshape(
        B, groups * r, nb * block, D)


def _from_blocks(x, inv, n_tokens, B, groups, dtype):
    """[B * groups, nb, r, block, D] -> [B, groups * r, N, D] in row-major token order."""
    y = _positions_of_blocks(x, B, groups)
    y = y[:, :, :n_tokens] if inv is None else y.index_select(2, inv)
    return y.to(dtype)


def _scatter_blocks(x, tok, valid, n_tokens, B, groups, dtype):
    """Gradients of a compact key layout (some blocks only) -> [B, groups * r, N, D], zero
    at the keys no block holds."""
    y = _positions_of_blocks(x, B, groups)
    sel = valid.reshape(-1).nonzero().squeeze(1)
    out = y.new_zeros(*y.shape[:2], n_tokens, y.shape[3])
    out.index_copy_(2, tok.reshape(-1)[sel], y.index_select(2, sel))
    return out.to(dtype)


class _Scratch:
    """Work buffers reused by every item of a call (fresh large allocations page-fault)."""

    def __init__(self, dtype):
        self.dtype = dtype
        self.bufs: dict = {}

    def __call__(self, name: str, *shape: int) -> torch.Tensor:
        n = math.prod(shape)
        b = self.bufs.get(name)
        if b is None or b.numel() < n:
            b = self.bufs[name] = torch.empty(n, dtype=self.dtype)
        return b[:n].view(shape)


@dataclass
class _Ctx:
    """One call's tensors in block layout (see _to_blocks)."""

    cp: CpuPlan
    qs: torch.Tensor  # [G, nqb, R, bq, D]
    k: torch.Tensor  # [G, nkb, bk, D]
    v: torch.Tensor  # [G, nkb, bk, Dv]
    B: int
    HKV: int
    R: int
    scale: float
    cdt: torch.dtype
    scratch: _Scratch = None
    content: object = None  # RunInputs with (q, k) for content-dependent masks, one per call
    need_lse: bool = False  # every row's log-sum-exp (summary tokens merge through it)
    kvalid: torch.Tensor | None = None  # [B, nkb, bk] padding keys False (per call)
    seed: int | None = None  # dropout's seed, or None
    p_drop: float = 0.0
    softcap: float | None = None  # the call's cap * tanh(s / cap), or None

    def passes(self) -> list:
        return self.cp.passes(self.B, self.HKV, self.R)

    def items(self):
        """Every work item of the call, pass by pass, group by group."""
        R = self.R
        if self.qs.shape[0] == 0:  # batch 0
            return
        for t, gsel, hsl, head in self.passes():
            rq = R if head is None else 1
            for grp in self.cp.groups[t]:
                for i0, i1, g0, g1, pieces in _cuts(self, grp, gsel[2], rq):
                    yield _Item(self, t, grp, head, gsel, hsl, rq, i0, i1, g0, g1, pieces)


def _cuts(ctx: _Ctx, grp: Group, gcount: int, rq: int):
    """A group cut into items of about BUDGET scores: (i0, i1, g0, g1, pieces): rows i0:i1
    of the group, (batch, kv head) pairs g0:g1 of the pass, and the key slot pieces of a
    row too long for one item (None: all of them at once)."""
    bq, bk = ctx.cp.bq, ctx.cp.bk
    n, slots = len(grp.rows), grp.slots
    per = rq * bq * slots * bk  # one row, one (batch, kv head)
    if rq == 0 or gcount == 0:  # no query heads (or no batch): nothing to compute
        return
    if per <= BUDGET * 3 // 2:
        if per * gcount <= BUDGET:
            step = max(1, BUDGET // (per * gcount))
            # equal items: the last one is not a sliver
            step = -(-n // -(-n // step))
            for i0 in range(0, n, step):
                yield i0, min(n, i0 + step), 0, gcount, None
        else:
            gs = max(1, BUDGET // per)
            for i0 in range(n):
                for g0 in range(0, gcount, gs):
                    yield i0, i0 + 1, g0, min(gcount, g0 + gs), None
        return
    ps = max(1, BUDGET // (rq * bq * bk))
    pieces = [(s, min(slots, s + ps)) for s in range(0, slots, ps)]
    for i0 in range(n):
        for g0 in range(gcount):
            yield i0, i0 + 1, g0, g0 + 1, pieces


# ------------------------------------------------------------------ one item


@dataclass
class _Item:
    """Rows i0:i1 of a group, for (batch, kv head) pairs g0:g1 of one pass."""

    ctx: _Ctx
    t: int  # table
    grp: Group
    head: int | None  # the one query head of a per-head pass
    gsel: tuple  # (first, stride, count) of the pass's (batch, kv head) pairs
    hsl: slice  # the pass's query heads within a GQA group
    rq: int  # query heads per row block
    i0: int
    i1: int
    g0: int
    g1: int
    pieces: list | None

    @property
    def n(self) -> int:
        return self.i1 - self.i0

    @property
    def gc(self) -> int:
        return self.g1 - self.g0

    @property
    def gslice(self) -> slice:
        start, stride, _ = self.gsel
        return slice(start + self.g0 * stride, start + (self.g1 - 1) * stride + 1, stride)

    @property
    def rows(self):
        if self.grp.contiguous:
            r0 = int(self.grp.rows[self.i0])
            return slice(r0, r0 + self.n)
        return self.grp.rows_t[self.i0:self.i1]

    @property
    def strided(self) -> bool:
        """Key blocks read through strided views of k and v (no gathers)."""
        return self.grp.step is not None and self.pieces is None and self.gc <= STRIDED_GROUPS

    def g_list(self) -> range:
        return range(*self.gslice.indices(self.ctx.qs.shape[0]))

    def rows4(self, x):
        """This item's rows of x [G, nqb, R, bq, D]: [Gc, n, rq * bq, D], a view when the
        rows are consecutive."""
        x = x[self.gslice, :, self.hsl]
        rows = self.rows
        y = x[:, rows] if isinstance(rows, slice) else x.index_select(1, rows)
        return y.view(self.gc, self.n, self.rq * self.ctx.cp.bq, x.shape[-1])

    def kv(self, x, s0, s1, name):
        """Key blocks kidx[:, s0:s1] of x (k or v): per g strided views [n, w, D], or one
        gathered [Gc, n, w, D] tensor."""
        G, nkb, bk, D = x.shape
        grp = self.grp
        if self.strided:
            start = int(grp.kidx[self.i0, s0])
            size = (self.n, (s1 - s0) * bk, D)
            stride = (grp.step * bk * D, D, 1)
            return [x.as_strided(size, stride, x.storage_offset() + (g * nkb + start) * bk * D)
                    for g in self.g_list()]
        idx = self.flat_kidx(s0, s1)
        out = self.ctx.scratch(name, len(idx), bk * D)
        torch.index_select(x.view(G * nkb, bk * D), 0, idx, out=out)
        return out.view(self.gc, self.n, (s1 - s0) * bk, D)

    def flat_kidx(self, s0, s1):
        nkb = self.ctx.k.shape[1]
        start, stride, _ = self.gsel
        g = torch.arange(start + self.g0 * stride, start + (self.g1 - 1) * stride + 1, stride)
        return (g.view(-1, 1, 1) * nkb + self.grp.kidx_t[self.i0:self.i1, s0:s1].unsqueeze(0)
                ).reshape(-1)

    def bias(self, s0, s1):
        """The bias statements' sum on this item's (query, key) pairs: [n, 1, bq, w]."""
        cp = self.ctx.cp
        if not cp.bp.biases:
            return None
        rows = self.grp.rows_t[self.i0:self.i1]
        qi = cp.qtok[rows].view(self.n, 1, cp.bq, 1)
        ki = cp.ktok[self.grp.kidx_t[self.i0:self.i1, s0:s1]].reshape(self.n, 1, 1, -1)
        return bias(cp.bp, cp.run, qi, ki, None, self.ctx.cdt, head=self.head)

    def batches(self) -> torch.Tensor:
        """The batch element of each (batch, kv head) pair of the item."""
        return torch.tensor([g // self.ctx.HKV for g in self.g_list()])

    def key_valid(self, s0, s1):
        """Padding keys of slots s0:s1, per batch: [Gc, n, 1, 1, w] bool, or None."""
        kv = self.ctx.kvalid
        if kv is None:
            return None
        sel = kv[self.batches()][:, self.grp.kidx_t[self.i0:self.i1, s0:s1]]  # [Gc,n,s,bk]
        return sel.reshape(self.gc, self.n, 1, 1, -1)

    def kept(self, s0, s1):
        """Dropout's scaled keep mask on slots s0:s1: [Gc, n, rq * bq, w], or None."""
        ctx, cp = self.ctx, self.ctx.cp
        if ctx.seed is None:
            return None
        g = torch.tensor(list(self.g_list()))
        first = 0 if self.hsl.start is None else self.hsl.start
        heads = (g % ctx.HKV).view(-1, 1) * ctx.R + first + torch.arange(self.rq).view(1, -1)
        bh = ((g // ctx.HKV).view(-1, 1) * ctx.HKV * ctx.R + heads).view(-1, 1, self.rq, 1, 1)
        qi = cp.qtok[self.grp.rows_t[self.i0:self.i1]].view(1, self.n, 1, cp.bq, 1)
        ki = cp.ktok[self.grp.kidx_t[self.i0:self.i1, s0:s1]].reshape(1, self.n, 1, 1, -1)
        z = keep(ctx.seed, bh, qi, ki, ctx.p_drop).to(ctx.cdt).mul_(1.0 / (1.0 - ctx.p_drop))
        return z.view(self.gc, self.n, self.rq * cp.bq, -1)

    def scores(self, q4, kv, s0, s1):
        """Scores [Gc, n, rq * bq, w] with bias, softcap and the PARTIAL slots' mask; and
        the softcap's tanh (for the backward) or None."""
        cp, sc = self.ctx.cp, self.ctx.scratch
        bq, bk = cp.bq, cp.bk
        w = (s1 - s0) * bk
        s = _mm(q4, kv, sc("s", self.gc, self.n, self.rq * bq, w), sc, transpose=True,
                alpha=self.ctx.scale)
        s5 = s.view(self.gc, self.n, self.rq, bq, w)
        b = self.bias(s0, s1)
        if b is not None:
            s5.add_(b)
        tanh = None
        cap = self.ctx.softcap
        if cap is not None:
            tanh = s.div_(cap).tanh_()
            s = torch.mul(tanh, cap, out=sc("sc", *s.shape))
            s5 = s.view(self.gc, self.n, self.rq, bq, w)
        for r, (a, e) in enumerate(self.grp.runs):
            lo, hi = max(a, s0), min(e, s1)
            if lo < hi:
                if self.ctx.content is None:
                    m = cp.run_mask(self.grp, self.t, r, self.i0, self.i1)
                else:
                    m = cp.content_mask(self.grp, self.t, r, self.i0, self.i1,
                                        self.ctx.content, self.ctx.HKV, self.gslice,
                                        self.hsl)
                s5[..., (lo - s0) * bk:(hi - s0) * bk].masked_fill_(
                    m[..., (lo - a) * bk:(hi - a) * bk], float("-inf"))
        valid = self.key_valid(s0, s1)
        if valid is not None:
            s5.masked_fill_(~valid, float("-inf"))
        return s, tanh

    def fix_empty(self, x):
        """Rows with no key at all (a softmax of 0 / 0): zero rows of x [Gc, n, rq * bq, *]."""
        grp, cp = self.grp, self.ctx.cp
        if self.ctx.kvalid is not None:  # padding can empty any row
            return x.nan_to_num_(0.0)
        if grp.any_full:
            return x
        if not cp.cache_masks:
            return x.nan_to_num_(0.0)
        if grp.empty is not None:
            x.view(self.gc, self.n, self.rq, cp.bq, -1).masked_fill_(
                grp.empty[self.i0:self.i1].view(1, self.n, 1, cp.bq, 1), 0.0)
        return x


def _flat(x, scratch, name):
    """[Gc, n, a, b] -> [Gc * n, a, b]: a view, or a copy in scratch."""
    shape = (x.shape[0] * x.shape[1], x.shape[2], x.shape[3])
    if x.is_contiguous():
        return x.view(shape)
    buf = scratch(name, *shape)
    buf.view(x.shape).copy_(x)
    return buf


def _mm(a, kv, out, scratch, transpose=False, alpha=1.0):
    """out = alpha a @ kv (kv^T with `transpose`) for 4-D a [Gc, n, m, d] and out
    [Gc, n, m, w]: kv a list of Gc per-g views [n, *, *] or one [Gc, n, *, *] tensor."""
    def mm(x, y, o):
        if alpha == 1.0:
            torch.bmm(x, y, out=o)
        else:
            torch.baddbmm(o, x, y, beta=0.0, alpha=alpha, out=o)

    if isinstance(kv, list):
        if out[0].is_contiguous():
            for j, x in enumerate(kv):
                mm(a[j], x.transpose(1, 2) if transpose else x, out[j])
            return out
    else:
        kv = kv.view(-1, *kv.shape[2:])
    o3 = out.view(-1, *out.shape[2:]) if out.is_contiguous() else scratch("mm", *out.shape)
    if isinstance(kv, list):
        o4 = o3.view(out.shape)
        for j, x in enumerate(kv):
            mm(a[j], x.transpose(1, 2) if transpose else x, o4[j])
    else:
        mm(_flat(a, scratch, "mma"), kv.transpose(1, 2) if transpose else kv,
           o3.view(-1, *out.shape[2:]))
    if o3.data_ptr() != out.data_ptr() or not out.is_contiguous():
        out.copy_(o3.view(out.shape))
    return out


def _softmax(s, out):
    return torch.ops.aten._softmax.out(s, -1, False, out=out)


# ------------------------------------------------------------------ forward / backward


def _forward(ctx: _Ctx):
    G, nqb, R, bq, D = ctx.qs.shape
    Dv = ctx.v.shape[-1]
    o = torch.empty(G, nqb, R, bq, Dv, dtype=ctx.cdt)
    for t, (start, stride, _), hsl, _ in ctx.passes():  # query blocks without keys: 0
        if len(ctx.cp.keyless[t]):
            o[start::stride, :, hsl].index_fill_(1, ctx.cp.keyless[t], 0.0)
    lse = None
    if ctx.need_lse:
        lse = torch.full((G, nqb, R, bq, 1), float("-inf"), dtype=ctx.cdt)
    for it in ctx.items():
        q4 = it.rows4(ctx.qs)
        direct = isinstance(it.rows, slice)
        dst = it.rows4(o) if direct else ctx.scratch("o", it.gc, it.n, it.rq * bq, Dv)
        if it.pieces is None:
            lse_rows = _item_forward(it, q4, dst)
            if lse is not None:
                lse[it.gslice, :, it.hsl][:, it.rows] = lse_rows.view(
                    it.gc, it.n, it.rq, bq, 1)
        else:
            if lse is None:
                lse = torch.full((G, nqb, R, bq, 1), float("-inf"), dtype=ctx.cdt)
            out, lse_rows = _split_forward(it, q4)
            dst.copy_(out)
            lse[it.gslice, :, it.hsl][:, it.rows] = lse_rows.view(
                it.gc, it.n, it.rq, bq, 1)
        if not direct:
            o[it.gslice, :, it.hsl][:, it.rows] = dst.view(it.gc, it.n, it.rq, bq, Dv)
    return o, lse


def _item_forward(it: _Item, q4, dst):
    """The item's output, into dst [Gc, n, rq * bq, Dv]; its rows' log-sum-exps
    [Gc, n, rq * bq, 1] (-inf: no key) when the call needs them, else None."""
    ctx = it.ctx
    slots = it.grp.slots
    s, _ = it.scores(q4, it.kv(ctx.k, 0, slots, "k"), 0, slots)
    p = _softmax(s, ctx.scratch("p", *s.shape))
    lse = torch.logsumexp(s, dim=-1, keepdim=True) if ctx.need_lse else None
    z = it.kept(0, slots)
    if z is not None:
        p = p.nan_to_num_(0.0).mul_(z)
    _mm(p, it.kv(ctx.v, 0, slots, "v"), dst, ctx.scratch)
    it.fix_empty(dst)
    return lse


def _split_forward(it: _Item, q4):
    """Rows whose key slots come in pieces: the softmax merged across the pieces."""
    ctx = it.ctx
    m = acc = den = None
    for s0, s1 in it.pieces:
        s, _ = it.scores(q4, it.kv(ctx.k, s0, s1, "k"), s0, s1)
        mp = s.amax(dim=-1, keepdim=True)
        m_new = mp if m is None else torch.maximum(m, mp)
        safe = torch.where(torch.isinf(m_new), torch.zeros_like(m_new), m_new)
        p = s.sub_(safe).exp_()
        v = it.kv(ctx.v, s0, s1, "v")
        z = it.kept(s0, s1)
        pz = p if z is None else p * z
        pv = _mm(pz, v, torch.empty(*p.shape[:3], v.shape[-1], dtype=ctx.cdt), ctx.scratch)
        if m is None:
            acc, den = pv, p.sum(dim=-1, keepdim=True)
        else:
            c = torch.exp(torch.where(torch.isinf(m), m, m - safe))
            acc = acc.mul_(c).add_(pv)
            den = den.mul_(c).add_(p.sum(dim=-1, keepdim=True))
        m = m_new
    out = acc / torch.where(den > 0, den, torch.ones_like(den))
    lse = torch.where(den > 0, m + torch.log(den), torch.full_like(den, float("-inf")))
    return out, lse


def _backward(ctx: _Ctx, o, lse, do, dlse=None):
    """dq [G, nqb, R, bq, D] (for the unscaled q), dk, dv in block layout; dlse: the
    gradient of the rows' log-sum-exps [G, nqb, R, bq, 1] or None (it adds p dlse to dS)."""
    G, nqb, R, bq, D = ctx.qs.shape
    _, nkb, bk, Dv = ctx.v.shape
    sc = ctx.scratch
    delta = (do * o).sum(dim=-1, keepdim=True)  # [G, nqb, R, bq, 1]
    if dlse is not None:
        delta.sub_(torch.where(torch.isinf(lse), torch.zeros_like(dlse), dlse))
    dq = torch.zeros_like(ctx.qs)
    dk = torch.zeros_like(ctx.k)
    dv = torch.zeros_like(ctx.v)
    dk_f, dv_f = dk.view(G * nkb, bk * D), dv.view(G * nkb, bk * Dv)
    for it in ctx.items():
        q4 = it.rows4(ctx.qs)
        do4 = it.rows4(do)
        dl4 = it.rows4(delta)
        lse4 = None
        if it.pieces is not None:
            lse4 = it.rows4(lse)
            lse4 = torch.where(torch.isinf(lse4), torch.zeros_like(lse4), lse4)
        dq4 = sc("dq", *q4.shape)
        for j, (s0, s1) in enumerate(it.pieces or [(0, it.grp.slots)]):
            k = it.kv(ctx.k, s0, s1, "k")
            v = it.kv(ctx.v, s0, s1, "v")
            s, tanh = it.scores(q4, k, s0, s1)
            if lse4 is None:
                p = it.fix_empty(_softmax(s, sc("p", *s.shape)))
            else:
                p = s.sub_(lse4).exp_()
            idx = it.flat_kidx(s0, s1)
            z = it.kept(s0, s1)
            if z is not None:  # dropout: dV = (P Z)^T dO, dS = P (Z (dO V^T) - delta)
                p = p.nan_to_num_(0.0)
            pz = p if z is None else p * z
            p3 = pz.reshape(-1, *p.shape[2:])
            dv_part = torch.bmm(p3.transpose(1, 2), _flat(do4, sc, "do"),
                                out=sc("dv", p3.shape[0], p3.shape[2], Dv))
            dv_f.index_add_(0, idx, dv_part.view(-1, bk * Dv))
            dp = _mm(do4, v, sc("dp", *p.shape), sc, transpose=True)
            if z is not None:
                dp.mul_(z)
            ds = dp.sub_(dl4).mul_(p)
            if tanh is not None:
                ds.mul_(tanh.mul_(tanh).neg_().add_(1.0))
            ds3 = ds.view(-1, *ds.shape[2:])
            dk_part = torch.bmm(ds3.transpose(1, 2), _flat(q4, sc, "q"),
                                out=sc("dk", p3.shape[0], p3.shape[2], D))
            dk_f.index_add_(0, idx, dk_part.view(-1, bk * D))
            if j == 0:
                _mm(ds, k, dq4, sc)
            else:
                dq4.add_(_mm(ds, k, sc("dq2", *q4.shape), sc))
        dq[it.gslice, :, it.hsl][:, it.rows] = dq4.view(it.gc, it.n, it.rq, bq, D)
    dq.mul_(ctx.scale)
    dk.mul_(ctx.scale)
    return dq, dk, dv


def _block_ctx(cp: CpuPlan, q, k, v, scale, cdt, content, need_lse, extra: _Extra) -> _Ctx:
    """q, k, v in the plan's block layout, and the call's per-call facts."""
    B, H, _, _ = q.shape
    HKV = k.shape[1]
    plan = cp.plan
    qs = _to_blocks(q, cp.qpos, plan.qorder.identity, HKV, cdt)
    kid = plan.korder.identity and not cp.compact
    kb = _to_blocks(k, cp.kpos, kid, HKV, cdt).squeeze(2)
    vb = _to_blocks(v, cp.kpos, kid, HKV, cdt).squeeze(2)
    crun = None if content is None else cp.run.with_content(content)
    kvalid = None
    if extra.key_valid is not None:  # into the plan's key order and blocks
        kvalid = extra.key_valid[:, cp.kpos.reshape(-1)].view(B, *cp.ktok.shape)
        kvalid = kvalid & cp.kvalid.view(1, *cp.ktok.shape)
    return _Ctx(cp, qs, kb, vb, B, HKV, H // HKV, scale, cdt, _Scratch(cdt), crun, need_lse,
                kvalid, extra.seed, extra.p, extra.softcap)


class _Attention(torch.autograd.Function):
    """q, k, v [B, H, N, D] -> out [B, H, Nq, Dv] in the compute dtype."""

    @staticmethod
    def forward(fctx, q, k, v, cp: CpuPlan, scale: float, cdt, content, need_lse,
                extra: _Extra):
        B, H, Nq, D = q.shape
        HKV = k.shape[1]
        fctx.args = (cp, scale, cdt, content, need_lse, extra)
        way = fused.path(cp.bp, d=D, dv=v.shape[-1], cdt=cdt, dropout=extra.seed is not None,
                         padding=extra.key_valid is not None, content=content is not None,
                         softcap=extra.softcap, blocks=(cp.bq, cp.bk))
        active = None
        if way != "generic" and extra.gates is not None:
            active = fused.active_blocks(cp, extra.gates, HKV)
        if way == "native":
            out, lse = fused.native_attention(cp, q.to(cdt), k.to(cdt), v.to(cdt), scale,
                                              active)
            # the backward reads the output: saved, so that an in-place edit of it is caught
            fctx.save_for_backward(q, k, v, out)
            fctx.state = (None, None, lse, None, active)
        else:
            fctx.save_for_backward(q, k, v)  # (views are used: in-place edits are caught)
            ctx = _block_ctx(cp, q, k, v, scale, cdt, content, need_lse, extra)
            raw = None
            if way == "fused":
                o, raw, lse = fused.forward(ctx, active)
            else:
                active = None
                o, lse = _forward(ctx)
            fctx.state = (ctx, o, lse, raw, active)
            out = _from_blocks(o, cp.qinv, Nq, B, HKV, cdt)
            lse = _from_blocks(lse, cp.qinv, Nq, B, HKV, cdt).squeeze(-1) if need_lse else None
        if need_lse:
            lse_out = lse.to(cdt)
        else:
            lse_out = torch.empty(0, dtype=cdt)
            fctx.mark_non_differentiable(lse_out)
        return out, lse_out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(fctx, dout, dlse):
        q, k, v, *saved_out = fctx.saved_tensors  # (raises if one changed in place)
        ctx, o, lse, raw, active = fctx.state
        if saved_out:
            o = saved_out[0]
        cp, scale, cdt, content, need_lse, extra = fctx.args
        plan = cp.plan
        no_dl = not (need_lse and dlse is not None and dlse.numel())
        if ctx is None and no_dl:  # the native forward, and its backward
            dq, dk, dv = fused.native_backward(cp, q.to(cdt), k.to(cdt), v.to(cdt), o, lse,
                                               dout.to(cdt), scale, active)
            return (dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None,
                    None, None, None)
        if ctx is None:  # the native forward: its output and lse into block layout
            ctx = _block_ctx(cp, q, k, v, scale, cdt, content, need_lse, extra)
            o = _to_blocks(o, cp.qpos, plan.qorder.identity, ctx.HKV, cdt)
            lse = _to_blocks(lse.unsqueeze(-1), cp.qpos, plan.qorder.identity, ctx.HKV, cdt)
            raw = lse.masked_fill(torch.isneginf(lse), 0.0)
        dtype, qshape, kshape = q.dtype, q.shape, k.shape
        B, _, Nq, _ = qshape
        do = _to_blocks(dout, cp.qpos, plan.qorder.identity, ctx.HKV, ctx.cdt)
        dl = None
        if ctx.need_lse and dlse is not None and dlse.numel():
            dl = _to_blocks(dlse.unsqueeze(-1), cp.qpos, plan.qorder.identity, ctx.HKV,
                            ctx.cdt)
            if dl.data_ptr() == dlse.data_ptr():
                dl = dl.clone()
        if not bool(cp.qvalid.all()):
            valid = cp.qvalid.view(1, plan.nqb, 1, cp.bq, 1).to(ctx.cdt)
            do.mul_(valid)
            if dl is not None:
                dl.mul_(valid)
        if raw is not None and dl is None:
            dq, dk, dv = fused.backward(ctx, o, raw, do, active)
        else:
            dq, dk, dv = _backward(ctx, o, lse, do, dl)
        dq = _from_blocks(dq, cp.qinv, Nq, B, ctx.HKV, dtype)
        if cp.compact:
            dk = _scatter_blocks(dk.unsqueeze(2), cp.kpos, cp.kvalid, kshape[2], B, ctx.HKV,
                                 dtype)
            dv = _scatter_blocks(dv.unsqueeze(2), cp.kpos, cp.kvalid, kshape[2], B, ctx.HKV,
                                 dtype)
        else:
            dk = _from_blocks(dk.unsqueeze(2), cp.kinv, kshape[2], B, ctx.HKV, dtype)
            dv = _from_blocks(dv.unsqueeze(2), cp.kinv, kshape[2], B, ctx.HKV, dtype)
        return dq, dk, dv, None, None, None, None, None, None, None
