"""Building the configured guards: one runner (worker thread) per device, every model loaded once
at startup in its runner's thread. `/readyz` turns true only after `load()` returns."""

from __future__ import annotations

from proxy.guards.guard import Guard
from proxy.guards.runner import GuardRunner
from proxy.settings import GuardSettings, Settings


def build_guard(
    name: str, settings: GuardSettings, runners: dict[str, GuardRunner], runner_settings: Settings | None = None
) -> Guard:
    runner = runners.setdefault(settings.device, _runner(settings.device, runner_settings))
    if settings.backend == "openai":
        from proxy.guards.remote import RemoteLlamaGuard

        return RemoteLlamaGuard(name, settings, runner)
    if settings.backend == "llama-cpp":
        from proxy.guards.gguf import GGUFLlamaGuard

        return GGUFLlamaGuard(name, settings, runner)
    if settings.backend == "tei":
        from proxy.guards.tei import TeiPromptGuard

        return TeiPromptGuard(name, settings, runner)
    if settings.is_prompt_guard:
        from proxy.guards.prompt_guard import PromptGuard

        return PromptGuard(name, settings, runner)
    from proxy.guards.llama_guard import LlamaGuard

    return LlamaGuard(name, settings, runner)


def _runner(device: str, settings: Settings | None) -> GuardRunner:
    if settings is None:
        return GuardRunner(device)
    r = settings.runner
    return GuardRunner(
        device,
        max_batch=r.max_batch,
        max_wait_ms=r.max_wait_ms,
        max_queue=r.max_queue,
        threads=r.threads,
        tenant_queue_share=r.tenant_queue_share,
    )


class GuardSet:
    def __init__(self, settings: Settings) -> None:
        self.runners: dict[str, GuardRunner] = {}
        self.guards: dict[str, Guard] = {
            name: build_guard(name, g, self.runners, settings) for name, g in settings.guards.items()
        }

    @property
    def runner_list(self) -> list[GuardRunner]:
        return list(self.runners.values())

    async def load(self) -> dict[str, Guard]:
        for guard in self.guards.values():
            load = getattr(guard, "load", None)
            if load is not None:
                await load()
        return self.guards

    async def stop(self) -> None:
        """Close remote sessions, then stop the worker threads."""
        for guard in self.guards.values():
            close = getattr(guard, "close", None)
            if close is not None:
                await close()
        for runner in self.runner_list:
            await runner.stop()
