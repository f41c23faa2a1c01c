"""Which tenant a Responses-API response (or conversation) belongs to: recorded in the response state
store when the proxy relays its creation, checked before a request reads, deletes, cancels or
continues it (proxy/server/responses.py). Tenants share the upstream's key, so an upstream id is
good for any of them: this check is what keeps one tenant's ids its own.
"""

from __future__ import annotations

from aiohttp import web

from proxy.errors import NotFound
from proxy.server.state import METRICS, RESPONSE_STATE, SETTINGS, loggable, record_of


async def claim(request: web.Request, *keys: str | None) -> None:
    """Record this request's tenant as the owner of each key (a response id, or a conversation's)."""
    store, tenant = request.app[RESPONSE_STATE], record_of(request).tenant
    if tenant is None:
        return
    for key in keys:
        if key is not None:
            await store.put_owner(key, tenant)


async def check_owner(
    request: web.Request, key: str, *, shown: str, noun: str, param: str | None = None, claimable: bool = False
) -> None:
    """A 404, as the upstream answers an id it never made, when `key` belongs to another tenant, or
    to no tenant the store knows while `state.require_owner` is set: the answer never says the id
    exists. `shown` is the id as the client wrote it. A `claimable` id of unknown owner passes even
    then: a conversation is made upstream without this proxy, so its first turn here is its claim."""
    tenant = record_of(request).tenant
    owner = await request.app[RESPONSE_STATE].get_owner(key)
    if owner == tenant or (owner is None and (claimable or not request.app[SETTINGS].state.require_owner)):
        return
    request.app[METRICS].response_owner_refusals.labels(tenant or "-").inc()
    record_of(request).error = "not_owner" if owner is not None else "owner_unknown"
    raise NotFound(f"No {noun} found with id '{loggable(shown, 256)}'.", param=param)
