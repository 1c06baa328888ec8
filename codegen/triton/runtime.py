"""The Triton backend at run time: the source cache, launches, the `attndsl::` custom ops
(autograd, torch.compile) and the core the attention driver calls.

Generated modules are written to a cache directory under a content hash (atomically, so two
processes compiling the same pattern at once both end with the same complete file) and
imported from there: Triton needs real source files to JIT from. The custom ops name their
kernel module by that file's path and take every table as a tensor argument, so nothing
about a launch lives in a registry.
"""

from __future__ import annotations

import hashlib
import importlib.util
import linecache
import math
import os
import re
import sys
import tempfile
import threading
import types
from dataclasses import dataclass

import numpy as np
import torch

from attndsl import caches
from attndsl.caches import cache_dir
from attndsl.codegen.cpu.kernels import CPU_LIMIT, TOKEN_LIMIT, cpu_elements
from attndsl.codegen.emit import dynamic_config, input_layout
from attndsl.codegen.plan.dynamic import pair_matrix, selection
from attndsl.codegen.plan.tables import Plan, plan_for
from attndsl.codegen.triton.generate import module_source
from attndsl.errors import InputError, SizeLimitError, UnsupportedError
from attndsl.semantics.bind import BoundPattern
from attndsl.semantics.dropout import threshold as dropout_threshold
from attndsl.semantics.inputs import RunInputs

LN2 = math.log(2.0)
GRID_Y_LIMIT = 65535  # CUDA's limit on a grid's second dimension: batch x heads
_IMPORT_LOCK = threading.Lock()


def _forget(path, module) -> None:
    sys.modules.pop(getattr(module, "__name__", ""), None)
    linecache.cache.pop(path, None)


caches.KERNEL_MODULES.on_evict(_forget)  # evicted modules leave sys.modules too

_ENTRY = re.compile(r"attndsl_([0-9a-f]{20})\.py")
MAX_KERNEL_SOURCE = 1 << 26  # bytes of one generated module (far beyond any real one)


def _digest(source: str) -> str:
    return hashlib.sha256(source.encode()).hexdigest()[:20]


