"""The Python API: `attndsl.compile(...)` returns an `Op`: a bound pattern, the block sizes of
its compiled kernels and the backend chosen per call. Everything an Op computes is cached in
the declared caches of attndsl/caches.py, keyed by values, so an Op holds no state of its
own beyond its options."""

from __future__ import annotations

import itertools
import math
import os
from collections.abc import Iterable

import torch

from attndsl import caches
from attndsl.errors import (
    AttnNameError,
    ImportFailure,
    InputError,
    ParameterError,
    UnsupportedError,
    did_you_mean,
)
from attndsl.lang import ir
from attndsl.lang.checker import check_module, check_pattern
from attndsl.lang.loader import Loader, resolve_path
from attndsl.reference import Reference
from attndsl.semantics import attention as driver
from attndsl.semantics.bind import BoundPattern, bind
from attndsl.semantics.inputs import check_tensors, content_of, validate
from attndsl.semantics.masks import dense_mask, summary_masks

BACKENDS = ("reference", "triton", "cpu", "auto")


def load(source: str | os.PathLike, /, *, import_roots: Iterable[str | os.PathLike] = ()
         ) -> ir.Module:
    """Parse a file (a path object, or a str ending in '.attn') or .attn source text, and its
    imports, into a module. Imports may read the named file's folder (the working directory
    for text), the standard library and the folders in `import_roots` (docs/language.md,
    "Imports")."""
    if not isinstance(source, str | os.PathLike):
        raise ImportFailure("expected .attn source text or a file path, not "
                            f"{type(source).__name__}")
    if isinstance(import_roots, str | os.PathLike):
        import_roots = (import_roots,)
    loader = Loader(import_roots)
    # a str names a file only when it ends in '.attn': any other str is source text, so
    # text from a user is never taken for the name of some other file on the disk
    if not isinstance(source, str) or ("\n" not in source and source.endswith(".attn")):
        path = resolve_path(source)
        if path is None:
            shown = str(source) if len(str(source)) <= 200 else str(source)[:197] + "..."
            raise ImportFailure(f"no such .attn file: '{shown}'")
        return loader.load_file(path)
    return loader.load_text(source, "<string>")


def check(source: str | os.PathLike, /, *, import_roots: Iterable[str | os.PathLike] = ()
          ) -> dict[str, ir.CheckedPattern]:
    """Parse and type-check every pattern and function of a file; raise all errors at once."""
    return check_module(load(source, import_roots=import_roots))


def compile(source: str | os.PathLike, /, pattern: str | None = None, *,  # noqa: A001
            import_roots: Iterable[str | os.PathLike] = (), **params) -> Op:
    """Compile one pattern of a file (or source text) with the given parameter values.
    (`source` is positional-only, so a parameter may be called 'source'; no parameter may
    be called 'import_roots', see lang/statements.py.)"""
    module = load(source, import_roots=import_roots)
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
    return Op(bind(check_pattern(module, pdef), params))


