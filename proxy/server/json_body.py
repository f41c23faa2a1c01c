"""Reading and parsing a client's JSON body safely, before anything else reads it: syntax, nesting depth and
text that no guard (and no UTF-8 upstream) can read are 400s, never a 500 or a guard failure."""

from __future__ import annotations

import json
import re
from typing import Any

from aiohttp import web
from pydantic import ValidationError

from proxy.errors import BadRequest, PayloadTooLarge, UnsupportedMediaType
from proxy.protocol import TooManyObjects, loads, loads_bounded
from proxy.server.connections import read_body
from proxy.server.state import SETTINGS


async def read_request(request: web.Request) -> tuple[bytes, dict[str, Any]]:
    settings = request.app[SETTINGS]
    if request.content_type != "application/json":
        raise UnsupportedMediaType(f"Expected Content-Type application/json, got {request.content_type or 'none'}.")
    if request.content_length is not None and request.content_length > settings.server.max_body_bytes:
        raise PayloadTooLarge(f"Request body is larger than {settings.server.max_body_bytes} bytes.")
    try:
        raw = await read_body(request)
    except web.HTTPRequestEntityTooLarge as exc:
        raise PayloadTooLarge(f"Request body is larger than {settings.server.max_body_bytes} bytes.") from exc
    server = settings.server
    payload = parse_json_object(raw, max_depth=server.max_json_depth, max_objects=server.max_json_objects)
    check_values_count(raw, payload, server.max_json_values)
    check_field_names(payload)
    return raw, payload


def check_values_count(raw: bytes, payload: dict[str, Any], max_values: int) -> None:
    """A 400 past `max_values` array entries and object members: unknown fields are kept as they came
    and their strings read value by value on the loop (400,000 empty arrays in 2 MB held it 2.6 s).
    Counted only where a cheap upper bound is over: each entry but a container's first follows a `,`
    (the byte is in every encoding json.detect_encoding accepts)."""
    if raw.count(b",") + raw.count(b"[") + raw.count(b"{") <= max_values:
        return
    level: list[Any] = [payload]
    count = 0
    while level:
        count += sum(map(len, level))
        if count > max_values:
            raise BadRequest(f"The JSON body holds more than {max_values} values (server.max_json_values).")
        level = [c for v in level for c in (v.values() if type(v) is dict else v) if type(c) in _CONTAINERS]


# OpenAI's request fields (and vLLM's, OpenRouter's ...) are lowercase ASCII snake_case.
_FIELD_NAME = re.compile(r"[a-z0-9_]+")


def check_field_names(payload: dict[str, Any]) -> None:
    """A 400 for a top-level field name outside lowercase ASCII: an upstream that matches names
    ignoring case (Go's encoding/json, which Ollama's OpenAI layer uses, folds `K` and `ſ` too) reads
    `Input` or `toolſ` as the `input` or `tools` the proxy never saw."""
    for key in payload:
        if not _FIELD_NAME.fullmatch(key):
            shown = key[:64].encode("ascii", "backslashreplace").decode()
            raise BadRequest(f"Unknown field name '{shown}': request field names are lowercase ASCII.")


def invalid(exc: ValidationError) -> BadRequest:
    """The 400 for a request body its wire type does not accept."""
    first = exc.errors()[0]
    param = error_param(first["loc"])
    return BadRequest(f"Invalid value for '{param}': {first['msg']}", param=param or None)


_UNION_TAGS = frozenset({"str", "int", "float", "bool", "list", "dict", "none", "TextPart", "ImagePart", "OtherPart"})


def error_param(loc: tuple[int | str, ...]) -> str:
    """`messages.0.content` from a pydantic location, without union member tags."""
    parts = []
    for part in loc:
        if isinstance(part, str) and (part in _UNION_TAGS or "[" in part or part.startswith("function-")):
            break
        parts.append(str(part))
    return ".".join(parts)


def parse_json_object(raw: bytes, *, max_depth: int, max_objects: int | None = None) -> dict[str, Any]:
    try:
        # Counting objects costs a call each: only where a cheap upper bound (every `{`) is over the limit.
        if max_objects is not None and raw.count(b"{") > max_objects:
            payload = loads_bounded(raw, max_objects)
        else:
            payload = loads(raw)
    except TooManyObjects as exc:
        raise BadRequest(f"The JSON body holds more than {exc.limit} objects (server.max_json_objects).") from exc
    except RecursionError as exc:
        raise BadRequest(f"The JSON body is nested too deeply (limit {max_depth}).") from exc
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadRequest(f"We could not parse the JSON body of your request: {exc}") from exc
    if not isinstance(payload, dict):
        raise BadRequest("The request body must be a JSON object.")
    check_values(payload, max_depth=max_depth, texts=may_hold_surrogates(raw))
    return payload


_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def may_hold_surrogates(raw: bytes) -> bool:
    """False when no string parsed from `raw` can hold a surrogate: strict UTF-8 without a `\\uD800`
    to `\\uDFFF` escape (a pair too: the string check decides then). Checking every string of a
    megabyte body on the loop took a second; these two scans take milliseconds."""
    if json.detect_encoding(raw) != "utf-8" or _SURROGATE_ESCAPE.search(raw) is not None:
        return True
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:  # loads reads it with surrogatepass: encoded surrogates become strings
        return True
    return False


def check_values(payload: Any, *, max_depth: int, texts: bool = True) -> None:
    """Walk every value once (iteratively): depth within the limit and, with `texts`, every string valid
    Unicode (a lone surrogate such as `\\ud800` is legal JSON but cannot be encoded, screened or sent)."""
    if not texts and _within_depth(payload, max_depth):
        return  # else the walk below names where it is too deep
    stack: list[tuple[Any, int, str]] = [(payload, 1, "")]
    while stack:
        value, depth, path = stack.pop()
        if isinstance(value, str):
            _check_text(value, path)
            continue
        if not isinstance(value, dict | list):
            continue
        if depth > max_depth:
            raise BadRequest(f"The JSON body is nested too deeply (limit {max_depth}).", param=path or None)
        items = value.items() if isinstance(value, dict) else enumerate(value)
        for key, item in items:
            if isinstance(key, str):
                _check_text(key, path)
            stack.append((item, depth + 1, f"{path}.{key}" if path else str(key)))


def _within_depth(payload: Any, max_depth: int) -> bool:
    """Whether no object or list lies deeper than `max_depth`, one level at a time: a level's scalars
    are skipped at C speed (loads builds plain dicts and lists)."""
    level, depth = [payload], 1
    while level:
        if depth > max_depth:
            return False
        level = [c for v in level for c in (v.values() if type(v) is dict else v) if type(c) in _CONTAINERS]
        depth += 1
    return True


_CONTAINERS = (dict, list)


def _check_text(text: str, path: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise BadRequest(
            "The request contains text that is not valid Unicode (a lone surrogate).", param=path or None
        ) from exc
