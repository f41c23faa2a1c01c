"""What the output check reads of a JSON chat completion: each choice's message, its `logprobs` and any
other choice field, then the completion's unknown top-level fields, which every choice's check sees
(a client may show them with whichever choice it prints)."""

from __future__ import annotations

from proxy.protocol import ChatCompletion, Choice
from proxy.screening.collect import Reply, extra_text, reply_text, top_text
from proxy.screening.logprobs import chat_logprobs_text


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
