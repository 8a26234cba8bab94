"""qtasks on Redis: enqueue, drain, round trips, I/O-bound throughput and worker memory.

    python bench/bench_redis.py                       # 10,000 tasks, 3 interleaved runs
    python bench/bench_redis.py -n 2000 --runs 1      # quicker
    python bench/bench_redis.py --url redis://127.0.0.1:6379/15

Every task does one Redis INCR, so completion is counted the way the peers' benchmarks
count it. The worker is a separate process (`bench_redis.py worker ...`) started for each
run, ready before the clock starts. Figures are medians of the runs; each run uses its
own namespace, deleted afterwards. The machine is shared: compare rows of one run.

Rows starting with "bare redis-py" measure redis-py alone on this machine, in this run:
the ceilings the qtasks rows compare with (the drain's tasks each do one INCR with
redis-py's default client, so "INCR x10 concurrent" bounds the drain). "worker CPU per
task" is the worker process's CPU time over the drain, which other load on a shared
machine disturbs far less than rates do.

Workloads (targets from issue #3 in brackets):
  enqueue, single awaited    N awaited add_task calls, one after another   [~9,000/s]
  enqueue, concurrent        N add_task calls gathered at once              [>= 30,000/s]
  enqueue, bulk add_tasks    one add_tasks call with N tasks                [>= 40,000/s]
  drain                      N queued tasks, worker at its defaults         [>= 6,000/s]
  round trip, task ran       add_task -> the task starts (p50)              [huey 0.45 ms]
  round trip, result API     add_task(timeout=) returns the result (p50/p99) [<= 1.5/5 ms]
  I/O-bound                  2,000 x 50 ms sleep, concurrency 100           [>= 1,800/s]
  worker memory              RSS at rest / peak after the drain             [<= 35 MiB]
                             (bytecode cached, as installed: see worker_env)
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import redis.asyncio

from qtasks import QueueConfig
from qtasks.asyncio import QueueTasks
from qtasks.runtime.worker import Worker

DEFAULT_URL = os.environ.get("QTASKS_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")


def make_app(url: str, namespace: str, concurrency: int | None = None) -> QueueTasks:
    """The benchmark app: `incr` counts, `nap` sleeps 50 ms and counts, `stamp` tells when."""
    config = QueueConfig()
    if concurrency is not None:
        config.max_tasks_process = concurrency
    app = QueueTasks(namespace, broker_url=url, config=config)
    counter = f"bench:{namespace}:count"
    clients: list[redis.asyncio.Redis] = []

    def client() -> redis.asyncio.Redis:
        if not clients:
            clients.append(redis.asyncio.Redis.from_url(url))
        return clients[0]

    @app.task(name="incr")
    async def incr() -> int:
        return int(await client().incr(counter))

    @app.task(name="noop")
    async def noop() -> None:
        return None

    @app.task(name="nap")
    async def nap() -> int:
        await asyncio.sleep(0.05)
        return int(await client().incr(counter))

    @app.task(name="stamp")
    async def stamp() -> float:
        ran = time.time()
        await client().incr(counter)
        return ran

    app.bench_clients = clients  # type: ignore[attr-defined]
    return app


# -- the worker process ----------------------------------------------------------------------


async def worker_main(url: str, namespace: str, concurrency: int | None) -> None:
    """Start, say ready, wait for go, run until told to stop."""
    app = make_app(url, namespace, concurrency)
    control = redis.asyncio.Redis.from_url(url, socket_timeout=None)
    await app.start()
    await control.rpush(f"bench:{namespace}:ready", "1")
    await control.blpop([f"bench:{namespace}:go"], timeout=0)
    worker = Worker()
    await worker.start(app)
    await control.blpop([f"bench:{namespace}:stop"], timeout=0)
    await worker.stop()
    await app.stop()
    for c in app.bench_clients:  # type: ignore[attr-defined]
        await c.aclose()
    await control.aclose()


PYCACHE = Path(tempfile.gettempdir()) / "qtasks-bench-pycache"


def worker_env() -> dict[str, str]:
    """The worker's environment: Python bytecode cached, as in any installed deployment.

    Under PYTHONDONTWRITEBYTECODE (some sandboxes set it) an editable checkout compiles
    every qtasks module from source at each start, which leaves the worker about 3 MiB
    larger than a pip-installed qtasks (byte-compiled at install, like the peers) ever is.
    The bytecode goes to a cache outside the checkout (PYTHONPYCACHEPREFIX), which
    `warm_up` fills: with a prefix, Python looks for all bytecode there, redis-py's too.
    """
    env = dict(os.environ)
    if env.pop("PYTHONDONTWRITEBYTECODE", None) is not None:
        env.setdefault("PYTHONPYCACHEPREFIX", str(PYCACHE))
    return env


async def warm_up(url: str) -> None:
    """One unmeasured worker that runs a few tasks, so every module a worker loads is cached."""
    control = redis.asyncio.Redis.from_url(url, socket_timeout=None)
    ns = f"bench-warm-{uuid.uuid4().hex[:8]}"
    worker = WorkerProcess(url, ns)
    try:
        app = make_app(url, ns)
        async with app:
            await worker.ready(control)
            await app.add_tasks([("incr",)] * 10)
            await worker.go(control)
            await wait_count(control, ns, 10)
            await worker.stop(control)
    finally:
        if worker.proc.poll() is None:
            worker.proc.kill()
            worker.proc.wait()
        await cleanup(control, ns)
        await control.aclose()


class WorkerProcess:
    """A worker in its own process, ready (connected, tasks loaded) but not yet consuming."""

    def __init__(self, url: str, namespace: str, concurrency: int | None = None) -> None:
        self.url = url
        self.namespace = namespace
        # Imported as a module, not run as a script, so its bytecode is cached too.
        boot = f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
        boot += "import bench_redis; bench_redis.main(sys.argv[1:])"
        args = [sys.executable, "-c", boot, "worker", "--url", url, "--namespace", namespace]
        if concurrency is not None:
            args += ["--concurrency", str(concurrency)]
        self.proc = subprocess.Popen(args, env=worker_env())

    async def ready(self, control: redis.asyncio.Redis) -> None:
        await control.blpop([f"bench:{self.namespace}:ready"], timeout=60)

    async def go(self, control: redis.asyncio.Redis) -> None:
        await control.rpush(f"bench:{self.namespace}:go", "1")

    async def stop(self, control: redis.asyncio.Redis) -> None:
        await control.rpush(f"bench:{self.namespace}:stop", "1")
        await asyncio.to_thread(self.proc.wait, 60)

    def cpu_seconds(self) -> float:
        """User + system CPU time the worker process used so far."""
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def memory_kib(self) -> tuple[int, int]:
        """(VmRSS, VmHWM) of the worker process in KiB."""
        fields = dict(
            line.split(":", 1)
            for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines()
        )
        return int(fields["VmRSS"].split()[0]), int(fields["VmHWM"].split()[0])


async def cleanup(control: redis.asyncio.Redis, namespace: str) -> None:
    for pattern in (f"qtasks:{{{namespace}}}:*", f"bench:{namespace}:*"):
        keys = [k async for k in control.scan_iter(match=pattern, count=1000)]
        for i in range(0, len(keys), 1000):
            await control.delete(*keys[i : i + 1000])


async def wait_count(control: redis.asyncio.Redis, namespace: str, n: int) -> None:
    key = f"bench:{namespace}:count"
    while int(await control.get(key) or 0) < n:
        await asyncio.sleep(0.001)


async def wait_drained(app: QueueTasks) -> None:
    while (await app.broker.queue_sizes(["default"])).get("default", 0):
        await asyncio.sleep(0.001)


# -- one run ---------------------------------------------------------------------------------


async def bare_ceiling(
    url: str, control: redis.asyncio.Redis, n: int, figures: dict[str, float]
) -> None:
    """What redis-py alone does on this machine now: the ceiling for the enqueue rows."""
    key = f"bench:bare-{uuid.uuid4().hex[:8]}"
    try:
        t0 = time.perf_counter()
        for i in range(n):
            await control.rpush(key, i)
        figures["bare redis-py: awaited RPUSH (/s)"] = n / (time.perf_counter() - t0)
        pipe = control.pipeline(transaction=False)
        t0 = time.perf_counter()
        for i in range(n):
            pipe.rpush(key, i)
        await pipe.execute()
        figures["bare redis-py: pipelined RPUSH (/s)"] = n / (time.perf_counter() - t0)
        # What the drain's tasks cost by themselves: one INCR each, 10 at a time (the
        # worker's default concurrency), with the same client the tasks use.
        client = redis.asyncio.Redis.from_url(url)
        counter = f"{key}:incr"

        async def incr_loop() -> None:
            for _ in range(n // 10):
                await client.incr(counter)

        t0 = time.perf_counter()
        await asyncio.gather(*(incr_loop() for _ in range(10)))
        figures["bare redis-py: INCR x10 concurrent (/s)"] = n / (time.perf_counter() - t0)
        await client.delete(counter)
        await client.aclose()
    finally:
        await control.delete(key)


async def one_run(url: str, n: int, round_trips: int) -> dict[str, float]:
    import statistics

    figures: dict[str, float] = {}
    control = redis.asyncio.Redis.from_url(url, socket_timeout=None)
    workers: list[WorkerProcess] = []
    namespaces: list[str] = []
    try:
        await bare_ceiling(url, control, n, figures)
        # Enqueue: no worker, nothing consumed; the namespace is dropped afterwards.
        ns = f"bench-{uuid.uuid4().hex[:8]}"
        namespaces.append(ns)
        app = make_app(url, ns)
        async with app:
            await app.add_task("incr")  # connected, scripts loaded
            t0 = time.perf_counter()
            for _ in range(n):
                await app.add_task("incr")
            figures["enqueue, single awaited (/s)"] = n / (time.perf_counter() - t0)
            t0 = time.perf_counter()
            await asyncio.gather(*(app.add_task("incr") for _ in range(n)))
            figures["enqueue, concurrent (/s)"] = n / (time.perf_counter() - t0)
            t0 = time.perf_counter()
            await app.add_tasks([("incr",)] * n)
            figures["enqueue, bulk add_tasks (/s)"] = n / (time.perf_counter() - t0)
        await cleanup(control, ns)

        # Drain, then round trips on the same (now idle) worker.
        ns = f"bench-{uuid.uuid4().hex[:8]}"
        namespaces.append(ns)
        worker = WorkerProcess(url, ns)
        workers.append(worker)
        app = make_app(url, ns)
        async with app:
            await worker.ready(control)
            rss, _ = worker.memory_kib()
            figures["worker memory at rest (MiB)"] = rss / 1024
            await app.add_tasks([("incr",)] * n)
            cpu0 = worker.cpu_seconds()
            t0 = time.perf_counter()
            await worker.go(control)
            await wait_count(control, ns, n)
            await wait_drained(app)
            figures["drain (/s)"] = n / (time.perf_counter() - t0)
            figures["drain: worker CPU per task (us)"] = 1e6 * (worker.cpu_seconds() - cpu0) / n
            _, peak = worker.memory_kib()
            figures["worker peak memory (MiB)"] = peak / 1024

            ran: list[float] = []
            for _ in range(round_trips):
                sent = time.time()
                final = await app.add_task("stamp", timeout=10)
                assert final is not None
                ran.append(final.returning - sent)
            figures["round trip, task ran p50 (ms)"] = statistics.median(ran) * 1000
            results: list[float] = []
            for _ in range(round_trips):
                t0 = time.perf_counter()
                final = await app.add_task("incr", timeout=10)
                results.append(time.perf_counter() - t0)
                assert final is not None
            results.sort()
            figures["round trip, result API p50 (ms)"] = statistics.median(results) * 1000
            figures["round trip, result API p99 (ms)"] = (
                results[min(len(results) - 1, int(len(results) * 0.99))] * 1000
            )
            await worker.stop(control)
        await cleanup(control, ns)

        # I/O-bound: 2,000 x 50 ms at concurrency 100.
        ns = f"bench-{uuid.uuid4().hex[:8]}"
        namespaces.append(ns)
        worker = WorkerProcess(url, ns, concurrency=100)
        workers.append(worker)
        app = make_app(url, ns)
        async with app:
            await worker.ready(control)
            await app.add_tasks([("nap",)] * 2000)
            t0 = time.perf_counter()
            await worker.go(control)
            await wait_count(control, ns, 2000)
            await wait_drained(app)
            figures["I/O-bound 2,000 x 50 ms, c=100 (/s)"] = 2000 / (time.perf_counter() - t0)
            await worker.stop(control)
        await cleanup(control, ns)
    finally:
        for w in workers:
            if w.proc.poll() is None:
                w.proc.kill()
                w.proc.wait()
        for ns in namespaces:
            await cleanup(control, ns)
        await control.aclose()
    return figures


TARGETS = {
    "bare redis-py: awaited RPUSH (/s)": "(issue: 9,400)",
    "bare redis-py: pipelined RPUSH (/s)": "(issue: 42,300)",
    "enqueue, single awaited (/s)": ">= ~9,000",
    "enqueue, concurrent (/s)": ">= 30,000",
    "enqueue, bulk add_tasks (/s)": ">= 40,000",
    "bare redis-py: INCR x10 concurrent (/s)": "(drain ceiling here)",
    "drain (/s)": ">= 6,000",
    "drain: worker CPU per task (us)": "",
    "round trip, task ran p50 (ms)": "(huey 0.45)",
    "round trip, result API p50 (ms)": "<= 1.5",
    "round trip, result API p99 (ms)": "<= 5",
    "I/O-bound 2,000 x 50 ms, c=100 (/s)": ">= 1,800",
    "worker memory at rest (MiB)": "<= 35",
    "worker peak memory (MiB)": "",
}


def main(argv: list[str] | None = None) -> None:
    # Imported here, not at the top: the worker processes import this module too, and
    # their memory is measured (a worker has no use for argparse or statistics).
    import argparse
    import statistics

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("mode", nargs="?", default="bench", choices=["bench", "worker"])
    parser.add_argument("--url", default=DEFAULT_URL)
    parser.add_argument("-n", type=int, default=10_000, help="tasks per enqueue/drain phase")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--round-trips", type=int, default=1000)
    parser.add_argument("--namespace")
    parser.add_argument("--concurrency", type=int)
    args = parser.parse_args(argv)
    if args.mode == "worker":
        asyncio.run(worker_main(args.url, args.namespace, args.concurrency))
        return
    asyncio.run(warm_up(args.url))
    rows = [asyncio.run(one_run(args.url, args.n, args.round_trips)) for _ in range(args.runs)]
    print(f"\nqtasks on Redis: n={args.n}, runs={args.runs}, medians\n")
    print(f"{'workload':<40} {'qtasks':>10}   {'target'}")
    for name in rows[0]:
        value = statistics.median(r[name] for r in rows)
        shown = f"{value:,.0f}" if value >= 100 else f"{value:.2f}"
        print(f"{name:<40} {shown:>10}   {TARGETS.get(name, '')}")


if __name__ == "__main__":
    main()
