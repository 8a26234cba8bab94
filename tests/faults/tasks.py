"""The app the fault scenarios run: one builder for workers and producers.

Workers are CLI processes on `tests.faults.worker_app:app`, which calls `build_app()` with
the settings the harness put in $QTFAULT_SETTINGS (JSON). Every task appends lines to
its process's ledger file (`<ledger_dir>/ledger-<pid>.log`, O_APPEND, one write per
line, so a SIGKILL leaves whole lines):

    S <uuid> <pid> <time>     the function started (an attempt)
    E <uuid> <pid> <time>     the function returned
    F <uuid> <pid> <time>     the function raised
    P <pid> <topic> <partition> <time>   (Kafka) a fetch delivered from this partition
    M <uuid> <pid> <rss kB> <open fds> <asyncio tasks> <threads> <time>   a probe
    D <body digest> <pid> <time>   (count_decodes) the worker was handed bytes to decode
    J <body digest> <pid> <time>   (count_decodes) ... the JSON decoder got them (past the
                                   size check and, with signing keys, the signature)

Times are the real wall clock even when the worker's clock is skewed (scenario 15).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import signal
import threading
import time
from typing import Any

from qtasks import Backoff, QueueConfig, QueueTasks, TaskContext
from qtasks.message import TaskMessage
from qtasks.plugins.base import BasePlugin
from qtasks.plugins.triggers import BROKER_FETCH
from qtasks.serializers import JsonSerializer, Serializer, check_size

SETTINGS_ENV = "QTFAULT_SETTINGS"
REAL_TIME = time.time


class Ledger:
    """Append-only ledger lines of this process."""

    def __init__(self, folder: str) -> None:
        self.folder = folder
        self._fd: int | None = None
        self._pid = 0

    def write(self, kind: str, *words: object) -> None:
        pid = os.getpid()
        if self._fd is None or self._pid != pid:
            path = os.path.join(self.folder, f"ledger-{pid}.log")
            self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            self._pid = pid
        line = " ".join([kind, *map(str, words), f"{REAL_TIME():.6f}"]) + "\n"
        os.write(self._fd, line.encode())


class PartitionLog(BasePlugin):
    """Writes which Kafka partitions this worker's fetches come from (scenario 8)."""

    triggers = (BROKER_FETCH,)

    def __init__(self, ledger: Ledger) -> None:
        super().__init__()
        self.ledger = ledger
        self.seen: set[tuple[str, int]] = set()

    def trigger(self, name: str, **payload: Any) -> None:
        for d in payload["deliveries"]:
            tp = getattr(getattr(d.receipt, "part", None), "tp", None)
            if tp is None:
                continue
            key = (tp.topic, tp.partition)
            if key not in self.seen:  # one line per partition and process is enough
                self.seen.add(key)
                self.ledger.write("P", os.getpid(), tp.topic, tp.partition)


def digest(body: bytes) -> str:
    """What the D/J ledger lines name a message body by."""
    return hashlib.sha1(body).hexdigest()[:16]


class CountingJson(JsonSerializer):
    """The JSON serializer, writing a `J` line for every body past the size check."""

    def __init__(self, ledger: Ledger, **kw: Any) -> None:
        super().__init__(**kw)
        self.ledger = ledger

    def decode(self, body: bytes) -> TaskMessage:
        check_size(body, self.max_payload_bytes)  # what JsonSerializer checks first
        self.ledger.write("J", digest(body), os.getpid())
        return super().decode(body)


class CountingSerializer(Serializer):
    """Wraps the app's serializer (signing included): a `D` line per decode attempt."""

    def __init__(self, inner: Serializer, ledger: Ledger) -> None:
        self.inner = inner
        self.ledger = ledger
        self.content_type = inner.content_type

    def encode(self, message: TaskMessage) -> bytes:
        return self.inner.encode(message)

    def decode(self, body: bytes) -> TaskMessage:
        self.ledger.write("D", digest(body), os.getpid())
        return self.inner.decode(body)


