"""The legacy completions reply (`object: "text_completion"`) where the output check reads it and where
a refusal replaces it: a JSON reply's choices, a held stream's chunks, and the proxy's own refusals.

A choice's `text` is read as its content and every other field's strings as extra text (as chat
reads a choice); of `logprobs`, the tokens where they do not spell the text and each position's
alternatives (a client may show them); unknown top-level fields' strings with every choice. A stream
is held like a chat stream: the chunks are read by the chat reader once each choice's `text` is put
where a chat delta carries it.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from proxy.screening.collect import Reply, extra_text
from proxy.screening.completion import shown_fields, top_text
from proxy.screening.logprobs import unspelled
from proxy.streaming.buffered import HeldStream
from proxy.streaming.reply import Added
from proxy.streaming.shape import MalformedReply, index_of, mapping, other_text, reply_object, text_of
from proxy.streaming.sse import DONE, encode

OBJECT = "text_completion"
# A completion choice's fields that carry no text of their own.
CHOICE_FIELDS = frozenset({"index", "text", "finish_reason", "logprobs"})
NO_USAGE = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}


def read_completion(body: bytes) -> tuple[dict[str, Any], list[Reply]]:
    """A JSON reply parsed and each choice's text read (MalformedReply for a shape the proxy cannot
    read with certainty)."""
    reply = reply_object(body)
    choices = reply.get("choices")
    if not isinstance(choices, list):
        raise MalformedReply("choices is not a list")
    replies: list[Reply] = []
    for n, choice in enumerate(choices):
        at = f"choices[{n}]"
        choice = mapping(choice, at)
        index = index_of(choice, at)
        if any(r.index == index for r in replies):
            raise MalformedReply(f"two choices have index {index}")
        text_of(choice, "finish_reason", at)
        texts = [text_of(choice, "text", at), logprobs_text(choice.get("logprobs"), texts_of(choice))]
        texts += [t for extra in other_text(choice, CHOICE_FIELDS).values() for t in extra]
        replies.append(Reply(index, "\n".join(t for t in texts if t)))
    # Unknown top-level fields are read with every choice (as a chat completion's are).
    if top := "\n".join(top_text(reply)):
        replies = [Reply(r.index, f"{r.text}\n{top}" if r.text else top) for r in replies] or [Reply(0, top)]
    return reply, replies


class CompletionStream(HeldStream):
    """A held completions stream: read as chat chunks whose delta content is the choice's `text`,
    refused with completion chunks."""

    def _read(self, chunk: dict[str, Any]) -> list[Added]:
        choices = chunk.get("choices")
        if isinstance(choices, list):
            chunk = {**chunk, "choices": [_as_delta(choice) for choice in choices]}
        return super()._read(chunk)

    def refused(self, indexes: set[int], refusal: str, *, structured: bool = False) -> list[bytes]:
        # A completion has no `refusal` field: a structured-output request is refused as text too.
        base = {"id": self.id or "cmpl-guardrail", "object": OBJECT, "created": self.created or 0}
        base |= {"model": self.model or "", "system_fingerprint": self.fingerprint}
        return refusal_chunks(base, indexes, refusal)


def _as_delta(choice: Any) -> Any:
    """A completion chunk's choice as the chat reader reads one (anything but an object is left for it
    to refuse)."""
    if not isinstance(choice, dict):
        return choice
    if "delta" in choice:  # the reader would take it for the text; no server sends one
        raise MalformedReply("choices[].delta in a completions stream")
    text = choice.get("text")
    if not (text is None or isinstance(text, str)):
        raise MalformedReply("choices[].text is not a string")
    rest = {k: v for k, v in choice.items() if k not in ("text", "logprobs")}
    # An unknown choice field is screened by the chat reader: the logprobs' text goes in as one.
    if shown := logprobs_text(choice.get("logprobs"), text or ""):
        rest[LOGPROBS_TEXT] = shown + " "
    return {**rest, "delta": {"content": text}}


LOGPROBS_TEXT = "logprobs_text"
"""The field name the stream reader sees a choice's logprobs text under (never sent anywhere)."""


def texts_of(choice: dict[str, Any]) -> str:
    text = choice.get("text")
    return text if isinstance(text, str) else ""


def logprobs_text(logprobs: Any, text: str) -> str:
    """What a client may show of a choice's `logprobs`: its tokens where they do not spell `text`, each
    position's alternatives, and any other string in it (the numbers and offsets are no text)."""
    if logprobs is None:
        return ""
    if not isinstance(logprobs, dict):
        return " ".join(extra_text({"logprobs": logprobs}))
    rest = dict(logprobs)
    tokens, top = rest.pop("tokens", None), rest.pop("top_logprobs", None)
    shown = unspelled(tokens, text)
    if isinstance(top, list):
        shown += [key for alternatives in top if isinstance(alternatives, dict) for key in alternatives]
        top = [alternatives for alternatives in top if not isinstance(alternatives, dict)]
    return " ".join(shown + extra_text({"top_logprobs": top, **rest}))


def refused_choice(index: int, refusal: str) -> dict[str, Any]:
    return {"text": refusal, "index": index, "logprobs": None, "finish_reason": "content_filter"}


def refusal_completion(model: str, refusal: str, count: int, *, id_: str, created: int) -> dict[str, Any]:
    """The answer to a blocked input: `count` choices (prompts times `n`), each the refusal."""
    return {
        "id": id_,
        "object": OBJECT,
        "created": created,
        "model": model,
        "system_fingerprint": None,
        "choices": [refused_choice(i, refusal) for i in range(count)],
        "usage": dict(NO_USAGE),
    }


def replace_choices(reply: dict[str, Any], blocked: set[int], refusal: str) -> dict[str, Any]:
    choices = []
    for choice in reply.get("choices") or []:
        index = (choice or {}).get("index", 0)
        choices.append(refused_choice(index, refusal) if index in blocked else choice)
    return {**shown_fields(reply), "choices": choices}


def refusal_chunks(base: dict[str, Any], indexes: Iterable[int], refusal: str) -> list[bytes]:
    """One chunk per refused choice: its whole text and `content_filter`."""
    return [encode({**base, "choices": [refused_choice(i, refusal)]}) for i in sorted(indexes)]


def refusal_stream(
    model: str, refusal: str, count: int, *, id_: str, created: int, usage: bool = False
) -> list[bytes]:
    """A blocked input's stream; with `usage` (`stream_options.include_usage`) the usage chunk too."""
    base = {"id": id_, "object": OBJECT, "created": created, "model": model, "system_fingerprint": None}
    chunks = refusal_chunks(base, range(count), refusal)
    if usage:
        chunks.append(encode({**base, "choices": [], "usage": dict(NO_USAGE)}))
    return [*chunks, DONE]
