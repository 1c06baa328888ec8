"""Swap attndsl's power_attention into a Hugging Face Llama and fine-tune it on the CPU.

The model is a tiny random-weight Llama built from a config (nothing is downloaded) and it
learns one fixed 64-token text by heart, a few steps: enough to see the loss fall and the
gradients flow through attndsl's CPU backend. One call registers the pattern with
transformers; the model code is unchanged. Needs the `hf` extra (pip install
'attndsl[hf]').
"""

import sys
import time

try:
    import transformers
except ImportError:
    print("this example needs transformers: pip install 'attndsl[hf]'")
    sys.exit(0)
import torch

import attndsl.integrations.transformers as attn_hf

# every layer: PowerAttention's power-of-two block distances (blocks of 8 tokens)
attn_hf.register("power", "power.attn", "power_attention", block=8, window=2)

config = transformers.LlamaConfig(
    vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
torch.manual_seed(0)
model = transformers.LlamaForCausalLM(config)
model.set_attn_implementation("power")


text = torch.randint(1, 64, (1, 64), generator=torch.Generator().manual_seed(1))
opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
model.train()
t0 = time.perf_counter()
STEPS = 12
for step in range(STEPS):
    loss = model(text, labels=text).loss
    opt.zero_grad()
    loss.backward()
    opt.step()
    print(f"step {step:2d}  loss {loss.item():.3f}")
print(f"{STEPS} steps of fine-tuning through power_attention in "
      f"{time.perf_counter() - t0:.1f} s")

model.eval()  # greedy decoding with the KV cache, through the same pattern
with torch.no_grad():
    out = model.generate(text[:, :16], max_new_tokens=8, do_sample=False, pad_token_id=0)
print("text:      ", text[0, 16:24].tolist())
print("generated: ", out[0, 16:].tolist())
