"""dramatiq (RedisBroker, default middleware): `incr` does one INCR, `ping` one RPUSH."""

from __future__ import annotations

import dramatiq
import redis
from common import COUNTER, ROUND_TRIP, URL
from dramatiq.brokers.redis import RedisBroker

ASYNC = False
broker = RedisBroker(url=URL)
dramatiq.set_broker(broker)
_client = redis.Redis.from_url(URL)


@dramatiq.actor
def incr() -> None:
    _client.incr(COUNTER)


@dramatiq.actor
def ping() -> None:
    _client.rpush(ROUND_TRIP, "1")


def enqueue_incr() -> None:
    incr.send()


def enqueue_ping() -> None:
    ping.send()
