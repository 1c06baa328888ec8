"""NATTEN's API on attndsl's neighbourhood patterns (patterns/neighborhood.attn, whose masks
are NATTEN's): `na1d`, `na2d`, `na3d` with NATTEN's heads-last layout [B, *spatial, heads, D]
and its argument conventions and constraints, and `NeighborhoodAttention1D/2D/3D` with natten
0.21's constructor arguments and weight names, so that a NATTEN model or state dict runs here:
forward and backward on the CPU backend (NATTEN has no CPU backward), the Triton kernels on
CUDA. natten itself is not needed. One family op per configuration (kernel, stride,
dilation, causal) is kept in `caches.NATTEN_OPS`; the sizes come from each call's tensors."""

from __future__ import annotations

import numbers

import torch
from torch import nn

from attndsl import caches
from attndsl.api import compile as compile_op
from attndsl.errors import InputError, ParameterError

__all__ = ["NattenArgumentError", "NattenInputError", "NeighborhoodAttention1D",
           "NeighborhoodAttention2D", "NeighborhoodAttention3D", "na1d", "na2d", "na3d"]


class NattenArgumentError(ParameterError, ValueError):
    """An argument NATTEN refuses (kernel_size, stride, dilation, is_causal, scale, module
    sizes); a ValueError too, as NATTEN raises, so code written for NATTEN still catches it."""


class NattenInputError(InputError, ValueError):
    """Tensors NATTEN refuses: ranks, layouts, heads, devices or dtypes that do not fit, or
    a kernel that does not fit the input."""


def _is_int(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _per_axis(name: str, value, na_dim: int, least: int, default=None) -> tuple:
    """An int, or one per token axis (a 1-tuple for one axis), each >= least."""
    if value is None and default is not None:
        value = default
    if _is_int(value) and value >= least:
        return (int(value),) * na_dim
    if (isinstance(value, tuple | list) and len(value) == na_dim
            and all(_is_int(x) and x >= least for x in value)):
        return tuple(int(x) for x in value)
    raise NattenArgumentError(f"invalid {name} {value!r}: expected an integer or a tuple of "
                              f"{na_dim} integer{'s' if na_dim > 1 else ''} (one per token "
                              f"axis), all >= {least}")


def arguments(na_dim: int, kernel_size, stride=1, dilation=1, is_causal=False) -> tuple:
    """NATTEN's argument rules: (kernel_size, stride, dilation, is_causal) as per-axis
    tuples; stride, dilation and is_causal may be None (1, 1, False)."""
    kernel = _per_axis("kernel_size", kernel_size, na_dim, 2)
    stride = _per_axis("stride", stride, na_dim, 1, default=1)
    dilation = _per_axis("dilation", dilation, na_dim, 1, default=1)
    if is_causal is None:
        is_causal = False
    if isinstance(is_causal, bool):
        causal = (is_causal,) * na_dim
    elif (isinstance(is_causal, tuple | list) and len(is_causal) == na_dim
          and all(isinstance(c, bool) for c in is_causal)):
        causal = tuple(is_causal)
    else:
        raise NattenArgumentError(f"invalid is_causal {is_causal!r}: expected a bool or a "
                                  f"tuple of {na_dim} bool{'s' if na_dim > 1 else ''}")
    if any(s > k for s, k in zip(stride, kernel)):
        raise NattenArgumentError(f"stride must not exceed kernel_size on any axis, got "
                                  f"kernel_size={kernel}, stride={stride}")
    return kernel, stride, dilation, causal


def _check_tensors(na_dim: int, q, k, v, kernel, dilation) -> None:
    """NATTEN's checks of q, k, v (heads-last) and of the kernel against the input, in its
    order, before anything is computed."""
    for name, t in (("query", q), ("key", k), ("value", v)):
        if not isinstance(t, torch.Tensor):
            raise NattenInputError(f"{name} must be a torch.Tensor, not {type(t).__name__}")
    if not q.device == k.device == v.device:
        raise NattenInputError(f"query, key and value must be on one device, got {q.device}, "
                               f"{k.device}, {v.device}")
    if not q.dtype == k.dtype == v.dtype:
        raise NattenInputError(f"query, key and value must have one dtype, got {q.dtype}, "
                               f"{k.dtype}, {v.dtype}")
    if not q.dim() == k.dim() == v.dim():
        raise NattenInputError(f"query, key and value must have the same rank, got "
                               f"{q.dim()}, {k.dim()}, {v.dim()}")
    if q.dim() != na_dim + 3:
        raise NattenInputError(
            f"na{na_dim}d takes {na_dim + 3}-D tensors [batch, {_axes(na_dim)}, heads, "
            f"head_dim], got {q.dim()}-D {list(q.shape)}")
    if q.shape[-1] != k.shape[-1]:
        raise NattenInputError(f"query and key must have the same head_dim, got "
                               f"{q.shape[-1]} and {k.shape[-1]}")
    if not q.shape[0] == k.shape[0] == v.shape[0]:
        raise NattenInputError(f"query, key and value must have the same batch size, got "
                               f"{q.shape[0]}, {k.shape[0]}, {v.shape[0]}")
    layout = tuple(q.shape[1:1 + na_dim])
    if layout != tuple(k.shape[1:1 + na_dim]) or layout != tuple(v.shape[1:1 + na_dim]):
        raise NattenInputError(
            f"query, key and value must have the same token layout, got {layout}, "
            f"{tuple(k.shape[1:1 + na_dim])}, {tuple(v.shape[1:1 + na_dim])}")
    if k.shape[-2] != v.shape[-2]:
        raise NattenInputError(f"key and value must have the same number of heads, got "
                               f"{k.shape[-2]} and {v.shape[-2]}")
    if q.shape[-2] % k.shape[-2] or q.shape[-2] < k.shape[-2]:
        raise NattenInputError(f"the key/value heads ({k.shape[-2]}) must divide the query "
                               f"heads ({q.shape[-2]})")
    if any(kk * d > x for kk, d, x in zip(kernel, dilation, layout)):
        raise NattenInputError(
            f"kernel_size * dilation must not exceed the input size on any axis, got input "
            f"size {layout}, kernel_size={kernel}, dilation={dilation}")


def _check_scale(name: str, scale) -> None:
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, numbers.Real)
                              or not 0 < scale < float("inf")):
        raise NattenArgumentError(f"{name} must be a positive number or None, not {scale!r}")


