"""End to end on every server broker: CLI workers, a producer process, a SIGKILL.

Per broker (SQLite, Redis, RabbitMQ, Kafka): a `python -m qtasks -A e2e_app:app run`
worker and a separate producer process exchange 10,000 tasks (QTASKS_E2E_TASKS to
change it; about 15 s per broker here) with every result checked. Then the worker is
killed with SIGKILL in the middle of a second batch and a new worker finishes it:
nothing is lost (tasks in flight at the kill may run twice, as at-least-once allows).
RabbitMQ and Kafka keep no results: theirs go to a SQLite file both processes share.
"""

from __future__ import annotations

import asyncio
import collections
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from qtasks import QueueTasks, TaskStatusEnum

from ..kafka_server import kafka_url
from ..servers import RABBITMQ_URL, REDIS_URL, delete_namespace, require_server

E2E_TASKS = int(os.environ.get("QTASKS_E2E_TASKS", "10000"))
KILL_BATCH = 400

APP_TEMPLATE = """
import asyncio, os
from qtasks import QueueConfig, QueueTasks

config = QueueConfig(
    max_tasks_process=16,
    heartbeat_interval_seconds=0.5,
    worker_lost_after_seconds=3.0,  # the killed worker's claims come back within ~4 s
    sweep_interval_seconds=1.0,
    graceful_shutdown_seconds=5,
)
app = QueueTasks({name!r}, broker_url={broker_url!r}, storage_url={storage_url!r}, config=config)
LEDGER = {ledger!r}


def _ledger(entry):
    # O_APPEND writes of one short line are atomic between processes.
    fd = os.open(LEDGER, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    try:
        os.write(fd, (entry + "\\n").encode())
    finally:
        os.close(fd)


@app.task(echo=True)
async def square(ctx, x):
    _ledger(f"square {{ctx.uuid}} {{os.getpid()}}")
    return x * x


@app.task(echo=True)
async def nap(ctx, x, seconds):
    await asyncio.sleep(seconds)
    _ledger(f"nap {{ctx.uuid}} {{os.getpid()}}")
    return x
"""

PRODUCER = """
import json, sys
from e2e_app import app

n = int(sys.argv[1])
records = app.add_tasks([("square", (i,)) for i in range(n)])
bad, ok = [], 0
for i, record in enumerate(records):
    final = app.wait(record.uuid, timeout=300)
    if final.status == "success" and final.returning == i * i:
        ok += 1
    else:
        bad.append([i, str(final.status), final.returning, final.error_message])
print(json.dumps({"sent": n, "ok": ok, "bad": bad[:10]}))
app.close()
"""


def rabbitmq_broker_url() -> str:
    parts = urlsplit(RABBITMQ_URL)
    require_server("RabbitMQ", parts.hostname or "127.0.0.1", parts.port or 5672)
    return RABBITMQ_URL


def redis_broker_url() -> str:
    host_port = REDIS_URL.split("//", 1)[1].split("/", 1)[0]
    host, _, port = host_port.rpartition(":")
    require_server("Redis", host or "127.0.0.1", int(port or 6379))
    return REDIS_URL


def kafka_broker_url() -> str:
    # No `queues=` here: the producer process uses the same URL and must not join the
    # group (a member that never fetches would sit on its share of the partitions).
    # A busy worker must not miss heartbeats: a little more slack than the contract suite.
    return kafka_url(partitions=4, session_timeout_ms=2000, heartbeat_interval_ms=500)


def python_env(folder: Path) -> dict[str, str]:
    """The environment for a child process that imports the app module from `folder`."""
    path = os.pathsep.join(p for p in (str(folder), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path}


class Worker:
    """One CLI worker process, killed and reaped at teardown."""

    def __init__(self, folder: Path) -> None:
        self.log_path = folder / f"worker-{time.monotonic_ns()}.log"
        self._log = self.log_path.open("wb")
        env = python_env(folder)
        cmd = [sys.executable, "-m", "qtasks", "-A", "e2e_app:app", "run"]
        self.proc = subprocess.Popen(cmd, cwd=folder, env=env, stdout=self._log, stderr=self._log)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)
        self._log.close()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@pytest.fixture
