"""Eviction baselines: exact budgets, protected sinks and window, and what each one evicts."""

import pytest
import torch

import chelsea
from chelsea import ClusteredCache, CompressionConfig
from chelsea.methods import COMPRESSORS, knorm_evict, random_evict, streaming_evict


def _data(length=100, seed=0):
    g = torch.Generator().manual_seed(seed)
    keys = torch.randn(2, 3, length, 8, generator=g)
    values = torch.randn(2, 3, length, 8, generator=g)
    # Position tag in the last coordinate lets the test see which tokens survived.
    keys[..., -1] = torch.arange(length, dtype=torch.float32)
    return keys, values, torch.zeros(2, 3, length)


@pytest.mark.parametrize("name", ["streaming", "random", "knorm"])
@pytest.mark.parametrize("n_remove", [0, 10, 50, 500])
def test_budget_and_protected_tokens(name, n_remove):
    keys, values, lc = _data()
    k, v, out_lc = COMPRESSORS[name](keys, values, lc, n_remove, sink_tokens=4, window=16)
    assert k.shape[2] == 100 - min(n_remove, 80) and out_lc.shape == k.shape[:3]
    assert torch.equal(k[:, :, :4], keys[:, :, :4]) and torch.equal(k[:, :, -16:], keys[:, :, -16:])
    positions = k[..., -1]
    assert bool((positions[..., 1:] > positions[..., :-1]).all())  # order kept
    kept_values = torch.gather(values, 2, positions.long()[..., None].expand_as(v))
    assert torch.equal(v, kept_values)  # each key still has its own value


def test_streaming_evicts_the_oldest():
    keys, values, lc = _data()
    k, _, _ = streaming_evict(keys, values, lc, 30, sink_tokens=4, window=16)
    assert torch.equal(k[0, 0, :, -1], torch.cat([torch.arange(4), torch.arange(34, 100)]).float())


def test_knorm_evicts_the_largest_norms():
    keys, values, lc = _data()
    keys[..., -1] = 0.0  # norms only from the random part
    k, _, _ = knorm_evict(keys, values, lc, 40, sink_tokens=0, window=0)
    kept_max = torch.linalg.vector_norm(k, dim=-1).amax(-1)
    all_sorted = torch.linalg.vector_norm(keys, dim=-1).sort(-1).values
    torch.testing.assert_close(kept_max, all_sorted[..., 59])


def test_random_is_seeded_and_differs_by_seed():
    keys, values, lc = _data()
    kw = dict(sink_tokens=0, window=0)
    a = random_evict(keys, values, lc, 40, seed=1, **kw)[0]
    assert torch.equal(a, random_evict(keys, values, lc, 40, seed=1, **kw)[0])
    assert not torch.equal(a, random_evict(keys, values, lc, 40, seed=2, **kw)[0])


@pytest.mark.parametrize("name", ["streaming", "random", "knorm"])
def test_baselines_run_in_a_model_with_the_same_budget_as_chelsea(name):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = chelsea.prepare_model(LlamaForCausalLM(LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=1024)).eval())
    ids = torch.randint(0, 256, (1, 400))
    entries = {}
    for method in (name, "chelsea"):
        cache = ClusteredCache(CompressionConfig(ratio=0.75, window=16), compressor=COMPRESSORS[method])
        with torch.no_grad():
            model.generate(ids, past_key_values=cache, max_new_tokens=20, min_new_tokens=20, do_sample=False)
        assert cache.get_seq_length() == 419
        entries[method] = [layer.keys.shape[2] for layer in cache.layers]
    assert entries[name] == entries["chelsea"]
