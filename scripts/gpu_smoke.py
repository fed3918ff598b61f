"""Smoke check on a CUDA machine: the clustered cache in a tiny random Llama/Qwen2 in bf16.

Compares greedy tokens at ratio 0 with plain SDPA + DynamicCache, and runs ratio 0.8 with a
left-padded batch. Prints versions and the cache statistics.
"""

import copy

import torch
import transformers
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

import chelsea

print("torch", torch.__version__, "transformers", transformers.__version__, "device", torch.cuda.get_device_name())
small = dict(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=8,
             num_key_value_heads=2, max_position_embeddings=8192)
for cls, cfg in [(LlamaForCausalLM, LlamaConfig(**small)), (Qwen2ForCausalLM, Qwen2Config(**small, use_sliding_window=False))]:
    torch.manual_seed(0)
    model = cls(cfg).to("cuda", torch.bfloat16).eval()
    ref = copy.deepcopy(model)
    ref.set_attn_implementation("sdpa")
    chelsea.prepare_model(model)
    ids = torch.randint(0, 512, (3, 2000), device="cuda")
    mask = torch.ones_like(ids)
    mask[1, :500] = 0
    with torch.no_grad():
        want = ref.generate(ids, attention_mask=mask, past_key_values=DynamicCache(), max_new_tokens=16, do_sample=False, pad_token_id=0)
        got = model.generate(ids, attention_mask=mask, past_key_values=chelsea.ClusteredCache(method="chelsea-paper", ratio=0.0), max_new_tokens=16, do_sample=False, pad_token_id=0)
        cache = chelsea.ClusteredCache(method="chelsea-paper", ratio=0.8)
        model.generate(ids, attention_mask=mask, past_key_values=cache, max_new_tokens=64, do_sample=False, pad_token_id=0)
    same = (want == got).float().mean().item()
    print(cls.__name__, "ratio0 token agreement", same, "ratio0.8 stats", cache.stats())
