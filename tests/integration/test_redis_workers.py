"""Real worker processes on Redis: kill -9, long tasks, priorities across processes, faults.

Workers are `python -m qtasks -A redis_app:app run` processes on an app module written per
test (its own namespace and timings); every process is reaped and every key deleted after
the test. Tests wait on task records (`app.wait`, woken by pub/sub), not by sleeping.
"""

from __future__ import annotations

import collections
import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio

from qtasks import QueueConfig, TaskStatusEnum
from qtasks.asyncio import QueueTasks
from qtasks.errors import BrokerError

from ..servers import REDIS_URL
from .test_redis_backend import delete_namespace, kill_connections, require_redis

pytestmark = pytest.mark.redis

APP_TEMPLATE = """
import asyncio, os, time
from qtasks import QueueTasks, QueueConfig

config = QueueConfig(
    heartbeat_interval_seconds={heartbeat},
    worker_lost_after_seconds={lost},
    sweep_interval_seconds={sweep},
    graceful_shutdown_seconds=5.0,
    prefetch={prefetch},
)
app = QueueTasks({namespace!r}, broker_url={url!r}, config=config)
LEDGER = {ledger!r}


def _ledger(*words):
    # O_APPEND writes of one short line are atomic between processes.
    fd = os.open(LEDGER, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    try:
        os.write(fd, (" ".join(map(str, words)) + "\\n").encode())
    finally:
        os.close(fd)


@app.task(echo=True)
async def work(ctx, i, seconds=0.0):
    _ledger("start", ctx.uuid, i, os.getpid(), repr(time.time()))
    if seconds:
        await asyncio.sleep(seconds)
    _ledger("end", ctx.uuid, i, os.getpid(), repr(time.time()))
    return i


@app.task(echo=True)
async def block(ctx, seconds):
    # Blocks this worker's event loop: only the heartbeat thread can keep it alive.
    _ledger("start", ctx.uuid, 0, os.getpid(), repr(time.time()))
    time.sleep(seconds)
    _ledger("end", ctx.uuid, 0, os.getpid(), repr(time.time()))
    return seconds


@app.task(echo=True)
def when(ctx, eta):
    _ledger("ran", ctx.uuid, repr(eta), os.getpid(), repr(time.time()))
    return time.time()
"""


class WorkerProcess:
    """One `qtasks run` process."""

    def __init__(self, cwd: Path, *args: str) -> None:
        self.log_path = cwd / f"worker-{time.monotonic_ns()}.log"
        self._log = self.log_path.open("wb")
        env = {**os.environ, "PYTHONPATH": str(cwd)}
        cmd = [sys.executable, "-m", "qtasks", "-A", "redis_app:app", "run", *args]
        self.proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=self._log, stderr=self._log)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self, timeout: float = 30.0) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=timeout)

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.kill()
        self._log.close()


class Setup:
    """The app module's folder, the producer app and the worker processes of one test."""

    def __init__(self, folder: Path, namespace: str, url: str) -> None:
        self.folder = folder
        self.namespace = namespace
        self.url = url
        self.workers: list[WorkerProcess] = []
        self.apps: list[QueueTasks] = []
        self.reapers: list[Callable[[], None]] = []
        """Called on close before the workers are reaped (to kill their children too)."""

    def write_app(
        self,
        *,
        heartbeat: float = 0.2,
        lost: float = 1.5,
        sweep: float = 0.2,
        prefetch: int | None = None,
    ) -> None:
        source = APP_TEMPLATE.format(
            heartbeat=heartbeat,
            lost=lost,
            sweep=sweep,
            prefetch=prefetch,
            namespace=self.namespace,
            url=self.url,
            ledger=str(self.folder / "ledger.txt"),
        )
        (self.folder / "redis_app.py").write_text(textwrap.dedent(source))

    def start_worker(self, *args: str) -> WorkerProcess:
        worker = WorkerProcess(self.folder, *args)
        self.workers.append(worker)
        return worker

    def producer(self) -> QueueTasks:
        app = QueueTasks(self.namespace, broker_url=self.url, config=QueueConfig())
        self.apps.append(app)
        return app

    def ledger(self) -> list[list[str]]:
        path = self.folder / "ledger.txt"
        if not path.exists():
            return []
        return [line.split() for line in path.read_text().splitlines() if line.strip()]

    async def close(self) -> None:
        """Stop the apps, reap the workers (their logs are shown if the test failed)."""
        for app in self.apps:
            await app.stop()
        for reap in self.reapers:
            reap()
        for worker in self.workers:
            worker.close()
            # pytest shows captured output only for failed tests.
            print(f"--- worker {worker.pid} log ---\n{worker.log()[-5000:]}")


