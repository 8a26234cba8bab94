"""The Starter owns the worker process: start parts in order, handle signals, drain, stop.

First SIGTERM/SIGINT: stop fetching, let running tasks finish within
`config.graceful_shutdown_seconds`, return unstarted ones to the broker. A second signal
gives up on running tasks at once (their messages go back to the broker too).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

from qtasks.plugins.triggers import STARTER_START, STARTER_STOP

if TYPE_CHECKING:
    from qtasks.app import AsyncQueueTasks
    from qtasks.runtime.worker import Worker

log = logging.getLogger(__name__)

_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Starter:
    """Runs one worker until told to stop; replaceable through `QueueTasks(starter=...)`."""

    def __init__(self) -> None:
        self._stop: asyncio.Event | None = None
        self._force: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def request_stop(self) -> None:
        """Ask for a graceful stop; a second request stops at once. Thread-safe."""
        loop = self._loop
        if loop is None:
            return
        loop.call_soon_threadsafe(self._on_signal)

    def _on_signal(self) -> None:
        assert self._stop is not None
        assert self._force is not None
        if self._stop.is_set():
            log.warning("second stop request: giving up on running tasks")
            self._force.set()
        else:
            log.info("stop requested: finishing running tasks")
            self._stop.set()

    async def serve(self, app: AsyncQueueTasks, worker: Worker) -> None:
        """Start everything, run until a stop request, then drain and stop."""
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        self._force = asyncio.Event()
        restore = self._install_signal_handlers()
        try:
            await app.start()
            try:
                await worker.start(app)
                if STARTER_START in app.plugins:
                    try:
                        await app.plugins.fire(STARTER_START, starter=self, app=app, worker=worker)
                    except BaseException:
                        await worker.stop(grace_seconds=0)
                        raise
                await self._stop.wait()
                drain = asyncio.ensure_future(worker.stop())
                force = asyncio.ensure_future(self._force.wait())
                await asyncio.wait({drain, force}, return_when=asyncio.FIRST_COMPLETED)
                if not drain.done():
                    drain.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await drain
                    await worker.stop(grace_seconds=0)
                force.cancel()
                if STARTER_STOP in app.plugins:
                    await app.plugins.fire(STARTER_STOP, starter=self, app=app, worker=worker)
            finally:
                await app.stop()
        finally:
            restore()
            self._loop = None

    def _install_signal_handlers(self) -> Callable[[], None]:
        """Route SIGTERM/SIGINT to request_stop; returns a function that undoes it."""
        if threading.current_thread() is not threading.main_thread():
            return lambda: None  # signals only reach the main thread; callers stop us directly
        loop = asyncio.get_running_loop()
        try:
            for sig in _SIGNALS:
                loop.add_signal_handler(sig, self._on_signal)
        except (NotImplementedError, RuntimeError):  # Windows loops: fall back to signal.signal
            previous = {sig: signal.getsignal(sig) for sig in _SIGNALS}
            for sig in _SIGNALS:
                signal.signal(sig, lambda *_: self.request_stop())

            def restore_plain() -> None:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)

            return restore_plain

        def restore() -> None:
            for sig in _SIGNALS:
                loop.remove_signal_handler(sig)

        return restore
