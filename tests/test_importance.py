"""Importance-ranked compression: kvzip eviction, importance-guided merging, layer budgets and
context-reconstruction scoring."""

from dataclasses import replace

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from chelsea import ClusteredCache, CompressionConfig
from chelsea.errors import ChelseaError
from chelsea.attention import weighted_attention
from chelsea.generation import use_method
from chelsea.importance import (Reconstruction, compress_context, output_gram, output_grams, repeat_prompts,
                               score_by_reconstruction, token_surprisal)
from chelsea.methods import COMPRESSORS, guided_merge, kvzip_evict
from chelsea.methods._budgets import layer_shares, profile_shares, score_profile


def _data(batch=2, heads=3, length=120, seed=0):
    g = torch.Generator().manual_seed(seed)
    keys = torch.randn(batch, heads, length, 8, generator=g)
    values = torch.randn(batch, heads, length, 8, generator=g)
    scores = torch.rand(batch, heads, length, generator=g)
    return keys, values, torch.zeros(batch, heads, length), scores


@pytest.mark.parametrize("n_remove", [0, 7, 60, 500])
def test_kvzip_keeps_exactly_the_top_scored_entries(n_remove):
    keys, values, lc, scores = _data()
    keys[..., -1] = torch.arange(120, dtype=torch.float32)  # position tag
    k, v, out_lc, out_scores = kvzip_evict(keys, values, lc, n_remove, scores=scores, sink_tokens=4, window=10)
    region = scores[:, :, 4:110]
    removed = min(n_remove, 106)
    want = region.topk(106 - removed, dim=-1).indices.sort(-1).values + 4
    kept_region = k[:, :, 4 : k.shape[2] - 10, -1].long()
    assert torch.equal(kept_region, want)
    assert torch.equal(out_scores, scores.gather(-1, k[..., -1].long()))
    assert torch.equal(k[:, :, :4], keys[:, :, :4]) and torch.equal(k[:, :, -10:], keys[:, :, -10:])


@pytest.mark.parametrize("exact_share", [0.0, 0.3, 0.5, 1.0])
@pytest.mark.parametrize("merge", ["centroid", "values"])
def test_guided_never_merges_an_exact_entry(exact_share, merge):
    keys, values, lc, scores = _data(seed=3)
    lc[..., ::5] = 1.3  # some entries already stand for several tokens
    k, v, out_lc, out_scores = guided_merge(keys, values, lc, 70, scores=scores, sink_tokens=4, window=10,
                                            exact_share=exact_share, merge=merge, neighbourhood=16)
    assert k.shape[2] == 50
    region_scores = scores[:, :, 4:110]
    kept = torch.zeros_like(region_scores, dtype=torch.bool).scatter_(-1, region_scores.topk(36, dim=-1).indices, True)
    count = round(exact_share * 36)
    ranked = region_scores.masked_fill(~kept, -1).flatten(1)
    threshold = ranked.topk(count, dim=1).values[:, -1:] if count else torch.full((2, 1), 2.0)
    for b in range(2):
        for h in range(3):
            for j in range(4, 46):  # kept region entries, in order
                pos = int(torch.nonzero(scores[b, h] == out_scores[b, h, j])[0])
                exact = bool(scores[b, h, pos] >= threshold[b, 0])
                if exact:  # bit for bit, its own count
                    assert torch.equal(k[b, h, j], keys[b, h, pos]) and torch.equal(v[b, h, j], values[b, h, pos])
                    assert out_lc[b, h, j] == lc[b, h, pos]
                if merge == "values":  # representatives keep their own key too
                    assert torch.equal(k[b, h, j], keys[b, h, pos])
    assert torch.equal(k[:, :, :4], keys[:, :, :4]) and torch.equal(v[:, :, -10:], values[:, :, -10:])


def test_guided_with_a_number_to_remove_per_row_equals_each_row_alone():
    keys, values, lc, scores = _data(batch=3, seed=7)
    lc[..., ::4] = 0.7
    together = guided_merge(keys, values, lc, [10, 60, 500], scores=scores, sink_tokens=4, window=10, neighbourhood=16)
    assert together[0].shape[2] == 110  # the row that removes fewest sets the length
    for b, n in enumerate([10, 60, 106]):  # 500 is more than the region holds
        alone = guided_merge(*(t[b : b + 1] for t in (keys, values, lc)), n, scores=scores[b : b + 1], sink_tokens=4,
                             window=10, neighbourhood=16)
        assert alone[0].shape[2] == 120 - n
        for x, y in zip(alone, together):
            assert torch.equal(x, y[b : b + 1, :, : 120 - n])
        assert torch.all(together[2][b, :, 120 - n :] == float("-inf"))  # what follows the row's entries is padding
    with pytest.raises(ValueError, match="rows"):
        guided_merge(keys, values, lc, [1, 2], scores=scores)


def test_guided_counts_sum_to_tokens_when_everything_merges():
    keys, values, lc, scores = _data(seed=1)
    k, v, out_lc, _ = guided_merge(keys, values, lc, 80, scores=scores, sink_tokens=4, window=10,
                                   exact_share=0.0, min_similarity=-1.0, neighbourhood=120)
    torch.testing.assert_close(out_lc.exp().sum(-1), torch.full((2, 3), 120.0))


