"""Fact heads: the calibration prompts, the choice of heads, their ranking lent to every layer,
where they are stored, and the repeat depth, scored layers and budgets they decide."""

import pytest
import torch
from tiny import tiny_with_tokenizer

from chelsea import ChelseaError, ClusteredCache, CompressionConfig, Importance
from chelsea.runtime import use_method
from chelsea.scoring import compress_context, find_fact_heads
from chelsea.scoring.budgets import profile_shares
from chelsea.compat import cache_arg


def test_calibration_prompts_have_the_length_and_mark_exactly_the_codes():
    from chelsea.scoring.calibration import calibration_prompts

    _, tokenizer = tiny_with_tokenizer()
    ids, positions = calibration_prompts(tokenizer, prompts=2, length=600, codes=5)
    assert ids.shape == (2, 600)
    again, _ = calibration_prompts(tokenizer, prompts=2, length=600, codes=5)
    assert torch.equal(ids, again)  # seeded
    for row, pos in zip(ids, positions):
        codes = tokenizer.decode(row[pos]).split()
        assert len(codes) == 5 and all(any(c.isdigit() for c in code) and code.replace("-", "").isalnum() for code in codes)
        assert all(b == a + 1 for a, b in zip(pos, pos[1:]) if b - a < 3)


def test_fact_heads_are_the_heads_that_rank_the_codes_highest_and_their_agreement_outranks_every_layer():
    from chelsea.scoring.fact_heads import choose_heads, consensus, head_hits, lend_ranks

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
    model, tokenizer = tiny_with_tokenizer()
    use_method(model, "chelsea")
    ids = torch.randint(0, 1000, (1, 400), generator=torch.Generator().manual_seed(1))
    caches = {}
    for weight in (0.0, 3.0):
        cache = ClusteredCache(ratio=0.8, window=16, fact_weight=weight, fact_heads=3, repeat_depth="all")
        compress_context(model, cache, ids[:, :300], tokenizer, chunk_size=128)
        caches[weight] = cache
    assert [layer.length for layer in caches[0.0].layers] == [layer.length for layer in caches[3.0].layers]
    assert any(not torch.equal(a.keys, b.keys) for a, b in zip(caches[0.0].layers, caches[3.0].layers))
    memo = model._chelsea_fact_heads
    assert len(memo) == 1 and len(next(iter(memo.values())).heads) == 3
    found = next(iter(memo.values()))
    compress_context(model, caches[3.0].empty_like(), ids[:, :300], tokenizer)
    assert next(iter(model._chelsea_fact_heads.values())) is found  # not calibrated again
    out = model.generate(input_ids=ids, **cache_arg(model, caches[3.0]), max_new_tokens=3, min_new_tokens=3, do_sample=False)
    assert out.shape == (1, 403)


def test_fact_heads_are_stored_for_the_same_weights_and_calibrated_again_for_others(tmp_path, monkeypatch):
    import chelsea.scoring.fact_heads as fact_heads
    from chelsea.scoring import find_fact_heads
    from chelsea.scoring.store import stored_path

    monkeypatch.setenv("CHELSEA_CACHE_DIR", str(tmp_path))
    model, tokenizer = tiny_with_tokenizer(layers=2)
    use_method(model, "chelsea")
    cache = ClusteredCache(ratio=0.8, window=16, fact_heads=3)
    found = find_fact_heads(model, tokenizer, cache)
    assert len(list((tmp_path / "fact_heads").glob("*.json"))) == 1
    twin, _ = tiny_with_tokenizer(layers=2)  # the same weights in a new process would find the file
    with monkeypatch.context() as m:
        m.setattr(fact_heads, "calibration_prompts", lambda *a, **k: pytest.fail("calibrated again"))
        assert find_fact_heads(twin, tokenizer, cache) == found
    assert stored_path(twin, "fact_heads", ("any",)) == stored_path(model, "fact_heads", ("any",))
    with torch.no_grad():
        twin.model.layers[0].self_attn.q_proj.weight.mul_(2.0)
    other = stored_path(twin, "fact_heads", ("any",))
    assert other != stored_path(model, "fact_heads", ("any",))
    assert other != stored_path(twin, "fact_heads", ("other settings",))


def _tiny_chelsea(tmp_path, monkeypatch):
    """A 3-layer tiny model set up for ``chelsea``, its fact heads stored under ``tmp_path``, and a 300-token context."""
    monkeypatch.setenv("CHELSEA_CACHE_DIR", str(tmp_path))
    model, tokenizer = tiny_with_tokenizer(layers=3)
    use_method(model, "chelsea")
    return model, tokenizer, torch.randint(0, 1000, (1, 300), generator=torch.Generator().manual_seed(5))


def _record_repeat_options(monkeypatch) -> dict:
    """The keyword arguments of the next ``score_by_reconstruction`` call, which still runs."""
    import chelsea.scoring.context as context

    seen = {}
    real = context.score_by_reconstruction
    monkeypatch.setattr(context, "score_by_reconstruction", lambda *a, **k: seen.update(k) or real(*a, **k))
    return seen