def build_app(settings: dict[str, Any], *, producer: bool = False) -> QueueTasks:
    """The fault app for `settings` (see the harness); `producer` for the enqueuing side."""
    config = QueueConfig(**settings.get("config", {}))
    ledger = Ledger(settings["ledger_dir"])
    counting = bool(settings.get("count_decodes")) and not producer
    app = QueueTasks(
        settings["name"],
        broker_url=settings["broker_url"],
        storage_url=settings.get("storage_url"),
        config=config,
        serializer=(
            CountingJson(ledger, max_payload_bytes=config.max_payload_bytes) if counting else None
        ),
    )
    if counting:
        app.core.serializer = CountingSerializer(app.core.serializer, ledger)

    @app.task(echo=True)
    async def noop(ctx: TaskContext, i: int) -> int:
        ledger.write("S", ctx.uuid, os.getpid())
        ledger.write("E", ctx.uuid, os.getpid())
        return i

    @app.task(echo=True)
    async def nap(ctx: TaskContext, seconds: float) -> float:
        ledger.write("S", ctx.uuid, os.getpid())
        await asyncio.sleep(seconds)
        ledger.write("E", ctx.uuid, os.getpid())
        return seconds

    @app.task(echo=True, at_most_once=True)
    async def once_nap(ctx: TaskContext, seconds: float) -> float:
        """`nap` as an at_most_once task: never started twice, even after a SIGKILL."""
        ledger.write("S", ctx.uuid, os.getpid())
        await asyncio.sleep(seconds)
        ledger.write("E", ctx.uuid, os.getpid())
        return seconds

    @app.task(echo=True)
    def block(ctx: TaskContext, seconds: float) -> float:
        """A sync task that holds its thread (and the GIL between sleeps) for `seconds`."""
        ledger.write("S", ctx.uuid, os.getpid())
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            time.sleep(0.01)
        ledger.write("E", ctx.uuid, os.getpid())
        return seconds

    @app.task(echo=True)
    async def hog(ctx: TaskContext, seconds: float) -> float:
        """An async task that blocks the event loop itself (bad code, but it happens)."""
        ledger.write("S", ctx.uuid, os.getpid())
        time.sleep(seconds)
        ledger.write("E", ctx.uuid, os.getpid())
        return seconds

    @app.task(echo=True)
    async def fail(ctx: TaskContext, i: int) -> int:
        ledger.write("S", ctx.uuid, os.getpid())
        ledger.write("F", ctx.uuid, os.getpid())
        raise ValueError(f"task {i} fails on purpose")

    @app.task(echo=True)
    async def probe(ctx: TaskContext) -> dict[str, int]:
        """This worker's resource use, as an `M` ledger line (scenario 20)."""
        ledger.write("S", ctx.uuid, os.getpid())
        rss_kb = 0
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    rss_kb = int(line.split()[1])
        fds = len(os.listdir("/proc/self/fd"))
        tasks = len(asyncio.all_tasks())
        threads = threading.active_count()
        ledger.write("M", ctx.uuid, os.getpid(), rss_kb, fds, tasks, threads)
        ledger.write("E", ctx.uuid, os.getpid())
        return {"rss_kb": rss_kb, "fds": fds, "tasks": tasks, "threads": threads}

    @app.task(echo=True)
    async def suicide(ctx: TaskContext) -> None:
        """Kills its own worker process (scenario 3): an OOM kill or a segfault."""
        ledger.write("S", ctx.uuid, os.getpid())
        os.kill(os.getpid(), signal.SIGKILL)

    backoff = Backoff(base_seconds=float(settings.get("backoff_base", 1.0)), factor=2.0)

    @app.task(echo=True, retry=3, retry_backoff=backoff)
    async def always_fail(ctx: TaskContext, i: int) -> int:
        """Raises every time (scenario 13): 1 run + 3 retries, then a dead letter."""
        ledger.write("S", ctx.uuid, os.getpid())
        ledger.write("F", ctx.uuid, os.getpid())
        raise RuntimeError(f"always_fail {i}: attempt {ctx.attempt} fails on purpose")

    @app.task(echo=True)
    async def digest_of(ctx: TaskContext, data: str) -> list[Any]:
        """Length and SHA-256 of a (large) argument (scenario 12)."""
        ledger.write("S", ctx.uuid, os.getpid())
        out = [len(data), hashlib.sha256(data.encode()).hexdigest()]
        ledger.write("E", ctx.uuid, os.getpid())
        return out

    if producer or settings.get("knows_ghost"):
        # Producers know `ghost`; only workers of a newer deploy do (scenario 10).
        @app.task(echo=True)
        async def ghost(ctx: TaskContext, i: int) -> int:
            ledger.write("S", ctx.uuid, os.getpid())
            ledger.write("E", ctx.uuid, os.getpid())
            return i

    if producer:
        # An older deploy's signature: the producer passes one argument ...
        @app.task(echo=True, retry=3)
        async def strict(ctx: TaskContext, a: int) -> int:
            return a

    else:
        # ... the worker's function wants two (argument mismatch, scenario 11).
        @app.task(echo=True, retry=3)
        async def strict(ctx: TaskContext, a: int, b: int) -> int:
            ledger.write("S", ctx.uuid, os.getpid())
            ledger.write("E", ctx.uuid, os.getpid())
            return a + b

    if settings.get("log_partitions") and not producer:
        app.add_plugin(PartitionLog(ledger), component="broker")
    return app


def settings_from_env() -> dict[str, Any]:
    settings: dict[str, Any] = json.loads(os.environ[SETTINGS_ENV])
    skew = float(settings.get("skew_seconds", 0.0))
    if skew:
        # The worker's clock is off by `skew` seconds (scenario 15): everything in this
        # process that asks time.time() sees it; the ledger keeps the real time.
        time.time = lambda: REAL_TIME() + skew
    return settings
