"""The Python API: `attndsl.compile(...)` returns an `Op`: a bound pattern, the block sizes of
its compiled kernels and the backend chosen per call. Everything an Op computes is cached in
the declared caches of attndsl/caches.py, keyed by values, so an Op holds no state of its
own beyond its options."""

from __future__ import annotations

import importlib
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
from attndsl.semantics.attention import Options
from attndsl.semantics.bind import BoundPattern, convert
from attndsl.semantics.family import Family, flat
from attndsl.semantics.inputs import check_tensors, content_of, declared, validate
from attndsl.semantics.masks import dense_mask, summary_masks

BACKENDS = ("reference", "triton", "cpu", "flex", "auto")
# the keywords of op(q, k, v, ...) besides run-time inputs and sizes (suggested for typos)
CALL_OPTIONS = ("backend", "scale", "q_start", "key_padding_mask", "lengths", "dropout_p",
                "generator", "queries", "softcap")


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
    return compile_module(load(source, import_roots=import_roots), pattern, params)


def compile_module(module: ir.Module, pattern: str | None, params: dict) -> Op:
    """`compile` of a loaded module (attndsl.nn recompiles stored source text this way)."""
    return Op(_family(check_pattern(module, find_pattern(module, pattern)), params))


def find_pattern(module: ir.Module, pattern: str | None) -> ir.PatternDef:
    """The pattern `pattern` of a module, or its only pattern when None."""
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
    return pdef


def _family(checked: ir.CheckedPattern, params: dict) -> Family:
    """The family of a compiled pattern; parameter names and given values are checked now,
    the pattern's requires when its sizes are known."""
    names = [p.name for p, _ in checked.params]
    for k in params:
        if k not in names:
            raise ParameterError(f"pattern '{checked.name}' has no parameter '{k}'"
                                 + did_you_mean(k, names), checked.span)
    family = Family.of(checked, params)
    if not family.fixed:
        for p, t in checked.params:
            if p.name in params:
                convert(p.name, params[p.name], t, p.span)
            elif p.default is None and p.name not in family.sizes:
                raise ParameterError(f"pattern '{checked.name}' needs parameter '{p.name}' "
                                     f"({t})", checked.span)
    return family


