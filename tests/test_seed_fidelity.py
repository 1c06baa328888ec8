"""The four seed families against their authors' code, ported in tests/official.py (written
for these tests from the official repositories, which it cites with commits): outputs and
gradients in float64 on the reference and CPU backends (to ~1e-12) and in float32 on Triton
(interpreted on CPU, so tiny sizes), on random weights loaded under the official names.

Sources: DaiShiResearch/TransNeXt @ ae5f0686 classification/attention_native.py
(AggregatedAttention); SkyworkAI/MoH @ 66bb340a MoH-ViT/attention.py and MoH-DiT/models.py;
xiongsiheng/DHSA @ cc8e9c74 legacy/utils/helper.py (dhsa_sdpa, _obtain_dhsa_mask);
google-research/google-research @ 4c429948 combiner/combiner/jax/model/layer.py
(_SelfAttAxialRowmajor)."""

from __future__ import annotations

import official as off
import pytest
import torch
import torch.nn.functional as F

import attndsl
from attndsl.errors import AttnError
from attndsl.nn import DHSAAttention, MoHAttention, TransNeXtAttention

BACKENDS = ["reference", "cpu", "triton"]


def _dtype(backend):
    if backend == "triton":
        pytest.importorskip("triton")
        return torch.float32
    return torch.float64


def _tol(dtype):
    return 1e-12 if dtype == torch.float64 else 2e-5


def _close(a, b, tol, what):
    err = float((a.detach().double() - b.detach().double()).abs().max()) if a.numel() else 0.0
    assert err <= tol * max(1.0, float(b.detach().abs().max())), f"{what}: max difference {err}"


def _grads(out, tensors, seed=5):
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed),
                    dtype=torch.float64).to(out.dtype)
    return torch.autograd.grad((out * w).sum(), tensors, allow_unused=True)


def _check_layer(layer, official, x, params, backend, skip_grad=()):
    """The layer (official weights loaded) against the official function: the output and
    the gradients of x and of every weight (`skip_grad`: weights a backend takes as
    constants)."""
    dtype = x.dtype
    layer = layer.to(dtype)
    missing = layer.load_state_dict({n: t.to(dtype) for n, t in params.items()}, strict=True)
    assert not missing.missing_keys and not missing.unexpected_keys
    layer.backend = backend
    for n, p in layer.named_parameters():
        p.requires_grad_(n not in skip_grad)
    xs = x.detach().requires_grad_()
    got = layer(xs)
    names = [n for n, p in layer.named_parameters() if p.requires_grad]
    got_g = _grads(got, [xs] + [dict(layer.named_parameters())[n] for n in names])
    xr = x.detach().double().requires_grad_()
    pr = {n: t.detach().double().requires_grad_(n in names) for n, t in params.items()}
    ref = official(xr, pr)
    ref_g = _grads(ref.to(dtype), [xr] + [pr[n] for n in names])
    tol = _tol(dtype)
    _close(got.reshape(ref.shape), ref, tol, "output")
    for n, a, b in zip(["x"] + names, got_g, ref_g):
        _close(a, b, tol * 10, f"gradient of {n}")


# ------------------------------------------------------------------------------- MoH

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("heads,shared,routed", [(6, 2, 2), (4, 1, 2), (4, 0, 3), (3, 3, 0)])
def test_moh_matches_official(backend, heads, shared, routed):
    """MoHAttention with MoH-DiT's weights = MoH-DiT's MoHAttention (gates: routed softmax
    over the top `routed` times `routed`, shared softmax times `shared`, 2-way group
    weights).
    Source: SkyworkAI/MoH @ 66bb340a00e7172f0a2a33059ccdac405c8b0efd, MoH-ViT/attention.py
    (gates) and MoH-DiT/models.py (MoHAttention)."""
    dtype = _dtype(backend)
    g = torch.Generator().manual_seed(heads * 10 + shared)
    B, N, C = 2, 5, 4 * heads
    x = torch.randn(B, N, C, generator=g, dtype=torch.float64).to(dtype)
    p = off.moh_params(C, heads, shared, routed, gen=g)
    layer = MoHAttention(C, heads, shared, routed).eval()
    _check_layer(layer, lambda x, p: off.moh_attention(x, p, heads, shared, routed), x, p,
                 backend)


