"""Pinned decoding (the step a CUDA graph replays) against ordinary decoding through the cache."""

import pytest
import torch
from tiny import tiny

import chelsea
from chelsea import ChelseaError, ClusteredCache, CompressionConfig
from chelsea.methods import configure
from chelsea.runtime import GraphDecoder
from chelsea.compat import cache_arg

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


PAPER = dict(method="chelsea-paper", chunk_size=8)  # the paper's method with small chunks


def _caches(method: str, ratio: float, **settings):
    config = CompressionConfig(ratio=ratio, window=8, sink_tokens=2, compress_every=8)
    return (ClusteredCache(config, method=configure(method, {"chunk_size": 8, **settings})) for _ in range(2))


def _decode_both(model, cache, ref_cache, ids, mask, steps, **decoder_args):
    """Prefill both caches alike; decode ``steps`` tokens ordinarily and with the GraphDecoder."""
    with torch.no_grad():
        first = model(ids, attention_mask=mask, **cache_arg(model, cache)).logits[:, -1:].argmax(-1)
        model(ids, attention_mask=mask, **cache_arg(model, ref_cache))
        token, want_tokens, want_logits = first, [], []
        for _ in range(steps):
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            logits = model(token, attention_mask=mask, **cache_arg(model, ref_cache)).logits
            token = logits[:, -1:].argmax(-1)
            want_tokens.append(token)
            want_logits.append(logits)
        got_tokens, got_logits = [], []
        with GraphDecoder(model, cache, first, **decoder_args) as decoder:
            for _ in range(steps):
                got_tokens.append(decoder.step().clone())
                got_logits.append(decoder.logits.clone())
    return torch.cat(got_tokens, 1), torch.cat(want_tokens, 1), torch.cat(got_logits, 1), torch.cat(want_logits, 1), decoder


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("method,ratio", [("chelsea-paper", 0.5), ("chelsea-paper", 0.0), ("h2o", 0.6), ("streaming", 0.7)])
def test_pinned_decoding_equals_ordinary_decoding(device, method, ratio):
    """Same tokens and logits as decoding through the unpinned cache, across clusterings and re-pins
    (headroom 5: the buffers fill and are re-pinned several times in 40 steps)."""
    model = chelsea.prepare_model(tiny("llama")).to(device)
    torch.manual_seed(2)
    ids = torch.randint(0, 256, (2, 50), device=device)
    mask = torch.ones_like(ids)
    cache, ref_cache = _caches(method, ratio)
    got, want, got_logits, want_logits, decoder = _decode_both(model, cache, ref_cache, ids, mask, 40, headroom=5)
    assert torch.equal(got, want)
    torch.testing.assert_close(got_logits, want_logits, rtol=1e-4, atol=1e-4)
    assert cache.stats()["tokens_seen"] == 90
    assert cache.stats()["kv_bytes"] == ref_cache.stats()["kv_bytes"]
    if device == "cuda":
        assert decoder.recordings >= 2  # the first recording and at least one after a re-pin


def test_pinned_decoding_keeps_prefill_padding():
    """A left-padded prefill: the pinned steps (no mask) match ordinary steps given the extended mask,
    and every row's counts still add up to its real tokens."""
    model = chelsea.prepare_model(tiny("llama"))
    torch.manual_seed(3)
    ids = torch.randint(0, 256, (2, 48))
    mask = torch.ones_like(ids)
    mask[1, :17] = 0
    cache, ref_cache = _caches("chelsea-paper", 0.5)
    got, want, got_logits, want_logits, _ = _decode_both(model, cache, ref_cache, ids, mask, 30)
    assert torch.equal(got, want)
    torch.testing.assert_close(got_logits, want_logits, rtol=1e-4, atol=1e-4)
    for layer in cache.layers:
        counts = layer.log_counts.exp().sum(-1)  # [batch, kv_heads]
        torch.testing.assert_close(counts, torch.tensor([[78.0], [61.0]]).expand_as(counts))


