"""Settings: one check per setting, named in every error; the shared budget rule; the settings page."""

from pathlib import Path

import pytest

from chelsea import ChelseaError, CompressionConfig, Importance
from chelsea.methods import ChelseaPaper, ClusterGen, get_method


@pytest.mark.parametrize(
    "make,name",
    [
        (lambda: CompressionConfig(ratio=-0.1), "ratio"),
        (lambda: CompressionConfig(ratio=1.0), "ratio"),
        (lambda: CompressionConfig(ratio=1.5), "ratio"),
        (lambda: CompressionConfig(ratio="half"), "ratio"),
        (lambda: CompressionConfig(sink_tokens=-1), "sink_tokens"),
        (lambda: CompressionConfig(window=-3), "window"),
        (lambda: CompressionConfig(window=2.5), "window"),
        (lambda: CompressionConfig(compress_every=0), "compress_every"),
        (lambda: ChelseaPaper(chunk_size=1), "chunk_size"),
        (lambda: ChelseaPaper(step_fraction=0.0), "step_fraction"),
        (lambda: ChelseaPaper(decode_span=1), "decode_span"),
        (lambda: ChelseaPaper(decode_span=2.5), "decode_span"),
        (lambda: Importance(fact_weight=-1.0), "fact_weight"),
        (lambda: Importance(fact_heads=0), "fact_heads"),
        (lambda: Importance(surprise_weight=-0.1), "surprise_weight"),
        (lambda: Importance(output_norm="yes"), "output_norm"),
        (lambda: Importance(importance="psychic"), "importance"),
        (lambda: get_method("chelsea", exact_share=1.5), "exact_share"),
        (lambda: get_method("chelsea", merge="blend"), "merge"),
        (lambda: ClusterGen(delta=-1.0), "delta"),
        (lambda: ClusterGen(cluster_samples=0), "cluster_samples"),
        (lambda: ClusterGen(value_samples=0), "value_samples"),
        (lambda: ClusterGen(radius="mean"), "radius"),
        (lambda: ClusterGen(numerator="x"), "numerator"),
    ],
)
def test_bad_values_name_the_setting(make, name):
    with pytest.raises(ChelseaError, match=name):
        make()


def test_settings_are_found_where_they_live_and_unknown_ones_are_named():
    method = get_method("chelsea", exact_share=0.7, fact_weight=0.0)
    assert method.exact_share == 0.7 and method.scoring.fact_weight == 0.0
    assert get_method("chelsea").scoring.fact_weight == 100.0  # the default is untouched
    with pytest.raises(ChelseaError, match="chunk_size is not a setting of chelsea"):
        get_method("chelsea", chunk_size=8)
    assert ChelseaPaper(chunk_size=16).compress_every == 16  # the paper's method compresses once per chunk
    assert get_method("kvzip").scoring.fact_weight == 0.0 and get_method("kvzip").scoring.surprise_weight == 0.0


def test_budget():
    cfg = CompressionConfig(ratio=0.8, sink_tokens=4, window=16)
    assert cfg.budget(1000) == 200
    assert cfg.budget(1001) == 201  # rounded up
    assert cfg.budget(30) == 20  # never below sinks + window
    assert cfg.budget(10) == 10  # never above the tokens seen
    assert CompressionConfig(ratio=0.7, sink_tokens=0, window=0).budget(10) == 3
    assert CompressionConfig(ratio=0.0).budget(500) == 500


def test_the_settings_page_is_generated_from_the_settings():
    from chelsea.methods.catalogue import settings_page

    page = Path(__file__).resolve().parents[1] / "docs" / "settings.md"
    assert page.read_text(encoding="utf-8") == settings_page(), "regenerate it: chelsea methods --markdown > docs/settings.md"


def test_a_capacity_is_a_fixed_budget_whatever_the_tokens_seen():
    config = CompressionConfig(ratio=0.8, capacity=300, sink_tokens=4, window=16)
    assert [config.budget(n) for n in (100, 300, 1000, 100_000)] == [100, 300, 300, 300]
    assert CompressionConfig(ratio=0.8, capacity=5, sink_tokens=4, window=16).budget(1000) == 20  # never below sinks + window
    with pytest.raises(ChelseaError, match="capacity"):
        CompressionConfig(capacity=0)
