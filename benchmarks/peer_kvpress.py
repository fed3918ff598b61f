"""Side by side with NVIDIA's kvpress: its presses on the prompts and budgets of `chelsea eval`.

kvpress 0.5.5 pins transformers < 5.3 and chelsea needs >= 5.17, so this runs in two processes
and two virtualenvs, with one file between them:

1. ``prompts`` (chelsea's environment) writes the eval's generated samples as token ids:

       python benchmarks/peer_kvpress.py prompts --out peer/prompts.jsonl --tasks needle,multikey \\
           --lengths 2048 --placements after,agnostic --samples 10

2. ``run`` (kvpress's environment: ``pip install torch -r benchmarks/requirements-kvpress.txt``)
   compresses each prompt's context with a press, asks the rest of the prompt greedily as kvpress's
   own pipeline does (context through ``model.model`` inside the press, then the question and the
   answer token by token), and appends rows in chelsea's ``results.jsonl`` format (method
   ``kvpress-<press>``), so ``chelsea report DIR`` tables them next to ours:

       python benchmarks/peer_kvpress.py run --prompts peer/prompts.jsonl --gguf <qwen .gguf> \\
           --presses kvzip,snapkv --ratio 0.8 --out peer/

``agnostic`` samples compress the context alone; ``after`` samples compress all but the last
prompt token (the question included), like chelsea's eval. A reply scores the fraction of expected
answers it contains as whole words (the rule of ``chelsea.evaluation.tasks.score``). kvpress's presses mask
evicted entries rather than free them (KVzip ranks over all heads); their bytes are not measured.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path


def make_prompts(args) -> None:
    from chelsea.evaluation.tasks import TaskBuilder

    builder = TaskBuilder(_tokenizer(args.model), seed=args.seed)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w") as f:
        for length in map(int, args.lengths.split(",")):
            for task in args.tasks.split(","):
                for placement in args.placements.split(","):
                    for i in range(args.samples):
                        s = builder.sample(task, length, placement, i)
                        end = s.context_end if s.context_end is not None else length - 1
                        f.write(json.dumps({"model": args.model, "task": task, "placement": placement, "length": length,
                                            "index": i, "input_ids": s.input_ids, "context_end": end,
                                            "answers": s.answers, "max_new_tokens": s.max_new_tokens, "depth": s.depth}) + "\n")
    print(f"wrote {args.out}")


def _tokenizer(name):
    from transformers import AutoTokenizer

    from chelsea.models import resolve

    path, extra = resolve(name)
    return AutoTokenizer.from_pretrained(path, **extra)


def _score(reply: str, answers: list[str]) -> float:
    found = sum(re.search(rf"(?<![\w]){re.escape(a)}(?![\w])", reply, re.IGNORECASE) is not None for a in answers)
    return found / len(answers)


def _press(name: str, ratio: float):
    import kvpress

    presses = {"kvzip": lambda: kvpress.KVzipPress(compression_ratio=ratio),
               "snapkv": lambda: kvpress.SnapKVPress(compression_ratio=ratio),
               "expected_attention": lambda: kvpress.ExpectedAttentionPress(compression_ratio=ratio),
               "tova": lambda: kvpress.TOVAPress(compression_ratio=ratio),
               "streaming": lambda: kvpress.StreamingLLMPress(compression_ratio=ratio)}
    if name not in presses:
        raise SystemExit(f"--presses: {name!r} is not one of {', '.join(presses)}")
    return presses[name]()


def run_presses(args) -> None:
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

    gguf = Path(args.gguf)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32,
                                                 attn_implementation="sdpa").eval()
    folder = tempfile.mkdtemp()
    tokenizer.save_pretrained(folder)  # KVzipPress reloads the tokenizer from config.name_or_path
    model.config.name_or_path = folder
    samples = [json.loads(line) for line in open(args.prompts)]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    done = set()
    if (out / "results.jsonl").is_file():
        done = {(r["task"], r["placement"], r["length"], r["method"], r["index"]) for r in map(json.loads, open(out / "results.jsonl"))}
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos])
    with open(out / "results.jsonl", "a") as sink:
        for name in args.presses.split(","):
            method = f"kvpress-{name}"
            for s in samples:
                if (s["task"], s["placement"], s["length"], method, s["index"]) in done:
                    continue
                ids = torch.tensor([s["input_ids"]])
                context, question = ids[:, : s["context_end"]], ids[:, s["context_end"] :]
                start = time.perf_counter()
                cache = DynamicCache()
                with torch.no_grad():
                    with _press(name, args.ratio)(model):
                        model.model(input_ids=context, past_key_values=cache)
                    pos = torch.arange(context.shape[1], ids.shape[1])[None]
                    logits = model(input_ids=question, past_key_values=cache, position_ids=pos, logits_to_keep=1).logits
                    new = [int(logits[0, -1].argmax())]
                    while len(new) < s["max_new_tokens"] and new[-1] not in eos:
                        pos = pos[:, -1:] + 1
                        logits = model(input_ids=torch.tensor([[new[-1]]]), past_key_values=cache, position_ids=pos).logits
                        new.append(int(logits[0, -1].argmax()))
                reply = tokenizer.decode(new, skip_special_tokens=True).strip()
                row = {"model": s["model"], "task": s["task"], "placement": s["placement"], "length": s["length"],
                       "method": method, "ratio": args.ratio, "index": s["index"], "score": _score(reply, s["answers"]),
                       "answers": s["answers"], "reply": reply, "depth": s["depth"], "kv_bytes": None,
                       "kv_bytes_full": None, "kv_fraction": None, "seconds": round(time.perf_counter() - start, 3),
                       "peer": f"kvpress {version('kvpress')}, transformers {transformers.__version__}, torch {torch.__version__}"}
                sink.write(json.dumps(row) + "\n")
                sink.flush()
                print(method, s["task"], s["placement"], s["index"], row["score"], reply[:60].replace("\n", " "), flush=True)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="step", required=True)
    p = sub.add_parser("prompts", help="write the eval's samples as token ids (chelsea's environment)")
    p.add_argument("--out", required=True)
    p.add_argument("--model", default="qwen2.5-coder-0.5b")
    p.add_argument("--tasks", default="needle,multikey,multivalue,vartrack")
    p.add_argument("--lengths", default="2048")
    p.add_argument("--placements", default="after,agnostic")
    p.add_argument("--samples", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    r = sub.add_parser("run", help="run kvpress's presses on them (kvpress's environment)")
    r.add_argument("--prompts", required=True)
    r.add_argument("--gguf", required=True, help="the model's .gguf file (chelsea joins the built-in Qwen's into its cache folder)")
    r.add_argument("--presses", default="kvzip,snapkv")
    r.add_argument("--ratio", type=float, default=0.8)
    r.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    (make_prompts if args.step == "prompts" else run_presses)(args)


if __name__ == "__main__":
    main(sys.argv[1:])
