"""What gets screened: texts for Prompt Guard and the User/Agent conversation for Llama Guard.

Mapping to Llama Guard's format (reference §1.10): `user` -> User; `tool`/`function` results -> User
(third-party data entering the model is input, judged with the user's turn); `assistant` -> Agent
(its text, reasoning and tool-call arguments); `system`/`developer` are not part of the format and
are dropped. Consecutive turns of one speaker are merged with a blank line; a leading Agent turn is
judged as User text (as llama-stack does), so no turn a model reads goes unscreened.

Completeness: every field that carries text a model reads is collected here (content strings, text
parts of every text type, reasoning, tool-call arguments, unknown message fields' strings); a part
type that cannot be screened is refused unless the route lets it through (`unscreened_parts`).
Guards see the normalised copy (see normalize.py); the forwarded body is never changed.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from pydantic import Field

from proxy.errors import BadRequest
from proxy.guards.guard import Image, ScreenText, Speaker, TextSource, Turn
from proxy.protocol import ChatRequest, ChoiceMessage, ContentPart, ImagePart, Message, OtherPart, TextPart
from proxy.screening.normalize import guard_view

SPEAKER: dict[str, Speaker | None] = {
    "user": "User",
    "tool": "User",
    "function": "User",
    "assistant": "Agent",
    "system": None,
    "developer": None,
}

# Part types whose text a model reads (vLLM reads all of these as text) -> the field holding it.
TEXT_PART_FIELDS = {
    "text": "text",
    "input_text": "text",
    "output_text": "text",
    "thinking": "thinking",
    "refusal": "refusal",
}
IMAGE_PART_TYPES = frozenset({"image_url"})
# Keys of unknown fields whose values are identifiers or binary payloads, not text a model reads.
_NOT_TEXT_KEYS = frozenset({"id", "type", "tool_call_id", "expires_at"})
# Opaque to everyone but the upstream that made it (a reasoning block's base64 signature).
_OPAQUE_KEYS = frozenset({"signature"})
# A key, or a _NOT_TEXT_KEYS value, that is one identifier names something: any other string there is
# text a template may render or a client show (`{"a recipe for ...": 1}`, `{"id": "a recipe ..."}`).
_IDENTIFIER = re.compile(r"[A-Za-z0-9_.:-]{0,64}")


class ThreadedRequest(ChatRequest):
    """A request that continues a conversation the upstream keeps (Responses `previous_response_id`,
    `conversation`): `context` holds its earlier turns as they were screened then. Llama Guard judges
    the request's own turns after them; Prompt Guard and the route's limits see only the request."""

    context: tuple[Turn, ...] = Field(default=(), exclude=True)


@dataclass(frozen=True)
class Reply:
    """One choice of the upstream's reply, as the output check sees it."""

    index: int
    text: str


def tool_call_text(message: Message | ChoiceMessage) -> list[str]:
    out = []
    for call in message.tool_calls or []:
        if call.function is not None:
            out.append(f"{call.function.name or ''}({call.function.arguments or ''})")
            out += extra_text(call.function.model_extra)
        # Custom tools ({"type": "custom", "custom": {"name", "input"}}) and flat name/arguments.
        out += extra_text(call.model_extra)
    if message.function_call is not None:
        out.append(f"{message.function_call.name or ''}({message.function_call.arguments or ''})")
    return out


def reasoning_text(message: Message | ChoiceMessage) -> list[str]:
    return [t for t in (message.reasoning_content, message.reasoning) if t]


def extra_text(extra: dict[str, Any] | None) -> list[str]:
    """Every string inside fields the protocol models do not name: a template may render them."""
    out: list[str] = []
    stack: list[tuple[str, Any]] = _with_keys(extra or {})
    while stack:
        key, value = stack.pop()
        if key in _OPAQUE_KEYS:
            continue
        if isinstance(value, str):
            if value and not (key in _NOT_TEXT_KEYS and _IDENTIFIER.fullmatch(value)):
                out.append(value)
        elif isinstance(value, dict):
            stack.extend(_with_keys(value))
        elif isinstance(value, list):
            stack.extend((key, v) for v in value)
    return out[::-1]


