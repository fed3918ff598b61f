"""`chelsea serve` through the official openai client: a real server on a free local port, a tiny model."""

import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import uvicorn
from transformers import AutoModelForCausalLM, AutoTokenizer

from chelsea.serving import Engine, Job, ServeError
from chelsea.serving.app import create_app

NAME = "tiny"


def _metric(base: str, name: str) -> float:
    text = httpx.get(f"{base}/metrics").text
    return float(next(line.split()[1] for line in text.splitlines() if line.startswith(f"chelsea_{name} ")))


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    engine = Engine(model, tokenizer, method="chelsea", ratio=0.8, max_queue=4, max_tokens_limit=64)
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
    whole = client.chat.completions.create(model=NAME, messages=messages, max_tokens=12)
    assert whole.choices[0].finish_reason in ("stop", "length") and whole.usage.completion_tokens <= 12
    parts = client.chat.completions.create(model=NAME, messages=messages, max_tokens=12, stream=True)
    text = "".join(chunk.choices[0].delta.content or "" for chunk in parts if chunk.choices)
    assert text == whole.choices[0].message.content


def test_completions_and_per_request_method(client):
    a = client.completions.create(model=NAME, prompt=DOC, max_tokens=8, extra_body={"chelsea": {"method": "full"}})
    b = client.completions.create(model=NAME, prompt=DOC, max_tokens=8, extra_body={"chelsea": {"method": "chelsea", "ratio": 0.5}})
    assert a.choices[0].text is not None and b.choices[0].text is not None
    assert a.usage.prompt_tokens == b.usage.prompt_tokens > 200


def test_concurrent_requests_answer_as_one_at_a_time(client):
    prompts = [f"{DOC}\n\nQuestion {i}: what is line {i}?" for i in range(3)]
    one = [client.completions.create(model=NAME, prompt=p, max_tokens=10).choices[0].text for p in prompts]
    with ThreadPoolExecutor(3) as pool:
        together = list(pool.map(lambda p: client.completions.create(model=NAME, prompt=p, max_tokens=10).choices[0].text, prompts))
    assert together == one


def test_concurrent_requests_are_decoded_in_one_batch(server):
    """Four requests of 12 tokens, held until all are queued: far fewer decoding steps than tokens,
    and each answer equals the one it gets alone (every method, full included)."""
    base, engine = server
    jobs = [Job(engine.completion_ids(f"{DOC}\n\nQuestion {i}:", None), method, 0.5, 12, ignore_eos=True)
            for i in range(2) for method in ("chelsea", "full")]

    alone = [_tokens(engine.submit(Job(j.ids, j.method, j.ratio, j.max_tokens, ignore_eos=True))) for j in jobs]
    gate, entered, start = threading.Event(), threading.Event(), engine._start
    engine._start = lambda job: (entered.set(), gate.wait(30), start(job))
    try:
        engine.submit(jobs[0])
        assert entered.wait(60)  # the first job is held in the worker; the rest queue behind it
        for job in jobs[1:]:
            engine.submit(job)
        steps = _metric(base, "decode_steps_total")
    finally:
        gate.set()
        engine._start = start
    together = [_tokens(job) for job in jobs]
    assert together == alone and all(len(t) == 12 for t in together)
    # two batches (chelsea, full) of 2 rows: 2 x 11 steps (one more while the others are admitted);
    # one at a time would take 4 x 11
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
    assert not engine._worker.is_alive()
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
                                               extra_body={"chelsea": {"document": doc["id"]}})
        answers.append(reply.choices[0].message.content)
    assert _metric(base, "prefills_total") == prefills  # neither question prefilled the document again
    assert _metric(base, "document_hits_total") >= 2
    # a prompt that starts with the document's exact tokens finds it too
    ids = engine.documents[doc["id"]].ids
    prompt = engine.tokenizer.decode(ids, skip_special_tokens=False) + " And then?"
    if engine.completion_ids(prompt, None)[: len(ids)] == ids:
        client.completions.create(model=NAME, prompt=prompt, max_tokens=4)
        assert _metric(base, "prefills_total") == prefills


@pytest.mark.parametrize("body,status,param", [
    ({"model": NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "chelsea": {"ratio": 1.5}}, 400, "chelsea.ratio"),
    ({"model": NAME, "messages": [{"role": "user", "content": "hi"}], "chelsea": {"method": "magic"}}, 400, "chelsea.method"),
    ({"model": NAME, "messages": [{"role": "user", "content": "hi"}], "chelsea": {"document": "doc-999"}}, 404, "chelsea.document"),
    ({"model": "other", "messages": [{"role": "user", "content": "hi"}]}, 404, "model"),
    ({"model": NAME, "messages": [{"role": "user", "content": "hi"}], "surprise": 1}, 400, "surprise"),
    ({"model": NAME, "messages": []}, 400, "messages"),
    ({"model": NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 10_000}, 400, "max_tokens"),
    ({"model": NAME, "messages": [{"role": "user", "content": "word " * 600}]}, 400, "messages"),
])
def test_bad_input_gets_an_openai_error_and_the_server_lives_on(server, body, status, param):
    base, _ = server
    response = httpx.post(f"{base}/v1/chat/completions", json=body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["message"] and error["param"] == param
    assert httpx.get(f"{base}/health").status_code == 200


def test_malformed_json_is_a_400(server):
    response = httpx.post(f"{server[0]}/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert response.status_code == 400 and "error" in response.json()


def test_overload_is_answered_429_and_the_queue_drains(server):
    base, engine = server
    gate, entered, start = threading.Event(), threading.Event(), engine._start
    engine._start = lambda job: (entered.set(), gate.wait(30), start(job))  # the worker is busy until the gate opens
    body = {"model": NAME, "prompt": "hi", "max_tokens": 2}
    pool = ThreadPoolExecutor(engine.scheduler.jobs.maxsize + 1)
    try:
        waiting = [pool.submit(httpx.post, f"{base}/v1/completions", json=body, timeout=60)]
        assert entered.wait(60)  # one request in the worker; now fill the queue behind it
        waiting += [pool.submit(httpx.post, f"{base}/v1/completions", json=body, timeout=60) for _ in range(engine.scheduler.jobs.maxsize)]
        for _ in range(400):
            if engine.scheduler.jobs.qsize() == engine.scheduler.jobs.maxsize:
                break
            time.sleep(0.025)
        response = httpx.post(f"{base}/v1/completions", json=body)
        assert response.status_code == 429 and response.json()["error"]["type"] == "rate_limit_error"
    finally:
        gate.set()
        engine._start = start
    assert all(f.result().status_code == 200 for f in waiting)
    pool.shutdown()


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
            if _metric(base, "active_requests") == 0 and engine.scheduler.jobs.qsize() == 0:
                break
        produced = _metric(base, "generated_tokens_total") - before
        assert produced < 40
        assert httpx.get(f"{base}/health").status_code == 200
    finally:
        engine.model.forward = forward
