"""Dead letters on memory://: what the worker sets aside, and listing, retrying, dropping."""

from __future__ import annotations

import time
import uuid as uuid_module

import msgspec
import pytest

from qtasks import DeadLetterReason, QueueConfig, TaskStatusEnum
from qtasks.asyncio import QueueTasks


async def test_task_failing_for_good_is_dead_lettered_with_its_traceback(
    make_app, run_until_idle
) -> None:
    app = make_app(config=QueueConfig(default_retry_backoff_seconds=0.01))
    runs: list[int] = []

    @app.task(retry=2, retry_backoff=0.01)
    async def always_fails(n: int) -> None:
        runs.append(n)
        raise ValueError(f"boom {n}")

    record = await always_fails.add_task(7)
    await run_until_idle(app)

    assert runs == [7, 7, 7], "the first run and two retries"
    (letter,) = await app.dead_letters()
    assert letter.uuid == str(record.uuid)
    assert letter.reason == DeadLetterReason.FAILED == "failed"
    assert letter.name == "always_fails"
    assert letter.queue == "default"
    assert "ValueError: boom 7" in letter.detail
    assert "Traceback" in letter.detail
    assert "always_fails" in letter.detail
    final = await app.get(record.uuid)
    assert final.status is TaskStatusEnum.ERROR
    assert final.attempts == 3
    (stats,) = await app.broker.queue_stats(["default"])
    assert stats.dead_lettered == 1
    assert stats.total == 0


async def test_dead_lettering_failures_can_be_turned_off(make_app, run_until_idle) -> None:
    app = make_app(config=QueueConfig(dead_letter_failures=False))

    @app.task
    async def fails() -> None:
        raise ValueError("boom")

    record = await fails.add_task()
    await run_until_idle(app)
    assert (await app.get(record.uuid)).status is TaskStatusEnum.ERROR
    assert await app.dead_letters() == []


async def test_unknown_task_is_dead_lettered_and_its_waiter_learns_why(
    make_app, run_until_idle
) -> None:
    app = make_app()

    @app.task
    async def ok() -> str:
        return "ok"

    unknown = await app.add_task("no.such.task", 1)
    good = await ok.add_task()
    await run_until_idle(app)
    (letter,) = await app.dead_letters()
    assert (letter.uuid, letter.reason) == (str(unknown.uuid), "unknown_task")
    assert "no.such.task" in letter.detail
    record = await app.wait(unknown.uuid, 1.0)
    assert (record.status, record.error_type) == (TaskStatusEnum.ERROR, "UnknownTask")
    assert (await app.get(good.uuid)).returning == "ok"


async def test_unknown_tasks_can_be_requeued_for_rolling_deploys(make_app, run_until_idle) -> None:
    app = make_app(config=QueueConfig(requeue_unknown_tasks=True, max_deliveries=2))
    unknown = await app.add_task("later.task")
    started = time.monotonic()
    await run_until_idle(app)
    # Delivered once, sent back for a second with a 1 s delay, then set aside.
    assert time.monotonic() - started >= 0.9
    (letter,) = await app.dead_letters()
    assert (letter.uuid, letter.reason, letter.delivery_count) == (
        str(unknown.uuid),
        "unknown_task",
        2,
    )


async def test_undecodable_message_is_dead_lettered_byte_for_byte(
    make_app, run_until_idle, publish_raw
) -> None:
    app = make_app()

    @app.task
    async def ok() -> str:
        return "ok"

    raw = b"\xff\xfe not json"
    bad_uuid = await publish_raw(app, raw)
    good = await ok.add_task()
    await run_until_idle(app)
    assert (await app.get(good.uuid)).returning == "ok"
    (letter,) = await app.dead_letters()
    assert letter.body == raw
    assert letter.reason not in ("failed", "")
    assert letter.queue == "default"
    assert letter.uuid != bad_uuid or letter.name is None  # the body names no uuid


async def test_retry_sends_it_again_under_the_same_uuid(make_app, run_until_idle) -> None:
    app = make_app()
    broken = True

    @app.task
    async def flaky(x: int) -> int:
        if broken:
            raise RuntimeError("not yet")
        return x * 2

    record = await flaky.add_task(21)
    await run_until_idle(app)
    assert [x.uuid for x in await app.dead_letters()] == [str(record.uuid)]

    broken = False
    assert await app.retry_dead_letters([record.uuid]) == [str(record.uuid)]
    assert await app.dead_letters() == [], "the letter is dropped once sent again"
    renewed = await app.get(record.uuid)
    assert renewed.status is TaskStatusEnum.NEW
    assert renewed.error_type is None
    await run_until_idle(app)
    final = await app.wait(record.uuid, 1.0)
    assert (final.status, final.returning, final.attempts) == (TaskStatusEnum.SUCCESS, 42, 1)