def _read_entry(path: str) -> str | None:
    """A cache entry's text, or None when it is missing, unreadable or too large."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_KERNEL_SOURCE + 1)
    except OSError:
        return None
    if len(data) > MAX_KERNEL_SOURCE:
        return None
    try:
        return data.decode()
    except UnicodeDecodeError:
        return None


def _write_entry(path: str, source: str) -> None:
    """(Re)write a cache entry atomically: two processes writing the same source at once
    both end with the same complete file."""
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".tmp")  # mode 0600
    with os.fdopen(fd, "w") as f:
        f.write(source)
    os.replace(tmp, path)


def _exec_source(path: str, source: str):
    """Run verified source as the module of file `path`. The text executed is the one
    verified, never the file read again; linecache holds it too, so Triton (which reads its
    kernels' source through inspect) sees that same text."""
    name = "attndsl_generated_" + hashlib.sha256(path.encode()).hexdigest()[:16]
    mod = types.ModuleType(name)
    mod.__file__ = path
    linecache.cache[path] = (len(source), None, source.splitlines(True), path)
    sys.modules[name] = mod
    try:
        exec(compile(source, path, "exec"), mod.__dict__)  # noqa: S102 - our own source
    except BaseException:
        sys.modules.pop(name, None)
        raise
    return mod


def module_at(path: str, source: str | None = None):
    """The kernel module of file `path` (cached). A cache entry is verified before it runs:
    its content must be `source` (or, when only the path is known, hash to the digest in its
    name); a bad entry is rewritten from `source` or refused. Any other file is a module
    the caller named (an exported one), reused when already imported."""
    def load():
        for mod in list(sys.modules.values()):
            if getattr(mod, "__file__", None) == path and hasattr(mod, "attn_fwd"):
                return mod
        m = _ENTRY.fullmatch(os.path.basename(path))
        if m is None:  # an exported module: the file the user wrote and named
            spec = importlib.util.spec_from_file_location(
                "attndsl_generated_" + hashlib.sha256(path.encode()).hexdigest()[:16], path)
            mod = importlib.util.module_from_spec(spec)
            sys.modules[spec.name] = mod
            spec.loader.exec_module(mod)
            return mod
        text = _read_entry(path)
        want = source
        if want is None:
            want = next((k.source for k in caches.KERNELS.values() if k.path == path), None)
        if want is not None and _digest(want) == m.group(1):
            if text != want:
                _write_entry(path, want)  # missing, corrupted or planted: rebuilt
            return _exec_source(path, want)
        if text is None or _digest(text) != m.group(1):
            raise UnsupportedError(f"the kernel cache entry '{path}' does not match its "
                                   "hash (it was changed after attndsl wrote it) and its "
                                   "source is no longer known; compile the pattern again")
        return _exec_source(path, text)
    with _IMPORT_LOCK:
        return caches.KERNEL_MODULES.get_or_create(path, load)


def source_path(source: str) -> str:
    """Where the on-disk cache keeps a module's source (named by its content hash)."""
    return os.path.join(cache_dir(), f"attndsl_{_digest(source)}.py")


def load_source(source: str, name_hint: str = "kernel"):
    """Import generated source through the on-disk cache; identical source, one module."""
    path = source_path(source)
    digest = os.path.basename(path)[8:-3]
    if path not in caches.KERNEL_MODULES:
        if os.environ.get("ATTNDSL_DEBUG", "") not in ("", "0"):
            print(f"# ---- attndsl generated source ({name_hint}, {digest}) ----\n{source}",
                  file=sys.stderr)
    return module_at(path, source)


@dataclass(frozen=True, eq=False)
class Kernel:
    """One pattern's kernel module: its source, the file it was imported from, and what a
    launch needs to know of the pattern."""

    source: str
    path: str
    module: object
    layout: dict  # run-time input -> Arr (its slot in the packed inputs)
    has_bias: bool
    dynamic: dict | None  # chunk_topk's configuration (content-dependent patterns)
    sizes: tuple = ()  # size parameters the module reads at run time (one module, every size)


def kernel_for(bp: BoundPattern, module=None) -> Kernel:
    """The kernels of a bound pattern: generated and imported through the cache, or an
    exported module's own. A module that reads its sizes at run time (KERNEL_SIZES) serves
    every size of a pattern (KERNEL_MODULES keys it by its file); the launch facts are the
    bound pattern's own (two patterns can share a module and differ in what the host side
    computes: chunk_topk's tail, for one), so the Kernel is keyed by both."""
    source = module_source(bp) if module is None else None
    path = source_path(source) if module is None else module.__file__

    def build():
        mod = module if module is not None else load_source(source, bp.name)
        with open(mod.__file__) as f:
            text = f.read()
        sizes = tuple(getattr(mod, "KERNEL_SIZES", ()))
        return Kernel(text, mod.__file__, mod, input_layout(bp, sizes), bool(bp.biases),
                      dynamic_config(bp), sizes)
    return caches.KERNELS.get_or_create((path, bp), build)


# ------------------------------------------------------------------ tables on the device


def _cat(tabs, attr_off, attr_idx):
    """The CSR tables of several heads, one after another: offsets [G * (rows + 1)]."""
    offs, idxs, base = [], [], 0
    for tab in tabs:
        offs.append(getattr(tab, attr_off).astype(np.int64) + base)
        idx = getattr(tab, attr_idx)
        idxs.append(idx)
        base += len(idx)
    off = np.concatenate(offs)
    idx = np.concatenate(idxs) if base else np.zeros(1, dtype=np.int32)
    return (torch.from_numpy(off.astype(np.int32 if off[-1] < 2**31 else np.int64)),
            torch.from_numpy(np.ascontiguousarray(idx)))


def device_tables(plan: Plan, device) -> dict:
    """The plan's tables and permutations as tensors on `device` (cached per plan)."""
    def build():
        t = {}
        for key, tabs in (("", plan.tables), ("t", plan.transposed)):
            t[key + "part"] = _cat(tabs, "part_off", "part_idx")
            t[key + "full"] = _cat(tabs, "full_off", "full_idx")
        if plan.summary is not None:
            sp = plan.summary
            t["spart"] = _cat(sp.tables, "part_off", "part_idx")
            t["sfull"] = _cat(sp.tables, "full_off", "full_idx")
            t["tspart"] = _cat(sp.transposed, "part_off", "part_idx")
            t["tsfull"] = _cat(sp.transposed, "full_off", "full_idx")
            rows = sp.rows if len(sp.rows) else np.zeros(1, dtype=np.int64)
            t["srow"] = torch.from_numpy(rows.astype(np.int64))
        t["qperm"] = torch.from_numpy(plan.qorder.perm.astype(np.int32))
        t["kperm"] = torch.from_numpy(plan.korder.perm.astype(np.int32))
        t["qinv"] = torch.from_numpy(plan.qorder.inverse())
        # the rows of q and k each position reads (the tokens themselves, or a compact subset)
        t["qsrc"] = torch.from_numpy(np.maximum(plan.qorder.source_rows(), 0))
        t["ksrc"] = torch.from_numpy(np.maximum(plan.korder.source_rows(), 0))
        if plan.content_dependent:
            # a plan without unselected tables (exported, or restricted) takes every static
            # pair as attended without the selection: correct, only less sparse
            free = plan.unselected[0] if plan.unselected else plan.tables[0]
            for name, tab in (("dense", plan.tables[0]), ("unselected", free)):
                t[name] = pair_matrix(tab, plan.nqb, plan.nkb)
        return {k: tuple(x.to(device) for x in v) if isinstance(v, tuple) else v.to(device)
                for k, v in t.items()}
    return caches.DEVICE_TABLES.get_or_create((plan, str(device)), build)


def pack_inputs(kern: Kernel, run: RunInputs, device, values=None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """The run-time inputs (and the sizes of a module that reads them at run time) as the
    kernels read them (kernels.py: _in_int / _in_float): INI holds (offset, length) per
    input, then the int data; INF the float data."""
    n = len(kern.layout)
    head = [0] * (2 * n)
    ints, floats = [], []
    ipos, fpos = 2 * n, 0
    for name, arr in kern.layout.items():
        v = values[name] if name in kern.sizes else run.values.get(name)
        if v is None:  # an absent optional input: the kernels never read it
            v = torch.zeros(1)
        flat = torch.as_tensor(v, device=device).reshape(-1)
        if flat.numel() == 0:
            flat = flat.new_zeros(1)
        if arr.kind == "float":
            head[2 * arr.slot:2 * arr.slot + 2] = [fpos, flat.numel()]
            floats.append(flat.to(torch.float32))
            fpos += flat.numel()
        else:
            head[2 * arr.slot:2 * arr.slot + 2] = [ipos, flat.numel()]
            ints.append(flat.to(torch.int64))
            ipos += flat.numel()
    ini = torch.cat([torch.tensor(head, dtype=torch.int64, device=device)] + ints) \
        if n else torch.zeros(1, dtype=torch.int64, device=device)
    inf = torch.cat(floats) if floats else torch.zeros(1, dtype=torch.float32, device=device)
    return ini.contiguous(), inf.contiguous()


# ------------------------------------------------------------------ launches

# tabs: the tensors of one launch, in this order
TABS = ("qperm", "kperm", "part_off", "part_idx", "full_off", "full_idx", "tpart_off",
        "tpart_idx", "tfull_off", "tfull_idx", "ini", "inf", "dyn_keep", "dyn_chunk", "route",
        "srow", "kvalid", "meta")
# ints: tab_sb, tab_sh, NK, NQB, NKB, DYN_NB, DYN_NC, BLOCK_M, BLOCK_N, PERM_Q, PERM_K,
# HAS_BIAS, SOFTCAP, ROUTED, SUMMARY, HAS_PAD, DROPOUT; floats: sm_scale, softcap,
# drop_scale. meta (int64): first query token, dropout seed, threshold, key index offset.


def _meta(q, ints) -> dict:
    D = q.shape[-1]
    return dict(D=D, BLOCK_M=ints[7], BLOCK_N=ints[8],
                BLOCK_D=max(16, 1 << math.ceil(math.log2(D))),
                PREC="ieee" if q.dtype == torch.float32 else "tf32",
                WIDEN=q.dtype == torch.bfloat16 and not q.is_cuda,
                PERM_Q=bool(ints[9]), PERM_K=bool(ints[10]), HAS_BIAS=bool(ints[11]),
                SOFTCAP=bool(ints[12]), ROUTED=bool(ints[13]), SUMMARY=bool(ints[14]),
                HAS_PAD=bool(ints[15]), DROPOUT=bool(ints[16]))


def _common(q, k, v, tabs, ints, floats) -> list:
    H, HKV = q.shape[1], k.shape[1]
    sm_scale, softcap, drop_scale = floats
    return [q, k, v, tabs[0], tabs[1], tabs[2], tabs[3], tabs[4], tabs[5], ints[0], ints[1],
            sm_scale, sm_scale / LN2, softcap, H, HKV, q.shape[2], ints[2], ints[3], ints[4],
            k.shape[2], tabs[10], tabs[11], tabs[12], tabs[13], ints[5], ints[6], tabs[14],
            tabs[15], tabs[16], tabs[17], drop_scale]


def forward(mod, q, k, v, tabs, ints, floats):
    B, H, NQ, D = q.shape
    o = torch.empty_like(q)
    lse = torch.empty((B, H, NQ), device=q.device, dtype=torch.float32)
    mod.attn_fwd[(ints[3], B * H)](*_common(q, k, v, tabs, ints, floats), o, lse,
                                   **_meta(q, ints))
    return o, lse


def backward(mod, q, k, v, o, lse, do, dlse, tabs, ints, floats):
    B, H, NQ, D = q.shape
    do = do.contiguous()
    delta = (o.float() * do.float()).sum(-1)
    # the log-sum-exp is an output too (summary tokens merge through it)
    delta = (delta - torch.nan_to_num(dlse.float(), posinf=0.0, neginf=0.0) / LN2).contiguous()
    common = _common(q, k, v, tabs, ints, floats)
    meta = _meta(q, ints)
    dq = torch.empty_like(q)
    dk = torch.zeros_like(k)  # rows past the keys (padding) stay zero
    dv = torch.zeros_like(v)
    mod.attn_bwd_dkdv[(ints[4], B * k.shape[1])](*common, do, lse, delta, dk, dv, tabs[6],
                                                 tabs[7], tabs[8], tabs[9], **meta)
    mod.attn_bwd_dq[(ints[3], B * H)](*common, do, lse, delta, dq, **meta)
    return dq, dk, dv


@torch.library.custom_op("attndsl::block_sparse_fwd", mutates_args=())
def _fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tabs: list[torch.Tensor],
            ints: list[int], floats: list[float], path: str
            ) -> tuple[torch.Tensor, torch.Tensor]:
    return forward(module_at(path), q, k, v, tabs, ints, floats)


@_fwd_op.register_fake
def _(q, k, v, tabs, ints, floats, path):
    return torch.empty_like(q), q.new_empty(q.shape[:3], dtype=torch.float32)


@torch.library.custom_op("attndsl::block_sparse_bwd", mutates_args=())
def _bwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
            lse: torch.Tensor, do: torch.Tensor, dlse: torch.Tensor, tabs: list[torch.Tensor],
            ints: list[int], floats: list[float], path: str
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return backward(module_at(path), q, k, v, o, lse, do, dlse, tabs, ints, floats)


@_bwd_op.register_fake
def _(q, k, v, o, lse, do, dlse, tabs, ints, floats, path):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup(ctx, inputs, output):
    q, k, v, tabs, ints, floats, path = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse, *tabs)
    ctx.meta = (ints, floats, path)


