"""Row statistics of padded layers, read for many layers at once."""

import pytest
import torch

from chelsea import ClusteredCache, CompressionConfig
from chelsea.cache.padding import row_stats


def _naive(layer) -> list[list[int]]:
    valid = layer.log_counts[:, 0] > float("-inf")
    stored = valid.sum(-1).tolist()
    contiguous = [int(all(not (a and not b) for a, b in zip(row[:-1], row[1:]))) for row in valid.tolist()]
    padding = layer.row_padding.tolist() if layer.row_padding is not None else [0] * valid.shape[0]
    return [stored, contiguous, padding]


@pytest.mark.parametrize("seed", range(4))
def test_row_stats_of_many_layers_equal_each_layer_counted_alone(seed):
    """Layers of different lengths, rows padded in front, inside, at the end or not at all, some
    layers one entry long: the joined count gives each layer what counting it alone gives."""
    gen = torch.Generator().manual_seed(seed)
    rows, heads, dim = 5, 2, 4
    lengths = [int(n) for n in torch.randint(1, 40, (6,), generator=gen)] + [1]
    cache = ClusteredCache(CompressionConfig(ratio=0.5), method="chelsea-paper").holding(
        [(torch.randn(rows, heads, n, dim), torch.randn(rows, heads, n, dim)) for n in lengths])
    for i, layer in enumerate(cache.layers):
        pad = torch.rand(rows, layer.length, generator=gen) < torch.rand(rows, 1, generator=gen)
        pad[0] = False  # a row without padding
        pad[1, : layer.length // 2] = True  # padding only in front: contiguous
        pad[1, layer.length // 2 :] = False
        layer.log_counts.masked_fill_(pad[:, None, :], float("-inf"))
        if i % 2:
            layer.row_padding = torch.randint(0, 9, (rows,), generator=gen)
    expected = [_naive(layer) for layer in cache.layers]
    assert row_stats(cache.layers) == expected
    assert [row_stats([layer])[0] for layer in cache.layers] == expected
    assert any(0 in e[1] for e in expected) and any(1 in e[1] for e in expected)  # both kinds of rows occur