def test_pinned_layer_hides_the_free_entries():
    """While pinned, everything past the filled part has log-count -inf; unpinned, the cache is ordinary again."""
    model = chelsea.prepare_model(tiny("llama"))
    cache = ClusteredCache(ratio=0.5, window=8, compress_every=4, **PAPER)
    ids = torch.randint(0, 256, (1, 40))
    with torch.no_grad():
        first = model(ids, **cache_arg(model, cache)).logits[:, -1:].argmax(-1)
        decoder = GraphDecoder(model, cache, first, headroom=16)
        for _ in range(6):
            decoder.step()
            for layer in cache.layers:
                assert layer.capacity == layer._key_buf.shape[2] > layer.length
                assert torch.isneginf(layer._statistics(layer.capacity)[0][:, :, layer.length :]).all()
                assert not torch.isneginf(layer.log_counts).any()
                assert int(decoder.state[1 + layer_index(cache, layer)]) == layer.length
        decoder.close()
        model(first, **cache_arg(model, cache))  # ordinary decoding works again
    assert cache.stats()["tokens_seen"] == 47


def layer_index(cache, layer):
    return next(i for i, other in enumerate(cache.layers) if other is layer)


def test_graph_decoder_refuses_what_it_cannot_pin():
    model = chelsea.prepare_model(tiny("llama"))
    token = torch.zeros(1, 1, dtype=torch.long)
    with pytest.raises(ChelseaError, match="prefill"):
        GraphDecoder(model, ClusteredCache(ratio=0.5), token)
    cache = ClusteredCache(method="clustergen")
    with torch.no_grad():
        model(torch.randint(0, 256, (1, 20)), **cache_arg(model, cache))
    with pytest.raises(ChelseaError, match="clustergen"):
        GraphDecoder(model, cache, token)
    if not torch.cuda.is_available():
        with torch.no_grad():
            c = ClusteredCache(ratio=0.5)
            model(torch.randint(0, 256, (1, 20)), **cache_arg(model, c))
        with pytest.raises(ChelseaError, match="CUDA"):
            GraphDecoder(model, c, token, cuda_graph=True)


@pytest.mark.parametrize("span", [32, None])
def test_decode_span_reclusters_only_the_recent_entries(span):
    """With decode_span, a decoding-time clustering leaves everything before the last ``span``
    entries (and the window) bit-identical, still meets the budget, and keeps counts = tokens seen."""
    model = chelsea.prepare_model(tiny("llama"))
    cache = ClusteredCache(ratio=0.5, window=8, sink_tokens=2, compress_every=8, decode_span=span, **PAPER)
    torch.manual_seed(4)
    with torch.no_grad():
        token = model(torch.randint(0, 256, (1, 300)), **cache_arg(model, cache)).logits[:, -1:].argmax(-1)
        layer = cache.layers[1]
        prefix_changed = False
        for _ in range(32):
            before_keys, before_len = layer.keys.clone(), layer.length
            token = model(token, **cache_arg(model, cache)).logits[:, -1:].argmax(-1)
            if layer.length < before_len + 1:  # a clustering ran in this step
                fixed = before_len + 1 - 8 - (span or before_len)
                if span is not None:
                    assert torch.equal(layer.keys[:, :, :fixed], before_keys[:, :, :fixed])
                else:
                    prefix_changed |= not torch.equal(layer.keys[:, :, :200], before_keys[:, :, :200])
                assert layer.length == cache.config.budget(layer.seen)
            torch.testing.assert_close(layer.log_counts.exp().sum(-1), torch.full((1, 2), float(layer.seen)))
    assert layer.seen == 332 and layer.compressions >= 5
    if span is None:
        assert prefix_changed  # the whole-cache clustering does reach back


