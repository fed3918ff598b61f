"""The learned scorer: a deterministic fit, the scores it gives prompt and decoded entries alike,
its lending to the model, and where it is stored."""

import pytest
import torch
from tiny import tiny_with_tokenizer

from chelsea import ClusteredCache, compress_context
from chelsea.compat import cache_arg
from chelsea.runtime import GraphDecoder, use_method
from chelsea.scoring import find_learned, train_learned
from chelsea.scoring.learned import learned_key
from chelsea.scoring.store import stored_path

SMALL = dict(prompts=3, length=256)


@pytest.fixture
def learned(tmp_path, monkeypatch):
    """A tiny model with a learned scorer fitted on three short prompts (stored under ``tmp_path``)."""
    import chelsea.scoring.learned as module

    monkeypatch.setenv("CHELSEA_CACHE_DIR", str(tmp_path))
    real = module.train_learned
    monkeypatch.setattr(module, "train_learned", lambda *a, **k: real(*a, **{**SMALL, **k}))
    model, tokenizer = tiny_with_tokenizer(layers=3)
    use_method(model, "chelsea")
    cache = ClusteredCache(ratio=0.8, window=16, importance="learned")
    scorer = find_learned(model, tokenizer, cache)
    return model, tokenizer, cache, scorer


def test_the_fit_is_deterministic_and_its_weights_have_one_map_per_layer(learned):
    model, tokenizer, cache, scorer = learned
    again = train_learned(model, tokenizer, cache, **SMALL)
    assert len(scorer.weights) == 3 and all(torch.equal(a, b) for a, b in zip(scorer.weights, again.weights))
    kv, dim = 2, 16  # the tiny model: 2 KV heads of 16 dimensions; features are values and rotary-pair norms
    assert scorer.weights[0].shape == (kv * (dim + dim // 2) + 1, kv + 1)
    assert {"spearman", "top_overlap", "seconds"} <= set(scorer.metrics)
    other = train_learned(model, tokenizer, cache, seed=1, **SMALL)
    assert not torch.equal(other.weights[0], scorer.weights[0])  # another seed, other prompts


def test_prompt_and_decoded_entries_get_the_scorers_scores(learned):
    """After compress_context and 20 decoded tokens, every stored entry's score is the scorer's
    prediction for it (own score plus the fact weight times all layers' agreement), decoded ones
    included, and the cache holds its budget (plus what one compression schedule adds)."""
    model, tokenizer, cache, scorer = learned
    ids = torch.randint(0, 1000, (1, 400), generator=torch.Generator().manual_seed(1))
    compress_context(model, cache, ids, tokenizer)
    with torch.no_grad():
        out = model.generate(input_ids=torch.cat([ids, ids[:, :5]], 1), **cache_arg(model, cache), max_new_tokens=20,
                             min_new_tokens=20, do_sample=False)
    assert out.shape[1] == 425 and cache.layers[0].seen == 424
    weight = cache.method.scoring.fact_weight
    recent = 8  # the newest entries: never merged, so their keys and values are the tokens' own
    predictions = [scorer.predict(i, layer.keys[:, :, -recent:], layer.values[:, :, -recent:]) for i, layer in enumerate(cache.layers)]
    agreed = torch.stack([a for _, a in predictions]).mean(0)
    for layer, (own, _) in zip(cache.layers, predictions):
        torch.testing.assert_close(layer.scores[:, :, -recent:], own + weight * agreed[:, None, :], rtol=1e-4, atol=1e-4)
        assert layer.length <= cache.config.budget(layer.seen) + layer.every + 1
    stats = cache.stats()
    assert stats["kv_bytes"] < 0.35 * stats["kv_bytes_full"]


def test_fused_kernels_that_fail_give_way_to_the_pytorch_scores(learned, monkeypatch):
    """Where the fused scoring kernels cannot be built or launched, the first failure switches
    scoring to the PyTorch path for good, and decoded entries still get the scorer's scores."""
    import chelsea.scoring.learned as module

    model, tokenizer, cache, scorer = learned
    failures = []

    def broken(*args, **kwargs):
        failures.append(1)
        raise RuntimeError("no GPU kernels here")

    monkeypatch.setattr(module, "fused_scoring_applies", lambda *args: True)
    monkeypatch.setattr(module, "score_tails", broken)
    monkeypatch.setattr(module, "_fused", [True])
    ids = torch.randint(0, 1000, (1, 300), generator=torch.Generator().manual_seed(2))
    compress_context(model, cache, ids, tokenizer)
    with torch.no_grad():
        model.generate(input_ids=torch.cat([ids, ids[:, :3]], 1), **cache_arg(model, cache), max_new_tokens=6, min_new_tokens=6,
                       do_sample=False)
    assert failures == [1] and module._fused == [False]
    weight = cache.method.scoring.fact_weight
    predictions = [scorer.predict(i, layer.keys[:, :, -4:], layer.values[:, :, -4:]) for i, layer in enumerate(cache.layers)]
    agreed = torch.stack([a for _, a in predictions]).mean(0)
    for layer, (own, _) in zip(cache.layers, predictions):
        torch.testing.assert_close(layer.scores[:, :, -4:], own + weight * agreed[:, None, :], rtol=1e-4, atol=1e-4)


def test_pinned_steps_score_their_token_like_ordinary_steps(learned):
    model, tokenizer, cache, scorer = learned
    ids = torch.randint(0, 1000, (1, 300), generator=torch.Generator().manual_seed(2))
    other = cache.empty_like()
    with torch.no_grad():
        first = compress_context(model, cache, ids, tokenizer)[:, -1:].argmax(-1)
        compress_context(model, other, ids, tokenizer)
        token = first
        for _ in range(12):
            token = model(token, **cache_arg(model, other), use_cache=True).logits[:, -1:].argmax(-1)
        with GraphDecoder(model, cache, first, cuda_graph=False) as decoder:
            for _ in range(12):
                decoder.step()
    for mine, ref in zip(cache.layers, other.layers):
        assert mine.length == ref.length
        torch.testing.assert_close(mine.scores, ref.scores, rtol=1e-4, atol=1e-4)


def test_a_pinned_batch_of_joined_rows_decodes_and_scores_like_the_servers_eager_step(learned):
    """Rows of two lengths joined in one batch, 40 steps with compressions on each row's own
    schedule: the pinned step (:class:`chelsea.runtime.RowStep`, what ``chelsea serve --cuda-graph``
    replays; eager here) gives the eager step's tokens, and its layers the same entries and scores."""
    from chelsea.runtime import RowStep

    model, tokenizer, cache, scorer = learned
    runs = []
    for pinned in (False, True):
        batch = cache.empty_like()
        firsts = []
        with torch.no_grad():
            for n in (300, 220):
                part = cache.empty_like()
                ids = torch.randint(0, 1000, (1, n), generator=torch.Generator().manual_seed(n))
                firsts.append(compress_context(model, part, ids, tokenizer)[:, -1:].argmax(-1))
                batch.append_rows(part)
            token, tokens = torch.cat(firsts), []
            joined = sum(layer.compressions for layer in batch.layers)
            step = RowStep(model, batch, cuda_graph=False, headroom=8) if pinned else None
            for _ in range(40):
                if step is not None:
                    logits = step.forward(token)
                    batch.compress_due()
                else:
                    positions = torch.tensor(batch.row_positions())[:, None]
                    with batch.held():
                        logits = model(token, position_ids=positions, **cache_arg(model, batch), use_cache=True).logits
                    batch.compress_due()
                token = logits[:, -1:].argmax(-1)
                tokens.append(token[:, 0].tolist())
            if step is not None:
                step.close()
        assert sum(layer.compressions for layer in batch.layers) > joined  # decoding compressed the rows
        runs.append((tokens, batch))
    (eager, ref), (mine, batch) = runs
    assert mine == eager
    for a, b in zip(batch.layers, ref.layers):
        real_a, real_b = a.log_counts > float("-inf"), b.log_counts > float("-inf")
        assert torch.equal(real_a.sum(-1), real_b.sum(-1))
        torch.testing.assert_close(a.keys[real_a], b.keys[real_b])
        torch.testing.assert_close(a.scores[real_a], b.scores[real_b], rtol=1e-4, atol=1e-4)


def test_a_long_forward_scored_layer_by_layer_in_pieces_gets_the_stacked_scores(learned, monkeypatch):
    """Entries too many to stack (a batched prefill through the hooks) are scored one layer at a
    time, in pieces of a bounded size; the scores are the ones one batched product gives."""
    import chelsea.scoring.learned as module

    model, tokenizer, cache, scorer = learned
    ids = torch.randint(0, 1000, (2, 96), generator=torch.Generator().manual_seed(4))
    caches = []
    for stack, chunk in ((1 << 30, 1 << 30), (0, 2 * 2 * 16 * 7)):  # pieces of 7 entries (2 rows, 2 KV heads, 16 dims)
        monkeypatch.setattr(module, "STACK_ELEMENTS", stack)
        monkeypatch.setattr(module, "CHUNK_ELEMENTS", chunk)
        other = ClusteredCache(ratio=0.0, window=16, importance="learned")
        with torch.no_grad():
            model(ids, **cache_arg(model, other), use_cache=True)
        caches.append(other)
    for mine, ref in zip(*(c.layers for c in caches)):
        assert mine.scores.shape[-1] == 96 and ref.scores.std() > 0  # scored, not left at a constant
        torch.testing.assert_close(mine.scores, ref.scores, rtol=1e-5, atol=1e-6)


def test_a_fitted_scorer_is_stored_and_reused_and_other_weights_or_teacher_settings_fit_again(learned, monkeypatch):
    import chelsea.scoring.learned as module

    model, tokenizer, cache, scorer = learned
    path = stored_path(model, "learned", learned_key(cache.config, cache.method), suffix="pt")
    assert path.is_file()
    twin, _ = tiny_with_tokenizer(layers=3)  # the same weights, as a new process would load them
    monkeypatch.setattr(module, "train_learned", lambda *a, **k: pytest.fail("fitted again"))
    found = find_learned(twin, tokenizer, cache)
    assert all(torch.equal(a, b) for a, b in zip(found.weights, scorer.weights))
    # the cache's own sinks and window do not matter (the teacher keeps its own): no second fit
    other_region = ClusteredCache(ratio=0.5, window=32, sink_tokens=2, importance="learned")
    assert find_learned(twin, tokenizer, other_region) is found
    other_settings = ClusteredCache(ratio=0.8, window=16, fact_heads=2, importance="learned")
    assert stored_path(model, "learned", learned_key(other_settings.config, other_settings.method), suffix="pt") != path
    with torch.no_grad():
        twin.model.layers[0].self_attn.v_proj.weight.mul_(2.0)
    assert stored_path(twin, "learned", learned_key(cache.config, cache.method), suffix="pt") != path


def test_without_its_scorer_a_learned_cache_ranks_by_the_last_queries(learned):
    """A model that was never calibrated (a plain generate with a bare cache) still runs: the last
    queries score the entries, as for the other importance sources."""
    _, _, _, _ = learned
    model, _ = tiny_with_tokenizer(layers=2)
    use_method(model, "chelsea")
    cache = ClusteredCache(ratio=0.8, window=16, importance="learned")
    with torch.no_grad():
        model(torch.randint(0, 1000, (1, 200)), **cache_arg(model, cache), use_cache=True)
    assert cache.stats()["compressed"] and float(cache.layers[0].scores.max()) > 0


def test_a_context_read_in_chunks_gets_uneven_layer_budgets_from_the_scorers_profile(learned):
    """Text appended in forwards of its own (a chat, a context read in chunks) is never scored
    whole, so the layers take their budgets from the scorer's calibrated profile: uneven, summing
    to what even budgets would keep; a whole-context scoring's split is left as it is."""
    from chelsea.scoring import prepare_scoring

    model, tokenizer, cache, scorer = learned
    assert scorer.profile is not None and scorer.profile.shape[0] == 3
    assert prepare_scoring(model, tokenizer, cache) is scorer
    ids = torch.randint(0, 1000, (1, 512), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        for start in range(0, 512, 128):
            model(ids[:, start : start + 128], **cache_arg(model, cache), use_cache=True)
    cfg = cache.config
    keep = cfg.budget(512) - cfg.sink_tokens - cfg.window
    region = [layer.length - cfg.sink_tokens - cfg.window for layer in cache.layers]
    assert len(set(region)) > 1  # uneven
    assert abs(sum(region) - keep * len(region)) <= len(region)  # the same entries in all
    whole = cache.empty_like()
    compress_context(model, whole, ids, tokenizer)
    shares = [layer.share for layer in whole.layers]
    with torch.no_grad():
        model(ids[:, :64], **cache_arg(model, whole), use_cache=True)
    assert [layer.share for layer in whole.layers] == shares


def test_prepare_scoring_does_nothing_for_methods_without_a_learned_scorer(learned):
    from chelsea.scoring import prepare_scoring

    model, tokenizer, _, _ = learned
    assert prepare_scoring(model, tokenizer, ClusteredCache(ratio=0.8, importance="local")) is None
    assert prepare_scoring(model, tokenizer, ClusteredCache(method="chelsea-paper", ratio=0.8)) is None


def test_a_built_in_models_shipped_scorer_is_used_before_fitting(learned, monkeypatch, tmp_path):
    """A scorer shipped with the package for a built-in model (known by name, its weights pinned)
    is loaded instead of fitted; any other model never finds it."""
    import chelsea.scoring.learned as module
    import chelsea.scoring.store as store

    model, tokenizer, cache, scorer = learned
    monkeypatch.setattr(store, "SHIPPED", tmp_path / "shipped")
    monkeypatch.setenv("CHELSEA_CACHE_DIR", str(tmp_path / "empty"))
    twin, _ = tiny_with_tokenizer(layers=3)
    assert store.shipped_path(twin, "learned", learned_key(cache.config, cache.method), suffix="pt") is None
    twin.__dict__["_chelsea_builtin"] = "tiny"
    path = store.shipped_path(twin, "learned", learned_key(cache.config, cache.method), suffix="pt")
    path.parent.mkdir(parents=True)
    torch.save(scorer.to_dict(), path)
    monkeypatch.setattr(module, "train_learned", lambda *a, **k: pytest.fail("fitted although one ships"))
    found = find_learned(twin, tokenizer, cache)
    assert all(torch.equal(a, b) for a, b in zip(found.weights, scorer.weights))
    assert torch.equal(found.profile, scorer.profile)
