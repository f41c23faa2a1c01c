"""What a blocked non-streamed chat turn looks like: a normal chat.completion whose choice holds the
policy's refusal text and `finish_reason: "content_filter"`.

A structured-output request (`response_format` of type `json_schema`) is refused the way OpenAI
refuses one itself: `content` null, the text in the message's `refusal` field, `finish_reason:
"stop"`, so the SDKs' `parse` helpers return the refusal instead of raising or re-asking."""

from __future__ import annotations

from typing import Any

from proxy.protocol import ChatRequest
from proxy.screening.completion import shown_fields


def is_structured(chat: ChatRequest) -> bool:
    response_format = (chat.model_extra or {}).get("response_format")
    return isinstance(response_format, dict) and response_format.get("type") == "json_schema"


def refusal_message(refusal: str, *, structured: bool = False) -> dict[str, Any]:
    if structured:
        return {"role": "assistant", "content": None, "refusal": refusal}
    return {"role": "assistant", "content": refusal, "refusal": None}


def finish_reason(structured: bool) -> str:
    return "stop" if structured else "content_filter"


def refused_choice(index: Any, refusal: str, structured: bool) -> dict[str, Any]:
    return {
        "index": index,
        "message": refusal_message(refusal, structured=structured),
        "logprobs": None,
        "finish_reason": finish_reason(structured),
    }


def refusal_completion(
    model: str, refusal: str, n: int, *, id_: str, created: int, structured: bool = False
) -> dict[str, Any]:
    return {
        "id": id_,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "system_fingerprint": None,
        "choices": [refused_choice(i, refusal, structured) for i in range(n)],
        "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0},
    }


def replace_choices(
    completion: dict[str, Any], blocked: set[int], refusal: str, *, structured: bool = False
) -> dict[str, Any]:
    """The completion with blocked choices refused; its unknown top-level fields were part of every
    choice's check, a blocked one's too, so they are dropped."""
    choices = []
    for choice in completion.get("choices") or []:
        if int(choice.get("index", 0)) in blocked:
            choice = refused_choice(choice.get("index", 0), refusal, structured)
        choices.append(choice)
    return {**shown_fields(completion), "choices": choices}
