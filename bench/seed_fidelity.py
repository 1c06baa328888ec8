"""Issue 12's figures: per seed family, the largest output difference from the official
computation (tests/official.py, float64, same inputs and weights) of attndsl's earlier form
(`before`) and of the standard pattern / attndsl.nn layer now (`after`).

    .venv/bin/python bench/seed_fidelity.py
"""

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
import official as off  # noqa: E402

import attndsl  # noqa: E402
from attndsl.nn import MoHAttention, TransNeXtAttention  # noqa: E402


def diff(a, b) -> float:
    return float((a.detach() - b.detach()).abs().max())


def report(name, before, after, ref):
    print(f"{name}: before {diff(before, ref):.3g}  after {diff(after, ref):.3g}  "
          f"(largest official output {float(ref.abs().max()):.3g})")


def main():
    g = torch.Generator().manual_seed(12)
    B = 2
    # MoH: heads=6, shared=2, routed=2
    N, heads, shared, routed = 16, 6, 2, 2
    C = 8 * heads
    x = torch.randn(B, N, C, generator=g, dtype=torch.float64)
    p = off.moh_params(C, heads, shared, routed, gen=g)
    ref = off.moh_attention(x, p, heads, shared, routed)
    qkv = F.linear(x, p["qkv.weight"], p["qkv.bias"]).view(B, N, 3, heads, 8).permute(
        2, 0, 3, 1, 4)
    old = attndsl.compile("moh.attn", "moh", N=N, heads=heads, shared=shared, topk=routed,
                          normalised=True)
    o = old(*qkv, backend="reference", router=F.linear(x, p["wg.weight"]))
    before = F.linear(o.transpose(1, 2).reshape(B, N, C), p["proj.weight"], p["proj.bias"])
    layer = MoHAttention(C, heads, shared, routed).double().eval()
    layer.load_state_dict(p)
    report("MoH (heads 6, shared 2, routed 2, N 16)", before, layer(x), ref)
    # TransNeXt: 8 x 8 grid, heads 2, sr_ratio 2, window 3
    H = W = 8
    heads, C, sr = 2, 16, 2
    x = torch.randn(B, H * W, C, generator=g, dtype=torch.float64)
    p = off.transnext_params(C, heads, 3, gen=g)
    ref = off.transnext_aggregated(x, p, H, W, heads, 3, (H // sr, W // sr))
    q = F.linear(x, p["q.weight"], p["q.bias"]).view(B, -1, heads, 8).transpose(1, 2)
    k, v = (t.reshape(B, -1, heads, 8).transpose(1, 2)
            for t in F.linear(x, p["kv.weight"], p["kv.bias"]).chunk(2, -1))
    old = attndsl.compile("transnext.attn", "aggregated_pooled", H=H, W=W, pool=sr)
    before = F.linear(old(q, k, v, backend="reference").transpose(1, 2).reshape(B, -1, C),
                      p["proj.weight"], p["proj.bias"])
    layer = TransNeXtAttention(C, (H, W), heads, sr_ratio=sr).double().eval()
    layer.load_state_dict(p)
    report("TransNeXt (8 x 8, heads 2, sr_ratio 2)", before,
           layer(x.view(B, H, W, C)).view(B, -1, C), ref)
    # DHSA: N 64, heads 4
    N, heads, D = 64, 4, 8
    q, k, v = (torch.randn(B, heads, N, D, generator=g, dtype=torch.float64)
               for _ in range(3))
    bnd = torch.cat([torch.arange(0, N, 4), torch.tensor([N])]).expand(B, -1)
    ref = off.dhsa_attention(q, k, v, 8, 16, bnd, 8, 4, 2)
    old = attndsl.compile("dhsa.attn", "dhsa_chunks", N=N, block=8, chunk=4, topk=2)
    new = attndsl.compile("dhsa.attn", "dhsa", N=N, block=8, chunk=4, budget=16, local=4,
                          sinks=2, instruction=8)
    report("DHSA (N 64, heads 4, block 8, chunk 4, budget 16, local 4, sinks 2, "
           "instruction 8; before: dhsa_chunks topk 2)",
           old(q, k, v, backend="reference"), new(q, k, v, backend="reference"), ref)
    # Combiner-Axial: 6 x 6, heads 2
    H = W = 6
    heads, hd = 2, 4
    x = torch.randn(B, H * W, heads * hd, generator=g, dtype=torch.float64)
    p = off.combiner_axial_params(heads * hd, heads, gen=g)
    ref = off.combiner_axial(x, p, H, heads)
    parts = off.combiner_axial_parts(x, p, H, heads)
    q, k, v, keys = (parts[i].reshape(B, H * W, heads, hd).transpose(1, 2)
                     for i in (0, 1, 2, 5))
    old = attndsl.compile("combiner.attn", "combiner_axial_pooled", H=H, W=W)
    new = attndsl.compile("combiner.attn", "combiner_axial", H=H, W=W)

    def out(o):
        return torch.einsum("bnhd,hdx->bnx", o.transpose(1, 2), p["out"])

    report("Combiner-Axial (6 x 6, heads 2)", out(old(q, k, v, backend="reference", scale=1.0)),
           out(new(q, k, v, backend="reference", scale=1.0, row_keys=keys)), ref)


if __name__ == "__main__":
    main()
