"""Benchmark of the Llama Guard prefix KV cache on Llama Guard 3 1B in its real shape (random weights,
bench/guards_cpu.py), through the product's guard class and runner, one check at a time.

Same process, same model, same run: each check is timed with the prefix cache off (today's path) and
on, in the state a chat leaves it (the policy headers of both roles already cached by earlier
checks). The verdict cache is off throughout (it would answer exact repeats without any forward).
- input check of a 30-token user message: uncached vs warm (header cached);
- output check of a 100-token reply right after its input check: uncached vs cached;
- the same output check when the prefetch ran between the two (as it does while the upstream
  writes the reply: screening/prefetch.py), and when the reply came as a held stream that the
  prefetch followed every 24 tokens (if the guard keeps up with the stream); the prefetches' own
  time is reported beside them (it is spent while the upstream writes, not on the check's path);
- a 10-turn conversation from consecutive mt_bench questions with short fake replies, each turn's
  input and output checks in order: the 1st and 10th turns' input checks, cached and uncached.
Scores with and without the cache are compared on every measured check (max |delta| reported).

    python bench/prefix_cache.py                    # prints JSON rows and the markdown table
    python bench/prefix_cache.py --out bench/results-prefix-cache.md --repeat 3
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from proxy.guards.guard import ConversationScore, Taxonomy, Turn
from proxy.guards.llama_guard import LlamaGuard
from proxy.guards.runner import GuardRunner
from proxy.screening.prefetch import PLACEHOLDERS
from proxy.settings import GuardSettings

MT_BENCH = Path("/work/shared/data/mt_bench/mt_bench/question.jsonl")
WORDS = (
    "the garden grows near a quiet river while people read books about cooking and travel and music "
    "and everyone plans a trip to the mountains next summer with friends from school"
).split(" ")


def text_of(tokenizer: Any, tokens: int, offset: int) -> str:
    """A benign text of exactly `tokens` tokens, different for each `offset`."""
    words = [WORDS[(i * 7 + offset) % len(WORDS)] for i in range(tokens * 2)]
    ids = tokenizer(f"{offset} " + " ".join(words), add_special_tokens=False, verbose=False).input_ids[:tokens]
    return str(tokenizer.decode(ids))


def mt_bench_chat(turns: int, tokenizer: Any) -> list[Turn]:
    """`turns` user questions from consecutive mt_bench lines, each followed by a short fake reply."""
    lines = [json.loads(line) for line in MT_BENCH.read_text().splitlines() if line.strip()]
    questions = [q for line in lines for q in line["turns"]][:turns]
    chat: list[Turn] = []
    for n, question in enumerate(questions):
        chat += [Turn("User", question), Turn("Agent", text_of(tokenizer, 20, 100 + n))]
    return chat


class Bench:
    def __init__(self, guard: LlamaGuard, repeat: int) -> None:
        self.guard = guard
        self.repeat = repeat
        self.limit = guard.prefix_cache.max_bytes
        self.deltas: list[float] = []
        self.prefetch_ms: dict[str, list[float]] = {}
        self.computed = 0

    async def timed(self, turns: list[Turn], cached: bool) -> tuple[float, ConversationScore]:
        self.guard.prefix_cache.max_bytes = self.limit if cached else 0  # 0: the path without a cache
        computed = self.guard.prefix_cache.computed_tokens
        start = time.perf_counter()
        score = await self.guard.score_conversation(turns, Taxonomy(), categories_from=1.1)
        self.computed = self.guard.prefix_cache.computed_tokens - computed
        return (time.perf_counter() - start) * 1000, score

    async def pair(
        self,
        setup: Callable[[int], list[list[Turn]]],
        measured: Callable[[int], list[Turn]],
        prefetch: Callable[[int], list[tuple[list[Turn], str]]] | None = None,
        kind: str = "",
    ) -> Row:
        """Median ms of the measured check uncached and cached (after the setup checks, cached, and
        the prefetches `prefetch(n)` gives: the conversation and the reply so far, in order)."""
        off, on, computed = [], [], []
        for n in range(self.repeat):
            for turns in setup(n):
                await self.timed(turns, cached=True)
            start = time.perf_counter()
            for turns, so_far in prefetch(n) if prefetch is not None else []:
                conversations = [[*turns, Turn("Agent", so_far + text)] for text in PLACEHOLDERS]
                assert await self.guard.prefetch(conversations, Taxonomy()) == "done"
            if prefetch is not None:
                self.prefetch_ms.setdefault(kind, []).append((time.perf_counter() - start) * 1000)
            ms_on, a = await self.timed(measured(n), cached=True)
            computed.append(self.computed)
            ms_off, b = await self.timed(measured(n), cached=False)
            self.deltas += [abs(a.score - b.score), abs(a.score_binary - b.score_binary)]
            on.append(ms_on)
            off.append(ms_off)
        tokens = len(self.guard.encode(measured(0), Taxonomy()))
        return Row(tokens, statistics.median(off), statistics.median(on), int(statistics.median(computed)))


class Row:
    def __init__(self, tokens: int, off_ms: float, on_ms: float, computed: int) -> None:
        self.tokens, self.off_ms, self.on_ms, self.computed = tokens, off_ms, on_ms, computed


async def run(path: Path, repeat: int) -> str:
    runner = GuardRunner("cpu", max_queue=1024)
    settings = GuardSettings(family="llama-guard-3-1b", model=str(path), min_mass=0.0, verdict_cache_entries=0)
    guard = LlamaGuard("lg3", settings, runner)  # min_mass 0: random weights put no mass on safe/unsafe
    await guard.load()
    tok = guard._model.tokenizer  # type: ignore[union-attr]
    bench = Bench(guard, repeat)
    user = [Turn("User", text_of(tok, 30, n)) for n in range(repeat + 2)]
    reply = [Turn("Agent", text_of(tok, 100, 50 + n)) for n in range(repeat + 2)]
    # Both roles' headers cached, as any earlier check of the chat leaves them.
    for turns in ([user[-1]], [user[-1], reply[-1]]):
        await bench.timed(turns, cached=True)
    rows: dict[str, Row] = {}
    rows["input"] = await bench.pair(lambda n: [], lambda n: [user[n]])
    rows["output"] = await bench.pair(lambda n: [[user[n]]], lambda n: [user[n], reply[n]])
    user = [Turn("User", text_of(tok, 30, 200 + n)) for n in range(repeat)]  # new messages: nothing cached
    rows["prefetched"] = await bench.pair(
        lambda n: [[user[n]]], lambda n: [user[n], reply[n]], lambda n: [([user[n]], "")], kind="prefetched"
    )
    user = [Turn("User", text_of(tok, 30, 300 + n)) for n in range(repeat)]

    def streamed(n: int) -> list[tuple[list[Turn], str]]:
        """The conversation, then the reply so far every 24 events (the first event is the role)."""
        ids = tok(reply[n].text, add_special_tokens=False, verbose=False).input_ids
        return [([user[n]], "")] + [([user[n]], str(tok.decode(ids[:k]))) for k in range(23, len(ids), 24)]

    rows["streamed"] = await bench.pair(
        lambda n: [[user[n]]], lambda n: [user[n], reply[n]], streamed, kind="streamed"
    )
    chats = [mt_bench_chat(10 + n, tok)[2 * n :] for n in range(repeat)]  # a different chat per repeat
    rows["turn1"] = await bench.pair(lambda n: [], lambda n: chats[n][:1])
    rows["turn10"] = await bench.pair(lambda n: [chats[n][:end] for end in range(1, 19)], lambda n: chats[n][:19])
    await runner.stop()
    out = {name: vars(row) for name, row in rows.items()}
    out["max_abs_delta"] = max(bench.deltas)  # type: ignore[assignment]
    prefetch_ms = {kind: statistics.median(times) for kind, times in bench.prefetch_ms.items()}
    out["prefetch_ms"] = prefetch_ms  # type: ignore[assignment]
    print(json.dumps(out), flush=True)
    return table(rows, max(bench.deltas), runner.threads, prefetch_ms)


def table(rows: dict[str, Row], delta: float, threads: int, prefetch_ms: dict[str, float]) -> str:
    names = {
        "input": "input check, 30-token user message (header cached)",
        "output": "output check, 100-token reply, right after its input check",
        "prefetched": "the same, with the prefetch run while the upstream answers",
        "streamed": "the same, the reply a held stream the prefetch followed (every 24 tokens)",
        "turn1": "1st turn of an mt_bench chat, input check",
        "turn10": "10th turn of the same chat, input check (turns 1-9 checked before)",
    }
    lines = [
        "| check | prompt tokens | tokens the cached check computes | uncached ms | cached ms | speedup |",
        "|---|---|---|---|---|---|",
    ]
    for key, label in names.items():
        r = rows[key]
        lines.append(
            f"| {label} | {r.tokens} | {r.computed} | {r.off_ms:.0f} | {r.on_ms:.0f} | {r.off_ms / r.on_ms:.1f}x |"
        )
    t1, t10 = rows["turn1"], rows["turn10"]
    lines += [
        "",
        f"10th turn / 1st turn: uncached {t10.off_ms / t1.off_ms:.2f}x, cached {t10.on_ms / t1.on_ms:.2f}x. "
        f"Largest |score delta| cached vs uncached over all measured checks: {delta:.2e}. "
        f"Runner threads setting: {threads} (0 = all cores but one). The prefetches themselves took "
        f"{prefetch_ms['prefetched']:.0f} ms (conversation) and {prefetch_ms['streamed']:.0f} ms (conversation "
        "and reply, all steps), while the upstream writes its reply, not on the check's path.",
    ]
    return "\n".join(lines)


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None, help="write the markdown table here")
    parser.add_argument("--model", type=Path, default=None, help="a Llama Guard 3 directory instead (a smoke run)")
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).parent))
    from guards_cpu import make_lg3_1b  # type: ignore[import-not-found]

    with tempfile.TemporaryDirectory() as tmp:
        text = await run(args.model or make_lg3_1b(Path(tmp) / "lg3"), args.repeat)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    asyncio.run(main())