def test_score_layers_facts_scores_the_fact_heads_layers_and_gives_the_others_an_even_budget(tmp_path, monkeypatch):
    model, tokenizer, ids = _tiny_chelsea(tmp_path, monkeypatch)
    settings = dict(ratio=0.8, window=16, fact_heads=1, repeat_depth="all", score_layers="facts", importance="local")
    config = CompressionConfig(ratio=0.8, window=16)
    (fact_layer, _), = find_fact_heads(model, tokenizer, ClusteredCache(**settings)).heads
    seen = _record_repeat_options(monkeypatch)
    cache = ClusteredCache(**settings)
    compress_context(model, cache, ids, tokenizer, chunk_size=128)
    assert seen["scored"] == {fact_layer} and seen["depth"] is None
    budget = config.budget(300)
    assert all(layer.length == budget for i, layer in enumerate(cache.layers) if i != fact_layer)
    assert sum(layer.length for layer in cache.layers) == 3 * budget
    with pytest.raises(ChelseaError, match="score_layers"):
        Importance(score_layers="some")


def test_calibrated_budgets_come_from_the_calibration_profile_and_need_no_surprisal(tmp_path, monkeypatch):
    model, tokenizer, ids = _tiny_chelsea(tmp_path, monkeypatch)
    settings = dict(ratio=0.8, window=16, fact_heads=1, repeat_depth="all", layer_budgets="calibrated", importance="local")
    config, imp = CompressionConfig(ratio=0.8, window=16), Importance()
    heads = find_fact_heads(model, tokenizer, ClusteredCache(**settings))
    assert len(heads.profile) == 3 and all(len(p) == 256 for p in heads.profile)
    (fact_layer, _), = heads.heads
    seen = _record_repeat_options(monkeypatch)
    import chelsea.scoring.context as context

    monkeypatch.setattr(context, "prefill_with_surprisal", lambda *a, **k: pytest.fail("surprisal computed"))
    cache = ClusteredCache(**settings)
    compress_context(model, cache, ids, tokenizer, chunk_size=128)
    assert seen["scored"] == {fact_layer}  # only the fact heads' layers are scored
    keep = config.budget(300) - config.sink_tokens - config.window
    shares = profile_shares(torch.tensor(heads.profile), keep, 300 - config.sink_tokens - config.window, imp.layer_floor)
    assert [layer.length for layer in cache.layers] == [config.sink_tokens + config.window + s for s in shares]
    assert sum(layer.length for layer in cache.layers) == 3 * config.budget(300)
    with pytest.raises(ChelseaError, match="layer_budgets"):
        Importance(layer_budgets="even")
    with pytest.raises(ChelseaError, match="fact_weight"):
        Importance(layer_budgets="calibrated", fact_weight=0)


def test_repeat_depth_facts_stops_after_the_deepest_fact_head(tmp_path, monkeypatch):
    model, tokenizer, ids = _tiny_chelsea(tmp_path, monkeypatch)
    settings = dict(ratio=0.8, window=16, fact_heads=1, repeat_depth="facts", importance="local")
    config = CompressionConfig(ratio=0.8, window=16)
    deepest = max(layer for layer, _ in find_fact_heads(model, tokenizer, ClusteredCache(**settings)).heads)
    seen = _record_repeat_options(monkeypatch)
    cache = ClusteredCache(**settings)
    compress_context(model, cache, ids, tokenizer, chunk_size=128)
    assert seen["depth"] == deepest + 1
    assert all(layer.length == config.budget(300) for layer in cache.layers[deepest + 1 :])
    assert sum(layer.length for layer in cache.layers) == 3 * config.budget(300)
    with pytest.raises(ChelseaError, match="repeat_depth"):
        Importance(repeat_depth="half")


def test_fact_layers_keeps_the_fact_heads_and_the_repeat_in_the_first_layers(tmp_path, monkeypatch):
    model, tokenizer, ids = _tiny_chelsea(tmp_path, monkeypatch)
    settings = dict(ratio=0.8, window=16, fact_heads=4, fact_layers=1, repeat_chunk=96, importance="local")
    config = CompressionConfig(ratio=0.8, window=16)
    heads = find_fact_heads(model, tokenizer, ClusteredCache(**settings))
    assert {layer for layer, _ in heads.heads} == {0}
    wider = find_fact_heads(model, tokenizer, ClusteredCache(**{**settings, "fact_layers": None}))
    assert any(layer > 0 for layer, _ in wider.heads)  # 4 heads from 2 KV heads per layer: not all in layer 0
    seen = _record_repeat_options(monkeypatch)
    cache = ClusteredCache(**settings)
    compress_context(model, cache, ids, tokenizer)
    assert seen["depth"] == 1 and seen["chunk_size"] == 96  # the config's repeat chunk, when none is passed
    assert sum(layer.length for layer in cache.layers) == 3 * config.budget(300)
    for bad in ({"fact_layers": 0}, {"repeat_chunk": 8}):
        with pytest.raises(ChelseaError, match=next(iter(bad))):
            Importance(**bad)
