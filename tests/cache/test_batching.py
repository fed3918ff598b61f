"""Rows that join and leave a running batch (the server's continuous batching) decode as if alone."""

import contextlib
import copy

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import chelsea
from chelsea import ChelseaError, ClusteredCache, CompressionConfig
from chelsea.compat import cache_arg
from chelsea.runtime import RowStep


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)
    lm = LlamaForCausalLM(config).eval()
    chelsea.prepare_model(lm)
    return lm


def _decode_alone(model, cache, first, steps):
    tokens, token = [int(first)], first
    for _ in range(steps):
        token = model(token[:, None], **cache_arg(model, cache), use_cache=True).logits[:, -1].argmax(-1)
        tokens.append(int(token))
    return tokens


@pytest.mark.parametrize("method,ratio,lengths,shares", [
    ("chelsea-paper", 0.5, (150, 260, 90), None), ("chelsea", 0.8, (150, 260, 90), None), ("snapkv", 0.5, (150, 260, 90), None),
    ("chelsea-paper", 0.0, (150, 260, 90), None),
    ("chelsea-paper", 0.2, (450, 520, 400), None),  # long enough that decoding re-clusters only the recent span
    # uneven layer budgets (a short window and span, so every layer re-clusters a span of one length):
    # the layers remove different numbers of entries from spans of the same length
    ("chelsea", 0.8, (450, 520, 400), (0.8, 1.0, 1.3)),
])
@pytest.mark.parametrize("deferred", [False, True, "pinned"], ids=["in-forward", "after-step", "pinned"])
def test_joined_rows_decode_exactly_as_alone(model, method, ratio, lengths, shares, deferred):
    """Rows of different lengths join at different steps and one leaves early; every row's greedy
    tokens equal its own decoding (clustering included: each row keeps its own schedule), whether
    each layer clusters during the forward or every due layer together after it (the server,
    whose due rows of all layers go through the method together, also when their layers remove
    different numbers of entries), or the batch decodes pinned (:class:`chelsea.runtime.RowStep`,
    what a server replays from a CUDA graph; eager here), compressing in place."""
    torch.manual_seed(1)
    prompts = [torch.randint(0, 300, (1, n)) for n in lengths]
    chosen = chelsea.get_method(method, decode_span=16) if shares else method
    fresh = lambda: ClusteredCache(CompressionConfig(ratio=ratio, window=16 if shares else 64), method=chosen)  # noqa: E731
    alone, prefilled, firsts = [], [], []
    with torch.inference_mode():
        for prompt in prompts:
            cache = fresh()
            first = model(prompt, **cache_arg(model, cache), use_cache=True).logits[:, -1].argmax(-1)
            for layer, share in zip(cache.layers, shares or ()):
                layer.share = share
            prefilled.append(copy.deepcopy(cache))
            firsts.append(first)
            alone.append(_decode_alone(model, cache, first, 70))

        batch = fresh()
        batch.append_rows(prefilled[0])
        batch.append_rows(prefilled[1])
        current, out, left = torch.cat(firsts[:2]), [[int(firsts[0])], [int(firsts[1])]], None
        pinned = None
        for step in range(70):
            if pinned is not None and step in (10, 40):  # rows join or leave: the buffers may move
                pinned.close()
                pinned = None
            if step == 10:  # a third request joins
                batch.append_rows(prefilled[2])
                current = torch.cat([current, firsts[2]])
                out.append([int(firsts[2])])
            if step == 40:  # the longest leaves
                before = batch.stats()["kv_bytes"]
                batch.keep_rows([0, 2])
                current, left = current[[0, 2]], out.pop(1)
                assert batch.stats()["kv_bytes"] <= before * 2 / 3  # its row, and padding only it needed, are freed
            if deferred == "pinned":
                pinned = pinned or RowStep(model, batch, cuda_graph=False, headroom=8)
                logits = pinned.forward(current[:, None])
                batch.compress_due()
            else:
                positions = torch.tensor(batch.row_positions())[:, None]
                with batch.held() if deferred else contextlib.nullcontext():
                    logits = model(current[:, None], **cache_arg(model, batch), position_ids=positions, use_cache=True).logits
                if deferred:
                    batch.compress_due()
            current = logits[:, -1].argmax(-1)
            for row, token in zip(out, current.tolist()):
                row.append(token)
    if pinned is not None:
        pinned.close()
    assert out[0] == alone[0]
    assert left == alone[1][:41]
    assert out[1] == alone[2][:61]
    assert batch.row_positions() == [lengths[0] + 70, lengths[2] + 60]
    layer = batch.layers[0]
    real = layer.log_counts > float("-inf")
    for other in batch.layers:  # rows stay left-padded: no hole after a row's first real entry
        held = other.log_counts[:, 0] > float("-inf")
        assert (held.int().cummax(-1).values == held.int()).all()
    if ratio > 0 and shares is None:  # decoding kept clustering: each row holds its budget plus at most what one schedule adds
        # (uneven shares are set after the prefill, so a layer below an even share shrinks to its budget only slowly)
        cfg = batch.config
        assert (real[:, 0].sum(-1) <= torch.tensor([cfg.budget(n) + layer.every for n in batch.row_positions()])).all()
    if method == "chelsea-paper":  # merging keeps every token: each row's counts sum to its tokens
        counts = layer.log_counts.exp().where(real, torch.zeros(())).sum(-1)
        torch.testing.assert_close(counts, torch.tensor([[lengths[0] + 70.0] * 2, [lengths[2] + 60.0] * 2]))


def test_only_the_same_method_and_settings_share_a_batch(model):
    a = ClusteredCache(CompressionConfig(ratio=0.5), method="chelsea-paper")
    b = ClusteredCache(CompressionConfig(ratio=0.8), method="chelsea-paper")
    with torch.inference_mode():
        model(torch.randint(0, 300, (1, 20)), **cache_arg(model, b), use_cache=True)
    with pytest.raises(ChelseaError, match="same method and settings"):
        a.append_rows(b)


def test_the_last_row_leaving_empties_the_batch(model):
    cache = ClusteredCache(CompressionConfig(ratio=0.5), method="chelsea-paper")
    part = ClusteredCache(CompressionConfig(ratio=0.5), method="chelsea-paper")
    with torch.inference_mode():
        model(torch.randint(0, 300, (1, 100)), **cache_arg(model, part), use_cache=True)
    cache.append_rows(part)
    assert cache.batch_size == 1
    cache.keep_rows([])
    assert cache.batch_size == 0 and cache.stats()["kv_bytes"] == 0
    cache.append_rows(part)  # and it takes rows again
    assert cache.batch_size == 1 and cache.row_positions() == [100]
