"""`AsyncStats(app).inspect()`: what the app, its workers, queues and tasks are doing.

Facts come from the parts every process shares: worker entries (with their counters) from
the GlobalConfig, queue depths from the Broker, records from the Storage. Each method
returns a `Report` (`print()` it for text tables, `.data` for the typed facts) or, with
`json=True`, the same facts as a JSON string, as QTasks does. `SyncStats` drives the
same core through a Portal, like `qtasks.QueueTasks` does.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Generic, Literal, TypeVar, overload

from qtasks.errors import QTasksError, UnknownTask
from qtasks.interfaces import QueueStats
from qtasks.message import DEFAULT_QUEUE, Task, TaskStatusEnum
from qtasks.stats import report
from qtasks.stats.counters import merge
from qtasks.stats.report import AppStats, TaskStats, WorkerStats

if TYPE_CHECKING:
    from qtasks.app import AsyncQueueTasks
    from qtasks.sync import Portal, QueueTasks

T = TypeVar("T")


class StatsNotSupported(QTasksError, NotImplementedError):  # noqa: N818 - reads as what happened
    """A backend cannot answer this question (for example, list records by status)."""


class Report(Generic[T]):
    """Facts (`data`) with their text form: `str(report)` is the table the CLI prints."""

    def __init__(self, data: T, text: Callable[[T], str]) -> None:
        self.data = data
        self._text = text

    def __str__(self) -> str:
        return self._text(self.data)

    def json(self) -> str:
        """The facts as indented JSON."""
        return report.to_json(self.data)

    def __repr__(self) -> str:
        return f"<Report {self.data!r:.200}>"


def _out(data: T, text: Callable[[T], str], json: bool) -> Report[T] | str:
    return report.to_json(data) if json else Report(data, text)


def _core(app: AsyncQueueTasks | QueueTasks) -> AsyncQueueTasks:
    from qtasks.sync import QueueTasks

    return app.core if isinstance(app, QueueTasks) else app


class AsyncInspect:
    """The questions `AsyncStats.inspect()` answers; every method is one look at the system."""

    def __init__(self, app: AsyncQueueTasks) -> None:
        self.core = app

    async def _started(self) -> AsyncQueueTasks:
        await self.core.start()
        return self.core

    # -- facts -------------------------------------------------------------------------

    async def worker_stats(self) -> list[WorkerStats]:
        """Every registered worker, `lost` when its heartbeat is too old."""
        app = await self._started()
        lost_after = app.config.worker_lost_after_seconds
        now = time.time()
        out = []
        for entry in await app.global_config.workers():
            heartbeat = entry.get("heartbeat")
            alive = isinstance(heartbeat, (int, float)) and now - heartbeat <= lost_after
            tasks = entry.get("tasks")
            out.append(
                WorkerStats(
                    id=str(entry.get("id")),
                    status="alive" if alive else "lost",
                    host=entry.get("host"),
                    pid=entry.get("pid"),
                    queues=list(entry.get("queues") or ()),
                    concurrency=entry.get("concurrency"),
                    version=entry.get("version"),
                    started_at=entry.get("started_at"),
                    heartbeat=heartbeat if isinstance(heartbeat, (int, float)) else None,
                    processed=int(entry.get("processed") or 0),
                    running=int(entry.get("running") or 0),
                    tasks=tasks if isinstance(tasks, dict) else {},
                )
            )
        out.sort(key=lambda w: (w.status != "alive", w.started_at or 0.0, w.id))
        return out

    async def task_stats(self, names: Sequence[str] = ()) -> list[TaskStats]:
        """Each task name (default: registered here or run by a live worker) with counters."""
        app = await self._started()
        alive = [w for w in await self.worker_stats() if w.status == "alive"]
        seen = sorted(set(app.tasks) | {n for w in alive for n in w.tasks})
        out = []
        for name in names or seen:
            definition = app.tasks.get(name)
            stats = TaskStats(name=name, registered=definition is not None)
            if definition is not None:
                stats.queue = definition.queue
                stats.priority = definition.priority
                stats.retry = definition.retry
                stats.max_time = definition.max_time
                stats.at_most_once = definition.at_most_once
                stats.kind = definition.kind.value
                stats.description = definition.description
            stats.add_counters(merge(w.tasks[name] for w in alive if name in w.tasks))
            out.append(stats)
        return out

    async def queue_stats(self, names: Sequence[str] = ()) -> list[QueueStats]:
        """Depth of `names` (default: every queue a task or a live worker uses)."""
        app = await self._started()
        if not names:
            known = {d.queue for d in app.tasks.values()} | {DEFAULT_QUEUE}
            for w in await self.worker_stats():
                if w.status == "alive":
                    known.update(w.queues)
            names = sorted(known)
        return await app.broker.queue_stats(list(names))

    async def app_stats(self) -> AppStats:
        """The app's wiring and worker counts."""
        app = await self._started()
        workers = await self.worker_stats()
        alive = sum(w.status == "alive" for w in workers)
        queues = sorted({d.queue for d in app.tasks.values()} | {DEFAULT_QUEUE})
        return AppStats(
            name=app.name,
            broker=type(app.broker).__name__,
            storage=type(app.storage).__name__,
            global_config=type(app.global_config).__name__,
            tasks=sorted(app.tasks),
            queues=queues,
            workers_alive=alive,
            workers_lost=len(workers) - alive,
            max_tasks_process=app.config.max_tasks_process,
            worker_lost_after_seconds=app.config.worker_lost_after_seconds,
        )

    async def recent_failures(self, n: int = 10) -> list[Task]:
        """The last `n` records with status `error`; StatsNotSupported if the storage can't."""
        app = await self._started()
        try:
            return await app.storage.recent(TaskStatusEnum.ERROR, n)
        except NotImplementedError as exc:
            raise StatsNotSupported(
                f"{type(app.storage).__name__} cannot list failed tasks: {exc}"
            ) from None

    # -- the QTasks-style questions: a Report, or JSON with json=True ---------------------

    @overload
    async def app(self, json: Literal[False] = False) -> Report[AppStats]: ...
    @overload
    async def app(self, json: Literal[True]) -> str: ...
    async def app(self, json: bool = False) -> Report[AppStats] | str:
        """The app: backends, tasks, queues, workers alive and lost."""
        return _out(await self.app_stats(), report.app_text, json)

    @overload
    async def tasks(self, *names: str, json: Literal[False] = False) -> Report[list[TaskStats]]: ...
    @overload
    async def tasks(self, *names: str, json: Literal[True]) -> str: ...
    async def tasks(self, *names: str, json: bool = False) -> Report[list[TaskStats]] | str:
        """Counters of `names` (default: every known task name)."""
        return _out(await self.task_stats(names), report.tasks_text, json)

    @overload
    async def task(self, name: str, json: Literal[False] = False) -> Report[TaskStats]: ...
    @overload
    async def task(self, name: str, json: Literal[True]) -> str: ...
    async def task(self, name: str, json: bool = False) -> Report[TaskStats] | str:
        """One task name in detail; UnknownTask if neither this app nor a worker knows it."""
        (stats,) = await self.task_stats([name])
        if not stats.registered and stats.processed == 0 and stats.running == 0:
            raise UnknownTask(name)
        return _out(stats, report.task_text, json)

    @overload
    async def workers(self, json: Literal[False] = False) -> Report[list[WorkerStats]]: ...
    @overload
    async def workers(self, json: Literal[True]) -> str: ...
    async def workers(self, json: bool = False) -> Report[list[WorkerStats]] | str:
        """Registered workers, alive first."""
        return _out(await self.worker_stats(), report.workers_text, json)

    @overload
    async def queues(
        self, *names: str, json: Literal[False] = False
    ) -> Report[list[QueueStats]]: ...
    @overload
    async def queues(self, *names: str, json: Literal[True]) -> str: ...
    async def queues(self, *names: str, json: bool = False) -> Report[list[QueueStats]] | str:
        """Depth per queue: ready (per priority), delayed, in flight, where the broker tells."""
        return _out(await self.queue_stats(names), report.queues_text, json)

    @overload
    async def task_status(self, uuid: Any, json: Literal[False] = False) -> Report[Task | None]: ...
    @overload
    async def task_status(self, uuid: Any, json: Literal[True]) -> str: ...
    async def task_status(self, uuid: Any, json: bool = False) -> Report[Task | None] | str:
        """The task's record (None if unknown or expired)."""
        record = await (await self._started()).get(uuid)
        return _out(record, _record_text(str(uuid)), json)

    @overload
    async def failures(self, n: int = 10, json: Literal[False] = False) -> Report[list[Task]]: ...
    @overload
    async def failures(self, n: int = 10, *, json: Literal[True]) -> str: ...
    async def failures(self, n: int = 10, json: bool = False) -> Report[list[Task]] | str:
        """The last `n` failed records, latest first."""
        return _out(await self.recent_failures(n), report.failures_text, json)


