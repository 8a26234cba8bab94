"""What `inspect()` answers, as dataclasses, and how each is shown: text tables or JSON.

Plain data and formatting, no I/O: `qtasks.stats.inspect` gathers the facts, the CLI
and the Python API print `to_text(...)` or `to_json(...)` of the same objects.
"""

from __future__ import annotations

import base64
import dataclasses
import io
import time
from collections.abc import Sequence
from datetime import datetime, timezone
from typing import Any

import msgspec
from rich import box
from rich.console import Console, RenderableType
from rich.table import Table

from qtasks.interfaces import QueueStats
from qtasks.message import DeadLetter, Task
from qtasks.stats.counters import COUNTER_NAMES, mean, quantile

TEXT_WIDTH = 120
"""Columns the text tables are laid out for."""


@dataclasses.dataclass
class AppStats:
    """The app as configured here, and how many workers serve it."""

    name: str
    broker: str
    storage: str
    global_config: str
    tasks: list[str]
    queues: list[str]
    workers_alive: int
    workers_lost: int
    max_tasks_process: int
    worker_lost_after_seconds: float


@dataclasses.dataclass
class TaskStats:
    """One task name: its registration (if known here) and its counters over live workers."""

    name: str
    registered: bool
    queue: str | None = None
    priority: int | None = None
    retry: int | None = None
    max_time: float | None = None
    at_most_once: bool | None = None
    kind: str | None = None
    description: str | None = None
    processed: int = 0
    succeeded: int = 0
    failed: int = 0
    retried: int = 0
    cancelled: int = 0
    running: int = 0
    redelivered: int = 0
    """Deliveries taken again after a fault: the bound on duplicate runs."""
    duration_mean_seconds: float | None = None
    duration_p95_seconds: float | None = None
    queue_wait_mean_seconds: float | None = None
    queue_wait_p95_seconds: float | None = None
    duration: dict[str, Any] = dataclasses.field(default_factory=dict)
    """Histogram: `counts` per bucket of TIME_BUCKETS_SECONDS, and `sum`."""
    queue_wait: dict[str, Any] = dataclasses.field(default_factory=dict)
    """Histogram, as `duration`."""

    def add_counters(self, snapshot: dict[str, Any]) -> None:
        """Take counters and histograms from a merged snapshot (see counters.merge)."""
        for name in COUNTER_NAMES:
            setattr(self, name, int(snapshot[name]))
        self.duration = snapshot["duration"]
        self.queue_wait = snapshot["queue_wait"]
        self.duration_mean_seconds = mean(self.duration)
        self.duration_p95_seconds = quantile(self.duration, 0.95)
        self.queue_wait_mean_seconds = mean(self.queue_wait)
        self.queue_wait_p95_seconds = quantile(self.queue_wait, 0.95)


@dataclasses.dataclass
class WorkerStats:
    """One registered worker and whether it still heartbeats."""

    id: str
    status: str
    """`alive`, or `lost` once its heartbeat is older than worker_lost_after_seconds."""
    host: str | None
    pid: int | None
    queues: list[str]
    concurrency: int | None
    version: str | None
    started_at: float | None
    heartbeat: float | None
    processed: int
    running: int
    tasks: dict[str, Any] = dataclasses.field(default_factory=dict)
    """Task name -> counters snapshot, as the worker published it."""


# -- text ------------------------------------------------------------------------------


def render(renderable: RenderableType) -> str:
    """Plain text of a rich renderable (no colours), as the CLI prints it."""
    out = io.StringIO()
    Console(file=out, width=TEXT_WIDTH, color_system=None, force_terminal=False).print(renderable)
    return out.getvalue().rstrip("\n")


