"""config.yaml: the proxy's strict configuration (server, upstreams, tenants, guards, runner).

Loaded once at startup and by `guardrail-proxy check`; policies live in their own files (proxy/policy).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from proxy.yaml_source import ConfigError, YamlDoc, describe, load_yaml


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def resolve_secret(value: str) -> str:
    """`env:NAME` reads the environment; anything else is the literal secret."""
    if value.startswith("env:"):
        name = value[4:]
        found = os.environ.get(name)
        if found is None:
            raise ConfigError([f"environment variable {name} is not set"])
        return found
    return value


class ServerSettings(Strict):
    host: str = "127.0.0.1"
    allow_open_mode: bool = Field(
        default=False, description="serve with no tenants on a non-loopback bind (anyone reaching it is let in)"
    )
    port: int = Field(default=8080, ge=0, le=65535)
    max_body_bytes: int = Field(default=4_000_000, ge=1024)
    max_json_depth: int = Field(default=64, ge=2, le=512, description="deepest JSON nesting a client may send")
    max_json_objects: int = Field(
        default=20_000, ge=16, description="most JSON objects (messages, parts, items) in one request body"
    )
    max_json_values: int = Field(
        default=50_000, ge=16, description="most values (array entries and object members) in one request body"
    )
    keepalive_interval_s: float = Field(default=5.0, gt=0)
    max_held_bytes: int = Field(
        default=16 * 1024 * 1024, ge=1024, description="most bytes of one upstream reply held until it is checked"
    )
    max_stream_events: int = Field(default=100_000, ge=1, description="most SSE events of one held upstream stream")
    log_content: bool = False
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    policy_reload_interval_s: float = Field(default=1.0, gt=0)
    models_upstream: str | None = None
    header_timeout_s: float = Field(
        default=10.0, gt=0, description="a request's headers must be complete this long after the connection "
        "opened or the previous request ended (an idle keep-alive connection is closed after it)"
    )
    body_timeout_s: float = Field(default=30.0, gt=0, description="the whole request body must arrive within this")
    max_connections: int = Field(
        default=1024, ge=1, description="open client connections per process; past it, new ones are closed at once"
    )
    shutdown_grace_s: float = Field(
        default=5.0, ge=0, le=3600, description="on SIGTERM: /readyz answers 503 at once, new connections are "
        "still taken this long (load balancers see the 503 first), then the listening socket closes"
    )
    drain_timeout_s: float = Field(
        default=20.0, ge=0, le=86400, description="after the grace period, requests in flight (held streams "
        "included) get this long to finish; past it they are cut (a held stream ends with an error event)"
    )
    workers: int = Field(
        default=1, ge=1, le=256, description="serving processes sharing the port (SO_REUSEPORT); `serve --workers`"
    )


class UpstreamSettings(Strict):
    kind: Literal["openai", "litellm"] = "openai"
    base_url: str = ""
    api_key: str | None = None
    provider_model_prefix: str | None = None
    connect_timeout_s: float = Field(default=10.0, gt=0)
    total_timeout_s: float = Field(default=600.0, gt=0)
    read_timeout_s: float = Field(default=120.0, gt=0)
    headers: dict[str, str] = Field(default_factory=dict)
    forward_client_key: bool = False

    @model_validator(mode="after")
    def _needs_url(self) -> UpstreamSettings:
        if self.kind == "openai" and not self.base_url:
            raise ValueError("base_url is required for an openai upstream")
        if self.kind == "litellm" and not (self.provider_model_prefix or "").endswith("/"):
            # Without it the client's model string ("openai/...", "ollama/...") would pick the
            # provider, and so where the configured key is sent.
            raise ValueError("provider_model_prefix (e.g. anthropic/) is required for a litellm upstream")
        return self

    def key(self) -> str | None:
        return resolve_secret(self.api_key) if self.api_key else None


class TenantSettings(Strict):
    keys: list[str] = Field(min_length=1)
    policy: str


GuardFamily = Literal[
    "prompt-guard-1",
    "prompt-guard-2",
    "llama-guard-1",
    "llama-guard-2",
    "llama-guard-3-1b",
    "llama-guard-3-8b",
    "llama-guard-4",
]


class GuardSettings(Strict):
    family: GuardFamily
    backend: Literal["transformers", "openai", "llama-cpp", "tei"] = "transformers"
    model: str = Field(min_length=1, description="hub id, local directory, GGUF file, or remote model name")
    revision: str | None = None
    device: str = "cpu"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    quantize: Literal["none", "int8"] = Field(
        default="none",
        description="int8: dynamic int8 linear layers (cpu, transformers backend); faster, scores shift slightly",
    )
    forward_batch: int = Field(
        default=8, ge=1, description="most sequences (windows, prompts) in one forward pass; more is memory-bound"
    )
    max_tokens: int | None = Field(
        default=None,
        ge=1,
        description="tokens one check may send the model (Prompt Guard: all texts of a request, default 32768; "
        "Llama Guard: one prompt, default 8192); past it the check fails before any forward pass",
    )
    step_tokens: int = Field(
        default=512,
        ge=16,
        description="a longer check runs as steps of about this many tokens that other checks interleave with "
        "(Llama Guard prefill chunks; Prompt Guard windows, at least one per step)",
    )
    verdict_cache_entries: int = Field(
        default=4096, ge=0, description="scores kept per guard for inputs seen before (LRU); 0 disables"
    )
    prefix_cache_mb: float = Field(
        default=512, ge=0, description="Llama Guard: MiB of cached prompt-prefix key/values (LRU); 0 disables"
    )
    prefetch: bool = Field(
        default=True,
        description="Llama Guard: while the upstream answers, compute the output check's prompt up to the reply "
        "into the prefix cache (only when the guard is idle; needs prefix_cache_mb)",
    )
    # Prompt Guard
    window_tokens: int = Field(default=512, ge=8, le=512)
    window_overlap_tokens: int = Field(default=128, ge=0)
    max_windows: int = Field(default=64, ge=1)
    normalize_whitespace: bool = False
    temperature: float = Field(default=1.0, gt=0)
    # Llama Guard
    max_new_tokens: int = Field(default=20, ge=1, le=64)
    min_mass: float = Field(default=0.9, ge=0, le=1)
    # remote
    base_url: str | None = None
    api: Literal["vllm", "llama-cpp", "ollama", "tgi"] = "vllm"
    api_key: str | None = None
    timeout_s: float = Field(default=30.0, gt=0)
    tokenizer: str | None = None
    max_client_batch_size: int = Field(
        default=32, ge=1, description="tei: most windows in one /predict call (TEI's --max-client-batch-size)"
    )
    max_connections: int = Field(
        default=32, ge=1, description="tei: most /predict calls in flight to the server; more wait their turn"
    )

    @model_validator(mode="after")
    def _check(self) -> GuardSettings:
        if self.backend in ("openai", "tei") and not self.base_url:
            raise ValueError(f"base_url is required for backend: {self.backend}")
        if self.backend not in ("transformers", "tei") and self.is_prompt_guard:
            raise ValueError("Prompt Guard runs on the transformers or tei backend only")
        if self.backend == "tei" and not self.is_prompt_guard:
            raise ValueError("backend: tei serves Prompt Guard only (Llama Guard remote: backend: openai)")
        if self.quantize == "int8" and (self.backend != "transformers" or not self.device.startswith("cpu")):
            raise ValueError("quantize: int8 runs on the transformers backend on device cpu only")
        if self.window_overlap_tokens >= self.window_tokens - 2:
            raise ValueError("window_overlap_tokens must be smaller than window_tokens - 2")
        return self

    @property
    def is_prompt_guard(self) -> bool:
        return self.family.startswith("prompt-guard")

    @property
    def token_limit(self) -> int:
        """`max_tokens`, or the family's default (Meta's hosted Llama Guard took an 8K context)."""
        if self.max_tokens is not None:
            return self.max_tokens
        return 32768 if self.is_prompt_guard else 8192


class RunnerSettings(Strict):
    max_batch: int = Field(default=16, ge=1)
    max_wait_ms: float = Field(
        default=0.0,
        ge=0,
        description="how long a job waits for others to share its call; jobs queued meanwhile merge anyway",
    )
    max_queue: int = Field(default=256, ge=1)
    tenant_queue_share: float = Field(
        default=0.5, gt=0, le=1, description="fraction of max_queue one tenant's jobs may hold; past it 503"
    )
    threads: int = Field(default=0, ge=0, description="torch intra-op threads per worker; 0 = all cores but one on cpu")


class TelemetrySettings(Strict):
    """OpenTelemetry traces (the `otel` extra); off unless `enabled`."""

    enabled: bool = False
    service_name: str = Field(default="guardrail-proxy", min_length=1)
    endpoint: str | None = Field(
        default=None,
        description="OTLP/HTTP traces URL (e.g. http://collector:4318/v1/traces); "
        "unset: the OTEL_EXPORTER_OTLP_* environment variables decide",
    )
    sample_ratio: float = Field(
        default=1.0, ge=0, le=1, description="fraction of new traces recorded; a client's traceparent decides its own"
    )


class StateSettings(Strict):
    """Screened turns kept per Responses-API response (proxy/state), so a `previous_response_id` or
    `conversation` turn is judged with its context."""

    ttl_s: int = Field(default=3600, ge=1, description="seconds an entry is kept after its last write")
    max_entries: int = Field(default=10_000, ge=1, description="in-process store: most entries (LRU)")
    max_bytes: int = Field(default=64 * 1024 * 1024, ge=1024, description="in-process store: most bytes of entries")
    max_turns_per_entry: int = Field(default=64, ge=1, description="most turns of one chain; older ones are dropped")
    max_entry_bytes: int = Field(
        default=64 * 1024, ge=256, description="most bytes of one chain's JSON; older turns are dropped"
    )
    redis_url: str | None = Field(
        default=None, description="redis://, rediss:// or unix:// URL (or env:NAME): replicas share the state"
    )
    redis_timeout_s: float = Field(default=0.5, gt=0, le=30, description="bound on one store operation")
    redis_max_connections: int = Field(default=64, ge=1)
    redis_key_prefix: str = Field(default="guardrail:response:", max_length=64)
    require_owner: bool = Field(
        default=False,
        description="refuse (404) a response or conversation id whose owning tenant is unknown "
        "(expired, evicted, another replica without Redis, made before ownership was kept)",
    )

    @model_validator(mode="after")
    def _check(self) -> StateSettings:
        if self.max_entry_bytes > self.max_bytes:
            raise ValueError("max_entry_bytes must not exceed max_bytes")
        url = self.redis_url
        if url is not None and not url.startswith(("env:", "redis://", "rediss://", "unix://")):
            raise ValueError("redis_url must start with redis://, rediss://, unix:// or env:")
        return self


class Settings(Strict):
    server: ServerSettings = Field(default_factory=ServerSettings)
    upstreams: dict[str, UpstreamSettings] = Field(min_length=1)
    tenants: dict[str, TenantSettings] = Field(default_factory=dict)
    policies_dir: Path = Path("policies")
    guards: dict[str, GuardSettings] = Field(default_factory=dict)
    runner: RunnerSettings = Field(default_factory=RunnerSettings)
    state: StateSettings = Field(default_factory=StateSettings)
    telemetry: TelemetrySettings = Field(default_factory=TelemetrySettings)

    @field_validator("tenants")
    @classmethod
    def _unique_keys(cls, tenants: dict[str, TenantSettings]) -> dict[str, TenantSettings]:
        seen: dict[str, str] = {}
        for name, tenant in tenants.items():
            for key in tenant.keys:
                if key in seen:
                    raise ValueError(f"tenants {seen[key]} and {name} share an API key")
                seen[key] = name
        return tenants

    @model_validator(mode="after")
    def _models_upstream(self) -> Settings:
        up = self.server.models_upstream
        if up is not None and up not in self.upstreams:
            raise ValueError(f"server.models_upstream names unknown upstream {up!r}")
        return self


def load_settings(path: Path) -> tuple[Settings, YamlDoc]:
    doc = load_yaml(path)
    if not isinstance(doc.data, dict):
        raise ConfigError([f"{path}:1: the config must be a mapping"])
    try:
        settings = Settings.model_validate(doc.data)
    except ValidationError as exc:
        raise ConfigError(describe(doc, exc)) from exc
    if not settings.policies_dir.is_absolute():
        settings = settings.model_copy(update={"policies_dir": (path.parent / settings.policies_dir).resolve()})
    return settings, doc
