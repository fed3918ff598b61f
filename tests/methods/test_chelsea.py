"""The default method, ``chelsea`` (importance-guided clustering), and ``kvzip``'s eviction, as plain tensor functions."""

from functools import partial

import pytest
import torch
from entries import random_entries

from chelsea.attention import weighted_attention
from chelsea.methods import KVzip, merge_by_importance


_data = partial(random_entries, heads=3)


@pytest.mark.parametrize("n_remove", [0, 7, 60, 500])
def test_kvzip_keeps_exactly_the_top_scored_entries(n_remove):
    keys, values, lc, scores = _data()
    keys[..., -1] = torch.arange(120, dtype=torch.float32)  # position tag
    k, v, out_lc, out_scores = KVzip().compress(keys, values, lc, n_remove, scores=scores, sink_tokens=4, window=10)
    region = scores[:, :, 4:110]
    removed = min(n_remove, 106)
    want = region.topk(106 - removed, dim=-1).indices.sort(-1).values + 4
    kept_region = k[:, :, 4 : k.shape[2] - 10, -1].long()
    assert torch.equal(kept_region, want)
    assert torch.equal(out_scores, scores.gather(-1, k[..., -1].long()))
    assert torch.equal(k[:, :, :4], keys[:, :, :4]) and torch.equal(k[:, :, -10:], keys[:, :, -10:])


@pytest.mark.parametrize("exact_share", [0.0, 0.3, 0.5, 1.0])
@pytest.mark.parametrize("merge", ["centroid", "values"])
def test_chelsea_never_merges_an_exact_entry(exact_share, merge):
    keys, values, lc, scores = _data(seed=3)
    lc[..., ::5] = 1.3  # some entries already stand for several tokens
    k, v, out_lc, out_scores = merge_by_importance(keys, values, lc, 70, scores=scores, sink_tokens=4, window=10,
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


def test_chelsea_with_a_number_to_remove_per_row_equals_each_row_alone():
    keys, values, lc, scores = _data(batch=3, seed=7)
    lc[..., ::4] = 0.7
    together = merge_by_importance(keys, values, lc, [10, 60, 500], scores=scores, sink_tokens=4, window=10, neighbourhood=16)
    assert together[0].shape[2] == 110  # the row that removes fewest sets the length
    for b, n in enumerate([10, 60, 106]):  # 500 is more than the region holds
        alone = merge_by_importance(*(t[b : b + 1] for t in (keys, values, lc)), n, scores=scores[b : b + 1], sink_tokens=4,
                             window=10, neighbourhood=16)
        assert alone[0].shape[2] == 120 - n
        for x, y in zip(alone, together):
            assert torch.equal(x, y[b : b + 1, :, : 120 - n])
        assert torch.all(together[2][b, :, 120 - n :] == float("-inf"))  # what follows the row's entries is padding
    with pytest.raises(ValueError, match="rows"):
        merge_by_importance(keys, values, lc, [1, 2], scores=scores)


def test_chelsea_counts_sum_to_tokens_when_everything_merges():
    keys, values, lc, scores = _data(seed=1)
    k, v, out_lc, _ = merge_by_importance(keys, values, lc, 80, scores=scores, sink_tokens=4, window=10,
                                   exact_share=0.0, min_similarity=-1.0, neighbourhood=120)
    torch.testing.assert_close(out_lc.exp().sum(-1), torch.full((2, 3), 120.0))


def test_chelsea_drops_entries_below_the_similarity_floor():
    keys, values, lc, scores = _data(seed=2)
    _, _, out_lc, _ = merge_by_importance(keys, values, lc, 80, scores=scores, sink_tokens=4, window=10,
                                   exact_share=0.0, min_similarity=1.0, neighbourhood=120)  # nothing is that similar
    assert torch.equal(out_lc, torch.zeros_like(out_lc))


def test_chelsea_is_exact_on_identical_tokens():
    g = torch.Generator().manual_seed(4)
    key, value = torch.randn(1, 2, 1, 8, generator=g), torch.randn(1, 2, 1, 8, generator=g)
    keys, values = key.expand(1, 2, 64, 8).clone(), value.expand(1, 2, 64, 8).clone()
    scores = torch.rand(1, 2, 64, generator=g)
    k, v, lc, _ = merge_by_importance(keys, values, torch.zeros(1, 2, 64), 48, scores=scores, sink_tokens=0, window=0,
                               exact_share=0.25, min_similarity=-1.0, neighbourhood=64)
    query = torch.randn(1, 4, 1, 8, generator=g)
    want = weighted_attention(query, keys, values)
    got = weighted_attention(query, k, v, lc)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(lc.exp().sum(-1), torch.full((1, 2), 64.0))
