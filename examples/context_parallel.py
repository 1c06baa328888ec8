"""Train a small attention layer on a long sequence sharded over 4 processes (context
parallelism on torch.distributed, gloo on the CPU; NCCL on GPUs is the same code).

    torchrun --nproc-per-node 4 examples/context_parallel.py
    python examples/context_parallel.py          # spawns the 4 gloo processes itself

A causal sliding window of 256 tokens over 4,096 tokens: from a noisy signal, predict (8 times)
the mean of its last 256 values, which the layer learns by flattening its scores. Each rank
holds a quarter of the tokens and receives only the keys its window reaches on the previous
rank; the layer's weights are replicated and their gradients
summed over the ranks. Step 0 is checked against the unsharded layer in one process.
"""

import datetime
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

import attndsl
from attndsl.distributed import ContextParallel

ROOT = Path(__file__).resolve().parent.parent
N, WINDOW, STEPS, RANKS = 4096, 256, 30, 4


class Layer(torch.nn.Module):
    def __init__(self, dim=32, heads=2):
        super().__init__()
        self.heads = heads
        self.inp = torch.nn.Linear(2, dim)
        self.qkv = torch.nn.Linear(dim, 3 * dim)
        self.out = torch.nn.Linear(dim, 1)

    def forward(self, x, attention):  # x: [B, n, 2] (value, position); attention(q, k, v)
        h = self.inp(x)
        B, n, C = h.shape
        q, k, v = self.qkv(h).view(B, n, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        return self.out(attention(q, k, v).transpose(1, 2).reshape(B, n, C))


def data(step: int):
    """A noisy signal with a position channel, and 8 x the mean of its window's values."""
    g = torch.Generator().manual_seed(step)
    s = torch.randn(1, N, generator=g, dtype=torch.float64)
    c = torch.nn.functional.pad(s.cumsum(1), (WINDOW, 0))
    count = torch.arange(1, N + 1, dtype=torch.float64).clamp(max=WINDOW)
    y = (8 * (c[:, WINDOW:] - c[:, :-WINDOW]) / count).float()
    s = s.float()
    pos = torch.linspace(-1, 1, N).view(1, N)
    return torch.stack([s, pos], -1), y.unsqueeze(-1)


def train(rank: int, ranks: int) -> None:
    op = attndsl.compile(ROOT / "patterns" / "sliding.attn", "sliding_window", N=N,
                         window=WINDOW)
    cp = ContextParallel(op)  # the whole world; balanced dispatch: contiguous shards here
    torch.manual_seed(0)  # the same initial weights on every rank
    model = Layer()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses, t0 = [], time.perf_counter()
    for step in range(STEPS):
        x, y = data(step)
        # sharding along the token axis (-2); cp(q, k, v) is this rank's attention
        pred = model(cp.shard(x), cp)
        local = torch.nn.functional.mse_loss(pred, cp.shard(y), reduction="sum")
        opt.zero_grad()
        (local / N).backward()
        for p in model.parameters():  # data parallel over the sequence: sum the gradients
            dist.all_reduce(p.grad)
        loss = local.detach().clone()
        dist.all_reduce(loss)
        loss = loss.item() / N
        if step == 0:
            check(model, x, y, loss, cp, rank)
        opt.step()
        losses.append(loss)
        if rank == 0 and (step % 10 == 0 or step == STEPS - 1):
            print(f"step {step:3d}  loss {loss:.4f}", flush=True)
    per_step = (time.perf_counter() - t0) / STEPS
    s = cp.stats()
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    print(f"rank {rank}: {s['tokens']} tokens, {s['pairs']:,} attended pairs, K/V received "
          f"{s['kv_bytes_received']:,} B (an all-gather: {s['allgather_kv_bytes']:,} B), "
          f"{per_step * 1e3:.0f} ms per step", flush=True)
    if rank == 0:
        print(f"sliding window {WINDOW} over {N:,} tokens on {ranks} ranks: loss {first:.4f} "
              f"-> {last:.4f}")
        if not last < 0.75 * first:
            raise SystemExit("the loss did not fall")


def check(model, x, y, loss, cp, rank) -> None:
    """The sharded step equals the unsharded layer (loss and one weight's gradient)."""
    ref = Layer()
    ref.load_state_dict(model.state_dict())
    full = torch.nn.functional.mse_loss(ref(x, lambda q, k, v: cp.op(q, k, v)), y)
    full.backward()
    gerr = (ref.qkv.weight.grad - model.qkv.weight.grad).abs().max().item()
    if rank == 0:
        print(f"step 0 against one process: loss {loss:.6f} vs {full.item():.6f}, "
              f"qkv gradient max error {gerr:.1e}", flush=True)
    if abs(loss - full.item()) > 1e-4 * abs(full.item()) or gerr > 1e-4:
        raise SystemExit(f"rank {rank}: the sharded step differs from the unsharded one")


def _spawned(rank: int, ranks: int, store: str) -> None:
    dist.init_process_group("gloo", store=dist.FileStore(store, ranks), rank=rank,
                            world_size=ranks, timeout=datetime.timedelta(seconds=120))
    torch.set_num_threads(1)
    try:
        train(rank, ranks)
    finally:
        dist.destroy_process_group()


def main() -> None:
    if "RANK" in os.environ:  # launched by torchrun: one process of the group
        dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // dist.get_world_size()))
        try:
            train(dist.get_rank(), dist.get_world_size())
        finally:
            dist.destroy_process_group()
        return
    import torch.multiprocessing as mp
    with tempfile.TemporaryDirectory() as tmp:
        try:
            mp.start_processes(_spawned, args=(RANKS, os.path.join(tmp, "store")),
                               nprocs=RANKS, start_method="spawn")
        except mp.ProcessRaisedException as e:
            sys.exit(f"a rank failed:\n{e}")
        except mp.ProcessExitedException as e:
            sys.exit(f"a rank exited: {e}")


if __name__ == "__main__":
    main()
