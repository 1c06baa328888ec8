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
    dynamic: dict | None = None  # chunk_topk's configuration (content-dependent patterns)
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
            if p.summary is not None:
                sp = p.summary
                t["spart"] = cat(sp.tables, "part_off", "part_idx", p.nqb)
                t["sfull"] = cat(sp.tables, "full_off", "full_idx", p.nqb)
                t["tspart"] = cat(sp.transposed, "part_off", "part_idx", p.nsb)
                t["tsfull"] = cat(sp.transposed, "full_off", "full_idx", p.nsb)
                rows = sp.rows if len(sp.rows) else np.zeros(1, dtype=np.int64)
                t["srow"] = torch.from_numpy(rows.astype(np.int64)).to(device)
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
            t["qinv"] = torch.from_numpy(self.plan.qorder.inverse()).to(device)
        return t["qinv"]


def compile_kernel(bp: BoundPattern, plan: Plan) -> CompiledKernel:
    """Generate, cache and import the kernels of a bound pattern for one plan."""
    from .triton_gen import generate
    source = generate(bp, plan)
    return kernel_for(bp, plan, load_source(source, bp.name), source)


def kernel_for(bp: BoundPattern, plan: Plan, module, source: str) -> CompiledKernel:
    """A kernel object around an imported module (freshly generated, or exported)."""
    from .triton_gen import dynamic_config, input_args
    _names, arrays, scalars = input_args(bp)
    kinds = tuple(next(o.inputs[n][0] for o in bp.owners() if n in o.inputs) for n in scalars)
    return CompiledKernel(module, plan, source, tuple(arrays), tuple(scalars), kinds,
                          dynamic_config(bp))


def _common(kern: CompiledKernel, q, k, v, arrays, scalars, scale, t, dyn):
    B, H, NQ, D = q.shape
    HKV, NK = k.shape[1], k.shape[2]
    p = kern.plan
    sb, sh = 0, (1 if len(p.tables) > 1 else 0)
    if dyn:  # run-time tables: one per (batch, head)
        sb, sh = H, 1
    nk_main = p.korder.length  # valid direct keys (in the kernel's order)
    args = [q, k, v, t["qperm"], t["kperm"], *t["part"], *t["full"], sb, sh,
            scale, scale * 1.4426950408889634, H, HKV, NQ, nk_main, p.nqb, p.nkb, NK]
    args += list(arrays) + list(scalars)
    if dyn:
        keep, chunk_of = dyn[8], dyn[9]
        args += [keep, chunk_of, keep.shape[2], keep.shape[3]]
    if p.summary is not None:
        args += [t["srow"], p.summary.nr, p.nsb, *t["spart"], *t["sfull"]]
    return args


def _tables(kern, device, dyn) -> dict:
    t = kern.tables(device)
    if dyn:
        t = dict(t, part=(dyn[0], dyn[1]), full=(dyn[2], dyn[3]), tpart=(dyn[4], dyn[5]),
                 tfull=(dyn[6], dyn[7]))
    return t


def _meta(q, kern):
    D = q.shape[-1]
    return dict(D=D, BLOCK_M=kern.plan.block_q, BLOCK_N=kern.plan.block_k,
                BLOCK_D=max(16, 1 << math.ceil(math.log2(D))),
                PREC="ieee" if q.dtype == torch.float32 else "tf32",
                WIDEN=q.dtype == torch.bfloat16 and not q.is_cuda)


def forward(kern: CompiledKernel, q, k, v, arrays, scalars, scale, dyn=()):
    B, H, NQ, D = q.shape
    o = torch.empty_like(q)
    lse = torch.empty((B, H, NQ), device=q.device, dtype=torch.float32)
    t = _tables(kern, q.device, dyn)
    grid = (kern.plan.nqb, B * H)
    kern.module.attn_fwd[grid](*_common(kern, q, k, v, arrays, scalars, scale, t, dyn), o, lse,
                               **_meta(q, kern))
    return o, lse


def backward(kern: CompiledKernel, q, k, v, o, lse, do, arrays, scalars, scale, dyn=(),
             dlse=None):
    B, H, NQ, D = q.shape
    HKV = k.shape[1]
    do = do.contiguous()
    delta = (o.float() * do.float()).sum(-1)
    if dlse is not None:  # the log-sum-exp is an output too (merging with summary tokens)
        delta = delta - torch.nan_to_num(dlse.float(), posinf=0.0, neginf=0.0) / math.log(2)
    delta = delta.contiguous()
    t = _tables(kern, q.device, dyn)
    common = _common(kern, q, k, v, arrays, scalars, scale, t, dyn)
    dq = torch.empty_like(q)
    dk = torch.zeros_like(k)  # rows past the keys (padding) stay zero
    dv = torch.zeros_like(v)
    kern.module.attn_bwd_dkdv[(kern.plan.nkb, B * HKV)](
        *common, do, lse, delta, dk, dv, *t["tpart"], *t["tfull"], **_meta(q, kern))
    if kern.plan.summary is not None:
        kern.module.attn_bwd_dkdv_sum[(kern.plan.nsb, B * HKV)](
            *common, do, lse, delta, dk, dv, *t["tspart"], *t["tsfull"], **_meta(q, kern))
    kern.module.attn_bwd_dq[(kern.plan.nqb, B * H)](
        *common, do, lse, delta, dq, **_meta(q, kern))
    return dq, dk, dv


