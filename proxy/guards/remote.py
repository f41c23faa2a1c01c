"""Llama Guard served elsewhere (vLLM, llama.cpp server, Ollama, TGI), scored from first-token logprobs.

The proxy renders the exact prompt itself (never a server-side chat template it cannot control) and
reads the log-probabilities of `safe` / `unsafe` at the first generated position, so remote and
local scores mean the same (reference §5). vLLM gets token ids (exact parity, BOS included);
llama.cpp, Ollama and TGI get the text without BOS, because those servers add it. Where a
tokenizer is loaded (api vllm, or `tokenizer` set), a prompt over `max_tokens` fails before it is sent.
"""

from __future__ import annotations

import math
from typing import Any

import aiohttp

from proxy.guards.guard import ConversationScore, GuardError, GuardLimitExceeded, Taxonomy, Turn, tokens_at_least
from proxy.guards.hub import explain, load_kwargs, quiet_transformers
from proxy.guards.llama_guard_prompt import FAMILIES, Family, build, encode_hf, read_categories, read_verdict, render
from proxy.guards.runner import GuardRunner
from proxy.settings import GuardSettings, resolve_secret

TOP = 20


def verdict_probs(top: dict[str, float], family: Family) -> tuple[float, float]:
    """P(safe), P(unsafe) from a {token: logprob} map of the first position, counting the spellings
    the family counts locally. A missing word is below every listed token: counted as 0."""
    safe_texts, unsafe_texts = family.verdict_texts("safe"), family.verdict_texts("unsafe")
    safe = unsafe = 0.0
    for token, logprob in top.items():
        text = token.replace("Ġ", " ").replace("▁", " ")
        if text in safe_texts:
            safe += math.exp(logprob)
        elif text in unsafe_texts:
            unsafe += math.exp(logprob)
    return safe, unsafe


