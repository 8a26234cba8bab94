"""The app's typed settings, one place for every default."""

from __future__ import annotations

import dataclasses
import os

BROKER_URL_ENV = "QTASKS_BROKER_URL"
STORAGE_URL_ENV = "QTASKS_STORAGE_URL"
SIGNING_KEYS_ENV = "QTASKS_SIGNING_KEYS"
DEFAULT_SQLITE_URL = "sqlite:///qtasks.sqlite3"
DEFAULT_MAX_PAYLOAD_BYTES = 1_048_576


@dataclasses.dataclass
class QueueConfig:
    """Settings shared by every part of one app.

    Durations end in `_seconds`. Change them through `QueueTasks(config=QueueConfig(...))`
    or on `app.config` before the worker starts.
    """

    max_tasks_process: int = 10
    """How many tasks one worker process runs at once (the worker's semaphore)."""
    prefetch: int | None = None
    """Deliveries a worker holds beyond the running ones; None means equal to the worker's
    concurrency (max_tasks_process, or `run --concurrency`), so a whole round of tasks is
    at hand when the running ones end together."""
    fetch_batch: int = 100
    """Most deliveries taken from the broker in one round trip."""
    max_threads: int | None = None
    """Threads for sync task functions; None means max_tasks_process."""
    default_task_priority: int = 0
    """Priority of a task that names none; lower runs first."""
    result_ttl_seconds: float | None = 86_400.0
    """How long a finished record is kept; None keeps it until deleted."""
    poll_interval_seconds: float = 0.05
    """Longest sleep of a broker that cannot block (SQLite) while its queues are empty."""
    heartbeat_interval_seconds: float = 2.0
    """How often a worker tells the broker it is alive (from a thread tasks cannot starve)."""
    worker_lost_after_seconds: float = 10.0
    """Silence after which a worker is taken for dead and its tasks are delivered again."""
    sweep_interval_seconds: float = 5.0
    """How often a worker looks for dead workers' tasks and expired records."""
    max_deliveries: int | None = 5
    """A task handed out this many times without finishing (its worker died each time) is
    recorded as failed with reason worker_lost instead of running again; None: no limit.
    Every broker counts a crash redelivery; graceful stops give tasks back without
    counting, and each retry is a new attempt whose count starts over. A redelivered
    task runs alone in its worker, so one that kills its worker cannot take others down
    with it (see `qtasks.runtime.worker.ALONE_SECONDS`)."""
    dead_letter_failures: bool = True
    """Set aside tasks that failed for good (no retries left) as dead letters, beside
    undecodable, unknown and worker_lost ones; False: such failures are only recorded."""
    requeue_unknown_tasks: bool = False
    """Send a task no worker knows back with a growing delay (up to max_deliveries times)
    instead of dead-lettering it at once: for rolling deploys where old workers still run."""
    dead_letter_ttl_seconds: float | None = 7 * 86_400.0
    """How long a dead letter is kept; None keeps it until dropped."""
    graceful_shutdown_seconds: float = 30.0
    """How long a stopping worker lets running tasks finish before giving up on them."""
    default_retry_backoff_seconds: float = 1.0
    """First delay between retries when a task sets `retry` but no backoff."""
    logs_default_level: str = "INFO"
    """Log level the CLI uses when --log-level is not given."""
    max_payload_bytes: int | None = DEFAULT_MAX_PAYLOAD_BYTES
    """Largest encoded message (bytes on the wire): `add_task` raises PayloadTooLarge above
    it before any I/O, and a worker dead-letters a bigger message before decoding it.
    None: no limit. Read when the app is created."""
    signing_keys: list[str] | None = dataclasses.field(default=None, repr=False)
    """HMAC-SHA256 keys: the first signs every message this app sends, any of them verifies
    (list the new key first and keep the old one until old messages are drained). With
    keys, a worker refuses unsigned or altered messages before decoding them. None: the
    comma-separated QTASKS_SIGNING_KEYS variable, if set; [] turns signing off. Read when
    the app is created; never shown in reprs."""

    def resolved_prefetch(self, concurrency: int | None = None) -> int:
        """Deliveries buffered beyond the running tasks of a worker running `concurrency`
        at once (default max_tasks_process)."""
        if self.prefetch is not None:
            return self.prefetch
        return concurrency if concurrency is not None else self.max_tasks_process

    def resolved_threads(self) -> int:
        """Size of the thread pool for sync task functions."""
        return self.max_threads if self.max_threads is not None else self.max_tasks_process

    def resolved_signing_keys(self) -> list[str]:
        """`signing_keys`, else the keys in QTASKS_SIGNING_KEYS; [] when neither gives any."""
        if self.signing_keys is not None:
            return list(self.signing_keys)
        raw = os.environ.get(SIGNING_KEYS_ENV, "")
        return [key.strip() for key in raw.split(",") if key.strip()]


def url_from_env(explicit: str | None, env_name: str) -> str | None:
    """An explicit URL wins; otherwise the environment variable, if set and not empty."""
    if explicit:
        return explicit
    value = os.environ.get(env_name, "").strip()
    return value or None