def test_guided_drops_entries_below_the_similarity_floor():
    keys, values, lc, scores = _data(seed=2)
    _, _, out_lc, _ = guided_merge(keys, values, lc, 80, scores=scores, sink_tokens=4, window=10,
                                   exact_share=0.0, min_similarity=1.0, neighbourhood=120)  # nothing is that similar
    assert torch.equal(out_lc, torch.zeros_like(out_lc))


def test_guided_is_exact_on_identical_tokens():
    g = torch.Generator().manual_seed(4)
    key, value = torch.randn(1, 2, 1, 8, generator=g), torch.randn(1, 2, 1, 8, generator=g)
    keys, values = key.expand(1, 2, 64, 8).clone(), value.expand(1, 2, 64, 8).clone()
    scores = torch.rand(1, 2, 64, generator=g)
    k, v, lc, _ = guided_merge(keys, values, torch.zeros(1, 2, 64), 48, scores=scores, sink_tokens=0, window=0,
                               exact_share=0.25, min_similarity=-1.0, neighbourhood=64)
    query = torch.randn(1, 4, 1, 8, generator=g)
    want = weighted_attention(query, keys, values)
    got = weighted_attention(query, k, v, lc)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(lc.exp().sum(-1), torch.full((1, 2), 64.0))


def test_layer_shares_sum_to_the_budget_follow_the_scores_and_respect_the_floor():
    g = torch.Generator().manual_seed(0)
    low, high = torch.rand(2, 2, 500, generator=g) * 0.1, torch.rand(2, 2, 500, generator=g)
    shares = layer_shares([low, high, high.clone()], 100, floor=0.2)
    assert sum(shares) == 300
    assert shares[0] == 20 and shares[1] > 100 and shares[2] > 100
    assert layer_shares([low, high], 100, floor=1.0) == [100, 100]
    assert layer_shares([low[..., :50], high[..., :50]], 100) == [50, 50]  # all fits


def test_profile_shares_split_the_budget_as_the_scores_they_summarise_would():
    g = torch.Generator().manual_seed(1)
    low, high = torch.rand(2, 2, 500, generator=g) * 0.1, torch.rand(2, 2, 500, generator=g)
    profile = torch.stack([score_profile(s, points=1000) for s in (low, high, high)])
    assert bool((profile[:, 1:] <= profile[:, :-1]).all()) and profile[1, 0] == high.max() and profile[1, -1] == high.min()
    shares = profile_shares(profile, 100, 500, floor=0.2)
    assert sum(shares) == 300 and shares[0] == 20
    want = layer_shares([low, high, high.clone()], 100, floor=0.2)
    assert all(abs(a - b) <= 3 for a, b in zip(shares, want))  # quantiles of pooled rows, not each row's ranks
    # A profile holds no length: the same distributions split a longer context's region alike.
    assert [s // 4 for s in profile_shares(profile, 400, 2000, floor=0.2)] == [s for s in shares]
    assert profile_shares(profile, 600, 500) == [500] * 3 and profile_shares(profile[:, :0].reshape(0, 0), 10, 50) == []
    assert profile_shares(torch.ones(3, 16), 100, 500) == [100, 100, 100]  # alike layers: an even split


def _tiny(layers=3):
    from chelsea.errors import MissingDependencyError
    from chelsea.models import resolve

    try:  # the built-in model's tokenizer (CI installs it; a bare GPU machine may not have it)
        path, extra = resolve("smollm2-135m")
    except MissingDependencyError as err:
        pytest.skip(str(err))
    tokenizer = AutoTokenizer.from_pretrained(path, **extra)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096)
    model = LlamaForCausalLM(config).eval()
    return model, tokenizer


def test_local_reconstruction_attends_only_to_sinks_the_chunk_and_itself():
    g = torch.Generator().manual_seed(0)
    query = torch.randn(2, 4, 6, 8, generator=g)
    key, value = torch.randn(2, 2, 46, 8, generator=g), torch.randn(2, 2, 46, 8, generator=g)
    scores = torch.zeros(2, 2, 40)
    out = Reconstruction(40, 10, 20, 4, "local").attend(query, key, value, None, None, scores)
    visible = torch.cat([torch.arange(4), torch.arange(10, 20), torch.arange(40, 46)])
    torch.testing.assert_close(out, weighted_attention(query, key[:, :, visible], value[:, :, visible]))
    assert bool((scores[..., 4:10] == 0).all()) and bool((scores[..., 20:] == 0).all())
    assert bool((scores[..., 10:20] > 0).all()) and bool((scores <= 1).all())
    full = Reconstruction(40, 10, 20, 4, "full").attend(query, key, value, None, None, torch.zeros(2, 2, 40))
    torch.testing.assert_close(full, weighted_attention(query, key, value))


