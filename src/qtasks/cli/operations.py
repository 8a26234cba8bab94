"""What the operator commands do, on a started app: no argv, no printing.

Each function takes the async core and plain values and returns what happened; the
commands in `commands.py` print it and pick the exit code. `OperationError` says why an
operation could not be done (unknown task, already finished, not supported).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import msgspec

from qtasks.errors import QTasksError, TaskFailed, WaitTimeout
from qtasks.message import DEFAULT_QUEUE, DeadLetter, Task, TaskStatusEnum

if TYPE_CHECKING:
    from qtasks.app import AsyncQueueTasks

CANCELLED_MESSAGE = "cancelled by an operator before it started"
"""The `error_message` of a record cancelled with `qtasks cancel`."""


class OperationError(QTasksError):
    """The operation cannot be done for the reason in the message; nothing was changed."""


async def add(
    app: AsyncQueueTasks,
    name: str,
    args: Sequence[Any],
    kwargs: dict[str, Any],
    *,
    priority: int | None = None,
    queue: str | None = None,
    wait_seconds: float | None = None,
    on_step: Callable[[Any], None] | None = None,
) -> tuple[Task, Task | None]:
    """Enqueue `name`; the `new` record and, with `wait_seconds`, the final one (or None).

    With `on_step` too, the task's steps (a generator's handler results) are passed to it
    as they happen while waiting; a storage that keeps no steps just waits.
    """
    record = await app.add_task(name, *args, priority=priority, queue=queue, task_kwargs=kwargs)
    assert record is not None  # no timeout was given
    if wait_seconds is None:
        return record, None
    if on_step is not None:
        stream = app.stream(record.uuid, timeout=wait_seconds)
        try:
            async for step in stream:
                on_step(step)
        except TaskFailed as exc:
            return record, exc.record
        except WaitTimeout:
            return record, None
        except NotImplementedError:
            pass  # no steps kept: the plain wait below
        else:
            return record, stream.record
    return record, await app.storage.wait(str(record.uuid), wait_seconds)


async def _record(app: AsyncQueueTasks, uuid: str) -> Task:
    record = await app.get(uuid)
    if record is None:
        raise OperationError(f"no task {uuid} (unknown or expired)")
    return record


async def cancel(app: AsyncQueueTasks, uuid: str) -> Task:
    """Take a task that has not started off its queue and record it as `cancel`.

    A task a worker has claimed (running, or prefetched) is not touched: it runs to its
    end. Task code can end itself early by raising `qtasks.Cancel`.
    """
    record = await _record(app, uuid)
    if record.is_final:
        raise OperationError(f"task {uuid} already finished with status {record.status.value}")
    try:
        removed = await app.broker.discard([uuid], [record.queue])
    except NotImplementedError as exc:
        raise OperationError(f"cannot cancel: {exc}") from None
    if not removed:
        raise OperationError(
            f"task {uuid} ({record.status.value}) is claimed by a worker (running or "
            f"prefetched) and will run to its end; only tasks still on the queue can be "
            f"cancelled (task code may stop itself by raising qtasks.Cancel)"
        )
    final = _cancelled(record, time.time())
    await app.storage.save([final])
    return final


def _cancelled(record: Task, now: float) -> Task:
    return msgspec.structs.replace(
        record,
        status=TaskStatusEnum.CANCEL,
        error_type="Cancel",
        error_message=CANCELLED_MESSAGE,
        finished_at=now,
    )


async def retry(app: AsyncQueueTasks, uuid: str) -> Task:
    """Enqueue a failed (or cancelled) task again with the same arguments; its new record."""
    record = await _record(app, uuid)
    if record.status not in (TaskStatusEnum.ERROR, TaskStatusEnum.CANCEL):
        raise OperationError(
            f"task {uuid} has status {record.status.value}; only failed or cancelled tasks "
            f"can be retried"
        )
    new = await app.add_task(
        record.name,
        *record.args,
        priority=record.priority,
        queue=record.queue,
        task_kwargs=dict(record.kwargs),
    )
    assert new is not None
    return new


def app_queues(app: AsyncQueueTasks) -> list[str]:
    """Every queue the app's tasks use, and the default one."""
    return sorted({d.queue for d in app.tasks.values()} | {DEFAULT_QUEUE})


async def purge(app: AsyncQueueTasks, queues: Sequence[str]) -> int:
    """Drop the queued (unclaimed) messages of `queues`; their records become `cancel`.

    Returns how many were dropped. Messages claimed by workers are left alone.
    """
    await app.start()
    try:
        dropped = await app.broker.purge(list(queues))
    except NotImplementedError as exc:
        raise OperationError(f"cannot purge: {exc}") from None
    now = time.time()
    records = []
    for uuid in dropped:
        record = await app.storage.get(uuid)
        if record is not None and not record.is_final:
            records.append(_cancelled(record, now))
    if records:
        await app.storage.save(records)
    return len(dropped)


async def dead_letters(
    app: AsyncQueueTasks, queues: Sequence[str] | None, limit: int
) -> list[DeadLetter]:
    """The dead letters of `queues` (default: the app's), newest first."""
    try:
        return await app.dead_letters(queues, limit)
    except NotImplementedError as exc:
        raise OperationError(f"cannot list dead letters: {exc}") from None


async def settle_dead_letters(
    app: AsyncQueueTasks, action: str, uuids: Sequence[str], queues: Sequence[str] | None
) -> list[str]:
    """Retry or drop the dead letters `uuids` (every one of `queues` when empty).

    OperationError names the uuids that are not dead letters (nothing is done then).
    """
    wanted = list(uuids) or None
    try:
        if wanted is not None:
            found = {x.uuid for x in await app.dead_letters(queues, len(wanted), wanted)}
            missing = [u for u in wanted if u not in found]
            if missing:
                raise OperationError(
                    f"no dead letter {', '.join(missing)} in queues "
                    f"{', '.join(queues or app_queues(app))} (see: qtasks dlq list)"
                )
        if action == "retry":
            return await app.retry_dead_letters(wanted, queues)
        return await app.drop_dead_letters(wanted, queues)
    except NotImplementedError as exc:
        raise OperationError(f"cannot {action} dead letters: {exc}") from None