@pytest.mark.parametrize("method,shares", [("chelsea-paper", None), ("chelsea", None), ("chelsea", (0.6, 1.4))])
def test_layers_clustered_together_equal_layers_clustered_alone(method, shares, monkeypatch):
    """compress_together batches the layers' decoding-time clusterings into one call of the method,
    uneven layer budgets (chelsea's, which remove a different number per layer) included; the
    result is the same as clustering each layer alone."""
    from chelsea.cache import ClusteredLayer, compress_together

    model = chelsea.prepare_model(tiny("llama"))
    config = CompressionConfig(ratio=0.6, window=8, sink_tokens=2, compress_every=8)
    caches = [ClusteredCache(config, method=configure(method, {"chunk_size": 8, "decode_span": 24})) for _ in range(2)]
    torch.manual_seed(5)
    ids = torch.randint(0, 256, (2, 120))
    with torch.no_grad():
        for n, cache in enumerate(caches):
            with cache.held():
                model(ids, **cache_arg(model, cache))
            for i, layer in enumerate(cache.layers):
                if shares:
                    layer.share = shares[i % len(shares)]
                if n == 0:
                    layer.compress()
            if n == 1:  # after a prefill too
                compress_together(list(cache.layers))
        for alone, together in zip(*(cache.layers for cache in caches)):
            assert together.length == alone.length and all(torch.equal(a, b) for a, b in zip(alone._entries(), together._entries()))
        for cache in caches:
            for layer in cache.layers:
                layer.since_compression, layer.new_tokens = 8, 1  # as if 8 tokens had been decoded without clustering
                layer._store(*(torch.cat([t, t[:, :, -8:]], dim=2) for t in layer._entries()))
                layer.seen += 8
    if shares:
        assert len({layer.length - layer.budget(layer.seen) for layer in caches[0].layers}) > 1
    for layer in caches[0].layers:
        layer.compress()
    calls = []
    real = ClusteredLayer._run
    monkeypatch.setattr(ClusteredLayer, "_run", lambda self, *a, **k: calls.append(1) or real(self, *a, **k))
    compress_together(list(caches[1].layers))
    assert len(calls) == 1
    for alone, together in zip(caches[0].layers, caches[1].layers):
        assert together.compressions == alone.compressions >= 2
        assert together.length == alone.length
        for a, b in zip(alone._entries(), together._entries()):
            assert torch.equal(a, b)


@pytest.mark.parametrize("method,ratio", [("chelsea-paper", 0.5), ("chelsea-paper", 0.0), ("snapkv", 0.6)])
@pytest.mark.parametrize("padded", [False, True])
def test_micro_batched_prefill_equals_one_pass(method, ratio, padded):
    """Rows prefilled one or two at a time and copied into one cache: the same logits and the same
    stored entries as prefilling the batch at once, and decoding goes on to the same tokens.
    Padded rows cluster to different lengths and are left-padded to one length on the way."""
    from chelsea.runtime import prefill

    model = chelsea.prepare_model(tiny("llama"))
    torch.manual_seed(4)
    ids = torch.randint(0, 256, (3, 60))
    mask = torch.ones_like(ids)
    if padded:
        mask[0, :9] = 0
        mask[2, :23] = 0
    for micro_batch in (1, 2):
        cache, ref_cache = _caches(method, ratio)
        with torch.no_grad():
            got = prefill(model, ids, cache, attention_mask=mask, micro_batch=micro_batch)
            want = prefill(model, ids, ref_cache, attention_mask=mask)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        for layer, ref in zip(cache.layers, ref_cache.layers, strict=True):
            assert layer.length == ref.length and layer.seen == ref.seen == 60
            assert layer.has_padding == ref.has_padding
            for mine, theirs in zip(layer._entries(), ref._entries(), strict=True):
                torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-5)
        assert cache.stats()["kv_bytes"] == ref_cache.stats()["kv_bytes"]
        token = want[:, -1:].argmax(-1)
        with torch.no_grad(), GraphDecoder(model, cache, token) as a, GraphDecoder(model, ref_cache, token) as b:
            for _ in range(12):
                assert torch.equal(a.step(), b.step())


def test_micro_batched_prefill_refusals():
    from chelsea.runtime import prefill

    model = chelsea.prepare_model(tiny("llama"))
    ids = torch.randint(0, 256, (2, 20))
    with pytest.raises(ChelseaError, match="at least 1"):
        prefill(model, ids, ClusteredCache(ratio=0.5), micro_batch=0)
    with pytest.raises(ChelseaError, match="ClusteredCache"):
        prefill(model, ids, __import__("transformers").DynamicCache(), micro_batch=1)
    with pytest.raises(ChelseaError, match="clustergen"):
        prefill(model, ids, ClusteredCache(method="clustergen"), micro_batch=1)
    cache = ClusteredCache(ratio=0.5)
    with torch.no_grad():
        prefill(model, ids, cache)
        with pytest.raises(ChelseaError, match="empty cache"):
            prefill(model, ids, cache, micro_batch=1)


