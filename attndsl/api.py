"""The Python API: `attndsl.compile(...)` returns an `Op` bound to parameter values."""

from __future__ import annotations

import math
import os

import torch

from . import ir
from .bind import BoundPattern, bind
from .checker import CheckedPattern, check_module, check_pattern
from .errors import AttnNameError, ParameterError, UnsupportedError, did_you_mean
from .loader import Loader, resolve_path
from .reference import attention, check_inputs, dense_mask, summary_masks

BACKENDS = ("reference", "triton", "cpu", "auto")


def load(source: str | os.PathLike) -> ir.Module:
    """Parse a file path (or .attn source text) and its imports into a module."""
    loader = Loader()
    if not isinstance(source, str | os.PathLike):
        from .errors import ImportFailure
        raise ImportFailure("expected .attn source text or a file path, not "
                            f"{type(source).__name__}")
    # a path names an .attn file (or an existing one); anything else is source text
    text_like = isinstance(source, str) and (
        "\n" in source or "{" in source or "(" in source) and not source.endswith(".attn")
    if not text_like:
        path = resolve_path(source)
        if path is None:
            from .errors import ImportFailure
            raise ImportFailure(f"no such .attn file: '{source}'")
        return loader.load_file(path)
    return loader.load_text(source, "<string>")


def check(source: str | os.PathLike) -> dict[str, CheckedPattern]:
    """Parse and type-check every pattern and function of a file; raise all errors at once."""
    return check_module(load(source))


def compile(source: str | os.PathLike, pattern: str | None = None, **params) -> Op:  # noqa: A001
    """Compile one pattern of a file (or source text) with the given parameter values."""
    module = load(source)
    pats = module.patterns()
    if pattern is None:
        if not pats:
            raise ParameterError(f"'{module.path}' defines no pattern")
        if len(pats) != 1:
            names = ", ".join(p.name for p in pats)
            raise ParameterError(f"'{module.path}' defines {len(pats)} patterns ({names}); "
                                 "choose one with pattern=...")
        pdef = pats[0]
    else:
        pdef = module.scope.get(pattern)
        if not isinstance(pdef, ir.PatternDef):
            cands = [k for k, v in module.scope.items() if isinstance(v, ir.PatternDef)]
            raise AttnNameError(f"'{module.path}' has no pattern '{pattern}'"
                                + did_you_mean(pattern, cands))
    checked = check_pattern(module, pdef)
    return Op(bind(checked, module, params))