@pytest.mark.parametrize("block_bytes", [1 << 30, 200])
@pytest.mark.parametrize("weighted", [False, True])
def test_reconstruction_scores_are_the_largest_attention_each_entry_receives(block_bytes, weighted):
    """Against the softmax written out: every query head of a KV head, every repeating query,
    over the sinks, the chunk and the repeat itself (causal), log-counts added; blocks of queries
    give the same scores as one block."""
    g = torch.Generator().manual_seed(3)
    query = torch.randn(1, 4, 6, 8, generator=g) * 2
    key, value = torch.randn(1, 2, 46, 8, generator=g), torch.randn(1, 2, 46, 8, generator=g)
    counts = torch.randn(1, 2, 46, generator=g).clamp(min=0) if weighted else None
    scores = torch.full((1, 2, 40), 0.01)
    Reconstruction(40, 10, 20, 4, "local", max_block_bytes=block_bytes).attend(query, key, value, counts, None, scores)
    visible = torch.cat([torch.arange(4), torch.arange(10, 20), torch.arange(40, 46)])
    logits = query.reshape(1, 2, 2, 6, 8) @ key[:, :, None, visible].transpose(-1, -2) / 8**0.5
    if weighted:
        logits = logits + counts[:, :, None, None, visible]
    own = torch.arange(6)
    logits[..., 14:] = logits[..., 14:].masked_fill(own[None, :] > own[:, None], float("-inf"))
    want = logits.softmax(-1)[..., :14].amax(dim=(2, 3))
    torch.testing.assert_close(scores[..., visible[:14]], want.clamp(min=0.01))
    assert bool((scores[..., 4:10] == 0.01).all())  # entries outside the chunk keep their earlier score


