"""Cross-attention with different query and key spaces: text tokens reading an image grid.

The pattern declares `query seq(L)` and `key grid(H, W)`: L text tokens attend H x W image
patches. Text token i reads the i-th horizontal band of `band` image rows, widened by
`overlap` rows on each side; the last `global_tokens` text tokens read the whole image.

The script draws the mask and one query's keys on the image grid, checks the mask against
a plain-torch definition, and runs attention (forward and backward) against PyTorch's
scaled_dot_product_attention with the same boolean mask.

Run from anywhere: `python examples/cross_attention.py`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import attndsl
from attndsl import render

SOURCE = """
## Text token i reads image row band i (`band` rows, widened by `overlap` rows on each
## side); the last `global_tokens` text tokens read the whole image.
pattern text_to_image_rows(L: int, H: int, W: int, band: int, overlap: int = 0,
                           global_tokens: int = 1) {
    require band >= 1, "band must be at least 1"
    require overlap >= 0, "overlap must not be negative"
    require L - global_tokens == cdiv(H, band), "one text token per band plus the global ones"
    query seq(L)
    key grid(H, W)
    let lo = q.i * band - overlap
    attend lo <= k.y and k.y < lo + band + 2 * overlap
    attend q.i >= L - global_tokens
}
"""

H, W, BAND, OVERLAP, GLOBAL = 8, 6, 2, 1, 1
L = -(-H // BAND) + GLOBAL


def torch_mask() -> torch.Tensor:
    """[L, H*W]: the same rule in torch (key rows y of a row-major grid)."""
    t = torch.arange(L).view(-1, 1)
    y = (torch.arange(H * W) // W).view(1, -1)
    lo = t * BAND - OVERLAP
    return ((lo <= y) & (y < lo + BAND + 2 * OVERLAP)) | (t >= L - GLOBAL)


def main() -> None:
    op = attndsl.compile(SOURCE, L=L, H=H, W=W, band=BAND, overlap=OVERLAP,
                         global_tokens=GLOBAL)
    print(op)
    print(f"queries {op.query_shape} (text), keys {op.key_shape} (image, row-major)")
    mask = op.mask()
    assert mask.shape == (L, H * W)
    assert torch.equal(mask, torch_mask())
    print("mask matches the plain-torch definition; image patches per text token:",
          mask.sum(-1).tolist())
    print()
    print(render.text(op, mask, query=1))  # text token 1 on the image grid
    print()
    print("text token 0 (top band, clipped at the border):")
    print("\n".join(" ".join("#" if x else "." for x in row)
                    for row in mask[0].view(H, W).tolist()))

    # attention: q from text tokens, k/v from image patches (head dim 32, 4 heads)
    torch.manual_seed(0)
    B, heads, D = 2, 4, 32
    q = torch.randn(B, heads, L, D, requires_grad=True)
    k = torch.randn(B, heads, H * W, D, requires_grad=True)
    v = torch.randn(B, heads, H * W, D, requires_grad=True)
    out = op(q, k, v)
    out.sum().backward()
    ref = F.scaled_dot_product_attention(q.detach(), k.detach(), v.detach(), attn_mask=mask)
    err = (out.detach() - ref).abs().max().item()
    assert err < 1e-5, err
    print(f"\nattention: out {list(out.shape)} (one row per text token), max |out - sdpa| "
          f"= {err:.1e}; gradients: q {list(q.grad.shape)}, k {list(k.grad.shape)}")

    # grouped-query attention: one key/value head shared by all query heads
    out_gqa = op(q.detach(), k.detach()[:, :1], v.detach()[:, :1])
    print(f"with 1 key/value head (GQA): out {list(out_gqa.shape)}")


if __name__ == "__main__":
    main()
