"""Benchmark of the guards in their real shapes with random weights (reference §4); CPU by default,
`--device cuda` on a GPU host.

Prompt Guard 2 22M (DeBERTa-v3-xsmall shape) and Llama Guard 3 1B (Llama 3.2 1B shape, untied head),
loaded through the product's own guard classes and runner, scored at concurrency 1, 8 and 32, with
micro-batching (max_batch 32) and without (max_batch 1). Reports ms per check (mean latency seen by a
request, and wall time per check), and the largest event-loop gap measured by a 10 ms ticker.

Random weights give the real cost, not real verdicts. The tokenizer is the tiny demo tokenizer
(the real ones cannot be downloaded here): messages are cut to the target token counts in it.

    python bench/guards_cpu.py                 # everything below
    python bench/guards_cpu.py --only pg2      # one model
    python bench/guards_cpu.py --lg-long-max-concurrency 8
    python bench/guards_cpu.py --only pg2 --threads 2 --quantize int8 --batching on
    python bench/guards_cpu.py --deviation     # max |int8 - float32| score on random texts
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from proxy.demo.models import build_llama_tokenizer, build_prompt_guard_tokenizer
from proxy.guards.guard import ScreenText, Taxonomy, Turn
from proxy.guards.llama_guard import LlamaGuard
from proxy.guards.prompt_guard import PromptGuard
from proxy.guards.runner import GuardRunner
from proxy.settings import GuardSettings

WORDS = (
    "the garden grows near a quiet river while people read books about cooking and travel and music "
    "and everyone plans a trip to the mountains next summer"
).split(" ")


def llama3_rope(factor: float) -> dict[str, Any]:
    return {
        "rope_type": "llama3",
        "factor": factor,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }


def make_lg3_1b(out: Path) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = build_llama_tokenizer(out)
    cfg = LlamaConfig(
        vocab_size=128256,
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=64,
        max_position_embeddings=131072,
        rope_theta=500000.0,
        rope_scaling=llama3_rope(32.0),
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=tok.bos_token_id,
        pad_token_id=tok.pad_token_id,
        eos_token_id=[tok.convert_tokens_to_ids("<|eot_id|>")],
    )
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(out)
    return out


def make_pg2_22m(out: Path) -> Path:
    import torch
    from transformers import DebertaV2Config, DebertaV2ForSequenceClassification

    tok = build_prompt_guard_tokenizer(out)
    cfg = DebertaV2Config(
        vocab_size=128100,
        hidden_size=384,
        num_hidden_layers=12,
        num_attention_heads=6,
        intermediate_size=1536,
        max_position_embeddings=512,
        relative_attention=True,
        position_buckets=256,
        max_relative_positions=-1,
        norm_rel_ebd="layer_norm",
        share_att_key=True,
        pos_att_type=["p2c", "c2p"],
        position_biased_input=False,
        type_vocab_size=0,
        layer_norm_eps=1e-7,
        hidden_act="gelu",
        num_labels=2,
        pooler_hidden_size=384,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(0)
    DebertaV2ForSequenceClassification(cfg).save_pretrained(out)
    return out


def message(tokenizer: Any, tokens: int) -> str:
    """A text of exactly `tokens` tokens in `tokenizer` (benign words)."""
    words = [WORDS[i % len(WORDS)] for i in range(tokens * 2)]
    ids = tokenizer(" ".join(words), add_special_tokens=False, verbose=False).input_ids[:tokens]
    return str(tokenizer.decode(ids))


async def measure(call: Any, concurrency: int) -> dict[str, float]:
    gaps: list[float] = []
    stop = asyncio.Event()

    async def tick() -> None:
        last = time.perf_counter()
        while not stop.is_set():
            await asyncio.sleep(0.01)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now

    async def one() -> float:
        start = time.perf_counter()
        await call()
        return time.perf_counter() - start

    ticker = asyncio.create_task(tick())
    start = time.perf_counter()
    latencies = await asyncio.gather(*(one() for _ in range(concurrency)))
    wall = time.perf_counter() - start
    stop.set()
    await ticker
    return {
        "latency_ms": statistics.mean(latencies) * 1000,
        "wall_ms_per_check": wall * 1000 / concurrency,
        "max_loop_gap_ms": max(gaps, default=0.0) * 1000,
    }


def load_guard(kind: str, path: Path, runner: GuardRunner, device: str, quantize: str) -> Any:
    # Caches off: every check here costs a whole check (bench/prefix_cache.py measures the caches).
    common: dict[str, Any] = {"model": str(path), "device": device, "quantize": quantize}
    for key in ("verdict_cache_entries", "prefix_cache_mb"):
        if key in GuardSettings.model_fields:
            common[key] = 0
    if kind == "pg2":
        return PromptGuard("pg2", GuardSettings(family="prompt-guard-2", **common), runner)
    # min_mass 0: random weights put no mass on safe/unsafe (a real model would be refused otherwise)
    return LlamaGuard("lg3", GuardSettings(family="llama-guard-3-1b", min_mass=0.0, **common), runner)


async def bench_model(
    kind: str,
    path: Path,
    lengths: list[int],
    concurrencies: list[int],
    long_max: int,
    device: str = "cpu",
    *,
    threads: int = 0,
    quantize: str = "none",
    batchings: tuple[bool, ...] = (True, False),
) -> list[dict[str, Any]]:
    rows = []
    for batching in batchings:
        runner = GuardRunner(device, max_batch=32 if batching else 1, max_queue=1024, threads=threads)
        guard = load_guard(kind, path, runner, device, quantize)
        await guard.load()
        tokenizer = guard._model.tokenizer
        for length in lengths:
            text = message(tokenizer, length)
            if kind == "pg2":

                async def call(text: str = text, guard: Any = guard) -> None:
                    await guard.score_texts([ScreenText(text)])

                prompt_tokens = len(tokenizer(text, add_special_tokens=False, verbose=False).input_ids)
            else:
                turns = [Turn("User", text)]

                async def call(turns: list[Turn] = turns, guard: Any = guard) -> None:
                    # categories_from > 1: scoring only, as for a safe verdict (random weights never decide)
                    await guard.score_conversation(turns, Taxonomy(), categories_from=1.1)

                prompt_tokens = len(guard.encode(turns, Taxonomy()))
            await call()  # warm-up
            for concurrency in concurrencies:
                if length > 100 and concurrency > long_max and kind == "lg3":
                    rows.append(
                        {
                            "model": kind,
                            "message_tokens": length,
                            "prompt_tokens": prompt_tokens,
                            "concurrency": concurrency,
                            "batching": batching,
                            "skipped": True,
                        }
                    )
                    continue
                result = await measure(call, concurrency)
                row = {
                    "model": kind,
                    "threads": threads or "all-but-one",
                    "quantize": quantize,
                    "message_tokens": length,
                    "prompt_tokens": prompt_tokens,
                    "concurrency": concurrency,
                    "batching": batching,
                    **result,
                    "batches": runner.batches_run,
                }
                print(json.dumps(row), flush=True)
                rows.append(row)
        await runner.stop()
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    out = [
        "| model | threads | weights | message tokens (prompt) | concurrency | micro-batching | mean latency ms | "
        "wall ms/check | max loop gap ms |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r.get("skipped"):
            out.append(
                f"| {r['model']} | {r.get('threads', '')} | {r.get('quantize', '')} | {r['message_tokens']} "
                f"({r['prompt_tokens']}) | {r['concurrency']} | {'on' if r['batching'] else 'off'} | "
                "not run (too long on 2 cores) | | |"
            )
            continue
        out.append(
            f"| {r['model']} | {r.get('threads', '')} | {r.get('quantize', 'none')} | {r['message_tokens']} "
            f"({r['prompt_tokens']}) | {r['concurrency']} | {'on' if r['batching'] else 'off'} | "
            f"{r['latency_ms']:.0f} | {r['wall_ms_per_check']:.0f} | {r['max_loop_gap_ms']:.1f} |"
        )
    return "\n".join(out)


async def score_one(guard: Any, kind: str, text: str) -> float:
    if kind == "pg2":
        return float((await guard.score_texts([ScreenText(text)]))[0].score)
    verdict = await guard.score_conversation([Turn("User", text)], Taxonomy(), categories_from=1.1)
    return float(verdict.score_binary)


async def deviation(only: str | None) -> None:
    """Score the same texts with float32 and int8 weights; print the largest score difference."""
    with tempfile.TemporaryDirectory() as tmp:
        for kind in ("pg2", "lg3"):
            if only not in (None, kind):
                continue
            path = make_pg2_22m(Path(tmp) / kind) if kind == "pg2" else make_lg3_1b(Path(tmp) / kind)
            runner = GuardRunner("cpu", max_queue=1024)
            plain, int8 = load_guard(kind, path, runner, "cpu", "none"), load_guard(kind, path, runner, "cpu", "int8")
            await plain.load()
            await int8.load()
            tokenizer = plain._model.tokenizer
            worst, scores = 0.0, []
            lengths = (5, 30, 100, 400) if kind == "pg2" else (5, 30, 100)
            for n, length in enumerate(lengths):
                text = f"{n} " + message(tokenizer, length)
                a, b = await score_one(plain, kind, text), await score_one(int8, kind, text)
                worst = max(worst, abs(a - b))
                scores.append((round(a, 4), round(b, 4)))
            print(json.dumps({"model": kind, "max_abs_score_delta": worst, "float32_int8": scores}), flush=True)
            await runner.stop()


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--only", choices=["pg2", "lg3"], default=None)
    parser.add_argument("--device", default="cpu", help="cpu or cuda (bf16 is used on CUDA)")
    parser.add_argument("--lengths", default="30,2000")
    parser.add_argument("--concurrency", default="1,8,32")
    parser.add_argument("--lg-long-max-concurrency", type=int, default=8)
    parser.add_argument("--out", type=Path, default=None, help="write the markdown table here")
    parser.add_argument("--rows", type=Path, default=None, help="JSON lines of earlier rows to include in the table")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: all cores but one)")
    parser.add_argument("--quantize", choices=["none", "int8"], default="none")
    parser.add_argument("--batching", choices=["both", "on", "off"], default="both")
    parser.add_argument("--deviation", action="store_true", help="only: max |int8 - float32| score per model")
    args = parser.parse_args()
    if args.deviation:
        await deviation(args.only)
        return
    batchings = {"both": (True, False), "on": (True,), "off": (False,)}[args.batching]
    options: dict[str, Any] = {"threads": args.threads, "quantize": args.quantize, "batchings": batchings}
    lengths = [int(x) for x in args.lengths.split(",")]
    concurrencies = [int(x) for x in args.concurrency.split(",")]
    rows: list[dict[str, Any]] = []
    if args.rows:
        rows += [json.loads(line) for line in args.rows.read_text().splitlines() if line.strip()]
    with tempfile.TemporaryDirectory() as tmp:
        if args.only in (None, "pg2"):
            rows += await bench_model(
                "pg2", make_pg2_22m(Path(tmp) / "pg2"), lengths, concurrencies, 10**6, args.device, **options
            )
        if args.only in (None, "lg3"):
            rows += await bench_model(
                "lg3",
                make_lg3_1b(Path(tmp) / "lg3"),
                lengths,
                concurrencies,
                args.lg_long_max_concurrency,
                args.device,
                **options,
            )
    text = table(rows)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    asyncio.run(main())
