"""The bounded thread pool sync task functions run in.

Why not `loop.run_in_executor(ThreadPoolExecutor)`: every finished call there wakes the
event loop on its own (one self-pipe write and one callback per call), and idle threads
pile up on the GIL. Here finished calls are handed back in batches — one wake-up for all
results that came in while the loop was busy — which roughly doubles the rate of short
sync tasks. Threads are started on demand up to the bound, and they are daemons: a sync
task that outlived its `max_time` or the shutdown grace period cannot keep the worker
process from exiting (Python cannot kill a thread; it ends with the process).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import contextvars
import threading
import time
from collections.abc import Callable
from typing import Any

_Job = tuple["asyncio.Future[Any]", contextvars.Context, Callable[..., Any], tuple[Any, ...], float]
GROW_AFTER_SECONDS = 0.002
"""A call that waited this long for a thread makes the pool start more threads."""
_Done = tuple["asyncio.Future[Any]", bool, Any]


class TaskThreadPool:
    """At most `max_threads` threads running sync callables for one event loop."""

    def __init__(self, max_threads: int, name: str = "qtasks-task") -> None:
        if max_threads < 1:
            raise ValueError(f"max_threads must be >= 1, got {max_threads}")
        self.max_threads = max_threads
        self._name = name
        self._jobs: collections.deque[_Job] = collections.deque()
        self._done: collections.deque[_Done] = collections.deque()
        self._cond = threading.Condition()
        self._idle = 0
        self._threads: list[threading.Thread] = []
        self._wake_lock = threading.Lock()
        self._wake_pending = False
        self._closed = False
        self._grow_scheduled = False
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def threads(self) -> int:
        """Threads started so far."""
        return len(self._threads)

    def run(self, func: Callable[..., Any], *args: Any) -> asyncio.Future[Any]:
        """Schedule `func(*args)` in a pool thread with the caller's contextvars copied."""
        loop = asyncio.get_running_loop()
        if self._loop is None:
            self._loop = loop
        elif self._loop is not loop:
            raise RuntimeError("a TaskThreadPool serves one event loop")
        if self._closed:
            raise RuntimeError("the thread pool is shut down")
        fut: asyncio.Future[Any] = loop.create_future()
        with self._cond:
            self._jobs.append((fut, contextvars.copy_context(), func, args, time.monotonic()))
            if self._idle:
                self._cond.notify()
            elif not self._threads:
                self._spawn(1)
            elif len(self._threads) < self.max_threads and not self._grow_scheduled:
                self._grow_scheduled = True
                loop.call_later(GROW_AFTER_SECONDS, self._grow)
        return fut

    def _spawn(self, count: int) -> None:
        for _ in range(min(count, self.max_threads - len(self._threads))):
            thread = threading.Thread(
                target=self._work, name=f"{self._name}-{len(self._threads)}", daemon=True
            )
            self._threads.append(thread)
            thread.start()

    def _grow(self) -> None:
        """Add threads only for calls that waited: short calls never need many threads.

        Every extra thread contends for the GIL, so a pool that grew to its bound for
        microsecond-long calls runs them slower than one or two threads would. Calls that
        block (sleep, I/O) keep the oldest waiting call ageing, and the pool grows for them.
        """
        with self._cond:
            self._grow_scheduled = False
            if self._closed or not self._jobs:
                return
            waited = time.monotonic() - self._jobs[0][4]
            if waited >= GROW_AFTER_SECONDS:
                self._spawn(len(self._jobs) - self._idle)
            if len(self._threads) < self.max_threads and self._loop is not None:
                self._grow_scheduled = True
                self._loop.call_later(GROW_AFTER_SECONDS, self._grow)

    def _work(self) -> None:
        while True:
            with self._cond:
                while not self._jobs:
                    if self._closed:
                        return
                    self._idle += 1
                    self._cond.wait()
                    self._idle -= 1
                fut, ctx, func, args, _ = self._jobs.popleft()
            if fut.cancelled():  # the waiter gave up before the call started
                continue
            try:
                result: _Done = (fut, True, ctx.run(func, *args))
            except BaseException as exc:
                result = (fut, False, exc)
            self._done.append(result)
            with self._wake_lock:
                if self._wake_pending:
                    continue
                self._wake_pending = True
            loop = self._loop
            if loop is not None and not loop.is_closed():
                # The loop may close between the check and the call (worker exiting).
                with contextlib.suppress(RuntimeError):
                    loop.call_soon_threadsafe(self._deliver)

    def _deliver(self) -> None:
        with self._wake_lock:
            self._wake_pending = False
        done = self._done
        while done:
            fut, ok, value = done.popleft()
            if fut.done():
                continue
            if ok:
                fut.set_result(value)
            else:
                fut.set_exception(value)

    def shutdown(self) -> None:
        """Start no new calls; idle threads exit, busy ones exit after their call."""
        with self._cond:
            self._closed = True
            self._jobs.clear()
            self._cond.notify_all()
