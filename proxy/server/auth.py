"""Tenants by API key. Keys are compared in constant time and never logged. With no tenants
configured the proxy is single-tenant and open (announced at startup)."""

from __future__ import annotations

import hmac
from dataclasses import dataclass

from aiohttp import web

from proxy.errors import Unauthorized
from proxy.settings import TenantSettings, resolve_secret


@dataclass(frozen=True)
class Tenant:
    name: str
    policy: str
    key: str | None


OPEN_TENANT = Tenant(name="default", policy="default", key=None)


class Tenants:
    def __init__(self, tenants: dict[str, TenantSettings]) -> None:
        self._keys: list[tuple[bytes, Tenant]] = []
        for name, settings in tenants.items():
            for key in settings.keys:
                secret = resolve_secret(key)
                self._keys.append((secret.encode(), Tenant(name, settings.policy, secret)))
        self.open = not tenants

    @property
    def policies(self) -> frozenset[str]:
        return frozenset(t.policy for _, t in self._keys)

    def identify(self, request: web.Request) -> Tenant:
        key = bearer_key(request)
        if self.open:
            return Tenant(OPEN_TENANT.name, OPEN_TENANT.policy, key)
        if key is None:
            raise Unauthorized("Missing API key: send it as 'Authorization: Bearer <key>'.")
        found = None
        given = key.encode()
        for secret, tenant in self._keys:  # every key is compared: no early exit that times can reveal
            if hmac.compare_digest(secret, given):
                found = tenant
        if found is None:
            raise Unauthorized("Incorrect API key provided.")
        return found


def bearer_key(request: web.Request) -> str | None:
    header = request.headers.get("Authorization", "")
    scheme, _, value = header.partition(" ")
    key: str | None = None
    if scheme.lower() == "bearer" and value.strip():
        key = value.strip()
    else:
        api_key = request.headers.get("api-key")  # Azure OpenAI clients send this header
        key = api_key.strip() if api_key else None
    # Keys are printable ASCII; anything else (raw non-UTF-8 bytes arrive as surrogate escapes) is
    # refused here, before it is compared, logged or forwarded.
    if key is not None and not (key.isascii() and key.isprintable()):
        raise Unauthorized("The API key contains characters that are not allowed.")
    return key
