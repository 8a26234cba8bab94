"""Run N worker processes and keep them running: `qtasks run --processes N`.

Each child is a fresh interpreter started with `subprocess.Popen` (no fork, so the app
module is imported anew in each). The supervisor:

- restarts a child that dies unexpectedly (non-zero exit or killed by a signal) after a
  short, growing delay, and gives up (exit code 1) when one keeps dying within
  `crash_window_seconds` of its start `crash_limit` times in a row;
- stops everything and exits 2 when a child exits 2: that child could not load the app or
  its configuration, and starting it again will not help;
- leaves a child that exits 0 on its own stopped (it was stopped by someone on purpose);
- forwards SIGTERM/SIGINT to every child and waits for them: children drain on the first
  signal and stop at once on the second, so a second signal is forwarded again. It then
  exits 0. SIGHUP (the terminal closed) stops the children like SIGTERM.

Children run in their own session, so a Ctrl+C in the terminal reaches only the supervisor,
which forwards it once; otherwise each child would get it twice and skip the drain. Being
in their own session, they would outlive a supervisor killed with SIGKILL (the OOM killer,
`kill -9`, a process manager that signals only the main pid): so each child watches its
supervisor (`watch_supervisor`) and stops itself, draining as on SIGTERM, once it is gone.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from types import FrameType

log = logging.getLogger(__name__)

ChildCommand = Callable[[int], Sequence[str]]
"""Builds the argv of child number `index` (0 to processes - 1)."""

SUPERVISOR_PID_ENV = "QTASKS_SUPERVISOR_PID"
"""Set in each child's environment: the pid of the supervisor it must not outlive."""
WATCH_INTERVAL_SECONDS = 1.0

EXIT_OK = 0
EXIT_GAVE_UP = 1
EXIT_CONFIG = 2
"""A child's exit code meaning "cannot start, do not retry"; also what we then exit with."""

_SIGNALS = (signal.SIGTERM, signal.SIGINT)
# The terminal went away. Children in their own session would not see it and outlive us, so
# stop them gracefully; they get SIGTERM, as a SIGHUP they do not handle would kill them.
_SIGHUP: int | None = getattr(signal, "SIGHUP", None)


@dataclasses.dataclass
class _Slot:
    """One of the N places a child runs in; outlives the child processes it holds."""

    index: int
    process: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    quick_crashes: int = 0
    restart_at: float | None = None


