"""The supervisor of `run --processes N`, driving tiny fake worker scripts.

Each fake child records its starts and the signals it gets in files of a temporary
directory; the tests wait on those files (polling: these are real processes).
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from qtasks.runtime.supervisor import Supervisor

pytestmark = [
    pytest.mark.skipif(os.name != "posix", reason="POSIX signals"),
    pytest.mark.timeout(10),
]

# argv: directory, index, mode. Modes: wait (exit 0 on a signal), drain (exit 0 on the
# second signal), crash (exit 3), crash-once (exit 3 on the first start), exit0, exit2,
# exit2-after-0 (exit 2 once child 0 is ready).
# A child also exits when its parent is gone, so a failed test leaves nothing behind.
CHILD = textwrap.dedent(
    """
    import os, signal, sys, time
    from pathlib import Path

    folder, index, mode = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
    parent = os.getppid()
    with open(folder / f"starts-{index}", "a") as f:
        f.write(f"{os.getpid()}\\n")
    start = len((folder / f"starts-{index}").read_text().split())
    if os.getsid(0) == os.getpid():
        (folder / f"leader-{index}").touch()
    if mode == "crash" or (mode == "crash-once" and start == 1):
        sys.exit(3)
    if mode in ("exit0", "exit2"):
        sys.exit(int(mode[-1]))
    if mode == "exit2-after-0":  # once child 0 can take a signal
        while not (folder / "ready-0-1").exists():
            time.sleep(0.01)
        sys.exit(2)
    received = []

    def on_signal(signum, frame):
        received.append(signum)
        with open(folder / f"signals-{index}", "a") as f:
            f.write(signal.Signals(signum).name + "\\n")
        if mode != "drain" or len(received) == 2:
            sys.exit(0)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    (folder / f"ready-{index}-{start}").touch()
    while os.getppid() == parent:
        time.sleep(0.05)
    """
)

DEADLINE_SECONDS = 4.0


def wait_until(condition: Callable[[], bool], what: str) -> None:
    """Poll `condition` until true; fail after a few seconds."""
    deadline = time.monotonic() + DEADLINE_SECONDS
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


class Children:
    """The fake children's folder: builds their argv and reads what they recorded."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.script = folder / "child.py"
        self.script.write_text(CHILD)

    def command(self, *modes: str) -> Callable[[int], list[str]]:
        """A child command; child i runs modes[i] (the last mode for the rest)."""

        def build(index: int) -> list[str]:
            mode = modes[min(index, len(modes) - 1)]
            return [
                sys.executable,
                "-I",
                "-S",
                str(self.script),
                str(self.folder),
                str(index),
                mode,
            ]

        return build

    def starts(self, index: int) -> list[int]:
        """Process ids of each start of child `index`."""
        path = self.folder / f"starts-{index}"
        return [int(pid) for pid in path.read_text().split()] if path.exists() else []

    def signals(self, index: int) -> list[str]:
        """Names of the signals child `index` received, over all its starts."""
        path = self.folder / f"signals-{index}"
        return path.read_text().split() if path.exists() else []

    def ready(self, index: int, start: int = 1) -> bool:
        """Whether the `start`-th run of child `index` has its signal handlers in place."""
        return (self.folder / f"ready-{index}-{start}").exists()


@pytest.fixture
def children(tmp_path: Path) -> Children:
    """Fake children recording into a temporary directory."""
    return Children(tmp_path)


class Running:
    """A Supervisor running in a thread (signals are sent with request_stop)."""

    def __init__(self, supervisor: Supervisor) -> None:
        self.supervisor = supervisor
        self.exit_code: int | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        self.exit_code = self.supervisor.run(handle_signals=False)

    def join(self) -> int | None:
        """Wait for run() to return; its exit code."""
        self.thread.join(DEADLINE_SECONDS)
        assert not self.thread.is_alive(), "the supervisor did not stop"
        return self.exit_code


@pytest.fixture
def start() -> Iterator[Callable[..., Running]]:
    """Start supervisors with fast test timings; any left running are killed with their children."""
    running: list[Running] = []

    def start(command: Callable[[int], list[str]], processes: int, **options: Any) -> Running:
        options = {"restart_delay_seconds": 0.01, "poll_interval_seconds": 0.01, **options}
        handle = Running(Supervisor(command, processes, **options))
        running.append(handle)
        return handle

    yield start
    for handle in running:
        if handle.thread.is_alive():
            handle.supervisor.request_stop(signal.SIGKILL)
            handle.thread.join(DEADLINE_SECONDS)


def test_starts_n_children_and_forwards_a_stop(
    children: Children, start: Callable[..., Running]
) -> None:
    running = start(children.command("wait"), 3)
    wait_until(lambda: all(children.ready(i) for i in range(3)), "three children")
    assert sorted(running.supervisor.pids()) == sorted(children.starts(i)[0] for i in range(3))
    running.supervisor.request_stop(signal.SIGTERM)
    assert running.join() == 0
    assert [children.signals(i) for i in range(3)] == [["SIGTERM"]] * 3
    assert running.supervisor.pids() == []
    # Each child leads its own session: a Ctrl+C in a terminal reaches only the supervisor,
    # which forwards it once (twice would skip the children's graceful drain).
    assert all((children.folder / f"leader-{i}").exists() for i in range(3))


