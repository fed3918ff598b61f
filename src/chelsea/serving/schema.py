"""The request bodies the server takes: the OpenAI chat and completions parameters, and documents.

Every parameter of OpenAI's API reference is accepted by name (a misspelt one is a 400). Most are
honoured (sampling, stop sequences, ``n``, ``max_completion_tokens``, ``stream_options``,
penalties, ``seed``, ``user``); those that would change the answer in a way this server cannot
(tool calls, non-text content, ``logprobs``, ``logit_bias``, structured output, audio) are refused
with a 400 that names them (:func:`refusals`), never silently ignored. Bookkeeping fields
(``metadata``, ``store``, ``service_tier``, ...) are accepted and ignored.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from .protocol import ServeError

MAX_N = 8
MAX_STOP = 4


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ChelseaOptions(_Strict):
    """The extra body field ``chelsea``: compression of this request, or a registered document."""

    method: str | None = None
    ratio: float | None = None
    document: str | None = None


class StreamOptions(_Strict):
    include_usage: bool | None = None
    include_obfuscation: bool | None = None


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[Any] | None = None
    tool_call_id: str | None = None
    function_call: Any = None
    refusal: str | None = None
    audio: Any = None

    def text(self, where: str) -> str:
        """The message's text (list-form content joined); 400 for content that is not text."""
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        for part in self.content:
            if part.type != "text" or part.text is None:
                raise ServeError(400, f"content parts of type {part.type!r} are not supported: this server reads text only",
                                 param=f"{where}.content")
        return "".join(part.text for part in self.content)


class _Generation(_Strict):
    """What chat and completions requests share."""

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)
    n: int | None = Field(None, ge=1, le=MAX_N)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    chelsea: ChelseaOptions | None = None

    def stops(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > MAX_STOP:
            raise ServeError(400, f"stop takes at most {MAX_STOP} sequences; got {len(stops)}", param="stop")
        return stops


class ChatRequest(_Generation):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[Any] | None = None
    tool_choice: Any = None
    functions: list[Any] | None = None
    function_call: Any = None
    parallel_tool_calls: bool | None = None
    response_format: dict[str, Any] | None = None
    audio: Any = None
    modalities: list[str] | None = None
    prediction: Any = None
    web_search_options: Any = None
    reasoning_effort: str | None = None
    verbosity: str | None = None
    metadata: dict[str, Any] | None = None
    store: bool | None = None
    service_tier: str | None = None
    prompt_cache_key: str | None = None
    prompt_cache_retention: str | None = None
    prompt_cache_options: Any = None
    safety_identifier: str | None = None
    moderation: Any = None


class CompletionRequest(_Generation):
    prompt: str | list[str] | list[int] | list[list[int]]
    best_of: int | None = Field(None, ge=1)
    echo: bool | None = None
    logprobs: int | None = Field(None, ge=0, le=5)
    suffix: str | None = None


class DocumentRequest(_Strict):
    text: str = Field(min_length=1)
    chelsea: ChelseaOptions | None = None


def refusals(req: _Generation) -> None:
    """400 for the parameters this server cannot honour, naming each."""
    refused = {"logit_bias": bool(req.logit_bias)}
    if isinstance(req, ChatRequest):
        refused.update(
            logprobs=bool(req.logprobs), top_logprobs=bool(req.top_logprobs), tools=bool(req.tools),
            functions=bool(req.functions), function_call=req.function_call not in (None, "none"),
            tool_choice=req.tool_choice not in (None, "none", "auto"), audio=req.audio is not None,
            prediction=req.prediction is not None, web_search_options=req.web_search_options is not None,
            response_format=(req.response_format or {"type": "text"}).get("type") != "text",
            modalities=req.modalities not in (None, ["text"]),
        )
        for i, message in enumerate(req.messages):
            if message.tool_calls or message.function_call is not None or message.audio is not None:
                raise ServeError(400, "assistant messages with tool calls, function calls or audio are not supported",
                                 param=f"messages.{i}")
    else:
        refused.update(logprobs=bool(req.logprobs), echo=bool(req.echo), suffix=bool(req.suffix),
                       best_of=(req.best_of or 1) > (req.n or 1))
    for name, bad in refused.items():
        if bad:
            raise ServeError(400, f"{name} is not supported by this server: leave it out (or null)", param=name)


def check_text(value: Any, where: str = "") -> None:
    """400 for a string in ``value`` (nested lists and dicts too) that is not valid Unicode (a lone
    surrogate, which JSON can carry but no tokenizer can read)."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise ServeError(400, "the text holds an invalid Unicode character (a lone surrogate)", param=where or None) from None
    elif isinstance(value, dict):
        for key, item in value.items():
            check_text(item, f"{where}.{key}" if where else str(key))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            check_text(item, f"{where}.{i}")
