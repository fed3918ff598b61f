import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).parent))

# Calibrations (fact heads, learned scorers) go to a folder of this test session, never to the
# user's own cache folder; command-line runs in subprocesses inherit it.
_CACHE = tempfile.mkdtemp(prefix="chelsea-tests-")
os.environ["CHELSEA_CACHE_DIR"] = _CACHE


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(_CACHE, ignore_errors=True)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A randomly initialised Llama with the SmolLM2 tokenizer, saved like any local model."""
    from transformers import AutoTokenizer

    from chelsea.models import resolve

    path, extra = resolve("smollm2-135m")
    tokenizer = AutoTokenizer.from_pretrained(path, **extra)
    folder = tmp_path_factory.mktemp("tiny-llama")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
