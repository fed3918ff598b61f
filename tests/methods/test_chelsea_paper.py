"""Properties of the paper's chunked soft matching (``chelsea-paper``) as a plain tensor function."""

import math

import pytest
import torch

from chelsea.attention import weighted_attention
from chelsea.methods.chelsea_paper import chunked_soft_matching, max_removable, soft_matching_step
from reference import naive_soft_matching_step


def _random(batch=2, heads=3, length=50, dim=8, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    keys = torch.randn(batch, heads, length, dim, generator=g, dtype=dtype)
    values = torch.randn(batch, heads, length, dim, generator=g, dtype=dtype)
    log_counts = torch.zeros(batch, heads, length, dtype=torch.float32)
    return keys, values, log_counts


@pytest.mark.parametrize("length,chunk,n_remove", [(37, 8, 10), (64, 16, 32), (50, 5, 3), (23, 5, 6), (20, 4, 10), (9, 2, 4), (33, 32, 16)])
def test_step_matches_loop_reference(length, chunk, n_remove):
    keys, values, _ = _random(length=length)
    g = torch.Generator().manual_seed(1)
    log_counts = torch.randint(0, 4, keys.shape[:3], generator=g).double().exp().log()
    k, v, lc = soft_matching_step(keys, values, log_counts, n_remove, chunk)
    for b in range(keys.shape[0]):
        for h in range(keys.shape[1]):
            rk, rv, rl = naive_soft_matching_step(keys[b, h], values[b, h], log_counts[b, h], n_remove, chunk)
            torch.testing.assert_close(k[b, h], rk)
            torch.testing.assert_close(v[b, h], rv)
            torch.testing.assert_close(lc[b, h], rl)


def test_step_refuses_more_than_set_a():
    keys, values, lc = _random(length=10)
    assert max_removable(10, 4) == 2 + 2 + 1
    with pytest.raises(ValueError):
        soft_matching_step(keys, values, lc, 6, 4)


def test_cluster_of_identical_tokens_gives_exact_attention():
    """Identical entries merged into one centroid give exactly the attention of the tokens they stood for.

    Entries come in aligned pairs (2i, 2i+1), some pairs identical; each entry already stands for
    1-3 tokens. Removing as many entries as there are identical pairs merges exactly those pairs.
    The reference attends over every original token (each entry repeated by its count).
    """
    g = torch.Generator().manual_seed(0)
    batch, kv_heads, groups, dim, pairs = 2, 2, 3, 16, 20
    keys = torch.randn(batch, kv_heads, 2 * pairs, dim, generator=g, dtype=torch.float64)
    values = torch.randn(batch, kv_heads, 2 * pairs, dim, generator=g, dtype=torch.float64)
    same = torch.zeros(pairs, dtype=torch.bool)
    same[torch.randperm(pairs, generator=g)[:7]] = True
    keys[:, :, 1::2][:, :, same] = keys[:, :, 0::2][:, :, same]
    values[:, :, 1::2][:, :, same] = values[:, :, 0::2][:, :, same]
    counts = torch.randint(1, 4, (2 * pairs,), generator=g)
    log_counts = counts.double().log().expand(batch, kv_heads, -1).contiguous()

    k, v, lc = chunked_soft_matching(
        keys, values, log_counts, int(same.sum()), chunk_size=4, sink_tokens=0, window=0, step_fraction=1.0
    )
    assert k.shape[2] == 2 * pairs - int(same.sum())

    query = torch.randn(batch, kv_heads * groups, 1, dim, generator=g, dtype=torch.float64)
    own_k = torch.randn(batch, kv_heads, 1, dim, generator=g, dtype=torch.float64)
    own_v = torch.randn(batch, kv_heads, 1, dim, generator=g, dtype=torch.float64)
    tokens_k = keys.repeat_interleave(counts, dim=2)
    tokens_v = values.repeat_interleave(counts, dim=2)
    full = weighted_attention(query, torch.cat([tokens_k, own_k], 2), torch.cat([tokens_v, own_v], 2))
    zero = torch.zeros(batch, kv_heads, 1, dtype=torch.float64)
    merged = weighted_attention(query, torch.cat([k, own_k], 2), torch.cat([v, own_v], 2), torch.cat([lc, zero], 2))
    torch.testing.assert_close(merged, full, rtol=0, atol=1e-9)


@pytest.mark.parametrize("n_remove", [1, 10, 25, 40, 1000])
def test_counts_sum_to_tokens_and_protected_tokens_are_bit_identical(n_remove):
    keys, values, lc = _random(length=80, dtype=torch.bfloat16)
    sinks, window = 4, 10
    k, v, out_lc = chunked_soft_matching(keys, values, lc, n_remove, chunk_size=8, sink_tokens=sinks, window=window)
    torch.testing.assert_close(out_lc.exp().sum(-1), torch.full(out_lc.shape[:2], 80.0))
    assert torch.equal(k[:, :, :sinks], keys[:, :, :sinks]) and torch.equal(v[:, :, :sinks], values[:, :, :sinks])
    assert torch.equal(k[:, :, -window:], keys[:, :, -window:]) and torch.equal(v[:, :, -window:], values[:, :, -window:])
    removed = 80 - k.shape[2]
    assert removed == min(n_remove, 80 - sinks - window - 1)
    assert k.dtype == torch.bfloat16 and out_lc.dtype == torch.float32


def test_merging_never_mixes_rows_or_heads():
    """Each (row, head) gets a constant tag in one coordinate; any mixing would change it."""
    keys, values, lc = _random(batch=3, heads=4, length=64, dim=6)
    tags = torch.arange(12, dtype=torch.float64).view(3, 4, 1) * 100.0
    keys[..., 0], values[..., 0] = tags, tags
    k, v, out_lc = chunked_soft_matching(keys, values, lc, 40, chunk_size=8, sink_tokens=2, window=4)
    assert torch.allclose(k[..., 0], tags.expand_as(k[..., 0]), rtol=0, atol=1e-9)
    assert torch.allclose(v[..., 0], tags.expand_as(v[..., 0]), rtol=0, atol=1e-9)
    assert k.shape[2] == 64 - 40


def test_centroids_are_count_weighted_means():
    keys = torch.tensor([[[[1.0, 0.0], [1.0, 0.1], [0.0, 1.0], [0.1, 1.0]]]], dtype=torch.float64)
    values = torch.tensor([[[[2.0], [8.0], [0.0], [4.0]]]], dtype=torch.float64)
    log_counts = torch.tensor([[[math.log(3.0), 0.0, 0.0, 0.0]]], dtype=torch.float64)
    k, v, lc = soft_matching_step(keys, values, log_counts, 1, chunk_size=2)
    # Chunks [0,1] and [2,3]; both A entries match their B; the more similar edge (0<-1 or 2<-3) merges.
    # Both edges have the same cosine similarity, so check the invariant instead of the choice.
    assert k.shape[2] == 3
    assert torch.isclose(lc.exp().sum(), torch.tensor(6.0, dtype=torch.float64))
    if torch.isclose(lc[0, 0, 0], torch.tensor(math.log(4.0), dtype=torch.float64)):
        torch.testing.assert_close(v[0, 0, 0], torch.tensor([(3 * 2.0 + 8.0) / 4], dtype=torch.float64))
    else:
        torch.testing.assert_close(v[0, 0, 1], torch.tensor([2.0], dtype=torch.float64))


def test_bad_shapes_and_arguments():
    keys, values, lc = _random()
    with pytest.raises(ValueError, match="chunk_size"):
        chunked_soft_matching(keys, values, lc, 5, chunk_size=1)
    with pytest.raises(ValueError, match="sink_tokens"):
        chunked_soft_matching(keys, values, lc, 5, sink_tokens=-1)
    with pytest.raises(ValueError, match="disagree"):
        chunked_soft_matching(keys, values[:, :, :10], lc, 5)


def test_nothing_to_do_returns_inputs():
    keys, values, lc = _random(length=20)
    out = chunked_soft_matching(keys, values, lc, 5, chunk_size=4, sink_tokens=10, window=10)
    assert out[0] is keys and out[1] is values and out[2] is lc
