"""The legacy completions protocol for the fake upstream (tests/fakes/upstream.py): JSON replies and
SSE chunks as OpenAI sends them. Choice i completes prompt i // n; `echo` repeats the prompt."""

from __future__ import annotations

import json
from typing import Any

BASE = {"id": "cmpl-fake", "object": "text_completion", "created": 1700000000, "system_fingerprint": "fp_fake"}
USAGE = {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}


def texts(replies: list[str], body: dict[str, Any]) -> list[str]:
    prompt = body.get("prompt")
    prompts = [prompt] if isinstance(prompt, str) else list(prompt or [""])
    n = body.get("n") or 1
    out = []
    for i in range(len(prompts) * n):
        text = replies[i % len(replies)]
        out.append(prompts[i // n] + text if body.get("echo") else text)
    return out


def text_completion(replies: list[str], body: dict[str, Any]) -> dict[str, Any]:
    choices = [
        {"text": text, "index": i, "logprobs": None, "finish_reason": "stop"}
        for i, text in enumerate(texts(replies, body))
    ]
    return {**BASE, "model": body.get("model"), "choices": choices, "usage": USAGE}


def text_chunks(replies: list[str], body: dict[str, Any]) -> list[bytes]:
    """A word per chunk, then a chunk with the finish reason; the usage chunk when asked for."""
    base = {**BASE, "model": body.get("model")}

    def event(choices: list[dict[str, Any]], **extra: Any) -> bytes:
        return b"data: " + json.dumps({**base, "choices": choices, **extra}).encode() + b"\n\n"

    out = []
    for i, text in enumerate(texts(replies, body)):
        for word in text.split(" "):
            out.append(event([{"text": word + " ", "index": i, "logprobs": None, "finish_reason": None}]))
        out.append(event([{"text": "", "index": i, "logprobs": None, "finish_reason": "stop"}]))
    if (body.get("stream_options") or {}).get("include_usage"):
        out.append(event([], usage=USAGE))
    out.append(b"data: [DONE]\n\n")
    return out
