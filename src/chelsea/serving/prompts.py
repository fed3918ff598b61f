"""Requests as token ids: chat messages, completion prompts, documents and questions about them."""

from __future__ import annotations

from ..haystack import chat_frame


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
        """The chat ``messages`` (``role``, ``content``) as the model's prompt; after a document's
        ids, its users' messages are the question."""
        if document_ids is not None:
            question = "\n\n".join(m["content"] for m in messages if m["role"] == "user")
            return document_ids + self.question_ids(question)
        if getattr(self.tokenizer, "chat_template", None):
            text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            return self.tokenizer(text, add_special_tokens=False).input_ids
        return self.tokenizer("\n".join(f"{m['role']}: {m['content']}" for m in messages) + "\nassistant:").input_ids

    def completion_ids(self, prompt: str, document_ids: list[int] | None = None) -> list[int]:
        if document_ids is not None:
            return document_ids + self.tokenizer(prompt, add_special_tokens=False).input_ids
        return self.tokenizer(prompt).input_ids
