"""The Storage contract: every storage backend must pass these (see conftest.py)."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from typing import Any

import msgspec
import pytest

from qtasks.config import QueueConfig
from qtasks.errors import EncodeError, TaskNotFound
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


async def test_wait_on_a_missing_record_says_so_at_once(storage: Storage) -> None:
    # Never enqueued, expired or evicted: reported as such, never waited out.
    start = time.monotonic()
    with pytest.raises(TaskNotFound):
        await storage.wait(str(new_uuid()), 5.0)
    assert time.monotonic() - start < 1.0


async def test_wait_reports_a_record_that_vanished_meanwhile(storage: Storage) -> None:
    task = new_record()
    await storage.add([task])
    waiting = asyncio.ensure_future(storage.wait(str(task.uuid), 0.5))
    await asyncio.sleep(0.1)
    await storage.remove([str(task.uuid)])
    with pytest.raises(TaskNotFound):
        await waiting


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


# -- Steps: the log a generator task's stream reads ----------------------------------------


async def test_steps_read_from_any_position(storage: Storage) -> None:
    task = new_record()
    await storage.add([task])
    uuid = str(task.uuid)
    await storage.add_steps(uuid, [1])
    await storage.add_steps(uuid, [{"done": 2, "of": [3]}, None, "four"])
    page = await storage.steps(uuid, 0, 0.0)
    assert page.values == [1, {"done": 2, "of": [3]}, None, "four"]
    assert page.final is None
    rest = await storage.steps(uuid, 2, 0.0)
    assert rest.values == [None, "four"]
    assert rest.after == page.after


async def test_steps_wait_until_the_timeout_when_nothing_comes(storage: Storage) -> None:
    task = new_record()
    await storage.add([task])
    await storage.add_steps(str(task.uuid), ["a"])
    page = await storage.steps(str(task.uuid), 0, 0.0)
    start = time.monotonic()
    empty = await storage.steps(str(task.uuid), page.after, 0.1)
    assert (empty.values, empty.final) == ([], None)
    assert 0.09 <= time.monotonic() - start < 1.0
    unknown = await storage.steps(str(new_uuid()), 0, 0.05)
    assert (unknown.values, unknown.final) == ([], None)


async def test_a_new_step_wakes_a_reader(storage: Storage) -> None:
    task = new_record()
    await storage.add([task])
    uuid = str(task.uuid)
    reading = asyncio.ensure_future(storage.steps(uuid, 0, 5.0))
    await asyncio.sleep(0.05)
    assert not reading.done()
    start = time.monotonic()
    await storage.add_steps(uuid, ["first", "second"])
    page = await asyncio.wait_for(reading, 2.0)
    assert time.monotonic() - start < 0.5
    assert page.values[0] == "first"  # the second may come with it or with the next read
    assert page.final is None


async def test_the_final_record_wakes_a_reader_with_every_step_left(storage: Storage) -> None:
    task = new_record()
    await storage.add([task])
    uuid = str(task.uuid)
    await storage.add_steps(uuid, [1, 2])
    seen = await storage.steps(uuid, 0, 0.0)
    reading = asyncio.ensure_future(storage.steps(uuid, seen.after, 5.0))
    await asyncio.sleep(0.05)
    assert not reading.done()
    await storage.add_steps(uuid, [3])
    third = await asyncio.wait_for(reading, 2.0)
    assert third.values == [3]
    reading = asyncio.ensure_future(storage.steps(uuid, third.after, 5.0))
    await asyncio.sleep(0.05)
    assert not reading.done()
    start = time.monotonic()
    done = finished(task, returning=[1, 2, 3])
    await storage.save([done])
    end = await asyncio.wait_for(reading, 2.0)
    assert time.monotonic() - start < 0.5
    assert (end.values, end.final) == ([], done)
    # Read from the start after the end: every step, and the record, in one answer.
    replay = await storage.steps(uuid, 0, 5.0)
    assert (replay.values, replay.final) == ([1, 2, 3], done)


async def test_a_task_without_steps_ends_its_readers_too(storage: Storage) -> None:
    task = new_record()
    await storage.add([task])
    reading = asyncio.ensure_future(storage.steps(str(task.uuid), 0, 5.0))
    await asyncio.sleep(0.05)
    failed = finished(task, TaskStatusEnum.ERROR, error_message="boom")
    await storage.save([failed])
    page = await asyncio.wait_for(reading, 2.0)
    assert (page.values, page.final) == ([], failed)


async def test_steps_of_a_task_run_again_follow_the_old_ones(storage: Storage) -> None:
    # A dead letter sent again keeps its uuid: its new run's steps come after the old ones.
    task = new_record()
    await storage.add([task])
    uuid = str(task.uuid)
    await storage.add_steps(uuid, ["old"])
    await storage.save([finished(task, TaskStatusEnum.ERROR)])
    ended = await storage.steps(uuid, 0, 0.0)
    assert ended.values == ["old"]
    await storage.save([task])  # `new` again
    await storage.add_steps(uuid, ["new"])
    page = await storage.steps(uuid, ended.after, 0.0)
    assert (page.values, page.final) == (["new"], None)


async def test_steps_go_with_their_record(make_storage: MakeStorage, qconfig: QueueConfig) -> None:
    storage = await make_storage(dataclasses.replace(qconfig, result_ttl_seconds=0.1))
    expiring, removed = new_record(), new_record()
    await storage.add([expiring, removed])
    for task in (expiring, removed):
        await storage.add_steps(str(task.uuid), ["step"])
    await storage.save([finished(expiring)])
    await storage.remove([str(removed.uuid)])
    assert (await storage.steps(str(removed.uuid), 0, 0.0)).values == []
    await asyncio.sleep(0.15)
    page = await storage.steps(str(expiring.uuid), 0, 0.0)
    assert (page.values, page.final) == ([], None)


async def test_a_step_that_is_not_json_is_refused(storage: Storage) -> None:
    task = new_record()
    await storage.add([task])
    with pytest.raises(EncodeError, match="cannot be stored"):
        await storage.add_steps(str(task.uuid), ["fine", object()])
    assert (await storage.steps(str(task.uuid), 0, 0.0)).values == []


async def test_recent_lists_records_by_status_latest_first(storage: Storage) -> None:
    tasks = [new_record(args=[i]) for i in range(6)]
    await storage.add(tasks)
    running = [msgspec.structs.replace(t, status=TaskStatusEnum.PROCESS) for t in tasks]
    for t in running:
        await storage.save([t])
        await asyncio.sleep(0.002)  # distinct write times: "latest first" is well defined
    for t in tasks[:4]:
        await storage.save([finished(t, TaskStatusEnum.ERROR)])
        await asyncio.sleep(0.002)
    errors = await storage.recent(TaskStatusEnum.ERROR, 3)
    assert [r.args for r in errors] == [[3], [2], [1]]
    assert all(r.status is TaskStatusEnum.ERROR for r in errors)
    still = await storage.recent(TaskStatusEnum.PROCESS, 10)
    assert sorted(r.args[0] for r in still) == [4, 5], "a record leaves its old status"
    assert await storage.recent(TaskStatusEnum.SUCCESS, 10) == []
    assert await storage.recent(TaskStatusEnum.ERROR, 0) == []
