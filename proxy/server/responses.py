"""POST /v1/responses: the Responses API as a wire format on the shared request path
(proxy/server/exchange.py), and the relay of a stored response's other paths (retrieve, delete,
input items, cancel). A blocked reply becomes an `incomplete` response with the refusal message and
`incomplete_details.reason: "content_filter"`; streams are always held.

With `previous_response_id` or `conversation` the upstream keeps the history and the request carries
only the new items: the screened turns of each passed response are kept (proxy/state) and go before
the new turn when Llama Guard judges it. An id the store does not know (expired, another replica
without Redis) is screened with what the request shows, and the record says `context: unknown`.
Each id is its creating tenant's (proxy/server/response_owner.py): another tenant naming it gets a 404.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

from aiohttp import web
from pydantic import ValidationError

from proxy.errors import BadRequest, NotFound, UpstreamError
from proxy.guards.guard import Turn
from proxy.protocol import ChatRequest
from proxy.screening.collect import Reply, ThreadedRequest, conversation, count_limits, output_conversation
from proxy.screening.pipeline import OFF_LOOP_CHARS, Verdict
from proxy.screening.refusal import is_structured
from proxy.screening.responses_input import Thread, chat_body, thread_of
from proxy.server.connections import read_body
from proxy.server.decisions import decide_output
from proxy.server.exchange import handle, outgoing, read_reply, relay_unchanged, upstream_failed
from proxy.server.json_body import invalid
from proxy.server.response_owner import check_owner, claim
from proxy.server.state import POLICIES, RESPONSE_STATE, TENANTS, UPSTREAMS, bind_tenant, record_of
from proxy.server.wire import WireFormat
from proxy.streaming.buffered import HeldStream
from proxy.streaming.responses import (
    ResponsesStream,
    base_response,
    read_response,
    refusal_events,
    refused,
    replay_response,
)
from proxy.streaming.shape import MalformedReply

THREAD = web.RequestKey("responses_thread", Thread)
# A conversation's turns are kept under its id, apart from response ids.
CONVERSATION_KEY = "conversation:"
# A response (or conversation) whose reply the client did not get is marked under this prefix: the
# upstream keeps that reply, and a turn continuing it would have the model read it (and re-encode it).
WITHHELD_KEY = "withheld:"
# Tenants share the upstream's key, so its ids are good for any of them: withheld marks are kept for all.
EVERY_TENANT = ""


class ResponsesWire:
    path = "/v1/responses"
    upstream_path = "/responses"
    prompt_field = "input"
    id_prefix = "resp_"
    incremental = False

    async def read(self, request: web.Request, payload: dict[str, Any]) -> ChatRequest:
        thread = thread_of(payload)
        try:
            chat = ThreadedRequest.model_validate(chat_body(payload))
        except ValidationError as exc:
            raise invalid(exc) from exc
        request[THREAD] = thread
        # Before the withheld check: another tenant must not learn that an id's reply was withheld.
        await check_thread_owner(request, thread)
        await refuse_withheld(request, thread)
        chat.context = tuple(await context_of(request, thread))
        return chat

    def refusal(self, chat: ChatRequest, refusal: str, *, id_: str, created: int) -> dict[str, Any]:
        base = base_response(chat.model, id_=id_, created=created)
        return refused(base, refusal, structured=is_structured(chat))

    def refusal_stream(self, chat: ChatRequest, refusal: str, *, id_: str, created: int) -> list[bytes]:
        base = base_response(chat.model, id_=id_, created=created)
        return refusal_events(base, refusal, structured=is_structured(chat))

    def reply(self, body: bytes) -> tuple[dict[str, Any], list[Reply]]:
        return read_response(body)

    def replace(self, chat: ChatRequest, reply: dict[str, Any], blocked: set[int], refusal: str) -> dict[str, Any]:
        return refused(reply, refusal, structured=is_structured(chat)) if blocked else reply

    def held(self, *, max_bytes: int, max_events: int) -> HeldStream:
        return ResponsesStream(max_bytes=max_bytes, max_events=max_events)

    def replay(self, chat: ChatRequest, held: HeldStream, blocked: set[int], refusal: str) -> Iterator[bytes]:
        return replay_response(held, blocked, refusal, structured=is_structured(chat))

    async def answered(
        self, request: web.Request, chat: ChatRequest, reply_id: str | None, replies: list[Reply]
    ) -> None:
        """Keep this response's screened turns (its context, the new input, the reply) for the next
        turn that names it or its conversation."""
        thread = request.get(THREAD) or Thread()
        conversation = conversation_key(thread.conversation)
        # First, whatever follows: a background response's id is good from this answer on.
        await claim(request, reply_id, conversation)
        store, tenant = request.app.get(RESPONSE_STATE), record_of(request).tenant
        if store is None or tenant is None or not replies:
            return
        context = chat.context if isinstance(chat, ThreadedRequest) else ()
        size = count_limits(chat)[0] + len(replies[0].text) + sum(len(t.text) for t in context)
        # Normalising megabytes takes a while: off the loop, as the checks do (pipeline.OFF_LOOP_CHARS).
        turns = await asyncio.to_thread(chain, chat, replies[0]) if size > OFF_LOOP_CHARS else chain(chat, replies[0])
        if reply_id is not None:
            await store.put(tenant, reply_id, turns)
        if conversation is not None:
            await store.put(tenant, conversation, turns)

    async def withheld(self, request: web.Request, chat: ChatRequest, reply_id: str | None) -> None:
        """A created response the client did not get (blocked): still its tenant's, and withheld."""
        thread = request.get(THREAD) or Thread()
        conversation = conversation_key(thread.conversation)
        await claim(request, reply_id, conversation)
        await mark_withheld(request, reply_id, conversation)