class Op:
    """A pattern with its parameters: its masks, analyses, compiled kernels, and attention
    through a backend. An op compiled without the sizes of its spaces is a family: every
    call binds them from the tensors (`op.mask(N=...)` and the like take them by name)."""

    def __init__(self, source: BoundPattern | Family, *, block_q: int | None = None,
                 block_k: int | None = None):
        if isinstance(source, BoundPattern):
            self.family = Family.of(source.checked, dict(source.values))
            self._bound = source
        else:
            self.family = source
            self._bound = source.bind() if source.fixed else None
        self.block_q = block_q
        self.block_k = block_k
        self.compiled = None  # (plan, kernel module) of an exported module, see use_compiled
        self.key = f"op{next(_OP_IDS)}"  # how a torch.compile graph names this op
        caches.OPS[self.key] = self

    def use_compiled(self, plan, module) -> Op:
        """Run these tables and this kernel module (an exported module's, see `attndsl
        compile -o`) instead of planning and generating: for calls whose run-time inputs
        are the plan's."""
        self.compiled = (plan, module)
        return self

    # -- description
    @property
    def bound(self) -> BoundPattern:
        """The bound pattern of an op with fixed sizes (a family has one per size)."""
        if self._bound is None:
            return self.family.bind()  # raises: names the sizes to pass
        return self._bound

    def bind(self, **sizes) -> BoundPattern:
        """The bound pattern for these sizes (none for an op compiled with its sizes)."""
        if not sizes and self._bound is not None:
            return self._bound
        if self._bound is not None:
            unknown = set(sizes) - set(self.family.sizes)
            if unknown:
                raise ParameterError(f"op '{self.name}' was compiled with its sizes; it has no "
                                     f"size '{sorted(unknown)[0]}' to choose")
        return self.family.bind(sizes)

    @property
    def sizes(self) -> tuple[str, ...]:
        """The size parameters each call binds (empty for an op compiled with its sizes)."""
        return self.family.sizes

    @property
    def name(self) -> str:
        return self.family.name

    @property
    def params(self) -> dict:
        return dict(self._bound.values) if self._bound is not None else dict(self.family.given)

    @property
    def doc(self) -> str:
        return self.family.checked.doc

    @property
    def query_shape(self) -> tuple[int, ...]:
        return self.bound.qshape

    @property
    def key_shape(self) -> tuple[int, ...]:
        return self.bound.kshape

    @property
    def heads(self) -> int | None:
        return self._bound.heads if self._bound is not None else _static_heads(self.family)

    @property
    def inputs(self) -> dict:
        """Run-time inputs: name -> (element kind, dims with None for '*' or a size that
        each call binds, optional)."""
        if self._bound is not None:
            return {n: (d.kind, d.dims, d.optional) for n, d in self._bound.inputs.items()}
        return {d.name: (d.kind, tuple(x.value if isinstance(x, ir.IntLit) else None
                                       for x in d.dims), d.optional)
                for d in self.family.checked.inputs}

    def __repr__(self) -> str:
        if self._bound is None:
            vals = ", ".join(f"{k}={v}" for k, v in self.family.given)
            return (f"<attndsl.Op {self.name}({vals}) sizes from the tensors: "
                    f"{', '.join(self.sizes)}>")
        vals = ", ".join(f"{k}={v}" for k, v in self._bound.values.items())
        return f"<attndsl.Op {self.name}({vals}) {self._bound.qshape}x{self._bound.kshape}>"

    def _part(self, sub: BoundPattern) -> Op:
        return Op(sub, block_q=self.block_q, block_k=self.block_k)

    def _split(self, kwargs: dict, q=None, k=None) -> tuple[BoundPattern, dict]:
        """(the bound pattern, the run-time inputs) of keyword arguments that may hold sizes;
        q and k (content-dependent masks) may give the sizes too."""
        sizes, inputs = self.family.split(kwargs)
        if self._bound is None and (q is not None or k is not None):
            sizes = self.family.infer(q, k, sizes, None)
        return self.bind(**sizes), inputs

    # -- masks
    def mask(self, /, q: torch.Tensor | None = None, k: torch.Tensor | None = None,
             **inputs) -> torch.Tensor:
        """The direct-attention mask: [Nq, Nk]; [heads, Nq, Nk] per head; [B, H, Nq, Nk] for
        patterns that depend on q and k (which must then be given). For averaged patterns,
        the union of the parts' masks. Sizes of a family op are keywords (N=...)."""
        bp, inputs = self._split(inputs, q, k)
        content = None
        if bp.content_dependent:
            if q is None or k is None:
                raise InputError(f"pattern '{self.name}' depends on q and k: call "
                                 "mask(q=..., k=...)", bp.checked.span)
            q, k = (flat(t, len(bp.qshape)) for t in (q, k))
            check_tensors(bp, q, k, k)
            content = content_of(bp, q, k)
        dev = q.device if q is not None else None
        if bp.average:
            out = None
            for sub in bp.average:
                m = self._part(sub).mask(q, k, **declared(sub, inputs))
                out = m if out is None else out | m
            return out
        run = validate(bp, inputs, dev, for_mask=True, content=content)
        return dense_mask(bp, run, dev)

    def summaries(self, /, **inputs) -> list[dict]:
        """Each summary's tokens: name, `member` [R, Nk] and `attend` [.., Nq, R] (empty
        regions dropped), and pooling choices."""
        bp, inputs = self._split(inputs)
        run = validate(bp, inputs, for_mask=True)
        out = []
        for bs in bp.summaries:
            member, att = summary_masks(bp, bs, run, torch.device("cpu"),
                                        bp.heads if bp.head_dependent else None)
            out.append({"name": bs.summary.name, "member": member, "attend": att,
                        "keys": bs.summary.keys, "values": bs.summary.values,
                        "queries": bs.summary.queries})
        for sub in bp.average:
            out.extend(self._part(sub).summaries(**declared(sub, inputs)))
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
        bp, run_inputs = self._split(inputs, q, k)
        # the compiled kernels' tables, as `attndsl compile --stats` reports them
        table_bytes = self._part(bp).stats("triton", **run_inputs)["block_table_bytes"]
        return analyze(bp, layers, query, head_dim=head_dim, inputs=run_inputs, q=q, k=k,
                       progress=progress, keep_sets=keep_sets, table_bytes=table_bytes)

    def evaluate(self, /, task: str = "mqar", *, compare=(), **options):
        """Train tiny models with this pattern in every layer (and the ops or per-layer op
        lists in `compare`, and a dense control) on `task` ('mqar', 'passkey', 'copy') on
        the CPU; recall per distance band against the analysed reach (docs/eval.md)."""
        # attndsl.evaluation builds its models from attndsl.nn, which imports this module:
        # it is a stage above this one, reached by name (the one call up the stages)
        evaluation = importlib.import_module("attndsl.evaluation")
        return evaluation.evaluate(self, *compare, task=task, **options)

    def path(self, /, source, target, *, q=None, k=None, **inputs):
        """The shortest hop path from query `source` to token `target`."""
        from attndsl.analysis.reach import shortest_path
        bp, inputs = self._split(inputs, q, k)
        return shortest_path(bp, source, target, inputs, q=q, k=k)

    # -- compiled kernels
    def options(self, *, block_q: int | None = None, block_k: int | None = None) -> Op:
        """Set the kernels' block sizes (powers of two >= 16; default 64 x 64)."""
        for name, b in (("block_q", block_q), ("block_k", block_k)):
            if b is not None and (not isinstance(b, int) or b < 16 or b & (b - 1)):
                raise ParameterError(f"{name} must be a power of two >= 16, not {b!r}")
        self.block_q, self.block_k = block_q, block_k
        return self

    def plan(self, /, backend: str = "auto", **inputs):
        """The token orders and exact block tables a compiled backend ("cpu", "triton";
        "auto": triton where CUDA is available) computes with (cached). Unless
        `options` set block sizes, each backend's planner chooses them (on 2D / 3D spaces
        the CPU's may differ from 64 x 64: docs/kernels.md)."""
        from attndsl.codegen.plan.tables import plan_for
        bp, inputs = self._split(inputs)
        _lowerable(bp)
        run = validate(bp, inputs, for_mask=True)
        if self.compiled is not None:
            plan = self.compiled[0]
            router = () if bp.route is None else (bp.route[0],)
            if plan.run.fingerprint == run.without(*router).fingerprint:
                return plan
        return plan_for(bp, self.block_q, self.block_k, run, target=_target(backend))

    def kernel(self, /, **inputs):
        """The compiled Triton kernels of this pattern (generated once; the module of an
        exported op is its own)."""
        from attndsl.codegen.triton.runtime import kernel_for
        bp, inputs = self._split(inputs)
        _lowerable(bp)
        validate(bp, inputs, for_mask=True)
        return kernel_for(bp, None if self.compiled is None else self.compiled[1])

    def source(self, /, **inputs) -> str:
        """The generated Triton source (what ATTNDSL_DEBUG=1 prints)."""
        return self.kernel(**inputs).source

    def stats(self, /, backend: str = "auto", **inputs) -> dict:
        """Block counts, tile shapes, table bytes, build time and computed / needed elements
        of a compiled backend's kernels (docs/kernels.md; `backend` as for `plan`); for the
        CPU, also native_elements: what flash.c's forward and backward compute (the
        blocks less the keys they skip; None where they do not run the plan). Averaged
        patterns: the parts' sums, and each part's own figures under "parts"."""
        bp, inputs = self._split(inputs)
        if bp.average:
            parts = [self._part(sub).stats(backend, **declared(sub, inputs))
                     for sub in bp.average]
            out = dict(parts[0])
            for key in ("full_blocks", "partial_blocks", "empty_blocks", "computed_elements",
                        "needed_elements", "block_table_bytes", "build_seconds"):
                out[key] = sum(p[key] for p in parts)
            out["waste"] = (out["computed_elements"] / out["needed_elements"]
                            if out["needed_elements"] else float("inf"))
            if "native_elements" in out:
                nf = [p["native_elements"] for p in parts]
                out["native_elements"] = None if None in nf else sum(nf)
            out["order_q"] = out["order_k"] = "per part"
            out["content_dependent"] = any(p["content_dependent"] for p in parts)
            out["parts"] = parts
            return out
        from attndsl.codegen.plan.tables import plan_stats
        from attndsl.codegen.triton.generate import kernel_sizes
        plan = self._part(bp).plan(backend, **inputs)
        out = {**plan_stats(plan), "kernel_sizes": kernel_sizes(bp)}
        if _target(backend) == "cpu":
            from attndsl.codegen.cpu.fused import native_computed
            out["native_elements"] = native_computed(plan)
        return out

    # -- FlexAttention (codegen/flex.py; docs/integrations.md)
    def block_mask(self, /, order: str = "row-major", block_size: int = 128, *, device=None,
                   **inputs):
        """A torch.nn.attention.flex_attention.BlockMask built from attndsl's exact tables
        (FULL and PARTIAL blocks, and their transposition for the backward) with the
        generated mask_mod: for flex_attention(q, k, v, block_mask=...). With
        order="tiled", pass q, k, v through op.permute and the output through
        op.unpermute."""
        from attndsl.codegen.flex import block_mask
        return block_mask(self, order, block_size, device, **inputs)

    def score_mod(self, /, order: str = "row-major", block_size: int = 128, *, device=None,
                  softcap: float | None = None, **inputs):
        """The generated score_mod (the pattern's bias and softcap) or None."""
        from attndsl.codegen.flex import score_mod
        return score_mod(self, order, block_size, device, softcap, **inputs)

    def permute(self, x, /, block_size: int = 128, **inputs) -> torch.Tensor:
        """x [B, H, N, D] (or [B, H, *grid, D]) into the tiled order of
        block_mask(order="tiled") on the token axis; padding positions are zero."""
        from attndsl.codegen.flex import permute
        return permute(self, x, "tiled", block_size, **inputs)

    def unpermute(self, x, /, block_size: int = 128, **inputs) -> torch.Tensor:
        """The inverse of permute: [B, H, L, D] back to row-major tokens [B, H, N, D]."""
        from attndsl.codegen.flex import permute
        return permute(self, x, "tiled", block_size, inverse=True, **inputs)

    @staticmethod
    def cache_info() -> dict:
        """The caches ops share (attndsl/caches.py): plans (block tables per bound pattern,
        block sizes, rows and run-time inputs) and kernels (imported modules; one serves every
        size of a pattern whose kernels read their sizes at run time) with their bounds, all
        hits and misses, and every cache under "caches"."""
        every = caches.info()
        return {"plans": len(caches.PLANS), "max_plans": caches.PLANS.maxsize,
                "kernels": len(caches.KERNEL_MODULES),
                "max_kernels": caches.KERNEL_MODULES.maxsize,
                "hits": sum(c["hits"] for c in every.values()),
                "misses": sum(c["misses"] for c in every.values()), "caches": every}

    # -- attention
    def __call__(self, q, k, v, /, *, backend: str = "auto", scale: float | None = None,
                 q_start: int | None = None, key_padding_mask: torch.Tensor | None = None,
                 lengths: torch.Tensor | None = None, dropout_p: float = 0.0,
                 generator: torch.Generator | None = None, queries: torch.Tensor | None = None,
                 softcap: float | None = None, **inputs) -> torch.Tensor:
        """Attention of q over k and v: [B, H, N, D] (or [B, H, *grid, D] for grid spaces;
        the output has q's layout). Run-time inputs and, for a family op given flat tensors
        of a grid space, its sizes are keywords. `q_start`: q holds the queries q_start ..
        q_start + M - 1 (decoding with a KV cache, chunked prefill); `key_padding_mask`
        [B, Nk] (True: a real token) or `lengths` [B] (right padding); `dropout_p` with
        `generator` (training); `queries` [B, H, Nk, D]: the queries of every key position,
        for patterns that pool or read queries while q holds only some (docs/model.md);
        `softcap`: cap * tanh(score / cap) on the scaled scores, with any pattern (Gemma 2;
        it replaces the pattern's own `softcap` statement for this call)."""
        if backend not in BACKENDS:
            raise UnsupportedError(_unknown_backend(backend))
        if scale is not None and (not isinstance(scale, int | float) or not scale > 0
                                  or isinstance(scale, bool) or not math.isfinite(scale)):
            raise ParameterError(f"scale must be a positive number, not {scale!r}")
        if softcap is not None and (not isinstance(softcap, int | float)
                                    or isinstance(softcap, bool) or not softcap > 0
                                    or not math.isfinite(softcap)):
            raise ParameterError(f"softcap must be a positive number, not {softcap!r}")
        seed = None
        if dropout_p:
            seed = torch.randint(0, 2**32 - 1, (), generator=generator, dtype=torch.int64,
                                 device=generator.device if generator is not None else "cpu")
        if torch.compiler.is_compiling():  # one opaque op in the graph (see _graph_op)
            names = sorted(n for n, x in inputs.items() if x is not None)
            return _graph_op(q, k, v, [torch.as_tensor(inputs[n]) for n in names],
                             ",".join(names), self.key, backend,
                             -1.0 if scale is None else float(scale),
                             -1 if q_start is None else q_start, key_padding_mask, lengths,
                             float(dropout_p), seed, queries,
                             -1.0 if softcap is None else float(softcap))
        return self._attend(q, k, v, backend, scale, q_start, key_padding_mask, lengths,
                            float(dropout_p), seed, queries, inputs, softcap)

    def _attend(self, q, k, v, backend, scale, q_start, key_padding_mask, lengths, dropout_p,
                seed, queries, inputs, softcap=None):
        sizes, inputs = self.family.split(inputs)
        if self._bound is None:
            sizes = self.family.infer(q, k, sizes, q_start)
            missing = [n for n in self.family.sizes if n not in sizes]
            if missing:
                raise InputError(
                    f"op '{self.name}' takes {', '.join(missing)} from the layout of its "
                    f"tensors ([batch, heads, {', '.join(missing)}, dim]); given flat "
                    f"tensors {list(getattr(k, 'shape', []))}, pass "
                    + ", ".join(f"{n}=..." for n in missing))
        bp = self.bind(**sizes)
        known = _input_names(bp)
        for name in inputs:
            if name not in known:
                raise bp.unknown_input(name, CALL_OPTIONS + self.family.sizes)
        axes = len(bp.qshape)
        grid_out = isinstance(q, torch.Tensor) and axes > 1 and q.dim() == 3 + axes
        qf, kf, vf = flat(q, len(bp.qshape)), flat(k, len(bp.kshape)), flat(v, len(bp.kshape))
        opts = Options(scale, self.block_q, self.block_k, q_start,
                       _key_valid(key_padding_mask, lengths, kf), dropout_p,
                       0 if seed is None else int(seed), flat(queries, len(bp.kshape)),
                       None if softcap is None else float(softcap))
        core = _core(backend, bp, qf, self.compiled)
        out = driver.attention(core, bp, qf, kf, vf, inputs, opts)
        return out.reshape(*q.shape[:-1], out.shape[-1]) if grid_out else out


