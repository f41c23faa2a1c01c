"""Policy file models (strict: unknown keys are errors) and the resolved, immutable Policy."""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from proxy.guards.guard import Category, Taxonomy

Role = Literal["user", "tool", "system", "assistant"]
DEFAULT_TEXT_ROLES: tuple[Role, ...] = ("user", "tool")


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class CheckSettings(Strict):
    guard: str = Field(min_length=1)
    threshold: float = Field(default=0.5, ge=0.0, le=1.0)
    roles: tuple[Role, ...] | None = Field(
        default=None, description="Prompt Guard only: which roles' texts are scored (default user, tool)"
    )
    score: Literal["full", "binary"] = Field(
        default="full", description="Llama Guard only: full-vocabulary or safe/unsafe-renormalised P(unsafe)"
    )
    mode: Literal["enforce", "monitor"] | None = Field(default=None, description="overrides the route's mode")


class CategorySettings(Strict):
    code: str = Field(pattern=r"^[A-Z]\d{1,3}$")
    name: str = Field(min_length=1)
    description: str | None = None


class LimitSettings(Strict):
    max_messages: int = Field(default=500, ge=1)
    max_characters: int = Field(default=1_000_000, ge=1)
    max_images: int = Field(default=5, ge=0)


class MatchSettings(Strict):
    path: str | tuple[str, ...] = Field(
        default="/v1/chat/completions",
        description="a glob of the client's path, or a list of them (any one matches)",
    )
    model: str = "*"

    def paths(self) -> tuple[str, ...]:
        return (self.path,) if isinstance(self.path, str) else self.path


class RouteSettings(Strict):
    name: str = Field(min_length=1)
    match: MatchSettings = Field(default_factory=MatchSettings)
    upstream: str = "default"
    rename_model: str | None = None
    passthrough: bool = False
    forward_headers: tuple[str, ...] = Field(
        default=(), description="client headers forwarded upstream besides accept and user-agent (case-insensitive)"
    )
    mode: Literal["enforce", "monitor"] = "enforce"
    on_block: Literal["refuse", "error"] = "refuse"
    hold_headers_s: float | None = Field(
        default=None,
        ge=0,
        le=600,
        description=(
            "how long a held stream's headers wait for the decision before the first keep-alive sends "
            "them (default: server.keepalive_interval_s); keep it under the load balancer's idle timeout"
        ),
    )
    refusal: str = "I'm sorry, but I can't help with that."
    on_guard_error: Literal["block", "allow"] = "block"
    guard_timeout_s: float = Field(default=10.0, gt=0)
    stream: Literal["buffer", "incremental"] = Field(
        default="buffer", description="buffer: hold the whole reply until checked; incremental: release checked windows"
    )
    release_tokens: int = Field(
        default=48, ge=1, le=100_000, description="incremental: new tokens (4 characters each) of a choice per check"
    )
    release_on: Literal["sentence"] | None = Field(
        default=None, description="incremental: also check (and release) at the end of each sentence"
    )
    screen_system: bool = False
    unscreened_parts: tuple[str, ...] = Field(
        default=(), description="content part types (e.g. input_audio, file) let through unscreened and recorded"
    )
    input: tuple[CheckSettings, ...] = ()
    output: tuple[CheckSettings, ...] = ()
    excluded_categories: tuple[str, ...] = ()
    custom_categories: tuple[CategorySettings, ...] = ()
    replace_categories: bool = False
    limits: LimitSettings = Field(default_factory=LimitSettings)

    @field_validator("excluded_categories")
    @classmethod
    def _codes(cls, codes: tuple[str, ...]) -> tuple[str, ...]:
        import re

        for code in codes:
            if not re.fullmatch(r"[A-Z]\d{1,3}", code):
                raise ValueError(f"{code!r} is not a category code like S6")
        return codes

    @field_validator("forward_headers")
    @classmethod
    def _forwardable(cls, names: tuple[str, ...]) -> tuple[str, ...]:
        import re

        from proxy.upstream.relay import NEVER_FORWARDED

        out = []
        for name in names:
            lower = name.strip().lower()
            if not re.fullmatch(r"[a-z0-9!#$%&'*+.^_`|~-]+", lower):
                raise ValueError(f"{name!r} is not an HTTP header name")
            if lower in NEVER_FORWARDED or lower.startswith("x-guardrail"):
                raise ValueError(
                    f"{name!r} is never forwarded: credentials, hop-by-hop headers and headers the proxy sets "
                    "itself cannot be listed in forward_headers"
                )
            out.append(lower)
        return tuple(dict.fromkeys(out))

    @model_validator(mode="after")
    def _replace_needs_custom(self) -> RouteSettings:
        if self.replace_categories and not self.custom_categories:
            raise ValueError("replace_categories: true needs custom_categories")
        return self

    def matches(self, path: str, model: str | None) -> bool:
        if not any(fnmatch.fnmatchcase(path, glob) for glob in self.match.paths()):
            return False
        return model is None or fnmatch.fnmatchcase(model, self.match.model)

    def taxonomy(self) -> Taxonomy:
        return Taxonomy(
            custom=tuple(Category(c.code, c.name, c.description) for c in self.custom_categories),
            replace=self.replace_categories,
            excluded=frozenset(self.excluded_categories),
        )


class PolicyFile(Strict):
    """One file as written: every key optional so a child can name only what it overrides."""

    extends: str | None = None
    description: str | None = None
    route_defaults: dict[str, object] = Field(default_factory=dict)
    routes: tuple[dict[str, object], ...] = ()


@dataclass(frozen=True)
class Policy:
    name: str
    version: str
    routes: tuple[RouteSettings, ...]
    files: tuple[str, ...]

    @property
    def tag(self) -> str:
        return f"{self.name}@{self.version}"

    def resolve(self, path: str, model: str | None) -> RouteSettings | None:
        for route in self.routes:
            if route.matches(path, model):
                return route
        return None