def test_moh_old_gates_differ_and_stay_reachable():
    """`normalised=true`: the routed gates sum to 1 (attndsl's earlier rule; with shared
    and group weights as the official): MoHAttention(gates='normalised') computes it, and it
    differs from the official output.
    Source: SkyworkAI/MoH @ 66bb340a00e7172f0a2a33059ccdac405c8b0efd, MoH-ViT/attention.py
    (gates) and MoH-DiT/models.py (MoHAttention)."""
    g = torch.Generator().manual_seed(0)
    heads, shared, routed, B, N = 6, 2, 2, 2, 5
    C = 4 * heads
    x = torch.randn(B, N, C, generator=g, dtype=torch.float64)
    p = off.moh_params(C, heads, shared, routed, gen=g)
    layer = MoHAttention(C, heads, shared, routed, gates="normalised").double().eval()
    layer.load_state_dict(p)
    q, k, v = F.linear(x, p["qkv.weight"], p["qkv.bias"]).view(B, N, 3, heads, 4).permute(
        2, 0, 3, 1, 4)
    attn = torch.softmax(q @ k.transpose(-1, -2) / 2.0, -1) @ v  # [B, heads, N, 4]
    gates = off.moh_gates(x, p, heads, shared, routed)
    gates = torch.cat([gates[..., :shared], gates[..., shared:] / routed], -1)
    want = F.linear((attn * gates.transpose(1, 2).unsqueeze(-1)).transpose(1, 2).reshape(
        B, N, C), p["proj.weight"], p["proj.bias"])
    _close(layer(x), want, 1e-12, "normalised gates")
    assert float((want - off.moh_attention(x, p, heads, shared, routed)).abs().max()) > 0.05


def test_moh_hard_gates_match_moh_llama():
    """gates='hard' with MoH-LLaMA3's router logits (routed query norms over their std):
    its 0/1 gates.
    Source: SkyworkAI/MoH @ 66bb340a00e7172f0a2a33059ccdac405c8b0efd,
    MoH-LLaMA3/Inference_code/modeling_llama.py."""
    g = torch.Generator().manual_seed(3)
    B, N, heads, shared, routed, D = 1, 6, 5, 1, 2, 4
    q, k, v = (torch.randn(B, heads, N, D, generator=g, dtype=torch.float64)
               for _ in range(3))
    norms = q[:, shared:].norm(dim=-1).transpose(1, 2)
    router = norms / norms.std(-1, keepdim=True)
    op = attndsl.compile("moh.attn", "moh", N=N, heads=heads, shared=shared, topk=routed,
                         hard=True)
    for backend in ("reference", "cpu"):
        got = op(q, k, v, backend=backend, router=router)
        gates = off.moh_llama_mask(q.transpose(1, 2), shared, routed).transpose(1, 2)
        want = torch.softmax(q @ k.transpose(-1, -2) / 2.0, -1) @ v * gates.unsqueeze(-1)
        _close(got, want, 1e-12, backend)


def test_moh_load_balancing_loss():
    layer = MoHAttention(8, 4, 1, 2).double().train()
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    layer(x)
    probs = torch.softmax(layer.wg(x).reshape(10, 3), -1)
    used = torch.zeros_like(probs).scatter_(-1, probs.topk(2, -1).indices, 1.0)
    want = torch.mean(probs.mean(0) * used.mean(0)) * 9
    assert torch.allclose(layer.load_balancing_loss, want)


