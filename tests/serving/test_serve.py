"""`chelsea serve` through the official openai client: a real server on a free local port, a tiny model."""

import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import torch
import uvicorn
from transformers import AutoModelForCausalLM, AutoTokenizer

from chelsea import ChelseaError
from chelsea.serving import Engine, Job, ServeError
from chelsea.serving.app import create_app

NAME = "tiny"


def _metric(base: str, name: str) -> float:
    text = httpx.get(f"{base}/metrics").text
    return float(next(line.split()[1] for line in text.splitlines() if line.startswith(f"chelsea_{name} ")))


def _serve(engine):
    """The app around ``engine`` on a free local port, in a thread: ``(base URL, server, thread)``."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = uvicorn.Config(create_app(engine, NAME), host="127.0.0.1", port=port, log_level="warning")
    srv = uvicorn.Server(config)
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    for _ in range(200):
        try:
            if httpx.get(f"{base}/health").status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.05)
    return base, srv, thread


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    engine = Engine(model, tokenizer, method="chelsea", ratio=0.8, max_queue=4, max_tokens_limit=64)
    base, srv, thread = _serve(engine)
    yield base, engine
    srv.should_exit = True
    thread.join(timeout=10)
    engine.close()


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=f"{server[0]}/v1", api_key="unused", max_retries=0)


DOC = " ".join(f"Line {i}: the quick brown fox jumps over the lazy dog number {i * 7}." for i in range(14))


def test_models_health_and_metrics(server, client):
    assert [m.id for m in client.models.list().data] == [NAME]
    assert httpx.get(f"{server[0]}/health").json()["status"] == "ok"
    assert "# TYPE chelsea_requests_total counter" in httpx.get(f"{server[0]}/metrics").text


def test_chat_streaming_gives_the_same_text_as_non_streaming(client):
    messages = [{"role": "user", "content": DOC + "\n\nWhich number follows line 3?"}]
    whole = client.chat.completions.create(model=NAME, messages=messages, max_tokens=12, temperature=0)
    assert whole.choices[0].finish_reason in ("stop", "length") and whole.usage.completion_tokens <= 12
    chunks = list(client.chat.completions.create(model=NAME, messages=messages, max_tokens=12, temperature=0, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"  # the first chunk opens the assistant's turn
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    assert text == whole.choices[0].message.content
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason


def test_completions_and_per_request_method(client):
    a = client.completions.create(model=NAME, prompt=DOC, max_tokens=8, extra_body={"chelsea": {"method": "full"}})
    b = client.completions.create(model=NAME, prompt=DOC, max_tokens=8, extra_body={"chelsea": {"method": "chelsea", "ratio": 0.5}})
    c = client.completions.create(model=NAME, prompt=[12, 34, 56], max_tokens=3)  # token ids
    assert c.usage.prompt_tokens == 3
    assert a.choices[0].text is not None and b.choices[0].text is not None
    assert a.usage.prompt_tokens == b.usage.prompt_tokens > 200


def test_concurrent_requests_answer_as_one_at_a_time(client):
    prompts = [f"{DOC}\n\nQuestion {i}: what is line {i}?" for i in range(3)]
    ask = lambda p: client.completions.create(model=NAME, prompt=p, max_tokens=10, temperature=0).choices[0].text  # noqa: E731
    one = [ask(p) for p in prompts]
    with ThreadPoolExecutor(3) as pool:
        together = list(pool.map(ask, prompts))
    assert together == one


def test_concurrent_requests_are_decoded_in_one_batch(server):
    """Four requests of 12 tokens whose rows are all handed to the decoder before it steps on: two
    batches (chelsea, full) of 2 rows take about 2 x 11 steps, where one at a time would take 4 x 11, and
    each answer equals the one it gets alone (every method, full included)."""
    base, engine = server
    jobs = [Job(engine.completion_ids(f"{DOC}\n\nQuestion {i}:", None), method, 0.5, 12, ignore_eos=True)
            for i in range(2) for method in ("chelsea", "full")]
    alone = [_tokens(engine.submit(Job(j.ids, j.method, j.ratio, j.max_tokens, ignore_eos=True))) for j in jobs]
    decoder, handed, gate = engine.decoder, [], threading.Event()
    hand_over, step = decoder.hand_over, decoder._step

    def counted(*args):
        hand_over(*args)
        handed.append(1)
        if len(handed) == len(jobs):
            gate.set()

    decoder.hand_over, decoder._step = counted, lambda key: (gate.wait(60), step(key))
    try:
        steps = _metric(base, "decode_steps_total")
        for job in jobs:
            engine.submit(job)
        together = [_tokens(job) for job in jobs]
    finally:
        decoder.hand_over, decoder._step = hand_over, step
    assert together == alone and all(len(t) == 12 for t in together)
    # (one step more: the step that waited for the others had taken its batch of one row already)
    assert _metric(base, "decode_steps_total") - steps <= 2 * 11 + 1
    assert _metric(base, "active_requests") == 0


def _tokens(job):
    out = []
    while (token := job.tokens.get(timeout=120)) is not None:
        out.append(token)
    return out


def test_questions_on_a_document_start_in_one_forward_and_answer_as_alone(server):
    base, engine = server
    name = engine.register_ids(engine.document_ids(DOC), "chelsea", 0.8)
    ids = engine.documents[name].ids
    questions = [engine.question_ids(f"Which number follows line {i}?") for i in (1, 2, 3)]
    assert len({len(q) for q in questions}) == 1
    make = lambda q: Job(ids + q, "chelsea", 0.8, 10, document=name, ignore_eos=True)  # noqa: E731
    alone = [_tokens(engine.submit(make(q))) for q in questions]
    groups, start, gate, entered = [], engine._start_on_document, threading.Event(), threading.Event()

    def held(doc, jobs):
        entered.set()
        gate.wait(30)
        groups.append(len(jobs))
        return start(doc, jobs)

    engine._start_on_document = held
    try:
        first = engine.submit(make(questions[0]))
        assert entered.wait(60)  # the first is held in the worker; the others queue behind it
        rest = [engine.submit(make(q)) for q in questions[1:]]
    finally:
        gate.set()
    together = [_tokens(job) for job in (first, *rest)]
    engine._start_on_document = start
    assert together == alone
    assert groups == [1, 2]  # the two that waited together were read in one forward pass


def test_a_document_is_read_with_the_method_it_was_compressed_with(server):
    base, engine = server
    name = engine.register_ids(engine.document_ids("A short document."), "chelsea", 0.5)
    body = {"model": NAME, "messages": [{"role": "user", "content": "hi"}], "chelsea": {"document": name, "method": "kvzip"}}
    response = httpx.post(f"{base}/v1/chat/completions", json=body)
    assert response.status_code == 400 and "compressed with chelsea" in response.json()["error"]["message"]


def test_close_finishes_the_queued_requests_then_refuses_new_ones(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    engine = Engine(model, AutoTokenizer.from_pretrained(tiny_model_dir), method="chelsea", ratio=0.5, max_queue=4)
    ids = engine.completion_ids(DOC, None)
    jobs = [engine.submit(Job(ids, "chelsea", 0.5, 5, ignore_eos=True)) for _ in range(3)]
    engine.close()
    assert not any(thread.is_alive() for thread in engine._threads)
    assert [len(_tokens(job)) for job in jobs] == [5, 5, 5]
    with pytest.raises(ServeError) as refused:
        engine.submit(Job(ids, "chelsea", 0.5, 5))
    assert refused.value.status == 503


def test_a_registered_document_is_prefilled_once(server, client):
    base, engine = server
    doc = httpx.post(f"{base}/v1/documents", json={"text": DOC}).json()
    assert doc["tokens"] > 200 and doc["kv_bytes"] > 0
    prefills = _metric(base, "prefills_total")
    answers = []
    for question in ("Which number follows line 3?", "What jumps?"):
        reply = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": question}], max_tokens=8,
                                               temperature=0, extra_body={"chelsea": {"document": doc["id"]}})
        answers.append(reply.choices[0].message.content)
    assert _metric(base, "prefills_total") == prefills  # neither question prefilled the document again
    assert _metric(base, "document_hits_total") >= 2
    # a prompt that starts with the document's exact tokens finds it too
    ids = engine.documents[doc["id"]].ids
    prompt = engine.tokenizer.decode(ids, skip_special_tokens=False) + " And then?"
    if engine.completion_ids(prompt, None)[: len(ids)] == ids:
        client.completions.create(model=NAME, prompt=prompt, max_tokens=4)
        assert _metric(base, "prefills_total") == prefills


HI = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize("body,status,param", [
    ({"model": NAME, "messages": HI, "max_tokens": 4, "chelsea": {"ratio": 1.5}}, 400, "chelsea.ratio"),
    ({"model": NAME, "messages": HI, "chelsea": {"method": "magic"}}, 400, "chelsea.method"),
    ({"model": NAME, "messages": HI, "chelsea": {"document": "doc-999"}}, 404, "chelsea.document"),
    ({"model": NAME, "messages": HI, "chelsea": {"document": ["doc-1"]}}, 400, "chelsea.document"),
    ({"model": "other", "messages": HI}, 404, "model"),
    ({"model": NAME, "messages": HI, "surprise": 1}, 400, "surprise"),
    ({"model": NAME, "messages": []}, 400, "messages"),
    ({"model": NAME, "messages": HI, "max_tokens": 10_000}, 400, "max_tokens"),
    ({"model": NAME, "messages": [{"role": "user", "content": "word " * 600}]}, 400, "messages"),
    ({"model": NAME, "messages": [{"role": "user", "content": "x\ud800y"}]}, 400, "messages.0.content"),
    ({"model": NAME, "messages": HI, "logprobs": True}, 400, "logprobs"),
    ({"model": NAME, "messages": HI, "tools": [{"type": "function", "function": {"name": "f"}}]}, 400, "tools"),
    ({"model": NAME, "messages": HI, "response_format": {"type": "json_object"}}, 400, "response_format"),
    ({"model": NAME, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, 400,
     "messages.0.content"),
    ({"model": NAME, "messages": HI, "n": 99}, 400, "n"),
    ({"model": NAME, "messages": HI, "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ({"model": NAME, "messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages.0.role"),
])
def test_bad_input_gets_an_openai_error_and_the_server_lives_on(server, body, status, param):
    base, _ = server
    response = httpx.post(f"{base}/v1/chat/completions", content=json.dumps(body), headers={"content-type": "application/json"})
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["message"] and error["param"] == param and error["type"] == "invalid_request_error"
    assert httpx.get(f"{base}/health").status_code == 200


@pytest.mark.parametrize("method,path,kwargs,status", [
    ("post", "/v1/completions", {"content": b"{not json", "headers": {"content-type": "application/json"}}, 400),
    ("post", "/v1/completions", {"content": b"\xff\xfe", "headers": {"content-type": "application/json"}}, 400),
    ("post", "/v1/completions", {"content": b"prompt=hi", "headers": {"content-type": "application/x-www-form-urlencoded"}}, 415),
    ("post", "/v1/nowhere", {"json": {}}, 404),
    ("get", "/v1/chat/completions", {}, 405),
    ("post", "/v1/documents", {"content": json.dumps({"text": "x\udfffy"})}, 400),
    ("post", "/v1/completions", {"json": {"model": NAME, "prompt": ["a", "b"]}}, 400),
    ("post", "/v1/completions", {"json": {"model": NAME, "prompt": "hi", "echo": True}}, 400),
    ("post", "/v1/completions", {"json": {"model": NAME, "prompt": [99999999]}}, 400),
])
def test_every_refusal_has_the_openai_shape(server, method, path, kwargs, status):
    response = getattr(httpx, method)(f"{server[0]}{path}", **kwargs)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert "--" not in error["message"]  # speaks of the request, not of command-line flags


def test_a_body_over_the_limit_is_refused_before_it_is_read(server):
    base, _ = server
    start = time.perf_counter()
    response = httpx.post(f"{base}/v1/chat/completions", content=b"x" * (9 << 20), headers={"content-type": "application/json"})
    assert response.status_code == 413 and "larger" in response.json()["error"]["message"]
    assert time.perf_counter() - start < 5


def test_the_openai_parameters_clients_send(client):
    """stop, n with a seed, max_completion_tokens, list content, developer and tool roles, penalties,
    user and metadata: all accepted; sampling repeats under a seed; stop ends the text before it."""
    messages = [{"role": "developer", "content": "Answer briefly."},
                {"role": "user", "content": [{"type": "text", "text": DOC[:300]}, {"type": "text", "text": " Continue."}]},
                {"role": "assistant", "content": "Line"},
                {"role": "tool", "content": "42", "tool_call_id": "call-1"}]
    kw = dict(model=NAME, messages=messages, max_completion_tokens=10, temperature=1.0, top_p=0.9, seed=7, n=3,
              presence_penalty=0.5, frequency_penalty=0.2, user="someone", metadata={"a": "b"}, logprobs=False)
    first, again = client.chat.completions.create(**kw), client.chat.completions.create(**kw)
    texts = [c.message.content for c in first.choices]
    assert [c.index for c in first.choices] == [0, 1, 2] and texts == [c.message.content for c in again.choices]
    assert len(set(texts)) > 1  # each choice draws with its own seed
    assert first.usage.completion_tokens <= 30
    greedy = client.chat.completions.create(model=NAME, messages=messages, max_tokens=10, temperature=0)
    text = greedy.choices[0].message.content
    if len(text.strip()) > 2:
        stop = text.strip()[1:3]
        cut = client.chat.completions.create(model=NAME, messages=messages, max_tokens=10, temperature=0, stop=[stop, "zzz"])
        assert cut.choices[0].message.content == text[: text.index(stop)] and cut.choices[0].finish_reason == "stop"
        streamed = client.chat.completions.create(model=NAME, messages=messages, max_tokens=10, temperature=0, stop=stop,
                                                  stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == text[: text.index(stop)]
    empty = client.completions.create(model=NAME, prompt="", max_tokens=3, temperature=0)
    assert empty.choices[0].finish_reason in ("stop", "length")


def test_capacity_is_what_it_says_and_beyond_it_429_with_retry_after(tiny_model_dir):
    """max_batch running + max_queue waiting: a burst of that many clients gets no 429; twice as
    many get some, each with Retry-After, and the others are answered."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    engine = Engine(model, AutoTokenizer.from_pretrained(tiny_model_dir), method="chelsea-paper", ratio=0.5, max_batch=3, max_queue=3)
    base, srv, thread = _serve(engine)
    try:
        clients = [openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0) for _ in range(12)]

        def ask(c):
            try:
                c.completions.create(model=NAME, prompt=DOC, max_tokens=24, temperature=0)
                return 200, None
            except openai.RateLimitError as err:
                return 429, err.response.headers.get("retry-after")

        forward = engine.model.forward

        def slow(*args, **kwargs):  # every request takes a while, so the burst overlaps
            time.sleep(0.02)
            return forward(*args, **kwargs)

        engine.model.forward = slow
        for burst, refused in ((6, False), (12, True)):
            with ThreadPoolExecutor(burst) as pool:
                results = list(pool.map(ask, clients[:burst]))
            statuses = [s for s, _ in results]
            if refused:
                assert 429 in statuses and 200 in statuses
                assert all(after is not None and int(after) >= 1 for s, after in results if s == 429)
            else:
                assert statuses == [200] * burst
    finally:
        engine.model.forward = forward
        srv.should_exit = True
        thread.join(timeout=10)
        engine.close()