def _unknown_backend(backend) -> str:
    text = f"unknown backend {backend!r}"
    if isinstance(backend, str) and backend.lower().split(":")[0] in ("cuda", "gpu"):
        return (text + ": a device, not a backend; move q, k and v to the GPU and keep "
                "backend='auto' (or pass 'triton'); the backends are " + ", ".join(BACKENDS))
    return text + did_you_mean(backend, BACKENDS) + "; the backends are " + ", ".join(BACKENDS)


def _input_names(bp: BoundPattern) -> set:
    """Every run-time input a call may pass: the pattern's and its averaged parts'."""
    out = set(bp.inputs)
    for sub in bp.average:
        out |= _input_names(sub)
    return out


def _key_valid(mask, lengths, k) -> torch.Tensor | None:
    """key_padding_mask [B, Nk] (True: a real key), or `lengths` [B] as right padding."""
    if lengths is None:
        if mask is not None and isinstance(mask, torch.Tensor) and mask.dim() > 2:
            mask = mask.reshape(mask.shape[0], -1)  # a grid's [B, *grid]
        return mask
    if mask is not None:
        raise InputError("pass key_padding_mask or lengths, not both")
    if not isinstance(lengths, torch.Tensor):
        lengths = torch.as_tensor(lengths)
    if lengths.dim() != 1 or lengths.is_floating_point() or lengths.dtype == torch.bool:
        raise InputError(f"lengths must be an int tensor [batch], not {lengths.dtype} "
                         f"{list(lengths.shape)}")
    if not isinstance(k, torch.Tensor) or lengths.shape[0] != k.shape[0]:
        raise InputError(f"lengths must have one entry per batch element, not "
                         f"{lengths.shape[0]}")
    lengths = lengths.to(k.device)
    if bool(((lengths < 0) | (lengths > k.shape[2])).any()):
        raise InputError(f"lengths must be between 0 and the {k.shape[2]} keys")
    return torch.arange(k.shape[2], device=k.device).view(1, -1) < lengths.view(-1, 1)


