"""Loading, validating, inheriting and hot-reloading policy files.

A PolicySet is immutable; the store swaps it atomically when files change, so a request keeps the
set it started with. A reload takes the files only once their content is stable (identical across
two polls) and valid; a bad set is rejected with a logged error and the previous set keeps serving.
"""

from __future__ import annotations

import asyncio
import copy
import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import structlog
from pydantic import ValidationError

from proxy.policy.models import Policy, PolicyFile, RouteSettings
from proxy.yaml_source import ConfigError, Loc, YamlDoc, describe, parse_yaml

log = structlog.get_logger("proxy.policy")

GuardKind = Literal["text", "conversation"]
# (file name, sha256 of its bytes) for every policy file, sorted: what a set was built from.
Fingerprint = tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class PolicySet:
    policies: Mapping[str, Policy]
    fingerprint: Fingerprint = ()

    def get(self, name: str) -> Policy:
        return self.policies[name]


@dataclass
class PolicyContext:
    """What policies are checked against: the guards and upstreams the config defines."""

    guards: Mapping[str, GuardKind]
    upstreams: frozenset[str]
    required: frozenset[str] = field(default_factory=frozenset)


def _deep_merge(base: Any, over: Any) -> Any:
    if isinstance(base, dict) and isinstance(over, dict):
        out = dict(base)
        for key, value in over.items():
            out[key] = _deep_merge(base[key], value) if key in base else copy.deepcopy(value)
        return out
    return copy.deepcopy(over)


