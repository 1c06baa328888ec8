"""ContextParallel: attention of a sequence sharded over the ranks of a torch.distributed
group, each rank receiving exactly the key blocks its queries attend (docs/distributed.md).

Per call: one all-to-all moves K/V blocks to the ranks whose query blocks list them
(started first, so it overlaps the local blocks); each rank computes its queries against
its own keys and against the received ones through its backend's core, on plans restricted
to those blocks (codegen/plan/tables.restrict), and merges the two through their
log-sum-exps; summary tokens are pooled from the partial pools of the ranks holding their
members, sent only to the ranks whose queries attend them (summary.py).
Backward returns dK/dV partial sums to the owners of the keys the same way.
"""

from __future__ import annotations

import hashlib
import math
from types import MappingProxyType

import numpy as np
import torch
import torch.distributed as dist

from attndsl.codegen.plan.orders import padded_perm
from attndsl.distributed import comm, summary
from attndsl.distributed.dispatch import DISPATCHES
from attndsl.distributed.plan import RankPlan, problem, rank_plan, shardable
from attndsl.errors import InputError, ParameterError, UnsupportedError, did_you_mean
from attndsl.semantics.attention import (
    Call,
    extended_attend,
    merge,
    merge_lse,
    route_gates,
    scale_of,
)
from attndsl.semantics.inputs import FLOAT_DTYPES, RunInputs, validate

META_WORDS = 4  # int64 words each rank contributes to the per-call agreement check