# ------------------------------------------------------------------ custom ops


@torch.library.custom_op("attndsl::block_sparse_fwd", mutates_args=())
def _fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, handle: int,
            arrays: list[torch.Tensor], ints: torch.Tensor, floats: torch.Tensor, scale: float,
            dyn: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    kern = _KERNELS[handle]
    return forward(kern, q, k, v, arrays, _scalars(kern, ints, floats), scale, dyn)


@_fwd_op.register_fake
def _(q, k, v, handle, arrays, ints, floats, scale, dyn):
    return torch.empty_like(q), q.new_empty(q.shape[:3], dtype=torch.float32)


@torch.library.custom_op("attndsl::block_sparse_bwd", mutates_args=())
def _bwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
            lse: torch.Tensor, do: torch.Tensor, handle: int, arrays: list[torch.Tensor],
            ints: torch.Tensor, floats: torch.Tensor, scale: float, dyn: list[torch.Tensor],
            dlse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    kern = _KERNELS[handle]
    return backward(kern, q, k, v, o, lse, do, arrays, _scalars(kern, ints, floats), scale,
                    dyn, dlse)


@_bwd_op.register_fake
def _(q, k, v, o, lse, do, handle, arrays, ints, floats, scale, dyn, dlse):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup(ctx, inputs, output):
    q, k, v, handle, arrays, ints, floats, scale, dyn = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse, ints, floats, *arrays, *dyn)
    ctx.meta = (handle, scale, len(arrays))


def _backward(ctx, do, dlse):
    q, k, v, o, lse, ints, floats, *rest = ctx.saved_tensors
    handle, scale, n = ctx.meta
    arrays, dyn = rest[:n], rest[n:]
    if do is None:
        do = torch.zeros_like(o)
    if dlse is None:
        dlse = torch.zeros_like(lse)
    dq, dk, dv = _bwd_op(q, k, v, o, lse, do, handle, arrays, ints, floats, scale, dyn, dlse)
    return dq, dk, dv, None, [None] * len(arrays), None, None, None, [None] * len(dyn)


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


def attention(kern: CompiledKernel, bp: BoundPattern, q, k, v, inputs: dict, scale: float,
              gates: torch.Tensor | None = None, with_lse: bool = False):
    """Permute into the kernel's token order, run the custom op, permute back.

    With `with_lse`, also the rows' log-sum-exp in base 2 [B, H, Nq] (+inf: no keys)."""
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
        a = inputs.get(name)
        if a is None:  # an absent optional input: the kernel never reads it
            a = torch.zeros(1, dtype=torch.int64, device=q.device)
        arrays.append(a.to(torch.int64 if not a.is_floating_point() else torch.float32)
                      .contiguous())
    for name, kind in zip(kern.scalar_names, kern.scalar_kinds):
        val = inputs[name]
        val = val.item() if isinstance(val, torch.Tensor) else val
        (floats if kind == "float" else ints).append(float(val) if kind == "float"
                                                       else int(val))
    q_rowmajor = q
    if gates is not None:  # [B, H, N] routing gates -> per (batch x head, query block) flags
        g = gates if p.qorder.identity else gates.index_select(2, t["qperm"].clamp(min=0).long())
        pad = p.nqb * p.block_q - g.shape[2]
        g = torch.nn.functional.pad(g, (0, pad))
        arrays.append((g.reshape(-1, p.nqb, p.block_q) != 0).any(-1).to(torch.int8)
                      .reshape(-1).contiguous())
    if not p.qorder.identity:
        q = q.index_select(2, t["qperm"].clamp(min=0).long())
    kin, vin = k, v
    if not p.korder.identity:
        idx = t["kperm"].clamp(min=0).long()
        k, v = k.index_select(2, idx), v.index_select(2, idx)
    if p.summary is not None:
        k, v = _append_summaries(p, bp, q_rowmajor, kin, vin, k, v, scale)
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    dyn = dynamic_tables(kern, q, k, inputs) if kern.dynamic is not None else []
    o, lse = _fwd_op(q, k, v, kern.handle, arrays, torch.tensor(ints, dtype=torch.int64),
                     torch.tensor(floats, dtype=torch.float64), float(scale), dyn)
    if not p.qorder.identity:
        o = o.index_select(2, kern.inverse_q(q.device))
        lse = lse.index_select(2, kern.inverse_q(q.device))
    return (o, lse) if with_lse else o


