"""Load run of the scale-out path on one machine: `serve --workers 2`, Llama Guard on a fake vLLM and
Prompt Guard on a fake TEI (both computing with the tiny demo models), a fake OpenAI upstream, and a
client at concurrency 32 for `--duration` seconds. Reports throughput, p50/p99 latency and what the
proxy adds over the upstream alone, the workers' RSS over time, errors, and the drain: one worker is
sent SIGTERM mid-run (the parent starts a new one) and every failed request around it is counted.

Processes: the fakes (one process: upstream, vLLM, TEI), the proxy (parent + workers), and this
client. The client never retries: a request lost in the restart shows as an error.

    python bench/scale_out.py                        # 600 s, the Measure run of issue 11
    python bench/scale_out.py --duration 60 --baseline-s 10
    python bench/scale_out.py --memory               # memory of each worker per guard placement
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]
from proxy_path import GUARDED as POLICY  # noqa: E402  (Prompt Guard + Llama Guard in, Llama Guard out)
from proxy_path import upstream_handler  # noqa: E402  (16-token replies, JSON or SSE)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ---- the fakes, run as `python bench/scale_out.py serve-fakes MODELS` ----


async def serve_fakes(models: Path) -> None:
    from aiohttp import web

    from tests.fakes.tei import start_fake_tei
    from tests.fakes.vllm import FakeVLLM

    vllm = await (await asyncio.to_thread(FakeVLLM, models / "llama-guard")).start()
    tei = await start_fake_tei(models / "prompt-guard")
    app = web.Application()
    app.router.add_post("/v1/chat/completions", upstream_handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    print(json.dumps({"vllm": vllm.url, "tei": tei.url, "upstream": f"http://127.0.0.1:{port}/v1"}), flush=True)
    while True:  # the fakes keep every request for tests; a long run must not grow them
        await asyncio.sleep(5)
        vllm.requests.clear()
        tei.requests.clear()
        tei.seen.clear()
        tei.headers.clear()


# ---- the driver ----


def start_fakes(models: Path) -> tuple[subprocess.Popen[bytes], dict[str, str]]:
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, __file__, "serve-fakes", str(models)], stdout=subprocess.PIPE, env=env)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line:
        raise SystemExit("the fakes failed to start")
    return proc, json.loads(line)


def write_config(
    tmp: Path, urls: dict[str, str], models: Path, in_process: Path | None = None, guard_timeout_s: float = 10
) -> Path:
    """`guard_timeout_s`: the route's (10, the default, under load; --memory waits for CPU-bound checks)."""
    (tmp / "policies").mkdir(exist_ok=True)
    policy = POLICY.replace("    input:", f"    guard_timeout_s: {guard_timeout_s}\n    input:")
    (tmp / "policies" / "default.yaml").write_text(policy)
    if in_process is None:  # the scale-out placement: both guards served elsewhere
        guards: dict[str, Any] = {
            "prompt_guard": {"family": "prompt-guard-2", "backend": "tei", "base_url": urls["tei"],
                             "model": str(models / "prompt-guard")},
            "llama_guard": {"family": "llama-guard-3-1b", "backend": "openai", "api": "vllm",
                            "base_url": urls["vllm"], "model": "llama-guard",
                            "tokenizer": str(models / "llama-guard")},
        }  # fmt: skip
    else:
        guards = {
            "prompt_guard": {"family": "prompt-guard-2", "model": str(in_process / "prompt-guard")},
            # min_mass 0: random weights put little mass on safe/unsafe, a guard error (503) otherwise
            "llama_guard": {"family": "llama-guard-3-1b", "model": str(in_process / "llama-guard"), "min_mass": 0},
        }
    config = {
        "server": {"host": "127.0.0.1"},
        "upstreams": {"default": {"base_url": urls["upstream"], "api_key": "bench-upstream-key"}},
        "policies_dir": str(tmp / "policies"),
        "guards": guards,
    }
    path = tmp / "config.yaml"
    path.write_text(json.dumps(config))
    return path


