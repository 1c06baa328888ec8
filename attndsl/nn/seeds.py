"""attndsl.nn layers for the seed families whose official modules carry learned parts around
the attention: MoH (SkyworkAI/MoH), TransNeXt aggregated attention (DaiShiResearch/TransNeXt)
and DHSA (xiongsiheng/DHSA). Parameter names follow the official modules, so their
checkpoints' attention weights load with `load_state_dict`; the attention itself is the
standard-library pattern (patterns/moh.attn, transnext.attn, dhsa.attn) on any backend.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from attndsl import api
from attndsl.errors import InputError, ParameterError, UnsupportedError, did_you_mean


def _positive(**vals) -> None:
    for name, val in vals.items():
        if isinstance(val, bool) or not isinstance(val, int) or val < 1:
            raise ParameterError(f"{name} must be a positive int, not {val!r}")


def _heads_divide(dim: int, heads: int) -> None:
    _positive(dim=dim, heads=heads)
    if dim % heads:
        raise ParameterError(f"dim {dim} must be a multiple of heads {heads}")


def _backend(backend: str) -> str:
    if backend not in api.BACKENDS:
        raise UnsupportedError(f"unknown backend '{backend}'" + did_you_mean(backend,
                                                                            api.BACKENDS))
    return backend


def _channels_last(x, dim: int, axes: int) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != axes + 2 or x.shape[-1] != dim:
        shape = list(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        want = "[batch, tokens, dim]" if axes == 1 else "[batch, H, W, dim]"
        raise InputError(f"x must be {want} with dim {dim} (channels last), not {shape}")


class MoHAttention(nn.Module):
    """Mixture-of-Head attention as MoH-DiT's `MoHAttention` computes it (timm's attention,
    per-token head gates): `qkv`, `proj`, router `wg` (routed heads), `wg_0` (the two-way
    shared/routed group weights, when both groups exist) and `wg_1` (shared-head weights,
    when more than one head is shared). `gates`: 'official' (routed gates sum to `routed`),
    'normalised' (they sum to 1) or 'hard' (MoH-LLaMA3's 0/1 gates; `wg` still ranks).
    In training, `load_balancing_loss` holds the official auxiliary loss of the last call.
    Difference from MoH-ViT: its cosine attention with position bias is not this layer."""

    def __init__(self, dim: int, heads: int, shared: int, routed: int, *,
                 qkv_bias: bool = True, gates: str = "official", backend: str = "auto"):
        super().__init__()
        _heads_divide(dim, heads)
        if gates not in ("official", "normalised", "hard"):
            raise ParameterError(f"gates must be 'official', 'normalised' or 'hard', not "
                                 f"{gates!r}")
        if routed == 0 and shared != heads:
            raise ParameterError("with no routed head every head must be shared "
                                 f"(shared={shared}, heads={heads})")
        self.dim, self.heads, self.shared, self.routed = dim, heads, shared, routed
        self.head_dim, self.backend = dim // heads, _backend(backend)
        self.op = api.compile("moh.attn", "moh", heads=heads, shared=shared, topk=routed,
                              normalised=gates == "normalised", hard=gates == "hard")
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        if routed > 0:
            self.wg = nn.Linear(dim, heads - shared, bias=False)
            if shared > 0:
                self.wg_0 = nn.Linear(dim, 2, bias=False)
        if shared > 1:
            self.wg_1 = nn.Linear(dim, shared, bias=False)
        self.load_balancing_loss = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, N, dim] -> [B, N, dim]."""
        _channels_last(x, self.dim, 1)
        B, N, _ = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.heads, self.head_dim).permute(
            2, 0, 3, 1, 4).unbind(0)
        inputs = {"router": self.wg(x) if self.routed else x.new_zeros(B, N, 0)}
        if self.shared > 1:
            inputs["shared_router"] = self.wg_1(x)
        if self.routed and self.shared:
            inputs["group_router"] = self.wg_0(x)
        if self.training and self.routed:
            probs = torch.softmax(inputs["router"].reshape(B * N, -1), -1)
            top = torch.topk(probs, self.routed, dim=-1).indices
            used = torch.zeros_like(probs).scatter_(-1, top, 1.0).mean(0)
            self.load_balancing_loss = (probs.mean(0) * used).mean() * probs.shape[1] ** 2
        out = self.op(q, k, v, backend=self.backend, **inputs)
        return self.proj(out.transpose(1, 2).reshape(B, N, self.dim))


def _pool_centres(n: int, p: int) -> torch.Tensor:
    """The centre of each of p adaptive-average-pool regions of 0..n-1."""
    return torch.tensor([(math.floor(i * n / p) + math.ceil((i + 1) * n / p) - 1) / 2
                         for i in range(p)], dtype=torch.float64)


