"""Delay buckets for brokers with no native delayed delivery (RabbitMQ and Kafka).

A message due in D seconds waits in the bucket with the longest wait not above D. Waits
are 4**k milliseconds for k = 0..15 (1 ms to about 12 days), so a queue needs at most 16
buckets whatever delays its tasks use. When the message comes out its eta is checked
again; if it is still early it goes on to the bucket for what remains. Each hop takes
the largest power of four that fits, so a delay needs at most 3 hops per power of four
(about 1.5 on average: a one-hour delay takes about a dozen), and a message is never
delivered before its eta (a rest below 1 ms is rounded UP to the 1 ms bucket).
"""

from __future__ import annotations

BUCKET_LEVELS = 16
"""Bucket k holds messages for 4**k milliseconds; k runs from 0 to BUCKET_LEVELS - 1."""


def bucket_wait_ms(level: int) -> int:
    """How long bucket `level` holds a message, in milliseconds."""
    return 1 << (2 * level)


def bucket_for(remaining_seconds: float) -> int | None:
    """The bucket for a message due in `remaining_seconds`; None if it is due now."""
    if remaining_seconds <= 0:
        return None
    ms = int(remaining_seconds * 1000)
    if ms < 1:
        return 0
    # The largest k with 4**k <= ms: half the bit length of ms, rounded down.
    return min((ms.bit_length() - 1) // 2, BUCKET_LEVELS - 1)
