"""Registered documents: prefilled and compressed once, kept within a memory budget, reused by prefix."""

from __future__ import annotations

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
    (the newest always stays)."""

    def __init__(self, budget: int):
        self.budget = budget
        self._docs: OrderedDict[str, Document] = OrderedDict()

    def __contains__(self, name) -> bool:
        return isinstance(name, str) and name in self._docs

    def __getitem__(self, name: str) -> Document:
        return self._docs[name]

    def __len__(self) -> int:
        return len(self._docs)

    def values(self):
        return list(self._docs.values())

    @property
    def nbytes(self) -> int:
        return sum(d.nbytes for d in self._docs.values())

    def add(self, name: str, doc: Document) -> None:
        self._docs[name] = doc
        while len(self._docs) > 1 and self.nbytes > self.budget:
            self._docs.popitem(last=False)

    def clear(self) -> None:
        self._docs.clear()

    def use(self, name: str) -> Document:
        """The document ``name``, marked as just used."""
        self._docs.move_to_end(name)
        return self._docs[name]

    def reusable(self, ids: list[int], method: str, ratio: float, named: str | None = None) -> str | None:
        """``named`` if it is here, else the longest document of these settings whose tokens start ``ids``."""
        if named is not None:
            return named if named in self._docs else None
        best = None
        for name, doc in self._docs.items():
            if (doc.method, doc.ratio) == (method, ratio) and len(doc.ids) < len(ids) and ids[: len(doc.ids)] == doc.ids \
                    and (best is None or len(doc.ids) > len(self._docs[best].ids)):
                best = name
        return best
