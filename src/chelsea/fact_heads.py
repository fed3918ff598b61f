"""Fact heads: the few KV heads whose reconstruction scores single out exact content, lent to every layer.

Context reconstruction (:mod:`chelsea.importance`) scores each layer on its own, and in most
layers of a small model a code's digits are not among the entries that score highest: at 2K tokens
and 80% removed, Qwen2.5-Coder-0.5B's floor layers kept 0-20% of a planted number's digits, while
ranking the facts first (an oracle) lifted the eval from about 60 to 97 (``results/issue14``). A
few (layer, KV head) pairs do rank such tokens near the top. ``chelsea`` (guided merging) finds them once per model
by calibration and lends their verdict to every layer: after the layer budgets are split by the
layers' own scores, each layer ranks its region (between sinks and window) by

    own percentile + fact_weight * the token's mean percentile over the fact heads

so a token the fact heads agree on is kept (and, being ranked high, kept exact) in every layer.

Calibration (:func:`calibration_prompts`, :func:`choose_heads`) plants random codes of capitals
and digits, in sentences unlike the eval tasks', in the packaged essays, scores the prompts by
reconstruction and takes the heads that put the most of the codes' tokens in their top 10%.
Everything here is a plain tensor or token function; :func:`chelsea.importance.find_fact_heads`
runs the model.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from .errors import ChelseaError
from .prompts import chat_frame, find_haystack, haystack_text

CALIBRATION_VERSION = 2  # raise when the calibration changes, so stored fact heads are not reused
CALIBRATION_LENGTH = 1024
CALIBRATION_PROMPTS = 3
CODES_PER_PROMPT = 8
TOP_SHARE = 0.1  # a head "finds" a token when it is within the top 10% of the head's region
_TEMPLATES = (
    "The archive label on box {n} reads {code}, in faded ink.",
    "Ticket {code} was still open when the office closed.",
    "Her badge number, {code}, was printed on the back.",
    "Shipment {code} left the warehouse on a Tuesday.",
    "The serial stamped under the lid is {code}.",
    "Flight {code} was delayed by an hour.",
)
_LETTERS = "ABCDEFGHJKLMNPQRSTUVWXYZ"


@dataclass(frozen=True)
class FactHeads:
    """The chosen ``(cache layer, KV head)`` pairs, best first, and each one's calibration hit rate
    (the share of the planted codes' tokens inside its top :data:`TOP_SHARE`). ``profile``: per
    cache layer, the quantiles of its reconstruction scores on the calibration prompts, largest
    first (:func:`chelsea.methods._budgets.score_profile`), from which ``layer_budgets=
    "calibrated"`` splits the budget over layers without scoring them again."""

    heads: tuple[tuple[int, int], ...]
    hit_rate: tuple[float, ...]
    profile: tuple[tuple[float, ...], ...] = ()


def _code(rng: random.Random) -> str:
    letters = "".join(rng.choice(_LETTERS) for _ in range(rng.randint(1, 3)))
    digits = "".join(rng.choice("0123456789") for _ in range(rng.randint(3, 5)))
    return f"{letters}-{digits}" if rng.random() < 0.5 else f"{letters}{digits}"


def calibration_prompts(tokenizer, *, prompts: int = CALIBRATION_PROMPTS, length: int = CALIBRATION_LENGTH,
                        codes: int = CODES_PER_PROMPT, seed: int = 0) -> tuple[torch.Tensor, list[list[int]]]:
    """``(ids [prompts, length], positions)``: essay text with ``codes`` sentences holding a random
    code each at sentence ends spread evenly, after the chat template's start; ``positions[i]`` are prompt ``i``'s
    token positions of the codes themselves. Every prompt has exactly ``length`` tokens."""
    folder = find_haystack()
    if folder is None:
        raise ChelseaError("fact-head calibration needs the haystack text: set CHELSEA_HAYSTACK to a folder of .txt files")

    def ids(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False).input_ids

    hay = ids(haystack_text(folder))
    head = ids(chat_frame(tokenizer)[0])
    rng = random.Random(f"fact-heads/{seed}")
    rows, where = [], []
    for _ in range(prompts):
        facts = []
        for _ in range(codes):
            before, _, after = rng.choice(_TEMPLATES).replace("{n}", str(rng.randint(2, 99))).partition("{code}")
            facts.append((ids(" " + before.rstrip()), ids(" " + _code(rng)), ids(after)))
        room = length - len(head) - sum(len(a) + len(b) + len(c) for a, b, c in facts)
        if room < codes:
            raise ChelseaError(f"a calibration length of {length} tokens leaves no room for the essay text")
        start = rng.randrange(0, len(hay) - room)
        body, out, positions, last = hay[start : start + room], list(head), [], 0
        ends = [i + 1 for i, t in enumerate(tokenizer.convert_ids_to_tokens(body)) if t.rstrip().endswith((".", "!", "?"))]
        for i, (a, b, c) in enumerate(facts):
            at = next((e for e in ends if e >= (i + 1) * room // (codes + 1) and e >= last), last)
            out += body[last:at] + a
            positions += range(len(out), len(out) + len(b))
            out += b + c
            last = at
        out += body[last:]
        rows.append(out)
        where.append(positions)
    return torch.tensor(rows), where


def _percentiles(region: torch.Tensor) -> torch.Tensor:
    """Each entry's rank within the last dimension as a fraction in [0, 1)."""
    return region.float().argsort(-1).argsort(-1).float() / region.shape[-1]


def head_hits(scores: list[torch.Tensor], positions: list[list[int]], lo: int, window: int) -> torch.Tensor:
    """``[layers, kv_heads]``: per (layer, KV head) of ``scores`` (per layer ``[prompts, kv_heads,
    n]``), the share of ``positions`` inside region ``[lo, n - window)`` whose score is within the
    head's top :data:`TOP_SHARE` of that region, averaged over prompts."""
    out = []
    for layer in scores:
        region = layer[:, :, lo : layer.shape[-1] - window].float()
        k = max(1, int(TOP_SHARE * region.shape[-1]))
        threshold = region.topk(k, dim=-1).values[..., -1:]
        hits = []
        for row, pos in enumerate(positions):
            inside = torch.tensor([p - lo for p in pos if lo <= p < layer.shape[-1] - window], dtype=torch.long)
            if inside.numel() == 0:
                raise ChelseaError("no calibration code lies between the sinks and the window")
            hits.append((region[row][:, inside] >= threshold[row]).float().mean(-1))
        out.append(torch.stack(hits).mean(0))
    return torch.stack(out)


def choose_heads(hits: torch.Tensor, count: int) -> FactHeads:
    """The ``count`` (layer, KV head) pairs of ``hits`` ``[layers, kv_heads]`` with the highest rate
    (every pair of a model that has fewer)."""
    if count < 1:
        raise ChelseaError(f"fact_heads must be at least 1; got {count}")
    best = hits.flatten().topk(min(count, hits.numel()))
    kv = hits.shape[1]
    return FactHeads(tuple((int(i) // kv, int(i) % kv) for i in best.indices), tuple(float(v) for v in best.values))


def consensus(scores: list[torch.Tensor], heads: FactHeads, lo: int, window: int) -> torch.Tensor:
    """``[batch, n_region]``: each region entry's mean percentile over the fact heads, from the
    per-layer scores ``[batch, kv_heads, n]`` (all layers hold the same ``n`` entries)."""
    regions = torch.stack([scores[layer][:, head, lo : scores[layer].shape[-1] - window] for layer, head in heads.heads])
    return _percentiles(regions).mean(0)


def lend_ranks(region: torch.Tensor, agreed: torch.Tensor, weight: float) -> torch.Tensor:
    """A layer's new region scores ``[batch, kv_heads, m]`` (or several layers' stacked,
    ``[layers, batch, kv_heads, m]``): its own percentile per (row, head) plus ``weight`` times
    the fact heads' ``agreed`` percentile ``[batch, m]``."""
    return _percentiles(region) + weight * agreed[:, None, :].to(region.device)
