"""attndsl as a Hugging Face transformers attention implementation (`pip install
attndsl[hf]`):

    attndsl.integrations.transformers.register("power", "power.attn", "power_attention")
    model = AutoModelForCausalLM.from_pretrained(..., attn_implementation="power")

`register` adds an attention function to transformers' AttentionInterface and a mask
function to its AttentionMaskInterface under one name. The mask function does not build a
mask: it hands the attention the 2D padding mask and the cache offsets (`HFMask`), so left
padding, the KV cache and sliding-window cache layers reach the op as `key_padding_mask`
and `q_start`. The attention function runs the layer's pattern as a family op (sizes from
the tensors) with the model's scaling, softcap (Gemma 2), dropout and grouped kv heads.

Pattern parameters the layer defines come from the model unless given: `window` from the
layer's sliding window, `chunk` from the config's `attention_chunk_size`. `layers=` chooses
the pattern per layer; a layer mapped to None keeps the model's own attention (causal, or
causal within the layer's sliding window), computed by attndsl too.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

import attndsl
from attndsl import caches
from attndsl.errors import AttnNameError, ParameterError, UnsupportedError, did_you_mean

# pattern parameter -> where a transformers layer keeps its value
MODEL_PARAMS = ("window", "chunk")
CAUSAL = """## The model's own causal attention.
pattern causal(N: int) {
    space seq(N)
    attend k <= q
}"""
BUILTIN_NAMES = ("eager", "sdpa", "flex_attention", "flash_attention_2", "flash_attention_3",
                 "flash_attention_4")


@dataclass(frozen=True, eq=False)
class HFMask:
    """What the registered mask function gives each layer instead of a mask: the 2D padding
    mask ([B, seen + new tokens], True: a real token, or None), the absolute position of the
    first query and of the first key the cache returns (a sliding-window cache layer keeps
    only the last window - 1 keys), and the number of keys."""

    key_valid: torch.Tensor | None
    q_offset: int
    kv_offset: int
    kv_length: int
    q_length: int = 0
    batch: int = 0

    # generate() prepares the masks of a static cache ahead of the forward and hands them
    # back as `attention_mask`: it calls .contiguous() and reads .ndim / .shape of a mask
    ndim = 4

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (self.batch, 1, self.q_length, self.kv_length)

    def contiguous(self) -> HFMask:
        return self


@dataclass(frozen=True)
class Spec:
    """One layer's pattern: source (a path, a standard file name or .attn text), pattern
    name, given parameter values; `own`: the model's own causal attention."""

    source: str | os.PathLike | None
    pattern: str | None
    params: tuple = ()
    own: bool = False


def register(name: str, source, pattern: str | None = None, *,
             layers: dict | Callable | None = None, **params) -> None:
    """Register attndsl as attention implementation `name` of transformers (attention and
    mask function): `source`/`pattern`/`params` for every layer, or per layer through
    `layers`: a dict {layer index: (source, pattern, params) or None} (other layers use the
    default; None keeps the model's own attention), or a function (layer index, attention
    module) -> (source, pattern, params) or None. `source=None` makes the model's own
    attention the default."""
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface
    except ImportError:
        raise UnsupportedError("attndsl.integrations.transformers needs transformers: pip "
                               "install 'attndsl[hf]'") from None
    if not isinstance(name, str) or not name or name in BUILTIN_NAMES or "|" in name:
        raise ParameterError(f"the attention implementation needs a new name (not one of "
                             f"transformers' own: {', '.join(BUILTIN_NAMES)}), not {name!r}")
    default = Spec(None, None, (), True) if source is None else _spec(
        (source, pattern, params), "the default pattern")
    if layers is not None and not (isinstance(layers, dict) or callable(layers)):
        raise ParameterError("layers must be a dict {layer index: (source, pattern, params) "
                             "or None} or a function (index, module) -> ..., not "
                             f"{type(layers).__name__}")
    table = None
    if isinstance(layers, dict):
        table = {}
        for idx, value in layers.items():
            if not isinstance(idx, int) or isinstance(idx, bool) or idx < 0:
                raise ParameterError(f"layers keys are layer indices (ints >= 0), not {idx!r}")
            table[idx] = _spec(value, f"layer {idx}")

    def spec_of(module) -> Spec:
        idx = getattr(module, "layer_idx", None)
        if table is not None:
            return table.get(idx, default)
        if callable(layers):
            return _spec(layers(idx, module), f"layer {idx}")
        return default

    def attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                  softcap=None, sliding_window=None, **kwargs):
        spec = spec_of(module)
        window = sliding_window if sliding_window is not None else getattr(
            module, "sliding_window", None)
        chunk = getattr(getattr(module, "config", None), "attention_chunk_size", None)
        op = _op(spec, {"window": window, "chunk": chunk}, getattr(module, "layer_idx", None))
        out = _attend(op, query, key, value, attention_mask, float(dropout or 0.0), scaling,
                      softcap)
        return out.transpose(1, 2).contiguous(), None

    AttentionInterface.register(name, attention)
    AttentionMaskInterface.register(name, padding_mask)


def padding_mask(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, mask_function=None,
                 attention_mask=None, **kwargs) -> HFMask:
    """The mask function: no mask is built (the pattern is the mask); the padding and the
    offsets travel to the attention."""
    if isinstance(attention_mask, HFMask):  # made ahead by generate() (static caches)
        return attention_mask
    valid = None
    if attention_mask is not None:
        valid = attention_mask.to(torch.bool)
        if bool(valid.all()):
            valid = None
    return HFMask(valid, int(q_offset), int(kv_offset), int(kv_length), int(q_length),
                  int(batch_size))


