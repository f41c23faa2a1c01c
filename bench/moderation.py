"""What the moderation endpoint's category distribution costs on top of a Llama Guard check: a random
Llama Guard 3 1B-shaped model (bench/guards_cpu.py's), caches off, one request at a time; the median of
`--repeats` calls of a check (verdict only), a check that reads its greedy categories, and
score_categories (verdict + one short forward per listed code). Prints a markdown table.

    flock /tmp/bench.lock .venv/bin/python -m bench.moderation --out bench/results-moderation.md
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.guards_cpu import make_lg3_1b, message
from proxy.guards.guard import Taxonomy, Turn
from proxy.guards.llama_guard import LlamaGuard
from proxy.guards.runner import GuardRunner
from proxy.settings import GuardSettings


async def median_ms(call: Any, repeats: int) -> float:
    await call()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        await call()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--lengths", default="30,300")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    runner = GuardRunner("cpu", max_wait_ms=0)
    rows = ["| user tokens | check (verdict) ms | check + greedy categories ms | score_categories ms |"]
    rows.append("|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        path = await asyncio.to_thread(make_lg3_1b, Path(tmp) / "lg3-1b")
        settings = GuardSettings(
            family="llama-guard-3-1b", model=str(path), min_mass=0.0, prefix_cache_mb=0, verdict_cache_entries=0
        )
        guard = LlamaGuard("lg3", settings, runner)
        await guard.load()
        assert guard._model is not None
        for tokens in (int(n) for n in args.lengths.split(",")):
            turns = [Turn("User", message(guard._model.tokenizer, tokens))]

            async def verdict(turns: list[Turn] = turns) -> None:
                await guard.score_conversation(turns, Taxonomy(), categories_from=1.1)

            async def greedy(turns: list[Turn] = turns) -> None:
                await guard.score_conversation(turns, Taxonomy(), categories_from=0.0)

            async def distribution(turns: list[Turn] = turns) -> None:
                await guard.score_categories(turns, Taxonomy(), categories_from=1.1)

            cells = [f"{await median_ms(fn, args.repeats):.0f}" for fn in (verdict, greedy, distribution)]
            rows.append(f"| {tokens} | " + " | ".join(cells) + " |")
    await runner.stop()
    table = "\n".join(rows)
    print(table)
    if args.out is not None:
        args.out.write_text(
            "# Moderation: the cost of the category distribution (CPU)\n\n"
            "Random Llama Guard 3 1B-shaped model (16 layers, hidden 2048, vocab 128256), float32, caches off, "
            f"one request at a time, median of {args.repeats}. Figures from a shared 2-core VM (other jobs ran "
            "beside it): compare the columns of one row, not with other files.\n\n"
            "Command: `flock /tmp/bench.lock .venv/bin/python -m bench.moderation --out bench/results-moderation.md`"
            "\n\n" + table + "\n"
        )


if __name__ == "__main__":
    asyncio.run(main())
