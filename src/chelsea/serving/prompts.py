"""Requests as token ids: chat messages, completion prompts, documents and questions about them."""

from __future__ import annotations

from ..haystack import chat_frame
from .protocol import ServeError


class PromptBuilder:
    """Tokenizes requests for one tokenizer; a registered document opens the first user message
    (:meth:`document_ids`), so a question about it can follow (:meth:`question_ids`)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.head, self.tail = chat_frame(tokenizer)

    def document_ids(self, text: str) -> list[int]:
        """A document as the start of a user message."""
        return self.tokenizer(self.head + text, add_special_tokens=not self.head).input_ids

    def question_ids(self, question: str) -> list[int]:
        """What follows a registered document: the question and the end of the user turn."""
        return self.tokenizer("\n\n" + question + self.tail, add_special_tokens=False).input_ids

    def chat_ids(self, messages: list[dict], document_ids: list[int] | None = None) -> list[int]:
        """The chat ``messages`` (``role``, ``content`` text) as the model's prompt; after a
        document's ids, its users' messages are the question. ``developer`` is read as ``system``;
        a ``tool`` message goes to the template as it is, or, where the template has no such role,
        as a user message that says it is a tool's output."""
        messages = [{"role": "system" if m["role"] == "developer" else m["role"], "content": m["content"]} for m in messages]
        if document_ids is not None:
            question = "\n\n".join(m["content"] for m in messages if m["role"] in ("user", "tool"))
            return document_ids + self.question_ids(question)
        if getattr(self.tokenizer, "chat_template", None):
            try:
                text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            except Exception:  # noqa: BLE001 - a template without the tool role (jinja raises its own errors)
                plain = [m if m["role"] != "tool" else {"role": "user", "content": f"Tool output:\n{m['content']}"} for m in messages]
                text = self.tokenizer.apply_chat_template(plain, add_generation_prompt=True, tokenize=False)
            return self.tokenizer(text, add_special_tokens=False).input_ids
        return self.tokenizer("\n".join(f"{m['role']}: {m['content']}" for m in messages) + "\nassistant:").input_ids

    def completion_ids(self, prompt: str | list[int], document_ids: list[int] | None = None) -> list[int]:
        """A completion prompt (text, or token ids as the OpenAI API allows); after a document's ids
        it continues the document."""
        ids = list(prompt) if isinstance(prompt, list) else self.tokenizer(prompt, add_special_tokens=document_ids is None).input_ids
        if document_ids is not None:
            return document_ids + ids
        if not ids:  # an empty prompt: the model starts from its beginning-of-text token
            start = self.tokenizer.bos_token_id if self.tokenizer.bos_token_id is not None else self.tokenizer.eos_token_id
            if start is None:
                raise ServeError(400, "prompt is empty and the model has no beginning-of-text token to start from", param="prompt")
            ids = [start]
        vocab = len(self.tokenizer)
        if any(not isinstance(t, int) or not 0 <= t < vocab for t in ids):
            raise ServeError(400, f"prompt token ids must be integers in [0, {vocab})", param="prompt")
        return ids
