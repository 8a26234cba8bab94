"""taskiq (taskiq-redis RedisStreamBroker, acked): `incr` does one INCR, `ping` one RPUSH.

The producer's `startup()` declares the consumer group, so tasks queued before the worker
starts are delivered to it.
"""

from __future__ import annotations

import redis.asyncio
from common import COUNTER, ROUND_TRIP, URL
from taskiq_redis import RedisStreamBroker

ASYNC = True
broker = RedisStreamBroker(URL)
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


async def startup() -> None:
    await broker.startup()


async def shutdown() -> None:
    await broker.shutdown()


async def enqueue_incr() -> None:
    await incr.kiq()


async def enqueue_ping() -> None:
    await ping.kiq()
