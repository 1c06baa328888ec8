"""Write your own pattern: examples/my_pattern.attn, checked, drawn, verified and run.

1. `attndsl.check` parses and type-checks the file (all errors at once, with locations).
2. `attndsl.compile` binds parameters; `op.mask()` is the per-head mask, drawn as text.
3. The mask is compared with the same pattern written directly in torch.
4. The pattern runs as attention with the reference backend, forward and backward, and
   matches plain softmax attention with the same mask and ALiBi bias.

Run from anywhere: `python examples/write_your_own.py`.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

import attndsl
from attndsl import render
from attndsl.lang.printer import expr_source

HERE = Path(__file__).resolve().parent
PATTERN_FILE = HERE / "my_pattern.attn"

N, WINDOW, H, FULL_HEADS, GLOBAL = 24, 4, 4, 1, 2


def torch_mask(n: int, window: int, heads: int, full_heads: int) -> torch.Tensor:
    """The same pattern written directly in torch: [heads, n, n] bool."""
    i = torch.arange(n)
    q, k = i.view(-1, 1), i.view(1, -1)
    causal = k <= q
    local = causal & (q - k < window)
    glob = causal & (k < GLOBAL)
    m = (local | glob).expand(heads, n, n).clone()
    m[heads - full_heads:] |= causal
    return m


def alibi_bias(n: int, heads: int) -> torch.Tensor:
    """[heads, n, n]: -slope_h * (q - k), slope_h = 2^(-8 (h + 1) / heads)."""
    i = torch.arange(n, dtype=torch.float64)
    slopes = 2.0 ** (-8.0 * torch.arange(1, heads + 1, dtype=torch.float64) / heads)
    return -slopes.view(-1, 1, 1) * (i.view(-1, 1) - i.view(1, -1))


def main() -> None:
    # 1. check: every pattern of the file, with its parameters
    checked = attndsl.check(PATTERN_FILE)
    for name, cp in checked.items():
        params = ", ".join(f"{p.name}: {t}" + (f" = {expr_source(p.default)}" if p.default else "")
                           for p, t in cp.params)
        print(f"checked {PATTERN_FILE.name}: pattern {name}({params})")

    # 2. compile and draw
    op = attndsl.compile(PATTERN_FILE, N=N, window=WINDOW, H=H, full_heads=FULL_HEADS)
    print(op)
    print(op.doc)
    mask = op.mask()
    print(f"mask: {list(mask.shape)} (per head)")
    print("\nhead 0 (window + global tokens):")
    print(render.text(op, mask[0]))
    print(f"\nhead {H - 1} (full causal):")
    print(render.text(op, mask[H - 1]))

    # 3. the same pattern written in torch
    expect = torch_mask(N, WINDOW, H, FULL_HEADS)
    assert torch.equal(mask, expect), "the .attn pattern and the torch definition differ"
    print("\nmask matches the plain-torch definition:",
          ", ".join(f"head {h}: {int(mask[h].sum())} pairs" for h in range(H)))

    # 4. attention with the reference backend, forward and backward
    torch.manual_seed(0)
    B, D = 2, 16
    q = torch.randn(B, H, N, D, dtype=torch.float64, requires_grad=True)
    k = torch.randn(B, H, N, D, dtype=torch.float64, requires_grad=True)
    v = torch.randn(B, H, N, D, dtype=torch.float64, requires_grad=True)
    out = op(q, k, v, backend="reference")
    loss = out.square().mean()
    loss.backward()
    grads = [t.grad.clone() for t in (q, k, v)]

    # plain torch attention with the same mask and bias
    qr, kr, vr = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    scores = qr @ kr.transpose(-1, -2) / math.sqrt(D) + alibi_bias(N, H)
    scores = scores.masked_fill(~expect, -math.inf)
    ref = torch.softmax(scores, dim=-1) @ vr
    ref.square().mean().backward()
    assert torch.allclose(out, ref), "outputs differ"
    for name, g, t in zip("qkv", grads, (qr, kr, vr)):
        assert torch.allclose(g, t.grad), f"gradient of {name} differs"
    print(f"attention: out {list(out.shape)}, loss {loss.item():.6f}; output and gradients "
          "match plain torch attention")


if __name__ == "__main__":
    main()
