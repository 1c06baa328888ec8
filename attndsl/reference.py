"""The reference backend: the dense oracle core. Scores, bias, softcap, the mask and a safe
softmax, written as plainly as PyTorch allows; everything around them (averaging, channel
tokens, the scale, summary tokens, routing) is the shared driver's (semantics/attention.py).

O(N^2) by design, float64 capable, and bounded by REFERENCE_LIMIT score entries so that
huge sizes fail fast instead of exhausting memory.
"""

from __future__ import annotations

import math

import torch

from attndsl.errors import SizeLimitError
from attndsl.semantics.attention import attend, softcapped
from attndsl.semantics.dropout import keep
from attndsl.semantics.masks import bias, dense_mask

REFERENCE_LIMIT = 1 << 26  # batch x heads x queries x (keys + summary tokens)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Scores and sums are float64 for float64 inputs, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


class Reference:
    """The dense core of backend='reference' (the Core protocol of semantics/attention.py)."""

    name = "reference"
    runs_plans = True  # call.plan: its orders say which tokens q and k hold

    def check(self, bp, q, k, v) -> None:
        B, H = q.shape[:2]
        Nq, Nk = bp.nq, bp.nk  # channel tokens: the channels, not q's positions
        r_total = sum(math.prod(s.sizes) for s in bp.summaries)
        n = B * H * Nq * (Nk + r_total)
        if n > REFERENCE_LIMIT:
            raise SizeLimitError(
                f"the reference backend holds all {B}x{H}x{Nq}x{Nk + r_total} = "
                f"{n:,} scores at once, over its limit of {REFERENCE_LIMIT:,} (2^26); use "
                "smaller sizes", bp.checked.span)

    def direct(self, call):
        """(out [B, H, M, Dv], lse [B, H, M]) over the pattern's direct keys."""
        bp, q, k, v = call.bp, call.q, call.k, call.v
        cdt = compute_dtype(q.dtype)
        rep = q.shape[1] // k.shape[1]
        k = k.repeat_interleave(rep, dim=1).to(cdt)
        v = v.repeat_interleave(rep, dim=1).to(cdt)
        B, H, M, _ = q.shape
        Nk = k.shape[2]
        qidx, kidx = _tokens(call)
        mask = dense_mask(bp, call.run, q.device, call.rows, (qidx, kidx)).expand(B, H, M, Nk)
        if call.key_valid is not None:
            mask = mask & call.key_valid.view(B, 1, 1, Nk)
        logits = (q.to(cdt) @ k.transpose(-1, -2)) * call.scale
        qidx, kidx = qidx.view(-1, 1), kidx.view(1, -1)
        b = bias(bp, call.run, qidx, kidx, torch.arange(H, device=q.device).view(-1, 1, 1),
                 cdt)
        if b is not None:
            logits = logits + b
        return attend(softcapped(logits, call.softcap), mask, v,
                      *_dropout(call, B, H, qidx, kidx))

    def summary(self, call, ks, vs, att):
        """Attention over summary tokens ks, vs [B, H, R, D] where att [.., M, R] allows:
        the softcap applies, the bias does not."""
        q = call.q.to(ks.dtype)
        logits = softcapped((q @ ks.transpose(-1, -2)) * call.scale, call.softcap)
        B, H, M, R = logits.shape
        nk = call.bp.nk
        qidx = _tokens(call)[0].view(-1, 1)
        ridx = torch.arange(nk, nk + R, device=q.device).view(1, -1)  # summary rows: keys Nk+r
        return attend(logits, att.expand(logits.shape), vs, *_dropout(call, B, H, qidx, ridx))


def _tokens(call) -> tuple[torch.Tensor, torch.Tensor]:
    """The query and key token each row of q and k holds: rows q_start.. against every key,
    or what the call's plan says."""
    dev = call.q.device
    if call.plan is not None:
        return (torch.from_numpy(call.plan.qorder.held_tokens()).to(dev),
                torch.from_numpy(call.plan.korder.held_tokens()).to(dev))
    first, m = call.rows
    return (torch.arange(first, first + m, device=dev),
            torch.arange(call.k.shape[2], device=dev))


def _dropout(call, B: int, H: int, qidx, kidx) -> tuple:
    """(kept [B, H, M, N], p) of the call's dropout, or () without dropout."""
    if not call.dropout_p:
        return ()
    bh = torch.arange(B * H, device=qidx.device).view(B, H, 1, 1)
    return (keep(call.seed, bh, qidx, kidx, call.dropout_p), call.dropout_p)