def conversation_key(conversation: str | None) -> str | None:
    """Where a conversation's turns, mark and owner are kept, apart from response ids."""
    return None if conversation is None else CONVERSATION_KEY + conversation


async def mark_withheld(request: web.Request, *keys: str | None) -> None:
    store = request.app.get(RESPONSE_STATE)
    for key in keys:
        if store is not None and key is not None:
            await store.put(EVERY_TENANT, WITHHELD_KEY + key, [])


async def check_thread_owner(request: web.Request, thread: Thread) -> None:
    """A 404 for a turn continuing another tenant's response or conversation (response_owner.py)."""
    if thread.conversation is not None:
        key, shown = CONVERSATION_KEY + thread.conversation, thread.conversation
        await check_owner(request, key, shown=shown, noun="conversation", param="conversation", claimable=True)
    if thread.previous_response_id is not None:
        shown = thread.previous_response_id
        await check_owner(request, shown, shown=shown, noun="response", param="previous_response_id")


def chain(chat: ChatRequest, reply: Reply) -> list[Turn]:
    """What is kept of a passed response: its context, its input and its reply, as Llama Guard turns."""
    return output_conversation(chat, reply) or conversation(chat)


RESPONSES = ResponsesWire()
_WIRE: WireFormat = RESPONSES  # ResponsesWire implements the protocol


async def refuse_withheld(request: web.Request, thread: Thread) -> None:
    """A 400 for a turn that continues a reply this proxy withheld (see WITHHELD_KEY)."""
    store = request.app.get(RESPONSE_STATE)
    if store is None:
        return
    if thread.conversation is not None:
        key, param = CONVERSATION_KEY + thread.conversation, "conversation"
        said = "This conversation holds a reply the content policy blocked: start a new one."
    elif thread.previous_response_id is not None:
        key, param = thread.previous_response_id, "previous_response_id"
        said = "The previous response was blocked by the content policy: continue from an earlier one."
    else:
        return
    if await store.get(EVERY_TENANT, WITHHELD_KEY + key) is not None:
        raise BadRequest(said, param=param)


async def context_of(request: web.Request, thread: Thread) -> list[Turn]:
    """The stored turns the request continues; [] (and `context: unknown` recorded) when it names
    an id the store does not know."""
    key = CONVERSATION_KEY + thread.conversation if thread.conversation is not None else thread.previous_response_id
    store, tenant, record = request.app.get(RESPONSE_STATE), record_of(request).tenant, record_of(request)
    if key is None:
        return []
    turns = await store.get(tenant, key) if store is not None and tenant is not None else None
    record.context = "unknown" if turns is None else "stored"
    return turns or []