def _merge_routes(parent: list[dict[str, Any]], child: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Child routes with a parent's name override that route in place; new child routes go first
    (they are usually the more specific ones)."""
    by_name = {r.get("name"): i for i, r in enumerate(parent)}
    merged = [copy.deepcopy(r) for r in parent]
    new = []
    for route in child:
        idx = by_name.get(route.get("name"))
        if idx is None:
            new.append(copy.deepcopy(route))
        else:
            merged[idx] = _deep_merge(merged[idx], route)
    return new + merged


@dataclass(frozen=True)
class Snapshot:
    """The bytes of every policy file as read in one pass; a set is parsed from these bytes only."""

    files: Mapping[str, bytes]

    @property
    def fingerprint(self) -> Fingerprint:
        return tuple((name, hashlib.sha256(data).hexdigest()) for name, data in self.files.items())


def read_snapshot(directory: Path) -> Snapshot:
    if not directory.is_dir():
        raise ConfigError([f"{directory}: policies directory does not exist"])
    files: dict[str, bytes] = {}
    for path in sorted(directory.glob("*.yaml")) + sorted(directory.glob("*.yml")):
        try:
            files[path.name] = path.read_bytes()
        except FileNotFoundError:
            continue  # replaced or removed since the listing; the next poll sees the new state
        except OSError as exc:
            raise ConfigError([f"{path}: cannot read: {exc.strerror or exc}"]) from exc
    return Snapshot(files)


def load_policies(directory: Path, ctx: PolicyContext) -> PolicySet:
    """Read every policy file, resolve `extends:`, validate; raise ConfigError listing every problem."""
    return build_policies(directory, read_snapshot(directory), ctx)


def build_policies(directory: Path, snapshot: Snapshot, ctx: PolicyContext) -> PolicySet:
    """Validate a snapshot's files as one set; raise ConfigError listing every problem."""
    docs: dict[str, YamlDoc] = {}
    problems: list[str] = []
    for name, data in snapshot.files.items():
        try:
            doc = parse_yaml(directory / name, data)
        except ConfigError as exc:
            problems.extend(exc.problems)
            continue
        if not isinstance(doc.data, dict):
            problems.append(f"{doc.path}:1: a policy file must be a mapping")
            continue
        try:
            PolicyFile.model_validate(doc.data)
        except ValidationError as exc:
            problems.extend(describe(doc, exc))
            continue
        problems.extend(_check_routes_alone(doc))
        docs[Path(name).stem] = doc
    for needed in sorted(ctx.required | {"default"}):
        if needed not in docs and not any(p.startswith(str(directory / needed)) for p in problems):
            problems.append(f"{directory}: policy {needed!r} is referenced but {needed}.yaml does not exist")
    policies = {}
    for name in docs:
        try:
            policies[name] = _resolve(name, docs, ctx)
        except ConfigError as exc:
            problems.extend(exc.problems)
    if problems:
        raise ConfigError(sorted(set(problems), key=problems.index))
    return PolicySet(policies=policies, fingerprint=snapshot.fingerprint)


def _check_routes_alone(doc: YamlDoc) -> list[str]:
    """Validate each route of one file on its own so key errors point at that file's lines."""
    problems = []
    defaults = doc.data.get("route_defaults") or {}
    for key in defaults:
        if key not in RouteSettings.model_fields or key == "name":
            problems.append(f"{doc.where(('route_defaults', key))}: route_defaults.{key}: unknown key")
    for i, route in enumerate(doc.data.get("routes") or []):
        if not isinstance(route, dict):
            problems.append(f"{doc.where(('routes', i))}: routes[{i}]: a route must be a mapping")
            continue
        if "name" not in route:
            problems.append(f"{doc.where(('routes', i))}: routes[{i}].name: field required")
            continue
        try:
            RouteSettings.model_validate({**route})
        except ValidationError as exc:
            problems.extend(p for p in describe(doc, exc, ("routes", i)) if "field required" not in p)
    return problems


def _chain(name: str, docs: Mapping[str, YamlDoc]) -> list[str]:
    chain = [name]
    while (parent := docs[chain[-1]].data.get("extends")) is not None:
        doc = docs[chain[-1]]
        if parent not in docs:
            raise ConfigError([f"{doc.where(('extends',))}: extends: no policy named {parent!r}"])
        if parent in chain:
            raise ConfigError([f"{doc.where(('extends',))}: extends: cycle {' -> '.join([*chain, parent])}"])
        chain.append(parent)
    return chain[::-1]


def _resolve(name: str, docs: Mapping[str, YamlDoc], ctx: PolicyContext) -> Policy:
    chain = _chain(name, docs)
    defaults: dict[str, Any] = {}
    routes: list[dict[str, Any]] = []
    for member in chain:
        data = docs[member].data
        defaults = _deep_merge(defaults, data.get("route_defaults") or {})
        routes = _merge_routes(routes, list(data.get("routes") or []))
    problems: list[str] = []
    resolved = []
    for route in routes:
        origin = _origin(route["name"], chain, docs)
        try:
            settings = RouteSettings.model_validate(_deep_merge(defaults, route))
        except ValidationError as exc:
            problems.extend(describe(origin[0], exc, origin[1]))
            continue
        problems.extend(_cross_check(settings, ctx, *origin))
        resolved.append(settings)
    if not resolved and not problems:
        problems.append(f"{docs[name].where(('routes',))}: policy {name!r} has no routes")
    if problems:
        raise ConfigError(problems)
    digest = hashlib.sha256()
    for member in chain:
        digest.update(member.encode() + b"\0" + docs[member].text.encode() + b"\0")
    return Policy(
        name=name,
        version=digest.hexdigest()[:12],
        routes=tuple(resolved),
        files=tuple(str(docs[m].path) for m in chain),
    )


def _origin(route_name: str, chain: list[str], docs: Mapping[str, YamlDoc]) -> tuple[YamlDoc, Loc]:
    for member in reversed(chain):
        for i, route in enumerate(docs[member].data.get("routes") or []):
            if isinstance(route, dict) and route.get("name") == route_name:
                return docs[member], ("routes", i)
    return docs[chain[-1]], ("routes",)


def _cross_check(route: RouteSettings, ctx: PolicyContext, doc: YamlDoc, at: Loc) -> list[str]:
    problems = []
    if not route.passthrough and route.upstream not in ctx.upstreams:
        problems.append(
            f"{doc.where((*at, 'upstream'))}: routes.{route.name}.upstream: "
            f"no upstream named {route.upstream!r} in the config"
        )
    for side in ("input", "output"):
        for i, check in enumerate(getattr(route, side)):
            loc = (*at, side, i)
            kind = ctx.guards.get(check.guard)
            if kind is None:
                problems.append(
                    f"{doc.where((*loc, 'guard'))}: routes.{route.name}.{side}[{i}].guard: "
                    f"no guard named {check.guard!r} in the config"
                )
            elif kind == "conversation" and check.roles is not None:
                problems.append(
                    f"{doc.where((*loc, 'roles'))}: routes.{route.name}.{side}[{i}].roles: "
                    f"roles apply to Prompt Guard checks only"
                )
            elif kind == "text" and side == "output":
                problems.append(
                    f"{doc.where(loc)}: routes.{route.name}.output[{i}]: Prompt Guard screens "
                    "untrusted input, not replies; use a Llama Guard check"
                )
    return problems


class PolicyStore:
    """Holds the current PolicySet and reloads it when the content of the directory's files changes.

    Editors and `kubectl cp` write files in place, so a poll can see half a file that still parses
    (a truncated policy without its last checks). A new snapshot is therefore only taken once the
    next poll reads the same bytes, and it is parsed from exactly those bytes.
    """

    def __init__(self, directory: Path, ctx: PolicyContext, *, reload_interval_s: float = 1.0) -> None:
        self.directory = directory
        self.ctx = ctx
        self.reload_interval_s = reload_interval_s
        self.current = load_policies(directory, ctx)
        self.reload_failures = 0
        self._seen: Fingerprint = self.current.fingerprint  # what the previous poll read
        self._rejected: Fingerprint | None = None  # the last content rejected (logged once)

    def check_for_changes(self) -> bool:
        """One poll: True if a new set was installed."""
        try:
            snapshot = read_snapshot(self.directory)
        except ConfigError as exc:
            return self._reject((("", "\n".join(exc.problems)),), exc)
        seen, self._seen = self._seen, snapshot.fingerprint
        if snapshot.fingerprint == self.current.fingerprint:
            self._rejected = None  # back to the serving content: a later bad save is news again
            return False
        if snapshot.fingerprint == self._rejected or snapshot.fingerprint != seen:
            return False  # already reported, or changed since the last poll (maybe still being written)
        try:
            fresh = build_policies(self.directory, snapshot, self.ctx)
        except ConfigError as exc:
            return self._reject(snapshot.fingerprint, exc)
        self.current, self._rejected = fresh, None
        log.info("policy_reloaded", versions={n: p.version for n, p in fresh.policies.items()})
        return True

    def _reject(self, fingerprint: Fingerprint, exc: ConfigError) -> bool:
        if fingerprint != self._rejected:
            self._rejected = fingerprint
            self.reload_failures += 1
            log.error(
                "policy_reload_rejected",
                problems=exc.problems,
                serving={n: p.version for n, p in self.current.policies.items()},
            )
        return False

    async def watch(self) -> None:
        while True:
            await asyncio.sleep(self.reload_interval_s)
            try:
                await asyncio.to_thread(self.check_for_changes)
            except Exception:
                # A bug on one poll must not end reloading for the life of the process.
                log.exception("policy_reload_failed")
