"""Enqueue and drain throughput of no-op tasks, one worker process, memory and SQLite.

    python bench/bench_core.py                 # 10,000 tasks, 3 runs, both backends
    python bench/bench_core.py -n 2000 --runs 5 --backends sqlite
    python bench/bench_core.py --idle-plugins 0,3   # the cost of 3 installed, idle plugins

Drain counts from the worker's start until every message is acked and every result
record stored (at-least-once kept), so it is the figure a user would see. Medians of the
runs are printed; this machine is shared, so compare rows from the same run.

`--idle-plugins 0,3` repeats every run with 0 and with 3 plugins installed that listen
only to start/stop triggers (what a trigger nobody listens to costs on the hot path);
`--noop-plugins` installs plugins that listen to every per-task trigger and change
nothing (what an active plugin costs). `--cpu` adds each figure per CPU second of this
process: on a shared machine it moves far less with other load than the wall-clock rate.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import statistics
import tempfile
import time
from pathlib import Path

from qtasks import QueueConfig
from qtasks.asyncio import QueueTasks


def make_plugin(kind: str) -> object:
    """An idle plugin (start/stop triggers only) or a no-op one (every per-task trigger)."""
    from qtasks.plugins.base import BasePlugin  # here: the run without plugins needs none
    from qtasks.plugins.triggers import TRIGGERS

    class IdlePlugin(BasePlugin):
        triggers = ("qtasks_start", "qtasks_stop", "worker_start", "worker_stop")

    class NoopPlugin(BasePlugin):
        triggers = tuple(
            n
            for n, s in TRIGGERS.items()
            if s.per_task or n.startswith(("qtasks_add", "broker_add", "storage_add"))
        )

        async def trigger(self, name: str, **kwargs: object) -> None:
            return None

    return IdlePlugin() if kind == "idle" else NoopPlugin()


class Clock:
    """Wall-clock and CPU time of one phase."""

    def __init__(self) -> None:
        self.wall = time.perf_counter()
        self.cpu = time.process_time()

    def rates(self, figures: dict[str, float], name: str, count: int, cpu: bool) -> None:
        figures[name] = count / (time.perf_counter() - self.wall)
        if cpu:
            figures[f"{name}, per CPU s"] = count / max(time.process_time() - self.cpu, 1e-9)


def make_app(backend: str, workdir: Path, concurrency: int) -> QueueTasks:
    config = QueueConfig(max_tasks_process=concurrency, poll_interval_seconds=0.005)
    if backend == "memory":
        return QueueTasks("bench", broker_url="memory://", config=config)
    db = workdir / f"bench-{time.monotonic_ns()}.sqlite3"
    return QueueTasks("bench", broker_url=f"sqlite:///{db}", config=config)


async def wait_drained(app: QueueTasks, queue: str = "default") -> None:
    while (await app.broker.queue_sizes([queue])).get(queue, 0):
        await asyncio.sleep(0.002)


async def one_run(
    backend: str,
    n: int,
    workdir: Path,
    kind: str,
    plugins: tuple[str, int] = ("none", 0),
    cpu: bool = False,
) -> dict[str, float]:
    app = make_app(backend, workdir, concurrency=10)
    plugin_kind, count = plugins
    for _ in range(count):
        app.add_plugin(make_plugin(plugin_kind))  # type: ignore[arg-type]
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
        clock = Clock()
        for i in range(n):
            await app.add_task("noop", i)
        clock.rates(figures, "enqueue, awaited one by one", n, cpu)

        clock = Clock()
        await asyncio.gather(*(app.add_task("noop", i) for i in range(n)))
        clock.rates(figures, "enqueue, concurrent calls", n, cpu)
        n_total = 2 * n

        worker = app.worker
        clock = Clock()
        await worker.start(app)
        # Counting in memory first: asking the broker for its size competes with the work.
        while len(ran) < n_total:
            await asyncio.sleep(0.002)
        await wait_drained(app)
        clock.rates(figures, f"drain ({kind} no-op)", n_total, cpu)
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
    parser.add_argument(
        "--idle-plugins",
        default="0",
        help="comma-separated counts of idle plugins to install, e.g. 0,3 (default 0)",
    )
    parser.add_argument(
        "--noop-plugins",
        default="",
        help="comma-separated counts of plugins listening to every per-task trigger",
    )
    parser.add_argument("--cpu", action="store_true", help="add rates per CPU second")
    args = parser.parse_args(argv)
    backends = args.backends.split(",")
    kinds = args.kinds.split(",")
    setups = [("idle", int(c)) for c in args.idle_plugins.split(",") if c]
    setups += [("noop", int(c)) for c in args.noop_plugins.split(",") if c]
    results: dict[tuple[str, str, str], list[dict[str, float]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        # Interleave backends, kinds and plugin setups run by run so noise hits all alike.
        for run in range(args.runs):
            for backend in backends:
                for kind in kinds:
                    # Every other run in reverse order: what the previous run left behind
                    # (garbage, a warm cache) must not always favour the same setup.
                    for setup in setups if run % 2 == 0 else setups[::-1]:
                        gc.collect()
                        figures = asyncio.run(
                            one_run(backend, args.n, Path(tmp), kind, setup, args.cpu)
                        )
                        label = f"{setup[1]} {setup[0]}" if setup[1] else "none"
                        results.setdefault((backend, kind, label), []).append(figures)
    print(f"\nqtasks core benchmark: n={args.n}, runs={args.runs}, medians in tasks/s\n")
    print(f"{'backend':<8} {'kind':<6} {'plugins':<8} {'figure':<44} {'tasks/s':>10}")
    for (backend, kind, label), rows in results.items():
        for figure, value in median_table(rows).items():
            print(f"{backend:<8} {kind:<6} {label:<8} {figure:<44} {value:>10,.0f}")
    if len(setups) > 1:
        # Runs of different setups follow each other closely, so the ratio within one run
        # cancels most of the machine's drift; its median is the figure to compare.
        print("\nmedian over runs of (setup / first setup) within the same run:")
        labels = [f"{c} {k}" if c else "none" for k, c in setups]
        for backend in backends:
            for kind in kinds:
                first = results[(backend, kind, labels[0])]
                for label in labels[1:]:
                    other = results[(backend, kind, label)]
                    for figure in first[0]:
                        ratios = [o[figure] / f[figure] for f, o in zip(first, other, strict=True)]
                        ratio = statistics.median(ratios)
                        print(f"{backend:<8} {kind:<6} {label:<8} {figure:<44} {ratio:>9.1%}")


if __name__ == "__main__":
    main()
