"""qtasks: `incr` does one INCR, `ping` one RPUSH (the round trip's signal)."""

from __future__ import annotations

import redis.asyncio
from common import COUNTER, ROUND_TRIP, URL

from qtasks.asyncio import QueueTasks

ASYNC = True
app = QueueTasks("bench", broker_url=URL)
_clients: list[redis.asyncio.Redis] = []


def _client() -> redis.asyncio.Redis:
    if not _clients:
        _clients.append(redis.asyncio.Redis.from_url(URL))
    return _clients[0]


@app.task(name="incr")
async def incr() -> None:
    await _client().incr(COUNTER)


@app.task(name="ping")
async def ping() -> None:
    await _client().rpush(ROUND_TRIP, "1")


async def startup() -> None:
    await app.start()


async def shutdown() -> None:
    await app.stop()


async def enqueue_incr() -> None:
    await app.add_task("incr")


async def enqueue_ping() -> None:
    await app.add_task("ping")
