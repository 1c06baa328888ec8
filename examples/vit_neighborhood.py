"""A tiny vision transformer with neighbourhood attention (`na2d`), trained on the CPU.

The task is synthetic: a 32 x 32 noisy image holds one bright shape anywhere (a horizontal
bar, a vertical bar, a square or a diagonal); the model names the shape. Patches of 4 x 4
pixels make an 8 x 8 token grid that `attndsl.nn.Attention` takes channels last
([B, 8, 8, dim]); each layer attends a 3 x 3 neighbourhood (dilation 2 in the second layer,
as DiNAT alternates) and max pooling over the grid feeds the classifier. The script prints
the loss as it falls and the accuracy on held-out images, forward and backward through
attndsl's CPU backend.

Run from anywhere: `python examples/vit_neighborhood.py` (under a minute on 2 cores).
"""

from __future__ import annotations

import sys
import time

import torch
from torch import nn

from attndsl.nn import Attention

SIZE, PATCH = 32, 4


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, dilation: int):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, "neighborhood.attn", "na2d", kernel=3,
                              dilation=dilation, backend="cpu")
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x):  # x [B, H, W, dim]
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TinyViT(nn.Module):
    def __init__(self, dim: int = 32, heads: int = 2, classes: int = 4):
        super().__init__()
        self.embed = nn.Conv2d(1, dim, PATCH, stride=PATCH)
        grid = SIZE // PATCH
        self.pos = nn.Parameter(torch.zeros(1, grid, grid, dim))
        self.blocks = nn.Sequential(Block(dim, heads, 1), Block(dim, heads, 2))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, img):  # img [B, 1, SIZE, SIZE]
        x = self.embed(img).permute(0, 2, 3, 1) + self.pos  # channels last
        x = self.blocks(x)
        return self.head(self.norm(x).amax(dim=(1, 2)))


def images(n: int, g: torch.Generator):
    """Noise with one bright shape anywhere: 0 a horizontal bar, 1 a vertical bar, 2 a
    square, 3 a diagonal."""
    label = torch.randint(0, 4, (n,), generator=g)
    img = 0.5 * torch.randn(n, 1, SIZE, SIZE, generator=g)
    ys, xs = (torch.randint(0, SIZE - 8, (n,), generator=g) for _ in range(2))
    eight = torch.arange(8)
    for i in range(n):
        y, x = int(ys[i]), int(xs[i])
        c = int(label[i])
        if c == 0:
            img[i, 0, y + 4, x:x + 8] += 2.0
        elif c == 1:
            img[i, 0, y:y + 8, x + 4] += 2.0
        elif c == 2:
            img[i, 0, y + 2:y + 6, x + 2:x + 6] += 1.0
        else:
            img[i, 0, y + eight, x + eight] += 2.0
    return img, label


def main() -> int:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    model = TinyViT()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    t0 = time.perf_counter()
    for step in range(150):
        img, label = images(32, g)
        loss = nn.functional.cross_entropy(model(img), label)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if step % 25 == 0 or step == 149:
            print(f"step {step:3d}  loss {loss.item():.3f}")
    print(f"trained in {time.perf_counter() - t0:.1f} s")
    model.eval()
    img, label = images(256, torch.Generator().manual_seed(1))
    with torch.no_grad():
        acc = (model(img).argmax(-1) == label).float().mean().item()
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    print(f"mean loss of the first 10 steps {first:.3f}, of the last 10 {last:.3f}; held-out "
          f"accuracy {acc:.1%} (chance 25%)")
    return 0 if last < 0.5 * first else 1


if __name__ == "__main__":
    sys.exit(main())
