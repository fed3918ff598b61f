"""Calibration data: prompts with planted facts that scoring is calibrated on once per model.

The fact-head calibration (:mod:`.fact_heads`) plants random codes of capitals and digits, in
sentences of its own (:data:`TEMPLATES`), in the packaged essays. These generators belong to the
scoring package and are unlike the evaluation's tasks (:mod:`chelsea.evaluation.tasks`: other
sentences, other kinds of facts), so the evaluation never tests on what calibration saw.
"""

from __future__ import annotations

import random

import torch

from ..errors import ChelseaError
from ..haystack import calibration_files, chat_frame, find_haystack, haystack_text

CALIBRATION_LENGTH = 1024
CALIBRATION_PROMPTS = 3
CODES_PER_PROMPT = 8
TEMPLATES = (
    "The archive label on box {n} reads {code}, in faded ink.",
    "Ticket {code} was still open when the office closed.",
    "Her badge number, {code}, was printed on the back.",
    "Shipment {code} left the warehouse on a Tuesday.",
    "The serial stamped under the lid is {code}.",
    "Flight {code} was delayed by an hour.",
)
_LETTERS = "ABCDEFGHJKLMNPQRSTUVWXYZ"


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

    hay = ids(haystack_text(folder, calibration_files(folder)))
    head = ids(chat_frame(tokenizer)[0])
    rng = random.Random(f"fact-heads/{seed}")
    rows, where = [], []
    for _ in range(prompts):
        facts = []
        for _ in range(codes):
            before, _, after = rng.choice(TEMPLATES).replace("{n}", str(rng.randint(2, 99))).partition("{code}")
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


TRAINING_PROMPTS = 16  # prompts the learned scorer is fitted on (half essays, half code-like text)
TRAINING_LENGTH = 2048
_SYLLABLES = ("ka", "ri", "mo", "zen", "tal", "vek", "dor", "pli", "sun", "gra", "fel", "nox", "tir", "bam", "qua", "lem")


def _word(rng: random.Random, parts: int) -> str:
    return "".join(rng.choice(_SYLLABLES) for _ in range(parts))


def _code_lines(rng: random.Random, count: int) -> str:
    """Code-like text of ``count`` statements: constants (the planted facts: numbers and codes),
    functions with a docstring, assignments and comments, every name made of random syllables."""
    lines = []
    for _ in range(count):
        kind = rng.random()
        if kind < 0.3:
            value = rng.choice([str(rng.randint(100, 99999)), f'"{_code(rng)}"', f"0x{rng.randint(16, 65535):X}"])
            lines.append(f"{_word(rng, 2).upper()}_{_word(rng, 2).upper()} = {value}")
        elif kind < 0.55:
            args = ", ".join(_word(rng, 2) for _ in range(rng.randint(0, 3)))
            lines += [f"def {_word(rng, 2)}_{_word(rng, 2)}({args}):",
                      f'    """{" ".join(_word(rng, 2) for _ in range(rng.randint(4, 9))).capitalize()}."""',
                      f"    return {_word(rng, 2)}({args})", ""]
        elif kind < 0.85:
            lines.append(f"{_word(rng, 2)} = {_word(rng, 2)}.{_word(rng, 3)}({rng.randint(0, 9)})")
        else:
            lines.append("# " + " ".join(_word(rng, 2) for _ in range(rng.randint(3, 10))))
    return "\n".join(lines)


def training_prompts(tokenizer, *, count: int = TRAINING_PROMPTS, length: int = TRAINING_LENGTH, seed: int = 0) -> torch.Tensor:
    """``[count, length]`` prompts the learned scorer is fitted on: essays of the calibration set
    with planted codes (:func:`calibration_prompts`) and code-like text with planted constants,
    alternately; seeded."""
    rows = []
    head = tokenizer(chat_frame(tokenizer)[0], add_special_tokens=False).input_ids
    for i in range(count):
        if i % 2 == 0:
            ids, _ = calibration_prompts(tokenizer, prompts=1, length=length, codes=max(2, length // 160), seed=1000 + seed * count + i)
            rows.append(ids[0])
            continue
        rng = random.Random(f"learned/{seed}/{i}")
        body = tokenizer(_code_lines(rng, length // 4), add_special_tokens=False).input_ids
        rows.append(torch.tensor((head + body)[:length]))
        if len(rows[-1]) < length:
            raise ChelseaError(f"the code-like training text is shorter than {length} tokens")
    return torch.stack(rows)
