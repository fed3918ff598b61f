"""The ceiling of importance scoring: `scripts/eval_variants.py` with the facts' tokens ranked first.

Every sentence a question task plants in its context ("One of the special magic numbers for KEY
is: N.", "VAR A = VAR B.") is found again in the prompt's token ids, and right before the cache is
compressed (after the layer budgets are split, so those stay the method's own) its entries get
the highest score in every layer and KV head. Whatever the method still loses then is lost to the
compression of the rest of the context, not to the scores.

    python scripts/oracle_facts.py [--report FILE] OUT_DIR 'name:key=value' ... -- [grid options of eval_variants.py]

``--report FILE`` leaves the scores alone and instead appends to FILE (JSON lines), per batch and
layer, the share of the facts' entries (all of them, and the digits and capitals alone) that the
method's own scores would keep and keep exact: where the facts are lost without the oracle.

A diagnostic for the design study, not a method: it knows the answers.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import torch

import chelsea.cache
import chelsea.evaluate
from chelsea.methods.guided import _exact_mask
from chelsea.tasks import TaskBuilder, _spec

sys.path.insert(0, str(Path(__file__).parent))
import eval_variants  # noqa: E402

BOOST = 1e4
_state: dict = {"samples": None, "pending": False, "report": None, "cell": None}


def _find(haystack: list[int], needle: list[int]) -> int:
    for i in range(len(haystack) - len(needle) + 1):
        if haystack[i : i + len(needle)] == needle:
            return i
    raise AssertionError("a planted fact is not in its prompt")


def _sample(original):
    def sample(self, task, length, placement, index):
        s = original(self, task, length, placement, index)
        rng = random.Random(f"{self.seed}/{task}/{length}/{index}")
        spec = _spec(task, rng, self.words, index, length - 120, self.tokens_per_item)
        positions = []
        for text, _ in spec.facts:
            ids = self.ids(" " + text)
            at = _find(s.input_ids, ids)
            positions += range(at, at + len(ids))
        s.meta["fact_positions"] = positions
        tokens = self.tokenizer.convert_ids_to_tokens([s.input_ids[p] for p in positions])
        s.meta["value_positions"] = [p for p, t in zip(positions, tokens) if t.lstrip("\u0120").isdigit() or t.lstrip("\u0120").isupper()]
        return s
    return sample


def _answer(original):
    def answer(model, tokenizer, samples, cell, config):
        _state["samples"], _state["cell"] = samples, cell
        return original(model, tokenizer, samples, cell, config)
    return answer


def _compress_context(original):
    def compress_context(*args, **kwargs):
        _state["pending"] = True
        try:
            return original(*args, **kwargs)
        finally:
            _state["pending"] = False
    return compress_context


def _compress_together(original):
    def compress_together(layers):
        if _state["pending"] and _state["report"]:
            _state["pending"] = False
            _report(layers)
        elif _state["pending"]:
            _state["pending"] = False
            for layer in layers:
                mask = torch.zeros(layer.scores.shape[0], layer.scores.shape[-1], dtype=torch.bool, device=layer.scores.device)
                for row, s in enumerate(_state["samples"]):
                    mask[row, [p for p in s.meta["fact_positions"] if p < mask.shape[1]]] = True
                layer.scores.masked_fill_(mask[:, None, :], BOOST)
        return original(layers)
    return compress_together


def _report(layers) -> None:
    """Per layer and row: the share of the facts' entries inside the layer's kept and exact sets,
    chosen as ``guided_merge`` chooses them (``kvzip`` keeps its kept set exact)."""
    cfg, samples, cell = layers[0].config, _state["samples"], _state["cell"]
    out = []
    for i, layer in enumerate(layers):
        start, end = cfg.sink_tokens, layer.length - cfg.window
        region = layer.scores[:, :, start:end].float()
        keep = max(0, layer.budget(layer.seen) - cfg.sink_tokens - cfg.window)
        kept = torch.zeros_like(region, dtype=torch.bool).scatter_(-1, region.topk(keep, dim=-1).indices, True)
        exact = _exact_mask(region, kept, cfg.exact_share) if cell.method == "guided" else kept
        for row, s in enumerate(samples):
            entry = {"layer": i, "row": row, "keep": keep}
            for name in ("fact_positions", "value_positions"):
                pos = [p - start for p in s.meta[name] if start <= p < end]
                entry[name.split("_")[0] + "_kept"] = kept[row, :, pos].float().mean().item() if pos else None
                entry[name.split("_")[0] + "_exact"] = exact[row, :, pos].float().mean().item() if pos else None
            out.append(entry)
    with open(_state["report"], "a") as f:
        f.write(json.dumps({"method": cell.method, "task": cell.task, "placement": cell.placement, "ratio": cell.ratio,
                            "indices": [s.index for s in samples], "layers": out}) + "\n")


if __name__ == "__main__":
    TaskBuilder.sample = _sample(TaskBuilder.sample)
    chelsea.evaluate._answer = _answer(chelsea.evaluate._answer)
    chelsea.evaluate.compress_context = _compress_context(chelsea.evaluate.compress_context)
    chelsea.cache.compress_together = _compress_together(chelsea.cache.compress_together)
    argv = sys.argv[1:]
    if argv[:1] == ["--report"]:
        _state["report"], argv = argv[1], argv[2:]
    eval_variants.main(argv)
