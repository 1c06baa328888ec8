"""Layers over compiled patterns (docs/model.md): `Attention`, the `KVCache` of
generation, and the seed families' layers with their official modules' learned parts."""

from attndsl.nn.attention import Attention
from attndsl.nn.cache import KVCache
from attndsl.nn.seeds import DHSAAttention, MoHAttention, TransNeXtAttention

__all__ = ["Attention", "DHSAAttention", "KVCache", "MoHAttention", "TransNeXtAttention"]
