"""Attention dropout, defined once: a counter-based hash of (seed, batch x head, query, key)
decides which attention probabilities are kept. Forward and backward redraw the same mask
without storing it, and every backend (reference, cpu, triton) draws the same one, so a
fixed seed reproduces a result exactly and backends can be checked against each other."""

from __future__ import annotations

import torch

M32 = 0xFFFFFFFF
MUL = 0x45D9F3B  # < 2^27: products of 32-bit values stay inside int64


def mix(x):
    """A bijective mix of 32-bit values (Python ints or int64 tensors)."""
    x = (((x >> 16) ^ x) * MUL) & M32
    x = (((x >> 16) ^ x) * MUL) & M32
    return (x >> 16) ^ x


def threshold(p: float) -> int:
    """Keep a probability when its hash is at least this (drop rate p)."""
    return min(M32 + 1, int(round(p * 2.0**32)))


def keep(seed: int, bh, q, k, p: float):
    """Whether the probability of query q and key k (token indices; summary row r counts as
    key Nk + r) of batch x head bh survives dropout at rate p (broadcast int64 tensors)."""
    h = mix(mix(mix((bh ^ seed) & M32) ^ (q & M32)) ^ (k & M32))
    return h >= threshold(p)


def draw_seed(generator: torch.Generator | None = None, device=None) -> int:
    """A 32-bit seed from a torch generator (the global one when None)."""
    return int(torch.randint(0, 2**32 - 1, (), generator=generator, dtype=torch.int64,
                             device=generator.device if generator is not None else "cpu"))
