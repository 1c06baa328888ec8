"""The standard patterns added for issue 13 (chunked_causal, longformer, bigbird, sliding_tile,
sliding_tile3d, alibi) and DaViT's channel attention as timm writes it, each against a
definition written here from its paper (or the reference code the paper ships). Nothing
here reads attndsl's internals: only compile, mask and op(...). The other backends are held
to the reference for these patterns in test_cpu.py and test_triton.py."""

from __future__ import annotations

import math
from itertools import product

import numpy as np
import pytest
import torch

import attndsl

F64 = torch.float64


def mask_of(file, pattern, **params):
    return attndsl.compile(f"patterns/{file}", pattern, **params).mask().numpy()


def pairs(n):
    q = np.arange(n).reshape(-1, 1)
    k = np.arange(n).reshape(1, -1)
    return q, k


# ------------------------------------------------------------------ chunked_causal (Llama 4)


@pytest.mark.parametrize("n,chunk", [(1, 1), (10, 3), (16, 4), (17, 16), (9, 20), (33, 1)])
def test_chunked_causal_is_causal_attention_inside_each_chunk(n, chunk):
    q, k = pairs(n)
    expect = (k <= q) & (q // chunk == k // chunk)
    got = mask_of("llm.attn", "chunked_causal", N=n, chunk=chunk)
    assert np.array_equal(got, expect)
    # the chunk boundaries: the first token of a chunk sees only itself
    for start in range(0, n, chunk):
        assert got[start].sum() == 1


# ------------------------------------------------------------------ longformer


def longformer_reference(n, window, globals_):
    """Longformer (arXiv 2004.05150): a sliding window of `window` tokens in total, half of
    it on each side (transformers' one-sided window attention_window // 2), plus global
    tokens that attend and are attended by all (symmetric global attention)."""
    one_side = window // 2
    m = np.zeros((n, n), dtype=bool)
    for i in range(n):
        for j in range(max(0, i - one_side), min(n, i + one_side + 1)):
            m[i, j] = True
    g = min(globals_, n)
    m[:g, :] = True
    m[:, :g] = True
    return m


@pytest.mark.parametrize("n,window,g", [(20, 2, 0), (20, 4, 2), (33, 8, 3), (7, 16, 1),
                                        (12, 6, 12)])
def test_longformer(n, window, g):
    got = mask_of("longdoc.attn", "longformer", N=n, window=window, globals=g)
    assert np.array_equal(got, longformer_reference(n, window, g))
    if g == 0 and n > window:  # an inner query sees window + 1 keys, itself included
        assert got[n // 2].sum() == window + 1


def test_longformer_window_must_be_even():
    with pytest.raises(attndsl.ConstraintError, match="window must be even and at least 2"):
        attndsl.compile("patterns/longdoc.attn", "longformer", N=16, window=5, globals=1)


# ------------------------------------------------------------------ bigbird


def hash32(x):
    """The integer hash docs/patterns.md defines for bigbird (bigbird's seeded draws)."""
    for _ in range(2):
        x = (((x >> 16) ^ x) * 0x45D9F3B) % (1 << 32)
    return (x >> 16) ^ x


def bigbird_blocks(nb, window, globals_, random, seed):
    """Per query block, the set of key blocks, written from BigBird's ITC description
    (arXiv 2007.14062, section 2 and appendix D): global blocks (first ceil(g/2) and last
    floor(g/2), BigBird's first and last block for g = 2) attend and are attended by all;
    every other query block attends its window and `random` blocks drawn among those that
    are neither global nor in its window (here: a list of candidates indexed by the hash)."""
    glob = set(range((globals_ + 1) // 2)) | set(range(nb - globals_ // 2, nb))
    out = []
    for i in range(nb):
        if i in glob:
            out.append(set(range(nb)))
            continue
        win = {j for j in range(nb) if abs(i - j) <= window // 2}
        cands = [j for j in range(nb) if j not in glob and j not in win]
        chosen = set()
        if cands:
            for r in range(random):
                chosen.add(cands[hash32(hash32(hash32(seed) ^ i) ^ r) % len(cands)])
        out.append(glob | win | chosen)
    return out


def bigbird_reference(n, block, window=3, globals_=2, random=3, seed=0):
    nb = -(-n // block)
    blocks = bigbird_blocks(nb, window, globals_, random, seed)
    m = np.zeros((n, n), dtype=bool)
    for i in range(n):
        for j in range(n):
            m[i, j] = j // block in blocks[i // block]
    return m


@pytest.mark.parametrize("params", [
    dict(N=64, block=4), dict(N=70, block=8, window=1, globals=0, random=2, seed=3),
    dict(N=96, block=4, window=5, globals=3, random=8, seed=12345),
    dict(N=40, block=8, window=3, globals=2, random=3, seed=7),     # 5 blocks: no candidates
    dict(N=120, block=4, window=3, globals=1, random=0)])
def test_bigbird_against_its_block_definition(params):
    got = mask_of("longdoc.attn", "bigbird", **params)
    ref = bigbird_reference(params["N"], params["block"], params.get("window", 3),
                            params.get("globals", 2), params.get("random", 3),
                            params.get("seed", 0))
    assert np.array_equal(got, ref)


def test_bigbird_seed_changes_only_the_random_blocks():
    a = mask_of("longdoc.attn", "bigbird", N=256, block=8, seed=0)
    b = mask_of("longdoc.attn", "bigbird", N=256, block=8, seed=1)
    c = mask_of("longdoc.attn", "bigbird", N=256, block=8, random=0)
    assert not np.array_equal(a, b)
    assert np.array_equal(a & c, c) and np.array_equal(b & c, c)
    # every non-global query block gets between 1 and `random` extra blocks (draws may repeat)
    extra = (a & ~c).reshape(32, 8, 32, 8).any(axis=(1, 3)).sum(1)
    assert extra[0] == 0 and extra[-1] == 0
    assert ((extra[1:-1] >= 1) & (extra[1:-1] <= 3)).all()
    assert np.array_equal(a, mask_of("longdoc.attn", "bigbird", N=256, block=8, seed=0))


# ------------------------------------------------------------------ sliding tile attention


def sta_reference(shape, tile, window):
    """STA (arXiv 2502.04507, the FlexAttention reference mask of its repository): per
    axis, the kernel centre is the query's tile clamped to [window // 2, tiles - 1 -
    window // 2]; a key tile within window // 2 of the centre is attended."""
    tile = tile if isinstance(tile, tuple) else (tile,) * len(shape)
    window = window if isinstance(window, tuple) else (window,) * len(shape)
    coords = list(product(*[range(s) for s in shape]))
    n = len(coords)
    m = np.ones((n, n), dtype=bool)
    for a, (s, t, w) in enumerate(zip(shape, tile, window)):
        tiles = -(-s // t)
        qt = np.array([c[a] // t for c in coords])
        centre = np.minimum(np.maximum(qt, w // 2), tiles - 1 - w // 2)
        m &= np.abs(centre[:, None] - qt[None, :]) <= w // 2
    return m


@pytest.mark.parametrize("H,W,tile,window", [(8, 8, 2, 3), (9, 13, (2, 3), 3), (6, 12, 3, (1, 3)),
                                             (8, 8, 4, 3), (5, 7, 1, 5)])
def test_sliding_tile(H, W, tile, window):
    got = mask_of("sta.attn", "sliding_tile", H=H, W=W, tile=tile, window=window)
    assert np.array_equal(got, sta_reference((H, W), tile, window))


def test_sliding_tile_counts_when_tiles_divide_the_grid():
    # HunyuanVideo-style: every query sees window^2 tiles of tile^2 tokens
    got = mask_of("sta.attn", "sliding_tile", H=12, W=16, tile=4, window=3)
    assert (got.sum(1) == 9 * 16).all()


@pytest.mark.parametrize("shape,tile,window", [((4, 6, 6), (2, 3, 3), (1, 3, 1)),
                                               ((3, 5, 4), 2, 3), ((6, 4, 4), (2, 2, 2),
                                                                   (3, 1, 1))])
def test_sliding_tile3d(shape, tile, window):
    T, H, W = shape
    got = mask_of("sta.attn", "sliding_tile3d", T=T, H=H, W=W, tile=tile, window=window)
    assert np.array_equal(got, sta_reference(shape, tile, window))


def test_sliding_tile_window_must_be_odd():
    with pytest.raises(attndsl.ConstraintError, match="window must be odd on axis 1"):
        attndsl.compile("patterns/sta.attn", "sliding_tile", H=8, W=8, tile=2, window=(3, 2))


# ------------------------------------------------------------------ alibi


def paper_slopes(n):
    """ALiBi's head slopes (Press et al., arXiv 2108.12409, section 3): a geometric sequence
    starting at 2^(-8/n) with that ratio for n a power of two; otherwise the slopes of the
    closest smaller power of two, then every other slope of the sequence for twice it."""
    def geometric(m):
        start = 2.0 ** (-8.0 / m)
        return [start ** (i + 1) for i in range(m)]
    if math.log2(n).is_integer():
        return geometric(n)
    low = 2 ** math.floor(math.log2(n))
    return geometric(low) + paper_slopes(2 * low)[0::2][:n - low]


def test_paper_slopes_examples():
    assert paper_slopes(8) == [2.0 ** -i for i in range(1, 9)]  # the paper's 1/2 ... 1/256
    assert paper_slopes(4) == [2.0 ** -2, 2.0 ** -4, 2.0 ** -6, 2.0 ** -8]
    assert paper_slopes(6)[4:] == [2.0 ** -1, 2.0 ** -3]


@pytest.mark.parametrize("heads", [1, 2, 3, 4, 5, 6, 8, 12])
def test_alibi_scores_use_the_paper_slopes(heads):
    n, d = 9, 8
    op = attndsl.compile("patterns/llm.attn", "alibi", N=n, heads=heads)
    g = torch.Generator().manual_seed(heads)
    q, k, v = (torch.randn(2, heads, n, d, generator=g, dtype=F64) for _ in range(3))
    i = torch.arange(n)
    dist = (i.view(-1, 1) - i.view(1, -1)).to(F64)
    slopes = torch.tensor(paper_slopes(heads), dtype=F64).view(-1, 1, 1)
    scores = q @ k.transpose(-1, -2) / math.sqrt(d) - slopes * dist
    scores = scores.masked_fill(i.view(1, -1) > i.view(-1, 1), -math.inf)
    expect = torch.softmax(scores, -1) @ v
    torch.testing.assert_close(op(q, k, v, backend="reference"), expect, rtol=1e-12,
                               atol=1e-12)
    torch.testing.assert_close(op(q, k, v, backend="cpu"), expect, rtol=1e-9, atol=1e-9)


# ------------------------------------------------------------------ DaViT's channel attention


def timm_channel_attention(q, k, v, scale):
    """timm's davit.ChannelAttention after its qkv projection ([B, heads, N, head_dim]): the
    softmax runs over k^T v and is applied to q."""
    attn = ((k * scale).transpose(-1, -2) @ v).softmax(dim=-1)
    return (attn @ q.transpose(-1, -2)).transpose(-1, -2)


def test_davit_channel_attention_maps_timm_qkv_as_k_v_q():
    C, groups, n = 32, 4, 10
    op = attndsl.compile("patterns/davit.attn", "channel_group", C=C, groups=groups)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, groups, n, C // groups, generator=g, dtype=F64)
               for _ in range(3))
    expect = timm_channel_attention(q, k, v, (C // groups) ** -0.5)
    torch.testing.assert_close(op(k, v, q, backend="reference"), expect)   # the mapping
    torch.testing.assert_close(op(k, v, q, backend="cpu"), expect)
    assert not torch.allclose(op(q, k, v, backend="reference"), expect)  # passed straight in


# ------------------------------------------------------------------ na1d with 1-tuples


def test_na1d_takes_one_item_tuples_like_natten():
    plain = attndsl.compile("patterns/neighborhood.attn", "na1d", N=16, kernel=5, dilation=2,
                            stride=2, causal=True)
    tupled = attndsl.compile("patterns/neighborhood.attn", "na1d", N=16, kernel=(5,),
                             dilation=[2], stride=(2,), causal=(True,))
    assert tupled.params == plain.params
    assert torch.equal(tupled.mask(), plain.mask())
    with pytest.raises(attndsl.ParameterError) as info:
        attndsl.compile("patterns/neighborhood.attn", "na1d", N=16, kernel=(5, 5))
    assert info.value.message == "parameter 'kernel' must be int, not a sequence"
