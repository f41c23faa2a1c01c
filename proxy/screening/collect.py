"""What gets screened: texts for Prompt Guard and the User/Agent conversation for Llama Guard.

Mapping to Llama Guard's format (reference §1.10): `user` -> User; `tool`/`function` results -> User
(third-party data entering the model is input, judged with the user's turn); `assistant` -> Agent
(its text plus tool-call arguments); `system`/`developer` are not part of the format and are dropped.
Consecutive turns of one speaker are merged with a blank line; leading Agent turns are dropped.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Iterable
from dataclasses import dataclass

from proxy.errors import BadRequest
from proxy.guards.guard import Image, ScreenText, Speaker, TextSource, Turn
from proxy.protocol import ChatRequest, ChoiceMessage, ImagePart, Message, TextPart

SPEAKER: dict[str, Speaker | None] = {
    "user": "User",
    "tool": "User",
    "function": "User",
    "assistant": "Agent",
    "system": None,
    "developer": None,
}


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
    if message.function_call is not None:
        out.append(f"{message.function_call.name or ''}({message.function_call.arguments or ''})")
    return out


def text_parts(message: Message) -> list[str]:
    if isinstance(message.content, str):
        return [message.content]
    if isinstance(message.content, list):
        return [part.text for part in message.content if isinstance(part, TextPart)]
    return []


def images_of(message: Message) -> list[ImagePart]:
    if isinstance(message.content, list):
        return [part for part in message.content if isinstance(part, ImagePart)]
    return []


def decode_image(part: ImagePart) -> Image | None:
    """Inline (data:) images are screened by multimodal guards; remote URLs are not fetched."""
    url = part.image_url.url
    if not url.startswith("data:"):
        return None
    header, _, payload = url.partition(",")
    if ";base64" not in header:
        raise BadRequest("image data URLs must be base64", param="messages")
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise BadRequest("an image data URL is not valid base64", param="messages") from exc
    return Image(data=data, media_type=header[5:].split(";")[0] or "image/png")


def message_text(message: Message) -> str:
    return "\n".join(t for t in [*text_parts(message), *tool_call_text(message)] if t)


def screen_texts(request: ChatRequest, roles: Iterable[str]) -> list[ScreenText]:
    """Each text a Prompt Guard check scores, separately (scores are per text; max over texts)."""
    wanted = set(roles)
    out: list[ScreenText] = []
    for message in request.messages:
        if message.role not in wanted and not (message.role == "function" and "tool" in wanted):
            continue
        source: TextSource = "user" if message.role in ("user", "system", "developer") else "third_party"
        texts = text_parts(message) + (tool_call_text(message) if message.role == "assistant" else [])
        out.extend(ScreenText(t, source) for t in texts if t.strip())
    return out


def _merge(turns: list[Turn]) -> list[Turn]:
    merged: list[Turn] = []
    for turn in turns:
        if not turn.text.strip() and not turn.images:
            continue
        if merged and merged[-1].speaker == turn.speaker:
            prev = merged[-1]
            text = f"{prev.text.strip()}\n\n{turn.text.strip()}".strip()
            merged[-1] = Turn(prev.speaker, text, prev.images + turn.images)
        elif merged or turn.speaker == "User":
            merged.append(turn)
    return merged


def conversation(request: ChatRequest, *, include_system: bool = False) -> list[Turn]:
    turns = []
    for message in request.messages:
        speaker = SPEAKER[message.role] or ("User" if include_system else None)
        if speaker is None:
            continue
        images = tuple(img for img in (decode_image(p) for p in images_of(message)) if img is not None)
        turns.append(Turn(speaker, message_text(message), images if speaker == "User" else ()))
    return _merge(turns)


def input_conversation(request: ChatRequest, *, include_system: bool = False) -> list[Turn]:
    """The conversation up to and including the last User turn (the input check's subject)."""
    turns = conversation(request, include_system=include_system)
    while turns and turns[-1].speaker != "User":
        turns.pop()
    return turns


def output_conversation(request: ChatRequest, reply: Reply, *, include_system: bool = False) -> list[Turn]:
    return _merge([*conversation(request, include_system=include_system), Turn("Agent", reply.text)])


def reply_text(message: ChoiceMessage | None) -> str:
    if message is None:
        return ""
    parts = [message.content or "", *tool_call_text(message)]
    if message.refusal:
        parts.append(message.refusal)
    return "\n".join(p for p in parts if p)


def count_limits(request: ChatRequest) -> tuple[int, int]:
    """(characters, images) over every message the model will read."""
    chars = images = 0
    for message in request.messages:
        chars += sum(len(t) for t in text_parts(message)) + sum(len(t) for t in tool_call_text(message))
        images += len(images_of(message))
    return chars, images
