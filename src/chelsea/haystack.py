"""The packaged text and the chat template's frame: what scoring calibration and the evaluation read.

Calibration and evaluation read different essays (:func:`calibration_files`,
:func:`evaluation_files`), so the evaluation never tests on text a calibration was fitted on.
49 of Paul Graham's essays (MIT licence, ``chelsea/data/haystack/LICENSE.txt``) ship inside the
package, so calibration, the tasks, the demo and the tests need nothing beside it. Another
folder can be chosen with an explicit path or ``$CHELSEA_HAYSTACK``.
"""

from __future__ import annotations

import os
from pathlib import Path

from .errors import ChelseaError

PACKAGED_HAYSTACK = Path(__file__).resolve().parent / "data" / "haystack"


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


def essay_files(folder: Path) -> list[Path]:
    """The essays of ``folder`` in file-name order."""
    return [p for p in sorted(folder.glob("*.txt")) if p.name != "LICENSE.txt"]


def calibration_files(folder: Path) -> list[Path]:
    """The essays calibration reads (every fourth, from the fourth): never the evaluation's. A
    folder of fewer than four cannot be split: calibration and evaluation then share it."""
    files = essay_files(folder)
    return files[3::4] if len(files) >= 4 else files


def evaluation_files(folder: Path) -> list[Path]:
    """The essays the evaluation's tasks read: every essay calibration does not."""
    files = essay_files(folder)
    held = set(calibration_files(folder)) if len(files) >= 4 else set()
    return [p for p in files if p not in held]


def haystack_text(folder: Path, files: list[Path] | None = None) -> str:
    """The essays (all of ``folder``'s, or ``files``), in file-name order, separated by blank lines."""
    return "\n\n".join(p.read_text(encoding="utf-8") for p in (files if files is not None else essay_files(folder)))
