"""celery (Redis transport, Redis result backend): `incr` does one INCR, `ping` one RPUSH,
`nap` sleeps 50 ms then INCRs, `count` INCRs and returns the count.

`incr`, `ping` and `nap` have ignore_result=True, so they neither subscribe for nor store
a result (as before the backend was configured); only `count` uses the result backend.
"""

from __future__ import annotations

import time

import redis
from celery import Celery
from common import COUNTER, NAP, RESULT_TIMEOUT, ROUND_TRIP, URL

ASYNC = False
app = Celery("bench", broker=URL, backend=URL)
_client = redis.Redis.from_url(URL)


@app.task(name="incr", ignore_result=True)
def incr() -> None:
    _client.incr(COUNTER)


@app.task(name="ping", ignore_result=True)
def ping() -> None:
    _client.rpush(ROUND_TRIP, "1")


@app.task(name="nap", ignore_result=True)
def nap() -> None:
    time.sleep(NAP)
    _client.incr(COUNTER)


@app.task(name="count")
def count() -> int:
    return int(_client.incr(COUNTER))


def enqueue_incr() -> None:
    incr.delay()


def enqueue_ping() -> None:
    ping.delay()


def enqueue_nap() -> None:
    nap.delay()


def count_result() -> int:
    """Enqueue `count` and wait for its result: AsyncResult.get() (pub/sub, no polling)."""
    return count.delay().get(timeout=RESULT_TIMEOUT)
