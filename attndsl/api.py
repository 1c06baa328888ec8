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

BACKENDS = ("reference", "auto")


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

    # -- attention
    def __call__(self, q, k, v, *, backend: str = "auto", scale: float | None = None,
                 **inputs) -> torch.Tensor:
        if backend not in BACKENDS:
            if backend in ("triton", "cpu"):
                raise UnsupportedError(f"backend '{backend}' is not available yet; this "
                                       "release has the 'reference' backend")
            raise UnsupportedError(f"unknown backend '{backend}'" + did_you_mean(
                backend, BACKENDS + ("triton", "cpu")))
        if scale is not None and (not isinstance(scale, int | float) or not scale > 0
                                  or not math.isfinite(scale)):
            raise ParameterError(f"scale must be a positive number, not {scale!r}")
        return attention(self.bound, q, k, v, inputs, scale)
