"""Compile a pattern with the CLI, import the generated module, train a tiny model with it.

    attndsl compile patterns/neighborhood.attn -p na2d --set H=.. -o DIR --stats
    import attn_na2d; attn_na2d.op(q, k, v, backend="triton")

On a GPU the real kernels run; without one, Triton's interpreter runs the same kernels on
the CPU (slowly: the sizes shrink). The task: from a noisy 2D field, predict its local
3 x 3 average, which a neighborhood-attention layer can learn; the loss must fall.
"""

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

GPU = torch.cuda.is_available()
if not GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before any kernel module is imported

ROOT = Path(__file__).resolve().parent.parent
PATTERNS = ROOT / "patterns" / "neighborhood.attn"
SIDE, KERNEL, BLOCK, STEPS, BATCH = (32, 7, 64, 200, 8) if GPU else (8, 3, 16, 8, 2)


def compile_kernels(out: Path) -> None:
    cmd = [sys.executable, "-m", "attndsl", "compile", str(PATTERNS), "-p", "na2d",
           "--set", f"H={SIDE}", "--set", f"W={SIDE}", "--set", f"kernel={KERNEL}",
           "--block-q", str(BLOCK), "--block-k", str(BLOCK), "-o", str(out), "--stats"]
    print("$ attndsl " + " ".join(cmd[3:]))
    subprocess.run(cmd, check=True)


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
        a = self.op(q, k, v, backend="triton")  # [B, heads, N, C / heads]
        return self.out(a.transpose(1, 2).reshape(B, N, C))


def main() -> None:
    dev = "cuda" if GPU else "cpu"
    with tempfile.TemporaryDirectory() as tmp:
        compile_kernels(Path(tmp))
        sys.path.insert(0, tmp)
        import attn_na2d  # the generated module: kernels, tables, metadata and `op`

        print(f"imported {attn_na2d.__file__}: {attn_na2d.METADATA['stats']['order_q']}, "
              f"waste {attn_na2d.METADATA['stats']['waste']:.2f}x")
        torch.manual_seed(0)
        model = Layer(attn_na2d.op).to(dev)
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        pool = torch.nn.AvgPool2d(3, stride=1, padding=1, count_include_pad=False)
        losses = []
        for step in range(STEPS):
            x = torch.randn(BATCH, 1, SIDE, SIDE, device=dev)
            y = pool(x)
            pred = model(x.flatten(2).transpose(1, 2))
            loss = torch.nn.functional.mse_loss(pred, y.flatten(2).transpose(1, 2))
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
            if step % max(1, STEPS // 6) == 0 or step == STEPS - 1:
                print(f"step {step:4d}  loss {loss.item():.4f}")
        first, last = sum(losses[:2]) / 2, sum(losses[-2:]) / 2
        print(f"loss {first:.4f} -> {last:.4f}")
        if not last < first:
            raise SystemExit("the loss did not fall")


if __name__ == "__main__":
    main()
