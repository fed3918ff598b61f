"""The demo's prompts: a pass key hidden in filler or essays, and the answer check."""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import ChelseaError
from ..haystack import haystack_text

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
INTRO = (
    "There is important info hidden inside a lot of irrelevant text. Find it and memorize it. "
    "I will quiz you about the important information there.\n\n"
)


@dataclass(frozen=True)
class Prompt:
    """A context with a hidden fact, the question about it and the expected answer."""

    context: str
    question: str
    answer: str
    answer_prefix: str = ""


def _fit_tokens(tokenizer, text: str, n_tokens: int, start: int) -> str:
    ids = tokenizer(text, add_special_tokens=False).input_ids
    if len(ids) < n_tokens:
        raise ChelseaError(f"the haystack has {len(ids)} tokens, fewer than the {n_tokens} asked for")
    start = min(start, len(ids) - n_tokens)
    return tokenizer.decode(ids[start : start + n_tokens])


def insert_at_depth(context: str, fact: str, depth: float) -> str:
    """Insert ``fact`` at the first sentence end after ``depth`` (0 = start, 1 = end) of ``context``."""
    if not 0.0 <= depth <= 1.0:
        raise ChelseaError(f"depth must be in [0, 1]; got {depth}")
    at = int(len(context) * depth)
    match = re.compile(r"[.!?]\s").search(context, at)
    cut = match.end() if match else len(context)
    return context[:cut] + fact + " " + context[cut:]


def passkey_prompt(tokenizer, n_tokens: int, *, depth: float = 0.5, seed: int = 0, haystack: Path | None = None) -> Prompt:
    """A 5-digit pass key hidden at ``depth`` in about ``n_tokens`` tokens of context.

    The context is haystack text when ``haystack`` is given, else the repetitive filler. The
    question is completion-style ("... The pass key is"), which small models answer reliably.
    """
    rng = random.Random(seed)
    key = str(rng.randrange(10_000, 100_000))
    fact = f"The pass key is {key}. Remember it. {key} is the pass key."
    if haystack is not None:
        text = haystack_text(haystack)
        total = len(tokenizer(text, add_special_tokens=False).input_ids)
        body = _fit_tokens(tokenizer, text, n_tokens, rng.randrange(0, max(1, total - n_tokens)))
    else:
        per = len(tokenizer(FILLER, add_special_tokens=False).input_ids)
        body = FILLER * max(1, n_tokens // per)
    return Prompt(INTRO + insert_at_depth(body, fact, depth), "What is the pass key?", key, "The pass key is")


def is_correct(answer: str, expected: str) -> bool:
    """The expected answer appears in the generated text as a whole word or number."""
    return re.search(rf"(?<![\w]){re.escape(expected)}(?![\w])", answer) is not None