async def responses(request: web.Request) -> web.StreamResponse:
    return await handle(request, RESPONSES)


# What a stored response's paths do: (method, path after the id) -> whether the answer is a response
# object the route's output checks screen (retrieve, cancel) or relayed as it is (delete, input items).
STORED_PATHS = {("GET", ""): True, ("POST", "/cancel"): True, ("DELETE", ""): False, ("GET", "/input_items"): False}


async def relay_stored(request: web.Request, target: str) -> web.StreamResponse:
    """`/v1/responses/{id}...`, where the tenant's route for POST /v1/responses screens (404 where
    none does); `target` is the validated upstream path."""
    record = record_of(request)
    tenant = request.app[TENANTS].identify(request)
    bind_tenant(request, tenant.name)
    policy = request.app[POLICIES].current.get(tenant.policy)
    record.policy = policy.tag
    route = policy.resolve(RESPONSES.path, None)
    response_id, _, rest = request.match_info["tail"].partition("/")
    screened = STORED_PATHS.get((request.method, f"/{rest}" if rest else ""))
    if route is None or route.passthrough or screened is None or not response_id:
        raise NotFound(
            f"Unknown path {request.method} {request.path}: this proxy relays a stored response's "
            "retrieve, delete, input_items and cancel where a policy route screens /v1/responses."
        )
    if request.query.get("stream", "").lower() == "true":
        raise BadRequest(
            "A stored response cannot be streamed through this proxy: retrieve it without `stream`.", param="stream"
        )
    record.route, record.upstream = route.name, route.upstream
    await check_owner(request, response_id, shown=response_id, noun="response")
    out = outgoing(request, route, tenant.key, target, await read_body(request) if request.method == "POST" else b"")
    headers = {"x-request-id": record.request_id, "x-guardrail-policy": policy.tag}
    try:
        async with request.app[UPSTREAMS][route.upstream].open(out) as reply:
            status, upstream_headers = reply.status, dict(reply.headers)
            body = await read_reply(request, record, reply)
    except UpstreamError as exc:
        upstream_failed(request, record, exc.code or "error")
        raise
    if status != 200 or not screened:
        return relay_unchanged(status, body, upstream_headers, headers, "allow" if status == 200 else "upstream_error")
    try:
        stored, replies = read_response(body)
    except MalformedReply as exc:
        upstream_failed(request, record, "malformed")
        raise UpstreamError(f"The upstream returned a malformed response: {exc}.") from exc
    chat = ThreadedRequest.model_validate({"model": str(stored.get("model") or "-"), "messages": [{"role": "user"}]})
    chat.context = tuple(without_reply(await context_of(request, Thread(previous_response_id=response_id))))
    # The model that made it picked its route then, and a renamed model does not name that route now:
    # the reply is judged by every route of this path, so none with weaker checks hands over a blocked one.
    for each in [r for r in policy.routes if r.matches(RESPONSES.path, None) and not r.passthrough]:
        blocked, failure = await decide_output(request, each, chat, replies, verdict_in=Verdict())
        if failure is not None:
            raise failure
        if blocked:
            # A background response is first checked here: withheld now, as if blocked when made.
            conversation = stored.get("conversation")
            conversation = conversation.get("id") if isinstance(conversation, dict) else None
            # Marked, not claimed: a reader of an id of unknown owner must not lock its maker out.
            marked = conversation_key(conversation if isinstance(conversation, str) else None)
            await mark_withheld(request, response_id, marked)
            refusal = refused(stored, each.refusal)
            return web.json_response(refusal, headers={**headers, "x-guardrail-decision": "block"})
    return relay_unchanged(200, body, upstream_headers, headers, record.decision)


def without_reply(turns: list[Turn]) -> list[Turn]:
    """A stored chain ends with the response's own reply: the context it answered is what precedes."""
    while turns and turns[-1].speaker == "Agent":
        turns = turns[:-1]
    return turns