def start_proxy(config: Path, port: int, workers: int, log: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True", "TOKENIZERS_PARALLELISM": "false",
           "HF_HUB_OFFLINE": "1"}  # fmt: skip
    args = ["serve", "--config", str(config), "--port", str(port), "--workers", str(workers)]
    with log.open("ab") as out:  # request log lines and events (worker starts, drains) for reading later
        return subprocess.Popen([sys.executable, "-m", "proxy", *args], stdout=out, stderr=out, env=env, cwd=ROOT)


def children(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            fields = stat.rsplit(")", 1)[1].split()
            if int(fields[1]) == pid and fields[0] != "Z":
                out.append(int(entry.name))
    return sorted(out)


def rss_mib(pid: int, field: str = "VmRSS") -> float | None:
    """`RssAnon`: the process's own pages; `RssFile`: pages of mapped files (weights loaded without a
    copy), which processes mapping the same file share."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


async def ready(url: str, want_pids: int, timeout_s: float = 600) -> set[int]:
    """Wait until `want_pids` distinct processes answered /readyz 200."""
    seen: set[int] = set()
    deadline = time.monotonic() + timeout_s
    async with aiohttp.ClientSession() as session:
        while len(seen) < want_pids:
            if time.monotonic() > deadline:
                raise SystemExit("the proxy did not become ready")
            try:
                async with session.get(url + "/readyz", headers={"Connection": "close"}) as reply:
                    if reply.status == 200:
                        seen.add((await reply.json())["pid"])
            except aiohttp.ClientError:
                await asyncio.sleep(0.2)
    return seen


@dataclass
class Run:
    results: list[tuple[float, float, str]] = field(default_factory=list)  # (start, seconds, outcome)
    rss: list[dict[str, Any]] = field(default_factory=list)
    events: dict[str, float] = field(default_factory=dict)
    details: list[str] = field(default_factory=list)  # the first failures' messages
    t0: float = field(default_factory=time.perf_counter)
    counter: int = 0


async def one(session: aiohttp.ClientSession, url: str, run: Run) -> None:
    run.counter += 1
    stream = run.counter % 2 == 0
    # A new text each time: no verdict cache answers, every request runs its three checks.
    text = f"What is the capital of France? (question {run.counter})"
    body = {"model": "m", "stream": stream, "messages": [{"role": "user", "content": text}]}
    start = time.perf_counter()
    try:
        async with session.post(url + "/v1/chat/completions", json=body) as reply:
            data = await reply.read()
        if reply.status != 200:
            outcome = f"http_{reply.status}"
        elif stream and (not data.endswith(b"data: [DONE]\n\n") or b'"error"' in data):
            outcome = "stream_error"
        else:
            outcome = "ok"
    except (aiohttp.ClientError, TimeoutError) as exc:
        outcome = type(exc).__name__
        if len(run.details) < 20:
            run.details.append(f"t={start - run.t0:.2f} s {'stream' if stream else 'json'} {outcome}: {exc}")
    run.results.append((start, time.perf_counter() - start, f"{'stream' if stream else 'json'}:{outcome}"))


async def load(url: str, concurrency: int, duration_s: float, run: Run) -> None:
    connector = aiohttp.TCPConnector(limit=concurrency)
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        end = time.perf_counter() + duration_s

        async def client() -> None:
            while time.perf_counter() < end:
                await one(session, url, run)

        await asyncio.gather(*(client() for _ in range(concurrency)))


async def sample_rss(parent: int, run: Run, every_s: float, t0: float) -> None:
    while True:
        pids = children(parent)
        run.rss.append({"t": round(time.perf_counter() - t0, 1), "parent": rss_mib(parent),
                        "workers": {p: rss_mib(p) for p in pids}})  # fmt: skip
        await asyncio.sleep(every_s)


async def rolling_restart(parent: int, url: str, at_s: float, run: Run, t0: float) -> None:
    """SIGTERM one worker at `at_s`; the parent starts a new one when it has drained and exited."""
    await asyncio.sleep(at_s)
    before = children(parent)
    victim = before[0]
    run.events["sigterm"] = time.perf_counter() - t0
    os.kill(victim, signal.SIGTERM)
    await until(lambda: victim not in children(parent))
    run.events["old_exited"] = time.perf_counter() - t0
    await until(lambda: len(children(parent)) == len(before))
    run.events["new_started"] = time.perf_counter() - t0
    await ready(url, len(before))
    run.events["new_ready"] = time.perf_counter() - t0


async def until(condition: Callable[[], bool]) -> None:
    while True:
        if condition():
            return
        await asyncio.sleep(0.05)


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def summary(run: Run, duration_s: float, t0: float) -> dict[str, Any]:
    ok = [r for r in run.results if r[2].endswith(":ok")]
    errors: dict[str, int] = {}
    for r in run.results:
        if not r[2].endswith(":ok"):
            errors[r[2]] = errors.get(r[2], 0) + 1
    lat = {kind: [r[1] * 1000 for r in ok if r[2].startswith(kind)] for kind in ("json", "stream")}
    window = (run.events.get("sigterm", 0) - 1, run.events.get("new_ready", 0) + 5)
    lost = [r for r in run.results if not r[2].endswith(":ok") and window[0] <= r[0] - t0 <= window[1]]
    return {
        "requests": len(run.results),
        "ok": len(ok),
        "errors": errors,
        "throughput_rps": round(len(ok) / duration_s, 1),
        "p50_ms": {k: round(statistics.median(v), 1) for k, v in lat.items() if v},
        "p99_ms": {k: round(percentile(v, 0.99), 1) for k, v in lat.items() if v},
        "restart": {k: round(v, 2) for k, v in run.events.items()},
        "lost_in_restart": len(lost),
        "failures": run.details,
    }


async def baseline(url: str, concurrency: int, duration_s: float) -> dict[str, Any]:
    """The upstream alone at the same concurrency: what the proxy's latency is compared with."""
    run = Run()
    t0 = time.perf_counter()
    await load(url, concurrency, duration_s, run)
    return summary(run, duration_s, t0)


async def measure(args: argparse.Namespace, models: Path, tmp: Path) -> dict[str, Any]:
    fakes, urls = start_fakes(models)
    proxy = None
    try:
        direct = await baseline(urls["upstream"].removesuffix("/v1"), args.concurrency, args.baseline_s)
        port = free_port()
        log = tmp / "proxy.log"
        log.unlink(missing_ok=True)
        proxy = start_proxy(write_config(tmp, urls, models), port, args.workers, log)
        url = f"http://127.0.0.1:{port}"
        await ready(url, args.workers)
        await load(url, args.concurrency, 10, Run())  # warm-up: connections, tokenizers, first checks
        run = Run()
        t0 = run.t0
        sampler = asyncio.create_task(sample_rss(proxy.pid, run, args.sample_s, t0))
        restart = asyncio.create_task(rolling_restart(proxy.pid, url, args.duration * args.restart_at, run, t0))
        await load(url, args.concurrency, args.duration, run)
        await restart
        sampler.cancel()
        proxy.send_signal(signal.SIGTERM)
        exit_status = proxy.wait(timeout=120)
        out = summary(run, args.duration, t0)
        out["added_p50_ms"] = {k: round(v - direct["p50_ms"][k], 1) for k, v in out["p50_ms"].items()}
        out["added_p99_ms"] = {k: round(v - direct["p99_ms"][k], 1) for k, v in out["p99_ms"].items()}
        out["upstream_direct"] = {k: direct[k] for k in ("throughput_rps", "p50_ms", "p99_ms", "errors")}
        out["rss_mib"] = run.rss
        out["proxy_exit_status"] = exit_status
        out["drain_log"] = [line for line in log.read_text().splitlines() if '"logger": "proxy.' in line
                            and any(w in line for w in ("worker_", "draining", "drained", "listener_closed",
                                                        "drain_deadline"))]  # fmt: skip
        return out
    finally:
        if proxy is not None and proxy.poll() is None:
            proxy.kill()
        fakes.terminate()
        fakes.wait()


def build_default_shapes(tmp: Path) -> Path:
    """Prompt Guard 2 22M and Llama Guard 3 1B in their real shapes, random weights (bench/guards_cpu.py),
    built in a process of their own: gigabytes this one need not keep."""
    shapes = tmp / "default-shapes"
    if not (shapes / "llama-guard" / "config.json").exists():
        build = "import sys, pathlib; from guards_cpu import make_lg3_1b, make_pg2_22m; p = pathlib.Path(sys.argv[1]); "
        build += "make_lg3_1b(p / 'llama-guard'); make_pg2_22m(p / 'prompt-guard')"
        subprocess.run([sys.executable, "-c", build, str(shapes)], cwd=ROOT / "bench", check=True)
    return shapes


def pss_mib(pid: int) -> float | None:
    """Proportional set size: a page shared by n processes counts 1/n in each (the sum is what they use)."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def worker_memory(pid: int) -> dict[str, int]:
    fields = {"rss": rss_mib(pid), "anon": rss_mib(pid, "RssAnon"), "file": rss_mib(pid, "RssFile")}
    return {k: round(v or 0) for k, v in {**fields, "pss": pss_mib(pid)}.items()}


async def memory(models: Path, shapes: Path, tmp: Path, workers: int) -> dict[str, Any]:
    """Memory of each `--workers` process per guard placement, after the first requests (each on a new
    connection, so the kernel spreads them over the workers)."""
    fakes, urls = start_fakes(models)
    out: dict[str, Any] = {}
    try:
        placements = [
            ("remote guards (vLLM + TEI)", None),
            ("tiny demo guards in process", models),
            ("default CPU guards' shapes in process (PG2 22M + LG3 1B, float32)", shapes),
        ]
        for name, in_process in placements:
            port = free_port()
            config = write_config(tmp, urls, models, in_process, 600)
            proxy = start_proxy(config, port, workers, tmp / "memory.log")
            try:
                url = f"http://127.0.0.1:{port}"
                await ready(url, workers)
                run = Run()
                for _ in range(8 if in_process is shapes else 50):
                    connector = aiohttp.TCPConnector(force_close=True)
                    timeout = aiohttp.ClientTimeout(600)
                    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
                        await one(session, url, run)
                pids = children(proxy.pid) if workers > 1 else [proxy.pid]
                out[name] = {
                    "workers": {pid: worker_memory(pid) for pid in pids},
                    "parent": worker_memory(proxy.pid) if workers > 1 else None,
                    "requests": len(run.results),
                    "errors": [r[2] for r in run.results if not r[2].endswith(":ok")],
                }
                print(json.dumps({name: out[name]}), file=sys.stderr, flush=True)
            finally:
                proxy.send_signal(signal.SIGINT)
                proxy.wait(timeout=120)
    finally:
        fakes.terminate()
        fakes.wait()
    return out


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "serve-fakes":
        asyncio.run(serve_fakes(Path(sys.argv[2])))
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=600, help="seconds of load through the proxy")
    parser.add_argument("--baseline-s", type=float, default=30, help="seconds of load on the upstream alone")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--restart-at", type=float, default=0.5, help="when one worker is restarted (fraction)")
    parser.add_argument("--sample-s", type=float, default=10, help="RSS sampling interval")
    parser.add_argument("--memory", action="store_true", help="memory of each worker per guard placement, then exit")
    parser.add_argument("--out", type=Path, help="write the JSON result here too")
    args = parser.parse_args()

    from proxy.demo.run import build_models

    tmp = Path(tempfile.gettempdir()) / "guardrail-bench-scale-out"
    tmp.mkdir(exist_ok=True)
    models = tmp / "demo-models"
    build_models(models)
    if args.memory:
        result = asyncio.run(memory(models, build_default_shapes(tmp), tmp, args.workers))
    else:
        result = asyncio.run(measure(args, models, tmp))
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