def test_output_norm_weighs_each_query_heads_attention_by_what_the_value_adds_to_its_output():
    """With ``output_norm`` an entry's score is the largest over query heads and queries of its
    attention times ``||W_h v||`` (``W_h`` the head's block of ``o_proj``), divided by the mean
    of that norm over the scored entries; the plain scores are the same without the factor."""
    g = torch.Generator().manual_seed(4)
    query = torch.randn(1, 4, 6, 8, generator=g) * 2
    key, value = torch.randn(1, 2, 46, 8, generator=g), torch.randn(1, 2, 46, 8, generator=g)
    attention = torch.nn.Module()
    attention.o_proj, attention.head_dim = torch.nn.Linear(4 * 8, 16, bias=False), 8
    torch.nn.init.normal_(attention.o_proj.weight, generator=g)
    gram = output_gram(attention, kv_heads=2)
    scores = torch.zeros(1, 2, 40)
    Reconstruction(40, 10, 20, 4, "local", output_gram=gram).attend(query, key, value, None, None, scores)
    visible = torch.cat([torch.arange(4), torch.arange(10, 20), torch.arange(40, 46)])
    logits = query.reshape(1, 2, 2, 6, 8) @ key[:, :, None, visible].transpose(-1, -2) / 8**0.5
    own = torch.arange(6)
    logits[..., 14:] = logits[..., 14:].masked_fill(own[None, :] > own[:, None], float("-inf"))
    probs = logits.softmax(-1)[..., :14]  # [1, kv, group, query, entry]
    blocks = attention.o_proj.weight.detach().view(16, 4, 8)  # [hidden, query head, d]
    out = torch.stack([(blocks[:, h] @ value[0, h // 2, visible[:14]].T).norm(dim=0) for h in range(4)]).view(1, 2, 2, 14)
    weight = out / out.mean(-1, keepdim=True)
    want = (probs * weight[:, :, :, None, :]).amax(dim=(2, 3))
    torch.testing.assert_close(scores[..., visible[:14]], want, rtol=1e-5, atol=1e-7)
    plain = torch.zeros(1, 2, 40)
    Reconstruction(40, 10, 20, 4, "local").attend(query, key, value, None, None, plain)
    assert not torch.allclose(plain[..., visible[:14]], scores[..., visible[:14]])


def test_output_norm_scoring_runs_on_a_model():
    model, tokenizer = _tiny()
    use_method(model, "kvzip")
    ids = torch.randint(0, 1000, (1, 300), generator=torch.Generator().manual_seed(2))
    caches = {}
    for norm in (False, True):
        cache = ClusteredCache(CompressionConfig(ratio=0.8, window=16, output_norm=norm), compressor=COMPRESSORS["kvzip"])
        compress_context(model, cache, ids, tokenizer, chunk_size=128)
        caches[norm] = cache
        assert all(layer.seen == 300 for layer in cache.layers)
        assert sum(layer.length for layer in cache.layers) == len(cache.layers) * 60
    assert any(not torch.equal(a.keys, b.keys) for a, b in zip(caches[False].layers, caches[True].layers))
    with pytest.raises(ChelseaError, match="no-output-norm"):  # a model without attention modules to weigh by
        output_grams(torch.nn.Linear(4, 4), caches[True])


@pytest.mark.parametrize("method", ["kvzip", "guided"])
def test_compress_context_scores_compresses_and_keeps_the_context(method):
    model, tokenizer = _tiny()
    use_method(model, method)
    ids = torch.randint(0, 1000, (2, 400), generator=torch.Generator().manual_seed(1))
    cache = ClusteredCache(CompressionConfig(ratio=0.8, window=16), compressor=COMPRESSORS[method])
    compress_context(model, cache, ids[:, :300], tokenizer, chunk_size=128)
    assert all(layer.seen == 300 for layer in cache.layers)
    lengths = [layer.length for layer in cache.layers]
    assert sum(lengths) == len(lengths) * 60 and len(set(lengths)) > 1  # uneven layers, same total
    stats = cache.stats()
    assert stats["kv_bytes"] < 0.25 * stats["kv_bytes_full"]
    out = model.generate(input_ids=ids, past_key_values=cache, max_new_tokens=5, min_new_tokens=5, do_sample=False)
    assert out.shape == (2, 405) and cache.layers[0].seen == 404


def test_reconstruction_leaves_the_cache_as_the_prefill_left_it():
    model, tokenizer = _tiny(layers=2)
    use_method(model, "kvzip")
    ids = torch.randint(0, 1000, (1, 200), generator=torch.Generator().manual_seed(2))
    cache = ClusteredCache(CompressionConfig(ratio=0.5), compressor=kvzip_evict)
    with cache.held():
        model(ids, past_key_values=cache)
        before = [layer.keys.clone() for layer in cache.layers]
        score_by_reconstruction(model, cache, ids, tokenizer, chunk_size=64)
    for layer, keys in zip(cache.layers, before):
        assert layer.length == layer.seen == 200 and torch.equal(layer.keys, keys)
        assert bool((layer.scores >= 0).all()) and bool((layer.scores <= 1).all()) and float(layer.scores.max()) > 0
    assert len(repeat_prompts(tokenizer, ids, 64)) == 4


def test_local_repeats_side_by_side_give_the_scores_of_one_chunk_at_a_time():
    """The local view's batched repeats (chunks as rows of a cache holding the sinks and each
    row's chunk) score as repeating one chunk at a time after the whole context does."""
    model, tokenizer = _tiny(layers=2)
    use_method(model, "kvzip")
    ids = torch.randint(0, 1000, (2, 300), generator=torch.Generator().manual_seed(5))

    def prefilled():
        cache = ClusteredCache(CompressionConfig(ratio=0.5), compressor=kvzip_evict)
        with cache.held(), torch.no_grad():
            model(ids, past_key_values=cache)
        for layer in cache.layers:
            layer.scores.zero_()
        return cache

    one_at_a_time = prefilled()
    grams = output_grams(model, one_at_a_time)  # output_norm is on by default
    with one_at_a_time.held(), torch.no_grad():
        for lo, hi, prompt in repeat_prompts(tokenizer, ids, 64):  # 0-64 (no overlap), three of 64, 256-300
            for layer, gram in zip(one_at_a_time.layers, grams):
                layer.reconstruction = Reconstruction(300, lo, hi, 4, "local", output_gram=gram)
            model(input_ids=prompt, past_key_values=one_at_a_time)
            for layer in one_at_a_time.layers:
                layer.reconstruction, layer.length, layer.seen = None, 300, 300
    for batch_tokens in (1, 10**6):
        side = prefilled()
        with side.held():
            score_by_reconstruction(model, side, ids, tokenizer, chunk_size=64, batch_tokens=batch_tokens)
        for want, got in zip(one_at_a_time.layers, side.layers):
            assert got.length == got.seen == 300
            assert float(want.scores[..., :4].min()) > 0 and float(want.scores[..., 4:].min()) > 0
            torch.testing.assert_close(got.scores, want.scores, rtol=1e-5, atol=1e-7)


def test_question_attention_is_the_largest_probability_and_combines_with_reconstruction_by_maximum():
    """With the question in the prompt, the prefill scores each entry by the largest attention the
    last queries give it (a probability, as the written-out softmax gives), and reconstruction
    keeps the larger of that and its own score."""
    from chelsea.methods._attention_scores import largest_attention_received, probability_blocks

    g = torch.Generator().manual_seed(4)
    query, key = torch.randn(1, 4, 40, 8, generator=g) * 2, torch.randn(1, 2, 90, 8, generator=g)
    got = largest_attention_received(query, key, last=5, max_block_bytes=300)
    want = torch.cat([p for _, _, p in probability_blocks(query, key, first=35)], dim=3).amax(dim=(2, 3))
    torch.testing.assert_close(got, want)
    assert bool((got[..., :-1] > 0).all()) and float(got.max()) <= 1

    model, tokenizer = _tiny(layers=2)
    use_method(model, "guided")
    ids = torch.randint(0, 1000, (1, 200), generator=torch.Generator().manual_seed(2))

    def scores(question: bool, reconstruct: bool):
        cache = ClusteredCache(CompressionConfig(ratio=0.5), compressor=guided_merge)
        with cache.held(question=question), torch.no_grad():
            model(ids, past_key_values=cache)
            if reconstruct:
                # one chunk: the repeat's softmax spans twice the context, so the question's is larger in places
                score_by_reconstruction(model, cache, ids, tokenizer, chunk_size=256, keep_scores=question)
        return [layer.scores.clone() for layer in cache.layers]

    asked, rebuilt, both = scores(True, False), scores(False, True), scores(True, True)
    for a, r, b in zip(asked, rebuilt, both):
        assert float(a.max()) <= 1 and float(a[..., :100].max()) > 0
        torch.testing.assert_close(b, torch.maximum(a, r))
        assert bool((b > r).any())  # the question's attention raised some entries


def test_reconstruction_refuses_other_methods_and_padding():
    model, tokenizer = _tiny(layers=1)
    use_method(model, "chelsea")
    ids = torch.randint(0, 1000, (1, 100))
    cache = ClusteredCache(ratio=0.5)
    model(ids, past_key_values=cache)
    with pytest.raises(Exception, match="ranks by importance"):
        score_by_reconstruction(model, cache, ids, tokenizer)


def test_one_compressed_context_serves_several_questions_through_copies():
    import copy

    model, tokenizer = _tiny(layers=2)
    use_method(model, "guided")
    g = torch.Generator().manual_seed(3)
    context, q1, q2 = torch.randint(0, 1000, (1, 300), generator=g), torch.randint(0, 1000, (1, 9), generator=g), torch.randint(0, 1000, (1, 7), generator=g)
    config = CompressionConfig(ratio=0.8, window=16)
    shared = ClusteredCache(config, compressor=guided_merge)
    compress_context(model, shared, context, tokenizer, chunk_size=128)
    for question in (q1, q2):
        fresh = ClusteredCache(config, compressor=guided_merge)
        compress_context(model, fresh, context, tokenizer, chunk_size=128)
        ids = torch.cat([context, question], dim=1)
        want = model.generate(input_ids=ids, past_key_values=fresh, max_new_tokens=6, min_new_tokens=6, do_sample=False)
        got = model.generate(input_ids=ids, past_key_values=copy.deepcopy(shared), max_new_tokens=6, min_new_tokens=6, do_sample=False)
        assert torch.equal(got, want)
    assert all(layer.seen == 300 for layer in shared.layers)  # the shared copy is untouched


def test_calibration_prompts_have_the_length_and_mark_exactly_the_codes():
    from chelsea.fact_heads import calibration_prompts

    _, tokenizer = _tiny()
    ids, positions = calibration_prompts(tokenizer, prompts=2, length=600, codes=5)
    assert ids.shape == (2, 600)
    again, _ = calibration_prompts(tokenizer, prompts=2, length=600, codes=5)
    assert torch.equal(ids, again)  # seeded
    for row, pos in zip(ids, positions):
        codes = tokenizer.decode(row[pos]).split()
        assert len(codes) == 5 and all(any(c.isdigit() for c in code) and code.replace("-", "").isalnum() for code in codes)
        assert all(b == a + 1 for a, b in zip(pos, pos[1:]) if b - a < 3)


def test_fact_heads_are_the_heads_that_rank_the_codes_highest_and_their_agreement_outranks_every_layer():
    from chelsea.fact_heads import choose_heads, consensus, head_hits, lend_ranks

    g = torch.Generator().manual_seed(0)
    scores = [torch.rand(2, 2, 100, generator=g) for _ in range(3)]
    positions = [[20, 21, 50], [30, 70, 71]]
    for row, pos in enumerate(positions):  # layer 1's head 0 and layer 2's head 1 find the codes
        scores[1][row, 0, pos] = 5.0
        scores[2][row, 1, pos] = 3.0
    hits = head_hits(scores, positions, lo=4, window=8)
    assert hits.shape == (3, 2) and hits[1, 0] == 1 and hits[2, 1] == 1 and float(hits[0].max()) < 1
    heads = choose_heads(hits, 2)
    assert set(heads.heads) == {(1, 0), (2, 1)} and heads.hit_rate == (1.0, 1.0)
    assert len(choose_heads(hits, 7).heads) == 6  # a model with fewer heads than asked: all of them
    with pytest.raises(ChelseaError, match="fact_heads"):
        choose_heads(hits, 0)
    agreed = consensus(scores, heads, lo=4, window=8)
    assert agreed.shape == (2, 88)
    for row, pos in enumerate(positions):
        assert bool((agreed[row, [p - 4 for p in pos]] > 0.96).all())
    region = scores[0][:, :, 4:92]  # a layer that does not see the codes: with a large weight it keeps them first
    ranked = lend_ranks(region, agreed, 100.0)
    for row, pos in enumerate(positions):
        top = set(ranked[row].topk(3, dim=-1).indices.flatten().tolist())
        assert top == {p - 4 for p in pos}
    assert torch.equal(lend_ranks(region, agreed, 0.0).argsort(-1), region.argsort(-1))  # weight 0: the layer's own order


def test_fact_weight_keeps_the_layer_budgets_and_calibrates_once_per_model():
    model, tokenizer = _tiny()
    use_method(model, "guided")
    ids = torch.randint(0, 1000, (1, 400), generator=torch.Generator().manual_seed(1))
    caches = {}
    for weight in (0.0, 3.0):
        cache = ClusteredCache(CompressionConfig(ratio=0.8, window=16, fact_weight=weight, fact_heads=3, repeat_depth="all"),
                               compressor=COMPRESSORS["guided"])
        compress_context(model, cache, ids[:, :300], tokenizer, chunk_size=128)
        caches[weight] = cache
    assert [layer.length for layer in caches[0.0].layers] == [layer.length for layer in caches[3.0].layers]
    assert any(not torch.equal(a.keys, b.keys) for a, b in zip(caches[0.0].layers, caches[3.0].layers))
    memo = model._chelsea_fact_heads
    assert len(memo) == 1 and len(next(iter(memo.values())).heads) == 3
    found = next(iter(memo.values()))
    compress_context(model, ClusteredCache(caches[3.0].config, compressor=COMPRESSORS["guided"]), ids[:, :300], tokenizer)
    assert next(iter(model._chelsea_fact_heads.values())) is found  # not calibrated again
    out = model.generate(input_ids=ids, past_key_values=caches[3.0], max_new_tokens=3, min_new_tokens=3, do_sample=False)
    assert out.shape == (1, 403)


def test_fact_heads_are_stored_for_the_same_weights_and_calibrated_again_for_others(tmp_path, monkeypatch):
    import chelsea.importance as importance
    from chelsea.importance import find_fact_heads

    monkeypatch.setenv("CHELSEA_CACHE_DIR", str(tmp_path))
    model, tokenizer = _tiny(layers=2)
    use_method(model, "guided")
    cache = ClusteredCache(CompressionConfig(ratio=0.8, window=16, fact_heads=3), compressor=COMPRESSORS["guided"])
    found = find_fact_heads(model, tokenizer, cache)
    assert len(list((tmp_path / "fact_heads").glob("*.json"))) == 1
    twin, _ = _tiny(layers=2)  # the same weights in a new process would find the file
    with monkeypatch.context() as m:
        m.setattr(importance, "calibration_prompts", lambda *a, **k: pytest.fail("calibrated again"))
        assert find_fact_heads(twin, tokenizer, cache) == found
    with torch.no_grad():
        twin.model.layers[0].self_attn.q_proj.weight.mul_(2.0)
    other = importance._stored_fact_heads(twin, ("any",))
    assert other != importance._stored_fact_heads(model, ("any",))


def test_chelsea_is_importance_guided_merging_and_the_paper_version_stays_reachable(tmp_path, monkeypatch):
    from chelsea.generation import generate
    from chelsea.methods import chunked_soft_matching

    monkeypatch.setenv("CHELSEA_CACHE_DIR", str(tmp_path))
    assert COMPRESSORS["chelsea"] is guided_merge and COMPRESSORS["guided"] is guided_merge
    assert COMPRESSORS["chelsea-paper"] is chunked_soft_matching
    model, tokenizer = _tiny()
    ids = torch.randint(0, 1000, (1, 300), generator=torch.Generator().manual_seed(3))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    config = CompressionConfig(ratio=0.8, window=16, fact_heads=3)
    default = generate(model, tokenizer, inputs, config=config, max_new_tokens=4, cuda_graph=False)
    assert len(model._chelsea_fact_heads) == 1  # the default scored the context and asked the fact heads
    old_name = generate(model, tokenizer, inputs, method="guided", config=config, max_new_tokens=4, cuda_graph=False)
    paper = generate(model, tokenizer, inputs, method="chelsea-paper", config=config, max_new_tokens=4, cuda_graph=False)
    assert default.method == "chelsea" and paper.method == "chelsea-paper"
    assert (default.tokens, default.kv_bytes) == (old_name.tokens, old_name.kv_bytes)
    assert default.kv_bytes < 0.3 * default.kv_bytes_full and paper.kv_bytes < 0.3 * paper.kv_bytes_full


def test_a_shallow_repeat_scores_only_its_layers_and_stops_the_forward_there():
    from chelsea.compat import cache_arg

    model, tokenizer = _tiny(layers=3)
    use_method(model, "chelsea")
    ids = torch.randint(0, 1000, (1, 300), generator=torch.Generator().manual_seed(4))
    config = CompressionConfig(ratio=0.8, window=16)
    calls = []
    hook = model.model.layers[2].register_forward_pre_hook(lambda *_: calls.append(1))
    runs = {}
    for depth in (None, 2):
        cache = ClusteredCache(config, compressor=guided_merge)
        with cache.held(), torch.no_grad():
            model(ids, **cache_arg(model, cache), use_cache=True)
            before = [layer.scores.clone() for layer in cache.layers]
            calls.clear()
            score_by_reconstruction(model, cache, ids, tokenizer, chunk_size=128, depth=depth)
        runs[depth] = (cache, before, len(calls))
    hook.remove()
    with pytest.raises(ChelseaError, match="depth"):
        score_by_reconstruction(model, runs[2][0], ids, tokenizer, depth=0)
    (full, _, full_calls), (shallow, before, shallow_calls) = runs[None], runs[2]
    assert full_calls > 0 and shallow_calls == full_calls  # the deepest layer is entered, its attention ends the forward
    for i in range(2):
        assert torch.equal(shallow.layers[i].scores, full.layers[i].scores)
    assert torch.equal(shallow.layers[2].scores, before[2]) and not torch.equal(full.layers[2].scores, before[2])
    assert all(layer.length == 300 and layer.seen == 300 for layer in shallow.layers)
    shallow.compress_all(even=frozenset({2}))
    budget = config.budget(300)
    assert shallow.layers[2].length == budget  # the unscored layer keeps an even share
    assert sum(layer.length for layer in shallow.layers) == 3 * budget  # the scored ones split the rest


@pytest.mark.parametrize("view", ["local", "full"])
def test_the_repeat_scores_only_the_layers_it_is_told_and_the_others_keep_theirs(view):
    from chelsea.compat import cache_arg

    model, tokenizer = _tiny(layers=3)
    use_method(model, "chelsea")
    ids = torch.randint(0, 1000, (1, 300), generator=torch.Generator().manual_seed(6))
    runs = {}
    for scored in (None, frozenset({0, 2})):
        cache = ClusteredCache(CompressionConfig(ratio=0.8, window=16), compressor=guided_merge)
        with cache.held(), torch.no_grad():
            model(ids, **cache_arg(model, cache), use_cache=True)
            before = [layer.scores.clone() for layer in cache.layers]
            score_by_reconstruction(model, cache, ids, tokenizer, chunk_size=128, view=view, scored=scored)
        runs[scored] = (cache, before)
    (every, _), (some, before) = runs[None], runs[frozenset({0, 2})]
    for i in (0, 2):  # an unscored layer still attends: the deeper layer's scores are the same
        assert torch.allclose(some.layers[i].scores, every.layers[i].scores)
    assert torch.equal(some.layers[1].scores, before[1]) and not torch.equal(every.layers[1].scores, before[1])
    assert all(layer.length == 300 and layer.seen == 300 for layer in some.layers)


def _tiny_chelsea(tmp_path, monkeypatch):
    """A 3-layer tiny model set up for ``chelsea``, its fact heads stored under ``tmp_path``, and a 300-token context."""
    monkeypatch.setenv("CHELSEA_CACHE_DIR", str(tmp_path))
    model, tokenizer = _tiny(layers=3)
    use_method(model, "chelsea")
    return model, tokenizer, torch.randint(0, 1000, (1, 300), generator=torch.Generator().manual_seed(5))


def _record_repeat_options(monkeypatch) -> dict:
    """The keyword arguments of the next ``score_by_reconstruction`` call, which still runs."""
    import chelsea.importance as importance

    seen = {}
    real = importance.score_by_reconstruction
    monkeypatch.setattr(importance, "score_by_reconstruction", lambda *a, **k: seen.update(k) or real(*a, **k))
    return seen


def test_score_layers_facts_scores_the_fact_heads_layers_and_gives_the_others_an_even_budget(tmp_path, monkeypatch):
    import chelsea.importance as importance

    model, tokenizer, ids = _tiny_chelsea(tmp_path, monkeypatch)
    config = CompressionConfig(ratio=0.8, window=16, fact_heads=1, repeat_depth="all", score_layers="facts")
    (fact_layer, _), = importance.find_fact_heads(model, tokenizer, ClusteredCache(config, compressor=guided_merge)).heads
    seen = _record_repeat_options(monkeypatch)
    cache = ClusteredCache(config, compressor=guided_merge)
    compress_context(model, cache, ids, tokenizer, chunk_size=128)
    assert seen["scored"] == {fact_layer} and seen["depth"] is None
    budget = config.budget(300)
    assert all(layer.length == budget for i, layer in enumerate(cache.layers) if i != fact_layer)
    assert sum(layer.length for layer in cache.layers) == 3 * budget
    with pytest.raises(ChelseaError, match="score_layers"):
        CompressionConfig(score_layers="some")


def test_calibrated_budgets_come_from_the_calibration_profile_and_need_no_surprisal(tmp_path, monkeypatch):
    import chelsea.importance as importance

    model, tokenizer, ids = _tiny_chelsea(tmp_path, monkeypatch)
    config = CompressionConfig(ratio=0.8, window=16, fact_heads=1, repeat_depth="all", layer_budgets="calibrated")
    heads = importance.find_fact_heads(model, tokenizer, ClusteredCache(config, compressor=guided_merge))
    assert len(heads.profile) == 3 and all(len(p) == 256 for p in heads.profile)
    (fact_layer, _), = heads.heads
    seen = _record_repeat_options(monkeypatch)
    monkeypatch.setattr(importance, "_prefill_with_surprisal", lambda *a, **k: pytest.fail("surprisal computed"))
    cache = ClusteredCache(config, compressor=guided_merge)
    compress_context(model, cache, ids, tokenizer, chunk_size=128)
    assert seen["scored"] == {fact_layer}  # only the fact heads' layers are scored
    keep = config.budget(300) - config.sink_tokens - config.window
    shares = profile_shares(torch.tensor(heads.profile), keep, 300 - config.sink_tokens - config.window, config.layer_floor)
    assert [layer.length for layer in cache.layers] == [config.sink_tokens + config.window + s for s in shares]
    assert sum(layer.length for layer in cache.layers) == 3 * config.budget(300)
    with pytest.raises(ChelseaError, match="layer_budgets"):
        CompressionConfig(layer_budgets="even")
    with pytest.raises(ChelseaError, match="fact_weight"):
        CompressionConfig(layer_budgets="calibrated", fact_weight=0)


def test_repeat_depth_facts_stops_after_the_deepest_fact_head(tmp_path, monkeypatch):
    import chelsea.importance as importance

    model, tokenizer, ids = _tiny_chelsea(tmp_path, monkeypatch)
    config = CompressionConfig(ratio=0.8, window=16, fact_heads=1, repeat_depth="facts")
    deepest = max(layer for layer, _ in importance.find_fact_heads(model, tokenizer, ClusteredCache(config, compressor=guided_merge)).heads)
    seen = _record_repeat_options(monkeypatch)
    cache = ClusteredCache(config, compressor=guided_merge)
    compress_context(model, cache, ids, tokenizer, chunk_size=128)
    assert seen["depth"] == deepest + 1
    assert all(layer.length == config.budget(300) for layer in cache.layers[deepest + 1 :])
    assert sum(layer.length for layer in cache.layers) == 3 * config.budget(300)
    with pytest.raises(ChelseaError, match="repeat_depth"):
        CompressionConfig(repeat_depth="half")


def test_fact_layers_keeps_the_fact_heads_and_the_repeat_in_the_first_layers(tmp_path, monkeypatch):
    import chelsea.importance as importance

    model, tokenizer, ids = _tiny_chelsea(tmp_path, monkeypatch)
    config = CompressionConfig(ratio=0.8, window=16, fact_heads=4, fact_layers=1, repeat_chunk=96)
    heads = importance.find_fact_heads(model, tokenizer, ClusteredCache(config, compressor=guided_merge))
    assert {layer for layer, _ in heads.heads} == {0}
    wider = importance.find_fact_heads(model, tokenizer, ClusteredCache(replace(config, fact_layers=None), compressor=guided_merge))
    assert any(layer > 0 for layer, _ in wider.heads)  # 4 heads from 2 KV heads per layer: not all in layer 0
    seen = _record_repeat_options(monkeypatch)
    cache = ClusteredCache(config, compressor=guided_merge)
    compress_context(model, cache, ids, tokenizer)
    assert seen["depth"] == 1 and seen["chunk_size"] == 96  # the config's repeat chunk, when none is passed
    assert sum(layer.length for layer in cache.layers) == 3 * config.budget(300)
    for bad in ({"fact_layers": 0}, {"repeat_chunk": 8}):
        with pytest.raises(ChelseaError, match=next(iter(bad))):
            CompressionConfig(**bad)


def test_in_forward_scores_rank_every_entry_by_the_newest_block_until_a_context_pass_scored_them(monkeypatch):
    import chelsea.cache as cache_module

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)).eval()
    use_method(model, "kvzip")
    calls = []

    def numbered(query, key, log_counts=None, **_):  # the n-th scoring gives every entry 1 / n
        calls.append(1)
        return torch.full(key.shape[:3], 1.0 / len(calls))

    monkeypatch.setattr(cache_module, "attention_mass", numbered)
    ids = torch.randint(0, 256, (1, 200))
    config = CompressionConfig(ratio=0.5, window=16)
    cache = ClusteredCache(config, compressor=kvzip_evict)
    with torch.no_grad():
        model(ids[:, :100], past_key_values=cache, use_cache=True)
        model(ids[:, 100:], past_key_values=cache, use_cache=True)
    assert cache.layers[0].keys.shape[2] == config.budget(200)
    assert torch.all(cache.layers[0].scores == 1.0 / 3)  # layer 0's scoring in the second forward, old entries too

    calls.clear()
    scored = ClusteredCache(config, compressor=kvzip_evict)
    compress_context(model, scored, ids[:, :100], reconstruct=None)  # the prompt's own last queries: 1 / 1 in layer 0
    assert not any(layer.rescore for layer in scored.layers)
    with torch.no_grad():
        model(ids[:, 100:], past_key_values=scored, use_cache=True)
    kept = scored.layers[0].scores
    assert bool((kept == 1.0).any()) and bool((kept == 1.0 / 3).any())  # the context's scores stay beside the new ones


def test_token_surprisal_is_minus_the_log_probability_of_each_next_token():
    model, _ = _tiny(layers=2)
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
    keys, values, _, _ = _data(batch=3, heads=2, length=40)
    cache = ClusteredCache(CompressionConfig(ratio=0.5), compressor=kvzip_evict)
    side = cache.holding([(keys, values), None], room=12)
    layer = side.layers[0]
    assert not side.layers[1].is_initialized
    assert layer.length == layer.seen == 40 and torch.equal(layer.keys, keys) and torch.equal(layer.values, values)
    assert bool((layer.log_counts == 0).all()) and bool((layer.scores == 0).all())
    buffer = layer._key_buf.data_ptr()
    more = torch.randn(3, 2, 12, 8)
    layer.update(more, more)
    assert layer._key_buf.data_ptr() == buffer and torch.equal(layer.keys[:, :, 40:], more)
