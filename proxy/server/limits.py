"""A request against its route's limits, on the shared request path: the count of its messages (items,
prompts) before they are read, then its turns, text and images once read as chat, and the part types
it may send unscreened."""

from __future__ import annotations

from typing import Any

from proxy.errors import BadRequest
from proxy.policy.models import RouteSettings
from proxy.protocol import ChatRequest
from proxy.screening.collect import count_limits, unscreened_parts
from proxy.server.wire import WireFormat


def check_count(route: RouteSettings | None, payload: dict[str, Any], wire: WireFormat) -> None:
    """A list of messages, items or prompts over the route's `max_messages` is a 400 before it is read:
    reading takes time per entry on the loop (a megabyte of one-letter items took seconds)."""
    given = payload.get(wire.prompt_field)
    if route is not None and isinstance(given, list) and len(given) > route.limits.max_messages:
        raise BadRequest(f"Too many messages: {len(given)} > {route.limits.max_messages}.", param=wire.prompt_field)


def check_limits(route: RouteSettings, chat: ChatRequest, param: str = "messages") -> list[str]:
    """Raise a 400 past a limit (naming the wire format's `param`) or for a part the route cannot
    screen; return the part types that go upstream unscreened because the route allows them."""
    limits = route.limits
    if len(chat.messages) > limits.max_messages:
        raise BadRequest(f"Too many messages: {len(chat.messages)} > {limits.max_messages}.", param=param)
    chars, images = count_limits(chat)
    if chars > limits.max_characters:
        raise BadRequest(f"Too much text: {chars} characters > {limits.max_characters}.", param=param)
    if images > limits.max_images:
        raise BadRequest(f"Too many images: {images} > {limits.max_images}.", param=param)
    return unscreened_parts(chat, route.unscreened_parts)