def _record_text(uuid: str) -> Callable[[Task | None], str]:
    def text(record: Task | None) -> str:
        return (
            f"no task {uuid} (unknown or expired)" if record is None else report.record_text(record)
        )

    return text


class AsyncStats:
    """Stats of an app (async or sync); `inspect()` asks the questions."""

    def __init__(self, app: AsyncQueueTasks | QueueTasks) -> None:
        self.core = _core(app)

    def inspect(self) -> AsyncInspect:
        """The questions about the running system."""
        return AsyncInspect(self.core)


class SyncInspect:
    """`AsyncInspect` without await: each method runs the async one on the portal."""

    def __init__(self, inspect: AsyncInspect, portal: Portal) -> None:
        self._inspect = inspect
        self._call = portal.call

    @overload
    def app(self, json: Literal[False] = False) -> Report[AppStats]: ...
    @overload
    def app(self, json: Literal[True]) -> str: ...
    def app(self, json: bool = False) -> Report[AppStats] | str:
        """See `AsyncInspect.app`."""
        if json:
            return self._call(self._inspect.app(json=True))
        return self._call(self._inspect.app())

    @overload
    def tasks(self, *names: str, json: Literal[False] = False) -> Report[list[TaskStats]]: ...
    @overload
    def tasks(self, *names: str, json: Literal[True]) -> str: ...
    def tasks(self, *names: str, json: bool = False) -> Report[list[TaskStats]] | str:
        """See `AsyncInspect.tasks`."""
        if json:
            return self._call(self._inspect.tasks(*names, json=True))
        return self._call(self._inspect.tasks(*names))

    @overload
    def task(self, name: str, json: Literal[False] = False) -> Report[TaskStats]: ...
    @overload
    def task(self, name: str, json: Literal[True]) -> str: ...
    def task(self, name: str, json: bool = False) -> Report[TaskStats] | str:
        """See `AsyncInspect.task`."""
        if json:
            return self._call(self._inspect.task(name, json=True))
        return self._call(self._inspect.task(name))

    @overload
    def workers(self, json: Literal[False] = False) -> Report[list[WorkerStats]]: ...
    @overload
    def workers(self, json: Literal[True]) -> str: ...
    def workers(self, json: bool = False) -> Report[list[WorkerStats]] | str:
        """See `AsyncInspect.workers`."""
        if json:
            return self._call(self._inspect.workers(json=True))
        return self._call(self._inspect.workers())

    @overload
    def queues(self, *names: str, json: Literal[False] = False) -> Report[list[QueueStats]]: ...
    @overload
    def queues(self, *names: str, json: Literal[True]) -> str: ...
    def queues(self, *names: str, json: bool = False) -> Report[list[QueueStats]] | str:
        """See `AsyncInspect.queues`."""
        if json:
            return self._call(self._inspect.queues(*names, json=True))
        return self._call(self._inspect.queues(*names))

    @overload
    def task_status(self, uuid: Any, json: Literal[False] = False) -> Report[Task | None]: ...
    @overload
    def task_status(self, uuid: Any, json: Literal[True]) -> str: ...
    def task_status(self, uuid: Any, json: bool = False) -> Report[Task | None] | str:
        """See `AsyncInspect.task_status`."""
        if json:
            return self._call(self._inspect.task_status(uuid, json=True))
        return self._call(self._inspect.task_status(uuid))

    @overload
    def failures(self, n: int = 10, json: Literal[False] = False) -> Report[list[Task]]: ...
    @overload
    def failures(self, n: int = 10, *, json: Literal[True]) -> str: ...
    def failures(self, n: int = 10, json: bool = False) -> Report[list[Task]] | str:
        """See `AsyncInspect.failures`."""
        if json:
            return self._call(self._inspect.failures(n, json=True))
        return self._call(self._inspect.failures(n))


class SyncStats:
    """Stats without await, for the sync app (or a core, on a portal of its own)."""

    def __init__(self, app: AsyncQueueTasks | QueueTasks) -> None:
        from qtasks.sync import Portal

        self.core = _core(app)
        portal = getattr(app, "portal", None)
        self._own_portal = portal is None
        self.portal: Portal = portal if portal is not None else Portal()

    def inspect(self) -> SyncInspect:
        """The questions about the running system, answered synchronously."""
        return SyncInspect(AsyncInspect(self.core), self.portal)

    def close(self) -> None:
        """Stop the portal thread if this object made it (a sync app's stays with the app)."""
        if self._own_portal:
            self.portal.close()
