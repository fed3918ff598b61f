"""The weighted attention against a written-out softmax."""

import math

import pytest
import torch

from chelsea.attention import weighted_attention


def _reference(query, key, value, log_counts=None):
    batch, heads, q_len, dim = query.shape
    groups = heads // key.shape[1]
    k = key.repeat_interleave(groups, 1)
    v = value.repeat_interleave(groups, 1)
    logits = query @ k.transpose(-1, -2) / math.sqrt(dim)
    n = k.shape[2]
    if log_counts is not None:
        logits = logits + log_counts.repeat_interleave(groups, 1)[:, :, None, :] if log_counts.shape[1] > 1 else logits + log_counts[:, :, None, :]
    i = torch.arange(q_len)[:, None]
    j = torch.arange(n)[None, :] - (n - q_len)
    logits = logits.masked_fill(j > i, float("-inf"))
    return torch.softmax(logits, -1) @ v


@pytest.mark.parametrize("q_len", [1, 5])
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (6, 2)])
def test_matches_reference(q_len, heads, kv_heads):
    torch.manual_seed(0)
    q = torch.randn(2, heads, q_len, 8, dtype=torch.float64)
    k, v = torch.randn(2, kv_heads, 20, 8, dtype=torch.float64), torch.randn(2, kv_heads, 20, 8, dtype=torch.float64)
    log_counts = torch.log(torch.randint(1, 5, (2, kv_heads, 20)).double())
    torch.testing.assert_close(weighted_attention(q, k, v, log_counts), _reference(q, k, v, log_counts))
    torch.testing.assert_close(weighted_attention(q, k, v), _reference(q, k, v))


def test_prefill_without_weights_is_causal_attention():
    torch.manual_seed(0)
    q = torch.randn(1, 6, 12, 8, dtype=torch.float64)
    k, v = torch.randn(1, 2, 12, 8, dtype=torch.float64), torch.randn(1, 2, 12, 8, dtype=torch.float64)
    torch.testing.assert_close(weighted_attention(q, k, v), _reference(q, k, v))


def test_log_count_equals_duplicated_entries():
    torch.manual_seed(0)
    q = torch.randn(1, 2, 1, 4, dtype=torch.float64)
    k, v = torch.randn(1, 2, 5, 4, dtype=torch.float64), torch.randn(1, 2, 5, 4, dtype=torch.float64)
    dup_k = torch.cat([k[:, :, :1]] * 3 + [k[:, :, 1:]], 2)
    dup_v = torch.cat([v[:, :, :1]] * 3 + [v[:, :, 1:]], 2)
    lc = torch.zeros(1, 2, 5, dtype=torch.float64)
    lc[..., 0] = math.log(3)
    torch.testing.assert_close(weighted_attention(q, k, v, lc), weighted_attention(q, dup_k, dup_v), rtol=0, atol=1e-12)


def test_minus_inf_hides_entries_and_padded_queries_stay_finite():
    torch.manual_seed(0)
    q = torch.randn(1, 2, 4, 4, dtype=torch.float64)
    k, v = torch.randn(1, 2, 9, 4, dtype=torch.float64), torch.randn(1, 2, 9, 4, dtype=torch.float64)
    lc = torch.zeros(1, 1, 9, dtype=torch.float64)
    lc[..., [0, 1, 5]] = float("-inf")  # two stored padding entries and the first new token is padding
    out = weighted_attention(q, k, v, lc)
    assert torch.isfinite(out).all()
    keep = [2, 3, 4, 6, 7, 8]
    ref = weighted_attention(q[:, :, 1:], k[:, :, keep], v[:, :, keep])
    torch.testing.assert_close(out[:, :, 1:], ref)
