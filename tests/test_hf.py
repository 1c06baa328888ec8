"""attndsl as a transformers attention implementation, on tiny random-weight Llama, Mistral
(sliding window) and Gemma 2 (softcap, alternating sliding / global layers) built from
configs (no downloads): logits equal the eager implementation within 1e-5 in fp32 (left
padding included), greedy generate() gives the same tokens (KV cache, sliding-window cache
layers that drop keys), and training gives the same gradients. The q/k weights are scaled
up so that a wrong mask or a dropped softcap changes the logits visibly (checked too)."""

from __future__ import annotations

import re

import pytest
import torch

import attndsl

tf = pytest.importorskip("transformers")
hf = pytest.importorskip("attndsl.integrations.transformers")

VOCAB = 101


def tiny(kind: str, **over):
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                  attn_implementation="eager")
    if kind == "llama":
        cfg, cls = tf.LlamaConfig(**common, **over), tf.LlamaForCausalLM
    elif kind == "mistral":
        cfg, cls = tf.MistralConfig(**common, sliding_window=6, **over), tf.MistralForCausalLM
    else:
        cfg = tf.Gemma2Config(**common, head_dim=16, query_pre_attn_scalar=16,
                              sliding_window=5, attn_logit_softcapping=8.0,
                              final_logit_softcapping=None, **over)
        cls = tf.Gemma2ForCausalLM
    torch.manual_seed(0)
    model = cls(cfg).eval()
    with torch.no_grad():  # large scores: the mask and the softcap matter
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(6.0)
            layer.self_attn.k_proj.weight.mul_(6.0)
    return model


def batch(n=19):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, VOCAB, (2, n), generator=g)
    mask = torch.ones(2, n, dtype=torch.long)
    mask[1, :4] = 0  # left padding
    return ids, mask


def logits(model, impl, ids, mask):
    model.set_attn_implementation(impl)
    with torch.no_grad():
        out = model(ids, attention_mask=mask).logits
    return torch.cat([out[0], out[1, 4:]])  # the real tokens' logits


def gen(model, impl, ids, mask, n=9, **kw):
    model.set_attn_implementation(impl)
    with torch.no_grad():
        return model.generate(ids, attention_mask=mask, max_new_tokens=n, do_sample=False,
                              pad_token_id=0, **kw)


hf.register("attndsl_own", None)  # every layer: the model's own attention, by attndsl


@pytest.mark.parametrize("kind", ["llama", "mistral", "gemma2"])
def test_logits_and_greedy_generate_equal_eager(kind):
    model = tiny(kind)
    ids, mask = batch()
    eager = logits(model, "eager", ids, mask)
    ours = logits(model, "attndsl_own", ids, mask)
    torch.testing.assert_close(ours, eager, atol=1e-5, rtol=1e-5)
    # 19 prompt + 9 new tokens: past the sliding windows (6, 5), so those cache layers
    # drop keys and the attention sees them at an offset
    assert torch.equal(gen(model, "attndsl_own", ids, mask), gen(model, "eager", ids, mask))
    if kind == "gemma2":  # a static cache: masks made ahead by generate(), empty slots
        static = dict(n=4, cache_implementation="static")
        assert torch.equal(gen(model, "attndsl_own", ids, mask, **static),
                           gen(model, "eager", ids, mask, **static))


def test_a_wrong_mask_or_a_dropped_softcap_shows():
    ids, mask = batch()
    mistral = tiny("mistral")
    hf.register("attndsl_causal_only", attndsl.integrations.transformers.CAUSAL, "causal")
    wrong = logits(mistral, "attndsl_causal_only", ids, mask)
    assert (wrong - logits(mistral, "eager", ids, mask)).abs().max() > 1e-2
    gemma = tiny("gemma2")
    capped = logits(gemma, "eager", ids, mask)
    gemma.config.attn_logit_softcapping = None
    for layer in gemma.model.layers:
        layer.self_attn.attn_logit_softcapping = None
    assert (logits(gemma, "attndsl_own", ids, mask) - capped).abs().max() > 1e-2