def _with_keys(obj: dict[str, Any]) -> list[tuple[str, Any]]:
    """An object's items, each after its key as text where the key is no identifier."""
    return [p for k, v in obj.items() for p in ((("", k), (k, v)) if not _IDENTIFIER.fullmatch(k) else ((k, v),))]


def part_text(part: ContentPart) -> str | None:
    """The text of a text-bearing part, None for images and other kinds."""
    if isinstance(part, TextPart):
        return part.text
    if isinstance(part, OtherPart) and part.type in TEXT_PART_FIELDS:
        value = (part.model_extra or {}).get(TEXT_PART_FIELDS[part.type])
        return value if isinstance(value, str) else None
    return None


def text_parts(message: Message) -> list[str]:
    if isinstance(message.content, str):
        return [message.content]
    if isinstance(message.content, list):
        return [t for t in (part_text(p) for p in message.content) if t is not None]
    return []


def images_of(message: Message) -> list[ImagePart]:
    if isinstance(message.content, list):
        return [part for part in message.content if isinstance(part, ImagePart)]
    return []


def unscreened_parts(request: ChatRequest, allowed: Iterable[str]) -> list[str]:
    """The part types that reach the model unscreened because the route allows them; any other
    part the proxy cannot read as text or image is a 400 naming where it is."""
    refuse_unscreenable(request)
    allowed = set(allowed)
    passed: list[str] = []
    for m, message in enumerate(request.messages):
        if not isinstance(message.content, list):
            continue
        for p, part in enumerate(message.content):
            if isinstance(part, TextPart | ImagePart):
                continue
            if part.type in TEXT_PART_FIELDS:
                if part_text(part) is None:
                    field = TEXT_PART_FIELDS[part.type]
                    raise BadRequest(
                        f"Content part type '{part.type}' needs a string '{field}'.",
                        param=f"messages.{m}.content.{p}.{field}",
                    )
                continue
            if part.type in IMAGE_PART_TYPES:
                raise BadRequest("An image_url part needs image_url.url.", param=f"messages.{m}.content.{p}")
            if part.type not in allowed:
                raise BadRequest(
                    f"Content part type '{part.type[:64]}' cannot be screened; this route does not accept it.",
                    param=f"messages.{m}.content.{p}.type",
                )
            passed.append(part.type)
    return sorted(set(passed))


def decode_image(part: ImagePart) -> Image | None:
    """Inline (data:) images are screened by multimodal guards; remote URLs are not fetched."""
    url = part.image_url.url.lstrip()
    if url[:5].lower() != "data:":  # URL schemes are case-insensitive (servers read DATA: inline too)
        return None
    header, _, payload = url.partition(",")
    if ";base64" not in header:
        raise BadRequest("image data URLs must be base64", param="messages")
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise BadRequest("an image data URL is not valid base64", param="messages") from exc
    return Image(data=data, media_type=header[5:].split(";")[0] or "image/png")


def message_texts(message: Message) -> list[str]:
    """Everything of one message a model reads as text, in reading order."""
    texts = [message.name or "", *reasoning_text(message), *text_parts(message)]
    if message.refusal:
        texts.append(message.refusal)
    texts += tool_call_text(message)
    texts += extra_text(message.model_extra)
    return [t for t in texts if t]


def message_text(message: Message) -> str:
    return "\n".join(message_texts(message))


# Request fields the application writes for the model (trusted like system text, screened with it):
# tool and function definitions, the response schema, a predicted output.
DEFINITION_FIELDS = ("tools", "functions", "response_format", "prediction")
# Request fields of third-party text a serving engine puts in the prompt (vLLM's RAG `documents`,
# template variables): untrusted, screened like tool results.
DOCUMENT_FIELDS = ("documents", "chat_template_kwargs")
# A request-supplied template decides what the model reads: the proxy cannot screen that.
UNSCREENABLE_FIELDS = ("chat_template",)
# Which policy role a message role counts as (`developer` is the newer name of `system`).
POLICY_ROLE = {"developer": "system", "function": "tool"}


def definition_texts(request: ChatRequest) -> list[str]:
    return _field_texts(request, DEFINITION_FIELDS)


def document_texts(request: ChatRequest) -> list[str]:
    return _field_texts(request, DOCUMENT_FIELDS)


