"""What the output check reads of an upstream's reply: each choice's message, its `logprobs` and any
other choice field, then the reply's unknown top-level fields, which every choice's check sees (a
client may show them with whichever choice it prints). Streams read chunks with the same helpers."""

from __future__ import annotations

from typing import Any

from proxy.protocol import ChatCompletion, Choice, ChoiceMessage
from proxy.screening.collect import Reply, extra_text, reasoning_text, tool_call_text
from proxy.screening.logprobs import chat_logprobs_text


def reply_text(message: ChoiceMessage | None) -> str:
    if message is None:
        return ""
    parts = [*reasoning_text(message), message.content or "", *tool_call_text(message)]
    if message.refusal:
        parts.append(message.refusal)
    parts += reply_extra_text(message.model_extra)
    return "\n".join(p for p in parts if p)


# Top-level fields of a completion or chunk (chat or legacy) that carry no text a client shows as
# content: OpenAI's schema, `obfuscation` (random padding) and `error` (a non-null one is refused).
# Any other top-level field's strings are read with every choice's text.
COMPLETION_FIELDS = frozenset(
    {"id", "object", "created", "model", "system_fingerprint", "service_tier", "usage", "choices"}
    | {"obfuscation", "error"}
)


def top_text(reply: dict[str, Any]) -> list[str]:
    """The strings of a completion's (or chunk's) top-level fields outside COMPLETION_FIELDS."""
    return reply_extra_text({k: v for k, v in reply.items() if k not in COMPLETION_FIELDS})


def shown_fields(reply: dict[str, Any]) -> dict[str, Any]:
    """A completion (or chunk) without its unknown top-level fields: what a blocked reply may keep."""
    return {k: v for k, v in reply.items() if k in COMPLETION_FIELDS}


def reply_extra_text(extra: dict[str, Any] | None) -> list[str]:
    """`extra_text` of a reply's fields (JSON or stream): its `audio` carries base64 sound the guard
    cannot read, so there only the transcript is screened."""
    out = dict(extra or {})
    audio = out.get("audio")
    if isinstance(audio, dict):
        out["audio"] = {k: v for k, v in audio.items() if k != "data"}
    return extra_text(out)


def choice_text(choice: Choice) -> str:
    """A JSON reply's choice as the output check sees it: its message, what of its `logprobs` a client
    may show, and any other field's text (`text`, a stray `delta` ...)."""
    extra = {k: v for k, v in (choice.model_extra or {}).items() if k != "logprobs"}
    message = choice.message
    content = (message.content if message else None) or ""
    refusal = (message.refusal if message else None) or ""
    logprobs = chat_logprobs_text((choice.model_extra or {}).get("logprobs"), content, refusal)
    return "\n".join(t for t in [reply_text(message), " ".join(logprobs), *extra_text(extra)] if t)


def completion_replies(completion: ChatCompletion) -> list[Reply]:
    """Each choice's text followed by the completion's unknown top-level text; that text alone is
    choice 0's when there are no choices."""
    top = "\n".join(top_text(completion.model_extra or {}))
    replies = [Reply(c.index, "\n".join(t for t in (choice_text(c), top) if t)) for c in completion.choices]
    if not replies and top:
        replies.append(Reply(0, top))
    return replies
