"""Fitted merges (``chelsea`` with ``fit=True``): exactness, masses, what they leave alone, and the wiring."""

import pytest
import torch
from entries import random_entries
from tiny import tiny

import chelsea
from chelsea import ClusteredCache, CompressionConfig
from chelsea.compat import cache_arg
from chelsea.methods import ReferenceQueries, merge_by_importance
from chelsea.methods import fitted_merge
from chelsea.methods.fitted_merge import fitted_merge_terms

SCALE = 8**-0.5


def _references(keys, log_counts, queries):
    """Reference queries ``[B, Hq, m, d]`` with their log-normalisers over the whole of ``keys``."""
    batch, heads = keys.shape[:2]
    grouped = queries.reshape(batch, heads, -1, queries.shape[-1])
    lse = ((grouped @ keys.transpose(-1, -2)) * SCALE + log_counts[:, :, None]).logsumexp(-1)
    return ReferenceQueries(queries, lse.reshape(queries.shape[:3]), SCALE)


def _output(queries, keys, values, log_counts):
    grouped = queries.reshape(keys.shape[0], keys.shape[1], -1, keys.shape[-1])
    return torch.softmax((grouped @ keys.transpose(-1, -2)) * SCALE + log_counts[:, :, None], -1) @ values


def _queries(batch=2, q_heads=4, m=16, seed=1):
    return torch.randn(batch, q_heads, m, 8, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("merge", ["centroid", "values"])
def test_fit_is_exact_when_the_merged_tokens_are_identical(merge):
    """Every block of 8 region entries is one token repeated: the fit gives back its value and the
    total count, so queries the fit never saw attend exactly as to the full cache."""
    keys, values, lc, scores = random_entries(length=84)
    region = slice(4, 84 - 16)
    for t in (keys, values):
        block = t[:, :, region].reshape(2, 2, 8, 8, 8)
        t[:, :, region] = block[:, :, :, :1].expand_as(block).reshape(2, 2, 64, 8)
    lc[:, :, 10] = 1.5  # one entry already stands for several tokens
    refs = _references(keys, lc, _queries())
    k, v, out_lc, _ = merge_by_importance(keys, values, lc, 48, scores=scores, sink_tokens=4, window=16,
                                          exact_share=0.0, neighbourhood=8, merge=merge, fit=True, references=refs)
    held_out = _queries(seed=7)
    torch.testing.assert_close(_output(held_out, k, v, out_lc), _output(held_out, keys, values, lc), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out_lc.exp().sum(-1), lc.exp().sum(-1), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("merge", ["centroid", "values"])
def test_fitted_log_counts_are_finite_masses_and_only_merged_entries_change(merge):
    keys, values, lc, scores = random_entries(seed=3)
    lc[..., ::5] = 0.8
    refs = _references(keys, lc, _queries(seed=4))
    common = dict(scores=scores, sink_tokens=4, window=10, exact_share=0.5, neighbourhood=16)
    fit = merge_by_importance(keys, values, lc, 70, merge=merge, fit=True, references=refs, **common)
    centroid = merge_by_importance(keys, values, lc, 70, merge="centroid", **common)
    assert all(a.shape == b.shape and a.dtype == b.dtype for a, b in zip(fit, centroid))  # the same bytes
    if merge == "centroid":
        assert torch.equal(fit[0], centroid[0])  # keys: the centroid's
    assert fit[2].isfinite().all()  # every entry's mass exp(log-count) is a positive number
    # an entry that took members has a centroid key, equal to no input key (random keys are distinct)
    merged = ~(centroid[0][:, :, :, None, :] == keys[:, :, None, :, :]).all(-1).any(-1)
    changed = (fit[2] != centroid[2]) | (fit[1] != centroid[1]).any(-1)
    assert merged.any() and changed.any() and not (changed & ~merged).any()
    assert torch.equal(fit[1][~merged], centroid[1][~merged]) and torch.equal(fit[2][~merged], centroid[2][~merged])


def test_fit_reduces_the_error_on_the_queries_it_fitted():
    keys, values, lc, scores = random_entries(length=200, seed=5)
    refs = _references(keys, lc, _queries(m=32, seed=6))
    common = dict(scores=scores, sink_tokens=4, window=10, exact_share=0.3, neighbourhood=32)
    fit = merge_by_importance(keys, values, lc, 150, fit=True, references=refs, **common)
    centroid = merge_by_importance(keys, values, lc, 150, merge="centroid", **common)
    full = _output(refs.queries, keys, values, lc)
    error = lambda out: (_output(refs.queries, *out[:2], out[2]) - full).norm(dim=-1).mean()  # noqa: E731
    assert error(fit) < error(centroid)


@pytest.mark.parametrize("block", [None, 6])  # clusters anywhere; clusters within blocks of 6 entries
@pytest.mark.parametrize("chunk", [None, 2 * 5 * 7])  # one chunk; chunks of a few entries, clusters in other chunks
def test_fit_terms_match_their_definition(monkeypatch, chunk, block):
    if chunk:
        monkeypatch.setattr(fitted_merge, "CHUNK_ELEMENTS", chunk)
    keys, values, lc, _ = random_entries(batch=1, heads=2, length=30, seed=8)
    lc[..., 3] = 1.0
    merged_keys = keys + 0.1
    dest = torch.randint(0, block or 30, (1, 2, 30), generator=torch.Generator().manual_seed(9))
    if block:
        dest += torch.arange(30) // block * block
    refs = _references(keys, lc, _queries(batch=1, m=5, seed=10))
    u, a2 = fitted_merge_terms(keys, lc, merged_keys, dest, refs, block)
    q, lse = refs.grouped(2)
    p = ((q @ keys.transpose(-1, -2)) * SCALE + lc[:, :, None] - lse[..., None]).exp()  # [1, 2, m, n]
    a = ((q @ merged_keys.transpose(-1, -2)) * SCALE - lse[..., None]).exp()
    torch.testing.assert_close(a2.log(), (a**2).sum(2).log())
    torch.testing.assert_close(u.log(), (a.gather(-1, dest[:, :, None].expand_as(a)) * p).sum(2).log())


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_a_prefill_fits_its_merges_to_its_last_queries_then_decodes(family):
    model = chelsea.prepare_model(tiny(family))
    torch.manual_seed(3)
    ids = torch.randint(0, 256, (2, 300))
    runs = {}
    for name, fit in (("centroid", False), ("fit", True)):
        cache = ClusteredCache(CompressionConfig(ratio=0.8, sink_tokens=4, window=16), method="chelsea", fit=fit)
        with torch.no_grad():
            out = model.generate(ids, **cache_arg(model, cache), max_new_tokens=40, min_new_tokens=40, do_sample=False)
        assert all(layer.references is None for layer in cache.layers)  # used once, then let go
        runs[name] = (cache, out)
    fit, centroid = runs["fit"][0], runs["centroid"][0]
    assert fit.nbytes() == centroid.nbytes()
    for a, b in zip(fit.layers, centroid.layers):
        assert a.keys.shape == b.keys.shape
        assert a.log_counts.isfinite().all()
        torch.testing.assert_close(a.log_counts.exp().sum(-1), b.log_counts.exp().sum(-1), rtol=0.5, atol=0)
    assert any(not torch.equal(a.log_counts, b.log_counts) for a, b in zip(fit.layers, centroid.layers))


def test_the_prefill_keeps_reference_queries_for_the_compression(monkeypatch):
    from chelsea.cache.layer import ClusteredLayer

    model = chelsea.prepare_model(tiny("llama"))
    cfg = CompressionConfig(ratio=0.8, sink_tokens=4, window=16, compress_every=4)
    cache = ClusteredCache(cfg, method="chelsea", fit=True, fit_queries=8)
    seen, original = [], ClusteredLayer._run

    def spy(self, entries, n_remove, sinks=None, references=None):
        seen.append(references)
        return original(self, entries, n_remove, sinks, references)

    monkeypatch.setattr(ClusteredLayer, "_run", spy)
    ids = torch.randint(0, 256, (1, 120), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        model(ids, **cache_arg(model, cache))
        prefill = list(seen)
        for t in range(4):  # decoded tokens: the compression they trigger has no reference queries
            model(ids[:, t : t + 1], **cache_arg(model, cache))
    assert prefill and all(r is not None for r in prefill)
    assert prefill[0].queries.shape[1:] == (6, 8, 16)  # 6 query heads, the last 8 queries, head size 16
    assert prefill[0].lse.shape == prefill[0].queries.shape[:3] and prefill[0].lse.isfinite().all()
    assert len(seen) > len(prefill) and all(r is None for r in seen[len(prefill):])
    assert all(layer.references is None for layer in cache.layers)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the tensor-core path runs on CUDA only")
def test_bf16_products_on_cuda_give_the_float32_terms():
    keys, _, lc, _ = random_entries(batch=2, heads=2, length=300, seed=11)
    keys, lc = keys.cuda().bfloat16(), lc.cuda()
    merged_keys = (keys.float() + 0.05).bfloat16()
    dest = (torch.arange(300, device="cuda") // 30 * 30).expand(2, 2, 300).contiguous()
    refs = _references(keys.float(), lc, _queries(batch=2, m=8, seed=12).cuda().bfloat16().float())
    refs = ReferenceQueries(refs.queries.bfloat16(), refs.lse, refs.scale)
    if tuple(int(x) for x in torch.__version__.split(".")[:2]) >= (2, 8):
        assert fitted_merge._float32_results(keys.device, torch.bfloat16)  # the tensor cores are used
    fast = fitted_merge_terms(keys, lc, merged_keys, dest, refs, 30)
    exact = fitted_merge_terms(keys.float(), lc, merged_keys.float(), dest, ReferenceQueries(refs.queries.float(), refs.lse, refs.scale), 30)
    for f, e in zip(fast, exact):
        torch.testing.assert_close(f, e, rtol=1e-4, atol=1e-30)