@pytest.fixture
async def setup(tmp_path: Path) -> AsyncIterator[Setup]:
    require_redis()
    s = Setup(tmp_path, f"it-{uuid.uuid4().hex[:12]}", REDIS_URL)
    try:
        yield s
    finally:
        await s.close()
        await delete_namespace(s.url, s.namespace)


async def wait_all(app: QueueTasks, uuids: list[Any], timeout: float) -> list[Any]:
    deadline = time.monotonic() + timeout
    return [await app.wait(u, max(0.1, deadline - time.monotonic())) for u in uuids]


# -- at-least-once -------------------------------------------------------------------------


@pytest.mark.timeout(180)
async def test_sigkill_mid_run_with_2000_queued_loses_nothing(setup: Setup) -> None:
    setup.write_app(heartbeat=0.2, lost=1.5, sweep=0.2)
    app = setup.producer()
    records = await app.add_tasks([("work", (i, 0.002)) for i in range(2000)])
    first = setup.start_worker("--concurrency", "20")
    await app.wait(records[300].uuid, 60)  # mid-run
    first.kill()
    done_by_first = {w[1] for w in setup.ledger() if w[0] == "end"}
    assert 0 < len(done_by_first) < 2000, "killed mid-run"

    second = setup.start_worker("--concurrency", "20")
    finals = await wait_all(app, [r.uuid for r in records], 120)
    assert [f.status for f in finals] == [TaskStatusEnum.SUCCESS] * 2000, "0 lost"
    assert [f.returning for f in finals] == list(range(2000))
    ends = collections.Counter(w[1] for w in setup.ledger() if w[0] == "end")
    assert set(ends) == {str(r.uuid) for r in records}
    twice = [u for u, n in ends.items() if n > 1]
    # Only what the killed worker held (running or prefetched) may run again.
    assert len(twice) <= 40, twice
    assert second.stop() == 0, second.log()


@pytest.mark.timeout(60)
async def test_long_task_of_a_live_worker_is_not_redelivered(setup: Setup) -> None:
    lost = 1.0
    setup.write_app(heartbeat=0.2, lost=lost, sweep=0.1)
    app = setup.producer()
    one = setup.start_worker("--concurrency", "1")
    two = setup.start_worker("--concurrency", "1")
    warm = await app.add_tasks([("work", (i,)) for i in range(4)])
    await wait_all(app, [r.uuid for r in warm], 30)  # both workers up and sweeping
    record = await app.add_task("block", 3.5 * lost)  # 3.5x lost_after, loop blocked
    assert record is not None
    final = await app.wait(record.uuid, 30)
    assert final.status == TaskStatusEnum.SUCCESS
    starts = [w for w in setup.ledger() if w[0] == "start" and w[1] == str(record.uuid)]
    assert len(starts) == 1, f"run once, not redelivered: {starts}"
    assert final.attempts == 1
    assert one.stop() == 0
    assert two.stop() == 0