def _when(ts: float | None) -> str:
    if ts is None:
        return "-"
    return datetime.fromtimestamp(ts, tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def _seconds(value: float | None) -> str:
    if value is None:
        return "-"
    if value < 0.001:
        return f"{value * 1_000_000:.0f}µs"
    return f"{value * 1000:.1f}ms" if value < 1 else f"{value:.2f}s"


def _age(ts: float | None, now: float) -> str:
    return "-" if ts is None else f"{max(now - ts, 0.0):.0f}s ago"


def _opt(value: object) -> str:
    return "-" if value is None else str(value)


def _fields(title: str, rows: Sequence[tuple[str, str]]) -> Table:
    table = Table(title=title, box=box.SIMPLE, show_header=False, title_justify="left")
    table.add_column("field", style="bold")
    table.add_column("value", overflow="fold")
    for key, value in rows:
        table.add_row(key, value)
    return table


def app_text(stats: AppStats) -> str:
    """The app as a two-column table."""
    return render(
        _fields(
            f"app {stats.name}",
            [
                ("broker", stats.broker),
                ("storage", stats.storage),
                ("global config", stats.global_config),
                ("tasks", f"{len(stats.tasks)}: {', '.join(stats.tasks) or '-'}"),
                ("queues", ", ".join(stats.queues)),
                ("workers", f"{stats.workers_alive} alive, {stats.workers_lost} lost"),
                ("max_tasks_process", str(stats.max_tasks_process)),
                ("worker_lost_after_seconds", str(stats.worker_lost_after_seconds)),
            ],
        )
    )


def tasks_text(tasks: Sequence[TaskStats]) -> str:
    """One row per task name with its counters and timings."""
    table = Table(title="tasks", box=box.SIMPLE_HEAD, title_justify="left", collapse_padding=True)
    for column in ("name", "queue", *COUNTER_NAMES, "mean", "p95", "wait p95"):
        numeric = column not in ("name", "queue")
        if numeric:
            table.add_column(column, justify="right", no_wrap=True)
        else:
            table.add_column(column, overflow="fold")
    for t in tasks:
        table.add_row(
            t.name if t.registered else f"{t.name} (not registered here)",
            _opt(t.queue),
            *(str(getattr(t, c)) for c in COUNTER_NAMES),
            _seconds(t.duration_mean_seconds),
            _seconds(t.duration_p95_seconds),
            _seconds(t.queue_wait_p95_seconds),
        )
    return render(table) if tasks else "no tasks"


def task_text(t: TaskStats) -> str:
    """One task name in detail."""
    rows = [
        ("registered here", "yes" if t.registered else "no"),
        ("kind", _opt(t.kind)),
        ("queue", _opt(t.queue)),
        ("priority", _opt(t.priority)),
        ("retry", _opt(t.retry)),
        ("max_time", _opt(t.max_time)),
        ("at_most_once", _opt(t.at_most_once)),
        ("description", _opt(t.description)),
    ]
    rows += [(c, str(getattr(t, c))) for c in COUNTER_NAMES]
    rows += [
        ("duration mean / p95", f"{_seconds(t.duration_mean_seconds)} / "
         f"{_seconds(t.duration_p95_seconds)}"),
        ("queue wait mean / p95", f"{_seconds(t.queue_wait_mean_seconds)} / "
         f"{_seconds(t.queue_wait_p95_seconds)}"),
    ]  # fmt: skip
    return render(_fields(f"task {t.name}", rows))


def workers_text(workers: Sequence[WorkerStats]) -> str:
    """One row per registered worker."""
    if not workers:
        return "no workers registered"
    now = time.time()
    table = Table(title="workers", box=box.SIMPLE_HEAD, title_justify="left")
    for column in ("id", "status", "host", "pid", "queues", "slots", "version"):
        table.add_column(column, overflow="fold")
    for column in ("processed", "running", "started", "heartbeat"):
        table.add_column(column, justify="right", overflow="fold")
    for w in workers:
        table.add_row(
            w.id,
            w.status,
            _opt(w.host),
            _opt(w.pid),
            ",".join(w.queues),
            _opt(w.concurrency),
            _opt(w.version),
            str(w.processed),
            str(w.running),
            _when(w.started_at),
            _age(w.heartbeat, now),
        )
    return render(table)


def queues_text(queues: Sequence[QueueStats]) -> str:
    """One row per queue; `-` where the broker cannot tell."""
    table = Table(title="queues", box=box.SIMPLE_HEAD, title_justify="left")
    table.add_column("queue")
    for column in ("total", "ready", "delayed", "in flight", "dead-lettered"):
        table.add_column(column, justify="right")
    table.add_column("ready by priority")
    for q in queues:
        by_priority = (
            "-"
            if q.by_priority is None
            else " ".join(f"{p}:{n}" for p, n in q.by_priority.items()) or "-"
        )
        table.add_row(
            q.queue,
            str(q.total),
            _opt(q.ready),
            _opt(q.delayed),
            _opt(q.in_flight),
            _opt(q.dead_lettered),
            by_priority,
        )
    return render(table)


def record_text(record: Task) -> str:
    """One task record in detail, traceback last."""
    rows = [
        ("uuid", str(record.uuid)),
        ("name", record.name),
        ("status", record.status.value),
        ("queue", record.queue),
        ("priority", str(record.priority)),
        ("args", _json_text(record.args)),
        ("kwargs", _json_text(record.kwargs)),
        ("attempts", str(record.attempts)),
        ("created", _when(record.created_at)),
        ("started", _when(record.started_at)),
        ("finished", _when(record.finished_at)),
        ("duration", _seconds(record.duration_seconds)),
    ]
    if record.eta is not None:
        rows.append(("eta", _when(record.eta)))
    if record.status.value == "success":
        rows.append(("returning", _json_text(record.returning)))
    if record.error_type is not None:
        rows.append(("error", f"{record.error_type}: {record.error_message}"))
    text = render(_fields("task", rows))
    if record.traceback:
        text += "\n\n" + record.traceback.rstrip("\n")
    return text


def failures_text(records: Sequence[Task]) -> str:
    """One row per failed record, latest first."""
    if not records:
        return "no failed tasks"
    table = Table(title="recent failures", box=box.SIMPLE_HEAD, title_justify="left")
    for column in ("uuid", "name", "finished", "attempts", "error"):
        table.add_column(column, overflow="fold")
    for r in records:
        table.add_row(
            str(r.uuid),
            r.name,
            _when(r.finished_at),
            str(r.attempts),
            f"{r.error_type}: {r.error_message}" if r.error_type else "-",
        )
    return render(table)


def dead_letters_text(letters: Sequence[DeadLetter]) -> str:
    """One row per dead letter, newest first; the detail's first line only."""
    if not letters:
        return "no dead letters"
    table = Table(title="dead letters", box=box.SIMPLE_HEAD, title_justify="left")
    for column in ("uuid", "name", "queue", "reason", "dead", "runs"):
        table.add_column(column, no_wrap=True)
    table.add_column("detail", overflow="fold", ratio=1, min_width=24)
    now = time.time()
    for x in letters:
        first_line = x.detail.strip().splitlines()[0] if x.detail.strip() else "-"
        table.add_row(
            x.uuid,
            x.name or "-",
            x.queue,
            x.reason,
            _age(x.dead_at, now),
            str(x.delivery_count),
            first_line,
        )
    return render(table)


def dead_letter_data(letter: DeadLetter) -> dict[str, Any]:
    """A dead letter as JSON data: the body as text when it is UTF-8, else base64."""
    data = msgspec.structs.asdict(letter)
    body = data.pop("body")
    try:
        data["body"] = body.decode("utf-8")
    except UnicodeDecodeError:
        data["body_base64"] = base64.b64encode(body).decode("ascii")
    return data


# -- JSON ------------------------------------------------------------------------------


def _json_text(value: Any) -> str:
    try:
        return msgspec.json.encode(value).decode()
    except (TypeError, ValueError):
        return repr(value)


def to_json(value: Any) -> str:
    """Indented JSON of a report (dataclasses, records and lists of them)."""
    return msgspec.json.format(msgspec.json.encode(value, enc_hook=repr), indent=2).decode()
