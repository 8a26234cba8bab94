"""taskiq (taskiq-redis RedisStreamBroker, acked, Redis result backend): `incr` does one
INCR, `ping` one RPUSH, `nap` sleeps 50 ms then INCRs, `count` INCRs and returns the count.

The producer's `startup()` declares the consumer group, so tasks queued before the worker
starts are delivered to it.

taskiq writes every task's result to its result backend and has no per-task switch, so the
backend here is RedisAsyncResultBackend minus the None results (like huey's default
store_none=False): `incr`, `ping` and `nap` store nothing, as with no backend, and
`count`'s result goes through RedisAsyncResultBackend unchanged.
"""

from __future__ import annotations

import asyncio
from typing import Any

import redis.asyncio
from common import COUNTER, NAP, RESULT_TIMEOUT, ROUND_TRIP, URL
from taskiq import TaskiqResult
from taskiq_redis import RedisAsyncResultBackend, RedisStreamBroker


class ResultsNotNone(RedisAsyncResultBackend):
    """RedisAsyncResultBackend that skips successful None results."""

    async def set_result(self, task_id: str, result: TaskiqResult[Any]) -> None:
        if result.return_value is None and not result.is_err:
            return
        await super().set_result(task_id, result)


ASYNC = True
broker = RedisStreamBroker(URL).with_result_backend(ResultsNotNone(URL))
_clients: list[redis.asyncio.Redis] = []


def _client() -> redis.asyncio.Redis:
    if not _clients:
        _clients.append(redis.asyncio.Redis.from_url(URL))
    return _clients[0]


@broker.task
async def incr() -> None:
    await _client().incr(COUNTER)


@broker.task
async def ping() -> None:
    await _client().rpush(ROUND_TRIP, "1")


@broker.task
async def nap() -> None:
    await asyncio.sleep(NAP)
    await _client().incr(COUNTER)


@broker.task
async def count() -> int:
    return int(await _client().incr(COUNTER))


async def startup() -> None:
    await broker.startup()


async def shutdown() -> None:
    await broker.shutdown()


async def enqueue_incr() -> None:
    await incr.kiq()


async def enqueue_ping() -> None:
    await ping.kiq()


async def enqueue_nap() -> None:
    await nap.kiq()


async def count_result() -> int:
    """Enqueue `count` and wait for its result: wait_result() (polls, every 0.2 s by default)."""
    result = await (await count.kiq()).wait_result(timeout=RESULT_TIMEOUT)
    if result.is_err:
        raise RuntimeError(f"count failed: {result.error!r}")
    return result.return_value
