"""The enqueue fast path's pieces that need no server: Batcher, pre-packed commands, ids."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest

from qtasks import _redis as redis_link
from qtasks import app as app_module
from qtasks._version import __version__ as qtasks_version
from qtasks.app import TaskCall
from qtasks.message import new_uuid


class Recorder:
    """A Batcher write that records its batches and waits until released."""

    def __init__(self) -> None:
        self.batches: list[list[Any]] = []
        self.gate = asyncio.Event()
        self.fail: Exception | None = None
        self.running = 0
        self.most_running = 0

    async def __call__(self, items: list[Any]) -> None:
        self.batches.append(list(items))
        self.running += 1
        self.most_running = max(self.most_running, self.running)
        try:
            await self.gate.wait()
        finally:
            self.running -= 1
        if self.fail is not None:
            raise self.fail


async def test_queued_items_are_written_together_up_to_max_items() -> None:
    write = Recorder()
    batcher = redis_link.Batcher(write, max_items=3, max_in_flight=2)
    calls = [asyncio.ensure_future(batcher.submit(i)) for i in range(9)]
    await asyncio.sleep(0)
    # The first two write alone at once; the rest queue behind them, and whoever fills a
    # batch writes it at once (up to twice max_in_flight writes: full batches only).
    assert write.batches == [[0], [1], [2, 3, 4], [5, 6, 7]]
    write.gate.set()
    await asyncio.gather(*calls)
    await batcher.close()
    assert write.batches[4:] == [[8]]
    assert write.most_running == 4


async def test_partial_batches_wait_for_a_write_in_flight_to_return() -> None:
    write = Recorder()
    batcher = redis_link.Batcher(write, max_items=10, max_in_flight=1)
    calls = [asyncio.ensure_future(batcher.submit(i)) for i in range(4)]
    await asyncio.sleep(0.01)
    assert write.batches == [[0]]
    write.gate.set()
    await asyncio.gather(*calls)
    assert write.batches == [[0], [1, 2, 3]]
    assert write.most_running == 1


async def test_a_batch_writer_cancelled_mid_write_hands_the_others_items_back() -> None:
    write = Recorder()
    batcher = redis_link.Batcher(write, max_items=2, max_in_flight=1)
    alone = asyncio.ensure_future(batcher.submit("alone"))
    other = asyncio.ensure_future(batcher.submit("other"))
    filler = asyncio.ensure_future(batcher.submit("filler"))  # fills the batch: writes it
    await asyncio.sleep(0)
    assert write.batches == [["alone"], ["other", "filler"]]
    filler.cancel()
    await asyncio.sleep(0)
    write.gate.set()
    await asyncio.gather(alone, other)
    with pytest.raises(asyncio.CancelledError):
        await filler
    # Whether the interrupted write happened is unknown: "other" is written again.
    assert write.batches[2:] == [["other"]]


async def test_sizes_bound_a_batch_and_an_oversized_item_goes_alone() -> None:
    write = Recorder()
    write.gate.set()
    batcher = redis_link.Batcher(write, max_items=10, max_in_flight=1, size=len)
    calls = [asyncio.ensure_future(batcher.submit(s)) for s in ("a", "bbbbbb", "cccccc", "d" * 20)]
    await asyncio.gather(*calls)
    assert write.batches == [["a"], ["bbbbbb", "cccccc"], ["d" * 20]]


@pytest.mark.parametrize(("max_items", "batches"), [(10, [[0], [1, 2, 3]]), (3, [[0], [1, 2, 3]])])
async def test_every_caller_of_a_failed_batch_gets_the_error(
    max_items: int, batches: list[list[int]]
) -> None:
    write = Recorder()
    write.fail = ConnectionError("down")
    batcher = redis_link.Batcher(write, max_items=max_items, max_in_flight=1)
    calls = [asyncio.ensure_future(batcher.submit(i)) for i in range(4)]
    await asyncio.sleep(0)
    write.gate.set()
    outcomes = await asyncio.gather(*calls, return_exceptions=True)
    assert all(isinstance(o, ConnectionError) for o in outcomes), outcomes
    assert write.batches == batches


async def test_a_cancelled_caller_s_queued_item_is_not_written() -> None:
    write = Recorder()
    batcher = redis_link.Batcher(write, max_items=10, max_in_flight=1)
    first = asyncio.ensure_future(batcher.submit("first"))
    dropped = asyncio.ensure_future(batcher.submit("dropped"))
    kept = asyncio.ensure_future(batcher.submit("kept"))
    await asyncio.sleep(0)
    dropped.cancel()
    write.gate.set()
    await asyncio.gather(first, kept)
    assert write.batches == [["first"], ["kept"]]
    with pytest.raises(asyncio.CancelledError):
        await dropped


async def test_packed_commands_are_sent_as_they_are() -> None:
    packed = redis_link.Packed("EVALSHA", b"*1\r\n$4\r\nPING\r\n")
    out = redis_link._pack(None, [packed, ("GET", "k")])  # type: ignore[arg-type]
    assert out[0] == b"*1\r\n$4\r\nPING\r\n"
    assert out[1] == b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n"
    assert redis_link._is_script(packed)
    assert not redis_link._is_script(redis_link.Packed("GET", b""))
    assert redis_link.bulk(b"ab") == b"$2\r\nab\r\n"


def test_fast_uuid4_is_a_plain_random_version_4_uuid() -> None:
    ids = [new_uuid() for _ in range(1000)]
    assert len(set(ids)) == 1000
    for u in ids[:50]:
        assert type(u) is uuid.UUID
        assert u.version == 4
        assert u.variant == uuid.RFC_4122
        assert uuid.UUID(str(u)) == u
        assert hash(u) == hash(uuid.UUID(str(u)))


def test_add_tasks_tuples_are_checked_like_task_calls() -> None:
    assert app_module._call_parts(("job",)) == ("job", (), {}, {})
    assert app_module._call_parts(("job", [1], {"x": 2}, {"priority": 3})) == (
        "job",
        [1],
        {"x": 2},
        {"priority": 3},
    )
    assert app_module._call_parts(("job", "ab")) == ("job", ("a", "b"), {}, {})
    bad: list[Any] = ["job", (), ("a", (), {}, {}, {})]
    for call in bad:
        with pytest.raises(TypeError, match="add_tasks takes"):
            app_module._call_parts(call)
    with pytest.raises(TypeError, match="unknown option"):
        app_module._call_parts(("job", (), {}, {"prio": 1}))
    with pytest.raises(TypeError):
        TaskCall.of(("job", (), {}, {"prio": 1}))


def test_connections_do_not_look_up_redis_py_version_in_package_metadata(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # redis-py's default CLIENT SETINFO reads its installed metadata for each connection.
    import redis
    import redis.utils

    looked_up: list[int] = []
    monkeypatch.setattr(redis.utils, "get_lib_version", lambda: looked_up.append(1) or "x")
    link = redis_link.RedisLink(redis_link.parse_url("redis://127.0.0.1:1/0"), "ns")
    factory = link._make_factory(link.node_url)
    conns = [redis_link._make_connection(factory) for _ in range(3)]
    assert looked_up == []
    info = conns[0].driver_info
    assert info.formatted_name == f"redis-py(qtasks_v{qtasks_version})"
    assert info.lib_version == redis.__version__
    # The heartbeat thread's blocking client gets the same (it connects when made).
    seen: dict[str, Any] = {}
    monkeypatch.setattr(redis.Redis, "from_url", lambda url, **kw: seen.update(kw))
    link.sync_client(1.0)
    assert seen["driver_info"] is info
