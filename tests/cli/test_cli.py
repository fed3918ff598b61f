"""The chelsea command, run as a user would, on a tiny local model folder (no hub needed)."""

import json

import pytest
import torch
from clitools import chelsea_cli
from transformers import GPT2Config, GPT2LMHeadModel


@pytest.fixture
def prompt_file(tmp_path):
    path = tmp_path / "prompt.txt"
    path.write_text("The quick brown fox jumps over the lazy dog. " * 30)
    return path


def test_help_on_every_command():
    from chelsea.methods import METHODS

    for args in ([], ["demo"], ["generate"], ["models"], ["methods"], ["eval"], ["report"], ["analyze"], ["bench"], ["serve"]):
        out = chelsea_cli(*args, "--help")
        assert out.returncode == 0 and "Usage" in out.stdout
        if args and args[0] in ("generate", "eval", "bench", "serve"):  # the methods come from the registry
            text = " ".join(out.stdout.split())
            assert all(name in text for name in METHODS), args


@pytest.mark.parametrize(
    "args,name",
    [(["--ratio", "1.5"], "ratio"), (["--ratio", "-0.2"], "ratio"), (["--method", "chelsea-paper", "--set", "chunk_size=1"], "chunk_size"),
     (["--sinks", "-1"], "sink_tokens"), (["--window", "-4"], "window"), (["--set", "chunk_size=8"], "chunk_size is not a setting of chelsea"),
     (["--set", "window=8"], "use --window"), (["--set", "exact_share"], "NAME=VALUE")],
)
def test_bad_settings_are_named(args, name, prompt_file):
    out = chelsea_cli("generate", "-f", str(prompt_file), *args)
    assert out.returncode == 2
    assert name in out.stderr and "Traceback" not in out.stderr


def test_generate_json_on_a_local_model(tiny_model_dir, prompt_file):
    out = chelsea_cli("generate", "--model", str(tiny_model_dir), "-f", str(prompt_file), "-q", "What jumps?",
                      "--ratio", "0.8", "--window", "16", "--max-new-tokens", "4", "--json", "--device", "cpu")
    assert out.returncode == 0, out.stderr
    row = json.loads(out.stdout)
    for key in ("answer", "method", "ratio", "tokens_seen", "kv_entries", "kv_bytes", "kv_bytes_full", "prefill_s", "decode_s"):
        assert key in row
    assert row["method"] == "chelsea" and row["ratio"] == 0.8 and row["tokens_seen"] > 300
    assert row["kv_bytes"] < 0.3 * row["kv_bytes_full"]
    assert row["kv_entries"] < 0.3 * row["tokens_seen"]


def test_full_method_keeps_everything(tiny_model_dir, prompt_file):
    out = chelsea_cli("generate", "--model", str(tiny_model_dir), "-f", str(prompt_file), "--method", "full",
                      "--max-new-tokens", "3", "--json", "--no-chat-template")
    assert out.returncode == 0, out.stderr
    row = json.loads(out.stdout)
    assert row["kv_bytes"] == row["kv_bytes_full"] and row["kv_entries"] == row["tokens_seen"]


def test_prompt_longer_than_context(tiny_model_dir, tmp_path):
    long_file = tmp_path / "long.txt"
    long_file.write_text("word " * 2000)
    out = chelsea_cli("generate", "--model", str(tiny_model_dir), "-f", str(long_file))
    assert out.returncode == 2 and "exceeds the model's context of 512" in out.stderr


def test_unsupported_architecture(tmp_path, prompt_file):
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2)).save_pretrained(tmp_path / "gpt2")
    out = chelsea_cli("generate", "--model", str(tmp_path / "gpt2"), "-f", str(prompt_file))
    assert out.returncode == 2 and "'gpt2' is not supported" in out.stderr


def test_unknown_method_and_missing_file(tiny_model_dir, prompt_file, tmp_path):
    out = chelsea_cli("generate", "--model", str(tiny_model_dir), "-f", str(prompt_file), "--method", "magic")
    assert out.returncode == 2 and "--method" in out.stderr
    out = chelsea_cli("generate", "-f", str(tmp_path / "missing.txt"))
    assert out.returncode == 2 and "--prompt-file" in out.stderr


@pytest.mark.parametrize("method", ["chelsea", "kvzip"])
def test_generate_with_importance_methods(tiny_model_dir, prompt_file, method):
    out = chelsea_cli("generate", "--model", str(tiny_model_dir), "-f", str(prompt_file), "-q", "What jumps?", "--method", method,
                      "--ratio", "0.8", "--window", "16", "--max-new-tokens", "4", "--json", "--device", "cpu")
    assert out.returncode == 0, out.stderr
    row = json.loads(out.stdout)
    assert row["method"] == method and row["compressed"] is True
    assert row["kv_bytes"] < 0.3 * row["kv_bytes_full"]
    assert "FutureWarning" not in out.stderr


