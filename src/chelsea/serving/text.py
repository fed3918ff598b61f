"""Generated tokens as text: decoded incrementally, cut at the first stop sequence.

:class:`TextStream` takes token ids one by one and hands back the text that is safe to send: a
piece that could still become the start of a stop sequence, or an unfinished UTF-8 character, is
held back until the next tokens decide it.
"""

from __future__ import annotations


class TextStream:
    """The text of one answer, with ``stop`` sequences (an answer ends before the first one found)."""

    def __init__(self, tokenizer, stop: list[str] | None = None):
        self.tokenizer = tokenizer
        self.stop = [s for s in (stop or []) if s]
        self.hold = max((len(s) for s in self.stop), default=1) - 1
        self.ids: list[int] = []
        self.sent = 0  # characters handed out
        self.stopped = False

    def _text(self) -> str:
        return self.tokenizer.decode(self.ids, skip_special_tokens=True)

    def add(self, token: int) -> str:
        """Take one token; the new text that is safe to send (``stopped`` is set at a stop sequence)."""
        self.ids.append(token)
        text = self._text()
        found = [at for at in (text.find(s, max(0, self.sent - self.hold)) for s in self.stop) if at >= 0]
        if found:
            self.stopped = True
            end = min(found)
        else:
            end = len(text) - self.hold
            if text.endswith("\ufffd"):  # an unfinished character: wait for its remaining bytes
                end = min(end, len(text) - 1)
        if end <= self.sent:
            return ""
        piece, self.sent = text[self.sent:end], end
        return piece

    def finish(self) -> str:
        """What was held back, once the answer has ended without a stop sequence."""
        if self.stopped:
            return ""
        text = self._text()
        piece, self.sent = text[self.sent:], len(text)
        return piece

    @property
    def text(self) -> str:
        """The answer so far, cut at a stop sequence."""
        text = self._text()
        cuts = [text.find(s) for s in self.stop if s in text]
        return text[: min(cuts)] if cuts else text
