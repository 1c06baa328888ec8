"""The KV cache of generation: what an attention layer keeps of the tokens it has seen."""

from __future__ import annotations

import weakref

import torch

from attndsl.errors import InputError


class KVCache:
    """Keys and values of the tokens seen so far, for every attention layer of a model: pass
    one cache to every call of the model (`model(x, cache=cache)`), each layer keeps its own
    slot. Slots grow by doubling their capacity, so appending a token copies nothing already
    held; while gradients are recorded they grow by concatenation instead (autograd sees
    every step). A cache holds one batch: start a new one (or `reset()`) for the next."""

    def __init__(self):
        self._slots: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def slot(self, layer) -> Slot:
        """The slot of one layer (created empty on first use)."""
        if layer not in self._slots:
            self._slots[layer] = Slot()
        return self._slots[layer]

    def __len__(self) -> int:
        """Tokens held (by every layer alike once a step is done)."""
        return max((s.length for s in self._slots.values()), default=0)

    def reset(self) -> None:
        self._slots = weakref.WeakKeyDictionary()

    def __repr__(self) -> str:
        return f"<attndsl.nn.KVCache: {len(self)} tokens, {len(self._slots)} layers>"


class Slot:
    """One layer's keys [B, Hkv, L, D], values, optionally the queries of every position
    (patterns that pool queries or read them to choose keys) and which keys are real
    tokens ([B, L] bool, None while every key is)."""

    def __init__(self):
        self.length = 0
        self._k = self._v = self._q = self._valid = None

    def _grow(self, buf, new):
        """buf with `new` appended on the token axis (-2 for tensors, -1 for the mask)."""
        axis = new.dim() - (1 if new.dtype == torch.bool else 2)
        if buf is None:
            return new if torch.is_grad_enabled() else _with_room(new, axis, new.shape[axis])
        if buf.shape[:axis] != new.shape[:axis] or buf.shape[axis + 1:] != new.shape[axis + 1:]:
            raise InputError(f"the cache holds tensors {list(buf.shape)}; this step's "
                             f"{list(new.shape)} do not continue them (a new batch needs a "
                             "new KVCache)")
        if buf.dtype != new.dtype or buf.device != new.device:
            raise InputError(f"the cache holds {buf.dtype} on {buf.device}; this step gives "
                             f"{new.dtype} on {new.device}")
        if torch.is_grad_enabled() and (new.requires_grad or buf.requires_grad):
            return torch.cat([buf.narrow(axis, 0, self.length), new], dim=axis)
        need = self.length + new.shape[axis]
        if need > buf.shape[axis]:
            buf = _with_room(buf.narrow(axis, 0, self.length), axis, need)
        buf.narrow(axis, self.length, new.shape[axis]).copy_(new)
        return buf

    def append(self, k, v, q=None, valid=None):
        """Add this step's tokens; returns (keys, values, queries, valid) of every token held
        (queries and valid None where not kept)."""
        if self.length and (self._q is None) != (q is None):
            raise InputError("this layer's cache was started without queries")
        if valid is not None and self._valid is None and self.length:
            self._valid = torch.ones(k.shape[0], self.length, dtype=torch.bool, device=k.device)
        if valid is None and self._valid is not None:
            valid = torch.ones(k.shape[0], k.shape[2], dtype=torch.bool, device=k.device)
        self._k, self._v = self._grow(self._k, k), self._grow(self._v, v)
        if q is not None:
            self._q = self._grow(self._q, q)
        if valid is not None:
            self._valid = self._grow(self._valid, valid)
        self.length += k.shape[2]
        n = self.length
        return (self._k.narrow(2, 0, n), self._v.narrow(2, 0, n),
                None if self._q is None else self._q.narrow(2, 0, n),
                None if self._valid is None else self._valid.narrow(1, 0, n))


def _with_room(t, axis: int, need: int):
    """A buffer holding t with room for at least `need` entries on `axis` (a power of two)."""
    cap = 1 << max(4, (need - 1).bit_length())
    shape = list(t.shape)
    shape[axis] = cap
    out = t.new_zeros(shape)
    out.narrow(axis, 0, t.shape[axis]).copy_(t)
    return out
