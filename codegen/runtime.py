"""Compiled kernels at run time: the source cache, kernel launches, autograd and the
`attndsl::` custom ops that keep torch.compile graphs whole.

Generated modules are written to a cache directory under a content hash (atomically, so two
processes compiling the same pattern at once both end with the same complete file) and
imported from there: Triton needs real source files to JIT from.
"""

from __future__ import annotations

import hashlib
import importlib.util
import math
import os
import sys
import tempfile
import threading
from dataclasses import dataclass

import numpy as np
import torch

from attndsl.bind import BoundPattern
from attndsl.errors import InputError, UnsupportedError

from .plan import Plan

_LOCK = threading.Lock()
_MODULES: dict[str, object] = {}
_KERNELS: dict[int, CompiledKernel] = {}


def cache_dir() -> str:
    d = os.environ.get("ATTNDSL_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "attndsl")
    os.makedirs(d, exist_ok=True)
    return d


def load_source(source: str, name_hint: str = "kernel"):
    """Import generated source through the on-disk cache; identical source, one module."""
    digest = hashlib.sha256(source.encode()).hexdigest()[:20]
    with _LOCK:
        mod = _MODULES.get(digest)
        if mod is not None:
            return mod
        if os.environ.get("ATTNDSL_DEBUG", "") not in ("", "0"):
            print(f"# ---- attndsl generated source ({name_hint}, {digest}) ----\n{source}",
                  file=sys.stderr)
        path = os.path.join(cache_dir(), f"attndsl_{digest}.py")
        if not os.path.exists(path):
            fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".tmp")
            with os.fdopen(fd, "w") as f:
                f.write(source)
            os.replace(tmp, path)
        modname = f"attndsl_generated_{digest}"
        spec = importlib.util.spec_from_file_location(modname, path)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[modname] = mod
        spec.loader.exec_module(mod)
        _MODULES[digest] = mod
        return mod


@dataclass(eq=False)
class CompiledKernel:
    """One pattern's generated module plus its block tables, per device."""

    module: object
    plan: Plan
    source: str
    array_names: tuple[str, ...]  # run-time input arrays, in kernel-argument order
    scalar_names: tuple[str, ...]
    scalar_kinds: tuple[str, ...]
    handle: int = 0

    def __post_init__(self):
        self._dev: dict = {}
        with _LOCK:
            self.handle = len(_KERNELS) + 1
            _KERNELS[self.handle] = self

    def tables(self, device) -> dict:
        key = str(device)
        t = self._dev.get(key)
        if t is None:
            p = self.plan

            def cat(tabs, attr_off, attr_idx, rows):
                offs, idxs, base = [], [], 0
                for tab in tabs:
                    off = getattr(tab, attr_off).astype(np.int64) + base
                    offs.append(off)
                    idx = getattr(tab, attr_idx)
                    idxs.append(idx)
                    base += len(idx)
                off = np.concatenate(offs)
                idx = np.concatenate(idxs) if base else np.zeros(1, dtype=np.int32)
                dt = torch.int32 if off[-1] < 2**31 else torch.int64
                return (torch.from_numpy(off).to(device=device, dtype=dt),
                        torch.from_numpy(np.ascontiguousarray(idx)).to(device))

            t = {}
            t["part"] = cat(p.tables, "part_off", "part_idx", p.nqb)
            t["full"] = cat(p.tables, "full_off", "full_idx", p.nqb)
            t["tpart"] = cat(p.transposed, "part_off", "part_idx", p.nkb)
            t["tfull"] = cat(p.transposed, "full_off", "full_idx", p.nkb)
            qp = np.where(p.qorder.perm >= 0, p.qorder.perm, -1)
            kp = np.where(p.korder.perm >= 0, p.korder.perm, -1)
            t["qperm"] = torch.from_numpy(qp.astype(np.int32)).to(device)
            t["kperm"] = torch.from_numpy(kp.astype(np.int32)).to(device)
            self._dev[key] = t
        return t


    def inverse_q(self, device) -> torch.Tensor:
        t = self.tables(device)
        if "qinv" not in t:
            perm = self.plan.qorder.perm
            inv = np.zeros(math.prod(self.plan.qorder.shape), dtype=np.int64)
            pos = np.nonzero(perm >= 0)[0]
            inv[perm[pos]] = pos
            t["qinv"] = torch.from_numpy(inv).to(device)
        return t["qinv"]


def compile_kernel(bp: BoundPattern, plan: Plan) -> CompiledKernel:
    """Generate, cache and import the kernels of a bound pattern for one plan."""
    from .triton_gen import generate, input_args
    source = generate(bp, plan)
    module = load_source(source, bp.name)
    _names, arrays, scalars = input_args(bp)
    kinds = []
    for name in scalars:
        for owner in bp.owners():
            if name in owner.inputs:
                kinds.append(owner.inputs[name][0])
                break
    return CompiledKernel(module, plan, source, tuple(arrays), tuple(scalars), tuple(kinds))


def _common(kern: CompiledKernel, q, k, v, arrays, scalars, scale, t):
    B, H, NQ, D = q.shape
    HKV, NK = k.shape[1], k.shape[2]
    p = kern.plan
    sh = 1 if len(p.tables) > 1 else 0
    args = [q, k, v, t["qperm"], t["kperm"], *t["part"], *t["full"], 0, sh,
            scale, scale * 1.4426950408889634, H, HKV, NQ, NK, p.nqb, p.nkb]
    args += list(arrays) + list(scalars)
    return args


