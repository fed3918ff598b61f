"""Every registered method through the same checks, and a new method added through the public registry.

The checks: bytes really freed, counts sum to the tokens seen (merging methods; eviction drops counts
with their entries), identical tokens give exact attention, bad settings get a clear error, and the
method runs inside a model's ``generate``.
"""

from dataclasses import dataclass

import pytest
import torch
from entries import random_entries
from tiny import tiny

import chelsea
from chelsea import ChelseaError, ClusteredCache
from chelsea.attention import weighted_attention
from chelsea.methods import METHODS, Method, get_method, region_bounds, register
from chelsea.settings import setting
from chelsea.compat import cache_arg

RATIO_METHODS = [name for name, cls in METHODS.items() if cls.takes_ratio and cls.layer == "clustered"]
# Merging methods keep every token's count: chelsea drops what resembles no kept entry unless told not to.
MERGING = {"chelsea": {"min_similarity": -1.0}, "chelsea-paper": {}}




@pytest.mark.parametrize("name", RATIO_METHODS)
def test_compress_meets_the_budget_keeps_sinks_and_window(name):
    method = get_method(name, **MERGING.get(name, {}))
    keys, values, lc, scores = random_entries(length=96)
    out = method.compress(keys, values, lc, 40, sink_tokens=4, window=8, scores=scores if method.scores else None)
    k, v, out_lc = out[:3]
    assert k.shape[2] == 96 - 40 and v.shape == k.shape and out_lc.shape == k.shape[:3]
    assert torch.equal(k[:, :, :4], keys[:, :, :4]) and torch.equal(v[:, :, -8:], values[:, :, -8:])
    if method.scores:
        assert len(out) == 4 and out[3].shape == out_lc.shape
    if name in MERGING:  # merging keeps every token: the counts add up to what went in
        torch.testing.assert_close(out_lc.exp().sum(-1), torch.full((2, 2), 96.0))


@pytest.mark.parametrize("name", sorted(MERGING))
def test_a_merge_of_identical_tokens_is_exact(name):
    g = torch.Generator().manual_seed(1)
    key, value = torch.randn(1, 2, 1, 8, generator=g), torch.randn(1, 2, 1, 8, generator=g)
    keys, values = key.expand(1, 2, 64, 8).clone(), value.expand(1, 2, 64, 8).clone()
    out = get_method(name).compress(keys, values, torch.zeros(1, 2, 64), 40, sink_tokens=0, window=0,
                                    scores=torch.rand(1, 2, 64, generator=g))
    query = torch.randn(1, 4, 1, 8, generator=g)
    torch.testing.assert_close(weighted_attention(query, out[0], out[1], out[2]), weighted_attention(query, keys, values))


@pytest.mark.parametrize("name", RATIO_METHODS)
def test_every_method_frees_bytes_in_a_model(name):
    model = chelsea.prepare_model(tiny("llama"))
    cache = ClusteredCache(method=name, ratio=0.75, window=16, **MERGING.get(name, {}))
    ids = torch.randint(0, 256, (1, 400), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        model.generate(ids, **cache_arg(model, cache), max_new_tokens=8, min_new_tokens=8, do_sample=False)
    stats = cache.stats()
    assert stats["tokens_seen"] == 407 and stats["compressed"]
    assert stats["kv_bytes"] < 0.6 * stats["kv_bytes_full"]
    assert sum(layer.nbytes() for layer in cache.layers) == stats["kv_bytes"]
    for layer in cache.layers:
        counts = layer.log_counts.exp().sum(-1)
        if name in MERGING:
            torch.testing.assert_close(counts, torch.full((1, 2), 407.0))
        else:  # eviction drops counts with their entries; nothing stands for more tokens than were seen
            assert bool((counts <= 407.0 + 1e-3).all())


@pytest.mark.parametrize("name", list(METHODS))
def test_every_method_names_a_bad_setting_and_an_unknown_one(name):
    cls = METHODS[name]
    with pytest.raises(ChelseaError, match="not a setting"):
        get_method(name, no_such_setting=1)
    for setting_name, default, _ in cls.settings():
        bad = "not a number" if not isinstance(default, str) else "no such choice"
        if isinstance(default, bool):
            bad = "maybe"
        with pytest.raises(ChelseaError, match=setting_name):
            get_method(name, **{setting_name: bad})


@dataclass(frozen=True)
class KeepTheFirst(Method):
    """The example of a new method: one class (in a file of its own, in the package) and ``@register``."""

    name = "keep-first"
    summary = "keeps the oldest entries (a test method)"
    every: int = setting(1, "keep every this-many entries among the oldest", low=1)

    def compress(self, keys, values, log_counts, n_remove, *, sink_tokens, window, scores=None):
        start, end = region_bounds(keys.shape[2], sink_tokens, window)
        n = min(n_remove, end - start)
        keep = torch.cat([torch.arange(end - n), torch.arange(end, keys.shape[2])]).to(keys.device)
        return tuple(t.index_select(2, keep) for t in (keys, values, log_counts))


def test_a_new_method_is_known_everywhere_by_its_registration():
    from chelsea.methods.catalogue import methods_table, settings_page
    from chelsea.runtime import method_choices

    register(KeepTheFirst)  # the one registration line
    try:
        assert "keep-first" in method_choices() and "keep-first" in methods_table() and "`every`" in settings_page()
        model = chelsea.prepare_model(tiny("llama"))
        cache = ClusteredCache(method="keep-first", ratio=0.5, window=8, every=2)
        ids = torch.randint(0, 256, (1, 100), generator=torch.Generator().manual_seed(3))
        with torch.no_grad():
            model.generate(ids, **cache_arg(model, cache), max_new_tokens=4, min_new_tokens=4, do_sample=False)
        assert cache.method.every == 2 and cache.stats()["kv_entries"] <= 50 + 32
        with pytest.raises(ChelseaError, match="every"):
            ClusteredCache(method="keep-first", every=0)
    finally:
        del METHODS["keep-first"]


def test_a_setting_named_for_one_method_goes_to_it_alone_and_wins_over_the_plain_name():
    from chelsea.cli.options import parse_settings
    from chelsea.methods import check_settings_known, configure

    settings = parse_settings(["exact_share=0.6", "chelsea.exact_share=0.7", "chelsea.importance=learned"])
    assert settings == {"exact_share": 0.6, "chelsea.exact_share": 0.7, "chelsea.importance": "learned"}
    chosen = configure("chelsea", settings)
    assert chosen.exact_share == 0.7 and chosen.scoring.importance == "learned"
    assert configure("kvzip", settings).scoring.importance == "local"  # kvzip has importance, but was not named
    check_settings_known(["chelsea", "kvzip"], settings)
    with pytest.raises(ChelseaError, match="not among the methods"):
        check_settings_known(["kvzip"], {"chelsea.importance": "learned"})
    with pytest.raises(ChelseaError, match="chelsea.chunk_size is not a setting of chelsea"):
        configure("chelsea", {"chelsea.chunk_size": 8})
    with pytest.raises(ChelseaError, match="'nope' is not a method"):
        parse_settings(["nope.ratio=0.5"])
