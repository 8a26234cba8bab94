"""Small asyncio helpers shared by the brokers."""

from __future__ import annotations

import asyncio


async def wait_event(event: asyncio.Event, timeout: float) -> bool:
    """Wait until `event` is set or `timeout` seconds pass; True if it was set.

    Uses `asyncio.wait`, not `wait_for`: before Python 3.12 `wait_for` can swallow a
    cancellation that arrives just as the event is set, and a stopping worker would then
    sit out the whole timeout.
    """
    waiter = asyncio.ensure_future(event.wait())
    try:
        await asyncio.wait((waiter,), timeout=max(timeout, 0.0))
    finally:
        waiter.cancel()
    return event.is_set()