def _axes(na_dim: int) -> str:
    return {1: "seqlen", 2: "X, Y", 3: "X, Y, Z"}[na_dim]


def _op(na_dim: int, kernel, stride, dilation, causal):
    """The family op of one configuration (sizes from each call's tensors), cached."""
    def build():
        return compile_op("neighborhood.attn", f"na{na_dim}d", kernel=kernel,
                          dilation=dilation, stride=stride, causal=causal)
    return caches.NATTEN_OPS.get_or_create((na_dim, kernel, stride, dilation, causal), build)


def _attention(na_dim: int, query, key, value, kernel_size, stride, dilation, is_causal,
               scale, backend):
    kernel, stride, dilation, causal = arguments(na_dim, kernel_size, stride, dilation,
                                                 is_causal)
    _check_scale("scale", scale)
    _check_tensors(na_dim, query, key, value, kernel, dilation)
    op = _op(na_dim, kernel, stride, dilation, causal)
    # heads-last [B, *spatial, heads, D] <-> attndsl's [B, heads, *spatial, D]: views
    out = op(query.movedim(-2, 1), key.movedim(-2, 1), value.movedim(-2, 1), backend=backend,
             scale=None if scale is None else float(scale))
    return out.movedim(1, -2).contiguous()


def na1d(query, key, value, kernel_size, stride=1, dilation=1, is_causal=False, scale=None, *,
         backend: str = "auto"):
    """1-D neighbourhood attention, as `natten.na1d`: tensors [batch, seqlen, heads, D] (key
    and value may have fewer heads, dividing the query's); kernel_size, stride, dilation and
    is_causal are an int (bool) or a 1-tuple; scale defaults to D ** -0.5. `backend` is
    attndsl's ("auto": the CPU backend for CPU tensors, Triton for CUDA ones)."""
    return _attention(1, query, key, value, kernel_size, stride, dilation, is_causal, scale,
                      backend)


