"""A fake OpenAI-compatible upstream served by aiohttp on 127.0.0.1: JSON and SSE replies built
from the request, plus fault modes (slow, error status, mid-stream error, abrupt close, malformed
SSE, stall). It records every request it received and every byte it sent."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from tests.fakes.completions import text_chunks, text_completion


@dataclass
class Received:
    path: str
    method: str
    headers: dict[str, str]
    body: bytes

    @property
    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class FakeUpstream:
    replies: list[str] = field(default_factory=lambda: ["Hello! How can I help you today?"])
    tool_call: dict[str, str] | None = None  # {"name": ..., "arguments": ...} when the request has tools
    reasoning: str | None = None  # sent as message.reasoning_content in JSON replies
    mode: str = "ok"
    # mode "raw": a stream sends these bytes as they are (None: wait for `gate` first); a JSON
    # request, or any request when raw_status is not 200, gets `raw_body` with `raw_status`.
    raw_chunks: list[bytes | None] = field(default_factory=list)
    raw_body: bytes = b""
    raw_status: int = 200
    raw_content_type: str = "application/json"
    gate: asyncio.Event = field(default_factory=asyncio.Event)
    delay_s: float = 0.0
    release: asyncio.Event | None = None  # when set to an Event, every chat reply waits for it first
    error_status: int = 500
    error_body: bytes = (
        b'{"error": {"message": "upstream exploded", "type": "server_error", "param": null, "code": null}}'
    )
    received: list[Received] = field(default_factory=list)
    sent: bytearray = field(default_factory=bytearray)
    disconnected: asyncio.Event = field(default_factory=asyncio.Event)
    got_chat: asyncio.Event = field(default_factory=asyncio.Event)
    url: str = ""
    _runner: web.AppRunner | None = None

    async def start(self) -> FakeUpstream:
        app = web.Application(client_max_size=16 << 20)  # inline images: megabytes
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_post("/v1/completions", self._chat)  # legacy: tests/fakes/completions.py
        app.router.add_get("/v1/models", self._models)
        app.router.add_post("/v1/embeddings", self._embeddings)
        app.router.add_route("*", "/v1/files/{tail:.*}", self._files)
        app.router.add_route("*", "/admin", self._admin)  # what a path escaping /v1/files/* would reach
        self._runner = web.AppRunner(app, handler_cancellation=True)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}/v1"
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    @property
    def chat_requests(self) -> list[Received]:
        return [r for r in self.received if r.path.endswith("/chat/completions")]

    async def _record(self, request: web.Request) -> Received:
        rec = Received(request.path, request.method, dict(request.headers), await request.read())
        self.received.append(rec)
        return rec

    async def _models(self, request: web.Request) -> web.Response:
        await self._record(request)
        return web.json_response(
            {"object": "list", "data": [{"id": "gpt-fake", "object": "model", "created": 0, "owned_by": "fake"}]}
        )

    async def _embeddings(self, request: web.Request) -> web.Response:
        await self._record(request)
        return web.json_response(
            {
                "object": "list",
                "model": "emb",
                "usage": {"prompt_tokens": 1, "total_tokens": 1},
                "data": [{"object": "embedding", "index": 0, "embedding": [0.1, 0.2]}],
            }
        )

    async def _files(self, request: web.Request) -> web.Response:
        await self._record(request)
        return web.json_response({"object": "file", "id": request.match_info["tail"], "query": dict(request.query)})

    async def _admin(self, request: web.Request) -> web.Response:
        await self._record(request)
        return web.json_response({"admin": "the operator's account settings"})

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        rec = await self._record(request)
        self.got_chat.set()
        body = rec.json
        try:
            if self.release is not None:
                await self.release.wait()
            if self.mode == "slow":
                await asyncio.sleep(self.delay_s)
            if self.mode == "status":
                return web.Response(status=self.error_status, body=self.error_body, content_type="application/json")
            if self.mode == "raw":
                return await self._raw(request, body)
            if self.mode == "garbage":
                return web.Response(body=b"<html>not json</html>", content_type="application/json")
            if body.get("stream"):
                return await self._stream(request, body)
            legacy = request.path == "/v1/completions"
            payload = json.dumps(text_completion(self.replies, body) if legacy else self.completion(body)).encode()
            self.sent += payload
            return web.Response(body=payload, content_type="application/json")
        except asyncio.CancelledError:
            self.disconnected.set()
            raise

    def _texts(self, n: int) -> list[str]:
        return [self.replies[i % len(self.replies)] for i in range(n)]

    def completion(self, body: dict[str, Any]) -> dict[str, Any]:
        n = body.get("n") or 1
        choices = []
        for i, text in enumerate(self._texts(n)):
            message: dict[str, Any] = {"role": "assistant", "content": text, "refusal": None}
            if self.reasoning is not None:
                message["reasoning_content"] = self.reasoning
            finish = "stop"
            if body.get("tools") and self.tool_call:
                message = {
                    "role": "assistant",
                    "content": None,
                    "refusal": None,
                    "tool_calls": [{"id": f"call_{i}", "type": "function", "function": dict(self.tool_call)}],
                }
                finish = "tool_calls"
            choice: dict[str, Any] = {"index": i, "message": message, "finish_reason": finish, "logprobs": None}
            if body.get("logprobs"):
                choice["logprobs"] = {
                    "content": [{"token": "Hello", "logprob": -0.1, "bytes": [72], "top_logprobs": []}],
                    "refusal": None,
                }
            choices.append(choice)
        return {
            "id": "chatcmpl-fake",
            "object": "chat.completion",
            "created": 1700000000,
            "model": body.get("model"),
            "system_fingerprint": "fp_fake",
            "choices": choices,
            "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15},
            "vendor_extra": {"kept": True},
        }

    def chunks(self, body: dict[str, Any]) -> list[bytes]:
        n = body.get("n") or 1
        base = {
            "id": "chatcmpl-fake",
            "object": "chat.completion.chunk",
            "created": 1700000000,
            "model": body.get("model"),
            "system_fingerprint": "fp_fake",
        }
        out = []

        def event(choices: list[dict[str, Any]], **extra: Any) -> bytes:
            return b"data: " + json.dumps({**base, "choices": choices, **extra}).encode() + b"\n\n"

        for i, text in enumerate(self._texts(n)):
            out.append(event([{"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]))
            if body.get("tools") and self.tool_call:
                out.append(
                    event(
                        [
                            {
                                "index": i,
                                "delta": {
                                    "tool_calls": [
                                        {
                                            "index": 0,
                                            "id": f"call_{i}",
                                            "type": "function",
                                            "function": {"name": self.tool_call["name"], "arguments": ""},
                                        }
                                    ]
                                },
                                "finish_reason": None,
                            }
                        ]
                    )
                )
                args = self.tool_call["arguments"]
                for k in range(0, len(args), 7):
                    out.append(
                        event(
                            [
                                {
                                    "index": i,
                                    "delta": {"tool_calls": [{"index": 0, "function": {"arguments": args[k : k + 7]}}]},
                                    "finish_reason": None,
                                }
                            ]
                        )
                    )
                out.append(event([{"index": i, "delta": {}, "finish_reason": "tool_calls"}]))
                continue
            for word in text.split(" "):
                out.append(event([{"index": i, "delta": {"content": word + " "}, "finish_reason": None}]))
            out.append(event([{"index": i, "delta": {}, "finish_reason": "stop"}]))
        if (body.get("stream_options") or {}).get("include_usage"):
            out.append(event([], usage={"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}))
        out.append(b"data: [DONE]\n\n")
        return out

    async def _stream(self, request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        chunks = text_chunks(self.replies, body) if request.path == "/v1/completions" else self.chunks(body)
        for k, chunk in enumerate(chunks):
            if k == 2 and self.mode == "midstream_error":
                chunk = b'data: {"error": {"message": "overloaded mid-stream", "type": "server_error"}}\n\n'
                await self._send(response, chunk)
                return response
            if k == 2 and self.mode == "abrupt":
                assert request.transport is not None
                request.transport.close()
                return response
            if k == 2 and self.mode == "malformed":
                await self._send(response, b"data: {this is not json\n\n")
                continue
            if k == 2 and self.mode == "stall":
                await asyncio.sleep(self.delay_s)
            if self.mode == "trickle":
                await asyncio.sleep(self.delay_s)
            await self._send(response, chunk)
        await response.write_eof()
        return response

    async def _raw(self, request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        if not body.get("stream") or self.raw_status != 200:
            self.sent += self.raw_body
            return web.Response(
                status=self.raw_status, body=self.raw_body, headers={"Content-Type": self.raw_content_type}
            )
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for chunk in self.raw_chunks:
            if chunk is None:
                await self.gate.wait()
            else:
                await self._send(response, chunk)
        await response.write_eof()
        return response

    async def _send(self, response: web.StreamResponse, chunk: bytes) -> None:
        self.sent += chunk
        await response.write(chunk)
