"""The Storage contract: every storage backend must pass these (see conftest.py)."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from typing import Any

import msgspec

from qtasks.config import QueueConfig
from qtasks.interfaces import Storage
from qtasks.message import Task, TaskMessage, TaskStatusEnum, new_uuid, record_for

from .conftest import MakeStorage


def new_record(name: str = "job", **fields: Any) -> Task:
    """A `new` record as add_task stores it (`fields` go to the TaskMessage)."""
    return record_for(TaskMessage(uuid=new_uuid(), name=name, created_at=time.time(), **fields))


def finished(task: Task, status: TaskStatusEnum = TaskStatusEnum.SUCCESS, **changes: Any) -> Task:
    """`task` in a final status."""
    return msgspec.structs.replace(task, status=status, finished_at=time.time(), **changes)


async def test_add_get(storage: Storage) -> None:
    task = new_record(args=[1, "two"], kwargs={"k": [3]}, priority=4, queue="other")
    await storage.add([task])
    got = await storage.get(str(task.uuid))
    assert got == task
    assert got is not None
    assert got.status is TaskStatusEnum.NEW
    assert await storage.get(str(new_uuid())) is None


async def test_save_replaces(storage: Storage) -> None:
    task = new_record()
    await storage.add([task])
    running = msgspec.structs.replace(task, status=TaskStatusEnum.PROCESS, started_at=time.time())
    await storage.save([running])
    assert await storage.get(str(task.uuid)) == running
    done = finished(running, returning={"answer": 42})
    await storage.save([done])
    got = await storage.get(str(task.uuid))
    assert got == done
    assert got is not None
    assert got.returning == {"answer": 42}
    assert got.is_final


async def test_save_batch(storage: Storage) -> None:
    tasks = [new_record(f"t{i}") for i in range(200)]
    await storage.add(tasks)
    await storage.save([finished(t, returning=i) for i, t in enumerate(tasks)])
    for i in (0, 99, 199):
        got = await storage.get(str(tasks[i].uuid))
        assert got is not None
        assert got.returning == i


async def test_remove(storage: Storage) -> None:
    keep, drop = new_record(), new_record()
    await storage.add([keep, drop])
    await storage.remove([str(drop.uuid)])
    assert await storage.get(str(drop.uuid)) is None
    assert await storage.get(str(keep.uuid)) == keep


async def test_wait_returns_final_at_once(storage: Storage) -> None:
    task = finished(new_record(), TaskStatusEnum.ERROR, error_message="boom")
    await storage.save([task])
    start = time.monotonic()
    assert await storage.wait(str(task.uuid), 5.0) == task
    assert time.monotonic() - start < 0.1


async def test_wait_wakes_on_save(storage: Storage) -> None:
    task = new_record()
    await storage.add([task])
    waiting = asyncio.ensure_future(storage.wait(str(task.uuid), 5.0))
    await asyncio.sleep(0.05)
    assert not waiting.done()
    await storage.save([msgspec.structs.replace(task, status=TaskStatusEnum.PROCESS)])
    await asyncio.sleep(0.02)
    assert not waiting.done()
    start = time.monotonic()
    done = finished(task, returning="ok")
    await storage.save([done])
    assert await asyncio.wait_for(waiting, 1.0) == done
    assert time.monotonic() - start < 0.2


async def test_wait_times_out(storage: Storage) -> None:
    task = new_record()
    await storage.add([task])
    start = time.monotonic()
    assert await storage.wait(str(task.uuid), 0.1) is None
    assert 0.09 <= time.monotonic() - start < 0.5
    assert await storage.wait(str(new_uuid()), 0.05) is None


async def test_finished_records_expire(make_storage: MakeStorage, qconfig: QueueConfig) -> None:
    storage = await make_storage(dataclasses.replace(qconfig, result_ttl_seconds=0.1))
    pending, done = new_record(), finished(new_record())
    await storage.add([pending])
    await storage.save([done])
    assert await storage.get(str(done.uuid)) == done
    await asyncio.sleep(0.15)
    assert await storage.get(str(done.uuid)) is None
    assert await storage.get(str(pending.uuid)) == pending


async def test_no_ttl_keeps_records(make_storage: MakeStorage, qconfig: QueueConfig) -> None:
    storage = await make_storage(dataclasses.replace(qconfig, result_ttl_seconds=None))
    old = finished(new_record())
    old.finished_at = time.time() - 10 * 86_400
    await storage.save([old])
    assert await storage.get(str(old.uuid)) == old
