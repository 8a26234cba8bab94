"""The liveness thread of brokers that hold claims while their consumer is alive.

It runs in a daemon thread with its own connection, so a task that blocks the event loop
cannot make a live worker look dead; it beats every `heartbeat_interval_seconds` and
sweeps lost consumers every `sweep_interval_seconds`. A failure never ends the thread: a
dead heartbeat would get this live worker's tasks swept and run twice, while a missed
beat only matters after `worker_lost_after_seconds`.
"""

from __future__ import annotations

import abc
import threading
import time

from qtasks.config import QueueConfig


class HeartbeatThread(abc.ABC):
    """Calls `beat()` and `sweep()` on their schedules until stopped; backends fill them in."""

    def __init__(self, consumer_id: str, config: QueueConfig) -> None:
        self.consumer_id = consumer_id
        self.interval = config.heartbeat_interval_seconds
        self.sweep_interval = config.sweep_interval_seconds
        self.lost_after = config.worker_lost_after_seconds
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._main, name=f"qtasks-heartbeat:{consumer_id}", daemon=True
        )

    def start(self) -> None:
        """Begin beating in the background."""
        self._thread.start()

    def stop(self) -> None:
        """Stop beating and wait for the thread to end (at most one command's timeout)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    @abc.abstractmethod
    def beat(self) -> None:
        """Refresh this consumer's heartbeat (connect first if needed)."""

    @abc.abstractmethod
    def sweep(self) -> None:
        """Give back the claims of consumers silent for `lost_after` seconds."""

    @abc.abstractmethod
    def failed(self, exc: Exception) -> bool:
        """Handle a failed beat or sweep; True to try both again at once (e.g. a redirect)."""

    def close(self) -> None:
        """Release the thread's connection (called once, when the thread ends)."""

    def _main(self) -> None:
        next_beat = next_sweep = time.monotonic()
        try:
            while not self._stop.is_set():
                now = time.monotonic()
                beat_due, sweep_due = now >= next_beat, now >= next_sweep
                # Reschedule first, so a failure waits for the next turn instead of spinning.
                if beat_due:
                    next_beat = now + self.interval
                if sweep_due:
                    next_sweep = now + self.sweep_interval
                try:
                    if beat_due:
                        self.beat()
                    if sweep_due:
                        self.sweep()
                except Exception as exc:
                    if self.failed(exc):
                        next_beat = next_sweep = time.monotonic()
                        continue
                self._stop.wait(max(0.0, min(next_beat, next_sweep) - time.monotonic()))
        finally:
            self.close()
