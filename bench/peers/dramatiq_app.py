"""dramatiq (RedisBroker, default middleware + Results): `incr` does one INCR, `ping` one
RPUSH, `nap` sleeps 50 ms then INCRs, `count` INCRs and returns the count.

The Results middleware (RedisBackend) stores results only for actors with
store_results=True, which only `count` has; for the others it looks up that option after
each message and stores nothing.
"""

from __future__ import annotations

import time

import dramatiq
import redis
from common import COUNTER, NAP, RESULT_TIMEOUT, ROUND_TRIP, URL
from dramatiq.brokers.redis import RedisBroker
from dramatiq.results import Results
from dramatiq.results.backends.redis import RedisBackend

ASYNC = False
broker = RedisBroker(url=URL)
broker.add_middleware(Results(backend=RedisBackend(url=URL)))
dramatiq.set_broker(broker)
_client = redis.Redis.from_url(URL)


@dramatiq.actor
def incr() -> None:
    _client.incr(COUNTER)


@dramatiq.actor
def ping() -> None:
    _client.rpush(ROUND_TRIP, "1")


@dramatiq.actor
def nap() -> None:
    time.sleep(NAP)
    _client.incr(COUNTER)


@dramatiq.actor(store_results=True)
def count() -> int:
    return int(_client.incr(COUNTER))


def enqueue_incr() -> None:
    incr.send()


def enqueue_ping() -> None:
    ping.send()


def enqueue_nap() -> None:
    nap.send()


def count_result() -> int:
    """Enqueue `count` and wait for its result: get_result(block=True) (a blocking pop)."""
    return count.send().get_result(block=True, timeout=int(RESULT_TIMEOUT * 1000))