@pytest.mark.timeout(60)
async def test_priority_order_across_two_worker_processes(setup: Setup) -> None:
    setup.write_app(prefetch=0)  # claim one at a time: the order is Redis's
    app = setup.producer()
    calls = []
    for n in range(15):
        for priority in (5, 0, 9):
            calls.append(("work", (priority * 1000 + n, 0.02), {}, {"priority": priority}))
    records = await app.add_tasks(calls)
    workers = [setup.start_worker("--concurrency", "1") for _ in range(2)]
    await wait_all(app, [r.uuid for r in records], 60)
    starts = sorted(
        (float(w[4]), int(w[2]) // 1000, w[3]) for w in setup.ledger() if w[0] == "start"
    )
    assert len({pid for _, _, pid in starts}) == 2, "both processes took tasks"
    order = [priority for _, priority, _ in starts]
    # Claims are in priority order in Redis; two workers log concurrent claims in either
    # order, so an entry may only be ahead of its neighbour, never further.
    for k, priority in enumerate(order):
        assert priority <= min(order[k + 2 :], default=priority), order
    for worker in workers:
        assert worker.stop() == 0


@pytest.mark.timeout(60)
async def test_delayed_tasks_do_not_run_early(setup: Setup) -> None:
    setup.write_app()
    app = setup.producer()
    worker = setup.start_worker("--concurrency", "4")
    await wait_all(app, [(await app.add_task("work", 0)).uuid], 30)  # type: ignore[union-attr]
    now = time.time()
    delays = [0.8, 0.2, 0.5]
    records = [await app.add_task("when", now + d, delay=d) for d in delays]
    finals = await wait_all(app, [r.uuid for r in records if r is not None], 30)
    for final, delay in zip(finals, delays, strict=True):
        ran_at = final.returning
        assert ran_at >= final.eta >= now + delay, "not early"
        assert ran_at < final.eta + 1.0, "and not much later"
    ran = [w for w in setup.ledger() if w[0] == "ran"]
    assert [float(w[2]) for w in ran] == sorted(float(w[2]) for w in ran), "in eta order"
    assert worker.stop() == 0


# -- connection faults -----------------------------------------------------------------------


@pytest.mark.timeout(60)
async def test_client_kill_of_the_worker_connections_resumes_within_5s(setup: Setup) -> None:
    setup.write_app()
    app = setup.producer()
    worker = setup.start_worker("--concurrency", "4")
    await wait_all(app, [(await app.add_task("work", 0)).uuid], 30)  # type: ignore[union-attr]
    raw = redis.asyncio.Redis.from_url(setup.url)
    try:
        assert await kill_connections(raw, worker.pid) >= 1
    finally:
        await raw.aclose()
    start = time.monotonic()
    record = await app.add_task("work", 1)
    assert record is not None
    final = await app.wait(record.uuid, 5.0)
    assert final.status == TaskStatusEnum.SUCCESS
    assert time.monotonic() - start < 5.0
    assert worker.stop() == 0, worker.log()


@pytest.mark.timeout(60)
async def test_round_trip_through_the_result_api(setup: Setup) -> None:
    setup.write_app()
    app = setup.producer()
    worker = setup.start_worker("--concurrency", "10")
    await wait_all(app, [(await app.add_task("work", 0)).uuid], 30)  # type: ignore[union-attr]
    times = []
    for i in range(200):
        start = time.perf_counter()
        final = await app.add_task("work", i, timeout=5.0)
        times.append(time.perf_counter() - start)
        assert final is not None
        assert final.returning == i
    times.sort()
    p50 = times[len(times) // 2]
    # Woken by pub/sub: far below any polling interval (the SQLite default is 50 ms).
    assert p50 < 0.010, f"p50 {p50 * 1000:.2f} ms"
    assert worker.stop() == 0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[Callable[[], subprocess.Popen[bytes]]]:
    """A private redis-server with AOF on a free port; `start()` (re)starts it."""
    server = shutil.which("redis-server")
    if server is None:
        pytest.skip("redis-server is not installed")
    port = _free_port()
    data = tmp_path / "redis-data"
    data.mkdir()
    procs: list[subprocess.Popen[bytes]] = []

    def start() -> subprocess.Popen[bytes]:
        args = f"--port {port} --bind 127.0.0.1 --appendonly yes --appendfsync always"
        proc = subprocess.Popen(
            [server, *args.split(), "--save", "", "--dir", str(data), "--daemonize", "no"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        procs.append(proc)
        deadline = time.monotonic() + 10
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
                break
            if time.monotonic() > deadline:
                raise RuntimeError("the private redis-server did not start")
            time.sleep(0.02)
        return proc

    start.port = port  # type: ignore[attr-defined]
    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)


@pytest.mark.timeout(120)
async def test_worker_resumes_after_a_redis_restart(tmp_path: Path, private_redis: Any) -> None:
    server = private_redis()
    url = f"redis://127.0.0.1:{private_redis.port}/0"
    s = Setup(tmp_path, "restart", url)
    s.write_app()
    app = s.producer()
    worker = s.start_worker("--concurrency", "4")
    try:
        await wait_all(app, [(await app.add_task("work", 0)).uuid], 30)  # type: ignore[union-attr]
        queued = await app.add_tasks([("work", (i, 0.01)) for i in range(200)])
        server.send_signal(signal.SIGKILL)  # AOF with fsync always: nothing acked is lost
        server.wait(timeout=10)
        with pytest.raises(BrokerError, match=re.escape(f"Redis at {url}")):
            await app.add_task("work", -1)  # producers get a clear error, not a silent drop
        private_redis()
        after = await app.add_task("work", 999)
        assert after is not None
        finals = await wait_all(app, [r.uuid for r in [*queued, after]], 60)
        assert all(f.status == TaskStatusEnum.SUCCESS for f in finals)
        assert worker.stop() == 0, worker.log()
    finally:
        await s.close()


# -- several worker processes under a supervisor ---------------------------------------------


def _children(pid: int) -> set[int]:
    """Process ids of the live children of `pid` (from /proc)."""
    out: set[int] = set()
    with contextlib.suppress(OSError):
        for task in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError):
                text = Path(f"/proc/{pid}/task/{task}/children").read_text()
                out.update(int(p) for p in text.split())
    return out


def _alive(pid: int) -> bool:
    """True while `pid` runs (a zombie waiting to be reaped counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


class Supervised:
    """A `qtasks run --processes N` supervisor; its children are killed too on close."""

    def __init__(self, setup: Setup, *args: str) -> None:
        self.supervisor = setup.start_worker(*args)
        self.seen: set[int] = set()
        setup.reapers.append(self.close)

    def children(self, n: int, timeout: float = 30.0, exclude: set[int] | None = None) -> set[int]:
        """Wait until `n` live children (none of `exclude`) run; their pids."""
        deadline = time.monotonic() + timeout
        while True:
            kids = {p for p in _children(self.supervisor.pid) if _alive(p)}
            self.seen |= kids
            if len(kids) == n and not kids & (exclude or set()):
                return kids
            if time.monotonic() > deadline or self.supervisor.proc.poll() is not None:
                raise AssertionError(f"{n} children expected, found {kids}")
            time.sleep(0.02)

    def close(self) -> None:
        self.seen |= _children(self.supervisor.pid)
        for pid in self.seen:
            if _alive(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


@pytest.mark.timeout(120)
async def test_processes_2_share_2000_tasks_and_stop_cleanly_on_sigterm(setup: Setup) -> None:
    setup.write_app()
    app = setup.producer()
    records = await app.add_tasks([("work", (i, 0.001)) for i in range(2000)])
    run = Supervised(setup, "--processes", "2", "--concurrency", "8")
    kids = run.children(2)
    finals = await wait_all(app, [r.uuid for r in records], 90)
    assert [f.status for f in finals] == [TaskStatusEnum.SUCCESS] * 2000
    assert [f.returning for f in finals] == list(range(2000))
    ledger = setup.ledger()
    starts = collections.Counter(w[1] for w in ledger if w[0] == "start")
    ends = collections.Counter(w[1] for w in ledger if w[0] == "end")
    uuids = {str(r.uuid) for r in records}
    assert set(ends) == set(starts) == uuids, "none lost"
    assert max(starts.values()) == max(ends.values()) == 1, "each ran exactly once"
    pids = {int(w[3]) for w in ledger if w[0] == "end"}
    assert pids == kids, "both children took tasks, the supervisor none"

    # SIGTERM to the supervisor: forwarded, both children drain and exit, then it exits 0,
    # all within the grace period (5 s in the app's config) plus start-up slack.
    start = time.monotonic()
    assert run.supervisor.stop(timeout=5.0 + 5.0) == 0, run.supervisor.log()
    assert time.monotonic() - start < 5.0 + 5.0
    assert not [p for p in kids if _alive(p)], "both children exited"
    log = run.supervisor.log()
    assert "Traceback" not in log, log[-3000:]
    assert await app.broker.queue_sizes(["default"]) == {"default": 0}


@pytest.mark.timeout(120)
async def test_processes_2_sigkill_of_a_child_is_restarted_and_loses_nothing(
    setup: Setup,
) -> None:
    setup.write_app(heartbeat=0.2, lost=1.5, sweep=0.2)
    app = setup.producer()
    records = await app.add_tasks([("work", (i, 0.04)) for i in range(2000)])
    run = Supervised(setup, "--processes", "2", "--concurrency", "8")
    kids = run.children(2)
    await app.wait(records[400].uuid, 60)  # mid-run
    victim = sorted(kids)[0]
    os.kill(victim, signal.SIGKILL)
    # The supervisor notices the death and starts a new child in the victim's place.
    after = run.children(2, exclude={victim})
    assert len(after & kids) == 1, (kids, after)
    newcomer = (after - kids).pop()

    finals = await wait_all(app, [r.uuid for r in records], 90)
    assert [f.status for f in finals] == [TaskStatusEnum.SUCCESS] * 2000, "lost 0"
    assert [f.returning for f in finals] == list(range(2000))
    ledger = setup.ledger()
    ends = collections.Counter(w[1] for w in ledger if w[0] == "end")
    assert set(ends) == {str(r.uuid) for r in records}
    cut = {w[1] for w in ledger if w[0] == "start" and int(w[3]) == victim} - {
        w[1] for w in ledger if w[0] == "end" and int(w[3]) == victim
    }
    assert cut, "the victim was killed with tasks running"
    # The victim's cut-short tasks ran again elsewhere. Only what it held may run twice: a
    # task it finished but had not acked yet when it was killed.
    twice = {u for u, n in ends.items() if n > 1}
    victim_ended = {w[1] for w in ledger if w[0] == "end" and int(w[3]) == victim}
    assert twice <= victim_ended, twice - victim_ended
    assert len(twice) <= 40, twice
    for u in cut:
        assert ends[u] == 1
    assert {int(w[3]) for w in ledger if w[0] == "end" and int(w[3]) == newcomer}, (
        "the restarted child took tasks"
    )
    assert "restarting it" in run.supervisor.log()
    assert run.supervisor.stop(timeout=15.0) == 0, run.supervisor.log()
    assert not [p for p in after if _alive(p)]