def test_layers_choose_the_pattern_per_layer():
    """Gemma 2's alternating layers through layers=: a dict and a function; the sliding
    window comes from each layer (the global layer has none)."""
    gemma = tiny("gemma2")
    ids, mask = batch()
    eager = logits(gemma, "eager", ids, mask)
    hf.register("g2_dict", None, layers={0: ("sliding.attn", "sliding_window")})
    torch.testing.assert_close(logits(gemma, "g2_dict", ids, mask), eager, atol=1e-5,
                               rtol=1e-5)
    power = ("power.attn", "power_attention", {"block": 2, "window": 1, "sink": 0})
    hf.register("g2_fn", None, layers=lambda i, m: None if i == 0 else power)
    power = logits(gemma, "g2_fn", ids, mask)
    assert (power - eager).abs().max() > 1e-2  # layer 1 runs power_attention, not causal
    model = tiny("llama")
    with pytest.raises(attndsl.ParameterError, match=r"layer 0: pattern 'sliding_window' "
                       r"needs parameter 'window'.*the model gives no pattern parameter"):
        hf.register("needs_window", "sliding.attn", "sliding_window")
        logits(model, "needs_window", ids, mask)


def test_power_attention_trains_with_the_same_gradients_as_its_mask():
    """Training through attndsl (backend cpu) equals eager attention given the same mask
    as a 4-D additive mask."""
    model = tiny("llama")
    ids, _ = batch(24)
    hf.register("power4", "power.attn", "power_attention", block=4)
    model.train()
    model.set_attn_implementation("power4")
    loss = model(ids, labels=ids).loss
    grads = torch.autograd.grad(loss, [p for p in model.parameters()])
    m = attndsl.compile("patterns/power.attn", "power_attention", N=24, block=4).mask()
    add = torch.zeros(2, 1, 24, 24).masked_fill(~m, torch.finfo(torch.float32).min)
    model.set_attn_implementation("eager")
    loss2 = model(ids, labels=ids, attention_mask=add).loss
    grads2 = torch.autograd.grad(loss2, [p for p in model.parameters()])
    torch.testing.assert_close(loss, loss2, atol=1e-5, rtol=1e-5)
    for a, b in zip(grads, grads2):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_register_errors_are_located_before_any_model_runs():
    with pytest.raises(attndsl.ParameterError, match="not one of transformers' own"):
        hf.register("sdpa", None)
    with pytest.raises(attndsl.AttnNameError, match=re.escape(
            "error: the default pattern: no pattern 'power_attn' (did you mean "
            "'power_attention'?)")):
        hf.register("x", "power.attn", "power_attn")
    with pytest.raises(attndsl.ParameterError, match=re.escape(
            "error: layer 3: pattern 'power_attention' has no parameter 'blok' (did you "
            "mean 'block'?)")):
        hf.register("x", None, layers={3: ("power.attn", "power_attention", {"blok": 4})})
    with pytest.raises(attndsl.ParameterError, match="layers keys are layer indices"):
        hf.register("x", None, layers={"0": None})


def test_a_pattern_needing_dropped_keys_is_refused():
    """Mistral's sliding-window cache keeps 5 keys; causal attention needs them all."""
    model = tiny("mistral")
    ids, mask = batch()
    hf.register("causal_on_mistral", attndsl.integrations.transformers.CAUSAL, "causal")
    with pytest.raises(attndsl.UnsupportedError, match="which this layer's cache no longer "
                       "keeps"):
        gen(model, "causal_on_mistral", ids, mask, n=2)
    model.set_attn_implementation("causal_on_mistral")
    with torch.no_grad():  # a cache that keeps every key
        out = model.generate(ids, attention_mask=mask, max_new_tokens=2, do_sample=False,
                             pad_token_id=0, past_key_values=tf.DynamicCache())
    assert out.shape == (2, 21)
