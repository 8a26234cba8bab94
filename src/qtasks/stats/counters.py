"""Per-task-name counters and histograms a worker keeps in memory; no I/O.

A worker updates them on its hot path (a dict lookup, a few integer additions and one
`bisect` per histogram), and publishes `snapshot()` with its registry heartbeat, so a
`Stats` in any process reads them from the GlobalConfig. Counts start when the worker
starts; `merge` adds up the snapshots of several workers.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterable, Mapping
from typing import Any

TIME_BUCKETS_SECONDS: tuple[float, ...] = (
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
)  # fmt: skip
"""Upper bounds of the duration and queue-wait buckets (the last bucket is open)."""

COUNTER_NAMES = (
    "processed", "succeeded", "failed", "retried", "cancelled", "running", "redelivered",
)  # fmt: skip
"""The counters kept per task name, in display order."""


SUCCEEDED, FAILED, RETRIED, CANCELLED = range(4)
"""Indexes of `TaskCounter.outcomes`."""


class TaskCounter:
    """The counters and histograms of one task name in one worker.

    Laid out for the worker's hot path: one `done` call per attempt, plain lists and
    floats, no objects created.
    """

    __slots__ = (
        "duration_counts", "duration_sum", "outcomes", "redelivered", "running", "wait_counts",
        "wait_sum",
    )  # fmt: skip

    def __init__(self) -> None:
        self.running = 0
        self.redelivered = 0
        """Deliveries taken again after a fault (a worker died, a connection dropped)."""
        self.outcomes = [0, 0, 0, 0]
        """Attempts that ended succeeded, failed, retried and cancelled (index constants)."""
        self.duration_counts = [0] * (len(TIME_BUCKETS_SECONDS) + 1)
        self.duration_sum = 0.0
        self.wait_counts = [0] * (len(TIME_BUCKETS_SECONDS) + 1)
        self.wait_sum = 0.0

    def done(self, outcome: int, duration: float, wait: float) -> None:
        """Count one finished attempt: its outcome index, run time and queue wait."""
        self.outcomes[outcome] += 1
        self.duration_counts[bisect_left(TIME_BUCKETS_SECONDS, duration)] += 1
        self.duration_sum += duration
        self.wait_counts[bisect_left(TIME_BUCKETS_SECONDS, wait)] += 1
        self.wait_sum += wait

    def snapshot(self) -> dict[str, Any]:
        """JSON data for the registry entry."""
        succeeded, failed, retried, cancelled = self.outcomes
        return {
            "processed": succeeded + failed + retried + cancelled,
            "succeeded": succeeded,
            "failed": failed,
            "retried": retried,
            "cancelled": cancelled,
            "running": self.running,
            "redelivered": self.redelivered,
            "duration": {"counts": list(self.duration_counts), "sum": self.duration_sum},
            "queue_wait": {"counts": list(self.wait_counts), "sum": self.wait_sum},
        }


class WorkerCounters(dict[str, TaskCounter]):
    """Task name -> its counter, created on first use."""

    def __missing__(self, name: str) -> TaskCounter:
        counter = self[name] = TaskCounter()
        return counter

    def snapshot(self) -> dict[str, dict[str, Any]]:
        """JSON data of every task name seen."""
        return {name: counter.snapshot() for name, counter in self.items()}


def empty_snapshot() -> dict[str, Any]:
    """The snapshot of a task nobody ran yet."""
    return TaskCounter().snapshot()


def merge(snapshots: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """The sum of several snapshots of one task name (from several workers).

    Malformed entries (another version, a hand-edited registry) are skipped field by field.
    """
    total = empty_snapshot()
    for snap in snapshots:
        for name in COUNTER_NAMES:
            value = snap.get(name)
            if isinstance(value, int):
                total[name] += value
        for hist in ("duration", "queue_wait"):
            part = snap.get(hist)
            if not isinstance(part, Mapping):
                continue
            counts = part.get("counts")
            if isinstance(counts, list) and len(counts) == len(total[hist]["counts"]):
                pairs = zip(total[hist]["counts"], counts, strict=True)
                total[hist]["counts"] = [a + int(b) for a, b in pairs]
                total[hist]["sum"] += float(part.get("sum", 0.0))
    return total


def quantile(histogram: Mapping[str, Any], q: float) -> float | None:
    """Upper bound of the bucket holding quantile `q` (0..1); None if nothing was observed.

    Observations beyond the last bound report that bound (the histogram cannot tell more).
    """
    counts: list[int] = list(histogram.get("counts", ()))
    n = sum(counts)
    if n == 0:
        return None
    rank = q * n
    seen = 0
    for index, count in enumerate(counts):
        seen += count
        if seen >= rank and count:
            return TIME_BUCKETS_SECONDS[min(index, len(TIME_BUCKETS_SECONDS) - 1)]
    return TIME_BUCKETS_SECONDS[-1]


def mean(histogram: Mapping[str, Any]) -> float | None:
    """Mean of the observations; None if there were none."""
    n = sum(histogram.get("counts", ()))
    return None if n == 0 else float(histogram.get("sum", 0.0)) / n
