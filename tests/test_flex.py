"""FlexAttention fed by attndsl: BlockMasks built from attndsl's tables (row-major and tiled)
against a block-level reading of independent dense masks (tests/independent.py), their
transposed tables, the generated mask_mod / score_mod, permute / unpermute, backend='flex'
(compiled FlexAttention: one CPU compile here, forward only) and `--emit flex` modules
whose block_mask() reads the tables shipped beside them."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
import independent as ind  # noqa: E402
from sources import MIXED  # noqa: E402

import attndsl  # noqa: E402

flex_mod = pytest.importorskip("torch.nn.attention.flex_attention")

PER_HEAD = MIXED

DOC = np.array([0] * 20 + [1] * 17 + [2] * 13)
CASES = [
    ("patterns/sliding.attn", "sliding_window", dict(N=70, window=9), {},
     lambda: ind.sliding_window(70, 9)),
    ("patterns/power.attn", "power_attention", dict(N=100, block=8), {},
     lambda: ind.power_attention(100, 8)),
    ("patterns/neighborhood.attn", "na2d", dict(H=13, W=11, kernel=5), {},
     lambda: ind.na2d(13, 11, 5)),
    ("patterns/neighborhood.attn", "na3d", dict(T=3, H=6, W=5, kernel=3, dilation=(1, 2, 1)),
     {}, lambda: ind.na3d(3, 6, 5, 3, dilation=(1, 2, 1))),
    ("patterns/document.attn", "document_causal", dict(N=50), {"doc": torch.tensor(DOC)},
     lambda: ind.document_causal(50, DOC)),
    (PER_HEAD, "mixed", dict(N=40), {}, None),
]


def per_head_mask(n):
    q, k = np.arange(n)[:, None], np.arange(n)[None, :]
    a = (k <= q) & (q - k < 8)
    b = (np.abs(q - k) < 3) | (k < 4)
    return np.stack([a, a, b, b])


def decode(num, idx, cols):
    """Flex's (num_blocks [.., rows], indices [.., rows, cols]) as a dense bool matrix."""
    out = torch.zeros(*num.shape, cols, dtype=torch.bool)
    for pos in np.ndindex(*num.shape):
        n = int(num[pos])
        row = idx[pos][:n].long()
        assert len(set(row.tolist())) == n  # no block listed twice
        out[pos][row] = True
    return out


