"""Eviction baselines: exact budgets, protected sinks and window, and what each one evicts."""

import pytest
import torch

import chelsea
from chelsea import ClusteredCache, CompressionConfig
from chelsea.methods import H2O, KNorm, RandomEviction, SnapKV, Streaming, get_method
from chelsea.scoring.attention_scores import attention_mass
from chelsea.compat import cache_arg

EVICTION = ["streaming", "h2o", "snapkv", "random", "knorm"]


def _data(length=100, seed=0):
    g = torch.Generator().manual_seed(seed)
    keys = torch.randn(2, 3, length, 8, generator=g)
    values = torch.randn(2, 3, length, 8, generator=g)
    # Position tag in the last coordinate lets the test see which tokens survived.
    keys[..., -1] = torch.arange(length, dtype=torch.float32)
    return keys, values, torch.zeros(2, 3, length)


def _scores_kw(name, length=100):
    if get_method(name).scores != "attention":
        return {}
    return {"scores": torch.rand(2, 3, length, generator=torch.Generator().manual_seed(5))}


@pytest.mark.parametrize("name", EVICTION)
@pytest.mark.parametrize("n_remove", [0, 10, 50, 500])
def test_budget_and_protected_tokens(name, n_remove):
    keys, values, lc = _data()
    k, v, out_lc, *scores = get_method(name).compress(keys, values, lc, n_remove, sink_tokens=4, window=16, **_scores_kw(name))
    assert k.shape[2] == 100 - min(n_remove, 80) and out_lc.shape == k.shape[:3]
    assert torch.equal(k[:, :, :4], keys[:, :, :4]) and torch.equal(k[:, :, -16:], keys[:, :, -16:])
    positions = k[..., -1]
    assert bool((positions[..., 1:] > positions[..., :-1]).all())  # order kept
    kept_values = torch.gather(values, 2, positions.long()[..., None].expand_as(v))
    assert torch.equal(v, kept_values)  # each key still has its own value
    if scores:  # attention-ranked methods hand back each kept entry's own score
        assert torch.equal(scores[0], torch.gather(_scores_kw(name)["scores"], 2, positions.long()))


def test_streaming_evicts_the_oldest():
    keys, values, lc = _data()
    k, _, _ = Streaming().compress(keys, values, lc, 30, sink_tokens=4, window=16)
    assert torch.equal(k[0, 0, :, -1], torch.cat([torch.arange(4), torch.arange(34, 100)]).float())


def test_knorm_evicts_the_largest_norms():
    keys, values, lc = _data()
    keys[..., -1] = 0.0  # norms only from the random part
    k, _, _ = KNorm().compress(keys, values, lc, 40, sink_tokens=0, window=0)
    kept_max = torch.linalg.vector_norm(k, dim=-1).amax(-1)
    all_sorted = torch.linalg.vector_norm(keys, dim=-1).sort(-1).values
    torch.testing.assert_close(kept_max, all_sorted[..., 59])


def test_random_is_seeded_and_differs_by_seed():
    keys, values, lc = _data()
    kw = dict(sink_tokens=0, window=0)
    a = RandomEviction(seed=1).compress(keys, values, lc, 40, **kw)[0]
    assert torch.equal(a, RandomEviction(seed=1).compress(keys, values, lc, 40, **kw)[0])
    assert not torch.equal(a, RandomEviction(seed=2).compress(keys, values, lc, 40, **kw)[0])


def test_h2o_evicts_the_least_attended():
    keys, values, lc = _data()
    scores = torch.rand(2, 3, 100, generator=torch.Generator().manual_seed(1))
    k, _, _, kept = H2O().compress(keys, values, lc, 30, scores=scores, sink_tokens=0, window=0)
    threshold = scores.sort(-1).values[..., 30]
    assert bool((kept >= threshold[..., None]).all())
    assert torch.equal(kept.sort(-1).values, scores.sort(-1).values[..., 30:])


