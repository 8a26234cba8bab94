"""Delay buckets for brokers with no native delayed delivery (RabbitMQ and Kafka).

A message due in D seconds waits in the bucket with the longest wait not above D. Waits
are 4**k milliseconds for k = 0..15 (1 ms to about 12 days), so a queue needs at most 16
buckets whatever delays its tasks use. Each hop takes the largest power of four that
fits, so a delay needs at most 3 hops per power of four (about 1.5 on average: a
one-hour delay takes about a dozen).

Clocks. A message carries the delay REMAINING after the bucket it is in (`rest_us`,
microseconds), never an absolute due time, and each hop counts it down by the bucket's
wait, a duration measured by the server (RabbitMQ: the bucket queue's TTL) or by the
consuming worker's monotonic clock (Kafka: from when it received the record). So no
worker's wall clock takes part, and a skewed one can neither hurry a task nor hold it
back. The one wall-clock reading is the producer's, once, at publish: `eta - time.time()`
on the producer's own clock (a retry's eta is set on the same worker's clock, so its
backoff is exact); a producer whose clock is off shifts the eta of the tasks it
enqueues by that much, which nothing downstream could know. A message is never delivered
before its delay has passed: every wait is measured from a moment after the previous
one ended, a rest below 1 ms is rounded UP to the 1 ms bucket, and the time a message
spends between hops (publishing, a consumer's backlog) only adds to its delay.
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


def next_hop(remaining_us: int) -> tuple[int | None, int]:
    """Where a message with `remaining_us` microseconds left to wait goes next.

    (bucket, microseconds still left once that bucket's wait is over), or (None, 0)
    when it is due now. The rest is never negative.
    """
    if remaining_us <= 0:
        return None, 0
    ms = max(remaining_us // 1000, 1)  # below 1 ms: rounded UP to the 1 ms bucket
    level = min((ms.bit_length() - 1) // 2, BUCKET_LEVELS - 1)
    return level, max(remaining_us - bucket_wait_ms(level) * 1000, 0)
