"""Real worker processes started through the CLI, on an app module written per test.

`WorkerProcess` runs `python -m qtasks -A <module>:app run ...` in the test's folder
(stderr to a log file shown on failure) and is always reaped, so no test leaves a process
behind. The app module is written from a template so each test sets its own timings.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

APP_TEMPLATE = """
import os, time, asyncio
from qtasks import QueueTasks, QueueConfig

config = QueueConfig(
    heartbeat_interval_seconds=0.2,
    worker_lost_after_seconds=1.5,
    sweep_interval_seconds=0.2,
    poll_interval_seconds=0.01,
    graceful_shutdown_seconds={grace},
)
app = QueueTasks("e2e", broker_url="sqlite:///{db}", config=config)
LEDGER = {ledger!r}


def _ledger(entry):
    # O_APPEND writes of one short line are atomic between processes.
    fd = os.open(LEDGER, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    try:
        os.write(fd, (entry + "\\n").encode())
    finally:
        os.close(fd)


@app.task(echo=True)
def square(ctx, x):
    _ledger(f"square {{ctx.uuid}} {{os.getpid()}}")
    return x * x


@app.task(echo=True)
async def nap(ctx, seconds):
    _ledger(f"nap-start {{ctx.uuid}} {{os.getpid()}}")
    await asyncio.sleep(seconds)
    _ledger(f"nap-end {{ctx.uuid}} {{os.getpid()}}")
    return seconds


@app.task(echo=True, at_most_once=True)
async def charge(ctx, seconds):
    _ledger(f"charge-start {{ctx.uuid}} {{os.getpid()}}")
    await asyncio.sleep(seconds)
    _ledger(f"charge-end {{ctx.uuid}} {{os.getpid()}}")
    return seconds
"""


class WorkerProcess:
    """One `qtasks run` process in `cwd`."""

    def __init__(self, cwd: Path, *args: str) -> None:
        self.log_path = cwd / f"worker-{time.monotonic_ns()}.log"
        self._log = self.log_path.open("wb")
        env = {**os.environ, "PYTHONPATH": str(cwd)}
        cmd = [sys.executable, "-m", "qtasks", "-A", "e2e_app:app", "run", *args]
        self.proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=self._log, stderr=self._log)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout: float) -> int:
        return self.proc.wait(timeout=timeout)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)
        self._log.close()


@pytest.fixture
def e2e_dir(tmp_path: Path) -> Callable[..., Path]:
    """Write the app module into tmp_path (with the given grace period) and return it."""

    def write(grace: float = 10.0) -> Path:
        source = APP_TEMPLATE.format(
            db=tmp_path / "e2e.sqlite3", ledger=str(tmp_path / "ledger.txt"), grace=grace
        )
        (tmp_path / "e2e_app.py").write_text(textwrap.dedent(source))
        return tmp_path

    return write


@pytest.fixture
def start_worker(request: pytest.FixtureRequest) -> Iterator[Callable[..., WorkerProcess]]:
    """Start CLI workers; all are killed and reaped at teardown, logs shown on failure."""
    workers: list[WorkerProcess] = []

    def start(cwd: Path, *args: str) -> WorkerProcess:
        worker = WorkerProcess(cwd, *args)
        workers.append(worker)
        return worker

    yield start
    for worker in workers:
        worker.close()
        rep = getattr(request.node, "rep_call", None)
        if rep is not None and rep.failed:
            print(f"--- worker {worker.pid} log ---\n{worker.log()}")


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # type: ignore[no-untyped-def]
    rep = yield
    if rep.when == "call":
        item.rep_call = rep  # type: ignore[attr-defined]
    return rep


def read_ledger(folder: Path) -> list[list[str]]:
    """The complete ledger lines, split into words (one being appended may read cut short)."""
    path = folder / "ledger.txt"
    if not path.exists():
        return []
    text = path.read_text()
    return [line.split() for line in text[: text.rfind("\n") + 1].splitlines() if line.strip()]