# ------------------------------------------------------------------------------- TransNeXt

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("H,W,heads,window,sr", [(4, 6, 2, 3, 2), (5, 5, 1, 5, 2)])
def test_transnext_matches_official(backend, H, W, heads, window, sr):
    """TransNeXtAttention with AggregatedAttention's weights = AggregatedAttention.forward
    (eval): every term, learnable tokens included. The CPU and Triton backends take the
    position biases as constants, so their gradients are checked on the reference only.
    Source: DaiShiResearch/TransNeXt @ ae5f0686a2b9ee256c4ae8a15b68a469ad1bd4e5,
    classification/attention_native.py (AggregatedAttention) and transnext_native.py
    (get_relative_position_cpb)."""
    dtype = _dtype(backend)
    g = torch.Generator().manual_seed(H * W + window)
    B, hd = 2, 4
    C = heads * hd
    x = torch.randn(B, H * W, C, generator=g, dtype=torch.float64).to(dtype)
    p = off.transnext_params(C, heads, window, gen=g)
    layer = TransNeXtAttention(C, (H, W), heads, window_size=window, sr_ratio=sr).eval()
    skip = () if backend == "reference" else (
        "relative_pos_bias_local", "cpb_fc1.weight", "cpb_fc1.bias", "cpb_fc2.weight",
        "cpb_fc2.bias")
    pool = (H // sr, W // sr)

    def official(x, p):
        return off.transnext_aggregated(x.reshape(B, H * W, C), p, H, W, heads, window, pool)

    _check_layer(layer, official, x.reshape(B, H, W, C), p, backend, skip)


def test_transnext_fixed_pool_and_bias_gradient_errors():
    """fixed_pool_size and a pretraining grid other than the input's; a bias gradient asked
    of the CPU backend is a located error.
    Source: DaiShiResearch/TransNeXt @ ae5f0686a2b9ee256c4ae8a15b68a469ad1bd4e5,
    classification/attention_native.py (AggregatedAttention) and transnext_native.py
    (get_relative_position_cpb)."""
    g = torch.Generator().manual_seed(1)
    H, W, heads, C = 5, 6, 2, 8
    x = torch.randn(1, H * W, C, generator=g, dtype=torch.float64)
    p = off.transnext_params(C, heads, 3, gen=g)
    layer = TransNeXtAttention(C, (H, W), heads, fixed_pool_size=2,
                               pretrain_size=(7, 9)).double().eval()
    layer.load_state_dict(p)
    rel = off.transnext_relative_cpb((H, W), (2, 2), (7, 9))
    want = off.transnext_aggregated(x, p, H, W, heads, 3, (2, 2), rel=rel)
    _close(layer(x.view(1, H, W, C)).view(1, H * W, C), want, 1e-12, "fixed pool")
    layer.backend = "cpu"
    with pytest.raises(AttnError, match="'local_bias' and takes it as a constant"):
        layer(x.view(1, H, W, C))
    with pytest.raises(AttnError, match="built for a 5 x 6 grid, not 6 x 5"):
        layer(x.view(1, W, H, C))


def test_transnext_pooled_form_differs():
    """The kept form `aggregated_pooled` (mean-pooled q/k/v, no learned parts) is not the
    official computation on the same q, k, v."""
    g = torch.Generator().manual_seed(2)
    H = W = 4
    q, k, v = (torch.randn(1, 2, H * W, 4, generator=g, dtype=torch.float64)
               for _ in range(3))
    old = attndsl.compile("transnext.attn", "aggregated_pooled", H=H, W=W, pool=2)
    new = attndsl.compile("transnext.attn", "aggregated", H=H, W=W, heads=2, pool=2)
    pk = F.avg_pool2d(k.view(1, 2, H, W, 4).permute(0, 1, 4, 2, 3).reshape(1, 8, H, W), 2)
    pv = F.avg_pool2d(v.view(1, 2, H, W, 4).permute(0, 1, 4, 2, 3).reshape(1, 8, H, W), 2)
    inputs = dict(local_bias=torch.zeros(2, 9, dtype=torch.float64),
                  pool_keys=pk.view(1, 2, 4, 4).transpose(2, 3),
                  pool_values=pv.view(1, 2, 4, 4).transpose(2, 3),
                  pool_bias=torch.zeros(2, 16, 4, dtype=torch.float64))
    same = new(q * 0.5, k, v, backend="reference", **inputs)  # mean pooling, default scale
    _close(same, old(q, k, v, backend="reference"), 1e-12, "mean-pooled tokens as inputs")


# ------------------------------------------------------------------------------- DHSA

DHSA_CASES = [  # N, block, chunk, budget, local, sinks, instruction
    (24, 4, 3, 8, 2, 2, 4), (17, 4, 5, 6, 2, 3, 3), (21, 8, 4, 30, 3, 0, 2)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", DHSA_CASES)
def test_dhsa_matches_official(backend, case):
    """dhsa_sdpa: one selection from head-averaged q and k, a budget of tokens (a chunk cut),
    the most recent keys, sink tokens, a causal instruction tail; with the chunk starts
    given as `boundaries` and as `chunk`.
    Source: xiongsiheng/DHSA @ cc8e9c7451cb404f7b2a286a0b5448a66b3d1aec,
    legacy/utils/helper.py (dhsa_sdpa, _obtain_dhsa_mask)."""
    N, block, chunk, budget, local, sinks, instr = case
    dtype = _dtype(backend)
    g = torch.Generator().manual_seed(N)
    B, H, D = 2, 3, 4
    q, k, v = (torch.randn(B, H, N, D, generator=g, dtype=torch.float64) for _ in range(3))
    cuts = torch.sort(torch.randperm(N - 1, generator=g)[:N // 4] + 1).values
    bnd = torch.cat([torch.tensor([0]), cuts, torch.tensor([N])]).expand(B, -1)
    op = attndsl.compile("dhsa.attn", "dhsa", N=N, block=block, chunk=chunk, budget=budget,
                         local=local, sinks=sinks, instruction=instr)
    regular = torch.cat([torch.arange(0, N, chunk), torch.tensor([N])]).expand(B, -1)
    for given, starts in ((None, regular), (bnd[:, :-1], bnd)):
        qa, ka, va = (t.to(dtype).requires_grad_() for t in (q, k, v))
        extra = {} if given is None else {"boundaries": given}
        got = op(qa, ka, va, backend=backend, **extra)
        qr, kr, vr = (t.clone().requires_grad_() for t in (q, k, v))
        want = off.dhsa_attention(qr, kr, vr, block, budget, starts, instr, local, sinks)
        tol = _tol(dtype)
        _close(got, want, tol, "output")
        for a, b in zip(_grads(got, [qa, ka, va]), _grads(want.to(dtype), [qr, kr, vr])):
            _close(a, b, tol * 10, "gradient")


def test_dhsa_layer_and_old_forms():
    """DHSAAttention = its projections around dhsa_sdpa; `shared = false` ranks per head
    and `dhsa_chunks` (the earlier form) differs from the official selection.
    Source: xiongsiheng/DHSA @ cc8e9c7451cb404f7b2a286a0b5448a66b3d1aec,
    legacy/utils/helper.py (dhsa_sdpa, _obtain_dhsa_mask)."""
    g = torch.Generator().manual_seed(4)
    B, N, C, heads = 1, 20, 12, 3
    layer = DHSAAttention(C, heads, block=4, chunk=3, budget=7, local=2, sinks=1,
                          instruction=3).double()
    x = torch.randn(B, N, C, generator=g, dtype=torch.float64)
    q, k, v = (F.linear(x, w).view(B, N, heads, 4).transpose(1, 2)
               for w in (layer.q_proj.weight, layer.k_proj.weight, layer.v_proj.weight))
    bnd = torch.cat([torch.arange(0, N, 3), torch.tensor([N])]).view(1, -1)
    att = off.dhsa_attention(q, k, v, 4, 7, bnd, 3, 2, 1)
    want = F.linear(att.transpose(1, 2).reshape(B, N, C), layer.o_proj.weight)
    _close(layer(x), want, 1e-12, "layer")
    per_head = attndsl.compile("dhsa.attn", "dhsa", N=N, block=4, chunk=3, budget=7, local=2,
                               sinks=1, instruction=3, shared=False)
    m = per_head.mask(q=q, k=k)
    assert m.shape[1] == heads and not torch.equal(m[0, 0], m[0, 1])
    old = attndsl.compile("dhsa.attn", "dhsa_chunks", N=N, block=4, chunk=3, topk=1)
    assert float((old(q, k, v, backend="reference") - att).abs().max()) > 0.01


# ------------------------------------------------------------------------------- Combiner

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("H,W", [(4, 5), (3, 3), (1, 4)])
def test_combiner_axial_matches_official(backend, H, W):
    """_SelfAttAxialRowmajor on the same projections: `combiner_axial` with the learned row
    keys as `row_keys` (scale 1: the official q is divided by sqrt(head dim) already);
    gradients through the row keys too.
    Source: google-research/google-research @ 4c4299485319ed72ef782020c81784be5468924e,
    combiner/combiner/jax/model/layer.py (_SelfAttAxialRowmajor)."""
    dtype = _dtype(backend)
    g = torch.Generator().manual_seed(H * W)
    B, heads, hd = 2, 2, 4
    C = heads * hd
    x = torch.randn(B, H * W, C, generator=g, dtype=torch.float64)
    p = off.combiner_axial_params(C, heads, gen=g)
    op = attndsl.compile("combiner.attn", "combiner_axial", H=H, W=W)

    def run(x, through_op):
        q, k, v, _local, _row, key_row = off.combiner_axial_parts(x, p, H, heads)
        if not through_op:
            return off.combiner_axial(x, p, H, heads)
        def f(t):
            return t.reshape(B, H * W, heads, hd).transpose(1, 2).to(dtype)

        o = op(f(q), f(k), f(v), backend=backend, scale=1.0, row_keys=f(key_row))
        return torch.einsum("bnhd,hdx->bnx", o.transpose(1, 2), p["out"].to(dtype))

    xa, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
    got, want = run(xa, True), run(xr, False)
    _close(got, want, _tol(dtype), "output")
    _close(_grads(got, [xa])[0], _grads(want.to(dtype), [xr])[0], _tol(dtype) * 10,
           "gradient")
    if H > 1:
        old = attndsl.compile("combiner.attn", "combiner_axial_pooled", H=H, W=W)
        qkv = [t.reshape(B, H * W, heads, hd).transpose(1, 2) for t in
               off.combiner_axial_parts(x, p, H, heads)[:3]]
        o = op(*qkv, backend="reference", scale=1.0,
               row_keys=off.combiner_axial_parts(x, p, H, heads)[5].reshape(
                   B, H * W, heads, hd).transpose(1, 2))
        assert float((old(*qkv, backend="reference", scale=1.0) - o).abs().max()) > 0.01
