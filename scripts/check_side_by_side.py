"""Check on the GPU that the local view's side-by-side repeats score as one chunk at a time does.

Qwen2.5-0.5B architecture with random weights (``chelsea bench``'s preset), bfloat16, one
sequence of N random tokens (default 8192), 2,048-token chunks. The reference repeats one chunk
per forward over the whole cache (the path before side-by-side batching); then
:func:`chelsea.importance.score_by_reconstruction` runs with ``batch_tokens`` 1 (one chunk per
forward, on a cache holding the sinks and that chunk), 16384 (the default) and 65536. Prints the
time of each, the largest relative difference of the scores and the overlap of every head's
top-20% entries.

    python scripts/check_side_by_side.py [N]      # with the Qwen tokenizer saved in .gpu/qwen-tokenizer
"""

import sys
import time

import torch

from chelsea import ClusteredCache, CompressionConfig
from chelsea.bench import load_with_tokenizer
from chelsea.generation import use_method
from chelsea.importance import Reconstruction, output_grams, repeat_prompts, score_by_reconstruction
from chelsea.methods import kvzip_evict

model, tok = load_with_tokenizer("qwen2.5-0.5b", ".gpu/qwen-tokenizer")
use_method(model, "kvzip")
n = int(sys.argv[1]) if len(sys.argv) > 1 else 8192
ids = torch.randint(100, 20000, (1, n), generator=torch.Generator().manual_seed(0)).to(model.device)


def prefilled():
    c = ClusteredCache(CompressionConfig(ratio=0.8), compressor=kvzip_evict)
    with c.held(), torch.no_grad():
        model(ids, past_key_values=c)
    return c


ref = prefilled()
for layer in ref.layers:
    layer.scores.zero_()
grams = output_grams(model, ref)  # output_norm is on by default
with ref.held(), torch.no_grad():
    for lo, hi, p in repeat_prompts(tok, ids, 2048):
        for layer, gram in zip(ref.layers, grams):
            layer.reconstruction = Reconstruction(n, lo, hi, 4, "local", output_gram=gram)
        model(input_ids=p, past_key_values=ref)
        for layer in ref.layers:
            layer.reconstruction, layer.length, layer.seen = None, n, n
for bt in (1, 16384, 65536):
    c = prefilled()
    torch.cuda.synchronize()
    t = time.perf_counter()
    with c.held():
        score_by_reconstruction(model, c, ids, tok, batch_tokens=bt)
    torch.cuda.synchronize()
    dt = time.perf_counter() - t
    rel = max(float(((a.scores - b.scores).abs() / b.scores.clamp_min(1e-6)).max()) for a, b in zip(c.layers, ref.layers))
    k = n // 5
    heads = c.layers[0].scores.shape[1]
    overlap = sum(len(set(a.scores[0, h].topk(k).indices.tolist()) & set(b.scores[0, h].topk(k).indices.tolist())) / k
                  for a, b in zip(c.layers, ref.layers) for h in range(heads)) / (len(c.layers) * heads)
    print(f"batch_tokens {bt}: {dt*1000:.1f} ms, max rel diff {rel:.2e}, top-20% overlap {overlap:.4f}", flush=True)
