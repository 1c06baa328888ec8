"""Worker processes for tests/test_distributed.py: each runs every case on a gloo group of
CPU processes and reports errors against independent definitions (tests/independent.py
and the per-head rule written below), the bytes handed to the collectives, and cp.stats().
Kept out of the test module so spawned children import only this."""

from __future__ import annotations

import datetime
import json
import math
import os
import tempfile
import time

import independent as ind
import numpy as np
import torch

BLOCK = 16
PER_HEAD = """
pattern per_head(N: int) {
    space seq(N)
    heads 4
    on heads 0..2 { attend sliding(24) }
    on heads 2..4 {
        attend causal() and (k % 8 == 0 or q - k < 6)
        bias -0.25 * (h - 1) * log(1 + abs(q - k))
    }
}
"""
DOCS = [37, 81, 50, 32]  # document lengths (N = 200): they cross the ranks' boundaries


def _per_head_reference(q, k, v):
    N = q.shape[2]
    qq, kk = np.arange(N)[:, None], np.arange(N)[None, :]
    mask = np.zeros((4, N, N), dtype=bool)
    mask[0:2] = (qq - kk >= 0) & (qq - kk < 24)
    mask[2:4] = (kk <= qq) & ((kk % 8 == 0) | (qq - kk < 6))
    bias = torch.zeros(4, N, N, dtype=torch.float64)
    d = torch.from_numpy(np.abs(qq - kk)).double()
    for h in (2, 3):
        bias[h] = -0.25 * (h - 1) * torch.log(1 + d)
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    s = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1]) + bias
    s = s.masked_fill(~torch.from_numpy(mask), float("-inf"))
    return torch.softmax(s, -1) @ v


def _axial_reference(q, k, v, row_keys, H, W):
    """Combiner-Axial as the official code computes it (`_SelfAttAxialRowmajor`): (y, x)
    attends the earlier tokens of its row and, for every earlier row r, one token keyed by
    row_keys at (r, x) whose value is the full-row attention output of the query at (r, x)
    over row r."""
    scale = 1 / math.sqrt(q.shape[-1])
    outs = []
    for i in range(H * W):
        y, x = divmod(i, W)
        logits = [q[:, :, i:i + 1] @ k[:, :, y * W:i + 1].transpose(-1, -2) * scale]
        vals = [v[:, :, y * W:i + 1]]
        for r in range(y):
            row = slice(r * W, (r + 1) * W)
            p = torch.softmax(q[:, :, r * W + x:r * W + x + 1] @ k[:, :, row].transpose(-1, -2)
                              * scale, -1)
            logits.append(q[:, :, i:i + 1] @ row_keys[:, :, r * W + x:r * W + x + 1]
                          .transpose(-1, -2) * scale)
            vals.append(p @ v[:, :, row])
        p = torch.softmax(torch.cat(logits, -1), -1)
        outs.append(p @ torch.cat(vals, 2))
    return torch.cat(outs, 2)


def _transnext_reference(q, k, v, inp, H, W):
    """TransNeXt's aggregated attention as its official code computes it, scale 1: the 3 x 3
    window (clipped) with its learned bias, and the pooled tokens (given keys and values)
    with theirs, in one softmax."""
    N = H * W
    y, x = np.divmod(np.arange(N), W)
    dy, dx = y[None, :] - y[:, None], x[None, :] - x[:, None]  # k - q
    near = torch.from_numpy((np.abs(dy) <= 1) & (np.abs(dx) <= 1))
    idx = torch.from_numpy(np.clip(dy + 1, 0, 2) * 3 + np.clip(dx + 1, 0, 2))
    local = inp["local_bias"][:, idx]  # [heads, N, N]
    s1 = (q @ k.transpose(-1, -2) + local).masked_fill(~near, float("-inf"))
    s2 = q @ inp["pool_keys"].transpose(-1, -2) + inp["pool_bias"]
    p = torch.softmax(torch.cat([s1, s2], -1), -1)
    return p[..., :N] @ v + p[..., N:] @ inp["pool_values"]


def _doc():
    return torch.repeat_interleave(torch.arange(len(DOCS)), torch.tensor(DOCS))


