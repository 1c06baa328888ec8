"""What a call brings: validated q, k, v and run-time inputs, passed as values.

`RunInputs` holds one call's run-time inputs (and, for patterns that read q and k, the
content). It is created per call and travels by argument into every evaluator, planner and
backend; nothing writes run-time values into a BoundPattern or a plan.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from types import MappingProxyType

import torch

from attndsl.caches import lazy
from attndsl.errors import InputError, SizeLimitError, UnsupportedError
from attndsl.semantics.bind import BoundPattern

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INPUT_LIMIT = 1 << 28  # elements of one run-time input (2 GiB as int64), checked unread
INT64_MIN = -(1 << 63)


@dataclass(frozen=True, eq=False)
class RunInputs:
    """Validated run-time inputs: name -> tensor (int64 for int inputs), Python number for
    a scalar, or None (an absent optional input); `content` is (q, k with k's heads repeated
    to q's) for patterns whose masks read them. `memo` keeps what this call computes once
    from them (DHSA's chunk selection)."""

    values: MappingProxyType = field(default_factory=lambda: MappingProxyType({}))
    content: tuple | None = None
    memo: dict = field(default_factory=dict, repr=False)

    @lazy
    def env(self) -> dict:
        """The inputs as evaluator values: 0-dim tensors become Python numbers."""
        out = {}
        for name, v in self.values.items():
            out[name] = v.item() if isinstance(v, torch.Tensor) and v.dim() == 0 else v
        return out

    def part(self, bp: BoundPattern) -> RunInputs:
        """The inputs an averaged part (or any sub-pattern) declares."""
        return RunInputs(MappingProxyType({n: v for n, v in self.values.items()
                                           if n in bp.inputs}), self.content)

    def without(self, *names: str) -> RunInputs:
        return RunInputs(MappingProxyType({n: v for n, v in self.values.items()
                                           if n not in names}), self.content)

    def with_content(self, content) -> RunInputs:
        return RunInputs(self.values, content)

    def cpu(self) -> RunInputs:
        return RunInputs(MappingProxyType({
            n: v.cpu() if isinstance(v, torch.Tensor) else v for n, v in self.values.items()}),
            self.content)

    @lazy
    def fingerprint(self) -> tuple:
        """A hashable digest of the values (not the content): a plan built for these inputs
        serves any call whose inputs have the same fingerprint."""
        out = []
        for name in sorted(self.values):
            v = self.values[name]
            if isinstance(v, torch.Tensor):
                data = v.detach().cpu().contiguous().numpy()  # hashed in place, no copy
                out.append((name, tuple(v.shape), str(v.dtype),
                            hashlib.sha1(data).hexdigest()))
            else:
                out.append((name, v))
        return tuple(out)


NONE = RunInputs()
# `content` for the pairs a content-dependent mask attends whatever q and k are: every
# content selection (chunk_topk) keeps nothing. The Triton backend's per-call tables add
# these pairs to the ones the call's selection keeps (codegen/plan/tables.py: unselected).
UNSELECTED = ("every content selection keeps nothing",)
# ... and every selection keeps every key: the pairs FULL wherever a call's selection keeps
# whole blocks (codegen/plan/dynamic.py).
SELECTED = ("every content selection keeps every key",)


def declared(bp: BoundPattern, given: dict) -> dict:
    """The given run-time inputs that `bp` declares: what an averaged part receives."""
    return {n: v for n, v in given.items() if n in bp.inputs}


def _shape(dims) -> str:
    return "[" + ", ".join("*" if d is None else str(d) for d in dims) + "]"


def validate(bp: BoundPattern, given: dict, device=None, batch=None,
             for_mask: bool = False, content=None, q_rows: int | None = None) -> RunInputs:
    """Check run-time inputs against their declarations and return them as a RunInputs.

    With `for_mask`, the inputs no rule reads (a router, bias values, given summary keys)
    are optional: they change outputs, not masks. The router (and the route's other
    inputs) have one row per query of the call (`q_rows`, when q holds only some)."""
    out = {}
    per_query = route_inputs(bp)
    for name in given:
        if name not in bp.inputs:
            raise bp.unknown_input(name)
    for name, spec in bp.inputs.items():
        kind, dims, optional, span = spec.kind, spec.dims, spec.optional, spec.span
        v = given.get(name)
        if v is None:
            if optional or (for_mask and name not in bp.mask_inputs):
                out[name] = None
                continue
            shape = "" if not dims else _shape(dims)
            raise InputError(f"pattern '{bp.name}' needs run-time input '{name}' "
                             f"({kind}{shape})", span)
        if not isinstance(v, torch.Tensor):
            try:
                v = torch.as_tensor(v)
            except (TypeError, ValueError, RuntimeError, OverflowError):
                raise InputError(f"run-time input '{name}' must be a tensor or number, not "
                                 f"{type(v).__name__}", span) from None
        _dense(f"run-time input '{name}'", v, span)
        if v.numel() > INPUT_LIMIT:
            raise SizeLimitError(f"run-time input '{name}' has {v.numel():,} elements, over "
                                 f"the limit of {INPUT_LIMIT:,} (2^28)", span)
        if kind == "int" and (v.is_floating_point() or v.is_complex() or v.dtype == torch.bool):
            raise InputError(f"run-time input '{name}' must have an integer dtype, not "
                             f"{v.dtype}", span)
        if kind == "float" and not v.is_floating_point():
            raise InputError(f"run-time input '{name}' must have a floating dtype, not "
                             f"{v.dtype}", span)
        if name in per_query:  # [batch, the call's queries, heads]: checked below
            dims = (None, None, dims[2])
        if v.dim() != len(dims) or any(d is not None and d != s for d, s in zip(dims, v.shape)):
            must = ("be a scalar, not shape" if not dims else
                    f"have shape {_shape(dims)}, not")
            raise InputError(f"run-time input '{name}' must {must} {list(v.shape)}", span)
        if device is not None and v.device != device:
            raise InputError(f"run-time input '{name}' is on {v.device}, the tensors on "
                             f"{device}", span)
        if kind == "int":
            v = v.long()
            if v.numel() and bool((v == INT64_MIN).any()):
                raise InputError(f"run-time input '{name}' holds {INT64_MIN}, outside the "
                                 "range of .attn integers (|value| < 2^63)", span)
        out[name] = v
    rows = bp.nq if q_rows is None else q_rows
    for name, (what, width) in per_query.items():
        r = out.get(name)
        if r is not None and ((batch is not None and r.shape[0] != batch)
                              or r.shape[1] != rows or r.shape[2] != width):
            raise InputError(f"{what} '{name}' must have shape [{batch or '*'}, {rows}, "
                             f"{width}], not {list(r.shape)}", bp.inputs[name].span)
    for sub in bp.average:
        validate(sub, declared(sub, given), device, batch, for_mask, None, q_rows)
    return RunInputs(MappingProxyType(out), content)


def check_given(bp: BoundPattern, run: RunInputs, q, v, core_name: str) -> None:
    """Summary keys and values given at run time against q and v: [batch, 1 | a divisor
    of the query heads, the summary's tokens, q's (keys) or v's (values) head dim]; and,
    on a backend that compiles its biases, no bias input that would need a gradient."""
    B, H = q.shape[0], q.shape[1]
    for bs in bp.summaries:
        s = bs.summary
        r = math.prod(bs.sizes)
        for role, name, width in (("keys", s.keys_from, q.shape[-1]),
                                  ("values", s.values_from, v.shape[-1])):
            if name is None:
                continue
            t = run.values[name]
            want = f"[{B}, heads (1, or a divisor of {H}), {r}, {width}]"
            if t.shape[0] != B or t.shape[1] < 1 or H % t.shape[1] or t.shape[2] != r or (
                    t.shape[3] != width):
                raise InputError(f"summary '{s.name}' takes its {role} from '{name}', which "
                                 f"must have shape {want}, not {list(t.shape)}",
                                 bp.inputs[name].span)
    if core_name != "reference" and torch.is_grad_enabled():
        for name in sorted(bp.bias_inputs):
            t = run.values.get(name)
            if isinstance(t, torch.Tensor) and t.requires_grad:
                raise UnsupportedError(
                    f"backend '{core_name}' compiles the 'bias' that reads run-time input "
                    f"'{name}' and takes it as a constant, but it requires a gradient; pass "
                    "it detached, or use backend='reference'", bp.inputs[name].span)
    for sub in bp.average:
        check_given(sub, run.part(sub), q, v, core_name)


def route_inputs(bp: BoundPattern) -> dict:
    """The route's inputs, one row per query: name -> (what, width)."""
    if bp.route is None:
        return {}
    out = {bp.route[0]: ("router", bp.heads - bp.route[2])}
    opts = bp.route_opts
    if opts.weighted is not None:
        out[opts.weighted] = ("shared-head weights", bp.route[2])
    if opts.grouped is not None:
        out[opts.grouped] = ("group weights", 2)
    return out


def content_of(bp: BoundPattern, q, k):
    """(q, k repeated to q's heads) when the pattern's mask reads them, else None."""
    if not bp.content_dependent:
        return None
    return (q, k.repeat_interleave(q.shape[1] // k.shape[1], dim=1))


def check_tensors(bp: BoundPattern, q, k, v, q_start: int | None = None) -> None:
    """q, k, v against the pattern: kinds, ranks, dtypes, devices, batch, heads, tokens.
    With q_start, q holds queries q_start .. q_start + M - 1 of the query space."""
    at = bp.checked.span  # errors point at the pattern, or at its space or heads statement
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise InputError(f"{name} must be a torch.Tensor, not {type(t).__name__}", at)
        _dense(name, t, at)
        if t.dim() != 4:
            raise InputError(f"{name} must have 4 dimensions [batch, heads, tokens, dim], not "
                             f"{list(t.shape)}", at)
        if t.dtype not in FLOAT_DTYPES:
            raise InputError(f"{name} must be float16, bfloat16, float32 or float64, not "
                             f"{t.dtype}", at)
    if not (q.dtype == k.dtype == v.dtype):
        raise InputError(f"q, k, v must share one dtype, not {q.dtype}, {k.dtype}, {v.dtype}",
                         at)
    if not (q.device == k.device == v.device):
        raise InputError(f"q, k, v must be on one device, not {q.device}, {k.device}, "
                         f"{v.device}", at)
    if not (q.shape[0] == k.shape[0] == v.shape[0]):
        raise InputError(f"q, k, v must share the batch size, not {q.shape[0]}, {k.shape[0]},"
                         f" {v.shape[0]}", at)
    if k.shape[1] != v.shape[1] or k.shape[2] != v.shape[2]:
        raise InputError(f"k and v must have the same heads and tokens, not {list(k.shape)} "
                         f"and {list(v.shape)}", at)
    if k.shape[1] == 0 or q.shape[1] % k.shape[1]:
        raise InputError(f"query heads ({q.shape[1]}) must be a multiple of key/value heads "
                         f"({k.shape[1]})", at)
    if bp.channel:
        if q.shape[2] != k.shape[2]:
            raise InputError("channel attention needs q and k with the same positions, not "
                             f"{q.shape[2]} and {k.shape[2]}", at)
        if q.shape[3] != bp.nq or k.shape[3] != bp.nk or v.shape[3] != bp.nk:
            raise InputError(f"channel tokens: the last dimension must be the {bp.nq} channels"
                             f" of a group, not q {q.shape[3]}, k {k.shape[3]}, v "
                             f"{v.shape[3]}", at)
    else:
        if q.shape[3] != k.shape[3]:
            raise InputError(f"q and k must have the same head dim, not {q.shape[3]} and "
                             f"{k.shape[3]}", at)
        if q_start is not None:
            if not isinstance(q_start, int) or isinstance(q_start, bool) or q_start < 0:
                raise InputError(f"q_start must be a non-negative int, not {q_start!r}")
            if q_start + q.shape[2] > bp.nq:
                raise InputError(f"q holds queries {q_start} .. {q_start + q.shape[2] - 1}, "
                                 f"past the {bp.nq} queries of pattern '{bp.name}' "
                                 f"{_dims(bp.qshape)}", _space_span(bp, "qspace"))
        elif q.shape[2] != bp.nq:
            raise InputError(f"q has {q.shape[2]} tokens; pattern '{bp.name}' has {bp.nq} "
                             f"queries {_dims(bp.qshape)}", _space_span(bp, "qspace"))
        if k.shape[2] != bp.nk:
            raise InputError(f"k has {k.shape[2]} tokens; pattern '{bp.name}' has {bp.nk} keys "
                             f"{_dims(bp.kshape)}", _space_span(bp, "kspace"))
    if bp.channel and q.shape[2] == 0:
        raise InputError("channel tokens need at least one position (q, k and v have 0)", at)
    if not bp.channel and (q.shape[3] == 0 or v.shape[3] == 0):
        which = "q and k" if q.shape[3] == 0 else "v"
        raise InputError(f"{which} must have a head dim of at least 1, not 0", at)
    if bp.heads is not None and q.shape[1] != bp.heads:
        raise InputError(f"pattern '{bp.name}' is declared for {bp.heads} heads; q has "
                         f"{q.shape[1]}",
                         bp.checked.heads.span if bp.checked.heads is not None else at)


def check_options(bp: BoundPattern, q, k, opts) -> None:
    """The driver's options against the tensors (see semantics/attention.Options)."""
    kv = opts.key_valid
    if kv is not None:
        if not isinstance(kv, torch.Tensor) or kv.dtype != torch.bool:
            raise InputError("key_padding_mask must be a bool tensor [batch, keys] (True: a "
                             f"real token), not {getattr(kv, 'dtype', type(kv).__name__)}")
        if tuple(kv.shape) != (k.shape[0], k.shape[2]):
            raise InputError(f"key_padding_mask must have shape [{k.shape[0]}, {k.shape[2]}]"
                             f" (batch, keys), not {list(kv.shape)}")
        if kv.device != k.device:
            raise InputError(f"key_padding_mask is on {kv.device}, the tensors on {k.device}")
    p = opts.dropout_p
    if not isinstance(p, int | float) or isinstance(p, bool) or not 0.0 <= p < 1.0:
        raise InputError(f"dropout_p must be a number in [0, 1), not {p!r}")
    qs = opts.queries
    if qs is not None and (not isinstance(qs, torch.Tensor) or qs.dim() != 4
                           or qs.shape[0] != q.shape[0] or qs.shape[1] != q.shape[1]
                           or qs.shape[2] != k.shape[2] or qs.shape[3] != q.shape[3]):
        raise InputError(f"queries must be [{q.shape[0]}, {q.shape[1]}, {k.shape[2]}, "
                         f"{q.shape[3]}] (a query at every key position), not "
                         f"{list(getattr(qs, 'shape', []))}")


def _dense(name: str, t: torch.Tensor, span) -> None:
    """A tensor whose values can be read: dense (strided) and on a real device."""
    if t.is_nested or t.layout != torch.strided:
        layout = "nested" if t.is_nested else str(t.layout).replace("torch.", "")
        raise InputError(f"{name} must be a dense tensor, not a {layout} one (use "
                         ".to_dense())", span)
    if t.device.type == "meta":
        raise InputError(f"{name} is on the meta device, which holds no values", span)


def _space_span(bp: BoundPattern, which: str):
    sp = getattr(bp.checked, which)
    return sp.span if sp is not None else bp.checked.span


def _dims(s) -> str:
    return "(" + " x ".join(map(str, s)) + ")"
