"""The producer side of one system, run with that system's venv by bench_peers.py.

    python driver.py SYSTEM enqueue N      # N single enqueue calls, one after another
    python driver.py SYSTEM nap N          # queue N `nap` tasks (untimed), for the I/O row
    python driver.py SYSTEM roundtrip N    # N round trips enqueue -> ran, worker running
    python driver.py SYSTEM result N       # N round trips through the result API

Prints one JSON object on its last line. `enqueue` makes one untimed call first (connect,
load scripts), so N + 1 tasks are queued; `nap` queues exactly N. `roundtrip` times
enqueue -> the task ran: the `ping` task RPUSHes to a list and this process waits on it
with BLPOP (a blocking wait, no polling), so the figure includes the enqueue call and the
worker's pickup. `result` times the app's `count_result()`: enqueue `count` and wait for
its return value through the system's own result API, as its users would call it (each
app's docstring says how). Both round trips make 10 untimed trips first.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import ROUND_TRIP, URL

WARMUP_TRIPS = 10


def percentile(values: list[float], p: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(len(values) * p))]


def summary(trips: list[float]) -> dict[str, float]:
    return {"p50": statistics.median(trips) * 1000, "p99": percentile(trips, 0.99) * 1000}


def check_count(value: object) -> None:
    """`count` returns the counter after its INCR: anything else means no real result."""
    if not isinstance(value, int) or value < 1:
        raise SystemExit(f"result API returned {value!r}, expected a count")


def run_sync(mod: object, mode: str, n: int) -> dict[str, float]:
    import redis

    if mode == "enqueue":
        mod.enqueue_incr()  # type: ignore[attr-defined]
        t0 = time.perf_counter()
        for _ in range(n):
            mod.enqueue_incr()  # type: ignore[attr-defined]
        return {"rate": n / (time.perf_counter() - t0), "queued": n + 1}
    if mode == "nap":
        for _ in range(n):
            mod.enqueue_nap()  # type: ignore[attr-defined]
        return {"queued": n}
    trips: list[float] = []
    if mode == "result":
        for i in range(n + WARMUP_TRIPS):
            t0 = time.perf_counter()
            value = mod.count_result()  # type: ignore[attr-defined]
            elapsed = time.perf_counter() - t0
            check_count(value)
            if i >= WARMUP_TRIPS:
                trips.append(elapsed)
        return summary(trips)
    client = redis.Redis.from_url(URL)
    for i in range(n + WARMUP_TRIPS):
        t0 = time.perf_counter()
        mod.enqueue_ping()  # type: ignore[attr-defined]
        if client.blpop([ROUND_TRIP], timeout=30) is None:
            raise SystemExit("round trip timed out")
        if i >= WARMUP_TRIPS:
            trips.append(time.perf_counter() - t0)
    client.close()
    return summary(trips)


async def run_async(mod: object, mode: str, n: int) -> dict[str, float]:
    import redis.asyncio

    await mod.startup()  # type: ignore[attr-defined]
    try:
        if mode == "enqueue":
            await mod.enqueue_incr()  # type: ignore[attr-defined]
            t0 = time.perf_counter()
            for _ in range(n):
                await mod.enqueue_incr()  # type: ignore[attr-defined]
            return {"rate": n / (time.perf_counter() - t0), "queued": n + 1}
        if mode == "nap":
            for _ in range(n):
                await mod.enqueue_nap()  # type: ignore[attr-defined]
            return {"queued": n}
        trips: list[float] = []
        if mode == "result":
            for i in range(n + WARMUP_TRIPS):
                t0 = time.perf_counter()
                value = await mod.count_result()  # type: ignore[attr-defined]
                elapsed = time.perf_counter() - t0
                check_count(value)
                if i >= WARMUP_TRIPS:
                    trips.append(elapsed)
            return summary(trips)
        client = redis.asyncio.Redis.from_url(URL)
        for i in range(n + WARMUP_TRIPS):
            t0 = time.perf_counter()
            await mod.enqueue_ping()  # type: ignore[attr-defined]
            if await client.blpop([ROUND_TRIP], timeout=30) is None:
                raise SystemExit("round trip timed out")
            if i >= WARMUP_TRIPS:
                trips.append(time.perf_counter() - t0)
        await client.aclose()
        return summary(trips)
    finally:
        await mod.shutdown()  # type: ignore[attr-defined]


def main() -> None:
    system, mode, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    if mode not in ("enqueue", "nap", "roundtrip", "result"):
        raise SystemExit(f"unknown mode {mode!r}")
    mod = importlib.import_module(f"{system}_app")
    result = asyncio.run(run_async(mod, mode, n)) if mod.ASYNC else run_sync(mod, mode, n)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
