"""`serve --workers N`: a real parent process and its workers on one port (SO_REUSEPORT).

Which worker answered is read from /readyz (`pid`); the kernel spreads new connections over the
workers (by a hash of the client's port), so the tests ask on new connections, in rounds of 20, until
every worker's pid answered: a bound worker is missed by a round with probability 2**-19."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sys
from pathlib import Path

from tests.fakes.upstream import FakeUpstream
from tests.server.serve_process import chat, free_port, get, serving, write_config


def parent_of(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat.rsplit(")", 1)[1].split()[1])


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


async def pids_answering(port: int, want: int, tries: int = 200) -> set[int]:
    """The worker pids seen on /readyz until `want` distinct ones answered (at most `tries` connections)."""
    seen: set[int] = set()
    for _ in range(tries):
        try:
            status, body = await get(port, "/readyz")
        except ConnectionResetError:  # queued on a killed worker's socket: the kernel resets those
            continue
        if status == 200:
            seen.add(body["pid"])
        if len(seen) >= want:
            break
    return seen


async def all_workers(port: int, workers: int) -> set[int]:
    """Every worker's pid, once each has bound the port (a worker binds it when its guards are loaded,
    so one may start serving seconds before the other)."""
    seen: set[int] = set()
    for _ in range(1200):
        seen |= await pids_answering(port, workers, tries=20)
        if len(seen) >= workers:
            break
        await asyncio.sleep(0.05)
    return seen


async def test_two_workers_share_the_port_and_drain_on_sigterm(tmp_path: Path, upstream: FakeUpstream) -> None:
    config = write_config(tmp_path, upstream.url, {"shutdown_grace_s": 0})
    port = free_port()
    async with serving(config, port, "--workers", "2") as parent:
        workers = await all_workers(port, 2)
        assert len(workers) == 2
        assert {parent_of(pid) for pid in workers} == {parent.pid}  # one process per worker, under the parent
        for _ in range(4):
            status, _, body = await chat(port, "buffered", stream=False)
            assert status == 200
            assert json.loads(body)["choices"][0]["message"]["content"] == "Hello! How can I help you today?"

        parent.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(parent.wait(), 60) == 0
    assert not any(alive(pid) for pid in workers)


async def test_a_killed_worker_is_replaced(tmp_path: Path, upstream: FakeUpstream) -> None:
    config = write_config(tmp_path, upstream.url, {"shutdown_grace_s": 0})
    port = free_port()
    async with serving(config, port, "--workers", "2") as parent:
        first = await all_workers(port, 2)
        assert len(first) == 2
        victim = min(first)
        os.kill(victim, signal.SIGKILL)
        replaced: set[int] = set()
        for _ in range(1200):  # until the new worker answers (its start imports the package)
            replaced = await pids_answering(port, 2, tries=20)
            if len(replaced) == 2 and victim not in replaced:
                break
            await asyncio.sleep(0.05)
        assert len(replaced) == 2
        assert victim not in replaced
        assert {parent_of(pid) for pid in replaced} == {parent.pid}

        parent.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(parent.wait(), 60) == 0  # the crash was answered, not carried to the end


async def test_workers_drain_when_the_parent_dies(tmp_path: Path, upstream: FakeUpstream) -> None:
    """A parent killed outright closes its end of each worker's stdin: the workers drain and exit
    instead of serving on as orphans."""
    config = write_config(tmp_path, upstream.url, {"shutdown_grace_s": 0})
    port = free_port()
    async with serving(config, port, "--workers", "2") as parent:
        workers = await all_workers(port, 2)
        assert len(workers) == 2
        parent.kill()
        await parent.wait()
        for _ in range(1200):
            if not any(alive(pid) for pid in workers):
                break
            await asyncio.sleep(0.05)
        assert not any(alive(pid) for pid in workers)


async def test_workers_that_cannot_start_stop_the_parent(tmp_path: Path, upstream: FakeUpstream) -> None:
    """Workers that crash at start (the port is held by a socket without SO_REUSEPORT) are not
    restarted forever: past MAX_CRASHES the parent exits 1."""
    config = write_config(tmp_path, upstream.url, {})
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        env = {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True"}
        parent = await asyncio.create_subprocess_exec(
            *(sys.executable, "-m", "proxy", "serve", "--config", str(config), "--port", str(port), "--workers", "2"),
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL, env=env,
        )  # fmt: skip
        try:
            assert await asyncio.wait_for(parent.wait(), 120) == 1
        finally:
            if parent.returncode is None:
                parent.kill()
                await parent.wait()


async def test_a_worker_binds_the_port_only_once_its_guards_loaded(tmp_path: Path, upstream: FakeUpstream) -> None:
    """A worker joins the port's group when it can screen: one whose guard fails to load never takes a
    connection (each would have been a 503 not_ready) and exits 1, which the parent counts as a crash."""
    config = write_config(tmp_path, upstream.url, {})
    data = json.loads(config.read_text())
    data["guards"] = {"prompt_guard": {"family": "prompt-guard-2", "model": str(tmp_path / "no-such-model")}}
    config.write_text(json.dumps(data))
    port = free_port()
    env = {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True", "HF_HUB_OFFLINE": "1"}
    worker = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "proxy", "serve", "--config", str(config), "--port", str(port), "--worker"),
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL, env=env,
    )  # fmt: skip
    try:
        accepted = 0
        for _ in range(2400):  # until it exits (it loads transformers first)
            if worker.returncode is not None:
                break
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", port)
            except ConnectionRefusedError:
                await asyncio.sleep(0.05)
                continue
            accepted += 1
            writer.close()
        assert await asyncio.wait_for(worker.wait(), 60) == 1
        assert accepted == 0
    finally:
        if worker.returncode is None:
            worker.kill()
            await worker.wait()
