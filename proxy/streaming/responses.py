"""Reading and answering a Responses API reply (`POST /v1/responses`): the text the output check reads
from a response object or its typed SSE events, the held stream that ends at `response.completed`
(or `.incomplete`), and what a blocked response looks like, as OpenAI sends filtered content: one
assistant message with the refusal, `status: "incomplete"`, `incomplete_details.reason: "content_filter"`.

A reply's text is every delta accumulated per output item part, plus any full text that a `*.done`
event, an output item or the final response states and that differs from those deltas: a client
may render either, so both are screened. Strings in fields the proxy does not know are screened too.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

from proxy.screening.collect import Reply, extra_text
from proxy.screening.logprobs import token_entries_text
from proxy.streaming.buffered import HeldStream, replay
from proxy.streaming.reply import Added, TextPieces, UpstreamReported
from proxy.streaming.shape import MalformedReply, items, mapping, reply_object, text_of, token
from proxy.streaming.sse import Event, MalformedStream, frame_data

MAX_OUTPUT_ITEMS = 4096
# Event and item fields that locate or identify, or are opaque to the client: never text it reads
# (`obfuscation` is random padding, `logprobs` are read apart, `encrypted_content` only the upstream reads).
_META = frozenset(
    {
        "type", "sequence_number", "output_index", "content_index", "summary_index", "item_id", "id",
        "status", "call_id", "role", "phase", "logprobs", "obfuscation", "encrypted_content",
        "annotation_index", "partial_image_index",
    }
)  # fmt: skip
# A response object's fields that hold no text the model wrote: ids, settings, and echoes of the request.
# `output` is read item by item; every other field's strings are screened (`output_text`, unknown ones),
# and only these are kept in a refused response.
RESPONSE_FIELDS = frozenset(
    {
        "id", "object", "created_at", "completed_at", "status", "model", "output", "instructions", "metadata",
        "parallel_tool_calls", "temperature", "top_p", "top_logprobs", "tool_choice", "tools", "background",
        "conversation", "max_output_tokens", "max_tool_calls", "previous_response_id", "prompt",
        "prompt_cache_key", "prompt_cache_retention", "reasoning", "safety_identifier", "service_tier",
        "store", "text", "truncation", "usage", "user",
    }
)  # fmt: skip
_ENDS = frozenset({"response.completed", "response.incomplete"})
_PAYLOADS = frozenset({"response", "item", "part"})  # read by ResponseText.response / .item / .part
# Where each kind of text is kept: the stem of its `.delta` / `.done` events.
TEXT, REFUSAL, ARGUMENTS = "response.output_text", "response.refusal", "response.function_call_arguments"
SUMMARY, REASONING = "response.reasoning_summary_text", "response.reasoning_text"
_PART_TEXT = {
    "output_text": (TEXT, "text"),
    "refusal": (REFUSAL, "refusal"),
    "reasoning_text": (REASONING, "text"),
    "summary_text": (SUMMARY, "text"),
}

Key = tuple[int, str, int]
"""(output index, what text, part index)"""


class ResponseText:
    """The reply's text as the output check reads it (see the module's docstring)."""

    def __init__(self) -> None:
        self.deltas: dict[Key, TextPieces] = {}
        self.finals: dict[Key, dict[str, None]] = {}
        self.arrived = TextPieces()
        """Every output_text delta in the order it came, as a client printing them shows them."""

    def delta(self, key: Key, text: str) -> None:
        if text:
            held = self.deltas.get(key)
            if held is None:
                held = self.deltas[key] = TextPieces()
            held.add(text)
            if key[1] == TEXT:
                self.arrived.add(text)

    def final(self, key: Key, *texts: str) -> None:
        for text in texts:
            if text:
                self.finals.setdefault(key, {})[text] = None

    def text(self) -> str:
        # The output_text parts of every message, joined with nothing between as the SDK's `output_text`
        # joins them (a word split across parts or messages is one word to a client), and as they came.
        joined, out = [], []
        for key in sorted({*self.deltas, *self.finals}):
            held = self.deltas.get(key)
            streamed = held.value() if held is not None else ""
            finals = [t for t in self.finals.get(key, {}) if t != streamed]
            if key[1] == TEXT:
                joined.append(streamed or (finals.pop(0) if finals else ""))
                out += finals
            else:
                out += [streamed, *finals]
        shown, arrived = "".join(joined), self.arrived.value()
        return "\n".join(t for t in [shown, arrived if arrived != shown else "", *out] if t)

    def item(self, o: int, item: Any, at: str) -> None:
        """An output item's text, whatever its type."""
        item = mapping(item, at)
        kind = item.get("type")
        if kind == "message":
            for c, part in enumerate(items(item.get("content"), f"{at}.content")):
                self.part(o, c, part, f"{at}.content[{c}]")
        elif kind == "function_call":
            self.final((o, ARGUMENTS, 0), text_of(item, "arguments", at))
            self.final((o, "name", 0), text_of(item, "name", at))
        elif kind == "reasoning":
            for key, stem in (("summary", SUMMARY), ("content", REASONING)):
                for j, part in enumerate(items(item.get(key), f"{at}.{key}")):
                    self.final((o, stem, j), text_of(mapping(part, f"{at}.{key}[{j}]"), "text", f"{at}.{key}[{j}]"))
        known = {"message": ("content",), "function_call": ("arguments", "name"), "reasoning": ("summary", "content")}
        skip = _META.union(known.get(kind, ()))
        self.final((o, "item", 0), *extra_text({k: v for k, v in item.items() if k not in skip}))

    def part(self, o: int, c: int, part: Any, at: str) -> None:
        part = mapping(part, at)
        stem, key = _PART_TEXT.get(part.get("type"), ("part", ""))
        if key:
            self.final((o, stem, c), text_of(part, key, at))
        self.final((o, "logprobs", c), logprobs_text(part.get("logprobs"), part.get(key) if key else None))
        # annotations (citation titles, URLs) and any other field's strings
        self.final((o, "part", c), *extra_text({k: v for k, v in part.items() if k not in _META and k != key}))

    def response(self, response: dict[str, Any], at: str) -> None:
        for o, item in enumerate(items(response.get("output"), f"{at}.output")):
            self.item(o, item, f"{at}.output[{o}]")
        # The `output_text` shortcut some upstreams add, and any field the API does not define.
        other = {k: v for k, v in response.items() if k not in RESPONSE_FIELDS}
        self.final((MAX_OUTPUT_ITEMS, "response", 0), *extra_text(other))