def test_restarts_a_crashed_child(
    children: Children, start: Callable[..., Running], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "qtasks.runtime.supervisor")
    running = start(children.command("crash-once", "wait"), 2)
    wait_until(lambda: children.ready(0, start=2) and children.ready(1), "the restart")
    assert len(children.starts(0)) == 2
    assert len(children.starts(1)) == 1
    assert "worker 0 (pid" in caplog.text
    assert "exited with code 3; restarting it in" in caplog.text
    running.supervisor.request_stop(signal.SIGINT)
    assert running.join() == 0
    assert children.signals(0) == children.signals(1) == ["SIGINT"]


def test_restarts_a_killed_child(
    children: Children, start: Callable[..., Running], caplog: pytest.LogCaptureFixture
) -> None:
    running = start(children.command("wait"), 1)
    wait_until(lambda: children.ready(0), "the child")
    os.kill(children.starts(0)[0], signal.SIGKILL)
    wait_until(lambda: children.ready(0, start=2), "the restart")
    assert "was killed by SIGKILL" in caplog.text
    running.supervisor.request_stop()
    assert running.join() == 0


def test_crash_loop_gives_up_with_1(
    children: Children, start: Callable[..., Running], caplog: pytest.LogCaptureFixture
) -> None:
    running = start(children.command("crash"), 2, crash_limit=3, crash_window_seconds=30.0)
    assert running.join() == 1
    assert max(len(children.starts(i)) for i in range(2)) == 3
    assert "of starting 3 times in a row: giving up" in caplog.text


def test_slow_crashes_are_not_a_loop(children: Children, start: Callable[..., Running]) -> None:
    # With no crash window, every crash counts as slow: the child is restarted each time.
    running = start(children.command("crash"), 1, crash_limit=2, crash_window_seconds=0.0)
    wait_until(lambda: len(children.starts(0)) >= 4, "four starts")
    running.supervisor.request_stop()
    assert running.join() == 0


def test_child_that_cannot_load_the_app_stops_everything(
    children: Children, start: Callable[..., Running], caplog: pytest.LogCaptureFixture
) -> None:
    running = start(children.command("wait", "exit2-after-0"), 2, restart_delay_seconds=60.0)
    assert running.join() == 2
    assert len(children.starts(1)) == 1
    assert children.signals(0) == ["SIGTERM"]
    assert "cannot load the app or its configuration" in caplog.text


def test_child_exiting_0_on_its_own_is_not_restarted(
    children: Children, start: Callable[..., Running]
) -> None:
    running = start(children.command("exit0"), 2)
    assert running.join() == 0
    assert [len(children.starts(i)) for i in range(2)] == [1, 1]


def test_no_restart_after_a_stop(children: Children, start: Callable[..., Running]) -> None:
    running = start(children.command("crash-once", "wait"), 2, restart_delay_seconds=30.0)
    wait_until(lambda: children.ready(1) and len(children.starts(0)) == 1, "the children")
    wait_until(lambda: running.supervisor.pids() == [children.starts(1)[0]], "the crash")
    running.supervisor.request_stop()
    assert running.join() == 0
    assert len(children.starts(0)) == 1


def test_at_least_one_process() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        Supervisor(lambda index: ["true"], 0)


# -- the supervisor as its own process, getting real signals ---------------------------------

SUPERVISOR = textwrap.dedent(
    """
    import logging, sys
    from qtasks.runtime.supervisor import Supervisor

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    script, folder = sys.argv[1], sys.argv[2]
    command = lambda index: [sys.executable, "-I", "-S", script, folder, str(index), "drain"]
    sys.exit(Supervisor(command, 2, poll_interval_seconds=0.01).run())
    """
)


@pytest.mark.parametrize(
    ("signum", "forwarded"),
    [
        (signal.SIGTERM, signal.SIGTERM),
        (signal.SIGINT, signal.SIGINT),
        (signal.SIGHUP, signal.SIGTERM),  # the terminal is gone: stop like SIGTERM
    ],
)
def test_signals_to_the_supervisor_are_forwarded_then_it_exits_0(
    children: Children, signum: signal.Signals, forwarded: signal.Signals
) -> None:
    process = subprocess.Popen(
        [sys.executable, "-c", SUPERVISOR, str(children.script), str(children.folder)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_until(lambda: children.ready(0) and children.ready(1), "two children")
        process.send_signal(signum)
        wait_until(lambda: all(children.signals(i) for i in range(2)), "the first signal")
        assert process.poll() is None, "the children are draining: the supervisor waits"
        process.send_signal(signum)  # the second one: children stop at once
        _, err = process.communicate(timeout=DEADLINE_SECONDS)
        assert process.returncode == 0, err
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert [children.signals(i) for i in range(2)] == [[forwarded.name] * 2] * 2
    assert f"{signum.name}: stopping the workers" in err
    assert f"{signum.name} again: telling the workers to stop now" in err
