"""State shared by two worker processes (CLI) over SQLite: no increment is ever lost."""

from __future__ import annotations

import collections
import signal
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest

from qtasks import QueueConfig, QueueTasks, TaskStatusEnum

from .conftest import WorkerProcess, read_ledger

pytestmark = pytest.mark.e2e

APP = """
import asyncio, os
from qtasks import QueueTasks, QueueConfig
from qtasks.plugins import AsyncState, SyncState

config = QueueConfig(
    heartbeat_interval_seconds=0.2,
    worker_lost_after_seconds=5.0,
    poll_interval_seconds=0.01,
)
app = QueueTasks("e2e", broker_url="sqlite:///{db}", config=config)
LEDGER = {ledger!r}


class Counters(AsyncState):
    pass


class SyncCounters(SyncState):
    state_name = "Counters"


def _ledger(entry):
    fd = os.open(LEDGER, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    try:
        os.write(fd, (entry + "\\n").encode())
    finally:
        os.close(fd)


@app.task
async def bump(counters: Counters) -> int:
    await asyncio.sleep(0)  # let the other tasks of this process interleave
    value = await counters.incr("hits")
    _ledger(f"bump {{os.getpid()}}")
    return value


@app.task
def bump_sync(counters: SyncCounters) -> int:
    value = counters.incr("sync-hits")
    _ledger(f"bump {{os.getpid()}}")
    return value


@app.task
async def careful(counters: Counters) -> None:
    async with counters.lock("total"):
        value = await counters.get("total", 0)
        await asyncio.sleep(0.001)  # a lost update would happen right here without the lock
        await counters.set("total", value + 1)
    _ledger(f"careful {{os.getpid()}}")
"""


class Counters:
    """Reads the shared state from the test process (a sync app on the same file)."""

    def __init__(self, app: QueueTasks) -> None:
        from qtasks.plugins import SyncState

        class CountersView(SyncState):
            state_name = "Counters"

        self.view = CountersView(app)

    def get(self, key: str) -> object:
        return self.view.get(key)


@pytest.fixture
def state_app_dir(tmp_path: Path) -> Path:
    source = APP.format(db=tmp_path / "e2e.sqlite3", ledger=str(tmp_path / "ledger.txt"))
    (tmp_path / "e2e_app.py").write_text(textwrap.dedent(source))
    return tmp_path


def test_two_worker_processes_increment_one_state_exactly(
    state_app_dir: Path, start_worker: Callable[..., WorkerProcess]
) -> None:
    folder = state_app_dir
    producer = QueueTasks(
        "e2e",
        broker_url=f"sqlite:///{folder / 'e2e.sqlite3'}",
        config=QueueConfig(poll_interval_seconds=0.01),
    )
    try:
        workers = [start_worker(folder, "--concurrency", "16") for _ in range(2)]
        records = [producer.add_task("bump") for _ in range(800)]
        records += [producer.add_task("bump_sync") for _ in range(200)]
        records += [producer.add_task("careful") for _ in range(100)]
        finals = [producer.wait(r.uuid, timeout=120) for r in records]  # type: ignore[union-attr]
        assert {f.status for f in finals} == {TaskStatusEnum.SUCCESS}

        counters = Counters(producer)
        assert counters.get("hits") == 800
        assert counters.get("sync-hits") == 200
        assert counters.get("total") == 100
        # Every value incr returned is distinct: no two increments saw the same count.
        assert sorted(f.returning for f in finals[:800]) == list(range(1, 801))

        by_pid = collections.Counter(words[1] for words in read_ledger(folder))
        assert set(by_pid) == {str(w.pid) for w in workers}, "both processes did work"
        for worker in workers:
            worker.signal(signal.SIGTERM)
        for worker in workers:
            assert worker.wait(timeout=30) == 0, worker.log()
    finally:
        producer.close()