class RemoteLlamaGuard:
    def __init__(self, name: str, settings: GuardSettings, runner: GuardRunner) -> None:
        self.name = name
        self.settings = settings
        self.family = FAMILIES[settings.family]
        self.runner = runner
        self.base_url = (settings.base_url or "").rstrip("/")
        self._tokenizer: Any = None
        self._session: aiohttp.ClientSession | None = None
        key = resolve_secret(settings.api_key) if settings.api_key else None
        self._headers = {"Authorization": f"Bearer {key}"} if key else {}

    async def load(self) -> None:
        if self.settings.api == "vllm" or self.settings.tokenizer:
            self._tokenizer = await self.runner.call(self._load_tokenizer)
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.settings.timeout_s))

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    def _load_tokenizer(self) -> Any:
        from transformers import AutoTokenizer

        quiet_transformers()
        source = self.settings.tokenizer or self.settings.model
        try:
            return AutoTokenizer.from_pretrained(source, **load_kwargs(self.settings.revision))
        except Exception as exc:
            raise explain(self.name, source, exc) from exc

    def _ids(self, turns: list[Turn], taxonomy: Taxonomy) -> list[int]:
        self._check_prefix(turns)
        try:
            ids: list[int] = encode_hf(build(self.family, turns, taxonomy), self._tokenizer)
        except GuardError:
            raise
        except Exception as exc:  # the tokenizer's own error types; the text itself is never quoted
            raise GuardError(f"guard {self.name!r}: the conversation cannot be encoded ({type(exc).__name__})") from exc
        self._check_length(len(ids))
        return ids

    def _count(self, text: str) -> int:
        try:
            return len(self._tokenizer(text, add_special_tokens=False, verbose=False).input_ids)
        except Exception as exc:
            raise GuardError(f"guard {self.name!r}: the conversation cannot be encoded ({type(exc).__name__})") from exc

    def _check_prefix(self, turns: list[Turn]) -> None:
        limit = self.settings.token_limit
        head = tokens_at_least(self._count, "\n".join(turn.text for turn in turns), limit)
        if head is not None:
            raise GuardLimitExceeded("the conversation", head, limit, self.name, at_least=True)

    def _check_text(self, turns: list[Turn], text: str) -> None:
        self._check_prefix(turns)
        self._check_length(self._count(text))

    def _check_length(self, tokens: int) -> None:
        if tokens > self.settings.token_limit:
            raise GuardLimitExceeded("the conversation", tokens, self.settings.token_limit, self.name)

    def _text(self, turns: list[Turn], taxonomy: Taxonomy) -> str:
        """The prompt text without its BOS (the server adds one). Text servers parse special-token
        strings anywhere in the prompt, so in message text `<|` becomes `< |`: a user cannot type
        a turn boundary or a verdict."""
        safe_turns = [Turn(t.speaker, t.text.replace("<|", "< |"), t.images) for t in turns]
        return render(build(self.family, safe_turns, taxonomy)).removeprefix(self.family.bos)

    async def _post(self, path: str, body: dict[str, Any]) -> Any:
        if self._session is None:
            raise GuardError(f"guard {self.name!r} is not loaded")
        try:
            async with self._session.post(self.base_url + path, json=body, headers=self._headers) as resp:
                if resp.status != 200:
                    raise GuardError(f"guard {self.name!r}: {self.base_url}{path} answered {resp.status}")
                return await resp.json(content_type=None)
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise GuardError(f"guard {self.name!r}: {self.base_url} unreachable ({type(exc).__name__})") from exc

    async def _first_token(self, prompt: Any, max_tokens: int) -> tuple[dict[str, float], str]:
        """({token: logprob} at the first position, generated text)."""
        try:
            return await self._ask(prompt, max_tokens)
        except (KeyError, IndexError, TypeError, ValueError, AttributeError) as exc:
            raise GuardError(f"guard {self.name!r}: unexpected reply shape from {self.settings.api}") from exc

    async def _ask(self, prompt: Any, max_tokens: int) -> tuple[dict[str, float], str]:
        api, model = self.settings.api, self.settings.model
        if api in ("vllm", "llama-cpp"):
            data = await self._post(
                "/completions",
                {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "logprobs": TOP},
            )
            choice = data["choices"][0]
            tops = (choice.get("logprobs") or {}).get("top_logprobs") or [{}]
            return dict(tops[0] or {}), choice.get("text", "")
        if api == "ollama":
            data = await self._post(
                "/api/generate",
                {
                    "model": model,
                    "prompt": prompt,
                    "raw": True,
                    "stream": False,
                    "logprobs": True,
                    "top_logprobs": TOP,
                    "options": {"temperature": 0, "num_predict": max_tokens},
                },
            )
            first = (data.get("logprobs") or [{}])[0]
            return {t["token"]: t["logprob"] for t in first.get("top_logprobs") or []}, data.get("response", "")
        data = await self._post(
            "/generate",
            {
                "inputs": prompt,
                "parameters": {"max_new_tokens": max_tokens, "do_sample": False, "details": True, "top_n_tokens": 5},
            },
        )
        details = data.get("details") or {}
        top = (details.get("top_tokens") or [[]])[0]
        return {t["text"]: t["logprob"] for t in top}, data.get("generated_text", "")

    async def score_conversation(
        self, turns: list[Turn], taxonomy: Taxonomy, *, categories_from: float = 0.5
    ) -> ConversationScore:
        if self.settings.api == "vllm":
            if self._tokenizer is None:
                raise GuardError(f"guard {self.name!r} is not loaded")
            prompt: Any = await self.runner.call(lambda: self._ids(turns, taxonomy))
        else:
            prompt = self._text(turns, taxonomy)
            if self._tokenizer is not None:
                text = prompt
                await self.runner.call(lambda: self._check_text(turns, text))
        top, _ = await self._first_token(prompt, 1)
        unsafe, binary, mass = read_verdict(self.family, *verdict_probs(top, self.family), self.settings.min_mass)
        categories: tuple[str, ...] = ()
        all_excluded = False
        if max(unsafe, binary) >= categories_from:
            continued = (
                [*prompt, self._tokenizer.convert_tokens_to_ids("unsafe")]
                if isinstance(prompt, list)
                else prompt + "unsafe"
            )
            _, text = await self._first_token(continued, self.settings.max_new_tokens)
            categories, all_excluded = read_categories(text, taxonomy)
        return ConversationScore(unsafe, binary, mass, categories=categories, all_excluded=all_excluded)
