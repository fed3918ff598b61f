"""`chelsea eval` end to end on a tiny local model: files, resumption, summary; `analyze` properties."""

import csv
import json

import pytest
import torch
from clitools import chelsea_cli

from chelsea.evaluation.analyze import best_match_similarity, similarity_by_distance
from chelsea.evaluation.evaluate import plan
from chelsea.evaluation.report import markdown, summarise


def test_eval_writes_results_resumes_and_summarises(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    args = ["eval", "--model", str(tiny_model_dir), "--out", str(out), "--tasks", "needle,passkey,ppl",
            "--methods", "full,chelsea,snapkv,h2o", "--ratios", "0.5", "--lengths", "300", "--samples", "2",
            "--batch-size", "2", "--window", "16", "--ppl-block", "64", "--device", "cpu"]
    first = chelsea_cli(*args, timeout=600)
    assert first.returncode == 0, first.stderr
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    # 2 question tasks x 2 placements x 4 settings + ppl x 4 settings, 2 samples each
    assert len(rows) == (2 * 2 * 4 + 4) * 2
    for r in rows:
        if r["task"] == "ppl":
            assert r["tokens"] == 299 and r["ppl"] > 1
        else:
            assert 0.0 <= r["score"] <= 1.0 and r["answers"]
        if r["method"] == "full":
            assert r["kv_fraction"] == 1.0
        else:
            assert r["kv_fraction"] < 0.65
    second = chelsea_cli(*args, timeout=600)
    assert second.returncode == 0 and "ran 0 samples" in second.stderr
    assert len((out / "results.jsonl").read_text().splitlines()) == len(rows)
    with open(out / "summary.csv") as f:
        summary = list(csv.DictReader(f))
    assert len(summary) == 2 * 2 * 4 + 4 and all(int(s["samples"]) == 2 for s in summary)
    assert "| full | 0 |" in (out / "summary.md").read_text()
    for name in ("accuracy_vs_ratio.png", "needle_heatmap_0.5.png", "runs.json"):
        assert (out / name).stat().st_size > 0
    report = chelsea_cli("report", str(out), "--no-plots")
    assert report.returncode == 0


def test_eval_agnostic_placement_with_importance_methods(tiny_model_dir, tmp_path):
    out = tmp_path / "agnostic"
    run = chelsea_cli("eval", "--model", str(tiny_model_dir), "--out", str(out), "--tasks", "multikey",
                      "--methods", "full,chelsea,kvzip,snapkv", "--ratios", "0.8", "--lengths", "400", "--samples", "2",
                      "--batch-size", "2", "--window", "16", "--placements", "agnostic,after", "--device", "cpu",
                      "--no-plots", timeout=600)
    assert run.returncode == 0, run.stderr
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert len(rows) == 2 * 4 * 2 and {r["placement"] for r in rows} == {"agnostic", "after"}
    for r in rows:
        if r["method"] != "full":  # compressed to about a fifth, uneven layers included
            assert 0.15 < r["kv_fraction"] < 0.3
    runs = json.loads((out / "runs.json").read_text())
    chelsea = runs[-1]["resolved"]["chelsea"]  # every method's settings are logged, defaults included
    assert chelsea["scoring"]["importance"] == "learned" and chelsea["scoring"]["surprise_weight"] == 0.3
    assert runs[-1]["resolved"]["kvzip"]["scoring"]["importance"] == "local"  # KVzip's own scores
    assert chelsea["scoring"]["output_norm"] is True and runs[-1]["settings"] == {"sink_tokens": 4, "window": 16}
    summary = (out / "summary.md").read_text()
    assert "### Context compressed before the question, 400 tokens, ratio 0.8" in summary
    assert "### Question after the context, 400 tokens, ratio 0.8" in summary


def test_eval_rejects_bad_grids(tiny_model_dir, tmp_path):
    for flag, value in (("--tasks", "magic"), ("--methods", "magic"), ("--ratios", "1.2"), ("--placements", "middle"),
                        ("--lengths", "10")):
        out = chelsea_cli("eval", "--model", str(tiny_model_dir), "--out", str(tmp_path), flag, value)
        assert out.returncode == 2 and flag.lstrip("-")[:5] in out.stderr and "Traceback" not in out.stderr


def test_plan_runs_full_once_and_ratios_for_the_rest():
    cells = plan(["needle", "ppl"], ["full", "chelsea", "clustergen"], [0.5, 0.8], [1024], ["after", "before"])
    settings = {(c.method, c.ratio) for c in cells}
    assert settings == {("full", 0.0), ("chelsea", 0.5), ("chelsea", 0.8), ("clustergen", None)}
    assert len(cells) == (2 + 1) * 4


def test_a_folder_made_with_other_settings_is_not_resumed(tmp_path):
    from chelsea.errors import ChelseaError
    from chelsea.evaluation.evaluate import _check_same_settings

    settings = {"sink_tokens": 4, "window": 64, "delta": 0.8}
    (tmp_path / "runs.json").write_text(json.dumps([{"settings": settings}]))
    _check_same_settings(tmp_path, {"settings": settings})
    with pytest.raises(ChelseaError, match="window"):
        _check_same_settings(tmp_path, {"settings": {**settings, "window": 32}})
    with pytest.raises(ChelseaError, match="delta"):
        _check_same_settings(tmp_path, {"settings": {**settings, "delta": 1.0}})


def test_eval_refuses_settings_no_method_has(tiny_model_dir, tmp_path):
    out = chelsea_cli("eval", "--model", str(tiny_model_dir), "--out", str(tmp_path), "--methods", "full,snapkv",
                      "--set", "exact_share=0.3")
    assert out.returncode == 2 and "exact_share is not a setting of snapkv" in out.stderr


def test_report_tables_per_placement_average_the_tasks():
    def row(task, placement, method, ratio, score):
        return {"task": task, "placement": placement, "length": 1024, "method": method, "ratio": ratio, "score": score,
                "kv_fraction": 1.0 if method == "full" else 0.2}

    rows = [row("needle", "before", "full", 0.0, 1.0), row("passkey", "before", "full", 0.0, 0.5),
            row("needle", "before", "chelsea", 0.8, 1.0), row("needle", "before", "chelsea", 0.8, 0.0),
            row("passkey", "before", "chelsea", 0.8, 1.0), row("needle", "before", "clustergen", None, 1.0),
            row("needle", "after", "chelsea", 0.8, 0.0), row("passkey", "before", "chelsea", 0.5, 0.0)]
    text = markdown(summarise(rows))
    table = text.split("### Question before the context, 1024 tokens, ratio 0.8")[1].split("###")[0]
    assert "| full | 100 | 50 | 75 |" in table
    assert "| chelsea | 50 | 100 | 75 |" in table  # needle: mean of two samples; the 0.5 row is elsewhere
    assert "| clustergen | 100 |  |  |" in table  # not run on passkey: no mean
    assert "### Question after the context, 1024 tokens, ratio 0.8" in text


def test_key_similarity_properties():
    g = torch.Generator().manual_seed(0)
    same = torch.randn(2, 1, 16, generator=g).expand(2, 64, 16)
    assert all(abs(v - 1.0) < 1e-5 for v in similarity_by_distance(same, [1, 8, 32]))
    assert all(abs(v - 1.0) < 1e-5 for v in best_match_similarity(same, chunk_size=8).values())
    # pairs of identical neighbours: the alternating split always finds the twin, halves rarely can
    twins = torch.randn(1, 32, 16, generator=g).repeat_interleave(2, dim=1)
    scores = best_match_similarity(twins, chunk_size=8)
    assert abs(scores["alternating"] - 1.0) < 1e-5 and scores["halves"] < 0.9


def test_the_pareto_points_count_bytes_kept_and_average_the_question_tasks(tmp_path):
    from chelsea.evaluation.report import pareto_points, plot_pareto

    def row(task, method, ratio, score, fraction):
        return {"task": task, "placement": "after", "length": 1024, "method": method, "ratio": ratio, "score": score,
                "kv_fraction": fraction}

    rows = [row("needle", "full", 0.0, 1.0, 1.0), row("code", "full", 0.0, 0.5, 1.0),
            row("needle", "chelsea", 0.8, 1.0, 0.21), row("code", "chelsea", 0.8, 0.0, 0.19),
            row("needle", "chelsea", 0.9, 0.0, 0.1), row("code", "chelsea", 0.9, 0.0, 0.1),
            row("needle", "masking-peer", 0.8, 1.0, 1.0)]
    summary = summarise(rows)
    points = pareto_points(summary)["after"]
    assert points["full"] == [(1.0, 0.75)]
    assert points["chelsea"] == [(0.1, 0.0), (0.2, 0.5)]  # sorted by bytes, the tasks averaged
    assert points["masking-peer"] == [(1.0, 1.0)]  # a peer that only masks keeps the full cache's bytes
    plot_pareto(summary, tmp_path / "pareto.png")
    assert (tmp_path / "pareto.png").stat().st_size > 1000


def test_a_streamed_cell_fills_a_fixed_budget_before_it_compresses():
    """The streamed placement's cache keeps the ratio's share of the whole context: its first chunk
    stays whole (a budget of 20% of the tokens seen so far would cut it to 103 entries), and at the
    end it holds that share, like the other placements."""
    from tiny import tiny

    from chelsea import prepare_model
    from chelsea.compat import cache_arg
    from chelsea.evaluation.evaluate import Cell, _cache
    from chelsea.evaluation.tasks import STREAM_CHUNK

    model = prepare_model(tiny("llama"))
    context = 2600
    cache = _cache(model, Cell("needle", "streamed", context + 20, "chelsea-paper", 0.8), {"window": 16}, context)
    assert cache.config.capacity == 520 == cache.config.budget(context)
    ids = torch.randint(0, 256, (1, context))
    lengths = []
    with torch.inference_mode():
        for start in range(0, context, STREAM_CHUNK):
            model(ids[:, start : start + STREAM_CHUNK], **cache_arg(model, cache), use_cache=True)
            lengths.append(cache.layers[0].length)
    assert lengths[0] == STREAM_CHUNK
    assert all(length <= 520 for length in lengths[1:]) and lengths[-1] >= 0.9 * 520
    for placement in ("after", "agnostic"):  # the ratio's share of what was read, as before
        assert _cache(model, Cell("needle", placement, context + 20, "chelsea-paper", 0.8), {}, context).config.capacity is None
    explicit = _cache(model, Cell("needle", "streamed", context + 20, "chelsea-paper", 0.8), {"capacity": 300}, context)
    assert explicit.config.capacity == 300