def _has_compiler() -> bool:
    import shutil

    return any(shutil.which(c) for c in ("g++", "c++", "clang++"))


@pytest.mark.skipif(not _has_compiler(), reason="torch.compile on the CPU needs a C++ compiler")
def test_fused_layers_decode_like_eager_layers():
    """Compiled decoder layers (cache update and attention left out of the graphs) give the eager
    layers' tokens and logits, through clusterings and re-pins."""
    from chelsea.runtime import fuse_layers

    model = chelsea.prepare_model(tiny("llama"))
    torch.manual_seed(5)
    ids = torch.randint(0, 256, (2, 40))
    mask = torch.ones_like(ids)
    cache, ref_cache = _caches("chelsea-paper", 0.5)
    with torch.no_grad():
        first = model(ids, **cache_arg(model, ref_cache)).logits[:, -1:].argmax(-1)
        with GraphDecoder(model, ref_cache, first, headroom=6) as decoder:
            want = [(decoder.step().clone(), decoder.logits.clone()) for _ in range(20)]
        assert fuse_layers(model) == len(model.model.layers)
        with torch.compiler.set_stance("force_eager"):
            model(ids, attention_mask=mask, **cache_arg(model, cache))
        with GraphDecoder(model, cache, first, headroom=6) as decoder:
            got = [(decoder.step().clone(), decoder.logits.clone()) for _ in range(20)]
    torch._dynamo.reset()
    for (tok, logits), (want_tok, want_logits) in zip(got, want, strict=True):
        assert torch.equal(tok, want_tok)
        torch.testing.assert_close(logits, want_logits, rtol=1e-4, atol=1e-4)


def test_fuse_layers_refuses_a_model_without_decoder_layers():
    from chelsea.runtime import fuse_layers

    model = tiny("llama")
    model.model.layers = torch.nn.Identity()
    with pytest.raises(ChelseaError, match="decoder layers"):
        fuse_layers(model)


class _Tokenizer:
    """What generate() needs of a tokenizer, for models with random weights."""

    pad_token_id = None

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(str(int(i)) for i in ids)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("method", ["chelsea-paper", "h2o"])
def test_generate_through_the_graph_decoder_gives_model_generate_tokens(device, method):
    """`generate` with pinned, graph-replayed steps (eager on the CPU) against `model.generate`:
    the same tokens and cache statistics, through clusterings (compress_every 8, 40 new tokens)."""
    from chelsea.runtime.generation import _generate_graphed, generate, make_cache

    model = tiny("llama").to(device)
    model.generation_config.eos_token_id = None  # a random model: run all 40 steps
    inputs = {"input_ids": torch.randint(0, 200, (1, 120), generator=torch.Generator().manual_seed(6))}
    inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
    config = CompressionConfig(ratio=0.6, window=8, sink_tokens=2, compress_every=8)
    chosen = configure(method, {"chunk_size": 8})
    want = generate(model, _Tokenizer(), inputs, method=chosen, config=config, max_new_tokens=40, cuda_graph=False)
    graphed = {k: v.to(device) for k, v in inputs.items()}
    got = _generate_graphed(model, _Tokenizer(), graphed, method, make_cache(chosen, config), 40)
    assert got.tokens == want.tokens and len(got.tokens) == 40
    for field in ("tokens_seen", "kv_entries", "kv_bytes", "compressed"):
        assert getattr(got, field) == getattr(want, field), field
    if device == "cuda":
        auto = generate(model, _Tokenizer(), inputs, method=chosen, config=config, max_new_tokens=40)
        assert auto.tokens == want.tokens


def test_generate_refuses_cuda_graphs_off_cuda():
    from chelsea.runtime import generate

    model = tiny("llama")
    inputs = {"input_ids": torch.randint(0, 200, (1, 20))}
    with pytest.raises(ChelseaError, match="--no-cuda-graphs"):
        generate(model, _Tokenizer(), inputs, method="chelsea", cuda_graph=True)