def _meta(q, kern):
    D = q.shape[-1]
    return dict(D=D, BLOCK_M=kern.plan.block_q, BLOCK_N=kern.plan.block_k,
                BLOCK_D=max(16, 1 << math.ceil(math.log2(D))),
                PREC="ieee" if q.dtype == torch.float32 else "tf32",
                WIDEN=q.dtype == torch.bfloat16 and not q.is_cuda)


def forward(kern: CompiledKernel, q, k, v, arrays, scalars, scale):
    B, H, NQ, D = q.shape
    o = torch.empty_like(q)
    lse = torch.empty((B, H, NQ), device=q.device, dtype=torch.float32)
    t = kern.tables(q.device)
    grid = (kern.plan.nqb, B * H)
    kern.module.attn_fwd[grid](*_common(kern, q, k, v, arrays, scalars, scale, t), o, lse,
                               **_meta(q, kern))
    return o, lse


def backward(kern: CompiledKernel, q, k, v, o, lse, do, arrays, scalars, scale):
    B, H, NQ, D = q.shape
    HKV = k.shape[1]
    do = do.contiguous()
    delta = (o.float() * do.float()).sum(-1).contiguous()
    t = kern.tables(q.device)
    common = _common(kern, q, k, v, arrays, scalars, scale, t)
    dq = torch.empty_like(q)
    dk = torch.empty_like(k)
    dv = torch.empty_like(v)
    kern.module.attn_bwd_dkdv[(kern.plan.nkb, B * HKV)](
        *common, do, lse, delta, dk, dv, *t["tpart"], *t["tfull"], **_meta(q, kern))
    kern.module.attn_bwd_dq[(kern.plan.nqb, B * H)](
        *common, do, lse, delta, dq, **_meta(q, kern))
    return dq, dk, dv


# ------------------------------------------------------------------ custom ops


@torch.library.custom_op("attndsl::block_sparse_fwd", mutates_args=())
def _fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, handle: int,
            arrays: list[torch.Tensor], ints: torch.Tensor, floats: torch.Tensor, scale: float
            ) -> tuple[torch.Tensor, torch.Tensor]:
    kern = _KERNELS[handle]
    return forward(kern, q, k, v, arrays, _scalars(kern, ints, floats), scale)


@_fwd_op.register_fake
def _(q, k, v, handle, arrays, ints, floats, scale):
    return torch.empty_like(q), q.new_empty(q.shape[:3], dtype=torch.float32)


@torch.library.custom_op("attndsl::block_sparse_bwd", mutates_args=())
def _bwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
            lse: torch.Tensor, do: torch.Tensor, handle: int, arrays: list[torch.Tensor],
            ints: torch.Tensor, floats: torch.Tensor, scale: float
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    kern = _KERNELS[handle]
    return backward(kern, q, k, v, o, lse, do, arrays, _scalars(kern, ints, floats), scale)


@_bwd_op.register_fake
def _(q, k, v, o, lse, do, handle, arrays, ints, floats, scale):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup(ctx, inputs, output):
    q, k, v, handle, arrays, ints, floats, scale = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse, ints, floats, *arrays)
    ctx.meta = (handle, scale)


def _backward(ctx, do, dlse):
    q, k, v, o, lse, ints, floats, *arrays = ctx.saved_tensors
    handle, scale = ctx.meta
    dq, dk, dv = _bwd_op(q, k, v, o, lse, do, handle, arrays, ints, floats, scale)
    return dq, dk, dv, None, [None] * len(arrays), None, None, None


_fwd_op.register_autograd(_backward, setup_context=_setup)


def _scalars(kern, ints, floats):
    """Scalar inputs in kernel-argument order from the int64 and float64 tensors."""
    ints, floats = ints.tolist(), floats.tolist()
    out, i, f = [], 0, 0
    for kind in kern.scalar_kinds:
        if kind == "float":
            out.append(floats[f])
            f += 1
        else:
            out.append(ints[i])
            i += 1
    return out


def attention(kern: CompiledKernel, bp: BoundPattern, q, k, v, inputs: dict, scale: float):
    """Permute into the kernel's token order, run the custom op, permute back."""
    if not q.is_cuda and os.environ.get("TRITON_INTERPRET", "0") != "1":
        raise UnsupportedError("the Triton backend needs CUDA tensors (or TRITON_INTERPRET=1 "
                               "to run the kernels on the CPU); use backend='cpu' or "
                               "'reference' here")
    if q.shape[-1] > 256:
        raise InputError(f"the Triton backend supports head dims up to 256, not {q.shape[-1]}")
    p = kern.plan
    t = kern.tables(q.device)
    arrays, ints, floats = [], [], []
    for name in kern.array_names:
        a = inputs[name]
        arrays.append(a.to(torch.int64 if not a.is_floating_point() else torch.float32)
                      .contiguous())
    for name, kind in zip(kern.scalar_names, kern.scalar_kinds):
        val = inputs[name]
        val = val.item() if isinstance(val, torch.Tensor) else val
        (floats if kind == "float" else ints).append(float(val) if kind == "float"
                                                       else int(val))
    if not p.qorder.identity:
        q = q.index_select(2, t["qperm"].clamp(min=0).long())
    if not p.korder.identity:
        idx = t["kperm"].clamp(min=0).long()
        k, v = k.index_select(2, idx), v.index_select(2, idx)
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    o, _ = _fwd_op(q, k, v, kern.handle, arrays, torch.tensor(ints, dtype=torch.int64),
                   torch.tensor(floats, dtype=torch.float64), float(scale))
    if not p.qorder.identity:
        o = o.index_select(2, kern.inverse_q(q.device))
    return o