async def test_retry_all_and_drop(make_app, run_until_idle) -> None:
    app = make_app()

    @app.task
    async def fails(n: int) -> None:
        raise ValueError(n)

    records = [await fails.add_task(n) for n in range(4)]
    await run_until_idle(app)
    assert len(await app.dead_letters()) == 4
    assert len(await app.dead_letters(limit=2)) == 2
    dropped = await app.drop_dead_letters([records[0].uuid])
    assert dropped == [str(records[0].uuid)]
    assert await app.drop_dead_letters([uuid_module.uuid4()]) == []
    sent = await app.retry_dead_letters()
    assert sorted(sent) == sorted(str(r.uuid) for r in records[1:])
    await run_until_idle(app)
    assert len(await app.dead_letters()) == 3, "they failed again"
    assert len(await app.drop_dead_letters()) == 3
    assert await app.dead_letters() == []


async def test_dead_letters_of_a_queue_the_app_does_not_know(make_app, run_until_idle) -> None:
    app = make_app()

    @app.task(queue="emails")
    async def send() -> None:
        raise ValueError("smtp down")

    await send.add_task()
    await run_until_idle(app)
    assert [x.queue for x in await app.dead_letters()] == ["emails"]
    assert await app.dead_letters(queues=["default"]) == []
    assert len(await app.dead_letters(queues=["emails"])) == 1


def test_sync_facade_forwards(tmp_path) -> None:
    from qtasks import QueueTasks as SyncQueueTasks

    app = SyncQueueTasks("dl", broker_url=f"sqlite:///{tmp_path / 'q.db'}")
    try:
        assert app.dead_letters() == []
        assert app.retry_dead_letters() == []
        assert app.drop_dead_letters() == []
    finally:
        app.close()


@pytest.mark.parametrize("reason", list(DeadLetterReason))
def test_reasons_are_plain_strings(reason: DeadLetterReason) -> None:
    assert str(reason) == reason.value
    assert reason == reason.value


async def test_worker_acks_when_the_broker_keeps_no_dead_letters(
    make_app, run_until_idle, caplog
) -> None:
    from qtasks.brokers.memory import MemoryBroker

    class Plain(MemoryBroker):
        async def dead_letter(self, items):  # type: ignore[no-untyped-def]
            raise NotImplementedError

    app: QueueTasks = make_app(broker=Plain())

    @app.task
    async def fails() -> None:
        raise ValueError("x")

    record = await fails.add_task()
    await run_until_idle(app)
    assert (await app.get(record.uuid)).status is TaskStatusEnum.ERROR
    assert "keeps no dead letters" in caplog.text


async def test_retry_keeps_a_letter_that_came_back_meanwhile(make_app, run_until_idle) -> None:
    # The retried task may fail for good again before the retry drops the old letter: the
    # new letter (same uuid, newer) must survive the clean-up.
    app = make_app()

    @app.task
    async def fails() -> None:
        raise ValueError("again")

    record = await fails.add_task()
    await run_until_idle(app)
    broker = app.broker
    publish = broker.publish

    async def publish_then_fail_at_once(envelopes):  # type: ignore[no-untyped-def]
        await publish(envelopes)
        (d,) = await broker.fetch(["default"], 1, 1.0)
        (old,) = await broker.dead_letters(["default"])
        newer = msgspec.structs.replace(old, dead_at=time.time() + 1, detail="failed again")
        await broker.dead_letter([(d, newer)])

    broker.publish = publish_then_fail_at_once
    assert await app.retry_dead_letters([record.uuid]) == [str(record.uuid)]
    (letter,) = await app.dead_letters()
    assert letter.detail == "failed again"


async def test_memory_drop_tolerates_repeated_uuids(make_app, run_until_idle) -> None:
    app = make_app()

    @app.task
    async def fails() -> None:
        raise ValueError("x")

    record = await fails.add_task()
    await run_until_idle(app)
    assert await app.drop_dead_letters([record.uuid, record.uuid]) == [str(record.uuid)]