def transnext_position_table(size: tuple[int, int], pool: tuple[int, int],
                             pretrain: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(index [H*W, PH*PW], table [T, 2]): the log-spaced offsets from each token to each
    pooled region's centre, scaled by the pretraining grid, as TransNeXt's continuous
    position bias reads them (its `get_relative_position_cpb`)."""
    offs = []
    for n, p, m in zip(size, pool, pretrain):
        d = torch.arange(n, dtype=torch.float64)[:, None] - _pool_centres(n, p)[None, :]
        offs.append(d / max(m - 1, 1) * 8)
    rel = torch.stack(torch.broadcast_tensors(offs[0][:, None, :, None],
                                              offs[1][None, :, None, :]), -1)
    table, index = torch.unique(rel.reshape(-1, 2), return_inverse=True, dim=0)
    table = torch.sign(table) * torch.log2(table.abs() + 1.0) / 3.0
    return index.view(size[0] * size[1], pool[0] * pool[1]), table


class TransNeXtAttention(nn.Module):
    """TransNeXt's aggregated attention (`AggregatedAttention`) on an H x W grid, channels
    last. Parameters as the official module names them: `q`, `kv`, `proj`, `temperature`,
    `query_embedding`, `sr` (1x1 conv), `norm`, `cpb_fc1`, `cpb_fc2`,
    `relative_pos_bias_local`, `learnable_tokens`, `learnable_bias`. The layer builds
    the pattern's run-time inputs from them: scaled cosine queries, L2-normalised keys,
    the pooled tokens' keys and values, both position biases; the learnable tokens' term
    (added to the window's weights after the softmax) is added here. The official model
    computes the position table once per stage; the layer builds it (`pretrain_size`: the
    grid it was trained at). Training the position biases needs their gradients, which
    only the reference backend gives: with backend 'auto' the layer uses it then."""

    def __init__(self, dim: int, input_resolution: tuple[int, int], heads: int = 8, *,
                 window_size: int = 3, qkv_bias: bool = True, sr_ratio: int = 1,
                 fixed_pool_size: int | None = None,
                 pretrain_size: tuple[int, int] | None = None, backend: str = "auto"):
        super().__init__()
        _heads_divide(dim, heads)
        H, W = input_resolution
        _positive(H=H, W=W, window_size=window_size, sr_ratio=sr_ratio)
        self.dim, self.heads, self.head_dim = dim, heads, dim // heads
        self.size, self.window, self.backend = (H, W), window_size, _backend(backend)
        self.op = api.compile("transnext.attn", "aggregated", H=H, W=W, heads=heads,
                              kernel=window_size, pool=sr_ratio,
                              pool_size=fixed_pool_size or 0)
        self.pool_size = ((fixed_pool_size,) * 2 if fixed_pool_size else
                          (H // sr_ratio, W // sr_ratio))
        L, P = window_size ** 2, self.pool_size[0] * self.pool_size[1]
        self.temperature = nn.Parameter(torch.full((heads, 1, 1), math.log(math.expm1(
            1 / 0.24))))
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.query_embedding = nn.Parameter(nn.init.trunc_normal_(
            torch.empty(heads, 1, self.head_dim), std=0.02))
        self.kv = nn.Linear(dim, 2 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.sr = nn.Conv2d(dim, dim, 1)
        self.norm = nn.LayerNorm(dim)
        self.cpb_fc1 = nn.Linear(2, 512)
        self.cpb_fc2 = nn.Linear(512, heads)
        self.relative_pos_bias_local = nn.Parameter(nn.init.trunc_normal_(
            torch.empty(heads, L), std=0.0004))
        self.learnable_tokens = nn.Parameter(nn.init.trunc_normal_(
            torch.empty(heads, self.head_dim, L), std=0.02))
        self.learnable_bias = nn.Parameter(torch.zeros(heads, 1, L))
        inside = F.unfold(torch.ones(1, 1, H, W, dtype=torch.float64), window_size,
                          padding=window_size // 2)[0].sum(0)  # window keys in the grid
        self.register_buffer("seq_length_scale", torch.log(inside + P).view(-1, 1),
                             persistent=False)
        index, table = transnext_position_table((H, W), self.pool_size,
                                                pretrain_size or (H, W))
        self.register_buffer("relative_pos_index", index, persistent=False)
        self.register_buffer("relative_coords_table", table, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, H, W, dim] -> [B, H, W, dim]."""
        _channels_last(x, self.dim, 2)
        if tuple(x.shape[1:3]) != self.size:
            raise InputError(f"this layer was built for a {self.size[0]} x {self.size[1]} "
                             f"grid, not {x.shape[1]} x {x.shape[2]}")
        B, (H, W), C, h, hd = x.shape[0], self.size, self.dim, self.heads, self.head_dim
        xs = x.reshape(B, H * W, C)
        q = F.normalize(self.q(xs).view(B, -1, h, hd).transpose(1, 2), dim=-1)
        scale = self.seq_length_scale.to(x.dtype)
        qs = (q + self.query_embedding) * F.softplus(self.temperature) * scale
        k, v = self.kv(xs).chunk(2, dim=-1)
        k = F.normalize(k.view(B, -1, h, hd).transpose(1, 2), dim=-1)
        v = v.reshape(B, -1, h, hd).transpose(1, 2)
        pooled = F.adaptive_avg_pool2d(F.gelu(self.sr(x.permute(0, 3, 1, 2))), self.pool_size)
        pooled = self.norm(pooled.flatten(2).transpose(1, 2))
        kp, vp = self.kv(pooled).chunk(2, dim=-1)
        kp = F.normalize(kp.view(B, -1, h, hd).transpose(1, 2), dim=-1)
        vp = vp.reshape(B, -1, h, hd).transpose(1, 2)
        table = self.relative_coords_table.to(self.cpb_fc1.weight.dtype)
        mlp = self.cpb_fc2(F.relu(self.cpb_fc1(table)))  # [T, heads]
        pool_bias = mlp.t()[:, self.relative_pos_index]  # [heads, H*W, P]
        backend = self.backend
        if backend == "auto" and torch.is_grad_enabled() and (
                self.relative_pos_bias_local.requires_grad or mlp.requires_grad):
            backend = "reference"
        out = self.op(qs, k, v, backend=backend, local_bias=self.relative_pos_bias_local,
                      pool_keys=kp, pool_values=vp, pool_bias=pool_bias)
        extra = q @ self.learnable_tokens + self.learnable_bias  # [B, h, N, L]
        r = self.window // 2
        vu = F.unfold(v.transpose(2, 3).reshape(B, C, H, W), self.window, padding=r)
        vu = vu.view(B, h, hd, self.window ** 2, H * W)
        out = out + torch.einsum("bhnl,bhdln->bhnd", extra, vu)
        return self.proj(out.transpose(1, 2).reshape(B, H, W, C))


class DHSAAttention(nn.Module):
    """Causal attention under DHSA's dynamic sparse mask (the `dhsa` pattern) with a
    LLaMA-style layer's projections `q_proj`, `k_proj`, `v_proj`, `o_proj` (no bias; grouped
    keys with `kv_heads`), so the attention weights of the models DHSA patches load. DHSA has
    no learned part inside the attention: chunk boundaries come from its separate boundary
    predictor, passed as `boundaries` [B or 1, chunks] (chunk starts; without them, every
    `chunk` tokens). `rotary`: an optional function (q, k) -> (q, k) applying the model's
    position embedding to [B, heads, N, head_dim] queries and keys."""

    def __init__(self, dim: int, heads: int, *, kv_heads: int | None = None,
                 bias: bool = False, backend: str = "auto", **params):
        super().__init__()
        _heads_divide(dim, heads)
        kv_heads = heads if kv_heads is None else kv_heads
        _positive(kv_heads=kv_heads)
        if heads % kv_heads:
            raise ParameterError(f"kv_heads {kv_heads} must divide heads {heads}")
        self.dim, self.heads, self.kv_heads = dim, heads, kv_heads
        self.head_dim, self.backend = dim // heads, _backend(backend)
        self.op = api.compile("dhsa.attn", "dhsa", **params)
        self.q_proj = nn.Linear(dim, dim, bias=bias)
        self.k_proj = nn.Linear(dim, kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(dim, kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(dim, dim, bias=bias)

    def forward(self, x: torch.Tensor, boundaries: torch.Tensor | None = None,
                rotary: Callable | None = None) -> torch.Tensor:
        """x [B, N, dim] -> [B, N, dim]."""
        _channels_last(x, self.dim, 1)
        B, N, _ = x.shape
        q = self.q_proj(x).view(B, N, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, N, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, N, self.kv_heads, self.head_dim).transpose(1, 2)
        if rotary is not None:
            q, k = rotary(q, k)
        inputs = {} if boundaries is None else {"boundaries": boundaries}
        out = self.op(q, k, v, backend=self.backend, **inputs)
        return self.o_proj(out.transpose(1, 2).reshape(B, N, self.dim))
