"""POST /v1/moderations: the OpenAI Moderation API served by the proxy's own guards. Parse and
authenticate as chat does, resolve the tenant's route for this path and model, run its input checks
on each input (proxy/screening/moderation.py), and answer one result per input; nothing goes upstream."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from proxy.errors import BadRequest, ModelNotFound, NotFound, NotReady, TooLargeToScreen
from proxy.guards.guard import Guard
from proxy.policy.models import RouteSettings
from proxy.protocol import ChatRequest, ContentPart, ImagePart, ImageURL, Message, TextPart
from proxy.screening.collect import decode_image
from proxy.screening.moderation import moderation_result, screen_input, verdict_of
from proxy.server.decisions import guard_failure, note
from proxy.server.json_body import read_request
from proxy.server.state import GUARDS, POLICIES, READINESS, SETTINGS, TENANTS, bind_tenant, record_of

MODERATIONS_PATH = "/v1/moderations"
PARALLEL_INPUTS = 8
"""Inputs of one request screened at once: a long list queues its checks in waves, so that one request
does not fill the guard queue (or its tenant's share of it) on its own."""


@dataclass(frozen=True)
class ModerationInput:
    """One entry of `results`: its text and images as one user message (the screening view)."""

    content: str | list[ContentPart]
    chars: int
    images: int
    text: bool


async def moderations(request: web.Request) -> web.Response:
    record = record_of(request)
    tenant = request.app[TENANTS].identify(request)
    bind_tenant(request, tenant.name)
    _, payload = await read_request(request)
    model = payload.get("model")
    if model is not None and not (isinstance(model, str) and model):
        raise BadRequest("Invalid value for 'model': expected a non-empty string.", param="model")
    policy = request.app[POLICIES].current.get(tenant.policy)
    record.policy, record.model = policy.tag, model
    route = policy.resolve(MODERATIONS_PATH, model)
    if route is None or route.passthrough:
        if model is not None:
            raise ModelNotFound(f"The model `{model}` does not exist or you do not have access to it.", param="model")
        raise NotFound(f"No policy route serves {MODERATIONS_PATH} for this tenant.")
    record.route = route.name
    if not route.input:
        raise NotFound(f"Route '{route.name}' has no input checks: it cannot moderate.")
    given = payload.get("input")
    # Counted before it is read: reading makes an object per entry on the loop (150,000 took half a second).
    if isinstance(given, list) and len(given) > route.limits.max_messages:
        what = "inputs" if isinstance(given[0], str) else "parts"
        raise BadRequest(f"Too many {what}: {len(given)} > {route.limits.max_messages}.", param="input")
    inputs = read_inputs(given)
    guards = request.app[GUARDS]
    check_limits(route, guards, inputs)
    if request.app[SETTINGS].server.log_content:
        record.prompt = payload.get("input")
    if not request.app[READINESS].ready:
        raise NotReady("Guards are still loading; retry shortly.", retry_after_s=5)
    results = await screen_all(request, route, guards, model or "moderation", inputs)
    served_by = "+".join(dict.fromkeys(check.guard for check in route.input))  # without a model: the guards
    body = {"id": "modr-" + record.request_id.removeprefix("req_"), "model": model or served_by, "results": results}
    # The decision the policy would take on these inputs (flag, block); the answer itself is never blocked.
    headers = {"x-request-id": record.request_id, "x-guardrail-policy": policy.tag}
    headers["x-guardrail-decision"] = record.decision
    return web.json_response(body, headers=headers)


async def screen_all(
    request: web.Request, route: RouteSettings, guards: dict[str, Guard], model: str, inputs: list[ModerationInput]
) -> list[dict[str, Any]]:
    gate, taxonomy = asyncio.Semaphore(PARALLEL_INPUTS), route.taxonomy()

    async def one(index: int, item: ModerationInput) -> dict[str, Any]:
        view = ChatRequest(model=model, messages=[Message(role="user", content=item.content)])
        async with gate:
            outcomes = await screen_input(route, guards, view)
        verdict = verdict_of(outcomes)
        note(request, route, verdict)
        if verdict.guard_failed:
            failure = guard_failure(verdict)
            if isinstance(failure, TooLargeToScreen):
                failure.param = f"input.{index}" if len(inputs) > 1 else "input"
            raise failure
        return moderation_result(outcomes, taxonomy, text=item.text, images=item.images > 0)

    tasks = [asyncio.ensure_future(one(index, item)) for index, item in enumerate(inputs)]
    try:
        return list(await asyncio.gather(*tasks))
    finally:  # one input's failure answers the request: the others' checks stop taking guard time
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def read_inputs(value: Any) -> list[ModerationInput]:
    """`input` as a string, a list of strings (one result each), or a list of parts (one result)."""
    if isinstance(value, str):
        return [ModerationInput(value, len(value), 0, True)]
    if not isinstance(value, list) or not value:
        raise BadRequest("'input' must be a string, a non-empty list of strings, or a list of parts.", param="input")
    if all(isinstance(v, str) for v in value):
        return [ModerationInput(v, len(v), 0, True) for v in value]
    if not all(isinstance(v, dict) for v in value):
        raise BadRequest("'input' mixes strings and parts: send one kind.", param="input")
    parts: list[ContentPart] = []
    chars = images = 0
    for p, part in enumerate(value):
        kind = part.get("type")
        if kind == "text" and isinstance(part.get("text"), str):
            parts.append(TextPart(type="text", text=part["text"]))
            chars += len(part["text"])
        elif kind == "image_url" and isinstance(part.get("image_url"), dict):
            parts.append(read_image(part["image_url"].get("url"), f"input.{p}.image_url.url"))
            images += 1
        elif kind in ("text", "image_url"):
            field = "text" if kind == "text" else "image_url"
            raise BadRequest(f"A '{kind}' part needs '{field}'.", param=f"input.{p}.{field}")
        else:
            raise BadRequest("Part types are 'text' and 'image_url'.", param=f"input.{p}.type")
    return [ModerationInput(parts, chars, images, chars > 0)]


def read_image(url: Any, param: str) -> ImagePart:
    """An inline image (remote URLs are not fetched: the guard could not see what a client sees)."""
    if not isinstance(url, str) or url.lstrip()[:5].lower() != "data:":
        raise BadRequest("Images must be inline data: URLs; this proxy does not fetch remote images.", param=param)
    part = ImagePart(type="image_url", image_url=ImageURL(url=url))
    try:
        decode_image(part)
    except BadRequest as exc:
        raise BadRequest(f"The image is not a base64 data URL: {exc.message}.", param=param) from exc
    return part


def check_limits(route: RouteSettings, guards: dict[str, Guard], inputs: list[ModerationInput]) -> None:
    """The route's limits (`max_messages` counts inputs); images only where a check's guard reads them."""
    limits = route.limits
    if len(inputs) > limits.max_messages:
        raise BadRequest(f"Too many inputs: {len(inputs)} > {limits.max_messages}.", param="input")
    chars = sum(item.chars for item in inputs)
    if chars > limits.max_characters:
        raise BadRequest(f"Too much text: {chars} characters > {limits.max_characters}.", param="input")
    images = sum(item.images for item in inputs)
    if images > limits.max_images:
        raise BadRequest(f"Too many images: {images} > {limits.max_images}.", param="input")
    if images and not any(getattr(guards.get(check.guard), "takes_images", False) for check in route.input):
        first = next(p for p, part in enumerate(inputs[0].content) if isinstance(part, ImagePart))
        raise BadRequest(
            f"No guard of route '{route.name}' reads images (Llama Guard 4 does): the image cannot be screened.",
            param=f"input.{first}",
        )
