"""celery (Redis transport, no result backend): `incr` does one INCR, `ping` one RPUSH."""

from __future__ import annotations

import redis
from celery import Celery
from common import COUNTER, ROUND_TRIP, URL

ASYNC = False
app = Celery("bench", broker=URL)
_client = redis.Redis.from_url(URL)


@app.task(name="incr")
def incr() -> None:
    _client.incr(COUNTER)


@app.task(name="ping")
def ping() -> None:
    _client.rpush(ROUND_TRIP, "1")


def enqueue_incr() -> None:
    incr.delay()


def enqueue_ping() -> None:
    ping.delay()
