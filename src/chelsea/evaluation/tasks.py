"""Long-context tasks, generated from a seed at an exact prompt length in tokens.

Question tasks hide facts in background text and ask about them:

- ``needle``: one "special magic number" for a key word, at a depth from :data:`NEEDLE_DEPTHS`
  (sample ``i`` takes depth ``i mod 5``), in the haystack essays.
- ``passkey``: a five-digit pass key in repetitive filler, at the same depths.
- ``multikey``: the needle plus three distractor needles for other key words (RULER's multi-key).
- ``multivalue``: four numbers for the same key, all asked for (RULER's multi-value).
- ``multiquery``: four keys, all asked for at once (RULER's multi-query).
- ``vartrack``: a chain of five variable assignments ``VAR A = 12345``, ``VAR B = VAR A``, ...;
  every variable that holds the number is asked for (RULER's variable tracking).
- ``cwe``: a numbered list of words in which five words appear 3 to 20 times as often as the
  others (which appear twice); the five are asked for (RULER's common-word extraction).

Facts stated in real text (``qa`` over essays, ``code`` over standard-library source) are in
:mod:`.real_tasks`.

Each question task comes in four placements: ``after`` (the question follows the context, so
methods that look at the last prompt tokens see it), ``before`` (the question precedes the
context and the reply starts with a prefix that names no key: the prompt's end says nothing of
what will be asked), ``agnostic`` (the prompt of ``after``, but the cache is compressed after
the context alone and the question arrives later: one compressed document, many questions;
``Sample.context_end`` says where the context ends) and ``streamed`` (the same prompt, its
context appended to one cache in chunks of :data:`STREAM_CHUNK` tokens, as in a long chat, each
chunk compressed as it arrives, then the question).

``ppl`` is perplexity of haystack text read block by block (see :mod:`chelsea.evaluate`).

A sample's facts depend only on ``(seed, task, length, index)``: the two placements of a sample ask
the same question about the same facts. Prompts are assembled from token ids, so every sample of a
length has exactly that many tokens and a batch needs no padding.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

from ..errors import ChelseaError
from ..haystack import evaluation_files, find_haystack, haystack_text
from .prompts import FILLER, INTRO

REAL_TASKS = ("qa", "code")  # facts stated in real text (:mod:`.real_tasks`)
QUESTION_TASKS = ("needle", "passkey", "multikey", "multivalue", "multiquery", "vartrack", "cwe", *REAL_TASKS)
TASKS = (*QUESTION_TASKS, "ppl")
PLACEMENTS = ("after", "before", "agnostic", "streamed")
STREAM_CHUNK = 512  # ``streamed``: the context arrives in chunks of this many tokens
NEEDLE_DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
CONTEXT_MARK = "\u2063CONTEXT\u2063"

MAGIC_INTRO = (
    "Some special magic numbers are hidden inside the following text. Make sure to memorize them. "
    "I will quiz you about the numbers afterwards."
)


@dataclass
class Sample:
    """One prompt (token ids of exactly ``length``) and the answers its reply must contain."""

    task: str
    length: int
    placement: str
    index: int
    input_ids: list[int]
    answers: list[str]
    max_new_tokens: int
    depth: float | None = None
    meta: dict = field(default_factory=dict)
    context_end: int | None = None  # ``agnostic``: the cache is compressed after this many tokens


@dataclass
class _Spec:
    """What a task generator decides; :func:`make_sample` turns it into token ids."""

    instruction: str
    question: str
    answers: list[str]
    max_new_tokens: int
    prefix_after: str
    prefix_before: str
    facts: list[tuple[str, float]] = field(default_factory=list)
    background: str = "haystack"  # "haystack", "filler" or "list"
    items: list[str] = field(default_factory=list)  # the "list" background's entries
    depth: float | None = None


def score(reply: str, answers: list[str]) -> float:
    """Fraction of ``answers`` found in ``reply`` as whole words (case-insensitive); an answer
    ``a|b`` is found when either is."""
    if not answers:
        raise ValueError("a question needs at least one answer")
    found = sum(any(re.search(rf"(?<![\w]){re.escape(alt)}(?![\w])", reply, re.IGNORECASE) is not None for alt in a.split("|"))
                for a in answers)
    return found / len(answers)


# Generators -----------------------------------------------------------------------------------


def _number(rng: random.Random) -> str:
    return str(rng.randrange(1_000_000, 10_000_000))


def _magic(key: str, value: str) -> str:
    return f"One of the special magic numbers for {key} is: {value}."


def _needle_like(rng: random.Random, words: list[str], keys: int, values: int, asked: int, depth: float | None) -> _Spec:
    names = rng.sample(words, keys)
    numbers = {k: [_number(rng) for _ in range(values)] for k in names}
    facts = [(_magic(k, v), rng.random() if depth is None else depth) for k in names for v in numbers[k]]
    rng.shuffle(facts)
    queried = names[:asked]
    answers = [v for k in queried for v in numbers[k]]
    if asked == 1 and values == 1:
        question = f"What is the special magic number for {queried[0]} mentioned in the text?"
        prefix = f"The special magic number for {queried[0]} mentioned in the text is"
    elif asked == 1:
        question = f"What are all the special magic numbers for {queried[0]} mentioned in the text?"
        prefix = f"The special magic numbers for {queried[0]} mentioned in the text are"
    else:
        listed = ", ".join(queried[:-1]) + f" and {queried[-1]}"
        question = f"What are all the special magic numbers for {listed} mentioned in the text?"
        prefix = f"The special magic numbers for {listed} mentioned in the text are"
    return _Spec(MAGIC_INTRO, question, answers, 16 + 10 * (len(answers) - 1), prefix, "", facts, depth=depth)


def _vartrack(rng: random.Random, hops: int = 4) -> _Spec:
    names = []
    while len(names) < hops + 1:
        name = "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(5))
        if name not in names:
            names.append(name)
    value = str(rng.randrange(10_000, 100_000))
    depths = sorted(rng.random() for _ in names)
    lines = [f"VAR {names[0]} = {value}."] + [f"VAR {b} = VAR {a}." for a, b in zip(names, names[1:])]
    return _Spec(
        "Memorize and track the chain of variable assignments hidden in the following text.",
        f"Find all variables that are assigned the value {value} in the text.",
        names,
        12 + 5 * len(names),
        f"According to the chain of variable assignments in the text, {len(names)} variables are assigned the value {value}; they are:",
        "",
        list(zip(lines, depths)),
    )


def _cwe(rng: random.Random, words: list[str], budget: int, tokens_per_item: float, common: int = 5) -> _Spec:
    n_items = max(8 * common, int(budget / tokens_per_item))
    each = max(6, n_items // (6 * common))  # a common word appears 3x to 20x as often as a rare one
    chosen = rng.sample(words, min(len(words), common + n_items))
    top, rare = chosen[:common], chosen[common:]
    rare_needed = max(0, n_items - common * each) // 2
    if rare_needed > len(rare):
        raise ChelseaError(f"cwe at {budget} tokens needs {rare_needed} distinct rare words; the haystack has {len(rare)}")
    entries = top * each + rare[:rare_needed] * 2
    rng.shuffle(entries)
    return _Spec(
        "Below is a numbered list of words. Some of them appear more often than others. Memorize the ones that appear most often.",
        f"What are the {common} most common words in the list?",
        top,
        10 + 6 * common,
        f"The {common} words that appear most often in the list are:",
        f"The {common} words that appear most often in the list are:",
        background="list",
        items=[f"{i + 1}. {w}\n" for i, w in enumerate(entries)],
    )


def _spec(task: str, rng: random.Random, words: list[str], index: int, budget: int, tokens_per_item: float) -> _Spec:
    depth = NEEDLE_DEPTHS[index % len(NEEDLE_DEPTHS)]
    if task == "needle":
        return _needle_like(rng, words, 1, 1, 1, depth)
    if task == "passkey":
        key = str(rng.randrange(10_000, 100_000))
        fact = f"The pass key is {key}. Remember it. {key} is the pass key."
        return _Spec(INTRO.strip(), "What is the pass key?", [key], 10, "The pass key is", "The pass key is",
                     [(fact, depth)], background="filler", depth=depth)
    if task == "multikey":
        return _needle_like(rng, words, 4, 1, 1, None)
    if task == "multivalue":
        return _needle_like(rng, words, 1, 4, 1, None)
    if task == "multiquery":
        return _needle_like(rng, words, 4, 1, 4, None)
    if task == "vartrack":
        return _vartrack(rng)
    if task == "cwe":
        return _cwe(rng, words, budget, tokens_per_item)
    raise ChelseaError(f"unknown task {task!r}; tasks are {', '.join(TASKS)}")


# Assembly ---------------------------------------------------------------------------------------


class TaskBuilder:
    """Builds samples for one tokenizer: tokenizes the background texts once."""

    def __init__(self, tokenizer, *, haystack: Path | None = None, chat_template: bool = True, seed: int = 0):
        self.tokenizer = tokenizer
        self.seed = seed
        self.chat = chat_template and bool(getattr(tokenizer, "chat_template", None))
        folder = find_haystack(haystack)
        if folder is None:
            raise ChelseaError(
                "the tasks need the haystack text: pass --haystack DIR or set CHELSEA_HAYSTACK to a folder of .txt files"
            )
        self.folder = folder
        self.text = haystack_text(folder, evaluation_files(folder))
        self._ids: dict[str, list[int]] = {}
        self._sources: dict[str, dict] = {}  # per task, each target's source ids and anchor position

    def ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False).input_ids

    def background(self, kind: str) -> list[int]:
        if kind not in self._ids:
            self._ids[kind] = self.ids(self.text if kind == "haystack" else FILLER * 4000)
        return self._ids[kind]

    @cached_property
    def words(self) -> list[str]:
        """Distinct lower-case words of 5 to 9 letters from the haystack, sorted: keys and list words."""
        return sorted(set(re.findall(r"\b[a-z]{5,9}\b", self.text)))

    @cached_property
    def tokens_per_item(self) -> float:
        """Mean tokens of one ``cwe`` list entry, measured on 200 entries."""
        return len(self.ids("".join(f"{i + 1}. {w}\n" for i, w in enumerate(self.words[:200])))) / 200

    def frame(self, user_text: str, prefix: str) -> tuple[list[int], list[int]]:
        """Token ids before and after the context mark, reply prefix included."""
        if self.chat:
            rendered = self.tokenizer.apply_chat_template(
                [{"role": "user", "content": user_text}], add_generation_prompt=True, tokenize=False
            )
            head, tail = rendered.split(CONTEXT_MARK)
            return self.ids(head), self.ids(tail + prefix)
        head, tail = user_text.split(CONTEXT_MARK)
        bos = [self.tokenizer.bos_token_id] if self.tokenizer.bos_token_id is not None else []
        return bos + self.ids(head), self.ids(f"{tail}\n\nAnswer: {prefix}".rstrip())

    def sample(self, task: str, length: int, placement: str, index: int) -> Sample:
        """Sample ``index`` of ``task`` at exactly ``length`` tokens, question ``after`` or ``before``."""
        if task not in QUESTION_TASKS:
            raise ChelseaError(f"unknown question task {task!r}; tasks are {', '.join(QUESTION_TASKS)}")
        if placement not in PLACEMENTS:
            raise ChelseaError(f"placement must be one of {', '.join(PLACEMENTS)}; got {placement!r}")
        if task in REAL_TASKS:
            return self._real_sample(task, length, placement, index)
        guess = length - 120  # the cwe list's size; shrunk until the list fits
        while True:
            rng = random.Random(f"{self.seed}/{task}/{length}/{index}")
            spec = _spec(task, rng, self.words, index, guess, self.tokens_per_item)
            if placement != "before":
                user = f"{spec.instruction}\n\n{CONTEXT_MARK}\n\n{spec.question}"
                head, tail = self.frame(user, spec.prefix_after)
            else:
                user = f"{spec.instruction} {spec.question}\n\n{CONTEXT_MARK}"
                head, tail = self.frame(user, spec.prefix_before)
            budget = length - len(head) - len(tail)
            listed = [i for item in spec.items for i in self.ids(item)]  # the cwe list, tokenized once
            overflow = len(listed) - budget
            if overflow <= 0 or guess < 64:
                break
            guess -= overflow + 8
        context = self._context(spec, budget, rng, listed)
        ids = head + context + tail
        new_tokens = spec.max_new_tokens
        if placement == "before" and spec.prefix_before != spec.prefix_after:
            new_tokens += len(self.ids(spec.prefix_after)) + 8  # room to restate the question first
        assert len(ids) == length, (len(ids), length)
        return Sample(task, length, placement, index, ids, spec.answers, new_tokens, spec.depth,
                      {"question": spec.question}, len(head) + len(context) if placement in ("agnostic", "streamed") else None)

    INSTRUCTIONS = {"qa": "Read the following text and answer the question about it.",
                    "code": "Read the following Python source code and answer the question about it."}

    def _real_sample(self, task: str, length: int, placement: str, index: int) -> Sample:
        """A ``qa`` or ``code`` sample: a window of real text around the target's line."""
        from . import real_tasks

        fact = real_tasks.target(task, index, self.seed)
        if placement == "before":
            head, tail = self.frame(f"{self.INSTRUCTIONS[task]} {fact.question}\n\n{CONTEXT_MARK}", fact.prefix)
        else:
            head, tail = self.frame(f"{self.INSTRUCTIONS[task]}\n\n{CONTEXT_MARK}\n\n{fact.question}", fact.prefix)
        budget = length - len(head) - len(tail)
        if task not in self._sources:
            self._sources[task] = {}
        if fact not in self._sources[task]:
            self._sources[task][fact] = real_tasks.source_ids(task, fact, self.essays, self.ids, self.seed)
        source, anchor = self._sources[task][fact]
        context = real_tasks.window(source, anchor, budget, random.Random(f"{self.seed}/{task}/{length}/{index}"))
        ids = head + context + tail
        assert len(ids) == length, (len(ids), length)
        return Sample(task, length, placement, index, ids, list(fact.answers), 24, None, {"question": fact.question},
                      len(head) + len(context) if placement in ("agnostic", "streamed") else None)

    def closed_book(self, task: str, index: int) -> Sample:
        """Sample ``index``'s question without its context: what a model knows without reading."""
        from . import real_tasks

        fact = real_tasks.target(task, index, self.seed)
        head, tail = self.frame(f"Answer the question.\n\n{CONTEXT_MARK}\n\n{fact.question}", fact.prefix)
        return Sample(task, len(head) + len(tail), "closed", index, head + tail, list(fact.answers), 24)

    @cached_property
    def essays(self) -> dict[str, str]:
        """The evaluation essays by file name (what ``qa`` reads)."""
        return {p.name: p.read_text(encoding="utf-8") for p in evaluation_files(self.folder)}

    def _context(self, spec: _Spec, budget: int, rng: random.Random, body: list[int]) -> list[int]:
        """Exactly ``budget`` ids: background with the facts inserted at sentence ends, or the
        tokenized list ``body`` (``list`` background) after a little haystack text."""
        if spec.background == "list":
            if len(body) > budget:
                raise ChelseaError(f"the word list needs {len(body)} tokens but only {budget} are left; use a longer length")
            return self.background("haystack")[: budget - len(body)] + body
        facts = [(self.ids(" " + text), depth) for text, depth in spec.facts]
        room = budget - sum(len(f) for f, _ in facts)
        if room < 16:
            raise ChelseaError(f"a length of {budget} tokens leaves no room for the background; use a longer length")
        source = self.background(spec.background)
        if len(source) < room:
            raise ChelseaError(f"the {spec.background} text has {len(source)} tokens, fewer than the {room} asked for")
        start = rng.randrange(0, len(source) - room + 1) if spec.background == "haystack" else 0
        hay = source[start : start + room]
        ends = self._sentence_ends(hay)
        out, last = [], 0
        for fact, depth in sorted(facts, key=lambda f: f[1]):
            at = next((e for e in ends if e >= depth * room and e >= last), room)
            out += hay[last:at] + fact
            last = at
        return out + hay[last:]

    def _sentence_ends(self, ids: list[int]) -> list[int]:
        """Positions just after a token that ends a sentence or a line."""
        tokens = self.tokenizer.convert_ids_to_tokens(ids)
        ends = [i + 1 for i, t in enumerate(tokens) if t and (t.rstrip().endswith((".", "!", "?")) or "\u010a" in t or "\n" in t)]
        return [0, *ends]

    def ppl_sample(self, length: int, index: int) -> Sample:
        """``length`` tokens of haystack text from a seeded offset (for perplexity)."""
        source = self.background("haystack")
        if len(source) < length:
            raise ChelseaError(f"the haystack has {len(source)} tokens, fewer than the {length} asked for")
        rng = random.Random(f"{self.seed}/ppl/{length}/{index}")
        start = rng.randrange(0, len(source) - length + 1)
        return Sample("ppl", length, "-", index, source[start : start + length], [], 0)