class Supervisor:
    """Keeps `processes` children running until asked to stop; `run()` returns the exit code."""

    def __init__(
        self,
        command: ChildCommand,
        processes: int,
        *,
        restart_delay_seconds: float = 0.25,
        max_restart_delay_seconds: float = 5.0,
        crash_window_seconds: float = 1.0,
        crash_limit: int = 5,
        poll_interval_seconds: float = 0.05,
        new_session: bool = True,
    ) -> None:
        if processes < 1:
            raise ValueError(f"processes must be at least 1, got {processes}")
        self.command = command
        self.processes = processes
        self.restart_delay_seconds = restart_delay_seconds
        self.max_restart_delay_seconds = max_restart_delay_seconds
        self.crash_window_seconds = crash_window_seconds
        self.crash_limit = crash_limit
        self.poll_interval_seconds = poll_interval_seconds
        self.new_session = new_session and os.name == "posix"
        # Filled by signal handlers or other threads, drained by the loop: a deque append
        # is atomic, so no lock (a lock taken inside a signal handler can deadlock).
        self._pending: collections.deque[int] = collections.deque()
        self._slots = [_Slot(index) for index in range(processes)]
        self._stopping = False
        self._exit_code = EXIT_OK

    def request_stop(self, signum: int = signal.SIGTERM) -> None:
        """Forward `signum` to every child and stop restarting them; safe from any thread."""
        self._pending.append(signum)

    def pids(self) -> list[int]:
        """Process ids of the children alive now."""
        return [s.process.pid for s in self._slots if s.process is not None]

    def run(self, *, handle_signals: bool = True) -> int:
        """Start the children and supervise them until they are all gone; the exit code.

        With `handle_signals` (and in the main thread) SIGTERM/SIGINT call `request_stop`.
        """
        restore = self._install_signal_handlers() if handle_signals else None
        try:
            log.info("starting %d worker processes", self.processes)
            for slot in self._slots:
                self._spawn(slot)
            while self._step():
                time.sleep(self._sleep_seconds())
            return self._exit_code
        finally:
            self._kill_leftovers()
            if restore is not None:
                restore()

    # -- the loop ----------------------------------------------------------------------

    def _step(self) -> bool:
        """Handle signals, exits and due restarts once; False when nothing is left to run."""
        while self._pending:
            self._on_signal(self._pending.popleft())
        now = time.monotonic()
        for slot in self._slots:
            if slot.process is not None:
                returncode = slot.process.poll()
                if returncode is not None:
                    self._on_exit(slot, returncode, now)
        for slot in self._slots:
            if slot.restart_at is not None and slot.restart_at <= now and not self._stopping:
                self._spawn(slot)
        return any(s.process is not None or s.restart_at is not None for s in self._slots)

    def _sleep_seconds(self) -> float:
        restarts = [s.restart_at for s in self._slots if s.restart_at is not None]
        if not restarts:
            return self.poll_interval_seconds
        until_restart = min(restarts) - time.monotonic()
        return max(0.0, min(self.poll_interval_seconds, until_restart))

    def _on_signal(self, signum: int) -> None:
        name = _signal_name(signum)
        if self._stopping:
            log.warning("%s again: telling the workers to stop now", name)
        else:
            log.info("%s: stopping the workers (send it again to stop them at once)", name)
        self._stop_all(signal.SIGTERM if signum == _SIGHUP else signum)

    def _on_exit(self, slot: _Slot, returncode: int, now: float) -> None:
        assert slot.process is not None
        pid = slot.process.pid
        slot.process = None
        how = _describe_exit(returncode)
        if self._stopping:
            log.info("worker %d (pid %d) %s", slot.index, pid, how)
            return
        if returncode == EXIT_OK:
            log.warning(
                "worker %d (pid %d) %s without being asked; not restarting it", slot.index, pid, how
            )
            return
        if returncode == EXIT_CONFIG:
            log.error(
                "worker %d (pid %d) %s: it cannot load the app or its configuration; "
                "stopping the others",
                slot.index,
                pid,
                how,
            )
            self._give_up(EXIT_CONFIG)
            return
        quick = now - slot.started_at < self.crash_window_seconds
        slot.quick_crashes = slot.quick_crashes + 1 if quick else 0
        if slot.quick_crashes >= self.crash_limit:
            log.error(
                "worker %d (pid %d) %s; it died within %gs of starting %d times in a row: "
                "giving up",
                slot.index,
                pid,
                how,
                self.crash_window_seconds,
                slot.quick_crashes,
            )
            self._give_up(EXIT_GAVE_UP)
            return
        delay = min(
            self.max_restart_delay_seconds, self.restart_delay_seconds * 2**slot.quick_crashes
        )
        log.warning("worker %d (pid %d) %s; restarting it in %.2gs", slot.index, pid, how, delay)
        slot.restart_at = now + delay

    def _give_up(self, exit_code: int) -> None:
        self._exit_code = exit_code
        self._stop_all(signal.SIGTERM)

    def _stop_all(self, signum: int) -> None:
        self._stopping = True
        for slot in self._slots:
            slot.restart_at = None
            if slot.process is not None:
                # send_signal does nothing for a child already reaped, so no pid reuse risk.
                slot.process.send_signal(signum)

    def _spawn(self, slot: _Slot) -> None:
        argv = list(self.command(slot.index))
        slot.restart_at = None
        env = {**os.environ, SUPERVISOR_PID_ENV: str(os.getpid())}
        slot.process = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, start_new_session=self.new_session, env=env
        )
        slot.started_at = time.monotonic()
        log.info("worker %d started (pid %d)", slot.index, slot.process.pid)

    def _kill_leftovers(self) -> None:
        """Only reached with live children if the loop itself failed: leave nothing behind."""
        for slot in self._slots:
            if slot.process is not None:
                if slot.process.poll() is None:
                    log.error("killing worker %d (pid %d)", slot.index, slot.process.pid)
                    slot.process.kill()
                slot.process.wait()
                slot.process = None

    def _install_signal_handlers(self) -> Callable[[], None] | None:
        if threading.current_thread() is not threading.main_thread():
            return None  # signals only reach the main thread; callers use request_stop

        def handler(signum: int, frame: FrameType | None) -> None:
            self.request_stop(signum)

        signals = (*_SIGNALS, _SIGHUP) if _SIGHUP is not None else _SIGNALS
        previous = {sig: signal.signal(sig, handler) for sig in signals}

        def restore() -> None:
            for sig, old in previous.items():
                signal.signal(sig, old)

        return restore


def watch_supervisor(interval: float = WATCH_INTERVAL_SECONDS) -> bool:
    """In a supervised child: SIGTERM this process once the supervisor is gone; True if
    watching. Polls the parent pid (portable; it changes when the parent dies)."""
    raw = os.environ.pop(SUPERVISOR_PID_ENV, None)  # not inherited by the task's children
    if not raw or not raw.isdigit():
        return False
    supervisor = int(raw)

    def watch() -> None:
        while os.getppid() == supervisor:
            time.sleep(interval)
        log.warning("the supervisor (pid %d) is gone; stopping this worker", supervisor)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="qtasks-supervisor-watch", daemon=True).start()
    return True


def supervise(command: ChildCommand, processes: int) -> int:
    """Run `processes` children built by `command` until SIGTERM/SIGINT; the exit code."""
    return Supervisor(command, processes).run()


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def _describe_exit(returncode: int) -> str:
    if returncode < 0:
        return f"was killed by {_signal_name(-returncode)}"
    return f"exited with code {returncode}"
