"""A tiny causal language model with `power_attention` layers: trained on a copy task on the
CPU, then generating token by token with attndsl's KV cache.

Each training sequence is 15 random tokens, a separator, and the same 15 tokens again; the
loss counts only the copied half. After training, the model completes prompts (the tokens
and the separator) greedily, once recomputing the whole prefix at every step and once with
`attndsl.nn.KVCache` (each step attends one new query over the cached keys: q_start). Both
give the same tokens; the script prints accuracy and tokens per second for each, then the
same comparison on longer prompts, where the cache matters more.

Run from anywhere: `python examples/lm_generate.py` (about half a minute on 2 cores).
"""

from __future__ import annotations

import sys
import time

import torch
from torch import nn

from attndsl.nn import Attention, KVCache

VOCAB, SEP, COPY = 16, 16, 15  # tokens 0..15, then the separator
LEN = 2 * COPY + 1


class Block(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        # a family op: every call takes N from its input, so one layer serves every length
        self.attn = Attention(dim, heads, "power.attn", "power_attention", block=4, window=2,
                              backend="cpu")
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x, cache=None):
        x = x + self.attn(self.norm1(x), cache=cache)
        return x + self.mlp(self.norm2(x))


class TinyLM(nn.Module):
    def __init__(self, dim: int = 64, heads: int = 4, layers: int = 2, max_len: int = 1024):
        super().__init__()
        self.tok = nn.Embedding(VOCAB + 1, dim)
        self.pos = nn.Embedding(max_len, dim)
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, VOCAB + 1)

    def forward(self, ids, cache: KVCache | None = None):
        start = len(cache) if cache is not None else 0
        pos = torch.arange(start, start + ids.shape[1])
        x = self.tok(ids) + self.pos(pos)
        for b in self.blocks:
            x = b(x, cache)
        return self.head(self.norm(x))


def batch(n: int, g: torch.Generator) -> torch.Tensor:
    body = torch.randint(0, VOCAB, (n, COPY), generator=g)
    return torch.cat([body, torch.full((n, 1), SEP), body], dim=1)


@torch.no_grad()
def generate(model, prompt, steps: int, cached: bool) -> torch.Tensor:
    ids = prompt
    cache = KVCache() if cached else None
    nxt = model(ids, cache)[:, -1:].argmax(-1)
    out = [nxt]
    for _ in range(steps - 1):
        if cached:
            logits = model(nxt, cache)  # one new token over the cached keys
        else:
            ids = torch.cat([ids, nxt], dim=1)
            logits = model(ids)  # the whole prefix again
        nxt = logits[:, -1:].argmax(-1)
        out.append(nxt)
    return torch.cat(out, dim=1)


def timed(model, prompt, steps, cached):
    t0 = time.perf_counter()
    toks = generate(model, prompt, steps, cached)
    return toks, prompt.shape[0] * steps / (time.perf_counter() - t0)


def main() -> int:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    model = TinyLM()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    losses = []
    t0 = time.perf_counter()
    for step in range(250):
        seq = batch(32, g)
        logits = model(seq[:, :-1])
        # only the copied half is predictable: positions COPY .. LEN-2 predict the copy
        loss = nn.functional.cross_entropy(logits[:, COPY:].reshape(-1, VOCAB + 1),
                                           seq[:, COPY + 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if step % 50 == 0 or step == 249:
            print(f"step {step:4d}  loss {loss.item():.3f}")
    print(f"trained in {time.perf_counter() - t0:.1f} s")
    model.eval()
    test = batch(128, torch.Generator().manual_seed(1))
    prompt, target = test[:, :COPY + 1], test[:, COPY + 1:]
    full, tps_full = timed(model, prompt, COPY, cached=False)
    cached, tps_cached = timed(model, prompt, COPY, cached=True)
    acc = (cached == target).float().mean().item()
    print(f"copy accuracy {acc:.1%} over {target.numel()} generated tokens")
    print(f"generation, 128 prompts of {COPY + 1} tokens, {COPY} new tokens each: "
          f"{tps_full:,.0f} tokens/s recomputing the prefix, {tps_cached:,.0f} tokens/s "
          f"with the KV cache; same tokens: {torch.equal(full, cached)}")
    long_prompt = torch.randint(0, VOCAB, (4, 512), generator=g)
    lf, tps_lf = timed(model, long_prompt, 64, cached=False)
    lc, tps_lc = timed(model, long_prompt, 64, cached=True)
    print(f"generation, 4 prompts of 512 tokens, 64 new tokens each: {tps_lf:,.0f} tokens/s "
          f"recomputing, {tps_lc:,.0f} tokens/s cached ({tps_lc / tps_lf:.1f}x); same "
          f"tokens: {torch.equal(lf, lc)}")
    ok = (sum(losses[-20:]) / 20 < 0.5 * sum(losses[:20]) / 20 and torch.equal(full, cached)
          and torch.equal(lf, lc))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
