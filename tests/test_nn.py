"""attndsl.nn.Attention against a timm-style multi-head attention written here (qkv split as
(3, heads, head_dim), masked softmax from tests/independent.py), on every backend; decoding
with the KV cache; padding; pickling; torch.compile of a model."""

from __future__ import annotations

import copy
import io
import os
import pickle
import sys

import pytest
import torch
import torch.nn.functional as F

import attndsl
from attndsl.errors import InputError, ParameterError, UnsupportedError
from attndsl.nn import Attention, KVCache

sys.path.insert(0, os.path.dirname(__file__))
import independent as ind  # noqa: E402

BACKENDS = ["reference", "cpu", "triton"]
DT = {"reference": torch.float64, "cpu": torch.float64, "triton": torch.float32}
TOL = {"reference": 1e-12, "cpu": 1e-10, "triton": 2e-5}


def rand(*shape, dtype=torch.float64, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def close(a, b, backend):
    torch.testing.assert_close(a.double(), b.double(), atol=TOL[backend], rtol=TOL[backend])


def layer(*args, backend="cpu", dtype=torch.float64, seed=0, **kw):
    torch.manual_seed(seed)
    m = Attention(*args, backend=backend, **kw).to(dtype)
    if backend == "triton":
        m.op.options(block_q=16, block_k=16)
    return m


def timm_attention(m: Attention, x, mask, context=None):
    """timm's Attention computation from the layer's weights: tokens [B, N, dim]."""
    b, n, dim = x.shape
    h, hd = m.heads, m.head_dim
    if m.kv_heads == m.heads and context is None:
        q, k, v = (m.qkv(x).reshape(b, n, 3, h, hd).permute(2, 0, 3, 1, 4))
    else:
        src = x if context is None else context
        if m.kv_heads == m.heads:
            w, bias = m.qkv.weight, m.qkv.bias
            q = F.linear(x, w[:dim], bias[:dim])
            kv = F.linear(src, w[dim:], bias[dim:])
        else:
            q, kv = m.q(x), m.kv(src)
        q = q.reshape(b, n, h, hd).transpose(1, 2)
        k, v = kv.reshape(b, src.shape[1], 2, m.kv_heads, hd).permute(2, 0, 3, 1, 4)
    out = ind.masked_attention(q, k, v, mask)
    return m.proj(out.transpose(1, 2).reshape(b, n, dim))


# ------------------------------------------------------------------ against timm's computation


@pytest.mark.parametrize("backend", BACKENDS)
def test_sequence_layer_equals_timm_attention_with_the_mask(backend):
    n = 40 if backend != "triton" else 24
    m = layer(32, 4, "sliding.attn", "sliding_window", window=5, backend=backend,
              dtype=DT[backend])
    x = rand(2, n, 32, dtype=DT[backend]).requires_grad_()
    got = m(x)
    want = timm_attention(m, x, torch.as_tensor(ind.sliding_window(n, 5)))
    close(got, want, backend)
    g1 = torch.autograd.grad(got.square().sum(), [x, *m.parameters()])
    g2 = torch.autograd.grad(want.square().sum(), [x, *m.parameters()])
    for a, b in zip(g1, g2):
        close(a, b, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_grid_layer_channels_last_any_image_size(backend):
    m = layer(16, 2, "neighborhood.attn", "na2d", kernel=3, dilation=2, backend=backend,
              dtype=DT[backend])
    for hw in ((7, 9), (6, 6)) if backend != "triton" else ((6, 7),):
        x = rand(2, *hw, 16, dtype=DT[backend], seed=sum(hw))
        got = m(x)
        assert got.shape == x.shape
        want = timm_attention(m, x.reshape(2, -1, 16),
                              torch.as_tensor(ind.na2d(*hw, 3, dilation=2)))
        close(got, want.reshape(x.shape), backend)


def test_gqa_layer_has_q_and_kv_linears():
    m = layer(32, 4, "power.attn", "power_attention", block=4, kv_heads=2)
    assert set(m.state_dict()) == {"q.weight", "q.bias", "kv.weight", "kv.bias",
                                   "proj.weight", "proj.bias"}
    assert m.kv.weight.shape == (2 * 2 * 8, 32)
    x = rand(1, 50, 32)
    close(m(x), timm_attention(m, x, torch.as_tensor(ind.power_attention(50, block=4))),
          "cpu")


def test_cross_attention_reads_the_context_space():
    src = """
    pattern band(L: int, H: int, W: int, band: int) {
        query seq(L)
        key grid(H, W)
        attend q.i * band <= k.y and k.y < (q.i + 1) * band
    }
    """
    m = layer(16, 2, src, band=2)
    x, ctx = rand(2, 3, 16, seed=1), rand(2, 6, 5, 16, seed=2)
    y = torch.arange(30) // 5
    mask = (torch.arange(3)[:, None] * 2 <= y) & (y < torch.arange(3)[:, None] * 2 + 2)
    close(m(x, ctx), timm_attention(m, x, mask, context=ctx.reshape(2, 30, 16)), "cpu")


def test_timm_checkpoint_loads():
    try:
        import timm
    except Exception as e:  # absent, or built for another torch
        pytest.skip(f"timm unavailable: {e}")
    ref = timm.layers.Attention(32, num_heads=4, qkv_bias=True).double().eval()
    m = layer(32, 4, "pattern dense(N: int) { space seq(N)\n attend true }")
    m.load_state_dict(ref.state_dict(), strict=False)
    x = rand(2, 10, 32)
    close(m(x), ref(x), "cpu")


def test_padding_mask_reaches_the_keys():
    m = layer(16, 2, "sliding.attn", "sliding_window", window=4)
    x = rand(2, 12, 16)
    kpm = torch.ones(2, 12, dtype=torch.bool)
    kpm[1, :5] = False  # left padding
    mask = torch.as_tensor(ind.sliding_window(12, 4))[None, None] & kpm[:, None, None, :]
    close(m(x, key_padding_mask=kpm), timm_attention(m, x, mask), "cpu")


# ------------------------------------------------------------------ decoding with the cache


CAUSAL = [
    ("sliding.attn", "sliding_window", dict(window=6), {}),
    ("power.attn", "power_attention", dict(block=4, window=2), {}),
    ("document.attn", "document_causal", {}, {"doc": True}),
    ("neighborhood.attn", "na1d", dict(kernel=5, causal=True), {}),
    ("combiner.attn", "combiner_fixed", dict(span=4), {}),
]


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("file,name,params,spec", CAUSAL, ids=[c[1] for c in CAUSAL])
def test_generation_with_the_cache_equals_the_full_forward(backend, file, name, params, spec):
    m = layer(16, 2, file, name, backend=backend, **params)
    n = 21
    x = rand(2, n, 16)
    doc = {"doc": torch.arange(n) // 6} if spec else {}
    full = m(x, **doc)
    for chunk in (1, 7):
        cache = KVCache()
        first = 5 if name == "na1d" else 0  # NATTEN: a prompt at least as long as the kernel
        steps = [(0, first)] if first else []
        steps += [(t, min(n, t + chunk)) for t in range(first, n, chunk)]
        outs = [m(x[:, a:b], cache=cache, **({"doc": doc["doc"][:b]} if doc else {}))
                for a, b in steps]
        assert len(cache) == n
        close(torch.cat(outs, 1), full, backend)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_generation_of_non_causal_patterns_equals_the_call_over_the_prefix(backend):
    """MoH and DHSA attend later keys: step t equals row t of the call over tokens 0..t."""
    for name, file, params in (("moh", "moh.attn", dict(shared=1, topk=1)),
                               ("dhsa_chunks", "dhsa.attn", dict(block=4, chunk=4, topk=1))):
        m = layer(16, 2, file, name, backend=backend, **params)
        x = rand(1, 13, 16, seed=3)
        cache = KVCache()
        for t in range(13):
            got = m(x[:, t:t + 1], cache=cache)
            close(got, m(x[:, :t + 1])[:, t:], backend)


def test_triton_generation_with_the_cache():
    m = layer(16, 2, "sliding.attn", "sliding_window", window=6, backend="triton",
              dtype=torch.float32)
    x = rand(1, 20, 16, dtype=torch.float32)
    full = m(x)
    cache = KVCache()
    outs = [m(x[:, :16], cache=cache)] + [m(x[:, t:t + 1], cache=cache) for t in range(16, 20)]
    close(torch.cat(outs, 1), full, "triton")


def test_left_padded_generation():
    m = layer(16, 2, "sliding.attn", "sliding_window", window=4)
    x = rand(2, 10, 16)
    kpm = torch.ones(2, 10, dtype=torch.bool)
    kpm[0, :3] = False
    full = m(x, key_padding_mask=kpm)
    cache = KVCache()
    outs = [m(x[:, :6], cache=cache, key_padding_mask=kpm[:, :6])]
    for t in range(6, 10):  # the whole mask so far, as generate() passes it
        outs.append(m(x[:, t:t + 1], cache=cache, key_padding_mask=kpm[:, :t + 1]))
    close(torch.cat(outs, 1), full, "cpu")


def test_cache_errors():
    m = layer(16, 2, "sliding.attn", "sliding_window", window=4)
    cache = KVCache()
    m(rand(2, 3, 16), cache=cache)
    with pytest.raises(InputError, match="a new batch needs a new KVCache"):
        m(rand(3, 1, 16), cache=cache)
    with pytest.raises(InputError, match="covers this step's 1 or all 4"):
        m(rand(2, 1, 16), cache=cache, key_padding_mask=torch.ones(2, 2, dtype=torch.bool))
    g = layer(16, 2, "neighborhood.attn", "na2d", kernel=3)
    with pytest.raises(UnsupportedError, match="a KV cache serves sequence patterns"):
        g(rand(1, 4, 4, 16), cache=KVCache())


# ------------------------------------------------------------------ dropout


def test_attention_dropout_only_in_training():
    m = layer(16, 2, "sliding.attn", "sliding_window", window=8, attn_drop=0.5)
    x = rand(1, 12, 16)
    m.eval()
    close(m(x), m(x), "cpu")
    m.train()
    torch.manual_seed(1)
    a = m(x)
    torch.manual_seed(1)
    b = m(x)
    torch.testing.assert_close(a, b)
    m.eval()
    assert (a - m(x)).abs().max() > 1e-3


# ------------------------------------------------------------------ persistence


def test_pickle_deepcopy_and_state_dict_recompile(tmp_path):
    lib = tmp_path / "lib.attn"
    lib.write_text("fn near(w: int) -> bool { k.i <= q.i and q.i - k.i < w }\n")
    main = tmp_path / "mine.attn"
    main.write_text('import "lib.attn"\npattern mine(N: int, w: int) {\n space seq(N)\n'
                    " attend near(w)\n}\n")
    m = layer(16, 2, main, w=3)
    x = rand(1, 9, 16)
    want = m(x)
    for clone in (pickle.loads(pickle.dumps(m)), copy.deepcopy(m)):
        assert clone.op is not m.op
        close(clone(x), want, "cpu")
    buf = io.BytesIO()
    torch.save(m, buf)
    buf.seek(0)
    close(torch.load(buf, weights_only=False)(x), want, "cpu")
    fresh = layer(16, 2, main, w=3, seed=5)
    fresh.load_state_dict(m.state_dict())
    close(fresh(x), want, "cpu")
    state = pickle.dumps(m)
    assert b"BlockTable" not in state and b"Plan" not in state  # plans are never stored


def test_layer_errors():
    with pytest.raises(ParameterError, match="dim 30 must be a multiple of heads 4"):
        Attention(30, 4, "sliding.attn", "sliding_window", window=3)
    with pytest.raises(ParameterError, match="kv_heads must be a positive int dividing heads"):
        Attention(32, 4, "sliding.attn", "sliding_window", window=3, kv_heads=3)
    six = "pattern six(N: int) { space seq(N)\n heads 6\n attend true }"
    with pytest.raises(ParameterError, match="pattern 'six' has 6 heads; the layer has 4"):
        Attention(32, 4, six)
    m = layer(16, 2, "sliding.attn", "sliding_window", window=3)
    with pytest.raises(InputError, match=r"x must be \[batch, \*space, 16\] \(channels last\)"):
        m(rand(2, 5, 8))
    with pytest.raises(attndsl.AttnError, match="unknown backend 'cuda'"):
        Attention(16, 2, "sliding.attn", "sliding_window", window=3, backend="cuda")


# ------------------------------------------------------------------ torch.compile


class Tiny(torch.nn.Module):
    def __init__(self, backend):
        super().__init__()
        torch.manual_seed(0)
        self.a = Attention(16, 2, "power.attn", "power_attention", block=4, backend=backend)
        self.b = Attention(16, 2, "sliding.attn", "sliding_window", window=5, backend=backend)

    def forward(self, x):
        return self.b(x + self.a(x))


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_model_compiles_fullgraph_forward_and_backward(backend):
    model = Tiny(backend)
    x = rand(2, 20, 16, dtype=torch.float32)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    out = compiled(x)
    close(out, model(x), "triton")
    g1 = torch.autograd.grad(out.sum(), list(model.parameters()))
    g2 = torch.autograd.grad(model(x).sum(), list(model.parameters()))
    for a, b in zip(g1, g2):
        close(a, b, "triton")


def test_model_at_four_lengths_compiles_at_most_twice():
    model = Tiny("cpu")
    graphs = []

    def count(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    compiled = torch.compile(model, backend=count, dynamic=True, fullgraph=True)
    for n in (17, 40, 64, 99):
        x = rand(1, n, 16, dtype=torch.float32, seed=n)
        close(compiled(x), model(x), "triton")
    assert len(graphs) <= 2