def test_generate_with_a_fixed_capacity(tiny_model_dir, prompt_file):
    out = chelsea_cli("generate", "--model", str(tiny_model_dir), "-f", str(prompt_file), "-q", "What jumps?", "--method",
                      "chelsea-paper", "--ratio", "0.5", "--capacity", "40", "--window", "16", "--max-new-tokens", "4", "--json",
                      "--device", "cpu")
    assert out.returncode == 0, out.stderr
    row = json.loads(out.stdout)
    assert row["tokens_seen"] > 300 and row["kv_entries"] <= 40 + 32  # the capacity, plus what one decoding schedule adds
    out = chelsea_cli("generate", "--model", str(tiny_model_dir), "-f", str(prompt_file), "--capacity", "0")
    assert out.returncode == 2 and "capacity" in out.stderr and "Traceback" not in out.stderr


def test_bad_importance_settings_get_one_line(tiny_model_dir, prompt_file):
    for name, value in (("importance", "psychic"), ("exact_share", "1.5"), ("merge", "blend")):
        out = chelsea_cli("generate", "--model", str(tiny_model_dir), "-f", str(prompt_file), "--set", f"{name}={value}")
        assert out.returncode == 2 and "Traceback" not in out.stderr and name in out.stderr


def test_generate_with_clustergen(tiny_model_dir, prompt_file):
    out = chelsea_cli("generate", "--model", str(tiny_model_dir), "-f", str(prompt_file), "--method", "clustergen",
                      "--window", "16", "--set", "value_samples=32", "--max-new-tokens", "3", "--json", "--no-chat-template")
    assert out.returncode == 0, out.stderr
    row = json.loads(out.stdout)
    assert row["method"] == "clustergen" and row["ratio"] is None and row["compressed"] is True


def test_bench_writes_records(tiny_model_dir, tmp_path):
    out_file = tmp_path / "bench.json"
    out = chelsea_cli(
        "bench", "--model", str(tiny_model_dir), "--methods", "chelsea,knorm,clustergen", "--ratios", "0.5",
        "--contexts", "200", "--batches", "1,2", "--decode-tokens", "3", "--out", str(out_file))
    assert out.returncode == 0, out.stderr
    records = json.loads(out_file.read_text())
    assert [(r["batch"], r["method"]) for r in records] == [
        (b, m) for b in (1, 2) for m in ("full", "chelsea", "knorm", "clustergen")]
    assert [r["ratio"] for r in records[:4]] == [0.0, 0.5, 0.5, None]
    for r in records:
        for key in ("device", "model", "method", "ratio", "context", "batch", "prefill_s", "decode_ms_per_token",
                    "peak_mem_bytes", "kv_bytes", "speedup_vs_full", "bandwidth_limit_speedup"):
            assert key in r
        assert r["cuda_graph"] is False  # CPU: eager steps
        # chelsea scores as generate does: by its learned scorer (fitted first), the model folder has a tokenizer
        assert r["scoring"] == ("learned" if r["method"] == "chelsea" else None)
        assert r["prefill_vs_full"] == (round(r["prefill_s"] / records[0 if r["batch"] == 1 else 4]["prefill_s"], 3))
        if r["method"] in ("chelsea", "knorm"):
            assert r["kv_bytes"] < 0.6 * r["kv_bytes_full"] and r["bandwidth_limit_speedup"] > 1.0
    assert "speed-up" in out.stdout


def test_bench_rejects_bad_lists():
    out = chelsea_cli("bench", "--contexts", "abc")
    assert out.returncode == 2 and "--contexts" in out.stderr
    out = chelsea_cli("bench", "--methods", "magic")
    assert out.returncode == 2 and "--methods" in out.stderr


def test_bench_refuses_a_context_without_room_for_decoding_before_it_runs(tiny_model_dir):
    """The tiny model's context is 512 tokens; a 512-token prompt leaves no room for the 32
    decoded tokens, and the error names the longest context that fits."""
    out = chelsea_cli("bench", "--model", str(tiny_model_dir), "--contexts", "64,512")
    assert out.returncode == 2 and "--contexts 512 leaves no room for 32 decoded tokens" in out.stderr
    assert "use at most 478" in out.stderr and "learned scorer" not in out.stderr  # refused before the warm-up


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_bench_refuses_cuda_graphs_without_cuda(tiny_model_dir):
    out = chelsea_cli("bench", "--model", str(tiny_model_dir), "--contexts", "64", "--cuda-graphs")
    assert out.returncode == 2 and "--no-cuda-graphs" in out.stderr
    out = chelsea_cli("bench", "--model", str(tiny_model_dir), "--contexts", "64", "--fuse")
    assert out.returncode == 2 and "needs --cuda-graphs" in out.stderr
    out = chelsea_cli("bench", "--model", str(tiny_model_dir), "--contexts", "64", "--batches", "2", "--prefill-batch", "1")
    assert out.returncode == 2 and "StaticCache" in out.stderr