def dynamic_tables(kern: CompiledKernel, q, k, inputs) -> list[torch.Tensor]:
    """DHSA on the device: chunk scores and top-k (the reference's own selection code, in
    torch ops), then per (batch, head) block tables: the static superset's pairs whose
    query rows meet a DHSA block that kept a chunk overlapping the key block."""
    from attndsl.reference import _dhsa_keep
    conf = kern.dynamic
    p = kern.plan
    dev = q.device
    starts = inputs.get(conf["starts"]) if conf["starts"] else None
    rep = q.shape[1] // k.shape[1]
    with torch.no_grad():
        keep, chunk_of = _dhsa_keep(q.detach(), k.detach().repeat_interleave(rep, dim=1),
                                    conf["block"], conf["chunk"], conf["topk"], starts, None)
        n = q.shape[2]
        B, H, nb, nc = keep.shape
        rows = torch.arange(p.nqb * p.block_q, device=dev).clamp(max=n - 1)
        qmap = torch.zeros(p.nqb, nb, device=dev)
        qmap[rows // p.block_q, rows // conf["block"]] = 1.0
        cols = torch.arange(p.nkb * p.block_k, device=dev).clamp(max=n - 1)
        cmap = torch.zeros(nc, p.nkb, device=dev)
        cmap[chunk_of[cols], cols // p.block_k] = 1.0
        sel = (qmap @ keep.float() @ cmap) > 0  # [B, H, nqb, nkb]
        sel &= _static_pairs(kern, dev)
        part = _csr_rows(sel)
        tpart = _csr_rows(sel.transpose(-1, -2))
        g = B * H
        empty_q = torch.zeros(g * (p.nqb + 1), dtype=torch.int32, device=dev)
        empty_k = torch.zeros(g * (p.nkb + 1), dtype=torch.int32, device=dev)
        none = torch.zeros(1, dtype=torch.int32, device=dev)
    return [*part, empty_q, none, *tpart, empty_k, none, keep.to(torch.int8).contiguous(),
            chunk_of.to(torch.int32).contiguous()]


def _static_pairs(kern, device) -> torch.Tensor:
    t = kern.tables(device)
    if "dense" not in t:
        p = kern.plan
        m = torch.zeros(p.nqb, p.nkb, dtype=torch.bool)
        for tab in p.tables[:1]:
            for off, idx in ((tab.part_off, tab.part_idx), (tab.full_off, tab.full_idx)):
                r = np.repeat(np.arange(p.nqb), np.diff(off))
                m[torch.from_numpy(r), torch.from_numpy(idx.astype(np.int64))] = True
        t["dense"] = m.to(device)
    return t["dense"]


def _csr_rows(sel: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[G..., rows, cols] bool -> offsets [G * (rows + 1)] laid out per table, and indices."""
    rows, cols = sel.shape[-2], sel.shape[-1]
    flat = sel.reshape(-1, rows, cols)
    g = flat.shape[0]
    counts = flat.sum(-1).reshape(-1)
    off = torch.zeros(g * rows + 1, dtype=torch.int64, device=sel.device)
    off[1:] = torch.cumsum(counts, 0)
    at = (torch.arange(g, device=sel.device).view(-1, 1) * rows
          + torch.arange(rows + 1, device=sel.device).view(1, -1))
    idx = flat.nonzero()[:, 2].to(torch.int32)
    if idx.numel() == 0:
        idx = torch.zeros(1, dtype=torch.int32, device=sel.device)
    return off[at.reshape(-1)].to(torch.int32), idx.contiguous()


def _append_summaries(p: Plan, bp: BoundPattern, q, k_rm, v_rm, k, v, scale):
    """Summary tokens as key/value rows after the direct keys (padded to whole blocks):
    pooled from the row-major tensors with the reference's own pooling (max, mean, or
    Combiner's expectation, which needs the queries), differentiably."""
    from attndsl.reference import _summarise
    H = q.shape[1]
    rep = H // k.shape[1]
    if rep > 1:  # summary values may depend on the query head: expand the kv heads
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        k_rm, v_rm = k_rm.repeat_interleave(rep, dim=1), v_rm.repeat_interleave(rep, dim=1)
    cdt = torch.float32
    ks, vs = [], []
    for bs, member in zip(bp.summaries, p.summary.members):
        if member.shape[0] == 0:
            continue
        a, b = _summarise(bs.summary, member.to(q.device), q.to(cdt), k_rm.to(cdt),
                          v_rm.to(cdt), scale)
        ks.append(a)
        vs.append(b)
    pad_main = p.nkb * p.block_k - k.shape[2]
    nr = p.summary.nr
    pad_sum = p.nsb * p.block_k - nr
    parts_k = [torch.nn.functional.pad(k, (0, 0, 0, pad_main))]
    parts_v = [torch.nn.functional.pad(v, (0, 0, 0, pad_main))]
    if ks:
        parts_k.append(torch.nn.functional.pad(torch.cat(ks, 2).to(k.dtype),
                                               (0, 0, 0, pad_sum)))
        parts_v.append(torch.nn.functional.pad(torch.cat(vs, 2).to(v.dtype),
                                               (0, 0, 0, pad_sum)))
    else:
        parts_k.append(k.new_zeros(*k.shape[:2], p.nsb * p.block_k, k.shape[3]))
        parts_v.append(v.new_zeros(*v.shape[:2], p.nsb * p.block_k, v.shape[3]))
    return torch.cat(parts_k, 2), torch.cat(parts_v, 2)
