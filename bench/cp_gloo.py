"""Context parallelism on a gloo group of CPU processes: attndsl.distributed (each rank
receives the key blocks its queries attend) against an all-gather baseline (every rank
gathers all K/V, then attends its contiguous shard's queries with q_start; the backward
returns every rank's dK/dV share), forward + backward per step, interleaved.

    python bench/cp_gloo.py [--ranks 4] [--reps 7] [--n 32768]

Prints per pattern the K/V bytes each rank sends forward and the step time (the slowest
rank's, median and min..max over reps). Both sides compute the same attended pairs on the
CPU backend; the difference is what moves.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parent.parent


def cases(n):
    # documents of n/16 .. n/4 tokens (seeded): they cross the ranks' boundaries
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(n // 16, n // 4, (64,), generator=g)
    doc = torch.repeat_interleave(torch.arange(64), lengths)[:n]
    return [("sliding_window", "sliding.attn", dict(N=n, window=1024), {}),
            ("document_causal", "document.attn", dict(N=n), {"doc": doc}),
            ("power_attention", "power.attn", dict(N=n, block=256, window=5, sink=1), {})]


def _slowest(seconds: float) -> float:
    t = torch.tensor([seconds], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def _case(op, inputs, rank, ranks, n, reps, heads, dim) -> dict:
    from attndsl.distributed import ContextParallel
    from attndsl.distributed.comm import gather
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, heads, n, dim, generator=g) for _ in "qkv")
    cp = ContextParallel(op, backend="cpu")
    ql, kl, vl = (cp.shard(t, **inputs).requires_grad_() for t in (q, k, v))
    m = n // ranks
    qc, kc, vc = (t[:, :, rank * m:(rank + 1) * m].clone().requires_grad_() for t in (q, k, v))
    sent = [0]

    def ours():
        cp(ql, kl, vl, **inputs).sum().backward()

    def allgather():
        sent[0] = 0
        kf, vf = (gather(x, None, sent).permute(1, 2, 0, 3, 4).reshape(1, heads, n, dim)
                  for x in (kc, vc))
        op(qc, kf, vf, backend="cpu", q_start=rank * m, **inputs).sum().backward()

    times = {"ours": [], "allgather": []}
    for rep in range(reps + 1):  # the first round warms both up
        for label, fn in (("ours", ours), ("allgather", allgather)):
            dist.barrier()
            t0 = time.perf_counter()
            fn()
            t = _slowest(time.perf_counter() - t0)
            if rep:
                times[label].append(t)
    s = cp.stats()
    most = torch.tensor([s["kv_bytes_sent"], s["kv_bytes_received"], sent[0]])
    dist.all_reduce(most, op=dist.ReduceOp.MAX)
    return {"ours_bytes": int(most[0]), "ours_received": int(most[1]),
            "allgather_bytes": int(most[2]), "times": times}


def worker(rank, ranks, store, out, n, reps, heads, dim):
    import attndsl
    dist.init_process_group("gloo", store=dist.FileStore(store, ranks), rank=rank,
                            world_size=ranks, timeout=datetime.timedelta(seconds=300))
    torch.set_num_threads(1)
    res = {}
    for name, file, params, inputs in cases(n):
        op = attndsl.compile(ROOT / "patterns" / file, name, **params)
        res[name] = _case(op, inputs, rank, ranks, n, reps, heads, dim)
    if rank == 0:
        with open(out, "w") as f:
            json.dump(res, f)
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ranks", type=int, default=4)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--n", type=int, default=32768)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--dim", type=int, default=64)
    a = ap.parse_args()
    import torch.multiprocessing as mp
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "out.json")
        mp.start_processes(worker, args=(a.ranks, os.path.join(tmp, "store"), out, a.n, a.reps,
                                         a.heads, a.dim),
                           nprocs=a.ranks, start_method="spawn")
        res = json.load(open(out))
    print(f"{a.ranks} gloo processes, N = {a.n:,}, {a.heads} heads x {a.dim}, fp32, forward + "
          f"backward; bytes: the most K/V a rank sends forward")
    for name, r in res.items():
        line = [f"{name:<17}"]
        for label, b in (("ours", r["ours_bytes"]), ("allgather", r["allgather_bytes"])):
            ts = r["times"][label]
            line.append(f"{label} {b / 2**20:7.2f} MiB  {statistics.median(ts) * 1e3:7.0f} ms "
                        f"({min(ts) * 1e3:.0f}..{max(ts) * 1e3:.0f})")
        print("  ".join(line))


if __name__ == "__main__":
    main()