def _spec(value, where: str) -> Spec:
    if value is None:
        return Spec(None, None, (), True)
    if isinstance(value, str | os.PathLike):
        value = (value,)
    if not isinstance(value, tuple | list) or not 1 <= len(value) <= 3:
        raise ParameterError(f"{where}: expected (source, pattern, params) or None, not "
                             f"{value!r}")
    source, pattern, params = (tuple(value) + (None, None))[:3]
    params = dict(params or {})
    checked = attndsl.check(source)
    if pattern is None:
        if len(checked) != 1:
            raise ParameterError(f"{where}: the source defines {len(checked)} patterns "
                                 f"({', '.join(checked)}); name one")
        pattern = next(iter(checked))
    if pattern not in checked:
        raise AttnNameError(f"{where}: no pattern '{pattern}'" + did_you_mean(
            pattern, list(checked)))
    names = [p.name for p, _ in checked[pattern].params]
    for k in params:
        if k not in names:
            raise ParameterError(f"{where}: pattern '{pattern}' has no parameter '{k}'"
                                 + did_you_mean(k, names))
    return Spec(source, pattern, tuple(sorted(params.items())))


def _op(spec: Spec, model: dict, layer) -> attndsl.Op:
    """The layer's family op: given parameters, then the model's (window, chunk)."""
    if spec.own:
        if model["window"] is not None:
            spec = Spec("sliding.attn", "sliding_window", (("window", int(model["window"])),))
        else:
            spec = Spec(CAUSAL, "causal")
    checked = attndsl.check(spec.source)[spec.pattern]
    params = dict(spec.params)
    for p, _ in checked.params:
        if p.name in MODEL_PARAMS and p.name not in params and model[p.name] is not None:
            params[p.name] = int(model[p.name])
    key = (str(spec.source), spec.pattern, tuple(sorted(params.items())))

    def build():
        try:
            op = attndsl.compile(spec.source, spec.pattern, **params)
        except ParameterError as e:
            raise ParameterError(f"layer {layer}: {e.message}; the model gives "
                                 f"{_given(model)}: pass it to register()", e.span) from None
        if len(op.family.q_axes) != 1 or not op.family.shared or len(op.sizes) != 1:
            raise UnsupportedError(f"pattern '{op.name}' is not self-attention over one "
                                   "sequence (space seq(N)); a language model's layers need "
                                   "one", op.family.checked.span)
        return op
    return caches.HF_OPS.get_or_create(key, build)


def _given(model: dict) -> str:
    have = [f"{k}={v}" for k, v in model.items() if v is not None]
    return ", ".join(have) if have else "no pattern parameter"


def _attend(op, q, k, v, mask, dropout, scaling, softcap):
    """op over the layer's q [B, H, M, D] and the keys the cache returned, placed at their
    absolute positions."""
    if isinstance(mask, torch.Tensor):
        raise UnsupportedError("the model passed a ready-made attention mask tensor; attndsl "
                               "takes the pattern as the mask and the 2D padding mask "
                               "(attention_mask=[batch, tokens]) for padding")
    B, _, M, _ = q.shape
    nk = k.shape[2]
    if mask is None:  # no mask function ran: all keys real, the queries are the last M
        mask = HFMask(None, nk - M, 0, nk)
    off = mask.kv_offset
    n = off + nk
    valid = mask.key_valid
    if valid is not None or off:
        valid = _valid(valid, B, n, q.device)
    if off:  # a sliding-window cache dropped keys 0 .. off - 1: the pattern must not need them
        _check_dropped(op, n, mask.q_offset, M, off)
        valid[:, :off] = False
        pad = k.new_zeros(B, k.shape[1], off, k.shape[3])
        k, v = torch.cat([pad, k], 2), torch.cat([pad.new_zeros(B, v.shape[1], off,
                                                                 v.shape[3]), v], 2)
    # a static cache holds slots past the new tokens: padding (the 2D mask ends before them)
    q_start = mask.q_offset if (mask.q_offset or M != n) else None
    if q_start is not None and valid is None and q_start + M != n:
        valid = _valid(None, B, n, q.device)
        valid[:, q_start + M:] = False
    return op(q, k, v, q_start=q_start, key_padding_mask=valid, scale=scaling,
              softcap=softcap, dropout_p=dropout)


def _valid(valid, B: int, n: int, device) -> torch.Tensor:
    """[B, n] real keys at absolute positions 0 .. n-1 (a shorter padding mask ends with
    padding, as transformers pads it)."""
    out = torch.zeros(B, n, dtype=torch.bool, device=device)
    if valid is None:
        out[:] = True
        return out
    w = min(n, valid.shape[-1])
    out[:, :w] = valid[:, :w].to(device)
    return out


def _check_dropped(op, n: int, q_start: int, m: int, dropped: int) -> None:
    """Queries q_start .. q_start + m - 1 must attend no key before `dropped`."""
    from attndsl.semantics.inputs import validate
    from attndsl.semantics.masks import dense_mask
    bp = op.bind(N=n) if op.sizes else op.bound
    rows = dense_mask(bp, validate(bp, {}, for_mask=True), None, (q_start, m))
    if bool(rows[..., :dropped].any()):
        raise UnsupportedError(
            f"pattern '{op.name}' attends keys more than the model's sliding window back, "
            "which this layer's cache no longer keeps; give the model a cache that keeps "
            "every key (past_key_values=DynamicCache()) or set config.sliding_window=None",
            op.family.checked.span)
