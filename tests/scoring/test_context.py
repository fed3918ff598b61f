"""compress_context and the scores around it: the default method end to end, scores made inside
the forward, token surprisal, and the caches the repeats run on."""

import torch
from tiny import tiny_with_tokenizer
from transformers import LlamaConfig, LlamaForCausalLM

from chelsea import ClusteredCache, CompressionConfig
from chelsea.runtime import use_method
from chelsea.scoring import compress_context, token_surprisal
from chelsea.compat import cache_arg


def test_chelsea_is_the_default_and_the_paper_method_stays_reachable(tmp_path, monkeypatch):
    from chelsea.methods import Chelsea, ChelseaPaper, METHODS
    from chelsea.runtime import generate

    monkeypatch.setenv("CHELSEA_CACHE_DIR", str(tmp_path))
    assert METHODS["chelsea"] is Chelsea and METHODS["chelsea-paper"] is ChelseaPaper and "guided" not in METHODS
    assert ClusteredCache().method == Chelsea()  # a bare cache runs the default method
    model, tokenizer = tiny_with_tokenizer()
    ids = torch.randint(0, 1000, (1, 300), generator=torch.Generator().manual_seed(3))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    config = CompressionConfig(ratio=0.8, window=16)
    default = generate(model, tokenizer, inputs, method=Chelsea().replace(fact_heads=3), config=config, max_new_tokens=4,
                       cuda_graph=False)
    assert len(model._chelsea_fact_heads) == 1  # the default scored the context and asked the fact heads
    by_name = generate(model, tokenizer, inputs, method="chelsea", config=config, max_new_tokens=4, cuda_graph=False)
    paper = generate(model, tokenizer, inputs, method="chelsea-paper", config=config, max_new_tokens=4, cuda_graph=False)
    assert default.method == by_name.method == "chelsea" and paper.method == "chelsea-paper"
    assert default.kv_bytes < 0.3 * default.kv_bytes_full and paper.kv_bytes < 0.3 * paper.kv_bytes_full


def test_in_forward_scores_rank_every_entry_by_the_newest_block_until_a_context_pass_scored_them(monkeypatch):
    import chelsea.scoring.observers as observers

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)).eval()
    use_method(model, "kvzip")
    calls = []

    def numbered(query, key, log_counts=None, **_):  # the n-th scoring gives every entry 1 / n
        calls.append(1)
        return torch.full(key.shape[:3], 1.0 / len(calls))

    monkeypatch.setattr(observers, "attention_mass", numbered)
    ids = torch.randint(0, 256, (1, 200))
    config = CompressionConfig(ratio=0.5, window=16)
    cache = ClusteredCache(config, method="kvzip")
    with torch.no_grad():
        model(ids[:, :100], **cache_arg(model, cache), use_cache=True)
        model(ids[:, 100:], **cache_arg(model, cache), use_cache=True)
    assert cache.layers[0].keys.shape[2] == config.budget(200)
    assert torch.all(cache.layers[0].scores == 1.0 / 3)  # layer 0's scoring in the second forward, old entries too

    calls.clear()
    scored = ClusteredCache(config, method="kvzip")
    compress_context(model, scored, ids[:, :100], reconstruct=None)  # the prompt's own last queries: 1 / 1 in layer 0
    assert not any(layer.rescore for layer in scored.layers)
    with torch.no_grad():
        model(ids[:, 100:], **cache_arg(model, scored), use_cache=True)
    kept = scored.layers[0].scores
    assert bool((kept == 1.0).any()) and bool((kept == 1.0 / 3).any())  # the context's scores stay beside the new ones


def test_token_surprisal_is_minus_the_log_probability_of_each_next_token():
    model, _ = tiny_with_tokenizer(layers=2)
    ids = torch.randint(0, 1000, (2, 70), generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        hidden = model.get_decoder()(input_ids=ids).last_hidden_state
        got = token_surprisal(model, hidden, ids, block=16)  # blocks that do not divide the length
        logits = model(ids).logits
    want = -logits[:, :-1].log_softmax(-1).gather(-1, ids[:, 1:, None])[..., 0]
    assert got.shape == ids.shape and got.dtype == torch.float32 and bool((got[:, 0] == 0).all())
    torch.testing.assert_close(got[:, 1:], want, rtol=1e-5, atol=1e-5)


def test_a_holding_cache_keeps_the_entries_and_appends_its_room_in_place():
    """The repeats' caches: each layer holds exactly the entries given, as one prefill would, and
    a forward of ``room`` tokens writes into the same buffers (no second copy of the chunks)."""
    g = torch.Generator().manual_seed(0)
    keys, values = torch.randn(3, 2, 40, 8, generator=g), torch.randn(3, 2, 40, 8, generator=g)
    cache = ClusteredCache(method="kvzip", ratio=0.5)
    side = cache.holding([(keys, values), None], room=12)
    layer = side.layers[0]
    assert not side.layers[1].is_initialized
    assert layer.length == layer.seen == 40 and torch.equal(layer.keys, keys) and torch.equal(layer.values, values)
    assert bool((layer.log_counts == 0).all()) and bool((layer.scores == 0).all())
    buffer = layer._key_buf.data_ptr()
    more = torch.randn(3, 2, 12, 8)
    layer.update(more, more)
    assert layer._key_buf.data_ptr() == buffer and torch.equal(layer.keys[:, :, 40:], more)