def _static_heads(family: Family) -> int | None:
    h = family.checked.heads
    if isinstance(h, ir.IntLit):
        return h.value
    if isinstance(h, ir.Name) and h.ref == "param":
        return dict(family.given).get(h.id)
    return None


_OP_IDS = itertools.count()


def _named(names: str, tensors) -> dict:
    return dict(zip(names.split(","), tensors)) if names else {}


def _registered(key: str) -> Op:
    op = caches.OPS.get(key)
    if op is None:
        raise UnsupportedError(f"attndsl op '{key}' no longer exists: a compiled graph "
                               "outlived the Op it calls")
    return op


# torch.compile sees an Op call as one custom op whose fake implementation gives the output
# shape; eagerly it runs the op through its backend. Its backward, another custom op,
# recomputes the forward with autograd and differentiates it.
def _eager(q, k, v, inputs, names, key, backend, scale, q_start, kpm, lengths, dropout_p,
           seed, queries, softcap):
    return _registered(key)._attend(
        q, k, v, backend, None if scale < 0 else scale, None if q_start < 0 else q_start,
        kpm, lengths, dropout_p, None if seed is None else int(seed), queries,
        _named(names, inputs), None if softcap < 0 else softcap)


@torch.library.custom_op("attndsl::attention", mutates_args=())
def _graph_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, inputs: list[torch.Tensor],
              names: str, key: str, backend: str, scale: float, q_start: int,
              kpm: torch.Tensor | None, lengths: torch.Tensor | None, dropout_p: float,
              seed: torch.Tensor | None, queries: torch.Tensor | None, softcap: float
              ) -> torch.Tensor:
    return _eager(q, k, v, inputs, names, key, backend, scale, q_start, kpm, lengths,
                  dropout_p, seed, queries, softcap).clone()


