"""What a blocked non-streamed turn looks like: a normal chat.completion whose choice holds the
policy's refusal text and `finish_reason: "content_filter"`."""

from __future__ import annotations

from typing import Any


def refusal_message(refusal: str) -> dict[str, Any]:
    return {"role": "assistant", "content": refusal, "refusal": None}


def refusal_completion(model: str, refusal: str, n: int, *, id_: str, created: int) -> dict[str, Any]:
    return {
        "id": id_,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [
            {"index": i, "message": refusal_message(refusal), "logprobs": None, "finish_reason": "content_filter"}
            for i in range(n)
        ],
        "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0},
    }


def replace_choices(completion: dict[str, Any], blocked: set[int], refusal: str) -> dict[str, Any]:
    choices = []
    for choice in completion.get("choices") or []:
        if int(choice.get("index", 0)) in blocked:
            choice = {
                "index": choice.get("index", 0),
                "message": refusal_message(refusal),
                "logprobs": None,
                "finish_reason": "content_filter",
            }
        choices.append(choice)
    return {**completion, "choices": choices}