def test_snapkv_keeps_the_neighbours_of_an_attended_token():
    keys, values, lc = _data()
    scores = torch.full((2, 3, 100), 0.01)
    scores[..., 50] = 10.0  # one strongly attended token
    k, _, _, _ = SnapKV(pool=7).compress(keys, values, lc, 80, scores=scores, sink_tokens=0, window=0)
    kept = k[0, 0, :, -1].long().tolist()
    assert set(range(47, 54)) <= set(kept)  # the pooled neighbourhood survives, not the lone token only


def _naive_mass(query, key, log_counts, last):
    b, h, q, d = query.shape
    kvh, n = key.shape[1], key.shape[2]
    out = torch.zeros(b, kvh, n, dtype=torch.float64)
    for i in range(q - last, q):
        pos = n - q + i
        logits = (query[:, :, i:i + 1].double() @ key.double().repeat_interleave(h // kvh, 1).transpose(-1, -2)) * d**-0.5
        logits = logits + log_counts.double().repeat_interleave(h // kvh, 1)[:, :, None]
        logits[..., pos + 1:] = float("-inf")
        probs = logits.softmax(-1)[:, :, 0]
        out += probs.reshape(b, kvh, h // kvh, n).sum(2)
    return out


@pytest.mark.parametrize("last", [None, 1, 5])
def test_attention_mass_matches_a_loop_and_sums_to_the_queries(last):
    g = torch.Generator().manual_seed(3)
    query, key = torch.randn(2, 4, 7, 8, generator=g), torch.randn(2, 2, 20, 8, generator=g)
    log_counts = torch.rand(2, 2, 20, generator=g).log1p()
    mass = attention_mass(query, key, log_counts, last=last, max_block_bytes=2000)  # several blocks
    rows = 7 if last is None else last
    torch.testing.assert_close(mass.double(), _naive_mass(query, key, log_counts, rows), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(mass.sum(-1), torch.full((2, 2), 2.0 * rows))  # 2 query heads per KV head


def _tiny_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return chelsea.prepare_model(LlamaForCausalLM(LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=1024)).eval())


@pytest.mark.parametrize("name", EVICTION)
def test_baselines_run_in_a_model_with_the_same_budget_as_chelsea(name):
    model = _tiny_model()
    ids = torch.randint(0, 256, (1, 400))
    entries = {}
    for method in (name, "chelsea-paper"):
        cache = ClusteredCache(CompressionConfig(ratio=0.75, window=16), method=method)
        with torch.no_grad():
            model.generate(ids, **cache_arg(model, cache), max_new_tokens=20, min_new_tokens=20, do_sample=False)
        assert cache.get_seq_length() == 419
        entries[method] = [layer.keys.shape[2] for layer in cache.layers]
    assert entries[name] == entries["chelsea-paper"]


@pytest.mark.parametrize("name", ["h2o", "snapkv"])
def test_attention_scores_follow_the_entries_in_a_model(name):
    model = _tiny_model()
    ids = torch.randint(0, 256, (2, 300))
    mask = torch.ones_like(ids)
    mask[1, :40] = 0  # a left-padded row takes the per-row path
    cache = ClusteredCache(CompressionConfig(ratio=0.5, window=16), method=name)
    with torch.no_grad():
        model.generate(ids, attention_mask=mask, **cache_arg(model, cache), max_new_tokens=40, min_new_tokens=40,
                       do_sample=False)
    layer = cache.layers[0]
    assert layer.scores.shape == layer.log_counts.shape
    real = layer.log_counts > float("-inf")
    assert bool((layer.scores[~real] == 0).all()) and bool((layer.scores[real] >= 0).all())
    assert cache.stats()["kv_bytes"] == sum(
        sum(t.numel() * t.element_size() for t in (lay.keys, lay.values, lay.log_counts, lay.scores)) for lay in cache.layers
    )
    # the scores are attention received: 4/2 query heads per KV head, one unit per query seen by the kept entries
    observed = 40 + (300 if name == "h2o" else 32)
    assert float(layer.scores[0].sum(-1).max()) <= 2 * observed + 1e-3
