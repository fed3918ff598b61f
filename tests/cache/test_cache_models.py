"""The clustered cache inside real transformers models (tiny, randomly initialised)."""

import copy

import pytest
import torch
from tiny import tiny
from transformers import DynamicCache, Gemma2Config, GPT2Config, MistralConfig, Qwen2Config

import chelsea
from chelsea import ChelseaError, ClusteredCache, CompressionConfig, UnsupportedModelError
from chelsea.methods import ChelseaPaper
from chelsea.models import check_model_config
from chelsea.compat import cache_arg

def _sdpa_copy(model):
    ref = copy.deepcopy(model)  # a deep copy: the config object holds the attention implementation
    ref.set_attn_implementation("sdpa")
    return ref


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
def test_ratio_zero_equals_full_cache(family):
    """Prefill of a left-padded batch, then decode steps: logits equal the plain SDPA model's."""
    model = chelsea.prepare_model(tiny(family))
    ref = _sdpa_copy(model)
    torch.manual_seed(1)
    ids = torch.randint(0, 256, (2, 70))
    mask = torch.ones_like(ids)
    mask[1, :25] = 0  # second row is 45 tokens, left-padded
    steps = torch.randint(0, 256, (2, 6))
    cache, full = ClusteredCache(method="chelsea-paper", ratio=0.0, chunk_size=8, window=8), DynamicCache()
    with torch.no_grad():
        out = model(ids, attention_mask=mask, **cache_arg(model, cache)).logits
        want = ref(ids, attention_mask=mask, **cache_arg(ref, full)).logits
        valid = mask.bool()
        torch.testing.assert_close(out[valid], want[valid], rtol=1e-4, atol=1e-5)
        for t in range(steps.shape[1]):
            mask = torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], 1)
            out = model(steps[:, t : t + 1], attention_mask=mask, **cache_arg(model, cache)).logits
            want = ref(steps[:, t : t + 1], attention_mask=mask, **cache_arg(ref, full)).logits
            torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-5)
    assert cache.get_seq_length() == full.get_seq_length() == 76


@pytest.mark.parametrize("ratio", [0.5, 0.8])
def test_generate_keeps_budget_counts_and_positions(ratio):
    model = chelsea.prepare_model(tiny("llama"))
    cfg = CompressionConfig(ratio=ratio, sink_tokens=4, window=16)
    cache = ClusteredCache(cfg, method=ChelseaPaper(chunk_size=16))
    torch.manual_seed(2)
    ids = torch.randint(0, 256, (1, 400))
    new = 50
    with torch.no_grad():
        model.generate(ids, **cache_arg(model, cache), max_new_tokens=new, min_new_tokens=new, do_sample=False)
    seen = ids.shape[1] + new - 1  # the last generated token is never fed back
    assert cache.get_seq_length() == seen
    for layer in cache.layers:
        torch.testing.assert_close(layer.log_counts.exp().sum(-1), torch.full((1, 2), float(seen)))
        kv = layer.keys.nbytes + layer.values.nbytes
        per_entry = kv // layer.keys.shape[2]
        assert abs(kv - (1 - ratio) * layer.full_nbytes()) <= 16 * per_entry
    stats = cache.stats()
    assert stats["compressed"] and stats["tokens_seen"] == seen
    assert stats["kv_bytes"] < (1 - ratio) * stats["kv_bytes_full"] + 16 * 1024 * len(cache.layers)


def test_sinks_and_window_are_bit_identical_after_prefill():
    model = chelsea.prepare_model(tiny("qwen2"))
    cfg = CompressionConfig(ratio=0.8, sink_tokens=4, window=24)
    cache, full = ClusteredCache(cfg, method=ChelseaPaper(chunk_size=8)), DynamicCache()
    ids = torch.randint(0, 256, (2, 300), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        model(ids, **cache_arg(model, cache))
        model(ids, **cache_arg(model, full))
    for mine, ref in zip(cache.layers, full.layers):
        assert mine.keys.shape[2] == cfg.budget(300)
        for a, b in ((mine.keys, ref.keys), (mine.values, ref.values)):
            assert torch.equal(a[:, :, :4], b[:, :, :4])
            assert torch.equal(a[:, :, -24:], b[:, :, -24:])


def test_padding_is_never_merged_and_batch_rows_match_single_runs():
    """A left-padded batch gives each row the tokens it gets alone (float64, so no near-ties flip)."""
    model = chelsea.prepare_model(tiny("mistral", torch.float64))
    cfg, paper = CompressionConfig(ratio=0.5, sink_tokens=2, window=8), ChelseaPaper(chunk_size=8)
    g = torch.Generator().manual_seed(4)
    prompts = [torch.randint(1, 256, (n,), generator=g) for n in (120, 75, 160)]
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :], mask[i, width - len(p) :] = p, 1
    cache = ClusteredCache(cfg, method=paper)
    with torch.no_grad():
        batch_out = model.generate(ids, attention_mask=mask, **cache_arg(model, cache), max_new_tokens=12,
                                   min_new_tokens=12, do_sample=False, pad_token_id=0)
        for i, p in enumerate(prompts):
            single = model.generate(p[None], **cache_arg(model, ClusteredCache(cfg, method=paper)), max_new_tokens=12,
                                    min_new_tokens=12, do_sample=False, pad_token_id=0)
            assert torch.equal(batch_out[i, width:], single[0, len(p):]), f"row {i}"
    for layer in cache.layers:
        # Counts of each row add up to its own real tokens (its padding counted nowhere).
        real = torch.tensor([len(p) + 11 for p in prompts], dtype=torch.float64)
        torch.testing.assert_close(layer.log_counts.exp().sum(-1).double(), real[:, None].expand(-1, 2))


