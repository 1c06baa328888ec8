"""Synthetic recall tasks, generated on the fly from a torch.Generator (no global RNG).

Every batch says, for each answer, which input positions it depends on: a contiguous range
[lo, hi] whose last position `hi` holds the value to recall. A model can answer only if its
L-layer reach from the answer position covers the whole range (coverage.py); the distance
of an answer is `position - hi`. Labels are -100 where there is no answer, so loss and
accuracy count answer positions only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from attndsl.errors import ParameterError

TASKS = ("mqar", "passkey", "copy")
IGNORE = -100


@dataclass(frozen=True)
class Batch:
    inputs: torch.Tensor  # int64 [B, N]
    labels: torch.Tensor  # int64 [B, N]; IGNORE where there is no answer
    lo: torch.Tensor  # int64 [B, N]: first position the answer depends on (-1: none)
    hi: torch.Tensor  # int64 [B, N]: the value's position (-1: none)


@dataclass(frozen=True)
class Task:
    """A recall task at one size. `items`: key-value pairs (mqar) or tokens to copy (copy);
    `power_a`: MQAR's power law of query gaps (Zoology's default 0.01); `distance`: a fixed
    passkey distance (None: uniform over every distance the length allows)."""

    name: str
    seq_len: int = 128
    vocab: int = 256
    items: int = 8
    power_a: float = 0.01
    distance: int | None = None

    def __post_init__(self):
        if self.name not in TASKS:
            raise ParameterError(f"unknown task '{self.name}': choose one of "
                                 + ", ".join(TASKS))
        for field in ("seq_len", "vocab", "items"):
            v = getattr(self, field)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ParameterError(f"{field} must be a positive int, not {v!r}")
        n, v, m = self.seq_len, self.vocab, self.items
        if self.name == "mqar":
            if n % 2 or n < 4 * m:
                raise ParameterError(f"mqar needs an even seq_len of at least 4 * items "
                                     f"(the pairs and as many queries): {4 * m} for {m} "
                                     f"pairs, not {n}")
            if v % 2 or v // 2 - 1 < m:
                raise ParameterError(f"mqar draws keys from 1..vocab/2-1 and values from "
                                     f"vocab/2..vocab-1: an even vocab of at least "
                                     f"{2 * m + 2} for {m} distinct pairs, not {v}")
            if not (isinstance(self.power_a, int | float) and 0 < self.power_a <= 1):
                raise ParameterError(f"power_a must be in (0, 1], not {self.power_a!r}")
        elif self.name == "passkey":
            if n < 2 or v < 6:
                raise ParameterError(f"passkey needs seq_len >= 2 and vocab >= 6 (filler, at "
                                     f"least two passkeys and the question), not {n} and {v}")
            d = self.distance
            if d is not None and (isinstance(d, bool) or not isinstance(d, int)
                                  or not 1 <= d <= n - 1):
                raise ParameterError(f"passkey distance must be an int in 1..{n - 1} "
                                     f"(seq_len - 1), not {d!r}")
        else:
            if n < 2 * m or v < 3:
                raise ParameterError(f"copy needs seq_len >= 2 * items ({2 * m}) and vocab "
                                     f">= 3, not {n} and {v}")

    @property
    def answers_per_sequence(self) -> int:
        return 1 if self.name == "passkey" else self.items

    @property
    def choices(self) -> int:
        """How many tokens an answer can be: chance accuracy is 1 / choices."""
        if self.name == "mqar":
            return self.vocab - self.vocab // 2
        return self.vocab - 1 - self.vocab // 2 if self.name == "passkey" else self.vocab - 2

    @property
    def chance(self) -> float:
        return 1.0 / self.choices

    def describe(self) -> str:
        n, v, m = self.seq_len, self.vocab, self.items
        if self.name == "mqar":
            return (f"MQAR: N={n}, vocab {v}, {m} key-value pairs, queries at power-law gaps "
                    f"(a={self.power_a})")
        if self.name == "passkey":
            where = (f"distance {self.distance}" if self.distance is not None
                     else f"distances 1..{n - 1}")
            return f"passkey: N={n}, vocab {v}, {where}"
        return f"selective copy: N={n}, vocab {v}, {m} tokens among noise"

    def to_json(self) -> dict:
        return {"name": self.name, "seq_len": self.seq_len, "vocab": self.vocab,
                "items": self.items, "power_a": self.power_a, "distance": self.distance,
                "answers_per_sequence": self.answers_per_sequence, "chance": self.chance}

    def sample(self, batch: int, g: torch.Generator) -> Batch:
        """`batch` sequences drawn from `g` (the same generator state gives the same batch)."""
        return {"mqar": _mqar, "passkey": _passkey, "copy": _copy}[self.name](self, batch, g)


def _empty(b: int, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    full = torch.full((b, n), IGNORE, dtype=torch.int64)
    return full, torch.full((b, n), -1, dtype=torch.int64), torch.full((b, n), -1,
                                                                        dtype=torch.int64)


def _distinct(b: int, lo: int, hi: int, k: int, g: torch.Generator) -> torch.Tensor:
    """[b, k] distinct ints from lo..hi-1 per row, uniformly."""
    return torch.rand(b, hi - lo, generator=g).argsort(dim=1)[:, :k] + lo


def _mqar(t: Task, b: int, g: torch.Generator) -> Batch:
    """Zoology's multi-query associative recall (Arora et al. 2023, arXiv 2312.04927): the
    pairs k1 v1 ... km vm first (keys from the lower half of the vocabulary, values from the
    upper half, distinct within a sequence), then each key once more at an even offset
    2 * gap after them, the gaps drawn without replacement with probability proportional to
    gap^(a-1); the answer at a repeated key is its value. Other positions are random tokens
    from the whole vocabulary."""
    n, v, m = t.seq_len, t.vocab, t.items
    ctx, half = 2 * m, v // 2
    keys = _distinct(b, 1, half, m, g)
    vals = _distinct(b, half, v, m, g)
    x = torch.randint(0, v, (b, n), generator=g)
    x[:, 0:ctx:2] = keys
    x[:, 1:ctx:2] = vals
    space = (n - ctx) // 2
    logp = (t.power_a - 1.0) * torch.log(torch.arange(1, space + 1, dtype=torch.float64))
    # Gumbel top-k: m gaps without replacement, each draw proportional to p (as numpy's
    # choice(replace=False, p=p) draws them, in the same order)
    u = torch.rand(b, space, generator=g, dtype=torch.float64).clamp_min(1e-300)
    gaps = (logp - torch.log(-torch.log(u))).topk(m, dim=1).indices
    where = ctx + 2 * gaps
    x.scatter_(1, where, keys)
    y, lo, hi = _empty(b, n)
    y.scatter_(1, where, vals)
    value_pos = (1 + 2 * torch.arange(m)).expand(b, m)
    hi.scatter_(1, where, value_pos)
    lo.scatter_(1, where, value_pos - 1)
    return Batch(x, y, lo, hi)


def _passkey(t: Task, b: int, g: torch.Generator) -> Batch:
    """Passkey retrieval (as in Mohtashami and Jaggi 2023, arXiv 2305.16300): filler tokens,
    one passkey somewhere in them and a question token at the end whose answer is the
    passkey. As numbers stand out of filler text there, filler comes from the lower half of
    the vocabulary and passkeys from the upper half (the last token is the question), so
    the answer depends on the passkey's position alone."""
    n, v = t.seq_len, t.vocab
    half, ask = v // 2, v - 1
    x = torch.randint(0, half, (b, n), generator=g)
    if t.distance is None:
        d = torch.randint(1, n, (b,), generator=g)
    else:
        d = torch.full((b,), t.distance, dtype=torch.int64)
    key_pos = (n - 1 - d).view(-1, 1)
    key = torch.randint(half, ask, (b, 1), generator=g)
    x.scatter_(1, key_pos, key)
    x[:, n - 1] = ask
    y, lo, hi = _empty(b, n)
    y[:, n - 1:] = key
    hi[:, n - 1:] = key_pos
    lo[:, n - 1:] = key_pos
    return Batch(x, y, lo, hi)


def _copy(t: Task, b: int, g: torch.Generator) -> Batch:
    """Selective copying (Gu and Dao 2023, Mamba, arXiv 2312.00752): `items` tokens at random
    positions among noise tokens, then `items` marker positions where the model writes them
    in order. The j-th answer depends on every position up to its token (which tokens come
    before it decides which one is the j-th)."""
    n, v, m = t.seq_len, t.vocab, t.items
    content, noise, mark = v - 2, v - 2, v - 1
    region = n - m
    pos = _distinct(b, 0, region, m, g).sort(dim=1).values
    toks = torch.randint(0, content, (b, m), generator=g)
    x = torch.full((b, n), noise, dtype=torch.int64)
    x.scatter_(1, pos, toks)
    x[:, region:] = mark
    y, lo, hi = _empty(b, n)
    y[:, region:] = toks
    hi[:, region:] = pos
    lo[:, region:] = 0
    return Batch(x, y, lo, hi)


def default_test_sequences(task: Task, answers: int = 8192) -> int:
    """Enough test sequences for about `answers` answers."""
    return max(1, math.ceil(answers / task.answers_per_sequence))
