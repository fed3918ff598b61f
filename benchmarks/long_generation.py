"""Long generation: after the model has written ``--generate`` tokens of its own, is a fact stated
in the prompt still answered right as often as with the full cache?

Each sample plants four facts (a colour's vault code) in a stretch of the evaluation essays, asks
for a long numbered list on another subject, lets the model write ``--generate`` tokens (its end
token suppressed), then asks in a new user turn for one of the codes. With ``chelsea`` the prompt
is compressed first and the cache keeps compressing while the model writes, so the answer depends
on how the decoded tokens were ranked against the prompt's (with ``importance=learned`` every
decoded token is scored as it is written).

    python benchmarks/long_generation.py --model qwen2.5-coder-0.5b --samples 10 --generate 2000 \
        --methods full,chelsea --set importance=learned --out long_generation.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import random
import time

import torch

from chelsea.cli.options import parse_settings
from chelsea.compat import cache_arg
from chelsea.haystack import evaluation_files, find_haystack
from chelsea.methods import configure
from chelsea.models import load_with_tokenizer
from chelsea.runtime import make_cache, use_method
from chelsea.scoring import compress_context
from chelsea.settings import CompressionConfig

COLOURS = ["amber", "cobalt", "scarlet", "olive", "violet", "silver", "ochre", "teal"]


def sample(tokenizer, index: int, context_tokens: int) -> tuple[str, str, str]:
    """(prompt text, question, answer) of sample ``index``: four codes in ``context_tokens`` of essay."""
    rng = random.Random(index)
    files = evaluation_files(find_haystack(None))
    text = files[index % len(files)].read_text()
    ids = tokenizer(text, add_special_tokens=False).input_ids
    start = rng.randrange(max(1, len(ids) - context_tokens))
    words = tokenizer.decode(ids[start : start + context_tokens]).split(" ")
    colours = rng.sample(COLOURS, 4)
    codes = [str(rng.randrange(100000, 999999)) for _ in colours]
    for k, (colour, code) in enumerate(zip(colours, codes)):
        at = (k + 1) * len(words) // 5
        words.insert(at, f"(The code of the {colour} vault is {code}.)")
    asked = rng.randrange(4)
    prompt = (" ".join(words) + "\n\nRemember the vault codes above. Now write a long numbered list of at least 150 short, "
              "different sentences about kitchen tools, one per line.")
    return prompt, f"What is the code of the {colours[asked]} vault? Answer with the number only.", codes[asked]


def first_turn(tokenizer, text: str) -> list[int]:
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False)
    return tokenizer(rendered, add_special_tokens=False).input_ids


def next_turn(tokenizer, text: str) -> list[int]:
    """What follows an assistant reply cut short: the template's end of that reply, then ``text`` as
    a new user turn, ready for the next reply."""
    said = [{"role": "user", "content": "u"}, {"role": "assistant", "content": "REPLY"}]
    before = tokenizer.apply_chat_template(said, tokenize=False)
    after = tokenizer.apply_chat_template([*said, {"role": "user", "content": text}], add_generation_prompt=True, tokenize=False)
    closing = before[before.rindex("REPLY") + len("REPLY"):]
    return tokenizer(closing + after[len(before):], add_special_tokens=False).input_ids


@torch.inference_mode()
def run_one(model, tokenizer, method: str, settings: dict, ratio: float, prompt: str, question: str, generate: int) -> dict:
    device = model.device
    use_method(model, method)
    cache = make_cache("full" if method == "full" else configure(method, settings), CompressionConfig(ratio=ratio))
    ids = torch.tensor([first_turn(tokenizer, prompt)], device=device)
    start = time.perf_counter()
    if method != "full" and cache.method.scores == "importance":
        compress_context(model, cache, ids[:, :-1], tokenizer, question=True)
        ids = ids[:, -1:]
    eos = tokenizer.eos_token_id
    token, written = None, []
    for step in range(generate):
        logits = model(ids if step == 0 else token, use_cache=True, **cache_arg(model, cache)).logits[:, -1]
        if eos is not None:
            logits[:, eos] = float("-inf")
        token = logits.argmax(-1, keepdim=True)
        written.append(int(token))
    follow = torch.tensor([next_turn(tokenizer, question)], device=device)
    out = model(torch.cat([token, follow], 1), use_cache=True, **cache_arg(model, cache)).logits[:, -1]
    answer = [int(out.argmax(-1))]
    for _ in range(11):
        logits = model(torch.tensor([[answer[-1]]], device=device), use_cache=True, **cache_arg(model, cache)).logits[:, -1]
        answer.append(int(logits.argmax(-1)))
    seconds = time.perf_counter() - start
    stats = cache.stats() if hasattr(cache, "stats") else {}
    return {"reply": tokenizer.decode(answer, skip_special_tokens=True).strip(), "written": tokenizer.decode(written[:200]),
            "seconds": round(seconds, 2), "kv_entries": stats.get("kv_entries"), "tokens_seen": stats.get("tokens_seen")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--tokenizer", help="tokenizer folder (for a preset)")
    parser.add_argument("--methods", default="full,chelsea")
    parser.add_argument("--ratio", type=float, default=0.8)
    parser.add_argument("--samples", type=int, default=10)
    parser.add_argument("--context", type=int, default=1500, help="essay tokens around the facts")
    parser.add_argument("--generate", type=int, default=2000, help="tokens the model writes before the question")
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE", help="method settings (as chelsea --set)")
    parser.add_argument("--out")
    args = parser.parse_args()
    model, tokenizer = load_with_tokenizer(args.model, args.tokenizer)
    settings = parse_settings(args.set)
    rows = []
    for index in range(args.samples):
        prompt, question, answer = sample(tokenizer, index, args.context)
        for method in args.methods.split(","):
            row = run_one(model, tokenizer, method, settings, 0.0 if method == "full" else args.ratio, prompt, question, args.generate)
            row.update(index=index, method=method, answer=answer, correct=answer in row["reply"])
            rows.append(row)
            print(json.dumps({k: row[k] for k in ("index", "method", "answer", "reply", "correct", "seconds", "kv_entries", "tokens_seen")}),
                  flush=True)
    summary = {m: sum(r["correct"] for r in rows if r["method"] == m) / args.samples for m in args.methods.split(",")}
    print("right answers after", args.generate, "written tokens:", summary)
    if args.out:
        meta = {"date": datetime.date.today().isoformat(), "model": args.model, "settings": settings,
                "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu", "summary": summary,
                "command": "python benchmarks/long_generation.py " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()
                                                                             if v not in (None, []) and k != "out")}
        with open(args.out, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