class Op:
    """A pattern bound to parameters: its masks, and attention through a backend."""

    def __init__(self, bound: BoundPattern):
        self.bound = bound
        self.block_q: int | None = None
        self.block_k: int | None = None
        self._plans: dict = {}
        self._kernels: dict = {}

    # -- description
    @property
    def name(self) -> str:
        return self.bound.name

    @property
    def params(self) -> dict:
        return dict(self.bound.values)

    @property
    def doc(self) -> str:
        return self.bound.checked.doc

    @property
    def query_shape(self) -> tuple[int, ...]:
        return self.bound.qshape

    @property
    def key_shape(self) -> tuple[int, ...]:
        return self.bound.kshape

    @property
    def heads(self) -> int | None:
        return self.bound.heads

    @property
    def inputs(self) -> dict:
        """Run-time inputs: name -> (element kind, dims with None for '*', optional)."""
        return {n: d[:3] for n, d in self.bound.inputs.items()}

    def __repr__(self) -> str:
        vals = ", ".join(f"{k}={v}" for k, v in self.bound.values.items())
        return f"<attndsl.Op {self.name}({vals}) {self.bound.qshape}x{self.bound.kshape}>"

    # -- masks
    def mask(self, q: torch.Tensor | None = None, k: torch.Tensor | None = None,
             **inputs) -> torch.Tensor:
        """The direct-attention mask: [Nq, Nk]; [heads, Nq, Nk] per head; [B, H, Nq, Nk] for
        patterns that depend on q and k (which must then be given). For averaged patterns,
        the union of the parts' masks."""
        bp = self.bound
        content = None
        if bp.content_dependent:
            if q is None or k is None:
                from .errors import InputError
                raise InputError(f"pattern '{self.name}' depends on q and k: call "
                                 "mask(q=..., k=...)", bp.checked.span)
            from .reference import check_tensors
            check_tensors(bp, q, k, k)
            rep = q.shape[1] // k.shape[1]
            content = (q, k.repeat_interleave(rep, dim=1))
        dev = q.device if q is not None else None
        if bp.average:
            parts = [Op(sub).mask(q, k, **{n: x for n, x in inputs.items() if n in sub.inputs})
                     for sub in bp.average]
            out = parts[0]
            for p in parts[1:]:
                out = out | p
            return out
        checked = check_inputs(bp, inputs, dev, for_mask=True)
        return dense_mask(bp, checked, content, dev)

    def summaries(self, **inputs) -> list[dict]:
        """Each summary's tokens: name, `member` [R, Nk] and `attend` [.., Nq, R] (empty
        regions dropped), and pooling choices."""
        bp = self.bound
        checked = check_inputs(bp, inputs, for_mask=True)
        out = []
        for bs in bp.summaries:
            member, att = summary_masks(bp, bs, checked, torch.device("cpu"),
                                        bp.heads if bp.head_dependent else None)
            out.append({"name": bs.summary.name, "member": member, "attend": att,
                        "keys": bs.summary.keys, "values": bs.summary.values,
                        "queries": bs.summary.queries})
        for sub in bp.average:
            out.extend(Op(sub).summaries(**{n: x for n, x in inputs.items()
                                            if n in sub.inputs}))
        return out

    def reach(self, q=None, k=None, **inputs) -> torch.Tensor:
        """[.., Nq, Nk]: keys a query sees directly or through a summary token it attends."""
        m = self.mask(q, k, **inputs)
        for s in self.summaries(**inputs):
            via = (s["attend"].to(torch.float32) @ s["member"].to(torch.float32)) > 0
            m = m | via
        return m

    # -- analysis
    def analyze(self, layers: int = 4, query=None, *, head_dim: int = 64, q=None, k=None,
                progress: bool | None = None, keep_sets: bool = False, **inputs):
        """Receptive field, coverage and cost stacked `layers` deep (docs/analysis.md).

        With keep_sets, `result.reach_sets[l]` is the bool [Nk] set reached after l+1 layers."""
        from .analysis import analyze
        return analyze(self, layers, query, head_dim=head_dim, inputs=inputs, q=q, k=k,
                       progress=progress, keep_sets=keep_sets)

    def path(self, source, target, *, q=None, k=None, **inputs):
        """The shortest hop path from query `source` to token `target`."""
        from .analysis import shortest_path
        return shortest_path(self, source, target, inputs, q=q, k=k)

    # -- compiled kernels
    def options(self, *, block_q: int | None = None, block_k: int | None = None) -> Op:
        """Set the kernels' block sizes (powers of two >= 16; default 64 x 64)."""
        from .errors import ParameterError
        for name, b in (("block_q", block_q), ("block_k", block_k)):
            if b is not None and (not isinstance(b, int) or b < 16 or b & (b - 1)):
                raise ParameterError(f"{name} must be a power of two >= 16, not {b!r}")
        self.block_q, self.block_k = block_q, block_k
        self._plans.clear()
        self._kernels.clear()
        return self

    def plan_key(self, inputs: dict) -> tuple:
        """(block_q, block_k, inputs' fingerprint): what a plan depends on. The router of
        `route` gates outputs, not the mask, so it is left out."""
        from .codegen.plan import default_blocks
        bp = self.bound
        checked = check_inputs(bp, inputs, for_mask=True)
        if bp.route is not None:
            checked.pop(bp.route[0], None)
        dq, dk = default_blocks(bp)
        return (self.block_q or dq, self.block_k or dk, _input_key(checked)), checked

    def plan(self, **inputs):
        """The token orders and exact block tables both compiled backends use (cached)."""
        from .codegen.plan import build_plan
        _lowerable(self.bound)
        key, checked = self.plan_key(inputs)
        plan = self._plans.get(key)
        if plan is None:
            cpu = {n: (v.cpu() if isinstance(v, torch.Tensor) else v)
                   for n, v in checked.items()}
            plan = build_plan(self.bound, key[0], key[1], inputs=cpu)
            if len(self._plans) > 16:
                self._plans.clear()
            self._plans[key] = plan
        return plan

    def kernel(self, **inputs):
        """The compiled kernel for these run-time inputs (generated, cached, imported)."""
        from .codegen.runtime import compile_kernel
        key, _ = self.plan_key(inputs)
        kern = self._kernels.get(key)
        if kern is None:
            kern = compile_kernel(self.bound, self.plan(**inputs))
            if len(self._kernels) > 16:
                self._kernels.clear()
            self._kernels[key] = kern
        return kern

    def source(self, **inputs) -> str:
        """The generated Triton source (what ATTNDSL_DEBUG=1 prints)."""
        return self.kernel(**inputs).source

    def stats(self, **inputs) -> dict:
        """Block counts, tile shapes, table bytes, build time and computed / needed elements
        of the compiled kernels (docs/kernels.md). Averaged patterns: the parts' sums, and
        each part's own figures under "parts"."""
        bp = self.bound
        if bp.average:
            parts = [Op(sub).options(block_q=self.block_q, block_k=self.block_k).stats(
                **{n: x for n, x in inputs.items() if n in sub.inputs}) for sub in bp.average]
            out = dict(parts[0])
            for key in ("full_blocks", "partial_blocks", "empty_blocks", "computed_elements",
                        "needed_elements", "block_table_bytes", "build_seconds"):
                out[key] = sum(p[key] for p in parts)
            out["waste"] = (out["computed_elements"] / out["needed_elements"]
                            if out["needed_elements"] else float("inf"))
            out["order_q"] = out["order_k"] = "per part"
            out["content_dependent"] = any(p["content_dependent"] for p in parts)
            out["parts"] = parts
            return out
        return self.plan(**inputs).stats()

    # -- attention
    def __call__(self, q, k, v, *, backend: str = "auto", scale: float | None = None,
                 **inputs) -> torch.Tensor:
        if backend not in BACKENDS:
            raise UnsupportedError(f"unknown backend '{backend}'" + did_you_mean(
                backend, BACKENDS))
        if scale is not None and (not isinstance(scale, int | float) or not scale > 0
                                  or not math.isfinite(scale)):
            raise ParameterError(f"scale must be a positive number, not {scale!r}")
        if backend == "auto":
            backend = "triton" if (isinstance(q, torch.Tensor) and q.is_cuda
                                   and _has_triton()) else "reference"
            # ---- backend="cpu" (codegen/cpu.py): auto picks it for CPU tensors it can run
            if backend == "reference" and isinstance(q, torch.Tensor) and q.device.type == "cpu":
                from .codegen.cpu import supported
                if supported(self.bound):
                    backend = "cpu"
        if backend == "cpu":
            from .codegen.cpu import attention as cpu_attention
            return cpu_attention(self, q, k, v, inputs, scale)
        # ---- end backend="cpu"
        if backend == "triton":
            return self._triton(q, k, v, scale, inputs)
        return attention(self.bound, q, k, v, inputs, scale)

    def _triton(self, q, k, v, scale, inputs):
        from .errors import InputError
        from .reference import check_tensors, route_gates
        bp = self.bound
        check_tensors(bp, q, k, v)
        if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            raise InputError(f"the Triton backend takes float16, bfloat16 or float32, not "
                             f"{q.dtype}")
        if not _has_triton():
            raise UnsupportedError("backend 'triton' needs the triton package (pip install "
                                   "triton)")
        checked = check_inputs(bp, inputs, q.device, q.shape[0])
        if bp.average:
            outs = [Op(sub).options(block_q=self.block_q, block_k=self.block_k)._triton(
                q, k, v, scale, {n: x for n, x in inputs.items() if n in sub.inputs})
                for sub in bp.average]
            return sum(outs) / len(outs)
        kern = self.kernel(**checked)
        if bp.channel:
            q, k, v = (t.transpose(-1, -2) for t in (q, k, v))
        if scale is None:
            scale = bp.scale if bp.scale is not None else 1.0 / math.sqrt(q.shape[-1])
        from .codegen.runtime import attention as run
        gates = None
        if bp.route is not None:
            gates = route_gates(bp, checked[bp.route[0]], q.shape[1])
        out = run(kern, bp, q, k, v, checked, scale, gates)
        if gates is not None:
            out = out * gates.to(out.dtype).unsqueeze(-1)
        if bp.channel:
            out = out.transpose(-1, -2)
        return out


def _has_triton() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _lowerable(bp: BoundPattern) -> None:
    """Constructs the compiled kernels do not lower yet fail clearly, never silently."""
    if bp.average:
        raise UnsupportedError(f"pattern '{bp.name}' averages several patterns: compile each "
                               "part (its kernels run one after another in op(...))",
                               bp.checked.span)


def _input_key(inputs: dict) -> tuple:
    import hashlib
    out = []
    for name in sorted(inputs):
        v = inputs[name]
        if v is None:
            out.append((name, None))
        elif isinstance(v, torch.Tensor):
            data = v.detach().cpu().contiguous().numpy().tobytes()
            out.append((name, tuple(v.shape), str(v.dtype), hashlib.sha1(data).hexdigest()))
        else:
            out.append((name, v))
    return tuple(out)
