"""The model `attndsl eval` trains: a small pre-norm transformer whose attention layers are
`attndsl.nn.Attention` layers over the patterns under test (one pattern per layer), with
learned absolute positions, a GELU MLP per block, and logits computed at answer positions
only (the loss counts nothing else)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from attndsl.errors import ParameterError
from attndsl.nn import Attention

MLP_RATIO = 4


def attention_for(op, dim: int, heads: int, backend: str, import_roots=()) -> Attention:
    """An Attention layer over the pattern of `op`, with the parameters `op` was compiled
    with and its block sizes. The layer compiles the pattern again from its file (or from
    the source text when it came from text or the file is gone), so the model pickles."""
    cp = op.family.checked
    path = None if cp.file.startswith("<") else Path(cp.file)
    src = path if path is not None and path.is_file() else cp.text
    layer = Attention(dim, heads, src, cp.name, backend=backend, import_roots=import_roots,
                      **dict(op.family.given))
    if layer.op.family.checked.key[-1] != cp.key[-1]:
        raise ParameterError(f"'{cp.file}' (or a file it imports) changed since pattern "
                             f"'{cp.name}' was compiled: compile it again")
    layer.op.options(block_q=op.block_q, block_k=op.block_k)
    return layer


class Block(nn.Module):
    def __init__(self, dim: int, attn: Attention):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = attn
        self.mlp = nn.Sequential(nn.Linear(dim, MLP_RATIO * dim), nn.GELU(),
                                 nn.Linear(MLP_RATIO * dim, dim))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TinyLM(nn.Module):
    """Token and position embeddings, one block per attention layer, a final norm and a
    vocabulary head applied where `answers` is True."""

    def __init__(self, vocab: int, seq_len: int, dim: int, attns: list[Attention]):
        super().__init__()
        self.tok = nn.Embedding(vocab, dim)
        self.pos = nn.Embedding(seq_len, dim)
        self.blocks = nn.ModuleList(Block(dim, a) for a in attns)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab)

    def forward(self, ids: torch.Tensor, answers: torch.Tensor) -> torch.Tensor:
        """ids int64 [B, N], answers bool [B, N] -> logits [A, vocab] in row-major order."""
        x = self.tok(ids) + self.pos(torch.arange(ids.shape[1]))
        for b in self.blocks:
            x = b(x)
        return self.head(self.norm(x[answers]))


def dense_flops_per_sequence(vocab: int, seq_len: int, dim: int, layers: int,
                             answers: int) -> float:
    """Forward FLOPs of the linear layers for one sequence (2 per multiply-add): q, k, v
    and output projections and the MLP at every token, the head at answer positions."""
    per_token = layers * (4 + 2 * MLP_RATIO) * dim * dim
    return 2.0 * (seq_len * per_token + answers * dim * vocab)
