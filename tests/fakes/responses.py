"""A fake upstream speaking the OpenAI Responses API, served by aiohttp on 127.0.0.1: JSON and typed
SSE events (`event: <type>` + data with `sequence_number`, as OpenAI documents them) for a text
message, a function call and a reasoning summary; stored responses for retrieve / delete /
input_items / cancel; fault modes (connection dropped mid-stream, an `error` event,
`response.failed`). It serves chat completions too (the FakeUpstream it extends). It records every
request and every byte it sent."""

from __future__ import annotations

import asyncio
import json
import re
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from tests.fakes.upstream import FakeUpstream


@dataclass
class FakeResponses(FakeUpstream):
    text: str = "Hello from the Responses fake."
    pieces: list[str] | None = None
    """How the text is split into deltas (default: words)."""
    function_call: dict[str, str] | None = None
    """{"name", "arguments"}: the answer when the request has tools and no function_call_output yet."""
    summary: str | None = None
    """A reasoning item's summary text, before the message."""
    done_text: str | None = None
    """The text the `.done` events and the final response state, when it differs from the deltas."""
    fault: str = "none"  # none | die (drop the connection after `die_after` events) | error_event | failed | truncated
    die_after: int = 4
    stored: dict[str, dict[str, Any]] = field(default_factory=dict)
    inputs: dict[str, Any] = field(default_factory=dict)
    _count: int = 0

    async def start(self) -> FakeResponses:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_post("/v1/responses", self._create)
        app.router.add_route("*", "/v1/responses/{id}", self._stored)
        app.router.add_route("*", "/v1/responses/{id}/{action}", self._stored)
        self._runner = web.AppRunner(app, handler_cancellation=True)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}/v1"
        return self

    @property
    def response_requests(self) -> list[dict[str, Any]]:
        return [r.json for r in self.received if r.path == "/v1/responses"]

    async def _create(self, request: web.Request) -> web.StreamResponse:
        body = (await self._record(request)).json
        if self.mode == "raw":
            return web.Response(status=self.raw_status, body=self.raw_body, content_type="application/json")
        self._count += 1
        rid = f"resp_fake{self._count:04d}"
        output = self.output(body, rid)
        final = self.response(body, rid, output, "completed")
        self.stored[rid] = final
        self.inputs[rid] = body.get("input")
        if not body.get("stream"):
            payload = json.dumps(final).encode()
            self.sent += payload
            return web.Response(body=payload, content_type="application/json")
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        try:
            for n, event in enumerate(self.events(body, rid, output, final)):
                if self.fault == "die" and n == self.die_after:
                    assert request.transport is not None
                    request.transport.close()
                    return response
                frame = f"event: {event['type']}\ndata: {json.dumps(event)}\n\n".encode()
                self.sent += frame
                await response.write(frame)
            await response.write_eof()
        except asyncio.CancelledError:
            self.disconnected.set()
            raise
        return response

    async def _stored(self, request: web.Request) -> web.StreamResponse:
        await self._record(request)
        rid, action = request.match_info["id"], request.match_info.get("action", "")
        if rid not in self.stored:
            body = {"error": {"message": f"No response with id '{rid}'.", "type": "invalid_request_error"}}
            return web.json_response(body, status=404)
        if request.method == "DELETE" and not action:
            del self.stored[rid]
            return web.json_response({"id": rid, "object": "response.deleted", "deleted": True})
        if action == "input_items":
            given = self.inputs[rid]
            items = [{"type": "message", "role": "user", "content": given}] if isinstance(given, str) else given
            data = [{"id": f"msg_in{i}", **item} for i, item in enumerate(items or [])]
            return web.json_response({"object": "list", "data": data, "has_more": False})
        if action == "cancel":
            return web.json_response({**self.stored[rid], "status": "cancelled"})
        payload = json.dumps(self.stored[rid]).encode()
        self.sent += payload
        return web.Response(body=payload, content_type="application/json")

    def wants_call(self, body: dict[str, Any]) -> bool:
        given = body.get("input")
        answered = isinstance(given, list) and any(
            isinstance(i, dict) and i.get("type") == "function_call_output" for i in given
        )
        return bool(body.get("tools")) and self.function_call is not None and not answered

    def output(self, body: dict[str, Any], rid: str) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        if self.summary is not None:
            summary = [{"type": "summary_text", "text": self.summary}]
            out.append({"id": f"rs_{rid}", "type": "reasoning", "summary": summary})
        if self.wants_call(body):
            assert self.function_call is not None
            call = {"id": f"fc_{rid}", "type": "function_call", "call_id": f"call_{rid}", "status": "completed"}
            out.append({**call, **self.function_call})
            return out
        text = self.done_text if self.done_text is not None else self.text
        part = {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
        message = {"id": f"msg_{rid}", "type": "message", "role": "assistant", "status": "completed"}
        out.append({**message, "content": [part]})
        return out

    def response(self, body: dict[str, Any], rid: str, output: list[dict[str, Any]], status: str) -> dict[str, Any]:
        return {
            "id": rid,
            "object": "response",
            "created_at": 1700000000,
            "status": status,
            "error": None,
            "incomplete_details": None,
            "instructions": body.get("instructions"),
            "model": body.get("model"),
            "output": output,
            "parallel_tool_calls": True,
            "previous_response_id": body.get("previous_response_id"),
            "temperature": 1.0,
            "tool_choice": "auto",
            "tools": body.get("tools") or [],
            "top_p": 1.0,
            "usage": {
                "input_tokens": 10,
                "input_tokens_details": {"cached_tokens": 0},
                "output_tokens": 5,
                "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": 15,
            },
        }

    def events(
        self, body: dict[str, Any], rid: str, output: list[dict[str, Any]], final: dict[str, Any]
    ) -> list[dict[str, Any]]:
        started = self.response(body, rid, [], "in_progress")
        events: list[dict[str, Any]] = [
            {"type": "response.created", "response": started},
            {"type": "response.in_progress", "response": started},
        ]
        for o, item in enumerate(output):
            events += self.item_events(o, item)
        if self.fault == "error_event":
            events.append({"type": "error", "code": "server_error", "message": "upstream says bomb", "param": None})
        elif self.fault == "truncated":
            pass  # the stream ends without its last event
        elif self.fault == "failed":
            error = {"code": "server_error", "message": "the model failed: bomb"}
            events.append({"type": "response.failed", "response": {**final, "status": "failed", "error": error}})
        else:
            events.append({"type": "response.completed", "response": final})
        return [{**event, "sequence_number": n} for n, event in enumerate(events)]

    def item_events(self, o: int, item: dict[str, Any]) -> list[dict[str, Any]]:
        at = {"item_id": item["id"], "output_index": o}
        if item["type"] == "function_call":
            args = item["arguments"]
            return [
                {"type": "response.output_item.added", "output_index": o, "item": {**item, "arguments": ""}},
                *(
                    {"type": "response.function_call_arguments.delta", **at, "delta": args[i : i + 8]}
                    for i in range(0, len(args), 8)
                ),
                {"type": "response.function_call_arguments.done", **at, "arguments": args},
                {"type": "response.output_item.done", "output_index": o, "item": item},
            ]
        if item["type"] == "reasoning":
            text = item["summary"][0]["text"]
            part = {"type": "summary_text", "text": text}
            sub = {**at, "summary_index": 0}
            return [
                {"type": "response.output_item.added", "output_index": o, "item": {**item, "summary": []}},
                {"type": "response.reasoning_summary_part.added", **sub, "part": {**part, "text": ""}},
                {"type": "response.reasoning_summary_text.delta", **sub, "delta": text},
                {"type": "response.reasoning_summary_text.done", **sub, "text": text},
                {"type": "response.reasoning_summary_part.done", **sub, "part": part},
                {"type": "response.output_item.done", "output_index": o, "item": item},
            ]
        part = item["content"][0]
        at = {**at, "content_index": 0}
        pieces = self.pieces if self.pieces is not None else re.findall(r"\s*\S+", self.text)
        return [
            {"type": "response.output_item.added", "output_index": o, "item": {**item, "content": []}},
            {"type": "response.content_part.added", **at, "part": {**part, "text": ""}},
            *({"type": "response.output_text.delta", **at, "delta": p, "logprobs": []} for p in pieces),
            {"type": "response.output_text.done", **at, "text": part["text"], "logprobs": []},
            {"type": "response.content_part.done", **at, "part": part},
            {"type": "response.output_item.done", "output_index": o, "item": item},
        ]