class Op:
    """A pattern bound to parameters: its masks, analyses, compiled kernels, and attention
    through a backend."""

    def __init__(self, bound: BoundPattern, *, block_q: int | None = None,
                 block_k: int | None = None):
        self.bound = bound
        self.block_q = block_q
        self.block_k = block_k
        self.compiled = None  # (plan, kernel module) of an exported module, see use_compiled
        self.key = f"op{next(_OP_IDS)}"  # how a torch.compile graph names this op
        caches.OPS.put(self.key, self)

    def use_compiled(self, plan, module) -> Op:
        """Run these tables and this kernel module (an exported module's, see `attndsl
        compile -o`) instead of planning and generating: for calls whose run-time inputs
        are the plan's."""
        self.compiled = (plan, module)
        return self

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
        return {n: (d.kind, d.dims, d.optional) for n, d in self.bound.inputs.items()}

    def __repr__(self) -> str:
        vals = ", ".join(f"{k}={v}" for k, v in self.bound.values.items())
        return f"<attndsl.Op {self.name}({vals}) {self.bound.qshape}x{self.bound.kshape}>"

    def _part(self, sub: BoundPattern) -> Op:
        return Op(sub, block_q=self.block_q, block_k=self.block_k)

    # -- masks
    def mask(self, /, q: torch.Tensor | None = None, k: torch.Tensor | None = None,
             **inputs) -> torch.Tensor:
        """The direct-attention mask: [Nq, Nk]; [heads, Nq, Nk] per head; [B, H, Nq, Nk] for
        patterns that depend on q and k (which must then be given). For averaged patterns,
        the union of the parts' masks."""
        bp = self.bound
        content = None
        if bp.content_dependent:
            if q is None or k is None:
                raise InputError(f"pattern '{self.name}' depends on q and k: call "
                                 "mask(q=..., k=...)", bp.checked.span)
            check_tensors(bp, q, k, k)
            content = content_of(bp, q, k)
        dev = q.device if q is not None else None
        if bp.average:
            out = None
            for sub in bp.average:
                m = self._part(sub).mask(q, k, **{n: x for n, x in inputs.items()
                                                  if n in sub.inputs})
                out = m if out is None else out | m
            return out
        run = validate(bp, inputs, dev, for_mask=True, content=content)
        return dense_mask(bp, run, dev)

    def summaries(self, /, **inputs) -> list[dict]:
        """Each summary's tokens: name, `member` [R, Nk] and `attend` [.., Nq, R] (empty
        regions dropped), and pooling choices."""
        bp = self.bound
        run = validate(bp, inputs, for_mask=True)
        out = []
        for bs in bp.summaries:
            member, att = summary_masks(bp, bs, run, torch.device("cpu"),
                                        bp.heads if bp.head_dependent else None)
            out.append({"name": bs.summary.name, "member": member, "attend": att,
                        "keys": bs.summary.keys, "values": bs.summary.values,
                        "queries": bs.summary.queries})
        for sub in bp.average:
            out.extend(self._part(sub).summaries(**{n: x for n, x in inputs.items()
                                                    if n in sub.inputs}))
        return out

    def reach(self, /, q=None, k=None, **inputs) -> torch.Tensor:
        """[.., Nq, Nk]: keys a query sees directly or through a summary token it attends."""
        m = self.mask(q, k, **inputs)
        for s in self.summaries(**inputs):
            via = (s["attend"].to(torch.float32) @ s["member"].to(torch.float32)) > 0
            m = m | via
        return m

    # -- analysis
    def analyze(self, /, layers: int = 4, query=None, *, head_dim: int = 64, q=None, k=None,
                progress: bool | None = None, keep_sets: bool = False, **inputs):
        """Receptive field, coverage and cost stacked `layers` deep (docs/analysis.md).

        With keep_sets, `result.reach_sets[l]` is the bool [Nk] set reached after l+1 layers."""
        from attndsl.analysis.reach import analyze
        table_bytes = self.stats(**inputs)["block_table_bytes"]
        return analyze(self.bound, layers, query, head_dim=head_dim, inputs=inputs, q=q, k=k,
                       progress=progress, keep_sets=keep_sets, table_bytes=table_bytes)

    def path(self, /, source, target, *, q=None, k=None, **inputs):
        """The shortest hop path from query `source` to token `target`."""
        from attndsl.analysis.reach import shortest_path
        return shortest_path(self.bound, source, target, inputs, q=q, k=k)

    # -- compiled kernels
    def options(self, *, block_q: int | None = None, block_k: int | None = None) -> Op:
        """Set the kernels' block sizes (powers of two >= 16; default 64 x 64)."""
        for name, b in (("block_q", block_q), ("block_k", block_k)):
            if b is not None and (not isinstance(b, int) or b < 16 or b & (b - 1)):
                raise ParameterError(f"{name} must be a power of two >= 16, not {b!r}")
        self.block_q, self.block_k = block_q, block_k
        return self

    def plan(self, /, **inputs):
        """The token orders and exact block tables both compiled backends use (cached)."""
        from attndsl.codegen.plan.tables import plan_for
        _lowerable(self.bound)
        run = validate(self.bound, inputs, for_mask=True)
        if self.compiled is not None:
            plan = self.compiled[0]
            if plan.run.fingerprint == run.without(*self._router()).fingerprint:
                return plan
        return plan_for(self.bound, self.block_q, self.block_k, run)

    def _router(self) -> tuple:
        return () if self.bound.route is None else (self.bound.route[0],)

    def kernel(self, /, **inputs):
        """The compiled Triton kernels of this pattern (generated once; the module of an
        exported op is its own)."""
        from attndsl.codegen.triton.runtime import kernel_for
        _lowerable(self.bound)
        validate(self.bound, inputs, for_mask=True)
        return kernel_for(self.bound, None if self.compiled is None else self.compiled[1])

    def source(self, /, **inputs) -> str:
        """The generated Triton source (what ATTNDSL_DEBUG=1 prints)."""
        return self.kernel(**inputs).source

    def stats(self, /, **inputs) -> dict:
        """Block counts, tile shapes, table bytes, build time and computed / needed elements
        of the compiled kernels (docs/kernels.md). Averaged patterns: the parts' sums, and
        each part's own figures under "parts"."""
        bp = self.bound
        if bp.average:
            parts = [self._part(sub).stats(**{n: x for n, x in inputs.items()
                                              if n in sub.inputs}) for sub in bp.average]
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
        from attndsl.codegen.plan.tables import plan_stats
        return plan_stats(self.plan(**inputs))

    @staticmethod
    def cache_info() -> dict:
        """Every cache of attndsl: size, bound, hits and misses (attndsl/caches.py)."""
        return caches.info()

    # -- attention
    def __call__(self, q, k, v, /, *, backend: str = "auto", scale: float | None = None,
                 **inputs) -> torch.Tensor:
        if backend not in BACKENDS:
            raise UnsupportedError(f"unknown backend '{backend}'" + did_you_mean(
                backend, BACKENDS))
        if scale is not None and (not isinstance(scale, int | float) or not scale > 0
                                  or isinstance(scale, bool) or not math.isfinite(scale)):
            raise ParameterError(f"scale must be a positive number, not {scale!r}")
        if torch.compiler.is_compiling():  # one opaque op in the graph (see _graph_op)
            names = sorted(n for n, x in inputs.items() if x is not None)
            return _graph_op(q, k, v, [torch.as_tensor(inputs[n]) for n in names],
                             ",".join(names), self.key, backend,
                             -1.0 if scale is None else float(scale))
        return self._attend(q, k, v, backend, scale, inputs)

    def _attend(self, q, k, v, backend, scale, inputs):
        core = _core(backend, self.bound, q, self.compiled)
        return driver.attention(core, self.bound, q, k, v, inputs, scale, self.block_q,
                                self.block_k)


