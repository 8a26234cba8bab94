"""qtasks: `incr` does one INCR, `ping` one RPUSH (the round trip's signal), `nap` sleeps
50 ms then INCRs, `count` INCRs and returns the count (read back through the result API).

qtasks keeps a result record for every task, so the result API needs no extra setup.
"""

from __future__ import annotations

import asyncio

import redis.asyncio
from common import COUNTER, NAP, RESULT_TIMEOUT, ROUND_TRIP, URL

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


@app.task(name="nap")
async def nap() -> None:
    await asyncio.sleep(NAP)
    await _client().incr(COUNTER)


@app.task(name="count")
async def count() -> int:
    return int(await _client().incr(COUNTER))


async def startup() -> None:
    await app.start()


async def shutdown() -> None:
    await app.stop()


async def enqueue_incr() -> None:
    await app.add_task("incr")


async def enqueue_ping() -> None:
    await app.add_task("ping")


async def enqueue_nap() -> None:
    await app.add_task("nap")


async def count_result() -> int:
    """Enqueue `count` and wait for its finished record (add_task with a timeout)."""
    record = await app.add_task("count", timeout=RESULT_TIMEOUT)
    if record is None:
        raise TimeoutError("no result")
    return record.returning