class ContextParallel:
    """Attention of `op` over a sequence sharded across `group` (default: the whole world).

    `shard(x)` is this rank's share of x [..., N, D] (tokens on axis -2, in the dispatch's
    order), `unshard(x_local)` the whole tensor again on every rank (collective), and
    `cp(q_local, k_local, v_local, **inputs)` this rank's attention output, forward and
    backward. Run-time inputs are passed whole, the same on every rank, to each of them."""

    def __init__(self, op, group=None, *, dispatch: str = "balanced", backend: str = "auto"):
        if not dist.is_available() or not dist.is_initialized():
            raise UnsupportedError("ContextParallel needs torch.distributed initialised "
                                   "(torch.distributed.init_process_group, or torchrun)")
        if dispatch not in DISPATCHES:
            raise ParameterError(f"dispatch must be one of {', '.join(DISPATCHES)}, not "
                                 f"{dispatch!r}" + did_you_mean(str(dispatch), DISPATCHES))
        self.op = op
        self.bp = op.bound  # raises for a family op: the sizes must be known to shard
        shardable(self.bp)
        if self.bp.content_dependent:
            raise UnsupportedError(f"pattern '{self.bp.name}' chooses its keys from q and k "
                                   "(content): its communication is not known in advance",
                                   self.bp.checked.span)
        self.group = group
        self.dispatch = dispatch
        self.backend = backend
        self.rank = dist.get_rank(group)
        self.ranks = dist.get_world_size(group)
        self._last = None  # (RankPlan, figures of the last call)
        # the plans for the run-time inputs of no call yet: errors surface here, not mid-run
        if not any(not spec.optional for spec in self.bp.inputs.values()):
            self._plan({})

    # -- layout
    def _plan(self, inputs: dict) -> RankPlan:
        run = validate(self.bp, inputs, for_mask=True)
        prob = problem(self.bp, self.op.block_q, self.op.block_k, run)
        return rank_plan(prob, self.ranks, self.rank, self.dispatch)

    def tokens(self, **inputs) -> torch.Tensor:
        """The tokens this rank holds (row-major indices, in its local order)."""
        return torch.from_numpy(self._plan(inputs).tokens)

    def received(self, **inputs) -> torch.Tensor:
        """The key tokens this rank receives from other ranks per call (row-major indices,
        in the order they arrive)."""
        return torch.from_numpy(self._plan(inputs).recv_tokens)

    def shard(self, x: torch.Tensor, /, **inputs) -> torch.Tensor:
        """This rank's tokens of x [..., N, D] (axis -2), in the dispatch's order."""
        rp = self._plan(inputs)
        _tokens_axis(x, self.bp.nq, "x")
        return x.index_select(-2, torch.from_numpy(rp.tokens).to(x.device))

    def unshard(self, x_local: torch.Tensor, /, **inputs) -> torch.Tensor:
        """Every rank's shard put back in token order [..., N, D] on every rank (a
        collective; differentiable)."""
        rp = self._plan(inputs)
        lay = rp.layout
        held = lay.held()
        _tokens_axis(x_local, int(held[self.rank]), "x_local")
        pad = int(held.max()) - x_local.shape[-2]
        xp = torch.nn.functional.pad(x_local, (0, 0, 0, pad)) if pad else x_local
        every = comm.gather(xp, self.group)  # [ranks, ..., max held, D]
        parts = [every[r][..., :int(held[r]), :] for r in range(self.ranks)]
        whole = torch.cat(parts, dim=-2)
        order = np.concatenate([self._tokens_of(rp, r) for r in range(self.ranks)])
        inv = np.empty_like(order)
        inv[order] = np.arange(len(order))
        return whole.index_select(-2, torch.from_numpy(inv).to(x_local.device))

    @staticmethod
    def _tokens_of(rp: RankPlan, r: int) -> np.ndarray:
        perm = padded_perm(rp.problem.order, rp.problem.block)[rp.layout.blocks[r]].reshape(-1)
        return perm[perm >= 0]

    # -- attention
    def __call__(self, q, k, v, /, *, scale: float | None = None, **inputs) -> torch.Tensor:
        """This rank's output [B, H, n, Dv] for its queries q [B, H, n, D] against every key
        its queries attend; k, v [B, Hkv, n, D] are this rank's keys and values."""
        bp = self.bp
        _check(bp, q, k, v)
        run = validate(bp, inputs, q.device, q.shape[0])
        rp = self._plan(inputs)
        n = len(rp.tokens)
        if q.shape[2] != n or k.shape[2] != n:
            raise InputError(f"rank {self.rank} holds {n} tokens: q, k and v must have {n} "
                             f"(cp.shard(x)), not {q.shape[2]} and {k.shape[2]}",
                             bp.checked.span)
        meta = self._agree(rp, q, k, v, run)
        from attndsl.api import core_for
        core = core_for(self.backend, bp, q)
        if not getattr(core, "runs_plans", False):
            raise UnsupportedError(f"backend '{getattr(core, 'name', self.backend)}' cannot "
                                   "run restricted plans; use backend 'cpu', 'triton' or "
                                   "'reference'", bp.checked.span)
        core.check(bp, q, k, v)
        scale = scale_of(bp, q, scale)
        ex = None
        dep = comm.order(q, k, v)  # the backward's collectives in one order on every rank
        if rp.moves:
            ex = comm.Exchange(torch.from_numpy(rp.send_rows).to(k.device), rp.send_splits,
                               rp.recv_splits, self.group)
            k, v = comm.launch(k, v, ex)
        parts = rp.problem.parts
        tokens = torch.from_numpy(rp.tokens).to(q.device)
        summary_bytes = [0]
        loc = (summary.local(q, k, v, tokens, [self._tokens_of(rp, r)
                                                for r in range(self.ranks)],
                             self.group, summary_bytes)
               if any(sub.summaries for sub, _ in parts) else None)
        calls, outs = [], []
        for i, (sub, _) in enumerate(parts):
            sub_run = run.part(sub) if bp.average else run
            gates = None
            if sub.route is not None:
                names = (sub.route[0], sub.route_opts.weighted, sub.route_opts.grouped)
                mine = {n: x.index_select(1, tokens) if n in names and x is not None else x
                        for n, x in sub_run.values.items()}  # this rank's tokens' routing
                gates = route_gates(sub, RunInputs(MappingProxyType(mine)), q.shape[1])
            call = Call(sub, q, k, v, sub_run, scale, gates, True, rp.local[i].block_q,
                        rp.local[i].block_k, softcap=sub.softcap, plan=rp.local[i])
            calls.append(call)
            outs.append(core.direct(call))
        if ex is not None:
            kr, vr, dep = comm.land(k, v, ex, dep)
        results = []
        for i, (sub, _) in enumerate(parts):
            call = calls[i]
            out, lse = outs[i]
            if ex is not None and rp.remote[i] is not None:
                far = core.direct(Call(sub, q, kr, vr, call.run, scale, call.gates, True,
                                       call.block_q, call.block_k, softcap=sub.softcap,
                                       plan=rp.remote[i]))
                out, lse = merge(out, lse, *far, with_lse=True)
            elif ex is not None:  # nothing received: still in the graph, for the backward
                out = out + (kr.sum() + vr.sum()).to(out.dtype) * 0
            if sub.summaries:
                toks, dep = summary.summary_tokens(sub, loc, call.run, scale, dep)
                if toks is not None:
                    out, lse = merge_lse(out, lse, *core.summary(call, *toks))
                first = 0  # the driver's own summaries, as semantics/attention.py runs them
                for bs in sub.summaries:
                    if not bs.extended:
                        continue
                    *got, dep = summary.extended_tokens(sub, bs, loc, call.run, scale, dep)
                    out, lse = merge_lse(out, lse, *extended_attend(call, bs, *got, first,
                                                                    qidx=tokens))
                    first += math.prod(bs.sizes)
            if call.gates is not None:
                out = out * call.gates.to(out.dtype).unsqueeze(-1)
            results.append(out)
        out = results[0] if len(results) == 1 else sum(results) / len(results)
        if dep.requires_grad:
            out = out + (dep * 0).to(out.dtype)
        self._last = (rp, {"ex": ex, "meta": meta, "summary": summary_bytes,
                           "row": (k.shape[0] * k.shape[1] * (k.shape[3] + v.shape[3])
                                   * k.element_size())})
        return out.to(q.dtype)

    def _agree(self, rp: RankPlan, q, k, v, run) -> int:
        """Every rank must run the same plan (same pattern, inputs and shapes) or the
        exchange would mismatch: compare digests (one small all-gather), fail on all ranks
        alike. Returns the bytes this rank sent for it."""
        route = () if self.bp.route is None else (self.bp.route[0],)
        h = hashlib.sha256(repr((
            self.bp.name, sorted(self.bp.values.items()), self.dispatch, self.ranks,
            run.without(*route).fingerprint, tuple(q.shape[:2]), tuple(k.shape[:2]),
            q.shape[3], v.shape[3], str(q.dtype),
            (q.requires_grad, k.requires_grad, v.requires_grad))).encode()).digest()
        mine = torch.tensor([int.from_bytes(h[i:i + 8], "little", signed=True)
                             for i in range(0, 8 * META_WORDS, 8)], dtype=torch.int64)
        every = [torch.empty_like(mine) for _ in range(self.ranks)]
        dist.all_gather(every, mine, group=self.group)
        if any(not torch.equal(e, mine) for e in every):
            raise InputError("the ranks disagree on the pattern, run-time inputs, shapes, dtype"
                             " or which of q, k, v need gradients: every rank must pass the "
                             "same (run-time inputs whole)", self.bp.checked.span)
        return mine.numel() * mine.element_size() * (self.ranks - 1)

    # -- figures
    def stats(self) -> dict:
        """This rank's figures for the last call: tokens, attended pairs, K/V payload bytes
        received and sent (forward), dK/dV payload bytes (backward), metadata bytes, summary
        bytes, and what ring attention and an all-gather would move for this rank."""
        if self._last is None:
            raise InputError("cp.stats() describes the last call: call cp(q, k, v) first")
        rp, fig = self._last
        lay, r, row = rp.layout, self.rank, fig["row"]
        recv = int(lay.received()[r])
        sent = int(lay.sent()[r])
        ex = fig["ex"]
        others = int(lay.held().sum()) - int(lay.held()[r])
        return {
            "rank": r, "ranks": self.ranks, "dispatch": self.dispatch,
            "tokens": int(lay.held()[r]), "pairs": int(lay.pairs()[r]),
            "pairs_exact": rp.problem.exact,
            "kv_tokens_received": recv, "kv_tokens_sent": sent,
            "kv_bytes_received": recv * row, "kv_bytes_sent": sent * row,
            "grad_bytes_received": sent * row, "grad_bytes_sent": recv * row,
            "kv_bytes_moved": 0 if ex is None else ex.kv_bytes,
            "grad_bytes_moved": 0 if ex is None else ex.grad_bytes,
            "meta_bytes": fig["meta"], "summary_bytes": fig["summary"][0],
            "ring_kv_bytes": others * row, "allgather_kv_bytes": others * row,
        }


