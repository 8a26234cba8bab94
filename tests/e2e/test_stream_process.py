"""Streaming progress across processes: a CLI worker runs a generator task, the test
process follows its steps (`task.stream()`, `app.stream(uuid)`, `qtasks add --wait`).

Each step must arrive while the task still runs: the task yields its first step, then
waits for a file the test creates only after it saw that step.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from qtasks import QueueConfig, QueueTasks, TaskStatusEnum
from qtasks.errors import TaskFailed
from qtasks.sync import SyncTask

from .conftest import WorkerProcess

pytestmark = pytest.mark.e2e

APP = """
import os, time
from qtasks import QueueTasks, QueueConfig

app = QueueTasks(
    "e2e-stream",
    broker_url="sqlite:///{db}",
    config=QueueConfig(poll_interval_seconds=0.01),
)


def _wait_for(path):
    # The test process creates the file: no cross-process event to block on but the file.
    deadline = time.monotonic() + 30
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise TimeoutError(f"nobody created {{path}}")
        time.sleep(0.01)


@app.task(generate_handler=lambda value: {{"step": value, "pid": os.getpid()}})
def gated(gate, fail=False):
    yield "started"
    _wait_for(gate)
    yield "gate opened"
    if fail:
        raise RuntimeError("failed after two steps")
    return "done"
"""


@pytest.fixture
def stream_dir(tmp_path: Path) -> Path:
    source = APP.format(db=tmp_path / "e2e.sqlite3")
    (tmp_path / "e2e_app.py").write_text(textwrap.dedent(source))
    return tmp_path


@dataclasses.dataclass
class Producer:
    """The test's own app on the worker's file, and its handle of the `gated` task."""

    app: QueueTasks
    gated: SyncTask[Any, Any]


@pytest.fixture
def producer(stream_dir: Path) -> Iterator[Producer]:
    app = QueueTasks(
        "e2e-stream",
        broker_url=f"sqlite:///{stream_dir / 'e2e.sqlite3'}",
        config=QueueConfig(poll_interval_seconds=0.01),
    )

    @app.task
    def gated(gate: str, fail: bool = False):  # type: ignore[no-untyped-def]
        yield  # the worker process runs its own definition; this one only sends

    yield Producer(app, gated)
    app.close()


def test_steps_reach_another_process_while_the_task_runs(
    stream_dir: Path, producer: Producer, start_worker: Callable[..., WorkerProcess]
) -> None:
    worker = start_worker(stream_dir)
    gate = stream_dir / "gate-1"
    stream = producer.gated.stream(str(gate), timeout=60)
    steps = []
    for step in stream:
        steps.append(step)
        if step["step"] == "started":
            running = producer.app.get(stream.uuid)
            assert running is not None
            assert not running.is_final, "the step came only after the task ended"
            gate.touch()
    assert [s["step"] for s in steps] == ["started", "gate opened"]
    assert {s["pid"] for s in steps} == {worker.pid}
    assert stream.record is not None
    assert stream.record.status is TaskStatusEnum.SUCCESS
    assert stream.result == "done"
    # Followed again from the start, by uuid: the same steps, replayed.
    assert list(producer.app.stream(stream.uuid, timeout=10)) == steps


def test_a_failure_reaches_the_stream_after_the_steps(
    stream_dir: Path, producer: Producer, start_worker: Callable[..., WorkerProcess]
) -> None:
    start_worker(stream_dir)
    gate = stream_dir / "gate-2"
    record = producer.app.add_task("gated", str(gate), fail=True)
    assert record is not None
    stream = producer.app.stream(record.uuid, timeout=60)
    first = next(stream)
    gate.touch()
    second = next(stream)
    with pytest.raises(TaskFailed, match="RuntimeError: failed after two steps"):
        next(stream)
    assert [first["step"], second["step"]] == ["started", "gate opened"]


def test_add_wait_prints_each_step_as_it_happens(
    stream_dir: Path, start_worker: Callable[..., WorkerProcess]
) -> None:
    start_worker(stream_dir)
    gate = stream_dir / "gate-3"
    env = {**os.environ, "PYTHONPATH": str(stream_dir)}
    cmd = [sys.executable, "-m", "qtasks", "-A", "e2e_app:app", "add", "gated"]
    cmd += [f'"{gate}"', "--wait", "60"]
    with subprocess.Popen(
        cmd, cwd=stream_dir, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    ) as proc:
        assert proc.stdout is not None
        first = proc.stdout.readline()  # blocks until the command printed the first step
        assert first.startswith('step 1: {"step":"started"'), first
        assert proc.poll() is None, "the command ended before the task could"
        gate.touch()
        rest, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    lines = rest.splitlines()
    assert lines[0].startswith('step 2: {"step":"gate opened"')
    assert "success" in rest
    assert '"done"' in rest
