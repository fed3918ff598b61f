"""Property tests of the compression functions over random shapes, budgets and settings (hypothesis)."""

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from chelsea.methods import KVzip, SnapKV, chunked_soft_matching, merge_by_importance
from chelsea.scoring.budgets import layer_shares

shapes = st.tuples(st.integers(1, 2), st.integers(1, 3), st.integers(0, 90), st.sampled_from([4, 8]))


def _tensors(shape, seed, merged):
    batch, heads, length, dim = shape
    g = torch.Generator().manual_seed(seed)
    keys, values = torch.randn(batch, heads, length, dim, generator=g), torch.randn(batch, heads, length, dim, generator=g)
    counts = torch.randint(1, 4, (batch, heads, length), generator=g).float() if merged else torch.ones(batch, heads, length)
    return keys, values, counts.log(), torch.rand(batch, heads, length, generator=g)


def _region(length, sinks, window):
    start = min(sinks, length)
    return max(0, max(start, length - window) - start)


@settings(max_examples=60, deadline=None)
@given(shape=shapes, seed=st.integers(0, 10**6), ratio=st.floats(0.0, 0.99), chunk=st.integers(2, 40),
       sinks=st.integers(0, 6), window=st.integers(0, 20), step=st.floats(0.05, 1.0), merged=st.booleans())
def test_chunked_soft_matching_meets_the_budget_and_keeps_every_token(shape, seed, ratio, chunk, sinks, window, step, merged):
    keys, values, lc, _ = _tensors(shape, seed, merged)
    length = shape[2]
    n_remove = math.floor(ratio * length)
    k, v, out_lc = chunked_soft_matching(keys, values, lc, n_remove, chunk_size=chunk, sink_tokens=sinks, window=window,
                                         step_fraction=step)
    region = _region(length, sinks, window)
    removed = length - k.shape[2]
    assert removed <= min(n_remove, region)
    assert removed == min(n_remove, region) or k.shape[2] - (length - region) <= 1  # only a one-entry region stops it
    torch.testing.assert_close(out_lc.double().exp().sum(-1), lc.double().exp().sum(-1), rtol=1e-5, atol=1e-4)
    assert k.shape == v.shape[:3] + (k.shape[3],) and bool(torch.isfinite(k).all())


@settings(max_examples=60, deadline=None)
@given(shape=shapes, seed=st.integers(0, 10**6), ratio=st.floats(0.0, 0.99), sinks=st.integers(0, 6),
       window=st.integers(0, 20), share=st.floats(0.0, 1.0), block=st.integers(2, 64),
       merge=st.sampled_from(["centroid", "values"]), merged=st.booleans())
def test_merge_by_importance_meets_the_budget_and_never_invents_tokens(shape, seed, ratio, sinks, window, share, block, merge, merged):
    keys, values, lc, scores = _tensors(shape, seed, merged)
    length = shape[2]
    n_remove = math.floor(ratio * length)
    k, v, out_lc, out_scores = merge_by_importance(keys, values, lc, n_remove, scores=scores, sink_tokens=sinks, window=window,
                                            exact_share=share, neighbourhood=block, merge=merge, min_similarity=-1.0)
    assert k.shape[2] == length - min(n_remove, _region(length, sinks, window))
    total_in, total_out = lc.double().exp().sum(-1), out_lc.double().exp().sum(-1)
    assert bool((total_out <= total_in + 1e-4).all())  # merged counts add up; dropped ones leave
    assert bool(torch.isfinite(k).all()) and bool(torch.isfinite(v).all()) and out_scores.shape == out_lc.shape
    # what is kept is always the best-scored of each head (sinks and window aside)
    if n_remove and _region(length, sinks, window):
        assert float(out_scores.min()) >= float(scores.min())


@settings(max_examples=60, deadline=None)
@given(shape=shapes, seed=st.integers(0, 10**6), ratio=st.floats(0.0, 0.99), sinks=st.integers(0, 6), window=st.integers(0, 20))
def test_evictions_keep_count_and_order(shape, seed, ratio, sinks, window):
    keys, values, lc, scores = _tensors(shape, seed, False)
    keys[..., -1] = torch.arange(shape[2], dtype=torch.float32)
    n_remove = math.floor(ratio * shape[2])
    for method in (KVzip(), SnapKV()):
        k, v, out_lc, out_scores = method.compress(keys, values, lc, n_remove, scores=scores, sink_tokens=sinks, window=window)
        assert k.shape[2] == shape[2] - min(n_remove, _region(shape[2], sinks, window))
        positions = k[..., -1]
        assert bool((positions[..., 1:] > positions[..., :-1]).all())


@settings(max_examples=60, deadline=None)
@given(layers=st.lists(st.tuples(st.integers(1, 3), st.integers(1, 200)), min_size=1, max_size=6),
       keep=st.integers(0, 150), floor=st.floats(0.0, 1.0), seed=st.integers(0, 10**6))
def test_layer_shares_sum_to_the_budget_within_each_layers_room(layers, keep, floor, seed):
    g = torch.Generator().manual_seed(seed)
    scores = [torch.rand(2, heads, n, generator=g) for heads, n in layers]
    shares = layer_shares(scores, keep, floor)
    rooms = [n for _, n in layers]
    assert all(0 <= s <= r for s, r in zip(shares, rooms))
    assert sum(shares) == min(keep * len(layers), sum(rooms))
