"""Long prompts with a hidden fact: the haystack text, passkey filler, and the answer check.

The haystack is a folder of long English text files: 49 of Paul Graham's essays (MIT licence,
``chelsea/data/haystack/LICENSE.txt``) ship inside the package, so the tasks, the demo and the
tests need nothing beside it. Another folder can be chosen with an explicit path or
``$CHELSEA_HAYSTACK``.
"""

from __future__ import annotations

import os
import random
import re
from dataclasses import dataclass
from pathlib import Path

from .errors import ChelseaError

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
PACKAGED_HAYSTACK = Path(__file__).resolve().parent / "data" / "haystack"
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


def chat_frame(tokenizer) -> tuple[str, str]:
    """The chat template's text before and after one user message, the assistant's turn opened
    (``("", "")`` for a tokenizer without a template)."""
    if not getattr(tokenizer, "chat_template", None):
        return "", ""
    mark = "\u2063MESSAGE\u2063"
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": mark}], add_generation_prompt=True, tokenize=False)
    head, tail = rendered.split(mark, 1)
    return head, tail


def find_haystack(path: str | os.PathLike | None = None) -> Path | None:
    """The haystack folder: ``path``, else ``$CHELSEA_HAYSTACK``, else the packaged essays
    (``None`` only when a broken install lost them; an explicit path must exist)."""
    if path is not None:
        folder = Path(path)
        if not folder.is_dir() or not any(folder.glob("*.txt")):
            raise ChelseaError(f"--haystack {folder} is not a folder of .txt files")
        return folder
    if os.environ.get("CHELSEA_HAYSTACK"):
        return find_haystack(os.environ["CHELSEA_HAYSTACK"])
    return PACKAGED_HAYSTACK if any(PACKAGED_HAYSTACK.glob("*.txt")) else None


def haystack_text(folder: Path) -> str:
    """All essays, in file-name order, separated by blank lines."""
    return "\n\n".join(p.read_text(encoding="utf-8") for p in sorted(folder.glob("*.txt")) if p.name != "LICENSE.txt")


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