@pytest.mark.parametrize("method", ["chelsea-paper", "chelsea"])
def test_padded_rows_compress_their_real_entries_as_alone(method):
    """A row padded at its start and a row with padding inside (its real entries are not its last
    slots: it is read and written alone) each hold, after compression, what the method makes of
    that row's real entries alone, right-aligned."""
    model = chelsea.prepare_model(tiny("llama"))
    cache = ClusteredCache(CompressionConfig(ratio=0.5, sink_tokens=2, window=8), method=method)
    ids = torch.randint(1, 256, (3, 100), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, :30] = 0
    mask[1, 40:60] = 0
    with torch.no_grad(), cache.held():
        model(ids, attention_mask=mask, **cache_arg(model, cache))
    before = [(tuple(t.clone() for t in layer._entries()), layer.log_counts.clone()) for layer in cache.layers]
    cache.compress_all()
    for layer, (entries, log_counts) in zip(cache.layers, before):
        for b in range(3):
            real = log_counts[b, 0] > float("-inf")
            n = int(real.sum())
            alone = layer._run(tuple(t[b : b + 1][:, :, real] for t in entries), n - layer.budget(n, b))
            kept = layer.log_counts[b, 0] > float("-inf")
            assert bool(kept[-int(kept.sum()):].all())  # right-aligned
            for want, got in zip(alone, layer._entries()):
                torch.testing.assert_close(got[b : b + 1][:, :, kept], want)


def test_short_prompt_is_not_compressed():
    model = chelsea.prepare_model(tiny("llama"))
    cache = ClusteredCache(ratio=0.8, sink_tokens=4, window=64)
    with torch.no_grad():
        model(torch.randint(0, 256, (1, 50)), **cache_arg(model, cache))
    stats = cache.stats()
    assert stats["compressed"] is False and stats["kv_entries"] == 50


def test_cache_with_another_attention_gets_a_clear_error():
    model = tiny("llama")
    model.set_attn_implementation("sdpa")
    cache = ClusteredCache(ratio=0.5)
    with torch.no_grad():
        model(torch.randint(0, 256, (1, 10)), **cache_arg(model, cache))
        with pytest.raises(ChelseaError, match="chelsea"):
            model(torch.randint(0, 256, (1, 1)), **cache_arg(model, cache))


@pytest.mark.parametrize(
    "config,match",
    [
        (GPT2Config(), "not supported"),
        (Gemma2Config(), "not supported"),
        (MistralConfig(sliding_window=16, max_position_embeddings=1024), "sliding"),
        (Qwen2Config(use_sliding_window=True, sliding_window=64, max_window_layers=0, max_position_embeddings=1024), "sliding"),
    ],
)
def test_unsupported_layouts_are_refused(config, match):
    with pytest.raises(UnsupportedModelError, match=match):
        check_model_config(config)


def test_config_and_knobs_are_exclusive():
    with pytest.raises(ChelseaError, match="either"):
        ClusteredCache(CompressionConfig(), ratio=0.3)


def test_clustergen_in_its_exact_limit_generates_like_the_full_cache():
    """delta 0 and samples covering every token: ClusterGen's estimate is exact attention."""
    model = chelsea.prepare_model(tiny("qwen2", torch.float64))
    ref = _sdpa_copy(model)
    ids = torch.randint(0, 256, (1, 300), generator=torch.Generator().manual_seed(6))
    cache = ClusteredCache(method="clustergen", delta=0.0, cluster_samples=2, value_samples=400, window=16, compress_every=8)
    with torch.no_grad():
        want = ref.generate(ids, max_new_tokens=30, min_new_tokens=30, do_sample=False)
        got = model.generate(ids, **cache_arg(model, cache), max_new_tokens=30, min_new_tokens=30, do_sample=False)
    assert torch.equal(want, got)
    stats = cache.stats()
    assert stats["compressed"] and stats["tokens_seen"] == 329
    for layer in cache.layers:
        # Exact entries are sinks + window (+ at most compress_every pending); the rest is summarised.
        assert layer.keys.shape[2] <= 4 + 16 + 8
        torch.testing.assert_close(layer.summary.tokens(), torch.full((1, 2), 329.0 - layer.keys.shape[2], dtype=torch.float64))