def _backward(ctx, do, dlse):
    q, k, v, o, lse, *tabs = ctx.saved_tensors
    ints, floats, path = ctx.meta
    if do is None:
        do = torch.zeros_like(o)
    if dlse is None:
        dlse = torch.zeros_like(lse)
    dq, dk, dv = _bwd_op(q, k, v, o, lse, do, dlse, tabs, ints, floats, path)
    return dq, dk, dv, [None] * len(tabs), None, None, None


_fwd_op.register_autograd(_backward, setup_context=_setup)


# ------------------------------------------------------------------ the core


class Triton:
    """The core of backend='triton' (the Core protocol of semantics/attention.py)."""

    name = "triton"
    runs_plans = True  # runs call.plan when given (semantics/attention.Call)

    def __init__(self, module=None, plan: Plan | None = None):
        self.module = module  # an exported module's kernels, or None to generate
        self.fixed = plan  # an exported module's tables (used for the inputs they are for)

    def check(self, bp: BoundPattern, q, k, v) -> None:
        at = bp.checked.span  # like the driver's checks: the pattern being run
        if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            raise InputError(f"the Triton backend takes float16, bfloat16 or float32, not "
                             f"{q.dtype}", at)
        try:
            import triton  # noqa: F401
        except ImportError:
            raise UnsupportedError("backend 'triton' needs the triton package (pip install "
                                   "triton)", at) from None
        if not q.is_cuda and os.environ.get("TRITON_INTERPRET", "0") != "1":
            raise UnsupportedError("the Triton backend needs CUDA tensors (or "
                                   "TRITON_INTERPRET=1 to run the kernels on the CPU); use "
                                   "backend='cpu' or 'reference' here", at)
        d, dv = (q.shape[2], v.shape[2]) if bp.channel else (q.shape[3], v.shape[3])
        if d > 256:  # channel tokens: their positions are the head dim
            raise InputError(f"the Triton backend supports head dims up to 256, not {d}", at)
        if dv != d:
            raise InputError(f"the Triton backend needs v's head dim equal to q's ({d}), not "
                             f"{dv}; use backend='cpu' or 'reference'", at)
        if q.shape[0] * q.shape[1] > GRID_Y_LIMIT:
            raise SizeLimitError(f"the Triton backend launches one program row per (batch, "
                                 f"head): {q.shape[0] * q.shape[1]:,}, over the limit of "
                                 f"{GRID_Y_LIMIT:,}", at)
        if max(bp.nq, bp.nk) > TOKEN_LIMIT:
            raise SizeLimitError(f"the Triton backend plans {max(bp.nq, bp.nk):,} tokens, over "
                                 f"its limit of {TOKEN_LIMIT:,} (2^26) per space",
                                 at)
        held = cpu_elements(q, k, v) * q.element_size()
        if q.is_cuda:
            free, _ = torch.cuda.mem_get_info(q.device)
            if held > free:
                raise SizeLimitError(f"the Triton backend needs about {held / 2**30:.1f} GiB of "
                                     f"device memory for q, k, v and the output, and "
                                     f"{free / 2**30:.1f} GiB are free", at)
        elif held > CPU_LIMIT * 4:
            raise SizeLimitError(f"the Triton interpreter holds q, k, v and the output on the "
                                 f"host ({held:,} bytes), over the limit of "
                                 f"{CPU_LIMIT * 4:,} (8 GiB)", at)

    def _plan(self, call) -> Plan:
        bp = call.bp
        if call.plan is not None:
            return call.plan
        run = call.run if bp.route is None else call.run.without(bp.route[0])
        if (self.fixed is not None and not call.partial
                and self.fixed.run.fingerprint == run.fingerprint):
            return self.fixed
        return plan_for(bp, call.block_q, call.block_k, run, rows=call.rows,
                        target="triton")

    def direct(self, call):
        return self._launch(call, call.k, call.v, summary=False)

    def summary(self, call, ks, vs, att):
        return self._launch(call, ks, vs, summary=True, att=att)

    def _launch(self, call, k, v, summary: bool, att=None):
        """Permute into the kernels' token order, run the custom op, permute back; the
        log-sum-exp comes back in natural units (-inf: no key)."""
        bp = call.bp
        plan = self._plan(call)
        kern = kernel_for(bp, self.module)
        q = call.q
        dev = q.device
        t = device_tables(plan, dev)
        B, H = q.shape[0], q.shape[1]
        ini, inf = pack_inputs(kern, call.run, dev, bp.values)
        perm_q, perm_k = not plan.qorder.identity, not plan.korder.identity
        if perm_q:
            q = q.index_select(2, t["qsrc"])
        route = torch.zeros(1, dtype=torch.int8, device=dev)
        if call.gates is not None:  # [B, H, N] gates -> per (batch x head, query block)
            g = call.gates if not perm_q else call.gates.index_select(2, t["qsrc"])
            g = torch.nn.functional.pad(g, (0, plan.nqb * plan.block_q - g.shape[2]))
            route = (g.reshape(-1, plan.nqb, plan.block_q) != 0).any(-1).to(torch.int8)
        dyn_keep = dyn_chunk = torch.zeros(1, dtype=torch.int32, device=dev)
        nb = nc = 1
        sb, sh = 0, (1 if len(plan.tables) > 1 else 0)
        kvalid = torch.zeros(1, dtype=torch.int8, device=dev)
        pad = call.key_valid is not None
        if summary:
            sp = plan.summary
            nk, nkb = sp.nr, plan.nsb
            if H != k.shape[1]:  # summary rows may depend on the query head
                rep = H // k.shape[1]
                k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
            fill = nkb * plan.block_k - k.shape[2]
            k = torch.nn.functional.pad(k.to(q.dtype), (0, 0, 0, fill))
            v = torch.nn.functional.pad(v.to(q.dtype), (0, 0, 0, fill))
            tables = (t["spart"], t["sfull"], t["tspart"], t["tsfull"])
            srow = t["srow"]
            if pad or fill:  # regions left without a real key (the driver dropped them from att)
                rows_valid = att.expand(B, *att.shape[1:]).any(1).any(1)  # [B, R]
                kvalid = torch.nn.functional.pad(rows_valid.to(torch.int8),
                                                 (0, k.shape[2] - rows_valid.shape[1]))
                tables = _padded_tables(plan, dict(zip(("part", "full", "tpart", "tfull"),
                                                       tables)), kvalid, plan.nsb)
                sb, sh = len(plan.tables), (1 if len(plan.tables) > 1 else 0)
        else:
            nk, nkb = plan.korder.length, plan.nkb
            if perm_k:
                k, v = k.index_select(2, t["ksrc"]), v.index_select(2, t["ksrc"])
            tables = (t["part"], t["full"], t["tpart"], t["tfull"])
            srow = torch.zeros(1, dtype=torch.int64, device=dev)
            if pad:  # padding keys in the kernels' key order; per-batch tables
                kv = call.key_valid
                if perm_k:
                    kv = kv.index_select(1, t["ksrc"])
                kvalid = kv.to(torch.int8).contiguous()
            if kern.dynamic is not None:
                tables, dyn_keep, dyn_chunk, nb, nc = _dynamic_tables(kern, plan, t, call,
                                                                      kvalid if pad else None)
                sb, sh = H, 1
            elif pad:
                tables = _padded_tables(plan, t, kvalid, plan.nkb)
                sb, sh = len(plan.tables), (1 if len(plan.tables) > 1 else 0)
        drop = bool(call.dropout_p)
        meta = torch.tensor([plan.qorder.start, call.seed if drop else 0,
                             dropout_threshold(call.dropout_p) if drop else 0,
                             call.k.shape[2] if summary else 0], dtype=torch.int64, device=dev)
        tabs = [t["qperm"], t["kperm"], *tables[0], *tables[1], *tables[2], *tables[3], ini,
                inf, dyn_keep, dyn_chunk, route.reshape(-1).contiguous(), srow, kvalid, meta]
        ints = [sb, sh, nk, plan.nqb, nkb, nb, nc, plan.block_q, plan.block_k, int(perm_q),
                int(perm_k and not summary), int(kern.has_bias and not summary),
                int(call.softcap is not None), int(call.gates is not None), int(summary),
                int(pad), int(drop)]
        floats = [float(call.scale), float(call.softcap or 1.0),
                  1.0 / (1.0 - call.dropout_p) if drop else 1.0]
        o, lse = _fwd_op(q.contiguous(), k.contiguous(), v.contiguous(), tabs, ints, floats,
                         kern.path)
        if perm_q:
            o = o.index_select(2, t["qinv"])
            lse = lse.index_select(2, t["qinv"])
        lse = torch.where(torch.isinf(lse), torch.full_like(lse, -math.inf), lse * LN2)
        return o, lse


