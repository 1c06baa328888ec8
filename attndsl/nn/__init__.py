"""Layers over compiled patterns (docs/model.md): `Attention` and the `KVCache` of
generation."""

from attndsl.nn.attention import Attention
from attndsl.nn.cache import KVCache

__all__ = ["Attention", "KVCache"]