# name: (file or source, pattern, parameters, inputs, heads, kv heads, dtype, reference,
#        mask for the exchange check or None)
def cases():
    doc = _doc()
    g = torch.Generator().manual_seed(11)
    row_keys = torch.randn(2, 2, 64, 8, generator=g, dtype=torch.float64)
    tn = {"local_bias": torch.randn(2, 9, generator=g, dtype=torch.float64),
          "pool_keys": torch.randn(2, 2, 4, 8, generator=g, dtype=torch.float64),
          "pool_values": torch.randn(2, 2, 4, 8, generator=g, dtype=torch.float64),
          "pool_bias": torch.randn(2, 64, 4, generator=g, dtype=torch.float64)}
    return {
        "sliding_window": ("sliding.attn", "sliding_window", dict(N=160, window=24), {}, 2, 1,
                           torch.float64, None, ind.sliding_window(160, 24)),
        "power_attention": ("power.attn", "power_attention",
                            dict(N=256, block=16, window=2, sink=1), {}, 2, 2, torch.float64,
                            None, ind.power_attention(256, 16, 2, 1)),
        "na2d": ("neighborhood.attn", "na2d", dict(H=10, W=13, kernel=5), {}, 2, 2,
                 torch.float64, None, ind.na2d(10, 13, 5)),
        "document_causal": ("document.attn", "document_causal", dict(N=200), {"doc": doc}, 2,
                            2, torch.float64, None, ind.document_causal(200, doc.tolist())),
        "per_head": (PER_HEAD, "per_head", dict(N=144), {}, 4, 2, torch.float64,
                     _per_head_reference, None),
        "combiner_fixed": ("combiner.attn", "combiner_fixed", dict(N=128, span=16), {}, 2, 2,
                           torch.float64, lambda q, k, v: ind.combiner_fixed(q, k, v, 16),
                           None),
        "aggregated": ("transnext.attn", "aggregated_pooled", dict(H=12, W=12), {}, 2, 2,
                       torch.float64,
                       lambda q, k, v: ind.transnext_aggregated(q, k, v, 12, 12, 3, 4), None),
        "combiner_axial": ("combiner.attn", "combiner_axial", dict(H=8, W=8),
                           {"row_keys": row_keys}, 2, 2, torch.float64,
                           lambda q, k, v: _axial_reference(q, k, v, row_keys, 8, 8), None),
        "transnext": ("transnext.attn", "aggregated", dict(H=8, W=8, heads=2), tn, 2, 2,
                      torch.float64, lambda q, k, v: _transnext_reference(q, k, v, tn, 8, 8),
                      None),
        "combiner_logsparse": ("combiner.attn", "combiner_logsparse", dict(N=128), {}, 2, 2,
                               torch.float64, ind.combiner_logsparse, None),
        "combiner_mixture": ("combiner.attn", "combiner_mixture", dict(N=96, span=16), {}, 2,
                             2, torch.float64,
                             lambda q, k, v: ind.combiner_mixture(q, k, v, 16), None),
        "fp32": ("power.attn", "power_attention", dict(N=256, block=16, window=2, sink=1), {},
                 2, 2, torch.float32, None, ind.power_attention(256, 16, 2, 1)),
        "bf16": ("sliding.attn", "sliding_window", dict(N=160, window=24), {}, 2, 1,
                 torch.bfloat16, None, ind.sliding_window(160, 24)),
    }


def _count_collectives(log: list, phase: list):
    """Record the bytes every all_to_all_single sends to other ranks: (phase, kind, bytes)."""
    import torch.distributed as dist
    real = dist.all_to_all_single

    def counting(output, input, output_split_sizes=None, input_split_sizes=None, group=None,
                 async_op=False):
        rank, ranks = dist.get_rank(group), dist.get_world_size(group)
        row = input[0].numel() * input.element_size() if input.shape[0] else 0
        if input_split_sizes is None:  # equal splits: unshard's gather, backward
            sent = input.numel() * input.element_size() * (ranks - 1) // ranks
            kind = "gather"
        else:  # K/V travel as bytes, summary rows as floats
            sent = sum(s for j, s in enumerate(input_split_sizes) if j != rank) * row
            kind = "exchange" if input.dtype == torch.uint8 else "summary"
        log.append((phase[0], kind, sent))
        return real(output, input, output_split_sizes, input_split_sizes, group=group,
                    async_op=async_op)
    dist.all_to_all_single = counting


