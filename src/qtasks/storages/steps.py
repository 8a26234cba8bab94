"""Task steps: what the storages share to keep them, and how the worker writes them.

A generator task's steps (each handler result) go to `Storage.add_steps` while it runs
and are read with `Storage.steps` by producers that stream the task (`task.stream()`).

* `StepWaiters` wakes this process's readers of a task's steps when a step is added or
  the task's record becomes final (the memory and SQLite storages; Redis blocks on the
  server instead).
* `StepWriter` is the worker side: the executor hands it each step without waiting, and
  it writes them in order, all that piled up during the previous write in one call, so
  a generator that yields fast is not slowed to one storage round trip per step.
  `close()` waits for the last write: the executor calls it before the task's outcome is
  returned, so the final record is stored only after the last step.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from qtasks.errors import EncodeError
from qtasks.serializers import to_builtins

if TYPE_CHECKING:
    from qtasks.interfaces import Storage

log = logging.getLogger(__name__)

MAX_STEPS_PER_WRITE = 1000
"""Steps written in one `add_steps` call at most (a bound on one script or transaction)."""

_UNSUPPORTED: set[type[Any]] = set()
"""Storage classes that said they keep no steps (warned about once per process)."""


class StepWaiters:
    """uuid → futures of readers waiting for that task's next step or its end."""

    def __init__(self) -> None:
        self._futures: dict[str, list[asyncio.Future[None]]] = {}

    def __bool__(self) -> bool:
        return bool(self._futures)

    def register(self, uuid: str) -> asyncio.Future[None]:
        """A future resolved at the task's next step or final record."""
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._futures.setdefault(uuid, []).append(fut)
        return fut

    def discard(self, uuid: str, fut: asyncio.Future[None]) -> None:
        """Forget a future (its reader returned or gave up)."""
        futs = self._futures.get(uuid)
        if futs is None:
            return
        with contextlib.suppress(ValueError):
            futs.remove(fut)
        if not futs:
            del self._futures[uuid]

    def notify(self, uuids: Iterable[str]) -> None:
        """Wake every reader of these tasks (from any thread or loop)."""
        if not self._futures:
            return
        for uuid in uuids:
            for fut in self._futures.pop(uuid, ()):
                _wake(fut)

    async def wait(self, fut: asyncio.Future[None], timeout: float) -> None:
        """Wait up to `timeout` seconds for `fut` (registered before the caller's read)."""
        if timeout > 0:
            await asyncio.wait((fut,), timeout=timeout)


def _wake(fut: asyncio.Future[None]) -> None:
    loop = fut.get_loop()
    try:
        running: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
    except RuntimeError:
        running = None
    if running is loop:
        _set(fut)
    else:
        with contextlib.suppress(RuntimeError):  # the reader's loop is closed: nobody waits
            loop.call_soon_threadsafe(_set, fut)


def _set(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


class StepWriter:
    """Writes one task run's steps in order, batching those that come while a write runs.

    Steps are best effort next to the task's result: a step that is not JSON data, or a
    write the storage refuses, is logged and left out of the stream; the task goes on.
    """

    def __init__(self, storage: Storage, uuid: str, task_name: str) -> None:
        self.storage = storage
        self.uuid = uuid
        self.task_name = task_name
        self.written = 0
        """Steps stored so far."""
        self._pending: list[Any] = []
        self._flusher: asyncio.Task[None] | None = None
        self._disabled = type(storage) in _UNSUPPORTED
        self._warned_encode = False

    def add(self, value: Any) -> None:
        """Queue one step; returns at once (the write happens in the background)."""
        if self._disabled:
            return
        try:
            # Converted now: the generator may change the object after yielding it.
            data = to_builtins(value)
        except EncodeError as exc:
            if not self._warned_encode:
                self._warned_encode = True
                log.warning(
                    "task %s %s: a step is not JSON data and is not streamed (%s)",
                    self.task_name,
                    self.uuid,
                    exc,
                )
            return
        self._pending.append(data)
        if self._flusher is None:
            self._flusher = asyncio.ensure_future(self._flush())

    async def _flush(self) -> None:
        try:
            while self._pending and not self._disabled:
                batch = self._pending[:MAX_STEPS_PER_WRITE]
                del self._pending[:MAX_STEPS_PER_WRITE]
                try:
                    await self.storage.add_steps(self.uuid, batch)
                except NotImplementedError as exc:
                    self._disabled = True
                    self._pending.clear()
                    if type(self.storage) not in _UNSUPPORTED:
                        _UNSUPPORTED.add(type(self.storage))
                        log.warning("generator steps are not streamed: %s", exc)
                    return
                except Exception:
                    log.warning(
                        "task %s %s: %d step(s) could not be stored and are not streamed",
                        self.task_name,
                        self.uuid,
                        len(batch),
                        exc_info=True,
                    )
                else:
                    self.written += len(batch)
        finally:
            self._flusher = None

    async def close(self) -> None:
        """Wait until every step added so far is written (or given up on)."""
        while self._flusher is not None:
            await asyncio.gather(self._flusher, return_exceptions=True)
