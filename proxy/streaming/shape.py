"""The shape of an upstream reply, checked where the output check reads it: a streamed chunk's
choices and deltas, or a JSON completion's choices and messages.

A field that carries text a client shows is read as text; one whose shape the proxy cannot read
with certainty (object-valued tool-call arguments, unknown content parts, an index that is not a
small integer) is a MalformedReply, answered with 502 or a final error event, never relayed.
Object-valued `arguments` are refused rather than screened as their JSON: a client may render them
in any form, so no one serialisation is what it shows. Only a 200 reply is read at all.
"""

from __future__ import annotations

import re
from typing import Any

from proxy.errors import UpstreamError
from proxy.protocol import loads
from proxy.screening.collect import TEXT_PART_FIELDS, extra_text
from proxy.screening.completion import reply_extra_text

MAX_CHOICES = 128  # the most choices a request may ask for (`n`)
MAX_TOOL_CALLS = 1024
# Delta and message fields read as text below; strings in any other field are screened as extra text.
KNOWN_FIELDS = frozenset(
    {"role", "content", "refusal", "reasoning_content", "reasoning", "tool_calls", "function_call"}
)
# Choice fields that are not read as extra text: `logprobs` is read apart (proxy/screening/logprobs.py),
# against the text it came with.
CHOICE_FIELDS = frozenset({"index", "delta", "finish_reason", "logprobs"})
_CALL_FIELDS = frozenset({"index", "id", "type", "function"})
_TOKEN = re.compile(r"[A-Za-z0-9_.-]{1,64}")


class MalformedReply(Exception):
    """The upstream's reply is not a chat completion the proxy can read with certainty."""


def index_of(obj: dict[str, Any], where: str, limit: int = MAX_CHOICES) -> int:
    value = obj.get("index", 0)
    if type(value) is not int or not 0 <= value < limit:
        raise MalformedReply(f"{where}.index is not an integer from 0 to {limit - 1}")
    return value


def mapping(value: Any, where: str) -> dict[str, Any]:
    """An object, or {} for null / absent."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise MalformedReply(f"{where} is not an object")
    return value


def items(value: Any, where: str) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise MalformedReply(f"{where} is not a list")
    return value


def text_of(obj: dict[str, Any], key: str, where: str) -> str:
    value = obj.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise MalformedReply(f"{where}.{key} is not a string")
    return value


def content_text(value: Any, where: str) -> str:
    """A content string, or the text of a list of text parts (any other part: refused)."""
    if value is None or isinstance(value, str):
        return value or ""
    texts = []
    for p, part in enumerate(items(value, f"{where}.content")):
        at = f"{where}.content[{p}]"
        part = mapping(part, at)
        field = TEXT_PART_FIELDS.get(part.get("type"))  # type: ignore[arg-type]
        if field is None:
            raise MalformedReply(f"{at} is not a text part the proxy can screen")
        texts.append(text_of(part, field, at))
        texts += extra_text({k: v for k, v in part.items() if k not in ("type", field)})
    return "".join(texts)


def tool_calls_of(obj: dict[str, Any], where: str, *, indexed: bool) -> list[tuple[int, str, str]]:
    """(index, name, arguments) of each tool call; object-valued arguments are refused."""
    out = []
    for c, call in enumerate(items(obj.get("tool_calls"), f"{where}.tool_calls")):
        at = f"{where}.tool_calls[{c}]"
        call = mapping(call, at)
        index = index_of(call, at, MAX_TOOL_CALLS) if indexed else c
        fn = mapping(call.get("function"), f"{at}.function")
        # Custom tools ({"type": "custom", "custom": {"name", "input"}}) and any other field of a call
        # carry text a client shows: it is read with the call's arguments.
        rest = extra_text({k: v for k, v in call.items() if k not in _CALL_FIELDS})
        rest += extra_text({k: v for k, v in fn.items() if k not in ("name", "arguments")})
        arguments = text_of(fn, "arguments", f"{at}.function") + "".join(rest)
        out.append((index, text_of(fn, "name", f"{at}.function"), arguments))
    if "function_call" in obj:
        at = f"{where}.function_call"
        fn = mapping(obj["function_call"], at)
        if fn:
            out.append((-1, text_of(fn, "name", at), text_of(fn, "arguments", at)))
    return out


def other_text(obj: dict[str, Any], known: frozenset[str]) -> dict[str, list[str]]:
    """Strings in fields the protocol does not name, by field (a client may show them)."""
    out = {}
    for key, value in obj.items():
        if key in known:
            continue
        texts = reply_extra_text({key: value})
        if texts:
            out[key] = texts
    return out


def token(value: Any) -> str | None:
    """An upstream's error `type` / `code`, kept only when it is a short plain token."""
    if type(value) is int:
        value = str(value)
    return value if isinstance(value, str) and _TOKEN.fullmatch(value) else None


def check_completion(body: Any) -> None:
    """A JSON chat completion the output check can read: choices with distinct small indexes and
    messages whose text fields are strings (the protocol models read the text afterwards)."""
    if not isinstance(body, dict):
        raise MalformedReply("the reply is not a JSON object")
    if "error" in body and body["error"] is not None:
        raise MalformedReply("a 200 reply carries an error")
    seen: set[int] = set()
    choices = body.get("choices")
    if not isinstance(choices, list):
        raise MalformedReply("choices is not a list")
    for n, choice in enumerate(choices):
        at = f"choices[{n}]"
        choice = mapping(choice, at)
        index = index_of(choice, at)
        if index in seen:
            raise MalformedReply(f"two choices have index {index}")
        seen.add(index)
        message = mapping(choice.get("message"), f"{at}.message")
        content_text(message.get("content"), f"{at}.message")
        for key in ("refusal", "reasoning_content", "reasoning"):
            text_of(message, key, f"{at}.message")
        tool_calls_of(message, f"{at}.message", indexed=False)


def reply_object(body: bytes) -> dict[str, Any]:
    """A 200 reply's JSON object, of any wire format (MalformedReply when it is not JSON, not an
    object, or carries an error)."""
    try:
        reply = loads(body)
    except (ValueError, RecursionError) as exc:
        raise MalformedReply("the reply is not JSON") from exc
    if not isinstance(reply, dict):
        raise MalformedReply("the reply is not a JSON object")
    if reply.get("error") is not None:
        raise MalformedReply("a 200 reply carries an error")
    return reply


def parse_completion(body: bytes) -> Any:
    """A JSON reply's body parsed and its shape checked (MalformedReply otherwise)."""
    try:
        completion = loads(body)
    except (ValueError, RecursionError) as exc:
        raise MalformedReply("the reply is not JSON") from exc
    check_completion(completion)
    return completion


def unrelayable_status(status: int) -> UpstreamError | None:
    """Only 200 is read and screened and only 4xx/5xx errors are relayed as they are: any other
    status (1xx, 201-299, 3xx) carries a body nobody checked."""
    if status == 200 or 400 <= status < 600:
        return None
    return UpstreamError(f"The upstream answered with HTTP {status}, which the proxy does not relay.")
