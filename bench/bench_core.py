"""Enqueue and drain throughput of no-op tasks, one worker process, memory and SQLite.

    python bench/bench_core.py                 # 10,000 tasks, 3 runs, both backends
    python bench/bench_core.py -n 2000 --runs 5 --backends sqlite

Drain counts from the worker's start until every message is acked and every result
record stored (at-least-once kept), so it is the figure a user would see. Medians of the
runs are printed; this machine is shared, so compare rows from the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

from qtasks import QueueConfig
from qtasks.asyncio import QueueTasks


def make_app(backend: str, workdir: Path, concurrency: int) -> QueueTasks:
    config = QueueConfig(max_tasks_process=concurrency, poll_interval_seconds=0.005)
    if backend == "memory":
        return QueueTasks("bench", broker_url="memory://", config=config)
    db = workdir / f"bench-{time.monotonic_ns()}.sqlite3"
    return QueueTasks("bench", broker_url=f"sqlite:///{db}", config=config)


async def wait_drained(app: QueueTasks, queue: str = "default") -> None:
    while (await app.broker.queue_sizes([queue])).get(queue, 0):
        await asyncio.sleep(0.002)


async def one_run(backend: str, n: int, workdir: Path, kind: str) -> dict[str, float]:
    app = make_app(backend, workdir, concurrency=10)
    ran: list[int] = []  # list.append is atomic in CPython: safe from task threads

    if kind == "async":

        @app.task(name="noop")
        async def noop(i: int) -> int:
            ran.append(i)
            return i
    else:

        @app.task(name="noop")
        def noop(i: int) -> int:
            ran.append(i)
            return i

    figures: dict[str, float] = {}
    async with app:
        t0 = time.perf_counter()
        for i in range(n):
            await app.add_task("noop", i)
        figures["enqueue, awaited one by one"] = n / (time.perf_counter() - t0)

        t0 = time.perf_counter()
        await asyncio.gather(*(app.add_task("noop", i) for i in range(n)))
        figures["enqueue, concurrent calls"] = n / (time.perf_counter() - t0)
        n_total = 2 * n

        worker = app.worker
        t0 = time.perf_counter()
        await worker.start(app)
        # Counting in memory first: asking the broker for its size competes with the work.
        while len(ran) < n_total:
            await asyncio.sleep(0.002)
        await wait_drained(app)
        figures[f"drain ({kind} no-op)"] = n_total / (time.perf_counter() - t0)
        await worker.stop()
    return figures


def median_table(rows: list[dict[str, float]]) -> dict[str, float]:
    return {k: statistics.median(r[k] for r in rows) for k in rows[0]}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("-n", type=int, default=10_000, help="tasks per enqueue phase")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--backends", default="memory,sqlite")
    parser.add_argument("--kinds", default="async,sync")
    args = parser.parse_args(argv)
    backends = args.backends.split(",")
    kinds = args.kinds.split(",")
    results: dict[tuple[str, str], list[dict[str, float]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        # Interleave backends and kinds run by run so machine noise hits all alike.
        for _ in range(args.runs):
            for backend in backends:
                for kind in kinds:
                    figures = asyncio.run(one_run(backend, args.n, Path(tmp), kind))
                    results.setdefault((backend, kind), []).append(figures)
    print(f"\nqtasks core benchmark: n={args.n}, runs={args.runs}, medians in tasks/s\n")
    print(f"{'backend':<8} {'kind':<6} {'figure':<32} {'tasks/s':>10}")
    for (backend, kind), rows in results.items():
        for figure, value in median_table(rows).items():
            print(f"{backend:<8} {kind:<6} {figure:<32} {value:>10,.0f}")


if __name__ == "__main__":
    main()
