"""huey (RedisHuey, blocking reads): `incr` does one INCR, `ping` one RPUSH."""

from __future__ import annotations

import redis
from common import COUNTER, ROUND_TRIP, URL
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


def enqueue_incr() -> None:
    incr()


def enqueue_ping() -> None:
    ping()
