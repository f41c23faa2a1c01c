"""OpenAI wire types for the chat-completions request and reply: liberal (unknown fields are kept).

The server parses the client's body with these models to know what to screen; the body forwarded
upstream is the client's original JSON, never a re-serialisation of these models.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

ROLES = ("system", "developer", "user", "assistant", "tool", "function")


class Wire(BaseModel):
    model_config = ConfigDict(extra="allow", populate_by_name=True)


class TextPart(Wire):
    type: Literal["text"]
    text: str


class ImageURL(Wire):
    url: str


class ImagePart(Wire):
    type: Literal["image_url"]
    image_url: ImageURL


class OtherPart(Wire):
    """Every other part type. Text-bearing ones (`input_text`, `output_text`, `thinking`, `refusal`)
    are screened as text; the rest are refused unless a route lets them through unscreened."""

    type: str


ContentPart = TextPart | ImagePart | OtherPart

# A list stops at its first wrong item: pydantic would otherwise collect an error per item (a 2 MB body
# of 400,000 empty arrays where parts go took 15 s, holding the GIL), which server.max_json_objects,
# counting objects only, does not bound.
Parts = Annotated[list[ContentPart], Field(fail_fast=True)]


class FunctionCall(Wire):
    name: str | None = None
    arguments: str | None = None


class ToolCall(Wire):
    id: str | None = None
    type: str | None = None
    function: FunctionCall | None = None


class Message(Wire):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | Parts | None = None
    name: str | None = None
    tool_calls: Annotated[list[ToolCall], Field(fail_fast=True)] | None = None
    tool_call_id: str | None = None
    function_call: FunctionCall | None = None
    refusal: str | None = None
    # Reasoning sent back in earlier assistant turns (vLLM, DeepSeek, Ollama, Qwen, gpt-oss).
    reasoning_content: str | None = None
    reasoning: str | None = None


class ChatRequest(Wire):
    model: str = Field(min_length=1)
    messages: list[Message] = Field(min_length=1, fail_fast=True)
    stream: bool | None = None
    n: int | None = Field(default=None, ge=1, le=128)

    def for_choice(self, index: int) -> ChatRequest:
        """The request a reply choice answers, which its output check judges it with: this one (a
        legacy completion with several prompts answers each prompt with its own choices)."""
        return self


class ChoiceMessage(Wire):
    role: str | None = None
    content: str | None = None
    tool_calls: list[ToolCall] | None = None
    function_call: FunctionCall | None = None
    refusal: str | None = None
    reasoning_content: str | None = None
    reasoning: str | None = None


class Choice(Wire):
    index: int = 0
    message: ChoiceMessage | None = None
    finish_reason: str | None = None


class ChatCompletion(Wire):
    id: str | None = None
    object: str | None = None
    created: int | None = None
    model: str | None = None
    choices: list[Choice] = Field(default_factory=list)


class RepeatedKey(ValueError):
    """A JSON object names one key twice, or two keys that differ only in case."""


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    # `map` over the method: a set comprehension's own frame costs more than the check (a stream
    # event is parsed here, 17 per short reply).
    if len(out) != len(pairs) or (len(out) > 1 and len(set(map(str.casefold, out))) != len(out)):
        seen: set[str] = set()
        for key, _ in pairs:
            if key.casefold() in seen:
                raise RepeatedKey(f"the key {key[:64]!r} appears twice in one object (ignoring case)")
            seen.add(key.casefold())
    return out


_DECODER = json.JSONDecoder(object_pairs_hook=_unique_keys)  # json.loads would build one per call


def loads(data: bytes | str) -> Any:
    """json.loads that refuses a key repeated in one object, also one that differs only in case:
    parsers differ on which one wins (the last, the first, or any case, as Go's does), so the proxy
    could screen one value while an upstream or a client reads the other."""
    if isinstance(data, bytes):  # as json.loads reads bytes
        data = data.decode(json.detect_encoding(data), "surrogatepass")
    return _DECODER.decode(data)


class TooManyObjects(ValueError):
    """A JSON text with more objects than a reader takes."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"more than {limit} JSON objects")
        self.limit = limit


def loads_bounded(data: bytes, max_objects: int) -> Any:
    """`loads` that stops at the object after `max_objects`: a body of a few megabytes can hold a
    hundred thousand tiny objects, which the request's wire types would then validate on the loop."""
    count = 0

    def unique_keys_counted(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        nonlocal count
        count += 1
        if count > max_objects:
            raise TooManyObjects(max_objects)
        return _unique_keys(pairs)

    text = data.decode(json.detect_encoding(data), "surrogatepass")
    return json.JSONDecoder(object_pairs_hook=unique_keys_counted).decode(text)


def error_body(message: str, type_: str, code: str | None, param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}
