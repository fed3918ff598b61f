"""Context reconstruction: the repeat's attention and scores, its views, depth and layers, and
compress_context around it."""

import copy
from types import SimpleNamespace

import pytest
import torch
from tiny import tiny_with_tokenizer

from chelsea import ChelseaError, ClusteredCache, CompressionConfig
from chelsea.attention import weighted_attention
from chelsea.compat import cache_arg
from chelsea.runtime import use_method
from chelsea.scoring.budgets import split_budgets
from chelsea.scoring import (Reconstruction, compress_context, output_gram, output_grams, repeat_prompts,
                             score_by_reconstruction)


def test_local_reconstruction_attends_only_to_sinks_the_chunk_and_itself():
    g = torch.Generator().manual_seed(0)
    query = torch.randn(2, 4, 6, 8, generator=g)
    key, value = torch.randn(2, 2, 46, 8, generator=g), torch.randn(2, 2, 46, 8, generator=g)
    scores = torch.zeros(2, 2, 40)
    out = Reconstruction(40, 10, 20, 4, "local").attend(SimpleNamespace(scores=scores), query, key, value, None, None)
    visible = torch.cat([torch.arange(4), torch.arange(10, 20), torch.arange(40, 46)])
    torch.testing.assert_close(out, weighted_attention(query, key[:, :, visible], value[:, :, visible]))
    assert bool((scores[..., 4:10] == 0).all()) and bool((scores[..., 20:] == 0).all())
    assert bool((scores[..., 10:20] > 0).all()) and bool((scores <= 1).all())
    full = Reconstruction(40, 10, 20, 4, "full").attend(SimpleNamespace(scores=torch.zeros(2, 2, 40)), query, key, value, None, None)
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
    Reconstruction(40, 10, 20, 4, "local", max_block_bytes=block_bytes).attend(SimpleNamespace(scores=scores), query, key, value, counts, None)
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
    Reconstruction(40, 10, 20, 4, "local", output_gram=gram).attend(SimpleNamespace(scores=scores), query, key, value, None, None)
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
    Reconstruction(40, 10, 20, 4, "local").attend(SimpleNamespace(scores=plain), query, key, value, None, None)
    assert not torch.allclose(plain[..., visible[:14]], scores[..., visible[:14]])


def test_output_norm_scoring_runs_on_a_model():
    model, tokenizer = tiny_with_tokenizer()
    use_method(model, "kvzip")
    ids = torch.randint(0, 1000, (1, 300), generator=torch.Generator().manual_seed(2))
    caches = {}
    for norm in (False, True):
        cache = ClusteredCache(method="kvzip", ratio=0.8, window=16, output_norm=norm)
        compress_context(model, cache, ids, tokenizer, chunk_size=128)
        caches[norm] = cache
        assert all(layer.seen == 300 for layer in cache.layers)
        assert sum(layer.length for layer in cache.layers) == len(cache.layers) * 60
    assert any(not torch.equal(a.keys, b.keys) for a, b in zip(caches[False].layers, caches[True].layers))
    with pytest.raises(ChelseaError, match="no-output-norm"):  # a model without attention modules to weigh by
        output_grams(torch.nn.Linear(4, 4), caches[True])


@pytest.mark.parametrize("method", ["kvzip", "chelsea"])
def test_compress_context_scores_compresses_and_keeps_the_context(method):
    model, tokenizer = tiny_with_tokenizer()
    use_method(model, method)
    ids = torch.randint(0, 1000, (2, 400), generator=torch.Generator().manual_seed(1))
    cache = ClusteredCache(method=method, ratio=0.8, window=16)
    compress_context(model, cache, ids[:, :300], tokenizer, chunk_size=128)
    assert all(layer.seen == 300 for layer in cache.layers)
    lengths = [layer.length for layer in cache.layers]
    assert sum(lengths) == len(lengths) * 60 and len(set(lengths)) > 1  # uneven layers, same total
    stats = cache.stats()
    assert stats["kv_bytes"] < 0.25 * stats["kv_bytes_full"]
    out = model.generate(input_ids=ids, **cache_arg(model, cache), max_new_tokens=5, min_new_tokens=5, do_sample=False)
    assert out.shape == (2, 405) and cache.layers[0].seen == 404


def test_reconstruction_leaves_the_cache_as_the_prefill_left_it():
    model, tokenizer = tiny_with_tokenizer(layers=2)
    use_method(model, "kvzip")
    ids = torch.randint(0, 1000, (1, 200), generator=torch.Generator().manual_seed(2))
    cache = ClusteredCache(method="kvzip", ratio=0.5)
    with cache.held():
        model(ids, **cache_arg(model, cache))
        before = [layer.keys.clone() for layer in cache.layers]
        score_by_reconstruction(model, cache, ids, tokenizer, chunk_size=64)
    for layer, keys in zip(cache.layers, before):
        assert layer.length == layer.seen == 200 and torch.equal(layer.keys, keys)
        assert bool((layer.scores >= 0).all()) and bool((layer.scores <= 1).all()) and float(layer.scores.max()) > 0
    assert len(repeat_prompts(tokenizer, ids, 64)) == 4


