"""Drive ``chelsea serve`` as real clients do: every OpenAI parameter through the official ``openai``
client (non-streamed and streamed), then the stalls and the capacity.

    python benchmarks/serve_client.py --model smollm2-135m --out results/serve_cpu      # starts its own server
    python benchmarks/serve_client.py --base-url http://127.0.0.1:8000                  # a server already running

Parts (``--parts``, default all):

- ``surface``: one request per parameter or parameter set, chat and completions, plain and
  streamed; a table of what each returned (status, finish reason, tokens, or the error's param).
- ``stalls``: a body of ``--big-mib`` MiB (413 expected) while ``/health`` is polled every 10 ms;
  then four streams running while a document of ``--doc-tokens`` tokens is registered: the gaps
  between their tokens (p50 / p99 / max) and ``/health``'s latency meanwhile.
- ``capacity``: bursts of ``max_batch + max_queue`` clients (no 429 expected) and of twice that
  (429 with Retry-After expected), ``--capacity-tokens`` tokens each.

Writes ``surface.md``, ``stalls.json`` and ``capacity.json`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai

TEXT = ("The harbour office logs every ship that docks. The Meridian arrived on a Tuesday with a cargo of tea. "
        "Captain Ilse Marwick signed the manifest with a green pen. ") * 3


def _pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return round(values[min(len(values) - 1, int(q * (len(values) - 1) + 0.5))], 4) if values else float("nan")


def surface(client: openai.OpenAI, model: str) -> list[dict]:
    chat = [{"role": "user", "content": TEXT + "Who signed the manifest?"}]
    cases = [
        ("chat: defaults (temperature 1)", "chat", {}),
        ("chat: temperature 0", "chat", {"temperature": 0}),
        ("chat: temperature, top_p, seed", "chat", {"temperature": 0.8, "top_p": 0.9, "seed": 3}),
        ("chat: stop (string)", "chat", {"temperature": 0, "stop": "."}),
        ("chat: stop (list)", "chat", {"temperature": 0, "stop": [".", ","]}),
        ("chat: n=2 with a seed", "chat", {"n": 2, "seed": 5}),
        ("chat: max_completion_tokens", "chat", {"max_completion_tokens": 5}),
        ("chat: presence and frequency penalties", "chat", {"temperature": 0, "presence_penalty": 1.0, "frequency_penalty": 0.5}),
        ("chat: user, metadata, store, service_tier", "chat", {"user": "u1", "metadata": {"k": "v"}, "store": False,
                                                              "service_tier": "auto"}),
        ("chat: logprobs false", "chat", {"logprobs": False}),
        ("chat: logprobs true", "chat", {"logprobs": True}),
        ("chat: tools", "chat", {"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}),
        ("chat: response_format json_object", "chat", {"response_format": {"type": "json_object"}}),
        ("chat: list-form content", "chat", {"messages": [{"role": "user", "content": [{"type": "text", "text": TEXT},
                                                                                       {"type": "text", "text": "Who signed?"}]}]}),
        ("chat: developer role", "chat", {"messages": [{"role": "developer", "content": "Answer in one word."}, *chat]}),
        ("chat: tool role", "chat", {"messages": [*chat, {"role": "assistant", "content": "Let me check."},
                                                  {"role": "tool", "content": "Ilse Marwick", "tool_call_id": "c1"}]}),
        ("chat: chelsea method full", "chat", {"extra_body": {"chelsea": {"method": "full"}}}),
        ("completions: defaults", "completions", {}),
        ("completions: stop, seed, n=2", "completions", {"stop": ["\n"], "seed": 1, "n": 2}),
        ("completions: token ids", "completions", {"prompt": [1, 2, 3, 4]}),
        ("completions: empty prompt", "completions", {"prompt": ""}),
        ("completions: echo", "completions", {"echo": True}),
        ("completions: logprobs 2", "completions", {"logprobs": 2}),
    ]
    rows = []
    for name, kind, kwargs in cases:
        for stream in (False, True):
            args = {"model": model, "max_tokens": 12, **kwargs}
            if kind == "chat":
                args.setdefault("messages", chat)
                call = client.chat.completions.create
            else:
                args.setdefault("prompt", TEXT + "The manifest was signed by")
                call = client.completions.create
            if stream:
                args.update(stream=True, stream_options={"include_usage": True})
            rows.append({"case": name, "stream": stream, **_run(call, args, kind, stream)})
    return rows


def _run(call, args: dict, kind: str, stream: bool) -> dict:
    try:
        result = call(**args)
        if not stream:
            texts = [c.message.content if kind == "chat" else c.text for c in result.choices]
            return {"status": 200, "finish": ",".join(c.finish_reason for c in result.choices),
                    "tokens": result.usage.completion_tokens, "text": " | ".join(t[:40] for t in texts)}
        texts, finish, usage, role = {}, {}, None, False
        for chunk in result:
            usage = chunk.usage or usage
            for c in chunk.choices:
                piece = (c.delta.content if kind == "chat" else c.text) or ""
                role |= kind == "chat" and c.delta.role == "assistant"
                texts[c.index] = texts.get(c.index, "") + piece
                finish[c.index] = c.finish_reason or finish.get(c.index)
        return {"status": 200, "finish": ",".join(str(finish[i]) for i in sorted(finish)),
                "tokens": usage.completion_tokens if usage else None, "role_delta": role,
                "text": " | ".join(texts[i][:40] for i in sorted(texts))}
    except openai.APIStatusError as err:
        error = err.response.json().get("error", {})
        return {"status": err.status_code, "param": error.get("param"), "text": error.get("message", "")[:90]}


def stalls(base: str, model: str, big_mib: float, doc_tokens: int) -> dict:
    out = {}
    polls, stop = [], threading.Event()

    def poll():
        with httpx.Client() as c:
            while not stop.is_set():
                t = time.perf_counter()
                c.get(f"{base}/health", timeout=30)
                polls.append(time.perf_counter() - t)
                time.sleep(0.01)

    poller = threading.Thread(target=poll)
    poller.start()
    body = b'{"model": "' + model.encode() + b'", "messages": [{"role": "user", "content": "' + b"a" * int(big_mib * (1 << 20)) + b'"}]}'
    t = time.perf_counter()
    response = httpx.post(f"{base}/v1/chat/completions", content=body, headers={"content-type": "application/json"}, timeout=120)
    out["big_body"] = {"mib": big_mib, "status": response.status_code, "seconds": round(time.perf_counter() - t, 3)}
    time.sleep(0.3)
    out["big_body"]["health_during_s"] = {"p50": _pct(polls, 0.5), "p99": _pct(polls, 0.99), "max": round(max(polls), 4),
                                          "polls": len(polls)}
    polls.clear()
    stamps: list[list[float]] = [[] for _ in range(4)]

    def stream(i):
        c = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0)
        for chunk in c.completions.create(model=model, prompt=TEXT + f"Story {i}:", max_tokens=400, temperature=1.0, seed=i,
                                          stream=True):
            if chunk.choices and chunk.choices[0].text:
                stamps[i].append(time.perf_counter())

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(4)]
    for th in threads:
        th.start()
    time.sleep(3)
    words = ("The quarterly report of the harbour board covers tonnage, berths and dredging. " * (doc_tokens // 12 + 1))
    t0 = time.perf_counter()
    doc = httpx.post(f"{base}/v1/documents", json={"text": words}, timeout=600).json()
    t1 = time.perf_counter()
    for th in threads:
        th.join()
    stop.set()
    poller.join()
    gaps = [b - a for s in stamps for a, b in zip(s, s[1:]) if t0 <= b and a <= t1]
    every = [b - a for s in stamps for a, b in zip(s, s[1:])]
    out["registration"] = {"document_tokens": doc.get("tokens"), "seconds": round(t1 - t0, 3),
                           "token_gaps_during_s": {"p50": _pct(gaps, 0.5), "p99": _pct(gaps, 0.99),
                                                   "max": round(max(gaps), 4) if gaps else None, "gaps": len(gaps)},
                           "token_gaps_all_s": {"p50": _pct(every, 0.5), "max": round(max(every), 4) if every else None},
                           "streamed_tokens": [len(s) for s in stamps],
                           "health_during_s": {"p50": _pct(polls, 0.5), "p99": _pct(polls, 0.99),
                                               "max": round(max(polls), 4) if polls else None}}
    return out


def capacity(base: str, model: str, places: int, tokens: int) -> dict:
    def ask(_):
        c = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=600)
        try:
            c.completions.create(model=model, prompt=TEXT, max_tokens=tokens, temperature=0)
            return 200, None
        except openai.RateLimitError as err:
            return 429, err.response.headers.get("retry-after")

    out = {}
    for burst in (places, 2 * places):
        with ThreadPoolExecutor(burst) as pool:
            results = list(pool.map(ask, range(burst)))
        out[str(burst)] = {"clients": burst, "answered": sum(s == 200 for s, _ in results),
                           "refused_429": sum(s == 429 for s, _ in results),
                           "retry_after": sorted({a for s, a in results if s == 429})}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-url", help="a running server (default: start one with --model)")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--max-queue", type=int, default=16)
    parser.add_argument("--parts", default="surface,stalls,capacity")
    parser.add_argument("--big-mib", type=float, default=20.0)
    parser.add_argument("--doc-tokens", type=int, default=1700)
    parser.add_argument("--capacity-tokens", type=int, default=16)
    parser.add_argument("--out", type=Path, default=Path("serve_client"))
    args = parser.parse_args()
    server = None
    base = args.base_url
    if base is None:
        base = f"http://127.0.0.1:{args.port}"
        server = subprocess.Popen([sys.executable, "-m", "chelsea.cli", "serve", "--model", args.model, "--port", str(args.port),
                                   "--max-batch", str(args.max_batch), "--max-queue", str(args.max_queue), "--device", "cpu"])
        for _ in range(1200):
            try:
                if httpx.get(f"{base}/health").status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
    model = httpx.get(f"{base}/v1/models").json()["data"][0]["id"]
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = {"date": time.strftime("%Y-%m-%d"), "base": base, "model": model, "openai": openai.__version__}
    try:
        parts = args.parts.split(",")
        if "surface" in parts:
            rows = surface(openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0), model)
            lines = [f"# The OpenAI surface of chelsea serve ({stamp['date']}, openai {openai.__version__}, model {model})", "",
                     "| case | stream | status | finish / param | tokens | text or message |", "|---|---|---|---|---|---|"]
            for r in rows:
                lines.append(f"| {r['case']} | {'yes' if r['stream'] else 'no'} | {r['status']} | {r.get('finish', r.get('param'))} "
                             f"| {r.get('tokens', '')} | {r['text'].replace('|', '/').replace(chr(10), ' ')} |")
            (args.out / "surface.md").write_text("\n".join(lines) + "\n")
            print("\n".join(lines))
        if "stalls" in parts:
            result = {**stamp, **stalls(base, model, args.big_mib, args.doc_tokens)}
            (args.out / "stalls.json").write_text(json.dumps(result, indent=1))
            print(json.dumps(result, indent=1))
        if "capacity" in parts:
            result = {**stamp, "max_batch": args.max_batch, "max_queue": args.max_queue,
                      **capacity(base, model, args.max_batch + args.max_queue, args.capacity_tokens)}
            (args.out / "capacity.json").write_text(json.dumps(result, indent=1))
            print(json.dumps(result, indent=1))
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=60)


if __name__ == "__main__":
    main()