@pytest.mark.parametrize("fits_up_to,limit", [(37, 1024), (1, 64), (0, 64), (64, 64), (100, 48), (5, 6)])
def test_largest_batch_search(fits_up_to, limit):
    from chelsea.evaluation.bench import largest_batch

    tried = []

    def try_batch(b):
        tried.append(b)
        return {"batch": b} if b <= fits_up_to else None

    batch, record = largest_batch(try_batch, limit)
    expected = min(fits_up_to, limit)
    assert batch == expected and (record == {"batch": expected} if expected else record is None)
    assert max(tried) <= limit and len(tried) <= 2 * (limit.bit_length() + 1)


def test_bench_max_batch_search(tiny_model_dir, tmp_path):
    out_file = tmp_path / "bench.json"
    out = chelsea_cli("bench", "--model", str(tiny_model_dir), "--methods", "chelsea", "--ratios", "0.5",
                      "--contexts", "128", "--max-batch", "3", "--decode-tokens", "2", "--out", str(out_file))
    assert out.returncode == 0, out.stderr
    records = json.loads(out_file.read_text())
    assert [(r["method"], r["batch"], r["search"]) for r in records] == [("full", 3, "largest_batch"), ("chelsea", 3, "largest_batch")]
    assert records[1]["throughput_vs_full"] > 0 and records[0]["world_size"] == 1


def test_benchmark_loading_pairs_presets_with_a_tokenizer_folder(tiny_model_dir):
    from chelsea.errors import ChelseaError
    from chelsea.models import load_with_tokenizer

    with pytest.raises(ChelseaError, match="has no tokenizer"):
        load_with_tokenizer("qwen2.5-0.5b")
    model, tokenizer = load_with_tokenizer(str(tiny_model_dir), str(tiny_model_dir))
    assert tokenizer("hello").input_ids and model.config.num_hidden_layers >= 1


def test_methods_lists_the_registry_and_each_methods_settings():
    out = chelsea_cli("methods")
    assert out.returncode == 0 and "`chelsea-paper` | `chelsea/methods/chelsea_paper.py`" in out.stdout
    one = chelsea_cli("methods", "chelsea-paper")
    assert one.returncode == 0 and "chunk_size" in one.stdout and "32" in one.stdout
    assert chelsea_cli("methods", "magic").returncode == 2


def test_set_reaches_the_method(tiny_model_dir, prompt_file):
    """The same prompt with another exact share stores the same bytes but other entries: the
    setting got to the method (and a setting of another method is refused before the model loads)."""
    base = ["generate", "--model", str(tiny_model_dir), "-f", str(prompt_file), "--ratio", "0.8", "--window", "16",
            "--max-new-tokens", "2", "--json", "--device", "cpu", "--set", "fact_weight=0", "--set", "importance=window"]
    rows = []
    for share in ("0.0", "1.0"):
        out = chelsea_cli(*base, "--set", f"exact_share={share}")
        assert out.returncode == 0, out.stderr
        rows.append(json.loads(out.stdout))
    assert rows[0]["kv_bytes"] == rows[1]["kv_bytes"] and rows[0]["compressed"] and rows[1]["compressed"]
    assert [r["settings"]["exact_share"] for r in rows] == [0.0, 1.0]
    assert rows[0]["settings"]["scoring"]["importance"] == "window" and rows[0]["settings"]["scoring"]["fact_weight"] == 0.0


def test_serve_calibrates_first_and_says_where_it_listens(tiny_model_dir):
    import socket
    import subprocess
    import sys
    import time

    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "chelsea.cli", "serve", "--model", str(tiny_model_dir), "--port", str(port),
                             "--device", "cpu"], stderr=subprocess.PIPE, text=True)
    try:
        lines = []
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            line = proc.stderr.readline()
            lines.append(line)
            if "listening on" in line:
                break
        text = "".join(lines)
        assert f"listening on http://127.0.0.1:{port}/v1" in text and "16 requests run and 16 wait" in text
        assert text.index("Calibration of chelsea") < text.index("listening on")  # the calibration came before, not in a request
        assert httpx.get(f"http://127.0.0.1:{port}/health").json()["status"] == "ok"
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def test_calibrate_ships_only_a_built_in_models_learned_scorer(tiny_model_dir):
    for extra in (["--model", str(tiny_model_dir)], ["--model", "smollm2-135m", "--set", "importance=local"]):
        out = chelsea_cli("calibrate", "--ship", *extra)
        assert out.returncode == 2 and "--ship" in out.stderr and "Traceback" not in out.stderr