def _entries(tab, h: int, rows: int):
    """(row, column) of every entry of head table h of concatenated CSR tables."""
    off, idx = tab
    o = off[h * (rows + 1):(h + 1) * (rows + 1)].long()
    r = torch.repeat_interleave(torch.arange(rows, device=o.device), torch.diff(o))
    return r, idx[o[0]:o[0] + r.numel()].long()


def _csr(g: torch.Tensor, r: torch.Tensor, c: torch.Tensor, tables: int, rows: int):
    """CSR tables from entries (table g, row r, column c): offsets [tables * (rows + 1)],
    table after table, and the columns, increasing within each row."""
    order = torch.argsort((g * rows + r) * (int(c.max()) + 1 if c.numel() else 1) + c)
    counts = torch.bincount(g * rows + r, minlength=tables * rows) if g.numel() else (
        torch.zeros(tables * rows, dtype=torch.int64, device=g.device))
    ends = torch.cumsum(counts, 0)
    off = torch.empty(tables, rows + 1, dtype=torch.int64, device=g.device)
    off[:, :rows] = (ends - counts).view(tables, rows)  # where each row starts
    off[:, rows] = ends.view(tables, rows)[:, -1]  # where each table ends
    idx = c[order].to(torch.int32)
    if idx.numel() == 0:
        idx = torch.zeros(1, dtype=torch.int32, device=g.device)
    return off.reshape(-1).to(torch.int32), idx.contiguous()