def logprobs_text(logprobs: Any, text: Any) -> str:
    """What a client may show of a text's `logprobs` (chat's token-entry shape, proxy/screening/logprobs.py)."""
    return " ".join(token_entries_text(logprobs, text if isinstance(text, str) else ""))


def _index(event: dict[str, Any], key: str, limit: int = MAX_OUTPUT_ITEMS) -> int:
    value = event.get(key, 0)
    if type(value) is not int or not 0 <= value < limit:
        raise MalformedReply(f"{key} is not an integer from 0 to {limit - 1}")
    return value


def _sub(event: dict[str, Any]) -> int:
    """The part an event is about: a content part, or a reasoning summary part."""
    return _index(event, "content_index" if "content_index" in event else "summary_index")


@dataclass
class ResponsesStream(HeldStream):
    """A held Responses stream: events kept re-framed as `event: <type>` + data, read to its end."""

    text: ResponseText = field(default_factory=ResponseText)
    response: dict[str, Any] = field(default_factory=dict)
    """The latest response object (`response.created` ... `response.completed`)."""
    _type: str = ""
    END: ClassVar[str] = "response.completed"

    def replies(self) -> list[Reply]:
        return [Reply(0, self.text.text())]

    def finish(self) -> None:
        raise MalformedStream("the upstream ended a Responses stream with [DONE] before response.completed")

    def keep(self, event: Event, added: list[Added]) -> None:
        if event.data is not None and not event.done:
            self.frames += b"event: " + self._type.encode() + b"\n" + frame_data(event.data)
            self.ends.append(len(self.frames))

    def _read(self, chunk: dict[str, Any]) -> list[Added]:
        kind = token(chunk.get("type"))
        if kind is None or kind.isdigit():
            raise MalformedReply("a Responses stream event has no plain `type`")
        self._type = kind
        if kind == "error":
            raise UpstreamReported(chunk)
        if kind == "response.failed":
            raise UpstreamReported(mapping(chunk.get("response"), "response").get("error"))
        o = _index(chunk, "output_index")
        # Every payload an event carries is read, whatever its type names: a client may read any of
        # them (an `item` beside a `delta` would otherwise hide the delta from the check).
        if "response" in chunk:
            self.response = mapping(chunk["response"], "response")
            self.id = self.id or (self.response.get("id") if isinstance(self.response.get("id"), str) else None)
            self.text.response(self.response, "response")  # its output is empty until the end, as a rule
            self.done = kind in _ENDS
            if self.done and self.response.get("error") is not None:  # as a JSON reply: never relayed
                raise MalformedReply(f"{kind} carries an error")
        if "item" in chunk:
            self.text.item(o, chunk["item"], "item")
        if "part" in chunk:
            self.text.part(o, _sub(chunk), chunk["part"], "part")
        self._text_event(kind, o, chunk)
        return []

    def _text_event(self, kind: str, o: int, chunk: dict[str, Any]) -> None:
        stem, _, last = kind.rpartition(".")
        sub = _sub(chunk)
        rest = {k: v for k, v in chunk.items() if k not in _META and k not in _PAYLOADS}
        if stem == "response.audio":
            return  # base64 sound, not text; its transcript comes in response.audio.transcript.*
        said = chunk.get("delta", chunk.get("text"))
        self.text.final((o, "logprobs", sub), logprobs_text(chunk.get("logprobs"), said))
        if last == "delta" and isinstance(rest.get("delta"), str):
            self.text.delta((o, stem, sub), rest.pop("delta"))
        self.text.final((o, stem if last == "done" else kind, sub), *extra_text(rest))