def _field_texts(request: ChatRequest, fields: tuple[str, ...]) -> list[str]:
    extra = request.model_extra or {}
    return extra_text({field: extra[field] for field in fields if field in extra})


def refuse_unscreenable(request: ChatRequest) -> None:
    for field in UNSCREENABLE_FIELDS:
        if field in (request.model_extra or {}):
            raise BadRequest(f"'{field}' cannot be screened: this proxy does not accept it.", param=field)


def screen_texts(request: ChatRequest, roles: Iterable[str]) -> list[ScreenText]:
    """Each text a Prompt Guard check scores, separately (scores are per text; max over texts)."""
    wanted = set(roles)
    texts: list[tuple[str, TextSource]] = []
    if "system" in wanted:
        texts += [(text, "user") for text in definition_texts(request)]
    if "tool" in wanted:
        texts += [(text, "third_party") for text in document_texts(request)]
    for message in request.messages:
        if POLICY_ROLE.get(message.role, message.role) not in wanted:
            continue
        source: TextSource = "user" if message.role in ("user", "system", "developer") else "third_party"
        texts += [(text, source) for text in message_texts(message)]
    out = []
    for text, source in texts:
        view = guard_view(text)
        if view.strip():
            out.append(ScreenText(view, source))
    return out


def _merge(turns: Iterable[Turn]) -> list[Turn]:
    merged: list[Turn] = []
    for turn in turns:
        if not turn.text.strip() and not turn.images:
            continue
        if merged and merged[-1].speaker == turn.speaker:
            prev = merged[-1]
            text = f"{prev.text.strip()}\n\n{turn.text.strip()}".strip()
            merged[-1] = Turn(prev.speaker, text, prev.images + turn.images)
        else:
            merged.append(turn)
    return merged


def _turns(request: ChatRequest, include_system: bool) -> Iterator[Turn]:
    if isinstance(request, ThreadedRequest):
        yield from request.context
    if include_system:
        yield Turn("User", guard_view("\n".join(definition_texts(request))))
    yield Turn("User", guard_view("\n".join(document_texts(request))))
    for message in request.messages:
        speaker = SPEAKER[message.role] or ("User" if include_system else None)
        if speaker is None:
            continue
        images = tuple(img for img in (decode_image(p) for p in images_of(message)) if img is not None)
        yield Turn(speaker, guard_view(message_text(message)), images if speaker == "User" else ())


def conversation(request: ChatRequest, *, include_system: bool = False) -> list[Turn]:
    """The request's turns; a leading Agent turn is judged as User text (the format starts with User)."""
    turns = _merge(_turns(request, include_system))
    if turns and turns[0].speaker == "Agent":
        turns[0] = Turn("User", turns[0].text, turns[0].images)
        turns = _merge(turns)
    return turns


def input_conversations(request: ChatRequest, *, include_system: bool = False) -> list[list[Turn]]:
    """What the input check judges: the conversation up to its last User turn and, when assistant
    turns follow that (a prefill the model continues from), also the whole conversation, so that
    its last Agent turn is assessed before it goes upstream."""
    full = conversation(request, include_system=include_system)
    upto = list(full)
    while upto and upto[-1].speaker != "User":
        upto.pop()
    subjects = [upto] if upto else []
    if full and full[-1].speaker == "Agent":
        subjects.append(full)
    return subjects


def output_conversation(request: ChatRequest, reply: Reply, *, include_system: bool = False) -> list[Turn]:
    """The conversation plus the reply as the last Agent turn; empty when the reply has no text."""
    return with_reply(conversation(request, include_system=include_system), reply.text)[0]


def with_reply(turns: list[Turn], reply: str, endings: Iterable[str] = ("",)) -> list[list[Turn]]:
    """`turns` (a `conversation`) plus `reply` and each of `endings` as the last Agent turn (the
    reply read once); empty where that has no text."""
    text = guard_view(reply)
    return [_merge([*turns, Turn("Agent", text + end)]) if (text + end).strip() else [] for end in endings]


def count_limits(request: ChatRequest) -> tuple[int, int]:
    """(characters, images) over every message the model will read."""
    chars = sum(len(t) for t in [*definition_texts(request), *document_texts(request)])
    images = 0
    for message in request.messages:
        chars += sum(len(t) for t in message_texts(message))
        images += len(images_of(message))
    return chars, images