def _padded_tables(plan: Plan, t: dict, kvalid: torch.Tensor, nkb: int):
    """Tables per (batch, head table) for padded keys, g = batch * head tables + table: a
    key block with no real key is dropped; a FULL block holding padding becomes PARTIAL
    (the kernels' mask reads KVALID there)."""
    B, nt = kvalid.shape[0], len(plan.tables)
    blocks = torch.nn.functional.pad(kvalid != 0, (0, nkb * plan.block_k
                                                   - kvalid.shape[1])).view(B, nkb, plan.block_k)
    state = blocks.any(-1).long() + blocks.all(-1).long()  # 0: no real key, 2: no padding
    out = []
    for names, rows, by_row in ((("part", "full"), plan.nqb, False),
                                (("tpart", "tfull"), nkb, True)):
        part, full = [[], [], []], [[], [], []]
        for h in range(nt):
            for name, is_full in ((names[0], False), (names[1], True)):
                r, c = _entries(t[name], h, rows)
                s = state[:, r if by_row else c]  # [B, nnz]
                for b in range(B):
                    keep_full = (s[b] == 2) if is_full else torch.zeros_like(
                        s[b], dtype=torch.bool)
                    keep_part = (s[b] > 0) & ~keep_full
                    for dst, keep in ((part, keep_part), (full, keep_full)):
                        dst[0].append(torch.full_like(r[keep], b * nt + h))
                        dst[1].append(r[keep])
                        dst[2].append(c[keep])
        for dst in (part, full):
            out.append(_csr(*(torch.cat(x) if x else torch.zeros(
                0, dtype=torch.int64, device=kvalid.device) for x in dst), B * nt, rows))
    return tuple(out)