def start_worker(request: pytest.FixtureRequest) -> Iterator[Callable[[Path], Worker]]:
    workers: list[Worker] = []

    def start(folder: Path) -> Worker:
        worker = Worker(folder)
        workers.append(worker)
        return worker

    yield start
    for worker in workers:
        worker.close()
    if request.session.testsfailed:
        for worker in workers:
            print(f"--- worker {worker.proc.pid} log ---\n{worker.log()[-5000:]}")


def ledger(folder: Path, kind: str) -> collections.Counter[str]:
    path = folder / "ledger.txt"
    if not path.exists():
        return collections.Counter()
    words = (line.split() for line in path.read_text().splitlines())
    return collections.Counter(w[1] for w in words if len(w) == 3 and w[0] == kind)


def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


@pytest.mark.e2e
@pytest.mark.parametrize(
    "broker",
    [
        "sqlite",
        pytest.param("redis", marks=pytest.mark.redis),
        pytest.param("rabbitmq", marks=pytest.mark.rabbitmq),
        pytest.param("kafka", marks=pytest.mark.kafka),
    ],
)
def test_cli_worker_and_producer_then_sigkill_loses_nothing(
    broker: str, tmp_path: Path, start_worker: Callable[[Path], Worker]
) -> None:
    name = f"qtasks-e2e-{uuid.uuid4().hex[:10]}"
    storage_url = f"sqlite:///{tmp_path / 'results.sqlite3'}"
    if broker == "sqlite":
        broker_url = storage_url
    elif broker == "redis":
        broker_url = storage_url = redis_broker_url()
    else:
        broker_url = rabbitmq_broker_url() if broker == "rabbitmq" else kafka_broker_url()
    source = APP_TEMPLATE.format(
        name=name,
        broker_url=broker_url,
        storage_url=storage_url,
        ledger=str(tmp_path / "ledger.txt"),
    )
    (tmp_path / "e2e_app.py").write_text(textwrap.dedent(source))
    (tmp_path / "producer.py").write_text(textwrap.dedent(PRODUCER))
    env = python_env(tmp_path)

    # 1. A worker and a producer process exchange E2E_TASKS tasks, every result checked.
    first = start_worker(tmp_path)
    out = subprocess.run(
        [sys.executable, "producer.py", str(E2E_TASKS)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    assert summary == {"sent": E2E_TASKS, "ok": E2E_TASKS, "bad": []}
    squares = ledger(tmp_path, "square")
    assert len(squares) == E2E_TASKS
    assert max(squares.values()) == 1, "no task ran twice in the normal path"

    # 2. SIGKILL the worker in the middle of a batch; a new worker finishes it.
    app = QueueTasks(name, broker_url=broker_url, storage_url=storage_url)
    try:
        records = app.add_tasks([("nap", (i, 0.01)) for i in range(KILL_BATCH)])
        wait_for(lambda: len(ledger(tmp_path, "nap")) >= KILL_BATCH // 4, 60, "a quarter done")
        first.proc.send_signal(signal.SIGKILL)
        first.proc.wait(timeout=10)
        done_before = len(ledger(tmp_path, "nap"))
        assert done_before < KILL_BATCH, "killed mid-run"
        second = start_worker(tmp_path)
        for i, record in enumerate(records):
            final = app.wait(record.uuid, timeout=120)
            assert final.status == TaskStatusEnum.SUCCESS, (i, final)
            assert final.returning == i
        naps = ledger(tmp_path, "nap")
        assert set(naps) == {str(r.uuid) for r in records}, "0 lost"
        second.proc.send_signal(signal.SIGTERM)
        assert second.proc.wait(timeout=30) == 0, second.log()[-3000:]
    finally:
        cleanup = getattr(app.broker, "delete_queues", None)
        if cleanup is not None:
            app.portal.call(cleanup(["default"]))
        app.close()
        if broker == "redis":
            asyncio.run(delete_namespace(REDIS_URL, name))
