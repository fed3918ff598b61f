"""Task families whose answers are not planted strings: facts stated in real text.

- ``qa``: a question about a fact an essay states (``data/qa.json``: written by hand, each with the
  essay, an anchor phrase of the sentence that holds the fact, the question and the accepted
  answers). The context is a window of evaluation essays around that sentence.
- ``code``: in real Python source that ships with the interpreter (the standard-library modules of
  :data:`CODE_MODULES`, read from the running Python, so nothing of it is copied here): the value
  of a module-level constant, or the name of a function given its docstring's first line. The
  context is a window of those modules around the definition.

Each target sits at a random depth of its window. The calibration of the scorers never reads these
texts' generators, nor the essays the evaluation reads (:func:`chelsea.haystack.evaluation_files`).
Targets a model knows without the context are left out by the evaluation (a closed-book run of each
question, :mod:`chelsea.evaluation.evaluate`).
"""

from __future__ import annotations

import ast
import importlib.util
import json
import random
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from ..errors import ChelseaError

PAD_CHARS = 200_000  # text on each side of a target's source: enough for windows of 32K tokens
QA_FILE = Path(__file__).resolve().parent / "data" / "qa.json"
CODE_MODULES = ("ftplib", "smtplib", "poplib", "imaplib", "tarfile", "zipfile", "tokenize", "http.client", "pickle", "uuid",
                "gzip", "wave", "calendar", "difflib", "textwrap", "shutil", "configparser", "socketserver", "fractions",
                "statistics", "colorsys", "heapq", "ipaddress", "netrc", "mimetypes", "quopri", "base64", "hmac", "secrets",
                "random", "webbrowser", "email.utils", "json.decoder", "plistlib", "sched", "selectors", "shlex", "tabnanny",
                "zipapp", "filecmp", "fnmatch", "glob", "graphlib", "numbers", "operator", "pprint", "reprlib", "string",
                "symtable", "timeit", "trace", "traceback")


@dataclass(frozen=True)
class Target:
    """A fact in a source text: the source's name, a phrase of the line that holds it (unique in
    the source), the question, the accepted answers (``a|b``: either) and the reply's start."""

    source: str
    anchor: str
    question: str
    answers: tuple[str, ...]
    prefix: str = ""


@lru_cache(maxsize=1)
def qa_targets() -> tuple[Target, ...]:
    return tuple(Target(q["essay"], q["anchor"], q["question"], tuple(q["answers"]), "The answer is")
                 for q in json.loads(QA_FILE.read_text(encoding="utf-8")))


@lru_cache(maxsize=None)
def code_text(module: str) -> str:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.origin or not spec.origin.endswith(".py"):
        raise ChelseaError(f"the code task reads the standard library's {module}.py, which this Python does not have")
    return Path(spec.origin).read_text(encoding="utf-8")


@lru_cache(maxsize=1)
def code_targets() -> tuple[Target, ...]:
    """Module-level constants (an int of at least 8, or a short word) and public functions with a
    docstring of four words or more, in module order; lines that are not unique are left out."""
    out = []
    for module in CODE_MODULES:
        try:
            text = code_text(module)
        except ChelseaError:
            continue
        lines = text.splitlines()
        for node in ast.parse(text).body:
            target = _constant(module, node, lines) or _function(module, node, lines)
            if target is not None and text.count(target.anchor) == 1:
                out.append(target)
    return tuple(out)


def _constant(module: str, node, lines: list[str]) -> Target | None:
    if not (isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)
            and node.targets[0].id.isupper() and isinstance(node.value, ast.Constant)):
        return None
    name, value = node.targets[0].id, node.value.value
    if isinstance(value, bool) or not (isinstance(value, int) and abs(value) >= 8 or isinstance(value, str)
                                       and 3 <= len(value) <= 24 and value.isprintable() and " " not in value):
        return None
    return Target(module, lines[node.lineno - 1], f"What value does the code assign to the constant {name}?",
                  (str(value),), f"{name} is")


def _function(module: str, node, lines: list[str]) -> Target | None:
    if not isinstance(node, ast.FunctionDef) or node.name.startswith("_") or not ast.get_docstring(node):
        return None
    first = ast.get_docstring(node).strip().splitlines()[0].strip()
    if len(first.split()) < 4 or '"' in first:
        return None
    return Target(module, lines[node.lineno - 1], f'Which function in the code is documented as "{first}"? Give its name.',
                  (node.name,), "The function is")


def target(task: str, index: int, seed: int) -> Target:
    """Sample ``index``'s target (the same at every length and placement)."""
    targets = qa_targets() if task == "qa" else code_targets()
    if not targets:
        raise ChelseaError(f"no {task} targets: the code task needs the standard library's modules as .py files")
    order = list(range(len(targets)))
    random.Random(f"{seed}/{task}").shuffle(order)
    return targets[order[index % len(targets)]]


def source_ids(task: str, target: Target, essays: dict[str, str], ids, seed: int) -> tuple[list[int], int]:
    """``(token ids, anchor position)``: the target's source with other sources before and after it
    (evaluation essays, or other modules), long enough for any window."""
    names = sorted(essays) if task == "qa" else [m for m in CODE_MODULES if m != target.source]
    others = [n for n in names if n != target.source]
    random.Random(f"{seed}/{task}/{target.source}").shuffle(others)
    text = essays[target.source] if task == "qa" else code_text(target.source)
    read = (lambda n: essays[n]) if task == "qa" else _safe_code
    at = text.index(target.anchor)
    pad = _pad_chars(others[: len(others) // 2], read, reverse=True)
    before = ids(pad + "\n\n" + text[:at])
    after = ids(text[at:] + "\n\n" + _pad_chars(others[len(others) // 2 :], read))
    return before + after, len(before)


def _pad_chars(names: list[str], read, reverse: bool = False, chars: int = PAD_CHARS) -> str:
    """The texts of ``names`` joined, cut to ``chars`` characters (from the end with ``reverse``)."""
    parts, total = [], 0
    for name in reversed(names) if reverse else names:
        parts.append(read(name))
        total += len(parts[-1])
        if total >= chars:
            break
    text = "\n\n".join(reversed(parts) if reverse else parts)
    return text[-chars:] if reverse else text[:chars]


def _safe_code(module: str) -> str:
    try:
        return code_text(module)
    except ChelseaError:
        return ""


def window(source: list[int], anchor: int, budget: int, rng: random.Random) -> list[int]:
    """``budget`` ids of ``source`` with the anchor at a random depth between 15% and 85%."""
    if len(source) < budget:
        raise ChelseaError(f"the source text has {len(source)} tokens, fewer than the {budget} asked for")
    start = anchor - int(rng.uniform(0.15, 0.85) * budget)
    start = min(max(0, start), len(source) - budget)
    return source[start : start + budget]
