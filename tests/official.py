"""The four seed families as their authors' code computes them, written again here (float64,
plain PyTorch, weights passed as dicts named as in the official modules) so that the tests
compare attndsl with the official computations and not with attndsl's own code.

Sources (public repositories, read at these commits):
- TransNeXt: DaiShiResearch/TransNeXt @ ae5f0686a2b9ee256c4ae8a15b68a469ad1bd4e5,
  classification/attention_native.py (AggregatedAttention, get_seqlen_and_mask) and
  @ ff68810eaacc6ab12b8c4ba8c7f264387ae1d54f classification/transnext_native.py
  (get_relative_position_cpb).
- MoH: SkyworkAI/MoH @ 66bb340a00e7172f0a2a33059ccdac405c8b0efd, MoH-ViT/attention.py
  (Attention: the gates) and MoH-DiT/models.py (MoHAttention: timm's attention with them),
  MoH-LLaMA3/Inference_code/modeling_llama.py (0/1 gates from query norms).
- DHSA: xiongsiheng/DHSA @ cc8e9c7451cb404f7b2a286a0b5448a66b3d1aec,
  legacy/utils/helper.py (dhsa_sdpa, _obtain_dhsa_mask).
- Combiner: google-research/google-research @ 4c4299485319ed72ef782020c81784be5468924e,
  combiner/combiner/jax/model/layer.py (_SelfAttAxialRowmajor; JAX there, torch here).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# --------------------------------------------------------------------------- TransNeXt


def transnext_relative_cpb(query_size, key_size, pretrain_size=None):
    """(index [Nq * Nk], coordinate table [T, 2]) of the continuous position bias: the query
    grid against the adaptive-pool centres of the key grid, log-spaced (float64 here; the
    official function uses float32)."""
    pretrain_size = pretrain_size or query_size
    axes = []
    for i in range(2):
        qa = torch.arange(query_size[i], dtype=torch.float64)
        ka = F.adaptive_avg_pool1d(qa.view(1, 1, -1), key_size[i]).view(-1)
        axes.append((qa, ka))
    (qh, kh), (qw, kw) = axes
    kh, kw = (t.reshape(-1) for t in torch.meshgrid(kh, kw, indexing="ij"))
    qh, qw = (t.reshape(-1) for t in torch.meshgrid(qh, qw, indexing="ij"))
    rel_h = (qh[:, None] - kh[None, :]) / (pretrain_size[0] - 1) * 8
    rel_w = (qw[:, None] - kw[None, :]) / (pretrain_size[1] - 1) * 8
    rel = torch.stack([rel_h, rel_w], -1).view(-1, 2)
    table, index = torch.unique(rel, return_inverse=True, dim=0)
    table = torch.sign(table) * torch.log2(table.abs() + 1.0) / math.log2(8)
    return index, table


def transnext_window_neighbours(H, W, window):
    """For each window offset j (row-major over (dy, dx) in [-r, r]^2): the neighbour's flat
    index per token and whether it lies inside the grid (unfold's zero padding)."""
    r = window // 2
    ys = torch.arange(H).view(-1, 1).expand(H, W).reshape(-1)
    xs = torch.arange(W).view(1, -1).expand(H, W).reshape(-1)
    idx, ok = [], []
    for dy in range(-r, r + 1):
        for dx in range(-r, r + 1):
            y, x = ys + dy, xs + dx
            inside = (y >= 0) & (y < H) & (x >= 0) & (x < W)
            idx.append(torch.where(inside, y * W + x, torch.zeros_like(y)))
            ok.append(inside)
    return torch.stack(idx, -1), torch.stack(ok, -1)  # [N, L]


def transnext_aggregated(x, p, H, W, heads, window=3, pool=(2, 2), rel=None,
                         learnable=True):
    """AggregatedAttention.forward (eval mode) for x [B, H*W, C]: cosine attention with a
    query embedding, per-head softplus temperature and a per-query length scale over the
    clipped `window` x `window` neighbourhood and the pooled tokens
    LayerNorm(AdaptiveAvgPool(GELU(conv1x1(x)))), one softmax; local and pooled position
    biases; learnable tokens added to the local weights after the softmax; `proj`.
    With learnable=False the learnable tokens are left out (the attention part alone)."""
    B, N, C = x.shape
    hd = C // heads
    L = window * window
    PH, PW = pool
    P = PH * PW
    q = F.linear(x, p["q.weight"], p["q.bias"]).view(B, N, heads, hd).transpose(1, 2)
    q_norm = F.normalize(q, dim=-1)
    nbr, ok = transnext_window_neighbours(H, W, window)
    length = ok.sum(-1).to(x.dtype)  # keys of the window inside the grid
    scale = torch.log(length + P).view(1, 1, N, 1)
    q_scaled = (q_norm + p["query_embedding"]) * F.softplus(p["temperature"]) * scale
    kv = F.linear(x, p["kv.weight"], p["kv.bias"])
    k, v = kv.chunk(2, dim=-1)
    k = F.normalize(k.view(B, N, heads, hd), dim=-1).transpose(1, 2)
    v = v.reshape(B, N, heads, hd).transpose(1, 2)
    okf = ok.to(x.dtype).view(1, 1, N, L, 1)
    k_loc = k[:, :, nbr] * okf  # [B, heads, N, L, hd], zero outside the grid
    v_loc = v[:, :, nbr] * okf
    s_loc = (q_scaled.unsqueeze(-2) * k_loc).sum(-1) + p["relative_pos_bias_local"].view(
        1, heads, 1, L)
    s_loc = s_loc.masked_fill(~ok.view(1, 1, N, L), float("-inf"))
    img = x.transpose(1, 2).reshape(B, C, H, W)
    pooled = F.adaptive_avg_pool2d(F.gelu(F.conv2d(img, p["sr.weight"], p["sr.bias"])),
                                   (PH, PW)).reshape(B, C, P).transpose(1, 2)
    pooled = F.layer_norm(pooled, (C,), p["norm.weight"], p["norm.bias"])
    kvp = F.linear(pooled, p["kv.weight"], p["kv.bias"])
    kp, vp = kvp.chunk(2, dim=-1)
    kp = F.normalize(kp.view(B, P, heads, hd).transpose(1, 2), dim=-1)
    vp = vp.reshape(B, P, heads, hd).transpose(1, 2)
    if rel is None:
        rel = transnext_relative_cpb((H, W), (PH, PW))
    index, table = rel
    mlp = F.linear(F.relu(F.linear(table, p["cpb_fc1.weight"], p["cpb_fc1.bias"])),
                   p["cpb_fc2.weight"], p["cpb_fc2.bias"])  # [T, heads]
    pool_bias = mlp.transpose(0, 1)[:, index.view(-1)].view(heads, N, P)
    s_pool = q_scaled @ kp.transpose(-1, -2) + pool_bias
    attn = torch.softmax(torch.cat([s_loc, s_pool], -1), dim=-1)
    a_loc, a_pool = attn.split([L, P], dim=-1)
    if learnable:
        a_loc = a_loc + q_norm @ p["learnable_tokens"] + p["learnable_bias"]
    out = (a_loc.unsqueeze(-1) * v_loc).sum(-2) + a_pool @ vp
    out = out.transpose(1, 2).reshape(B, N, C)
    return F.linear(out, p["proj.weight"], p["proj.bias"])


def transnext_params(C, heads, window=3, gen=None, dtype=torch.float64):
    """Random weights under the official module's names (state_dict keys)."""
    hd = C // heads
    L = window * window

    def r(*s, std=C ** -0.5):
        return (torch.randn(*s, generator=gen) * std).to(dtype)

    return {
        "q.weight": r(C, C), "q.bias": r(C), "kv.weight": r(2 * C, C), "kv.bias": r(2 * C),
        "proj.weight": r(C, C), "proj.bias": r(C),
        "temperature": r(heads, 1, 1, std=0.5), "query_embedding": r(heads, 1, hd),
        "sr.weight": r(C, C, 1, 1), "sr.bias": r(C), "norm.weight": 1 + r(C), "norm.bias": r(C),
        "cpb_fc1.weight": r(512, 2), "cpb_fc1.bias": r(512), "cpb_fc2.weight": r(heads, 512,
                                                                                  std=0.05),
        "cpb_fc2.bias": r(heads), "relative_pos_bias_local": r(heads, L),
        "learnable_tokens": r(heads, hd, L), "learnable_bias": r(heads, 1, L),
    }


# --------------------------------------------------------------------------- MoH


def moh_gates(x, p, heads, shared, routed):
    """[B, N, heads] gates of MoH-ViT's Attention / MoH-DiT's MoHAttention (eval mode): the
    routed heads' softmax restricted to the top `routed` and renormalised, times `routed`;
    the shared heads' softmax times `shared` (ones when shared == 1); the two groups weighted
    by 2 * softmax(wg_0 x)."""
    B, N, _ = x.shape
    if routed > 0:
        g = torch.softmax(F.linear(x, p["wg.weight"]), dim=-1)
        top = torch.topk(g, routed, dim=-1).indices
        keep = torch.zeros_like(g).scatter_(-1, top, 1.0)
        rg = g * keep
        rg = rg / rg.sum(-1, keepdim=True).clamp(min=torch.finfo(g.dtype).eps) * routed
        if shared == 0:
            return rg
        if shared > 1:
            sg = torch.softmax(F.linear(x, p["wg_1.weight"]), dim=-1) * shared
        else:
            sg = torch.ones(B, N, shared, dtype=x.dtype) * shared
        w0 = torch.softmax(F.linear(x, p["wg_0.weight"]), dim=-1) * 2
        return torch.cat([sg * w0[..., :1], rg * w0[..., 1:]], dim=-1)
    return torch.softmax(F.linear(x, p["wg_1.weight"]), dim=-1) * shared


def moh_attention(x, p, heads, shared, routed):
    """MoH-DiT's MoHAttention.forward (timm's multi-head attention, qk_norm off, eval)."""
    B, N, C = x.shape
    hd = p["qkv.weight"].shape[0] // (3 * heads)
    qkv = F.linear(x, p["qkv.weight"], p["qkv.bias"]).view(B, N, 3, heads, hd)
    q, k, v = qkv.permute(2, 0, 3, 1, 4)
    attn = torch.softmax((q * hd ** -0.5) @ k.transpose(-1, -2), dim=-1)
    out = (attn @ v).transpose(1, 2)  # [B, N, heads, hd]
    out = out * moh_gates(x, p, heads, shared, routed).unsqueeze(-1)
    return F.linear(out.reshape(B, N, heads * hd), p["proj.weight"], p["proj.bias"])


def moh_params(C, heads, shared, routed, gen=None, dtype=torch.float64):
    def r(*s):
        return (torch.randn(*s, generator=gen) * C ** -0.5).to(dtype)

    p = {"qkv.weight": r(3 * C, C), "qkv.bias": r(3 * C), "proj.weight": r(C, C),
         "proj.bias": r(C)}
    if routed > 0:
        p["wg.weight"] = r(heads - shared, C)
        if shared > 0:
            p["wg_0.weight"] = r(2, C)
    if shared > 1:
        p["wg_1.weight"] = r(shared, C)
    return p


def moh_llama_mask(q, shared, routed):
    """MoH-LLaMA3's 0/1 gates [B, N, heads] from the pre-RoPE queries [B, N, heads, hd]: the
    routed heads whose query norms (over their std) are the top `routed`; shared heads 1."""
    norms = q[:, :, shared:].norm(dim=-1)
    logits = norms / norms.std(dim=-1, keepdim=True)
    top = torch.topk(torch.softmax(logits, -1), routed, dim=-1).indices
    mask = torch.zeros_like(norms).scatter_(-1, top, 1.0)
    return torch.cat([torch.ones_like(mask[..., :shared]), mask], -1)


# --------------------------------------------------------------------------- DHSA


def _top_tokens(scores, k):
    """The k highest of `scores` (a 1-D float tensor with -inf for excluded tokens); ties
    between equal scores go to the later token (torch.topk, which the official code calls,
    leaves their order unspecified)."""
    order = torch.sort(scores.flip(0), descending=True, stable=True).indices
    return (scores.numel() - 1 - order[:k]).sort().values


def dhsa_selection(q, k, block, budget, boundaries, local=128, sinks=128, norm=True):
    """Per query block: the list of selected key indices (with the official duplicates),
    as `_obtain_dhsa_mask` and the global-token splice of `dhsa_sdpa` build them.
    q [B, H, Q, D] (the queries in blocks), k [B, H, K, D], boundaries [B, L] with the
    chunk starts and K last. Ranked in float64 here (the official code in float32)."""
    B, H, Q, D = q.shape
    K = k.shape[2]
    nb = -(-Q // block)
    budget = min(budget, K)
    qpad = F.pad(q, (0, 0, 0, nb * block - Q)).double().mean(1)  # heads averaged
    qrep = qpad.view(B, nb, block, D).mean(2)
    if norm:
        real = torch.clamp(Q - torch.arange(nb) * block, max=block).double()
        qrep = qrep * real.sqrt().view(1, -1, 1)
    kbar = k.double().mean(1)  # [B, K, D]
    out = []
    for b in range(B):
        starts, ends = boundaries[b, :-1], boundaries[b, 1:]
        lens = (ends - starts).clamp(min=1).double()
        krep = torch.stack([kbar[b, s:e].sum(0) for s, e in zip(starts.tolist(),
                                                                 ends.tolist())])
        krep = krep / lens.view(-1, 1)
        if norm:
            krep = krep * lens.sqrt().view(-1, 1)
        chunk_of = torch.searchsorted(boundaries[b], torch.arange(K), right=True) - 1
        tok = (qrep[b] @ krep.T)[:, chunk_of]  # [nb, K] token-level scores
        sel_b = []
        for i in range(nb):
            upper = (i + 1) * block
            allowed = torch.arange(K) < upper
            n_allowed = int(allowed.sum())
            recent_n = min(local, budget, n_allowed)
            recent = torch.nonzero(allowed).view(-1)[n_allowed - recent_n:]
            s = torch.where(allowed, tok[i], torch.tensor(-math.inf, dtype=torch.float64))
            s[recent] = -math.inf
            k_sel = min(budget - recent_n, n_allowed - recent_n)
            picked = _top_tokens(s, k_sel) if k_sel > 0 else torch.zeros(0, dtype=torch.long)
            pads = torch.full((budget - recent_n - k_sel,), K - 1, dtype=torch.long)
            sel = torch.cat([picked, pads, recent]).sort().values
            if sinks > 0:
                q_upper = min(i * block + block, K)
                glob = torch.clamp(torch.arange(sinks), max=max(q_upper - 1, 0))
                sel = torch.cat([glob, sel[sinks:]]) if sinks < budget else glob[:budget]
            sel_b.append(sel)
        out.append(sel_b)
    return out


def dhsa_attention(q, k, v, block, budget, boundaries, instruction=64, local=128, sinks=128,
                   norm=True, scale=None):
    """dhsa_sdpa (no sliding window): the last `instruction` queries attend every earlier
    key; the others, in blocks of `block`, attend causally the keys selected for their
    block (a key listed twice counts twice, as SDPA over the gathered keys counts it)."""
    B, H, N, D = q.shape
    scale = D ** -0.5 if scale is None else scale
    Q = N - instruction if instruction else 0  # the official slice [-0:] takes every query
    out = torch.zeros_like(q)
    if Q > 0:
        sel = dhsa_selection(q[:, :, :Q], k, block, budget, boundaries, local, sinks, norm)
        for b in range(B):
            for i, idx in enumerate(sel[b]):
                rows = torch.arange(i * block, min((i + 1) * block, Q))
                s = (q[b, :, rows] @ k[b, :, idx].transpose(-1, -2)) * scale
                s = s.masked_fill(idx.view(1, 1, -1) > rows.view(1, -1, 1), float("-inf"))
                out[b, :, rows] = torch.softmax(s, -1) @ v[b, :, idx]
    rows = torch.arange(max(Q, 0), N)
    s = (q[:, :, rows] @ k.transpose(-1, -2)) * scale
    s = s.masked_fill(torch.arange(N).view(1, -1) > rows.view(-1, 1), float("-inf"))
    out[:, :, rows] = torch.softmax(s, -1) @ v
    return out


# --------------------------------------------------------------------------- Combiner-Axial


def combiner_axial_parts(x, p, rows, heads):
    """q (divided by sqrt(head dim), as `get_qkv` does), k, v [B, rows, cols, heads, hd],
    the full-row attention output and the learned row keys of `_SelfAttAxialRowmajor`
    (its row-wise DenseGeneral, the residual x, LayerNorm (eps 1e-6, flax's), DenseGeneral;
    no dropout)."""
    B, N, C = x.shape
    cols = N // rows
    hd = C // heads
    xs = x.view(B, rows, cols, C)
    q = torch.einsum("brcx,xhd->brchd", xs, p["query"]) / math.sqrt(hd)
    k = torch.einsum("brcx,xhd->brchd", xs, p["key"])
    v = torch.einsum("brcx,xhd->brchd", xs, p["value"])
    local = torch.einsum("brqhd,brkhd->brqhk", q, k)
    row_out = torch.einsum("brqhk,brkhd->brqhd", torch.softmax(local, -1), v)
    key_row = torch.einsum("brchd,hdx->brcx", row_out, p["row_proj"]) + xs
    key_row = F.layer_norm(key_row, (C,), p["row_norm_scale"], p["row_norm_bias"], eps=1e-6)
    key_row = torch.einsum("brcx,xhd->brchd", key_row, p["row_key"])
    return q, k, v, local, row_out, key_row


def combiner_axial(x, p, rows, heads):
    """_SelfAttAxialRowmajor.__call__ (deterministic): a query at (r, c) attends the earlier
    tokens of its row and, for every earlier row r', the token (r', c) whose key is the
    learned row key and whose value is the full-row attention output at (r', c); one
    softmax; the output DenseGeneral."""
    B, N, C = x.shape
    cols = N // rows
    q, k, v, local, row_out, key_row = combiner_axial_parts(x, p, rows, heads)
    causal = torch.arange(cols).view(-1, 1) < torch.arange(cols).view(1, -1)  # [q, k] masked
    local = local + causal.view(1, 1, cols, 1, cols) * -1e10
    glob = torch.einsum("bqlhd,bklhd->bqlhk", q, key_row)
    later = torch.arange(rows).view(-1, 1) <= torch.arange(rows).view(1, -1)
    glob = glob + later.view(1, rows, 1, 1, rows) * -1e10
    probs = torch.softmax(torch.cat([local, glob], -1), -1)
    p_loc, p_glob = probs.split([cols, rows], -1)
    merged = torch.einsum("bsqhk,bskhd->bsqhd", p_loc, v)
    merged = merged + torch.einsum("bqlhv,bvlhd->bqlhd", p_glob, row_out)
    return torch.einsum("bnhd,hdx->bnx", merged.reshape(B, N, heads, -1), p["out"])


def combiner_axial_params(C, heads, gen=None, dtype=torch.float64):
    hd = C // heads

    def r(*s):
        return (torch.randn(*s, generator=gen) * C ** -0.5).to(dtype)

    return {"query": r(C, heads, hd), "key": r(C, heads, hd), "value": r(C, heads, hd),
            "row_proj": r(heads, hd, C), "row_norm_scale": 1 + r(C), "row_norm_bias": r(C),
            "row_key": r(C, heads, hd), "out": r(heads, hd, C)}