def _run_case(name, spec, rank, ranks, log, phase):
    import attndsl
    from attndsl.distributed import ContextParallel
    src, pattern, params, inputs, heads, kv_heads, dtype, reference, mask = spec
    op = attndsl.compile(src, pattern=pattern, **params).options(block_q=BLOCK, block_k=BLOCK)
    n = op.bound.nq
    g = torch.Generator().manual_seed(7)
    q = torch.randn(2, heads, n, 8, generator=g, dtype=torch.float64)
    k, v = (torch.randn(2, kv_heads, n, 8, generator=g, dtype=torch.float64) for _ in "kv")
    go = torch.randn(2, heads, n, 8, generator=g, dtype=torch.float64)
    qr, kr, vr = (t.clone().requires_grad_() for t in (q, k, v))
    if reference is None:
        ref = ind.masked_attention(qr, kr, vr, torch.from_numpy(mask))
    else:
        ref = reference(qr, kr, vr)
    (ref * go).sum().backward()
    cp = ContextParallel(op)
    ql, kl, vl = (cp.shard(t, **inputs).to(dtype).requires_grad_() for t in (q, k, v))
    del log[:]
    phase[0] = "forward"
    t0 = time.perf_counter()
    out = cp(ql, kl, vl, **inputs)
    phase[0] = "backward"
    (out.double() * cp.shard(go, **inputs)).sum().backward()
    seconds = time.perf_counter() - t0
    phase[0] = None

    def err(a, b):
        return float((a.detach().double() - cp.shard(b.detach(), **inputs)).abs().max())
    res = {"out": err(out, ref), "dq": err(ql.grad, qr.grad), "dk": err(kl.grad, kr.grad),
           "dv": err(vl.grad, vr.grad), "seconds": seconds, "stats": cp.stats(),
           "sent": {f"{p}/{kd}": sum(b for pp, kk, b in log if (pp, kk) == (p, kd))
                    for p in ("forward", "backward")
                    for kd in ("exchange", "gather", "summary")}}
    res["unshard"] = float((cp.unshard(out.detach(), **inputs).double() - ref.detach())
                           .abs().max())
    mine = cp.tokens(**inputs).numpy()
    if name == "combiner_logsparse":
        res["summary_expected"] = _logsparse_bytes(mine, rank, ranks, cp, n, heads, 8)
    if name == "combiner_axial":
        res["summary_expected"] = _axial_bytes(mine, rank, ranks, 8, 8, heads, 8)
    got = np.sort(cp.received(**inputs).numpy())
    res["received"] = got.tolist()
    res["tokens"], res["n"] = mine.tolist(), n
    if mask is not None:  # the remote keys my queries attend, and their blocks (1D)
        need = np.nonzero(mask[mine].any(0))[0]
        need = need[~np.isin(need, mine)]
        res["attended"] = need.tolist()
        if op.bound.qshape == (n,):
            blocks = np.unique(need // BLOCK)
            toks = np.concatenate([np.arange(b * BLOCK, min(n, b * BLOCK + BLOCK))
                                   for b in blocks]) if len(blocks) else np.zeros(0, int)
            res["attended_blocks"] = toks[~np.isin(toks, mine)].tolist()
    return res


def _logsparse_bytes(mine, rank, ranks, cp, n, heads, dim):
    """Forward bytes this rank sends for Combiner-Logsparse's summary tokens, from the
    paper's regions: to every other rank with a query attending a region this rank holds a
    key of, that region's pooled key and its (output, log-sum-exp) share; to every other
    rank holding a key of the same region, its pooled query. Batch 2, float64."""
    import torch.distributed as dist
    every = [None] * ranks
    dist.all_gather_object(every, mine.tolist())
    rank_of = np.empty(n, dtype=np.int64)
    for r, toks in enumerate(every):
        rank_of[toks] = r
    owners, users = {}, {}
    for i, (_, regions) in enumerate(ind.combiner_logsparse_structure(n)):
        for reg in regions:
            key = (reg[0], len(reg))
            owners[key] = set(rank_of[reg].tolist())
            users.setdefault(key, set()).add(int(rank_of[i]))
    row = 2 * heads * 8  # batch x heads x float64
    sent = 0
    for key, own in owners.items():
        if rank in own:
            sent += row * (dim + dim + 1) * len(users[key] - {rank})
            sent += row * dim * len(own - {rank})
    return sent


def _axial_bytes(mine, rank, ranks, H, W, heads, dim):
    """Forward bytes this rank sends for Combiner-Axial's summary tokens (r, c), from the
    official definition: the query at (r, c) goes to every other rank holding a key of row
    r; each of those sends its (output, log-sum-exp) share to every other rank holding a
    query (y, c) with y > r. Keys are given: they never move. Batch 2, float64."""
    import torch.distributed as dist
    every = [None] * ranks
    dist.all_gather_object(every, mine.tolist())
    rank_of = np.empty(H * W, dtype=np.int64)
    for r, toks in enumerate(every):
        rank_of[toks] = r
    row = 2 * heads * 8
    sent = 0
    for r in range(H):
        owners = set(rank_of[r * W:(r + 1) * W].tolist())
        for c in range(W):
            users = {int(rank_of[y * W + c]) for y in range(r + 1, H)}
            if not users:
                continue  # no query attends it: never computed
            if rank_of[r * W + c] == rank:
                sent += row * dim * len(owners - {rank})
            if rank in owners:
                sent += row * (dim + 1) * len(users - {rank})
    return sent


def _window_bound(rank, ranks):
    """Received K/V tokens of a non-causal sliding window at two lengths (stats only)."""
    import attndsl
    from attndsl.distributed import ContextParallel
    out = {}
    for n in (512, 1024):
        op = attndsl.compile("sliding.attn", pattern="sliding_window", N=n, window=24,
                             causal=False).options(block_q=BLOCK, block_k=BLOCK)
        cp = ContextParallel(op)
        x = torch.randn(1, 1, n, 4)
        cp(cp.shard(x), cp.shard(x), cp.shard(x))
        out[n] = cp.stats()["kv_tokens_received"]
    return out


def worker(rank, ranks, store_path, out_dir, names):
    import torch.distributed as dist
    store = dist.FileStore(store_path, ranks)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=ranks,
                            timeout=datetime.timedelta(seconds=60))
    torch.set_num_threads(1)
    # The first float64 torch.exp of a process was seen off by up to 3e-9 (1 run in 12,
    # reference and backends alike); warm it up so that comparisons can be tight.
    torch.exp(torch.randn(1 << 16, dtype=torch.float64))
    log, phase = [], [None]
    _count_collectives(log, phase)
    spec = cases()
    res = {}
    for name in names:
        if name == "window_bound":
            res[name] = _window_bound(rank, ranks)
        else:
            res[name] = _run_case(name, spec[name], rank, ranks, log, phase)
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(res, f)
    dist.barrier()
    dist.destroy_process_group()


def run(ranks: int, names: list[str], timeout: float = 240.0) -> dict:
    """Run `names` on `ranks` spawned gloo processes; {name: [rank 0's result, ...]}. A
    deadlock or a crash fails within `timeout` seconds (the processes are killed)."""
    import torch.multiprocessing as mp
    with tempfile.TemporaryDirectory() as tmp:
        ctx = mp.start_processes(worker, args=(ranks, os.path.join(tmp, "store"), tmp, names),
                                 nprocs=ranks, join=False, start_method="spawn")
        deadline = time.monotonic() + timeout
        try:
            while not ctx.join(timeout=max(0.1, deadline - time.monotonic())):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{ranks} gloo processes did not finish in {timeout} s")
        finally:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
        out = {}
        for r in range(ranks):
            with open(os.path.join(tmp, f"rank{r}.json")) as f:
                for name, val in json.load(f).items():
                    out.setdefault(name, []).append(val)
        return out