def read_response(body: bytes) -> tuple[dict[str, Any], list[Reply]]:
    """A JSON response object and its one reply (MalformedReply when it cannot be read)."""
    response = reply_object(body)
    text = ResponseText()
    text.response(response, "response")
    return response, [Reply(0, text.text())]


def base_response(model: str, *, id_: str, created: int) -> dict[str, Any]:
    """The response object of the proxy's own refusal (a blocked input: no upstream response)."""
    usage = {"input_tokens": 0, "input_tokens_details": {"cached_tokens": 0}, "output_tokens": 0}
    usage |= {"output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": 0}
    return {
        "id": id_,
        "object": "response",
        "created_at": created,
        "model": model,
        "output": [],
        "parallel_tool_calls": True,
        "tool_choice": "auto",
        "tools": [],
        "usage": usage,
    }


def refusal_message(response: dict[str, Any], refusal: str, *, structured: bool = False) -> dict[str, Any]:
    """An output_text part, or for a structured-output request (`text.format` json_schema) a
    `refusal` part, as OpenAI's own refusals: a client parsing the text as JSON gets no bad JSON."""
    rid = response.get("id")
    suffix = rid.removeprefix("resp_") if isinstance(rid, str) and token(rid) else "guardrail"
    part: dict[str, Any] = {"type": "output_text", "text": refusal, "annotations": [], "logprobs": []}
    if structured:
        part = {"type": "refusal", "refusal": refusal}
    return {"id": f"msg_{suffix}", "type": "message", "role": "assistant", "status": "completed", "content": [part]}


def refused(response: dict[str, Any], refusal: str, *, structured: bool = False) -> dict[str, Any]:
    """`response` (an upstream's or base_response) answered with the refusal, as OpenAI answers
    filtered content; its output, and any `output_text` shortcut an upstream added, are gone."""
    out = {k: v for k, v in response.items() if k in RESPONSE_FIELDS}
    out |= {"status": "incomplete", "incomplete_details": {"reason": "content_filter"}, "error": None}
    return out | {"output": [refusal_message(response, refusal, structured=structured)]}


def refusal_events(response: dict[str, Any], refusal: str, *, structured: bool = False) -> list[bytes]:
    """The whole stream of a refused response: the events OpenAI sends for one text message, ending
    with `response.incomplete`; sequence numbers from 0."""
    final = refused(response, refusal, structured=structured)
    message = final["output"][0]
    part = message["content"][0]
    started = {**final, "status": "in_progress", "incomplete_details": None, "output": []}
    opened = {**message, "status": "in_progress", "content": []}
    stem, field = (REFUSAL, "refusal") if structured else (TEXT, "text")
    logprobs: dict[str, Any] = {} if structured else {"logprobs": []}
    at = {"item_id": message["id"], "output_index": 0, "content_index": 0}
    events: list[dict[str, Any]] = [
        {"type": "response.created", "response": started},
        {"type": "response.in_progress", "response": started},
        {"type": "response.output_item.added", "output_index": 0, "item": opened},
        {"type": "response.content_part.added", **at, "part": {**part, field: ""}},
        {"type": f"{stem}.delta", **at, "delta": refusal, **logprobs},
        {"type": f"{stem}.done", **at, field: refusal, **logprobs},
        {"type": "response.content_part.done", **at, "part": part},
        {"type": "response.output_item.done", "output_index": 0, "item": message},
        {"type": "response.incomplete", "response": final},
    ]
    return [encode_event({**event, "sequence_number": n}) for n, event in enumerate(events)]


def encode_event(event: dict[str, Any]) -> bytes:
    data = json.dumps(event, separators=(",", ":"), ensure_ascii=False)
    return f"event: {event['type']}\n".encode() + frame_data(data)


def replay_response(held: HeldStream, blocked: set[int], refusal: str, *, structured: bool = False) -> Iterator[bytes]:
    """The held events as they came, or (blocked) only the refusal's: no upstream event of a blocked
    reply reaches the client, its response id and model aside."""
    if not blocked:
        return replay(held, set(), refusal)
    response = held.response if isinstance(held, ResponsesStream) else {}
    return iter(refusal_events(response or {"object": "response", "output": []}, refusal, structured=structured))
