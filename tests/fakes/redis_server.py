"""A real `redis-server` for tests (Debian package `redis-server`, installed by .ci/run): on 127.0.0.1,
a free port, a temporary directory, no persistence; stopped (and its files gone) at teardown."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import socket
from pathlib import Path

READY = b"Ready to accept connections"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisServer:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.port = 0
        self._proc: asyncio.subprocess.Process | None = None
        self._drain: asyncio.Task[None] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def start(self, timeout_s: float = 20.0) -> RedisServer:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed (apt-get install redis-server; .ci/run does)")
        self.port = free_port()
        self._proc = await asyncio.create_subprocess_exec(
            binary,
            "--bind", "127.0.0.1",
            "--port", str(self.port),
            "--dir", str(self.directory),
            "--save", "",
            "--appendonly", "no",
            "--daemonize", "no",
            "--protected-mode", "yes",
            "--loglevel", "notice",
            "--logfile", "",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        assert self._proc.stdout is not None
        async with asyncio.timeout(timeout_s):
            async for line in self._proc.stdout:
                if READY in line:
                    break
            else:
                raise RuntimeError(f"redis-server exited with {await self._proc.wait()}")
        # Keep reading its log so the pipe never fills and stalls the server.
        self._drain = asyncio.create_task(self._read_rest(self._proc.stdout))
        return self

    @staticmethod
    async def _read_rest(stream: asyncio.StreamReader) -> None:
        while await stream.read(65536):
            pass

    async def stop(self) -> None:
        if self._proc is not None and self._proc.returncode is None:
            self._proc.kill()
            await self._proc.wait()
        if self._drain is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._drain
