"""Registered documents: prefilled and compressed once, kept within a memory budget, reused by prefix."""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

from ..cache import ClusteredCache


@dataclass
class Document:
    ids: list[int]
    method: str
    ratio: float
    cache: ClusteredCache
    nbytes: int


class DocumentStore:
    """Documents by name, least recently used first out once they hold more than ``budget`` bytes
    (the newest always stays). Safe to use from the server's threads."""

    def __init__(self, budget: int):
        self.budget = budget
        self._docs: OrderedDict[str, Document] = OrderedDict()
        self._lock = threading.RLock()

    def __contains__(self, name) -> bool:
        with self._lock:
            return isinstance(name, str) and name in self._docs

    def __getitem__(self, name: str) -> Document:
        with self._lock:
            return self._docs[name]

    def __len__(self) -> int:
        return len(self._docs)

    @property
    def nbytes(self) -> int:
        with self._lock:
            return sum(d.nbytes for d in self._docs.values())

    def add(self, name: str, doc: Document) -> None:
        with self._lock:
            self._docs[name] = doc
            while len(self._docs) > 1 and self.nbytes > self.budget:
                self._docs.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._docs.clear()

    def use(self, name: str) -> Document:
        """The document ``name``, marked as just used."""
        with self._lock:
            self._docs.move_to_end(name)
            return self._docs[name]

    def reusable(self, ids: list[int], method: str, ratio: float, named: str | None = None) -> str | None:
        """``named`` if it is here, else the longest document of these settings whose tokens start ``ids``."""
        with self._lock:
            if named is not None:
                return named if named in self._docs else None
            best = None
            for name, doc in self._docs.items():
                if (doc.method, doc.ratio) == (method, ratio) and len(doc.ids) < len(ids) and ids[: len(doc.ids)] == doc.ids \
                        and (best is None or len(doc.ids) > len(self._docs[best].ids)):
                    best = name
            return best
