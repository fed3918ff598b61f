"""ClusterGen's summary and estimator as plain tensor code."""

import math

import pytest
import torch

from chelsea.attention import weighted_attention
from chelsea.methods.clustergen import ClusterGenSummary, clustergen_attention


def _data(n=60, batch=2, heads=2, dim=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    keys = torch.randn(batch, heads, n, dim, generator=g, dtype=torch.float64)
    values = torch.randn(batch, heads, n, dim, generator=g, dtype=torch.float64)
    return keys, values


NUMERATORS = ["values", "clusters"]


def _summary(keys, values, *, delta, s, t, block, seed=0, numerator="values"):
    batch, heads, n, dim = keys.shape
    summ = ClusterGenSummary.empty(batch, heads, dim, delta=delta, cluster_samples=s, value_samples=t, capacity=4,
                                   dtype=torch.float64, generator=torch.Generator().manual_seed(seed), numerator=numerator)
    for start in range(0, n, block):
        summ.update(keys[:, :, start : start + block], values[:, :, start : start + block])
    return summ


@pytest.mark.parametrize("numerator", NUMERATORS)
@pytest.mark.parametrize("block", [1, 7, 60])
def test_exact_when_delta_zero_and_samples_cover_everything(block, numerator):
    keys, values = _data()
    summ = _summary(keys, values, delta=0.0, s=4, t=60, block=block, numerator=numerator)
    assert torch.equal(summ.n_clusters, torch.full((2, 2), 60))
    torch.manual_seed(1)
    query = torch.randn(2, 6, 1, 8, dtype=torch.float64)
    own_k, own_v = torch.randn(2, 2, 1, 8, dtype=torch.float64), torch.randn(2, 2, 1, 8, dtype=torch.float64)
    got = clustergen_attention(query, summ, own_k, own_v)
    want = weighted_attention(query, torch.cat([keys, own_k], 2), torch.cat([values, own_v], 2))
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


@pytest.mark.parametrize("numerator", NUMERATORS)
def test_exact_with_large_clusters_when_samples_cover_members(numerator):
    keys, values = _data(n=40)
    keys = keys[:, :, torch.randint(0, 8, (40,), generator=torch.Generator().manual_seed(2))]  # 8 distinct keys
    summ = _summary(keys, values, delta=0.0, s=40, t=40, block=9, numerator=numerator)
    assert int(summ.n_clusters.max()) < 40
    query = torch.randn(2, 2, 1, 8, dtype=torch.float64)
    own_k, own_v = torch.randn(2, 2, 1, 8, dtype=torch.float64), torch.randn(2, 2, 1, 8, dtype=torch.float64)
    got = clustergen_attention(query, summ, own_k, own_v)
    want = weighted_attention(query, torch.cat([keys, own_k], 2), torch.cat([values, own_v], 2))
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


@pytest.mark.parametrize("block", [1, 13])
def test_counts_add_up_and_members_lie_within_delta(block):
    keys, values = _data(n=90)
    delta = 3.5
    summ = _summary(keys, values, delta=delta, s=3, t=10, block=block)
    torch.testing.assert_close(summ.tokens(), torch.full((2, 2), 90.0, dtype=torch.float64))
    filled = torch.isfinite(summ.sample_prio)
    dist = torch.linalg.vector_norm(summ.sample_keys - summ.centers[..., None, :], dim=-1)
    assert bool((dist[filled] <= delta + 1e-9).all())
    per_cluster = filled.sum(-1)
    assert bool((per_cluster == torch.minimum(summ.counts, torch.tensor(3.0, dtype=torch.float64)).long()).all())
    assert int(summ.n_clusters.max()) < 90


def _estimated_sums(summ, query, scale):
    den, num, values = summ.log_terms(query, scale)
    return den.exp().sum(-1), num.exp() @ values


@pytest.mark.parametrize("numerator", NUMERATORS)
def test_estimators_are_unbiased(numerator):
    keys, values = _data(n=50, batch=1, heads=1, dim=4)
    values = values * torch.linspace(0.2, 3.0, 50, dtype=torch.float64)[None, None, :, None]  # unequal norms
    query = torch.randn(1, 1, 1, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    scale = 0.5
    logits = scale * query @ keys.transpose(-1, -2)
    exact_den = logits.exp().sum(-1)
    exact_num = logits.exp() @ values
    dens, nums = [], []
    for seed in range(400):
        summ = _summary(keys, values, delta=2.5, s=2, t=8, block=17, seed=seed, numerator=numerator)
        d, n = _estimated_sums(summ, query, scale)
        dens.append(d)
        nums.append(n)
    dens, nums = torch.stack(dens), torch.stack(nums)
    for est, exact in ((dens, exact_den), (nums, exact_num)):
        mean, se = est.mean(0), est.std(0) / math.sqrt(est.shape[0])
        assert bool(((mean - exact).abs() <= 3 * se + 1e-12).all()), (mean, exact, se)
        assert bool((se > 0).all())  # the estimate really is random here, so the check can fail


def test_member_numerator_stays_inside_the_values_hull_and_keeps_no_value_sample():
    """With coarse clusters the member estimate is a weighted mean of stored values: every output
    coordinate lies between the smallest and largest value coordinate; the paper's estimator,
    a ratio of two independent estimates, does not promise that."""
    keys, values = _data(n=200, batch=1, heads=1, dim=8, seed=3)
    summ = _summary(keys, values, delta=6.0, s=2, t=8, block=50, numerator="clusters")
    # Bytes held: per cluster a centre, 2 member keys and 2 member values (8 float64 each), a count and
    # 2 priorities; no value sample (one empty threshold slot: key, value, weight, priority).
    clusters = summ.n_clusters.item()
    assert summ.value_keys.shape[2] == 1
    assert summ.nbytes() == clusters * ((1 + 2 + 2) * 8 * 8 + 3 * 8) + (8 + 8 + 1 + 1) * 8
    query = 3 * torch.randn(1, 4, 5, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    own_k, own_v = keys[:, :, -5:], values[:, :, -5:]
    out = clustergen_attention(query, summ, own_k, own_v)
    low, high = values.amin(2, keepdim=True), values.amax(2, keepdim=True)
    assert bool(((out >= low - 1e-9) & (out <= high + 1e-9)).all())


def test_summary_is_smaller_than_the_stream_for_clustered_keys():
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(1, 2, 10, 16, generator=g) * 5
    keys = centres[:, :, torch.randint(0, 10, (2000,), generator=g)] + 0.1 * torch.randn(1, 2, 2000, 16, generator=g)
    values = torch.randn(1, 2, 2000, 16, generator=g)
    summ = _summary(keys, values, delta=1.0, s=4, t=64, block=256)
    assert int(summ.n_clusters.max()) <= 12
    assert summ.nbytes() < 0.1 * (keys.numel() + values.numel()) * 4


def test_bad_arguments():
    with pytest.raises(ValueError, match="delta"):
        ClusterGenSummary.empty(1, 1, 4, delta=-1.0)
    with pytest.raises(ValueError, match="value_samples"):
        ClusterGenSummary.empty(1, 1, 4, delta=1.0, value_samples=0)


def test_several_query_tokens_attend_causally_to_their_window():
    keys, values = _data(n=30)
    summ = _summary(keys, values, delta=0.0, s=2, t=30, block=30)
    g = torch.Generator().manual_seed(3)
    query = torch.randn(2, 4, 5, 8, dtype=torch.float64, generator=g)
    win_k, win_v = torch.randn(2, 2, 9, 8, dtype=torch.float64, generator=g), torch.randn(2, 2, 9, 8, dtype=torch.float64, generator=g)
    got = clustergen_attention(query, summ, win_k, win_v)
    want = weighted_attention(query, torch.cat([keys, win_k], 2), torch.cat([values, win_v], 2))
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


@pytest.mark.parametrize("with_summary", [True, False])
def test_long_prefill_in_query_blocks_gives_the_same_output(with_summary):
    keys, values = _data(n=30)
    summ = _summary(keys, values, delta=0.5, s=2, t=8, block=30) if with_summary else None
    g = torch.Generator().manual_seed(4)
    query = torch.randn(2, 4, 9, 8, dtype=torch.float64, generator=g)
    win_k, win_v = torch.randn(2, 2, 12, 8, dtype=torch.float64, generator=g), torch.randn(2, 2, 12, 8, dtype=torch.float64, generator=g)
    whole = clustergen_attention(query, summ, win_k, win_v)
    blocked = clustergen_attention(query, summ, win_k, win_v, max_block_bytes=4 * 2 * 4 * 60)  # a few rows per block
    torch.testing.assert_close(blocked, whole, rtol=0, atol=1e-12)


def test_spread_radius_separates_keys_that_share_a_large_offset():
    """Keys = a large common offset + small distinct parts: relative to the norm, one radius holds
    them all; relative to their spread, they stay apart. Both units are what radius_scale says."""
    from chelsea.methods.clustergen import radius_scale

    g = torch.Generator().manual_seed(0)
    parts = torch.randn(1, 2, 200, 16, generator=g, dtype=torch.float64)
    keys = parts + 50.0
    assert radius_scale(keys, "norm") == pytest.approx(torch.linalg.vector_norm(keys, dim=-1).median().item())
    spread = radius_scale(keys, "spread")
    assert spread == pytest.approx(torch.linalg.vector_norm(keys - keys.mean(-2, keepdim=True), dim=-1).median().item())
    assert spread < 0.05 * radius_scale(keys, "norm")
    counts = {}
    for radius in ("norm", "spread"):
        summary = ClusterGenSummary.empty(1, 2, 16, delta=0.5 * radius_scale(keys, radius), dtype=torch.float64)
        summary.update(keys, keys)
        counts[radius] = summary.n_clusters.min().item()
    assert counts["norm"] == 1 and counts["spread"] > 20