def test_clustergen_refuses_padded_batches():
    model = chelsea.prepare_model(tiny("llama"))
    ids = torch.randint(0, 256, (2, 100))
    mask = torch.ones_like(ids)
    mask[0, :10] = 0
    with torch.no_grad(), pytest.raises(ChelseaError, match="padded"):
        model(ids, attention_mask=mask, **cache_arg(model, ClusteredCache(method="clustergen")))


def test_buffers_grow_in_place_and_give_memory_back_after_clustering():
    model = chelsea.prepare_model(tiny("llama"))
    cache = ClusteredCache(method="chelsea-paper", ratio=0.8, chunk_size=16, window=16)
    ids = torch.randint(0, 256, (1, 600), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        out = model(ids, **cache_arg(model, cache))
        layer = cache.layers[0]
        full_bytes = layer.full_nbytes()
        # After clustering the prefill, the allocation (spare room included) is near the budget.
        assert layer.reserved_nbytes() < 0.3 * full_bytes * (1 + 4 / 64) + 64 * 1024
        buffer = layer._key_buf
        token = out.logits[:, -1:].argmax(-1)
        for _ in range(10):
            token = model(token, **cache_arg(model, cache)).logits[:, -1:].argmax(-1)
        assert layer._key_buf is buffer  # decoding wrote into the same buffer, no copy per token
        assert layer.keys.data_ptr() == buffer.data_ptr()


def test_clustergen_rows_follow_beam_reordering():
    model = chelsea.prepare_model(tiny("llama"))
    ids = torch.randint(0, 256, (3, 200), generator=torch.Generator().manual_seed(8))
    cache = ClusteredCache(method="clustergen", window=16, value_samples=32)
    with torch.no_grad():
        model(ids, **cache_arg(model, cache))
    layer = cache.layers[0]
    keys, centers, counts = layer.keys.clone(), layer.summary.centers.clone(), layer.summary.tokens().clone()
    order = torch.tensor([2, 0, 0])
    cache.reorder_cache(order)
    assert torch.equal(layer.keys, keys[order]) and torch.equal(layer.summary.centers, centers[order])
    assert torch.equal(layer.summary.tokens(), counts[order])
    cache.batch_repeat_interleave(2)
    assert layer.keys.shape[0] == 6 and layer.summary.value_keys.shape[0] == 6


def test_clustergen_runs_beam_search():
    model = chelsea.prepare_model(tiny("llama"))
    ids = torch.randint(0, 256, (1, 200), generator=torch.Generator().manual_seed(9))
    cache = ClusteredCache(method="clustergen", window=16, value_samples=32, compress_every=4)
    with torch.no_grad():
        out = model.generate(ids, **cache_arg(model, cache), num_beams=3, max_new_tokens=12, min_new_tokens=12, do_sample=False)
    assert out.shape == (1, 212) and cache.layers[0].summary.centers.shape[0] == 3


@pytest.mark.parametrize("method", ["chelsea", "kvzip", "snapkv"])
def test_a_capacity_holds_the_cache_at_a_fixed_size_while_text_streams_in(method):
    """With ``capacity`` the cache fills up to it, then every chunk is compressed back to it: the
    entries and bytes stay fixed however much text arrives, and the tokens seen are all counted."""
    model = chelsea.prepare_model(tiny("qwen2"))
    cache = ClusteredCache(method=method, ratio=0.8, capacity=120, window=16)
    ids = torch.randint(0, 256, (1, 600), generator=torch.Generator().manual_seed(0))
    sizes, nbytes = [], []
    with torch.no_grad():
        for start in range(0, 600, 100):
            model(ids[:, start : start + 100], **cache_arg(model, cache), use_cache=True)
            sizes.append(cache.layers[0].length)
            nbytes.append(cache.stats()["kv_bytes"])
    assert sizes[0] == 100 and sizes[1:] == [120] * 5
    assert len(set(nbytes[1:])) == 1 and nbytes[0] < nbytes[1]
    stats = cache.stats()
    assert stats["tokens_seen"] == 600 and stats["kv_entries"] == 120  # per layer
    assert stats["kv_bytes"] < 0.25 * stats["kv_bytes_full"]
