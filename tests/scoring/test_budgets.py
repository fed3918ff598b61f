"""Uneven layer budgets: from this context's scores or from calibrated score profiles."""

import torch

from chelsea.scoring.budgets import layer_shares, profile_shares, score_profile


def test_layer_shares_sum_to_the_budget_follow_the_scores_and_respect_the_floor():
    g = torch.Generator().manual_seed(0)
    low, high = torch.rand(2, 2, 500, generator=g) * 0.1, torch.rand(2, 2, 500, generator=g)
    shares = layer_shares([low, high, high.clone()], 100, floor=0.2)
    assert sum(shares) == 300
    assert shares[0] == 20 and shares[1] > 100 and shares[2] > 100
    assert layer_shares([low, high], 100, floor=1.0) == [100, 100]
    assert layer_shares([low[..., :50], high[..., :50]], 100) == [50, 50]  # all fits


def test_profile_shares_split_the_budget_as_the_scores_they_summarise_would():
    g = torch.Generator().manual_seed(1)
    low, high = torch.rand(2, 2, 500, generator=g) * 0.1, torch.rand(2, 2, 500, generator=g)
    profile = torch.stack([score_profile(s, points=1000) for s in (low, high, high)])
    assert bool((profile[:, 1:] <= profile[:, :-1]).all()) and profile[1, 0] == high.max() and profile[1, -1] == high.min()
    shares = profile_shares(profile, 100, 500, floor=0.2)
    assert sum(shares) == 300 and shares[0] == 20
    want = layer_shares([low, high, high.clone()], 100, floor=0.2)
    assert all(abs(a - b) <= 3 for a, b in zip(shares, want))  # quantiles of pooled rows, not each row's ranks
    # A profile holds no length: the same distributions split a longer context's region alike.
    assert [s // 4 for s in profile_shares(profile, 400, 2000, floor=0.2)] == [s for s in shares]
    assert profile_shares(profile, 600, 500) == [500] * 3 and profile_shares(profile[:, :0].reshape(0, 0), 10, 50) == []
    assert profile_shares(torch.ones(3, 16), 100, 500) == [100, 100, 100]  # alike layers: an even split
