"""Regression: a message above aiokafka's default 1 MiB request cap, allowed by
`max_payload_bytes`, is produced and fetched (fault scenario 12: 10 MB round-trips).

Before the fix the producer kept aiokafka's `max_request_size` of 1 MiB, so any message
over it failed with MessageSizeTooLargeError whatever `max_payload_bytes` allowed.
"""

from __future__ import annotations

import time
import uuid

import pytest

from qtasks import QueueConfig
from qtasks.brokers.kafka import KafkaBroker, _request_size
from qtasks.interfaces import Delivery
from qtasks.message import Envelope

from ..kafka_server import kafka_url

pytestmark = pytest.mark.kafka


def test_request_size_follows_the_payload_limit() -> None:
    assert _request_size(16 * 1024 * 1024) > 16 * 1024 * 1024
    assert _request_size(1000) == 1024 * 1024  # never below aiokafka's default
    assert _request_size(None) >= 1 << 30


async def test_a_message_over_one_mebibyte_round_trips() -> None:
    config = QueueConfig(max_payload_bytes=4 * 1024 * 1024)
    broker = KafkaBroker.from_url(
        kafka_url(queues="q"), namespace=f"qtasks-it-{uuid.uuid4().hex[:10]}", config=config
    )
    await broker.start()
    try:
        body = b"x" * (3 * 1024 * 1024)
        await broker.publish([Envelope(str(uuid.uuid4()), "q", 0, None, time.time(), body)])
        got: list[Delivery] = []
        deadline = time.monotonic() + 30
        while not got and time.monotonic() < deadline:
            got = await broker.fetch(["q"], 1, 0.5)
        assert [d.body for d in got] == [body]
        await broker.ack(got)
    finally:
        await broker.stop()
