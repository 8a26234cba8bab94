"""Listing, retrying and dropping dead letters: what `app.dead_letters()` and friends do.

A dead letter is a message the worker set aside instead of running or retrying it (see
`DeadLetterReason` and `DecodeError.reason`); the broker keeps it beside its queue. Its
task record stays in the storage with status `error`, so waiters learn what happened.

Retrying sends the message again under the SAME uuid (its record goes back to `new`, so
anyone following the uuid sees the new run) with its attempt counter reset, then drops
the dead letter. The new message is published before the letter is dropped: a crash in
between leaves the letter to be dropped again, never a lost task.
"""

from __future__ import annotations

import time
import uuid as uuid_module
from collections.abc import Sequence
from typing import TYPE_CHECKING

import msgspec

from qtasks.errors import DecodeError
from qtasks.message import DEFAULT_QUEUE, DeadLetter, Envelope, Task, TaskStatusEnum

if TYPE_CHECKING:
    from qtasks.app import AsyncQueueTasks


def known_queues(app: AsyncQueueTasks, queues: Sequence[str] | None) -> list[str]:
    """`queues`, or every queue the app's tasks use and the default one."""
    if queues:
        return list(queues)
    return sorted({d.queue for d in app.tasks.values()} | {DEFAULT_QUEUE})


async def list_dead_letters(
    app: AsyncQueueTasks,
    queues: Sequence[str] | None = None,
    limit: int = 100,
    uuids: Sequence[str] | None = None,
) -> list[DeadLetter]:
    """Dead letters of `queues` (default: the app's queues), newest first."""
    await app.start()
    wanted = None if uuids is None else [str(u) for u in uuids]
    return await app.broker.dead_letters(known_queues(app, queues), limit, wanted)


async def retry_dead_letters(
    app: AsyncQueueTasks,
    uuids: Sequence[str] | None = None,
    queues: Sequence[str] | None = None,
    limit: int = 1000,
) -> list[str]:
    """Send dead letters again (only `uuids` if given, else up to `limit`); uuids sent."""
    letters = await list_dead_letters(app, queues, limit, uuids)
    if not letters:
        return []
    envelopes: list[Envelope] = []
    records: list[Task] = []
    now = time.time()
    for letter in letters:
        body = letter.body
        try:
            message = app.serializer.decode(body)
        except DecodeError:
            message = None  # sent back as it came: maybe the worker can read it now
        if message is not None:
            message = msgspec.structs.replace(message, attempt=0, eta=None)
            body = app.serializer.encode(message)
        envelopes.append(
            Envelope(letter.uuid, letter.queue, letter.priority, None, letter.created_at, body)
        )
        record = await app.storage.get(letter.uuid)
        if record is not None:
            records.append(_renewed(record))
        elif message is not None:
            records.append(_new_record(letter, message.name, now))
    if records:
        await app.storage.save(records)
    await app.broker.publish(envelopes)
    sent = [letter.uuid for letter in letters]
    by_queue: dict[str, list[str]] = {}
    for letter in letters:
        by_queue.setdefault(letter.queue, []).append(letter.uuid)
    # Only the letters listed above: one that came back since (the retried task failed
    # again already) is newer and stays.
    newest = max(letter.dead_at for letter in letters)
    for queue, ids in by_queue.items():
        await app.broker.drop_dead_letters([queue], ids, newest)
    return sent


async def drop_dead_letters(
    app: AsyncQueueTasks,
    uuids: Sequence[str] | None = None,
    queues: Sequence[str] | None = None,
) -> list[str]:
    """Delete dead letters of `queues` (only `uuids` if given); the uuids deleted."""
    await app.start()
    wanted = None if uuids is None else [str(u) for u in uuids]
    return await app.broker.drop_dead_letters(known_queues(app, queues), wanted)


def _renewed(record: Task) -> Task:
    return msgspec.structs.replace(
        record,
        status=TaskStatusEnum.NEW,
        attempts=0,  # the message goes out as attempt 0: the record says the same
        returning=None,
        error_type=None,
        error_message=None,
        traceback=None,
        started_at=None,
        finished_at=None,
        eta=None,
    )


def _new_record(letter: DeadLetter, name: str, now: float) -> Task:
    # The record expired (result TTL) while the letter was kept: start a fresh one.
    return Task(
        uuid=uuid_module.UUID(letter.uuid),
        name=name,
        status=TaskStatusEnum.NEW,
        priority=letter.priority,
        queue=letter.queue,
        created_at=now,
    )
