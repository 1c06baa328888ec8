"""attndsl.nn.Attention: a multi-head attention layer whose pattern is a compiled .attn op.

Weights follow timm's `Attention` (a `qkv` Linear splitting as (3, heads, head_dim), and
`proj`), so timm checkpoints load; with `kv_heads` != `heads` (GQA) a `q` Linear and a `kv`
Linear splitting as (2, kv_heads, head_dim). The op is a family (docs/model.md): sizes come
from each input, so one layer serves every length and image size. What the layer pickles is
the pattern's source text and parameters, never plans; it recompiles on load.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from attndsl import api
from attndsl.errors import InputError, ParameterError, UnsupportedError, did_you_mean
from attndsl.lang.loader import Loader
from attndsl.nn.cache import KVCache


class Attention(nn.Module):
    """Multi-head attention over the pattern `pattern` of `source` (a path, a standard
    library file name or .attn text) with parameters `params`.

    Input `[B, *space, dim]`, channels last (`[B, N, dim]` for sequences, `[B, H, W, dim]`
    for grids); output of the same shape. Parameters the layer knows are filled in when the
    pattern has them and they are not given: `heads`. A routed pattern (`route`, MoH) gets a
    `router` Linear(dim, routed heads, no bias) computing its router logits from the input.
    """

    def __init__(self, dim: int, heads: int, source: str | os.PathLike, pattern: str | None = None,
                 *, kv_heads: int | None = None, qkv_bias: bool = True, attn_drop: float = 0.0,
                 proj_drop: float = 0.0, backend: str = "auto",
                 import_roots: Iterable[str | os.PathLike] = (), **params):
        super().__init__()
        for name, val in (("dim", dim), ("heads", heads)):
            if isinstance(val, bool) or not isinstance(val, int) or val < 1:
                raise ParameterError(f"{name} must be a positive int, not {val!r}")
        if dim % heads:
            raise ParameterError(f"dim {dim} must be a multiple of heads {heads}")
        kv_heads = heads if kv_heads is None else kv_heads
        if isinstance(kv_heads, bool) or not isinstance(kv_heads, int) or kv_heads < 1 or (
                heads % kv_heads):
            raise ParameterError(f"kv_heads must be a positive int dividing heads {heads}, "
                                 f"not {kv_heads!r}")
        for name, p in (("attn_drop", attn_drop), ("proj_drop", proj_drop)):
            if not isinstance(p, int | float) or not 0 <= p < 1:
                raise ParameterError(f"{name} must be in [0, 1), not {p!r}")
        if backend not in api.BACKENDS:
            raise UnsupportedError(f"unknown backend '{backend}'"
                                   + did_you_mean(backend, api.BACKENDS))
        self.dim, self.heads, self.kv_heads = dim, heads, kv_heads
        self.head_dim = dim // heads
        self.attn_drop, self.backend = float(attn_drop), backend
        roots = (import_roots,) if isinstance(import_roots, str | os.PathLike) else import_roots
        module = api.load(source, import_roots=roots)
        self.spec = _Spec(module.text or "", None if module.path.startswith("<") else
                          module.path, pattern, tuple(str(r) for r in roots), params)
        self.op = self.spec.compile(module, heads)
        if kv_heads == heads:
            self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        else:
            self.q = nn.Linear(dim, dim, bias=qkv_bias)
            self.kv = nn.Linear(dim, 2 * kv_heads * self.head_dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        route = self.op.family.checked.route
        self.router = None
        if route is not None:
            shared = self.op.family.static(route.shared)
            if shared is None:
                raise ParameterError(f"pattern '{self.op.name}' routes heads; its shared head "
                                     "count must not depend on the sizes")
            self.router = nn.Linear(dim, heads - shared, bias=False)

    # -- pickling: the source text and parameters, never plans
    def __getstate__(self):
        state = dict(self.__dict__)
        state["op"] = None
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        self.op = self.spec.compile(None, self.heads)

    def extra_repr(self) -> str:
        vals = ", ".join(f"{k}={v}" for k, v in self.op.params.items())
        return (f"dim={self.dim}, heads={self.heads}, kv_heads={self.kv_heads}, "
                f"pattern={self.op.name}({vals}), backend={self.backend}")

    # -- forward
    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None, /, *,
                key_padding_mask: torch.Tensor | None = None, cache: KVCache | None = None,
                **inputs) -> torch.Tensor:
        """x [B, *space, dim] -> [B, *space, dim]. `context` [B, *key space, dim]: keys and
        values for cross-attention patterns. `key_padding_mask` [B, keys] (True: a real
        token; with a cache, for this step's tokens or for all held). `cache`: a KVCache for
        generation (sequence patterns). Other keywords are the pattern's run-time inputs."""
        qspace, xs = self._tokens(x, "x")
        kspace, cs = (qspace, xs) if context is None else self._tokens(context, "context")
        if context is not None and xs.shape[0] != cs.shape[0]:
            raise InputError(f"x and context must share a batch, not {xs.shape[0]} and "
                             f"{cs.shape[0]}")
        q, k, v = self._project(xs, cs, context is not None)
        if self.router is not None:
            name = self.op.family.checked.route.input
            if inputs.get(name) is None:
                inputs[name] = self.router(xs)
        p = self.attn_drop if self.training else 0.0
        grid = not self.op.family.checked.channel and len(qspace) > 1
        if cache is not None:
            out = self._decode(q, k, v, cache, key_padding_mask, p, qspace, inputs)
        else:
            if grid:
                q = q.reshape(*q.shape[:2], *qspace, self.head_dim)
            if grid or (len(kspace) > 1 and not self.op.family.checked.channel):
                k = k.reshape(*k.shape[:2], *kspace, self.head_dim)
                v = v.reshape(*v.shape[:2], *kspace, self.head_dim)
            out = self.op(q, k, v, backend=self.backend, key_padding_mask=key_padding_mask,
                          dropout_p=p, **inputs)
        out = out.reshape(xs.shape[0], self.heads, xs.shape[1], self.head_dim)
        out = out.transpose(1, 2).reshape(xs.shape[0], xs.shape[1], self.dim)
        out = self.proj_drop(self.proj(out))
        return out.reshape(x.shape)

    def _tokens(self, t, role: str):
        if not isinstance(t, torch.Tensor) or t.dim() < 3 or t.shape[-1] != self.dim:
            shape = list(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise InputError(f"{role} must be [batch, *space, {self.dim}] (channels last), "
                             f"not {shape}")
        return tuple(t.shape[1:-1]), t.reshape(t.shape[0], -1, self.dim)

    def _project(self, xs, cs, cross: bool):
        """q [B, heads, Nq, hd], k and v [B, kv_heads, Nk, hd]."""
        b, hd = xs.shape[0], self.head_dim
        if self.kv_heads == self.heads:
            if not cross:
                qkv = self.qkv(xs).reshape(b, -1, 3, self.heads, hd).permute(2, 0, 3, 1, 4)
                return qkv.unbind(0)
            w, bias = self.qkv.weight, self.qkv.bias
            q = F.linear(xs, w[:self.dim], None if bias is None else bias[:self.dim])
            kv = F.linear(cs, w[self.dim:], None if bias is None else bias[self.dim:])
        else:
            q, kv = self.q(xs), self.kv(cs)
        q = q.reshape(b, -1, self.heads, hd).transpose(1, 2)
        k, v = kv.reshape(b, -1, 2, self.kv_heads, hd).permute(2, 0, 3, 1, 4).unbind(0)
        return q, k, v

    def _decode(self, q, k, v, cache, kpm, p, qspace, inputs):
        if len(qspace) != 1 or self.op.family.checked.channel:
            raise UnsupportedError("a KV cache serves sequence patterns ([B, N, dim] inputs); "
                                   f"'{self.op.name}' has a {len(qspace)}-axis space"
                                   if len(qspace) != 1 else
                                   "a KV cache cannot serve channel tokens")
        if not isinstance(cache, KVCache):
            raise InputError(f"cache must be an attndsl.nn.KVCache, not "
                             f"{type(cache).__name__}")
        slot = cache.slot(self)
        start, m = slot.length, q.shape[2]
        step_valid = None
        if kpm is not None:
            if not isinstance(kpm, torch.Tensor) or kpm.dim() != 2 or kpm.dtype != torch.bool:
                raise InputError("key_padding_mask must be a bool tensor [batch, keys]")
            if kpm.shape[1] == start + m:
                step_valid = kpm[:, start:]
            elif kpm.shape[1] == m:
                step_valid = kpm
            else:
                raise InputError(f"key_padding_mask has {kpm.shape[1]} keys; with a cache "
                                 f"holding {start} tokens it covers this step's {m} or all "
                                 f"{start + m}")
        bound = self.op.bind(**{n: start + m for n in self.op.sizes})
        keep_q = bound.content_dependent or any(bs.summary.values == "expectation"
                                                for sub in (bound, *bound.average)
                                                for bs in sub.summaries)
        ks, vs, qs, valid = slot.append(k, v, q if keep_q else None, step_valid)
        return self.op(q, ks, vs, backend=self.backend, q_start=start, key_padding_mask=valid,
                       dropout_p=p, queries=qs, **inputs)


class _Spec:
    """What a layer stores of its pattern: the source text, where it was read, the pattern's
    name, the import roots and the parameters given."""

    def __init__(self, text: str, path: str | None, pattern: str | None, roots: tuple,
                 params: dict):
        self.text, self.path, self.pattern, self.roots = text, path, pattern, roots
        self.params = dict(params)

    def compile(self, module, heads: int) -> api.Op:
        if module is None:  # unpickled: the stored text, imports read beside its old path
            base = Path(self.path).parent if self.path and Path(self.path).parent.is_dir() \
                else None
            module = Loader(self.roots).load_text(self.text, self.path or "<string>", base)
        params = dict(self.params)
        if "heads" not in params and any(
                p.name == "heads" for p in api.find_pattern(module, self.pattern).params):
            params["heads"] = heads
        op = api.compile_module(module, self.pattern, params)
        declared = op.heads
        if declared is not None and declared != heads:
            raise ParameterError(f"pattern '{op.name}' has {declared} heads; the layer has "
                                 f"{heads}")
        return op

