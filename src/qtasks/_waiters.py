"""In-process waiters for final task records, shared by the storages.

A storage calls `notify` after it wrote records; coroutines in `wait` wake at once. The
waiters are futures on the loop that registered them, so writes from another thread or
loop are forwarded with `call_soon_threadsafe`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable

from qtasks.errors import TaskNotFound
from qtasks.message import Task


class Waiters:
    """uuid → futures waiting for that task's final record."""

    def __init__(self) -> None:
        self._futures: dict[str, list[asyncio.Future[Task]]] = {}

    def __bool__(self) -> bool:
        return bool(self._futures)

    def register(self, uuid: str) -> asyncio.Future[Task]:
        """A future resolved with the task's final record."""
        fut: asyncio.Future[Task] = asyncio.get_running_loop().create_future()
        self._futures.setdefault(uuid, []).append(fut)
        return fut

    def discard(self, uuid: str, fut: asyncio.Future[Task]) -> None:
        """Forget a future (its waiter gave up)."""
        futs = self._futures.get(uuid)
        if futs is None:
            return
        if fut in futs:
            futs.remove(fut)
        if not futs:
            del self._futures[uuid]

    def notify(self, tasks: Iterable[Task]) -> None:
        """Resolve the futures of every final record in `tasks`."""
        if not self._futures:
            return
        for task in tasks:
            if not task.is_final:
                continue
            futs = self._futures.pop(str(task.uuid), None)
            for fut in futs or ():
                _resolve(fut, task)

    async def wait_final(
        self,
        uuid: str,
        timeout: float,
        read: Callable[[], Awaitable[Task | None]],
        recheck_max_seconds: float | None = None,
    ) -> Task | None:
        """The final record of `uuid`, or None after `timeout` seconds.

        TaskNotFound when there is no record (never enqueued, expired or evicted), at
        once or when the time runs out: a lost record is reported, never waited out.
        Registers first and reads second, so a write between the two is never missed.
        Writers in this process wake the waiter directly. With `recheck_max_seconds` the
        record is also re-read on a backoff schedule (1 ms doubling up to that bound) for
        writers in other processes that cannot reach this process's futures.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        fut = self.register(uuid)
        try:
            current = await read()
            if current is None:
                raise TaskNotFound(uuid)
            if current.is_final:
                return current
            interval = 0.001
            while True:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    if await read() is None:
                        raise TaskNotFound(uuid)
                    return None
                step = remaining if recheck_max_seconds is None else min(remaining, interval)
                done, _ = await asyncio.wait((fut,), timeout=step)
                if done:
                    return fut.result()
                if recheck_max_seconds is not None:
                    current = await read()
                    if current is None:
                        raise TaskNotFound(uuid)
                    if current.is_final:
                        return current
                    interval = min(interval * 2, recheck_max_seconds)
        finally:
            self.discard(uuid, fut)


def _resolve(fut: asyncio.Future[Task], task: Task) -> None:
    loop = fut.get_loop()
    try:
        running = asyncio.get_running_loop()
    except RuntimeError:
        running = None
    if running is loop:
        if not fut.done():
            fut.set_result(task)
    else:
        loop.call_soon_threadsafe(_set_if_pending, fut, task)


def _set_if_pending(fut: asyncio.Future[Task], task: Task) -> None:
    if not fut.done():
        fut.set_result(task)
