"""`serve --workers N`: a parent process in front of N serving processes that share one port with
SO_REUSEPORT (the kernel spreads new connections over them). The parent serves nothing and loads
no guard: it starts the workers, forwards SIGTERM / SIGINT to them, and exits when all have drained.

A worker that exits while the parent is not stopping is started again. Exits that are not clean
(non-zero status, or killed by a signal) count as crashes: past MAX_CRASHES within CRASH_WINDOW_S the
parent stops the others and exits 1, so a worker that cannot start (a port taken, a model that does
not load) ends the service instead of looping. Exit status after a stop: 0 when every worker drained,
3 (EXIT_CUT) when one had to cut requests at its drain deadline, 1 when one failed.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
import time
from collections.abc import Callable, Sequence

import structlog

from proxy.server.shutdown import EXIT_CUT

log = structlog.get_logger("proxy.workers")

MAX_CRASHES = 5
CRASH_WINDOW_S = 60.0


async def watch_parent(stop: Callable[[], None]) -> None:
    """In a worker: the parent holds the write end of our stdin; end of file means it is gone
    (killed, or crashed), and the worker drains instead of serving on as an orphan."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    transport, _ = await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    try:
        while await reader.read(4096):
            pass  # the parent never writes; nothing to read but the end
        log.warning("parent_gone", action="draining")
        stop()
    finally:
        transport.close()


class Supervisor:
    """Starts `workers` copies of `command` and keeps them running until told to stop."""

    def __init__(self, command: Sequence[str], workers: int) -> None:
        self.command = list(command)
        self.workers = workers
        self.running: dict[int, asyncio.subprocess.Process] = {}
        self.stopping: signal.Signals | None = None
        self.failed = False
        self._crashes: list[float] = []
        self._wake = asyncio.Event()

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop, sig)
        try:
            for _ in range(self.workers):
                await self._start()
            return await self._watch()
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
            for process in self.running.values():  # only after a failure of this loop itself
                with contextlib.suppress(ProcessLookupError):
                    process.kill()

    def stop(self, sig: signal.Signals = signal.SIGTERM) -> None:
        """Forward the stop to every worker, once: they drain on their own."""
        if self.stopping is not None:
            log.info("signal_ignored", signal=sig.name, reason="already stopping")
            return
        self.stopping = sig
        log.info("stopping_workers", signal=sig.name, workers=sorted(self.running))
        for process in self.running.values():
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(sig)
        self._wake.set()

    async def _start(self) -> None:
        # A session of its own: a terminal's Ctrl-C reaches the parent only, which forwards it once.
        # stdin is a pipe the parent never writes (see watch_parent).
        process = await asyncio.create_subprocess_exec(*self.command, stdin=asyncio.subprocess.PIPE,
                                                       start_new_session=True)  # fmt: skip
        self.running[process.pid] = process
        log.info("worker_started", pid=process.pid)
        if self.stopping is not None:  # the stop came while it was being started: it drains too
            process.send_signal(self.stopping)

    async def _watch(self) -> int:
        statuses: list[int] = []
        while self.running:
            waits = {asyncio.ensure_future(p.wait()): pid for pid, p in self.running.items()}
            woken = asyncio.ensure_future(self._wake.wait())
            done, _ = await asyncio.wait([*waits, woken], return_when=asyncio.FIRST_COMPLETED)
            for task in [*waits, woken]:
                if task not in done:
                    task.cancel()
            self._wake.clear()
            for task in done:
                pid = waits.get(task)
                if pid is None:
                    continue
                status = task.result()
                del self.running[pid]
                if self.stopping is not None:
                    statuses.append(status)  # a crash before the stop was answered by a restart
                await self._exited(pid, status)
        if self.failed:
            return 1
        if any(s not in (0, EXIT_CUT) for s in statuses):
            return 1
        return EXIT_CUT if EXIT_CUT in statuses else 0

    async def _exited(self, pid: int, status: int) -> None:
        if self.stopping is not None:
            log.info("worker_stopped", pid=pid, status=status)
            return
        if status != 0:
            now = time.monotonic()
            self._crashes = [t for t in self._crashes if now - t < CRASH_WINDOW_S] + [now]
            if len(self._crashes) > MAX_CRASHES:
                log.error("worker_crashed", pid=pid, status=status, action="stopping",
                          crashes=len(self._crashes), window_s=CRASH_WINDOW_S)  # fmt: skip
                self.failed = True
                self.stop(signal.SIGTERM)
                return
        log.warning("worker_exited", pid=pid, status=status, action="restarting")
        await self._start()


def worker_command(config: str, host: str, port: int) -> list[str]:
    """How the parent starts one worker: the same interpreter and package, one process serving."""
    return [sys.executable, "-m", "proxy", "serve", "--config", config, "--host", host, "--port", str(port),
            "--worker"]  # fmt: skip

