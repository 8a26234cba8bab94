"""A CLI worker process and separate producers over the embedded SQLite default."""

from __future__ import annotations

import collections
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from qtasks import QueueConfig, QueueTasks, TaskStatusEnum

from .conftest import WorkerProcess, read_ledger

pytestmark = pytest.mark.e2e

PRODUCER = Path(__file__).with_name("producer.py")


def producer_app(folder: Path) -> QueueTasks:
    """An app on the same SQLite file as the worker, to enqueue and inspect from the test."""
    return QueueTasks(
        "e2e",
        broker_url=f"sqlite:///{folder / 'e2e.sqlite3'}",
        config=QueueConfig(poll_interval_seconds=0.01),
    )


def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


def test_worker_and_producer_processes_exchange_1000_tasks(
    e2e_dir: Callable[..., Path], start_worker: Callable[..., WorkerProcess]
) -> None:
    folder = e2e_dir()
    worker = start_worker(folder, "--concurrency", "8")
    env = {**os.environ, "PYTHONPATH": str(folder)}
    out = subprocess.run(
        [sys.executable, str(PRODUCER), "1000"],
        cwd=folder,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    assert summary == {"sent": 1000, "ok": 1000, "bad": []}
    runs = collections.Counter(words[1] for words in read_ledger(folder) if words[0] == "square")
    assert len(runs) == 1000
    assert max(runs.values()) == 1, "no task ran twice in the normal path"
    worker.signal(signal.SIGTERM)
    assert worker.wait(timeout=30) == 0


def test_sigkill_mid_task_the_task_finishes_on_a_new_worker(
    e2e_dir: Callable[..., Path], start_worker: Callable[..., WorkerProcess]
) -> None:
    folder = e2e_dir()
    app = producer_app(folder)
    try:
        first = start_worker(folder)
        record = app.add_task("nap", 2.0)
        uuid = str(record.uuid)
        wait_for(
            lambda: any(w[:2] == ["nap-start", uuid] for w in read_ledger(folder)),
            30,
            "the task to start on the first worker",
        )
        # A task still running shortly after it started is recorded as `process`.
        wait_for(
            lambda: app.get(uuid).status == TaskStatusEnum.PROCESS,  # type: ignore[union-attr]
            10,
            "the process record of the long task",
        )
        first.signal(signal.SIGKILL)
        first.wait(timeout=10)

        second = start_worker(folder)
        final = app.wait(uuid, timeout=60)
        assert final.status == TaskStatusEnum.SUCCESS
        assert final.returning == 2.0
        ledger = read_ledger(folder)
        starts = [w for w in ledger if w[:2] == ["nap-start", uuid]]
        ends = [w for w in ledger if w[:2] == ["nap-end", uuid]]
        assert [w[2] for w in starts] == [str(first.pid), str(second.pid)]
        assert [w[2] for w in ends] == [str(second.pid)]
        second.signal(signal.SIGTERM)
        assert second.wait(timeout=30) == 0
    finally:
        app.close()


def test_sigkill_mid_task_an_at_most_once_task_is_set_aside_not_rerun(
    e2e_dir: Callable[..., Path], start_worker: Callable[..., WorkerProcess]
) -> None:
    folder = e2e_dir()
    app = producer_app(folder)
    try:
        first = start_worker(folder)
        uuid = str(app.add_task("charge", 30.0).uuid)
        wait_for(
            lambda: any(w[:2] == ["charge-start", uuid] for w in read_ledger(folder)),
            30,
            "the task to start on the first worker",
        )
        first.signal(signal.SIGKILL)
        first.wait(timeout=10)

        # Sent after the kill (one sent before could have started, and been interrupted
        # too, on the first worker): other at_most_once tasks run as usual.
        after = str(app.add_task("charge", 0.01).uuid)
        second = start_worker(folder)
        final = app.wait(uuid, timeout=60)
        assert final.status == TaskStatusEnum.ERROR
        assert final.error_type == "TaskInterrupted"
        letters = app.dead_letters(uuids=[uuid])
        assert [x.reason for x in letters] == ["worker_lost"]
        assert app.wait(after, timeout=60).status == TaskStatusEnum.SUCCESS
        starts = [w for w in read_ledger(folder) if w[:2] == ["charge-start", uuid]]
        assert [w[2] for w in starts] == [str(first.pid)], "started once, never again"
        second.signal(signal.SIGTERM)
        assert second.wait(timeout=30) == 0
    finally:
        app.close()


def test_sigterm_loses_nothing_and_runs_nothing_twice(
    e2e_dir: Callable[..., Path], start_worker: Callable[..., WorkerProcess]
) -> None:
    folder = e2e_dir(grace=10.0)
    app = producer_app(folder)
    try:
        uuids = [str(app.add_task("nap", 0.05).uuid) for _ in range(120)]
        first = start_worker(folder, "--concurrency", "4")
        wait_for(lambda: len(read_ledger(folder)) >= 20, 30, "some tasks to run")
        first.signal(signal.SIGTERM)
        assert first.wait(timeout=30) == 0, first.log()
        done_by_first = {w[1] for w in read_ledger(folder) if w[0] == "nap-end"}
        assert 0 < len(done_by_first) < len(uuids), "stopped mid-run"
        started = {w[1] for w in read_ledger(folder) if w[0] == "nap-start"}
        assert started == done_by_first, "every task started before SIGTERM finished"

        second = start_worker(folder, "--concurrency", "4")
        for uuid in uuids:
            assert app.wait(uuid, timeout=60).status == TaskStatusEnum.SUCCESS
        ends = collections.Counter(w[1] for w in read_ledger(folder) if w[0] == "nap-end")
        assert set(ends) == set(uuids), "no task lost"
        assert max(ends.values()) == 1, "no task run twice"
        second.signal(signal.SIGTERM)
        assert second.wait(timeout=30) == 0
    finally:
        app.close()


def test_processes_option_runs_several_workers_and_stops_cleanly(
    e2e_dir: Callable[..., Path], start_worker: Callable[..., WorkerProcess]
) -> None:
    folder = e2e_dir()
    app = producer_app(folder)
    try:
        uuids = [str(app.add_task("nap", 0.2).uuid) for _ in range(40)]
        supervisor = start_worker(folder, "--processes", "2", "--concurrency", "4")
        for uuid in uuids:
            assert app.wait(uuid, timeout=60).status == TaskStatusEnum.SUCCESS
        pids = {w[2] for w in read_ledger(folder) if w[0] == "nap-end"}
        assert len(pids) == 2, "both worker processes took tasks"
        assert str(supervisor.pid) not in pids, "the supervisor itself runs no tasks"
        supervisor.signal(signal.SIGTERM)
        assert supervisor.wait(timeout=30) == 0, supervisor.log()
    finally:
        app.close()


def _children(pid: int) -> set[int]:
    out = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid and fields[0] != "Z":
                out.add(int(entry.name))
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")
def test_children_stop_when_the_supervisor_is_killed(
    e2e_dir: Callable[..., Path], start_worker: Callable[..., WorkerProcess]
) -> None:
    """Children run in their own session (so a Ctrl+C reaches them once, through the
    supervisor): a SIGKILLed supervisor left them running for good, still consuming."""
    folder = e2e_dir(grace=2.0)
    app = producer_app(folder)
    try:
        supervisor = start_worker(folder, "--processes", "2")
        record = app.add_task("square", 3)
        assert app.wait(record.uuid, timeout=60).returning == 9
        wait_for(lambda: len(_children(supervisor.pid)) == 2, 30, "two children")
        children = _children(supervisor.pid)
        supervisor.signal(signal.SIGKILL)
        supervisor.wait(timeout=10)
        wait_for(lambda: not any(_alive(c) for c in children), 15, "the children to stop")
    finally:
        app.close()
