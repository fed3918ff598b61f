"""Tensor parallelism on the CPU: 2 processes on the gloo backend, launched by torchrun, give the
same greedy tokens as one process, for the full cache and for Chelsea; each rank clusters only its
own KV heads."""

import json
import subprocess
import sys

import pytest
from clitools import chelsea_cli



def torchrun(nproc, *args, timeout=300):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
           "-m", "chelsea.cli", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("method", ["full", "chelsea"])
def test_two_ranks_give_the_same_tokens_as_one(tiny_model_dir, tmp_path, method):
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    # Reconstruction scores are per KV head, so ranks holding half the heads each score them as one
    # rank does; the learned scorer (the default) maps all of a layer's heads together, and each
    # rank fits its own on its heads, so its tokens may differ from one rank's.
    args = ["generate", "--model", str(tiny_model_dir), "-f", str(prompt), "--method", method, "--ratio", "0.8",
            "--window", "16", "--max-new-tokens", "12", "--json", "--no-chat-template", "--device", "cpu",
            *(["--set", "importance=local"] if method == "chelsea" else [])]
    one = chelsea_cli(*args)
    assert one.returncode == 0, one.stderr
    two = torchrun(2, *args)
    assert two.returncode == 0, two.stderr[-3000:]
    single, parallel = json.loads(one.stdout), json.loads(two.stdout)  # only rank 0 prints
    assert single["world_size"] == 1 and parallel["world_size"] == 2
    assert parallel["tokens"] == single["tokens"] and len(single["tokens"]) == 12
    # each rank holds one of the two KV heads: half the bytes of the whole cache
    assert parallel["kv_bytes"] * 2 == pytest.approx(single["kv_bytes"], rel=0.02)
    if method == "chelsea":
        assert parallel["kv_bytes"] < 0.3 * parallel["kv_bytes_full"]


def test_two_ranks_run_the_default_learned_scorer(tiny_model_dir, tmp_path):
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    two = torchrun(2, "generate", "--model", str(tiny_model_dir), "-f", str(prompt), "--ratio", "0.8", "--window", "16",
                   "--max-new-tokens", "6", "--json", "--no-chat-template", "--device", "cpu")
    assert two.returncode == 0, two.stderr[-3000:]
    row = json.loads(two.stdout)
    assert row["world_size"] == 2 and len(row["tokens"]) == 6 and row["kv_bytes"] < 0.3 * row["kv_bytes_full"]


def test_ranks_that_cannot_share_the_kv_heads_evenly_are_refused(tiny_model_dir, tmp_path):
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("hello " * 50)
    out = torchrun(3, "generate", "--model", str(tiny_model_dir), "-f", str(prompt), "--device", "cpu")
    assert out.returncode != 0
    assert "2 KV heads, which 3 tensor-parallel ranks cannot share evenly" in out.stderr


def test_device_map_gives_the_same_tokens(tiny_model_dir, tmp_path):
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    args = ["generate", "--model", str(tiny_model_dir), "-f", str(prompt), "--ratio", "0.8", "--window", "16",
            "--max-new-tokens", "8", "--json", "--no-chat-template", "--device", "cpu"]
    plain, mapped = chelsea_cli(*args), chelsea_cli(*args, "--device-map", "auto")
    assert plain.returncode == 0 and mapped.returncode == 0, mapped.stderr
    assert json.loads(mapped.stdout)["tokens"] == json.loads(plain.stdout)["tokens"]
