"""Property-based fuzzing of the HTTP surface: random request bodies (mostly well-formed, with
random values) and random bytes; every answer is a 2xx or a 4xx in the OpenAI error shape, never a
5xx, and the server stays healthy after each.

``CHELSEA_FUZZ_EXAMPLES`` sets the cases per endpoint (default 60); with ``CHELSEA_FUZZ_OUT`` the
counts of statuses are written there as JSON (what ``results/`` quotes)."""

import json
import os
from collections import Counter

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starlette.testclient import TestClient
from transformers import AutoModelForCausalLM, AutoTokenizer

from chelsea.serving import Engine
from chelsea.serving.app import create_app

NAME = "tiny"
EXAMPLES = int(os.environ.get("CHELSEA_FUZZ_EXAMPLES", "60"))
SEEN: Counter = Counter()

scalars = st.none() | st.booleans() | st.integers(-3, 10**6) | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=40)
values = st.recursive(scalars, lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=8), c, max_size=3), max_leaves=8)
small = st.integers(-2, 12)
roles = st.sampled_from(["system", "developer", "user", "assistant", "tool", "wizard", ""])
content = st.text(max_size=200) | st.lists(st.fixed_dictionaries({"type": st.sampled_from(["text", "image_url"]),
                                                                   "text": st.text(max_size=40)}), max_size=2) | values
message = st.fixed_dictionaries({"role": roles, "content": content}, optional={"name": st.text(max_size=5), "tool_calls": values})
common = {"model": st.sampled_from([NAME, NAME, "other", None, 3]), "max_tokens": small, "max_completion_tokens": small,
          "temperature": st.floats(-1, 3) | values, "top_p": st.floats(-0.5, 1.5), "n": small, "seed": st.integers() | values,
          "stop": st.text(max_size=4) | st.lists(st.text(max_size=3), max_size=6) | values, "stream": st.booleans() | values,
          "stream_options": st.fixed_dictionaries({}, optional={"include_usage": st.booleans()}) | values,
          "presence_penalty": st.floats(-3, 3), "frequency_penalty": st.floats(-3, 3), "logprobs": values, "user": values,
          "logit_bias": values, "tools": values, "response_format": values,
          "chelsea": st.fixed_dictionaries({}, optional={"method": st.sampled_from(["chelsea", "full", "kvzip", "magic"]) | values,
                                                         "ratio": st.floats(-1, 2) | values, "document": values}) | values}
sane = {"max_tokens": st.integers(1, 8), "temperature": st.floats(0, 2), "top_p": st.floats(0, 1),
        "n": st.integers(1, 3), "seed": st.integers(0, 2**31), "stop": st.text(max_size=3) | st.lists(st.text(max_size=3), max_size=4),
        "stream": st.booleans(), "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}),
        "presence_penalty": st.floats(-2, 2), "frequency_penalty": st.floats(-2, 2), "user": st.text(max_size=8),
        "chelsea": st.fixed_dictionaries({}, optional={"method": st.sampled_from(["chelsea", "full", "kvzip", "snapkv"]),
                                                       "ratio": st.floats(0, 0.95)})}
sane_message = st.fixed_dictionaries({"role": st.sampled_from(["system", "developer", "user", "assistant", "tool"]),
                                      "content": st.text(max_size=200)})
junk = st.dictionaries(st.text(max_size=8), values, max_size=2)
chat = st.one_of(
    st.fixed_dictionaries({"model": st.just(NAME), "messages": st.lists(sane_message, min_size=1, max_size=3)}, optional=sane),
    st.builds(lambda required, extra: {**required, **extra},
              st.fixed_dictionaries({"messages": st.lists(message, max_size=3) | values}, optional=common), junk))
completion = st.one_of(
    st.fixed_dictionaries({"model": st.just(NAME), "prompt": st.text(max_size=200) | st.lists(st.integers(0, 40000), max_size=5)},
                          optional=sane),
    st.builds(lambda required, extra: {**required, **extra},
              st.fixed_dictionaries({"prompt": st.text(max_size=200) | st.lists(st.integers(-5, 70000), max_size=5) | values},
                                    optional=common), junk))
document = st.fixed_dictionaries({"text": st.text(max_size=300) | values}, optional={"chelsea": common["chelsea"]})


@pytest.fixture(scope="module")
def client(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    engine = Engine(model, AutoTokenizer.from_pretrained(tiny_model_dir), method="chelsea", ratio=0.5, max_tokens_limit=8)
    with TestClient(create_app(engine, NAME)) as test_client:
        yield test_client
    engine.close()
    if os.environ.get("CHELSEA_FUZZ_OUT"):
        with open(os.environ["CHELSEA_FUZZ_OUT"], "w") as f:
            json.dump({"cases": sum(SEEN.values()), "statuses": dict(sorted(SEEN.items()))}, f, indent=1)


def _check(client, path: str, content: bytes) -> None:
    response = client.post(path, content=content, headers={"content-type": "application/json"})
    SEEN[f"{path} {response.status_code}"] += 1
    assert response.status_code < 500, (content[:300], response.text[:500])
    if response.status_code >= 400:
        error = response.json()["error"]
        assert error["message"] and error["type"] and "param" in error
    assert client.get("/health").status_code == 200


FUZZ = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))


@FUZZ
@given(body=chat)
def test_chat_bodies(client, body):
    _check(client, "/v1/chat/completions", json.dumps(body).encode())


@FUZZ
@given(body=completion)
def test_completion_bodies(client, body):
    _check(client, "/v1/completions", json.dumps(body).encode())


@FUZZ
@given(body=document)
def test_document_bodies(client, body):
    _check(client, "/v1/documents", json.dumps(body).encode())


@FUZZ
@given(raw=st.binary(max_size=300), path=st.sampled_from(["/v1/chat/completions", "/v1/completions", "/v1/documents"]))
def test_raw_bytes(client, raw, path):
    _check(client, path, raw)
