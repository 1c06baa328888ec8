"""Train a small neighborhood-attention layer on the CPU, forward and backward through
backend="cpu" (FlexAttention cannot train on CPU; NATTEN has no CPU kernels).

A 64 x 64 grid, na2d with kernel 7: from a noisy field, predict its local 5 x 5 average.
Prints the loss as it falls and the time per step.
"""

import time
from pathlib import Path

import torch

import attndsl

ROOT = Path(__file__).resolve().parent.parent
SIDE, KERNEL, STEPS = 64, 7, 40


class Layer(torch.nn.Module):
    def __init__(self, op, dim=32, heads=2):
        super().__init__()
        self.op, self.heads = op, heads
        self.inp = torch.nn.Linear(1, dim)
        self.qkv = torch.nn.Linear(dim, 3 * dim)
        self.out = torch.nn.Linear(dim, 1)

    def forward(self, x):  # x: [B, N, 1]
        h = self.inp(x)
        B, N, C = h.shape
        q, k, v = self.qkv(h).view(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        a = self.op(q, k, v, backend="cpu")  # block-sparse, forward and backward
        return self.out(a.transpose(1, 2).reshape(B, N, C))


def main() -> None:
    op = attndsl.compile(ROOT / "patterns" / "neighborhood.attn", "na2d", H=SIDE, W=SIDE,
                         kernel=KERNEL)
    torch.manual_seed(0)
    model = Layer(op)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    pool = torch.nn.AvgPool2d(5, stride=1, padding=2, count_include_pad=False)
    losses = []
    t0 = time.perf_counter()
    for step in range(STEPS):
        x = torch.randn(2, 1, SIDE, SIDE)
        y = pool(x)
        pred = model(x.flatten(2).transpose(1, 2))
        loss = torch.nn.functional.mse_loss(pred, y.flatten(2).transpose(1, 2))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if step % 8 == 0 or step == STEPS - 1:
            print(f"step {step:3d}  loss {loss.item():.4f}")
    per_step = (time.perf_counter() - t0) / STEPS
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    print(f"na2d {SIDE}x{SIDE} kernel {KERNEL} on CPU: loss {first:.4f} -> {last:.4f}, "
          f"{per_step * 1e3:.0f} ms per training step (forward + backward)")
    if not last < 0.7 * first:
        raise SystemExit("the loss did not fall")


if __name__ == "__main__":
    main()
