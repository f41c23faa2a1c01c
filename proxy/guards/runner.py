"""The guard runner: one worker thread per device runs all torch and tokenizer work, micro-batching
concurrent requests. The event loop only enqueues jobs and awaits futures.

A job is a list of items for one batch function; jobs with the same key are merged into one call,
up to `max_batch` items, waiting at most `max_wait_ms` for company (default 0: jobs that arrive while
the worker computes are merged into its next call anyway, and on an idle runner a lone job would
only wait). Jobs run in arrival order, except
that long work is submitted by its owner as a sequence of `bulk` steps (Prompt Guard windows in
pieces of `forward_batch`, Llama Guard prefill in chunks): a bulk step runs only when no ordinary job
waits, or once it has waited `BULK_MAX_WAIT_S` (so long checks still progress under load). A short
check thus waits for at most the one step already running. `idle` jobs (speculative work: the
output-check prefetch) run only when nothing else waits and no other work ended in the last
`IDLE_GRACE_S`, never age past other jobs, and are refused (`RunnerBusy`) when anything else is
queued; they do not count towards the queue's bounds. Isolation:
if a merged call raises, each of its jobs is re-run alone so only the culprit fails; one tenant's
waiting jobs may hold at most `tenant_queue_share` of the queue.
"""

from __future__ import annotations

import asyncio
import collections
import contextvars
import threading
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import structlog

from proxy.guards.guard import GuardError, GuardOverloaded

I = TypeVar("I")  # noqa: E741
O = TypeVar("O")  # noqa: E741
T = TypeVar("T")

log = structlog.get_logger("proxy.guards.runner")

BatchFn = Callable[[list[Any]], list[Any]]

BULK_MAX_WAIT_S = 1.0
IDLE_GRACE_S = 0.05
"""An idle job waits this long after other work: a long check's next step is usually submitted by then."""

current_tenant: contextvars.ContextVar[str | None] = contextvars.ContextVar("guard_tenant", default=None)
"""The tenant whose request is being screened; set by the server, read when a job is queued."""


@dataclass(eq=False)
class _Job:
    fn: BatchFn
    key: Hashable
    items: list[Any]
    future: asyncio.Future[list[Any]]
    loop: asyncio.AbstractEventLoop
    tenant: str | None = None
    bulk: bool = False
    idle: bool = False
    enqueued: float = field(default_factory=time.monotonic)
    cancelled: bool = False


class RunnerBusy(GuardError):
    """An idle job was offered while other jobs wait."""