@_graph_op.register_fake
def _(q, k, v, inputs, names, key, backend, scale, q_start, kpm, lengths, dropout_p, seed,
      queries, softcap):
    return q.new_empty(*q.shape[:-1], v.shape[-1])


@torch.library.custom_op("attndsl::attention_backward", mutates_args=())
def _graph_op_bwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  inputs: list[torch.Tensor], names: str, key: str, backend: str,
                  scale: float, q_start: int, kpm: torch.Tensor | None,
                  lengths: torch.Tensor | None, dropout_p: float, seed: torch.Tensor | None,
                  queries: torch.Tensor | None, softcap: float, dout: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # a custom op runs below autograd: record this recomputation's graph all the same
    exclude = torch._C._dispatch_tls_local_exclude_set() - torch._C.DispatchKeySet(
        torch._C.DispatchKey.AutogradCPU) - torch._C.DispatchKeySet(
        torch._C.DispatchKey.AutogradCUDA) - torch._C.DispatchKeySet(
        torch._C.DispatchKey.ADInplaceOrView)
    with torch._C._ForceDispatchKeyGuard(torch._C._dispatch_tls_local_include_set(),
                                         exclude), torch.enable_grad():
        xs = [x.detach().requires_grad_(True) for x in (q, k, v)]
        out = _eager(*xs, inputs, names, key, backend, scale, q_start, kpm, lengths,
                     dropout_p, seed, queries, softcap)
        grads = torch.autograd.grad(out, xs, dout, allow_unused=True)
    return tuple(torch.zeros_like(x) if g is None else g for g, x in zip(grads, xs))