def expected_blocks(mask, perm, block):
    """(any, full) per block pair of positions: perm[i] = token at position i (-1 padding);
    FULL: every valid query attends every key, and the key block has no padding."""
    L = len(perm)
    nb = -(-L // block)
    pp = np.full(nb * block, -1)
    pp[:L] = perm
    valid = pp >= 0
    m = np.zeros(mask.shape[:-2] + (nb * block, nb * block), dtype=bool)
    t = np.clip(pp, 0, None)
    m[...] = mask[..., t[:, None], t[None, :]] & valid[:, None] & valid[None, :]
    blocks = m.reshape(*m.shape[:-2], nb, block, nb, block)
    anyb = blocks.any(axis=(-3, -1))
    allb = (blocks | ~valid.reshape(nb, block)[:, :, None, None]).all(axis=(-3, -1))
    allb &= valid.reshape(nb, block).all(axis=1)[None, :]
    return torch.from_numpy(anyb), torch.from_numpy(anyb & allb)


@pytest.mark.parametrize("order", ["row-major", "tiled"])
@pytest.mark.parametrize("case", CASES, ids=[c[1] for c in CASES])
def test_block_mask_equals_an_independent_block_reading(case, order):
    file, name, params, inputs, dense = case
    op = attndsl.compile(file, name, **params)
    bm = op.block_mask(order=order, block_size=16, **inputs)
    assert isinstance(bm, flex_mod.BlockMask) and bm.BLOCK_SIZE == (16, 16)
    n = op.bound.nq
    mask = per_head_mask(n) if dense is None else dense()
    if order == "tiled":  # where each position's token is, read through the public permute
        tok = torch.arange(1, n + 1, dtype=torch.float64).view(1, 1, n, 1)
        if len(op.query_shape) > 1:
            tok = tok.view(1, 1, *op.query_shape, 1)
        perm = op.permute(tok, block_size=16, **inputs).view(-1).long().numpy() - 1
    else:
        perm = np.arange(n)
    assert bm.seq_lengths == (len(perm), len(perm))
    want_any, want_full = expected_blocks(mask.reshape(*mask.shape[:-2], n, n)
                                          if mask.ndim > 2 else mask, perm, 16)
    nb = want_any.shape[-1]
    part = decode(bm.kv_num_blocks, bm.kv_indices, nb)
    full = decode(bm.full_kv_num_blocks, bm.full_kv_indices, nb)
    heads = part.shape[1]
    assert torch.equal(part[0] | full[0], want_any.expand(heads, nb, nb))
    assert torch.equal(full[0], want_full.expand(heads, nb, nb))
    assert not (part & full).any()
    # the backward's tables: attndsl's own transposition, equal to the transposed forward
    qpart = decode(bm.q_num_blocks, bm.q_indices, nb)
    qfull = decode(bm.full_q_num_blocks, bm.full_q_indices, nb)
    assert torch.equal(qpart, part.transpose(-1, -2))
    assert torch.equal(qfull, full.transpose(-1, -2))
    assert torch.equal(bm.to_dense().bool(), part | full)


def test_tiled_order_lists_fewer_blocks_on_2d_neighbourhoods():
    op = attndsl.compile("patterns/neighborhood.attn", "na2d", H=32, W=32, kernel=7)
    tiled, rm = op.block_mask(order="tiled", block_size=16), op.block_mask(block_size=16)
    counts = [int((b.kv_num_blocks + b.full_kv_num_blocks).sum()) for b in (tiled, rm)]
    assert counts[0] * 1.5 < counts[1], counts


GRID_BIAS = """
pattern nb(H: int, W: int) {
    space grid(H, W)
    attend neighborhood(7)
    bias -0.5 * float(abs(q.y - k.y)) + 0.25 * float(k.x)
}"""


@pytest.mark.parametrize("src,params,order", [(PER_HEAD, dict(N=40), "row-major"),
                                              (GRID_BIAS, dict(H=32, W=32), "tiled")],
                         ids=["per-head", "grid-tiled"])
def test_mask_mod_and_score_mod_with_eager_flex(src, params, order):
    """The attached mask_mod and the score_mod (bias, softcap, per head; read through the
    tiled order) in Flex's eager path, which evaluates them densely: equal to the
    reference backend."""
    op = attndsl.compile(src, **params)
    bm = op.block_mask(order=order, block_size=16)
    sm = op.score_mod(order=order, block_size=16, softcap=3.0 if order == "tiled" else None)
    n = op.bound.nq
    q, k, v = (torch.randn(1, 4, n, 8, generator=torch.Generator().manual_seed(s))
               for s in range(3))
    qp, kp, vp = (op.permute(x, block_size=16) for x in (q, k, v)) if order == "tiled" else (
        q, k, v)
    if order == "tiled":
        assert qp.shape[2] > n or not torch.equal(qp[:, :, :n], q)  # really reordered
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = flex_mod.flex_attention(qp, kp, vp, block_mask=bm, score_mod=sm)
    if order == "tiled":
        out = op.unpermute(out, block_size=16)
    want = op(q, k, v, backend="reference", softcap=3.0 if order == "tiled" else None)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    assert attndsl.compile("patterns/sliding.attn", "sliding_window", N=8,
                           window=3).score_mod() is None
    capped = attndsl.compile("patterns/sliding.attn", "sliding_window", N=8,
                             window=3).score_mod(softcap=2.0)
    s = torch.tensor(10.0)
    z = torch.tensor(0)
    assert torch.allclose(capped(s, z, z, z, z), 2.0 * torch.tanh(s / 2.0))


def test_permute_unpermute_roundtrip_and_errors():
    op = attndsl.compile("patterns/neighborhood.attn", "na2d", H=9, W=10, kernel=3)
    x = torch.randn(2, 3, 9, 10, 4)
    y = op.permute(x, block_size=16)
    assert y.shape[2] >= 90
    torch.testing.assert_close(op.unpermute(y, block_size=16), x.flatten(2, 3))
    with pytest.raises(attndsl.InputError, match="expected 90 tokens on axis 2, not 7"):
        op.permute(torch.randn(1, 1, 7, 4))
    with pytest.raises(attndsl.ParameterError, match="order must be 'row-major' or 'tiled'"):
        op.block_mask(order="zigzag")
    with pytest.raises(attndsl.ParameterError, match="block_size must be a power of two"):
        op.block_mask(block_size=100)
    comb = attndsl.compile("patterns/combiner.attn", "combiner_fixed", N=32, span=8)
    with pytest.raises(attndsl.UnsupportedError, match="mask_mod cannot express"):
        comb.block_mask()


def test_backend_flex_compiled_on_cpu_equals_reference():
    """torch.compile(flex_attention) with attndsl's tiled tables (one compile, forward)."""
    op = attndsl.compile("patterns/neighborhood.attn", "na2d", kernel=5)
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 13, 11, 16, generator=gen)
    k, v = (torch.randn(2, 2, 13, 11, 16, generator=gen) for _ in range(2))  # GQA
    with torch.no_grad():
        out = op(q, k, v, backend="flex", softcap=3.0)
    ref = op(q, k, v, backend="reference", softcap=3.0)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)
    with pytest.raises(attndsl.UnsupportedError, match="no backward on the CPU"):
        op(q.requires_grad_(), k, v, backend="flex")


def test_emit_flex_module_reads_its_shipped_tables(tmp_path):
    from attndsl.cli import main
    doc = ",".join(["0"] * 150 + ["1"] * 150)
    assert main(["compile", "patterns/document.attn", "-p", "document_causal", "--set",
                 "N=300", "--input", f"doc={doc}", "-o", str(tmp_path), "--emit",
                 "flex"]) == 0
    names = sorted(p.name for p in tmp_path.iterdir())
    assert "attn_document_causal_flex.py" in names and "attn_document_causal_flex.npz" in names
    text = (tmp_path / "attn_document_causal_flex.py").read_text()
    assert "create_block_mask" not in text
    script = (
        "import torch, numpy as np, attn_document_causal_flex as m\n"
        "from torch.nn.attention.flex_attention import create_block_mask\n"
        "m.set_inputs(doc=torch.tensor([0] * 150 + [1] * 150))\n"
        "bm = m.block_mask()\n"
        "ref = create_block_mask(m.mask_mod, None, None, 300, 300, device='cpu',"
        " _compile=False)\n"
        "assert torch.equal(bm.to_dense(), ref.to_dense()), 'same blocks as Flex'\n"
        "print(bm.BLOCK_SIZE, int(bm.full_kv_num_blocks.sum()), int(bm.kv_num_blocks.sum()))\n")
    r = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.split()[0] == "(128,"