def _dynamic_tables(kern: Kernel, plan: Plan, t: dict, call, kvalid=None):
    """DHSA on the device: the selection (semantics/dynamic.py), then per (batch, head)
    block tables: the static superset's pairs whose query rows meet a selection row that
    kept a key of the key block. The kernels read keep[b, h, row, key] and each query's row
    (the tail's queries: a last row that keeps nothing)."""
    conf = dict(kern.dynamic)
    q, k = call.run.content
    dev = q.device
    B, H = q.shape[0], q.shape[1]
    starts = call.run.values.get(conf["starts"]) if conf.get("starts") else None
    keep, row_of, nb, n, sel = selection(plan, conf, q, k, starts)  # sel [B, H, nqb, nkb]
    with torch.no_grad():
        # the static pairs the selection keeps a key of, and those attended whatever it
        # keeps (`q >= N - 4 or chunk_topk(...)`: the last rows attend without it)
        sel = (sel & t["dense"]) | t["unselected"]
        if kvalid is not None:  # key blocks without a real key are dropped
            pad = torch.nn.functional.pad(kvalid, (0, plan.nkb * plan.block_k - n)) != 0
            sel &= pad.view(B, 1, 1, plan.nkb, plan.block_k).any(-1)
        part = _csr_rows(sel)
        tpart = _csr_rows(sel.transpose(-1, -2))
        g = B * H
        empty_q = torch.zeros(g * (plan.nqb + 1), dtype=torch.int32, device=dev)
        empty_k = torch.zeros(g * (plan.nkb + 1), dtype=torch.int32, device=dev)
        none = torch.zeros(1, dtype=torch.int32, device=dev)
    return ((part, (empty_q, none), tpart, (empty_k, none)),
            keep.to(torch.int8).contiguous(), row_of.to(torch.int32).contiguous(), nb, n)


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
