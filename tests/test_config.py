import pytest

from chelsea import ChelseaError, CompressionConfig


@pytest.mark.parametrize(
    "kwargs,name",
    [
        ({"ratio": -0.1}, "ratio"),
        ({"ratio": 1.0}, "ratio"),
        ({"ratio": 1.5}, "ratio"),
        ({"chunk_size": 1}, "chunk_size"),
        ({"sink_tokens": -1}, "sink_tokens"),
        ({"window": -3}, "window"),
        ({"step_fraction": 0.0}, "step_fraction"),
        ({"compress_every": 0}, "compress_every"),
        ({"decode_span": 1}, "decode_span"),
        ({"decode_span": 2.5}, "decode_span"),
        ({"fact_weight": -1.0}, "fact_weight"),
        ({"fact_heads": 0}, "fact_heads"),
        ({"surprise_weight": -0.1}, "surprise_weight"),
        ({"output_norm": "yes"}, "output_norm"),
    ],
)
def test_bad_values_name_the_argument(kwargs, name):
    with pytest.raises(ChelseaError, match=name):
        CompressionConfig(**kwargs)


def test_budget():
    cfg = CompressionConfig(ratio=0.8, sink_tokens=4, window=16)
    assert cfg.budget(1000) == 200
    assert cfg.budget(1001) == 201  # rounded up
    assert cfg.budget(30) == 20  # never below sinks + window
    assert cfg.budget(10) == 10  # never above the tokens seen
    assert CompressionConfig(ratio=0.7, sink_tokens=0, window=0).budget(10) == 3
    assert CompressionConfig(ratio=0.0).budget(500) == 500
    assert CompressionConfig(chunk_size=16).compress_every == 16


@pytest.mark.parametrize(
    "kwargs,name",
    [({"delta": -1.0}, "delta"), ({"cluster_samples": 0}, "cluster_samples"), ({"value_samples": 0}, "value_samples"),
     ({"window": -1}, "window"), ({"radius": "mean"}, "radius"), ({"numerator": "x"}, "numerator")],
)
def test_clustergen_bad_values_name_the_argument(kwargs, name):
    from chelsea import ClusterGenConfig

    with pytest.raises(ChelseaError, match=name):
        ClusterGenConfig(**kwargs)