class GuardRunner:
    def __init__(
        self,
        device: str,
        *,
        max_batch: int = 16,
        max_wait_ms: float = 0.0,
        max_queue: int = 256,
        threads: int = 0,
        tenant_queue_share: float = 0.5,
    ) -> None:
        self.device = device
        self.max_batch = max_batch
        self.max_wait_s = max_wait_ms / 1000
        self.max_queue = max_queue
        self.tenant_queue_limit = max(1, int(max_queue * tenant_queue_share))
        self.threads = threads
        self.batches_run = 0
        self.items_run = 0
        self.on_reject: Callable[[str], None] | None = None
        """Called on the event loop with the reason ("full", "tenant_share") of each refused job."""
        self._queue: collections.deque[_Job] = collections.deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._worked = 0.0  # when the worker last finished work other than idle jobs (its own clock)
        self._thread: threading.Thread | None = None

    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._work, name=f"guard-runner-{self.device}", daemon=True)
            self._thread.start()

    async def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 30)
            self._thread = None

    async def call(self, fn: Callable[[], T]) -> T:
        """Run one function in the worker thread (loading a model, a one-off computation)."""
        result = await self.submit(lambda items: [fn()], [None], key=("call", id(fn)))
        return result[0]

    @property
    def waiting(self) -> bool:
        """Whether any job other than idle work waits (read on the event loop, without the lock)."""
        return any(not (job.idle or job.cancelled) for job in list(self._queue))

    async def submit(
        self,
        fn: Callable[[list[I]], list[O]],
        items: list[I],
        *,
        key: Hashable = None,
        bulk: bool = False,
        idle: bool = False,
    ) -> list[O]:
        """Queue `items` for `fn` and wait for its results (one per item, in order). `bulk`: one
        step of a long check, which yields to ordinary jobs (give such steps a key of their own).
        `idle`: speculative work, run only when nothing else waits (RunnerBusy if something does)."""
        if not items:
            return []
        loop = asyncio.get_running_loop()
        tenant = current_tenant.get()
        job = _Job(
            fn=fn,
            key=key if key is not None else fn,
            items=list(items),
            future=loop.create_future(),
            loop=loop,
            tenant=tenant,
            bulk=bulk,
            idle=idle,
        )
        with self._cond:
            if self._stopping:
                raise GuardError(f"guard runner {self.device} is stopped")
            if idle:  # outside the queue's bounds: a guard has at most one idle job at a time
                if self.waiting:
                    raise RunnerBusy(f"guard runner {self.device} has queued work")
            elif sum(not j.idle for j in self._queue) >= self.max_queue:
                self._reject("full")
                raise GuardOverloaded(f"guard queue on {self.device} is full ({self.max_queue} jobs)")
            elif tenant is not None and sum(j.tenant == tenant and not j.idle for j in self._queue) >= (
                self.tenant_queue_limit
            ):
                self._reject("tenant_share")
                raise GuardOverloaded(
                    f"tenant {tenant!r} holds its share of the guard queue on {self.device} "
                    f"({self.tenant_queue_limit} of {self.max_queue} jobs)"
                )
            self._queue.append(job)
            self._cond.notify_all()
        self.start()
        try:
            return await job.future
        except asyncio.CancelledError:
            with self._cond:
                job.cancelled = True
                if job in self._queue:
                    self._queue.remove(job)
            raise

    def _reject(self, reason: str) -> None:
        if self.on_reject is not None:
            self.on_reject(reason)

    def _take_batch(self) -> list[_Job] | None:
        """Under the lock: wait for work, then collect jobs sharing the first job's function."""
        while True:
            while not self._queue and not self._stopping:
                self._cond.wait()
            if self._stopping and not self._queue:
                return None
            first = self._next()
            if first is None:
                self._queue.clear()  # only cancelled jobs were left
                continue
            grace = self._worked + IDLE_GRACE_S - time.monotonic()
            if first.idle and grace > 0 and not self._stopping:
                self._cond.wait(grace)
                continue
            batch, size = [first], len(first.items)
            for job in self._queue:
                if job is first or job.key != first.key or job.cancelled:
                    continue
                if size + len(job.items) <= self.max_batch:
                    batch.append(job)
                    size += len(job.items)
            remaining = first.enqueued + self.max_wait_s - time.monotonic()
            if size < self.max_batch and remaining > 0 and not (first.bulk or first.idle) and not self._stopping:
                self._cond.wait(remaining)
                continue
            for job in batch:
                self._queue.remove(job)
            return batch

    def _next(self) -> _Job | None:
        """The oldest ordinary job, unless the oldest bulk step has waited its turn long enough; an
        idle job only when neither waits."""
        bulk: _Job | None = None
        idle: _Job | None = None
        for job in self._queue:
            if job.cancelled:
                continue
            if job.idle:
                idle = idle or job
            elif not job.bulk:
                if bulk is not None and time.monotonic() - bulk.enqueued >= BULK_MAX_WAIT_S:
                    return bulk
                return job
            elif bulk is None:
                bulk = job
        return bulk or idle

    def _work(self) -> None:
        if self.device == "cpu" or self.threads:
            import os

            import torch

            # Leave a core to the event loop: on a small host torch would otherwise take them all.
            torch.set_num_threads(self.threads or max(1, (os.cpu_count() or 2) - 1))
        while True:
            with self._cond:
                batch = self._take_batch()
            if batch is None:
                return
            batch = [job for job in batch if not job.cancelled and not job.future.done()]
            if batch and not self._run(batch) and len(batch) > 1:
                # One job's input may have broken the merged call: re-run each alone so only it fails.
                for job in batch:
                    if not job.cancelled:
                        self._run([job])
            if batch and not batch[0].idle:
                self._worked = time.monotonic()

    def _run(self, batch: list[_Job]) -> bool:
        """Run one merged call and hand each job its results. False (nothing delivered) if the call
        raised and more than one job shared it; a lone job gets the exception."""
        items = [item for job in batch for item in job.items]
        try:
            results = batch[0].fn(items)
            if len(results) != len(items):
                raise GuardError(f"batch function returned {len(results)} results for {len(items)} items")
        except BaseException as exc:
            if len(batch) > 1:
                return False
            err = exc if isinstance(exc, Exception) else GuardError(repr(exc))
            batch[0].loop.call_soon_threadsafe(_set_exception, batch[0].future, err)
            return False
        self.batches_run += 1
        self.items_run += len(items)
        start = 0
        for job in batch:
            part = results[start : start + len(job.items)]
            start += len(job.items)
            job.loop.call_soon_threadsafe(_set_result, job.future, part)
        return True


def _set_result(future: asyncio.Future[list[Any]], value: list[Any]) -> None:
    if not future.done():
        future.set_result(value)


def _set_exception(future: asyncio.Future[list[Any]], exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)