_OP_IDS = itertools.count()


def _named(names: str, tensors) -> dict:
    return dict(zip(names.split(","), tensors)) if names else {}


def _registered(key: str) -> Op:
    op = caches.OPS.get(key)
    if op is None:
        raise UnsupportedError(f"attndsl op '{key}' is no longer registered (more than "
                               f"{caches.OPS.maxsize} ops were created after it); recompile")
    return op


# torch.compile sees an Op call as one custom op whose fake implementation gives the output
# shape; eagerly it runs the op through its backend. Its backward, another custom op,
# recomputes the forward with autograd and differentiates it.
@torch.library.custom_op("attndsl::attention", mutates_args=())
def _graph_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, inputs: list[torch.Tensor],
              names: str, key: str, backend: str, scale: float) -> torch.Tensor:
    return _registered(key)._attend(q, k, v, backend, None if scale < 0 else scale,
                                    _named(names, inputs)).clone()


@_graph_op.register_fake
def _(q, k, v, inputs, names, key, backend, scale):
    return q.new_empty(*q.shape[:-1], v.shape[-1])


@torch.library.custom_op("attndsl::attention_backward", mutates_args=())
def _graph_op_bwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  inputs: list[torch.Tensor], names: str, key: str, backend: str,
                  scale: float, dout: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    with torch.enable_grad():
        xs = [x.detach().requires_grad_(True) for x in (q, k, v)]
        out = _registered(key)._attend(*xs, backend, None if scale < 0 else scale,
                                       _named(names, inputs))
        grads = torch.autograd.grad(out, xs, dout, allow_unused=True)
    return tuple(torch.zeros_like(x) if g is None else g for g, x in zip(grads, xs))


@_graph_op_bwd.register_fake
def _(q, k, v, inputs, names, key, backend, scale, dout):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup(ctx, inputs, output):
    q, k, v, tensors, names, key, backend, scale = inputs
    ctx.save_for_backward(q, k, v, *tensors)
    ctx.meta = (names, key, backend, scale)


def _backward(ctx, dout):
    q, k, v, *tensors = ctx.saved_tensors
    dq, dk, dv = _graph_op_bwd(q, k, v, tensors, *ctx.meta, dout)
    return dq, dk, dv, [None] * len(tensors), None, None, None, None


_graph_op.register_autograd(_backward, setup_context=_setup)


def _core(backend: str, bp: BoundPattern, q, compiled=None):
    """The core of a backend; 'auto' picks Triton for CUDA tensors, the CPU backend for CPU
    tensors it runs, the reference otherwise."""
    if backend == "auto":
        backend = "reference"
        if isinstance(q, torch.Tensor) and q.is_cuda and _has_triton():
            backend = "triton"
        elif isinstance(q, torch.Tensor) and q.device.type == "cpu":
            from attndsl.codegen.cpu.kernels import supported
            if supported(bp):
                backend = "cpu"
    if backend == "cpu":
        from attndsl.codegen.cpu.kernels import Cpu
        return Cpu()
    if backend == "triton":
        from attndsl.codegen.triton.runtime import Triton
        return Triton(None if compiled is None else compiled[1],
                      None if compiled is None else compiled[0])
    return Reference()


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
