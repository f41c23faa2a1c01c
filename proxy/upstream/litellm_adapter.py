"""Non-OpenAI providers (Anthropic, Bedrock, Vertex, ...) through litellm, imported lazily and only
when a route uses such an upstream. The price list is read locally (LITELLM_LOCAL_MODEL_COST_MAP),
litellm's retries are off, and replies come back as OpenAI JSON or OpenAI SSE chunks, so the rest
of the proxy (screening, buffered streams) is the same for every upstream."""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import AsyncIterator, Mapping
from typing import Any

import structlog

from proxy.errors import UpstreamError, UpstreamTimeout
from proxy.protocol import error_body
from proxy.settings import UpstreamSettings
from proxy.upstream.relay import Outgoing, Reply

log = structlog.get_logger("proxy.upstream.litellm")

# The OpenAI chat-completion parameters litellm is given; every other body key is dropped. litellm
# treats many extra keyword arguments as its own settings (api_base, base_url, api_key, extra_headers,
# custom_llm_provider, aws_*/vertex_*/azure_* credentials, mock_response, metadata for its callbacks):
# spreading a client's body into it would let the client pick the endpoint the operator's key goes to.
# `store` and `metadata` are left out too: they mean nothing to non-OpenAI providers and litellm
# reads `metadata` itself.
CHAT_PARAMS = frozenset(
    {
        "model",
        "messages",
        "stream",
        "stream_options",
        "temperature",
        "top_p",
        "n",
        "stop",
        "max_tokens",
        "max_completion_tokens",
        "presence_penalty",
        "frequency_penalty",
        "logit_bias",
        "logprobs",
        "top_logprobs",
        "user",
        "tools",
        "tool_choice",
        "parallel_tool_calls",
        "response_format",
        "seed",
        "functions",
        "function_call",
        "reasoning_effort",
        "modalities",
        "audio",
        "prediction",
        "service_tier",
        "web_search_options",
    }
)
_LOGGED_NAMES = 20  # dropped names are client-chosen: log a few, shortened and escaped, never values


def dropped_names(names: list[str]) -> list[str]:
    return [ascii(name[:40])[1:-1] for name in sorted(names)[:_LOGGED_NAMES]]


def import_litellm() -> Any:
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # else it fetches a price list at import
    try:
        import litellm
    except ImportError as exc:
        raise UpstreamError("this upstream needs litellm: pip install 'guardrail-proxy[litellm]'") from exc
    litellm.telemetry = False
    litellm.num_retries = 0
    litellm.suppress_debug_info = True
    for name in ("LiteLLM", "LiteLLM Router", "LiteLLM Proxy"):
        # litellm prints plain text to stderr through its own handler, and at info a line per call that
        # quotes the client's model: its records go through the proxy's JSON formatter, warnings up.
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True
        logger.setLevel(logging.WARNING)
    return litellm


async def prepare_litellm(models: list[str]) -> None:
    """Import litellm and run mocked calls per provider (plain and streamed), at startup, before
    serving: litellm imports dozens of modules and loads a tokenizer on first use (over a second)
    that would otherwise stall the event loop during a request."""
    litellm = import_litellm()
    messages = [{"role": "user", "content": "warm-up"}]
    litellm.token_counter(model="gpt-3.5-turbo", messages=messages)
    for model in models:
        await litellm.acompletion(model=model, messages=messages, mock_response="ok")
        stream = await litellm.acompletion(model=model, messages=messages, mock_response="ok", stream=True)
        async for _ in stream:
            pass
        # The first provider error imports litellm's error mapping (fastapi, ~0.5 s): do that now too.
        with contextlib.suppress(Exception):
            await litellm.acompletion(model=model, messages=messages, mock_response=Exception("warm-up"))


class _JSONReply:
    def __init__(self, status: int, body: bytes) -> None:
        self.status = status
        self.headers: Mapping[str, str] = {"content-type": "application/json"}
        self._body = body

    async def body(self) -> bytes:
        return self._body

    async def chunks(self) -> AsyncIterator[bytes]:
        yield self._body


class _StreamReply:
    def __init__(self, stream: Any) -> None:
        self.status = 200
        self.headers: Mapping[str, str] = {"content-type": "text/event-stream"}
        self._stream = stream

    async def body(self) -> bytes:
        return b"".join([chunk async for chunk in self.chunks()])

    async def chunks(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._stream:
                data = chunk.model_dump(exclude_none=True)
                yield b"data: " + json.dumps(data, separators=(",", ":")).encode() + b"\n\n"
        except Exception as exc:
            raise _translate(exc) from exc
        yield b"data: [DONE]\n\n"


def _translate(exc: Exception) -> UpstreamError:
    name = type(exc).__name__
    if "Timeout" in name:
        return UpstreamTimeout(f"upstream timed out ({name})")
    return UpstreamError(f"upstream failed ({name}: {str(exc)[:200]})")


class LiteLLMUpstream:
    def __init__(self, name: str, settings: UpstreamSettings) -> None:
        self.name = name
        self.settings = settings
        self._key = settings.key()

    def _kwargs(self, out: Outgoing) -> dict[str, Any]:
        body = json.loads(out.body)  # the forwarded body: a route's model rename is already in it
        payload = {k: v for k, v in body.items() if k in CHAT_PARAMS}
        dropped = [k for k in body if k not in CHAT_PARAMS]
        if dropped:
            log.warning("litellm_params_dropped", count=len(dropped), names=dropped_names(dropped))
        payload["model"] = (self.settings.provider_model_prefix or "") + str(payload.get("model", ""))
        if not payload.get("stream"):
            payload.pop("stream_options", None)
        kwargs: dict[str, Any] = {
            **payload,
            "num_retries": 0,
            "max_retries": 0,
            "timeout": self.settings.total_timeout_s,
        }
        if self._key:
            kwargs["api_key"] = self._key
        if self.settings.base_url:
            kwargs["api_base"] = self.settings.base_url
        if self.settings.headers:
            kwargs["extra_headers"] = dict(self.settings.headers)
        return kwargs

    @contextlib.asynccontextmanager
    async def open(self, out: Outgoing) -> AsyncIterator[Reply]:
        if out.path != "/chat/completions":
            yield _JSONReply(
                404,
                json.dumps(
                    error_body(f"{out.path} is not available through litellm", "invalid_request_error", "not_found")
                ).encode(),
            )
            return
        litellm = import_litellm()
        try:
            response = await litellm.acompletion(**self._kwargs(out))
        except Exception as exc:
            status = getattr(exc, "status_code", None)
            if isinstance(status, int) and 400 <= status < 600:
                # The provider answered with an error: relay its status in the OpenAI envelope.
                message = str(getattr(exc, "message", exc))[:500]
                yield _JSONReply(status, json.dumps(error_body(message, "upstream_error", None)).encode())
                return
            raise _translate(exc) from exc
        if out.stream:
            try:
                yield _StreamReply(response)
            finally:
                close = getattr(response, "aclose", None)
                if close is not None:
                    with contextlib.suppress(Exception):
                        await close()
            return
        yield _JSONReply(200, response.model_dump_json(exclude_none=True).encode())