@_graph_op_bwd.register_fake
def _(q, k, v, inputs, names, key, backend, scale, q_start, kpm, lengths, dropout_p, seed,
      queries, softcap, dout):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup(ctx, inputs, output):
    (q, k, v, tensors, names, key, backend, scale, q_start, kpm, lengths, p, seed, qs,
     cap) = inputs
    ctx.save_for_backward(q, k, v, kpm, lengths, seed, qs, *tensors)
    ctx.meta = (names, key, backend, scale, q_start, p, cap)


def _backward(ctx, dout):
    q, k, v, kpm, lengths, seed, qs, *tensors = ctx.saved_tensors
    names, key, backend, scale, q_start, p, cap = ctx.meta
    dq, dk, dv = _graph_op_bwd(q, k, v, tensors, names, key, backend, scale, q_start, kpm,
                               lengths, p, seed, qs, cap, dout)
    return (dq, dk, dv, [None] * len(tensors), None, None, None, None, None, None, None,
            None, None, None, None)


_graph_op.register_autograd(_backward, setup_context=_setup)


def core_for(backend: str, bp: BoundPattern, q):
    """The core a call of `bp` on tensors like q runs on (for callers that drive cores
    themselves, such as attndsl.distributed)."""
    if backend not in BACKENDS:
        raise UnsupportedError(f"unknown backend '{backend}'" + did_you_mean(backend, BACKENDS))
    return _core(backend, bp, q)


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
    if backend == "flex":
        from attndsl.codegen.flex import Flex
        return Flex()
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


def _target(backend: str) -> str:
    """The compiled backend whose planner a plan is for."""
    if backend == "auto":
        return "triton" if torch.cuda.is_available() else "cpu"
    if backend not in ("cpu", "triton"):
        raise ParameterError(f"backend must be 'auto', 'cpu' or 'triton', not {backend!r}")
    return backend