def test_local_repeats_side_by_side_give_the_scores_of_one_chunk_at_a_time():
    """The local view's batched repeats (chunks as rows of a cache holding the sinks and each
    row's chunk) score as repeating one chunk at a time after the whole context does."""
    model, tokenizer = tiny_with_tokenizer(layers=2)
    use_method(model, "kvzip")
    ids = torch.randint(0, 1000, (2, 300), generator=torch.Generator().manual_seed(5))

    def prefilled():
        cache = ClusteredCache(method="kvzip", ratio=0.5)
        with cache.held(), torch.no_grad():
            model(ids, **cache_arg(model, cache))
        for layer in cache.layers:
            layer.scores.zero_()
        return cache

    one_at_a_time = prefilled()
    grams = output_grams(model, one_at_a_time)  # output_norm is on by default
    with one_at_a_time.held(), torch.no_grad():
        for lo, hi, prompt in repeat_prompts(tokenizer, ids, 64):  # 0-64 (no overlap), three of 64, 256-300
            for layer, gram in zip(one_at_a_time.layers, grams):
                layer.observer = Reconstruction(300, lo, hi, 4, "local", output_gram=gram)
            model(input_ids=prompt, **cache_arg(model, one_at_a_time))
            for layer in one_at_a_time.layers:
                layer.observer, layer.length, layer.seen = None, 300, 300
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
    from chelsea.scoring.attention_scores import largest_attention_received, probability_blocks

    g = torch.Generator().manual_seed(4)
    query, key = torch.randn(1, 4, 40, 8, generator=g) * 2, torch.randn(1, 2, 90, 8, generator=g)
    got = largest_attention_received(query, key, last=5, max_block_bytes=300)
    want = torch.cat([p for _, _, p in probability_blocks(query, key, first=35)], dim=3).amax(dim=(2, 3))
    torch.testing.assert_close(got, want)
    assert bool((got[..., :-1] > 0).all()) and float(got.max()) <= 1

    model, tokenizer = tiny_with_tokenizer(layers=2)
    use_method(model, "chelsea")
    ids = torch.randint(0, 1000, (1, 200), generator=torch.Generator().manual_seed(2))

    def scores(question: bool, reconstruct: bool):
        cache = ClusteredCache(ratio=0.5)
        with cache.held(question=question), torch.no_grad():
            model(ids, **cache_arg(model, cache))
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
    model, tokenizer = tiny_with_tokenizer(layers=1)
    use_method(model, "chelsea")
    ids = torch.randint(0, 1000, (1, 100))
    cache = ClusteredCache(method="chelsea-paper", ratio=0.5)
    model(ids, **cache_arg(model, cache))
    with pytest.raises(Exception, match="ranks by importance"):
        score_by_reconstruction(model, cache, ids, tokenizer)


def test_one_compressed_context_serves_several_questions_through_copies():
    model, tokenizer = tiny_with_tokenizer(layers=2)
    use_method(model, "chelsea")
    g = torch.Generator().manual_seed(3)
    context, q1, q2 = torch.randint(0, 1000, (1, 300), generator=g), torch.randint(0, 1000, (1, 9), generator=g), torch.randint(0, 1000, (1, 7), generator=g)
    config = CompressionConfig(ratio=0.8, window=16)
    shared = ClusteredCache(config)
    compress_context(model, shared, context, tokenizer, chunk_size=128)
    for question in (q1, q2):
        fresh = ClusteredCache(config)
        compress_context(model, fresh, context, tokenizer, chunk_size=128)
        ids = torch.cat([context, question], dim=1)
        want = model.generate(input_ids=ids, **cache_arg(model, fresh), max_new_tokens=6, min_new_tokens=6, do_sample=False)
        got = model.generate(input_ids=ids, **cache_arg(model, copy.deepcopy(shared)), max_new_tokens=6, min_new_tokens=6, do_sample=False)
        assert torch.equal(got, want)
    assert all(layer.seen == 300 for layer in shared.layers)  # the shared copy is untouched


def test_a_shallow_repeat_scores_only_its_layers_and_stops_the_forward_there():
    from chelsea.compat import cache_arg

    model, tokenizer = tiny_with_tokenizer(layers=3)
    use_method(model, "chelsea")
    ids = torch.randint(0, 1000, (1, 300), generator=torch.Generator().manual_seed(4))
    config = CompressionConfig(ratio=0.8, window=16)
    calls = []
    hook = model.model.layers[2].register_forward_pre_hook(lambda *_: calls.append(1))
    runs = {}
    for depth in (None, 2):
        cache = ClusteredCache(config)
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
    split_budgets(shallow, floor=0.2, even=frozenset({2}))
    shallow.compress_all()
    budget = config.budget(300)
    assert shallow.layers[2].length == budget  # the unscored layer keeps an even share
    assert sum(layer.length for layer in shallow.layers) == 3 * budget  # the scored ones split the rest


@pytest.mark.parametrize("view", ["local", "full"])
def test_the_repeat_scores_only_the_layers_it_is_told_and_the_others_keep_theirs(view):
    from chelsea.compat import cache_arg

    model, tokenizer = tiny_with_tokenizer(layers=3)
    use_method(model, "chelsea")
    ids = torch.randint(0, 1000, (1, 300), generator=torch.Generator().manual_seed(6))
    runs = {}
    for scored in (None, frozenset({0, 2})):
        cache = ClusteredCache(ratio=0.8, window=16)
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