def test_a_client_that_leaves_mid_stream_stops_its_generation(server):
    base, engine = server
    forward = engine.model.forward

    def slow(*args, **kwargs):
        time.sleep(0.05)
        return forward(*args, **kwargs)

    engine.model.forward = slow
    try:
        before = _metric(base, "generated_tokens_total")
        body = {"model": NAME, "prompt": DOC, "max_tokens": 60, "stream": True,
                "chelsea": {"method": "full"}}  # full: no token ends the reply early by compression
        with httpx.stream("POST", f"{base}/v1/completions", json=body) as response:
            next(response.iter_lines())  # the first event, then hang up
        for _ in range(200):  # until the worker is done with it (60 tokens would take 3 s)
            time.sleep(0.05)
            if _metric(base, "active_requests") == 0 and engine.scheduler.depth == 0:
                break
        produced = _metric(base, "generated_tokens_total") - before
        assert produced < 40
        assert httpx.get(f"{base}/health").status_code == 200
    finally:
        engine.model.forward = forward


def test_the_servers_method_settings_shape_every_cache_it_makes(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    with pytest.raises(ChelseaError, match="chunk_sizes is not a setting"):
        Engine(model, tokenizer, settings={"chunk_sizes": 3})
    engine = Engine(model, tokenizer, method="chelsea", ratio=0.5, settings={"chelsea.exact_share": 0.9, "chunk_size": 8})
    try:
        assert engine._new_cache("chelsea", 0.5).method.exact_share == 0.9
        assert engine._new_cache("chelsea-paper", 0.5).method.chunk_size == 8
        assert engine._new_cache("kvzip", 0.5).method.name == "kvzip"
    finally:
        engine.close()


def test_cuda_graph_steps_need_a_gpu(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    if model.device.type != "cuda":
        with pytest.raises(ChelseaError, match="cuda_graph needs the model on a CUDA device"):
            Engine(model, AutoTokenizer.from_pretrained(tiny_model_dir), cuda_graph=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_steps_replayed_from_cuda_graphs_answer_as_eager_steps(tiny_model_dir):
    """Requests of several methods, joining and leaving the running batches at different steps:
    with every batch's step replayed from a CUDA graph (recorded again as rows come and go) each
    answer equals the eager engine's."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    answers = []
    for graph in (False, True):
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval().to("cuda")
        engine = Engine(model, tokenizer, method="chelsea", ratio=0.5, max_queue=8, max_tokens_limit=80, cuda_graph=graph)
        try:
            jobs = [Job(engine.completion_ids(f"{DOC[: 200 + 60 * i]}\n\nQuestion {i}:", None), method, 0.5, 20 + 15 * i,
                        ignore_eos=True) for i in range(3) for method in ("chelsea", "chelsea-paper", "full")]
            for job in jobs:
                engine.submit(job)
            answers.append([_tokens(job) for job in jobs])
        finally:
            engine.close()
    assert answers[0] == answers[1]
    assert all(len(t) == 20 + 15 * (i // 3) for i, t in enumerate(answers[1]))


def test_a_step_that_cannot_be_replayed_runs_eagerly_from_then_on(tiny_model_dir, monkeypatch, caplog):
    """If a batch's step cannot be pinned or recorded on a machine, the engine warns once and
    decodes eagerly: the answers are those of an engine without CUDA graphs."""
    from chelsea.runtime import RowStep

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    answers = []
    for broken in (False, True):
        engine = Engine(model, tokenizer, method="chelsea", ratio=0.5, max_queue=4)
        if broken:
            def fail(self, tokens):
                self.layers[0].awaiting_attention = True  # as a recording stopped inside the forward leaves it
                raise RuntimeError("operation not permitted when stream is capturing")

            monkeypatch.setattr(RowStep, "forward", fail)
            engine.cuda_graph = True  # the CPU engine refuses the option itself
        try:
            jobs = [Job(engine.completion_ids(f"{DOC[:300]}\n\nQuestion {i}:", None), "chelsea", 0.5, 40, ignore_eos=True)
                    for i in range(2)]
            with caplog.at_level("WARNING", logger="chelsea.serving.decoder"):
                for job in jobs:
                    engine.submit(job)
                answers.append([_tokens(job) for job in jobs])
            assert engine.cuda_graph is False
        finally:
            engine.close()
    assert answers[0] == answers[1] and all(len(t) == 40 for t in answers[1])
    assert sum("cannot be replayed from a CUDA graph" in r.getMessage() for r in caplog.records) == 1
