"""huey (RedisHuey, blocking reads): `incr` does one INCR, `ping` one RPUSH, `nap` sleeps
50 ms then INCRs, `count` INCRs and returns the count (read back through the result API).

RedisHuey keeps results by default, but not None ones (store_none=False): `incr`, `ping`
and `nap` return None, so only `count` writes a result.
"""

from __future__ import annotations

import time

import redis
from common import COUNTER, NAP, RESULT_TIMEOUT, ROUND_TRIP, URL
from huey import RedisHuey

ASYNC = False
huey = RedisHuey("bench", url=URL)
_client = redis.Redis.from_url(URL)


@huey.task()
def incr() -> None:
    _client.incr(COUNTER)


@huey.task()
def ping() -> None:
    _client.rpush(ROUND_TRIP, "1")


@huey.task()
def nap() -> None:
    time.sleep(NAP)
    _client.incr(COUNTER)


@huey.task()
def count() -> int:
    return int(_client.incr(COUNTER))


def enqueue_incr() -> None:
    incr()


def enqueue_ping() -> None:
    ping()


def enqueue_nap() -> None:
    nap()


def count_result() -> int:
    """Enqueue `count` and wait for its result: Result.get(blocking=True), default backoff."""
    return count().get(blocking=True, timeout=RESULT_TIMEOUT)