def na2d(query, key, value, kernel_size, stride=1, dilation=1, is_causal=False, scale=None, *,
         backend: str = "auto"):
    """2-D neighbourhood attention, as `natten.na2d`: tensors [batch, X, Y, heads, D];
    per-axis arguments an int (bool) or a 2-tuple."""
    return _attention(2, query, key, value, kernel_size, stride, dilation, is_causal, scale,
                      backend)


def na3d(query, key, value, kernel_size, stride=1, dilation=1, is_causal=False, scale=None, *,
         backend: str = "auto"):
    """3-D neighbourhood attention, as `natten.na3d`: tensors [batch, X, Y, Z, heads, D];
    per-axis arguments an int (bool) or a 3-tuple."""
    return _attention(3, query, key, value, kernel_size, stride, dilation, is_causal, scale,
                      backend)


class _NeighborhoodAttention(nn.Module):
    """natten 0.21's NeighborhoodAttention{1,2,3}D: a qkv projection, neighbourhood
    attention and an output projection, with the same arguments and parameter names (`qkv`,
    `proj`), so `load_state_dict` takes a NATTEN module's weights as they are."""

    na_dim = 0

    def __init__(self, embed_dim: int, num_heads: int, kernel_size, stride=1, dilation=1,
                 is_causal=False, qkv_bias: bool = True, qk_scale: float | None = None,
                 proj_drop: float = 0.0):
        super().__init__()
        self.kernel_size, self.stride, self.dilation, self.is_causal = arguments(
            self.na_dim, kernel_size, stride, dilation, is_causal)
        for name, x in (("embed_dim", embed_dim), ("num_heads", num_heads)):
            if not _is_int(x) or x < 1:
                raise NattenArgumentError(f"{name} must be a positive integer, not {x!r}")
        if embed_dim % num_heads:
            raise NattenArgumentError(f"num_heads must divide embed_dim, got "
                                      f"embed_dim={embed_dim}, num_heads={num_heads}")
        self.embed_dim = int(embed_dim)
        self.num_heads = int(num_heads)
        self.head_dim = self.embed_dim // self.num_heads
        _check_scale("qk_scale", qk_scale)
        self.scale = self.head_dim ** -0.5 if qk_scale is None else float(qk_scale)
        self.backend = "auto"  # attndsl's backend for the attention (see na1d)
        self.qkv = nn.Linear(self.embed_dim, 3 * self.embed_dim, bias=qkv_bias)
        self.proj = nn.Linear(self.embed_dim, self.embed_dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.dim() != self.na_dim + 2:
            got = f"{x.dim()}-D {list(x.shape)}" if isinstance(x, torch.Tensor) else \
                type(x).__name__
            raise NattenInputError(
                f"NeighborhoodAttention{self.na_dim}D takes [batch, {_axes(self.na_dim)}, "
                f"embed_dim] ({self.na_dim + 2}-D), got {got}")
        if x.shape[-1] != self.embed_dim:
            raise NattenInputError(f"expected embed_dim {self.embed_dim} on the last axis, got "
                                   f"{x.shape[-1]} ({list(x.shape)})")
        batch, *spatial, _ = x.shape
        qkv = self.qkv(x).reshape(batch, *spatial, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.unbind(-3)
        out = _attention(self.na_dim, q, k, v, self.kernel_size, self.stride, self.dilation,
                         self.is_causal, self.scale, self.backend)
        return self.proj_drop(self.proj(out.reshape(batch, *spatial, self.embed_dim)))

    def extra_repr(self) -> str:
        return (f"head_dim={self.head_dim}, num_heads={self.num_heads}, "
                f"kernel_size={self.kernel_size}, stride={self.stride}, "
                f"dilation={self.dilation}, is_causal={self.is_causal}")


class NeighborhoodAttention1D(_NeighborhoodAttention):
    """natten.NeighborhoodAttention1D on attndsl: x [batch, seqlen, embed_dim]."""

    na_dim = 1


class NeighborhoodAttention2D(_NeighborhoodAttention):
    """natten.NeighborhoodAttention2D on attndsl: x [batch, X, Y, embed_dim]."""

    na_dim = 2


class NeighborhoodAttention3D(_NeighborhoodAttention):
    """natten.NeighborhoodAttention3D on attndsl: x [batch, X, Y, Z, embed_dim]."""

    na_dim = 3