def _tokens_axis(x, n: int, name: str) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() < 2:
        raise InputError(f"{name} must be a tensor [..., tokens, dim], not "
                         f"{getattr(x, 'shape', type(x).__name__)}")
    if x.shape[-2] != n:
        raise InputError(f"{name} has {x.shape[-2]} tokens on axis -2, not {n}")


def _check(bp, q, k, v) -> None:
    """The local tensors' kinds, ranks, dtypes and heads (their token counts: the caller)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise InputError(f"{name} must be a tensor [batch, heads, tokens, dim], not "
                             f"{getattr(t, 'shape', type(t).__name__)}", bp.checked.span)
        if t.dtype not in FLOAT_DTYPES:
            raise InputError(f"{name} must be float16, bfloat16, float32 or float64, not "
                             f"{t.dtype}", bp.checked.span)
    if not (q.dtype == k.dtype == v.dtype) or not (q.device == k.device == v.device):
        raise InputError("q, k, v must share one dtype and one device", bp.checked.span)
    if q.shape[0] != k.shape[0] or k.shape[:3] != v.shape[:3]:
        raise InputError(f"q, k, v must share the batch, and k, v their heads and tokens: "
                         f"{list(q.shape)}, {list(k.shape)}, {list(v.shape)}", bp.checked.span)
    if k.shape[1] == 0 or q.shape[1] % k.shape[1]:
        raise InputError(f"query heads ({q.shape[1]}) must be a multiple of key/value heads "
                         f"({k.shape[1]})", bp.checked.span)
    if q.shape[3] != k.shape[3] or q.shape[3] == 0 or v.shape[3] == 0:
        raise InputError(f"q and k need one head dim (at least 1), and v at least 1: "
                         f"{q.shape[3]}, {k.shape[3]}, {v.shape[3]}", bp.checked.span)
    if bp.heads is not None and q.shape[1] != bp.heads:
        raise InputError(f"pattern '{bp.name}' is declared for {bp.heads} heads; q has "
                         f"{q.shape[1]}", bp.checked.span)
