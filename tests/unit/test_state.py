"""State: the operations, atomic incr and lock, injection into tasks, storages without it."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import pytest

from qtasks import EncodeError, TaskStatusEnum
from qtasks import QueueTasks as SyncQueueTasks
from qtasks.asyncio import QueueTasks
from qtasks.errors import StateLockTimeout, StateNotSupported
from qtasks.interfaces import Storage
from qtasks.message import Task
from qtasks.plugins import AsyncState, Depends, SyncState
from qtasks.storages.memory import MemoryStorage

from .plugin_backends import BACKENDS, app_on, run_tasks


@pytest.fixture(params=BACKENDS)
async def backend_app(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[QueueTasks]:
    """An async app on each backend in turn."""
    async with app_on(request.param, tmp_path) as app:
        yield app


class Cart(AsyncState):
    pass


class Counters(SyncState):
    pass


class Renamed(AsyncState):
    state_name = "shared-name"


class CountersView(AsyncState):
    """The state `Counters` keeps, read from async code."""

    state_name = "Counters"


async def test_operations(backend_app: QueueTasks) -> None:
    cart = Cart(backend_app)
    await cart.clear()
    assert await cart.get("missing", "default") == "default"
    await cart.set("apples", 3)
    await cart.update({"pears": 1}, plums=[1, 2], meta={"a": None})
    assert await cart.get_all() == {"apples": 3, "pears": 1, "plums": [1, 2], "meta": {"a": None}}
    assert await cart.incr("apples") == 4
    assert await cart.incr("new", 2.5) == 2.5
    await cart.delete("pears")
    await cart.delete("never-there")
    assert set(await cart.get_all()) == {"apples", "plums", "meta", "new"}
    await cart.clear()
    assert await cart.get_all() == {}


async def test_states_are_separate_by_name(backend_app: QueueTasks) -> None:
    await Cart(backend_app).clear()
    await Renamed(backend_app).clear()
    await Cart(backend_app).set("k", "cart")
    await Renamed(backend_app).set("k", "renamed")
    assert await Cart(backend_app).get("k") == "cart"
    assert await Renamed(backend_app.storage).get("k") == "renamed"
    assert Renamed(backend_app).name == "shared-name"


async def test_values_are_copies_and_must_be_json(backend_app: QueueTasks) -> None:
    cart = Cart(backend_app)
    items = ["a"]
    await cart.set("items", items)
    items.append("b")
    assert await cart.get("items") == ["a"]
    with pytest.raises(EncodeError, match="cannot be stored in a State"):
        await cart.set("bad", object())
    await cart.set("text", "x")
    with pytest.raises(TypeError, match="incr needs numbers"):
        await cart.incr("text")
    await cart.clear()


async def test_injected_by_annotation_into_async_and_sync_tasks(backend_app: QueueTasks) -> None:
    app = backend_app
    await Cart(app).clear()
    await CountersView(app).clear()

    @app.task
    async def add_item(name: str, cart: Cart) -> int:
        return int(await cart.incr(name))

    @app.task
    def count(name: str, counters: Counters) -> int:
        counters.set(f"{name}-seen", True)
        return int(counters.incr(name, 10))

    finals = await run_tasks(
        app, [await add_item.add_task("x"), await add_item.add_task("x"), await count.add_task("y")]
    )
    assert sorted(f.returning for f in finals[:2]) == [1, 2]
    assert finals[2].returning == 10
    assert await Cart(app).get("x") == 2
    assert await CountersView(app).get_all() == {"y": 10, "y-seen": True}
    await Cart(app).clear()


async def test_concurrent_increments_from_tasks_lose_nothing(backend_app: QueueTasks) -> None:
    app = backend_app
    await Cart(app).clear()
    await CountersView(app).clear()

    @app.task
    async def bump(cart: Cart) -> None:
        await cart.incr("n")

    @app.task
    def bump_sync(counters: Counters) -> None:
        counters.incr("n")

    records = [await bump.add_task() for _ in range(150)]
    records += [await bump_sync.add_task() for _ in range(50)]
    finals = await run_tasks(app, records, concurrency=20)
    assert {f.status for f in finals} == {TaskStatusEnum.SUCCESS}
    assert await Cart(app).get("n") == 150
    assert await CountersView(app).get("n") == 50
    await Cart(app).clear()


async def test_lock_makes_read_modify_write_safe(backend_app: QueueTasks) -> None:
    app = backend_app
    await Cart(app).clear()

    @app.task
    async def careful(cart: Cart) -> None:
        async with cart.lock("total"):
            value = await cart.get("total", 0)
            await asyncio.sleep(0)  # let the others try to get in
            await cart.set("total", value + 1)

    finals = await run_tasks(app, [await careful.add_task() for _ in range(30)], concurrency=10)
    assert {f.status for f in finals} == {TaskStatusEnum.SUCCESS}
    assert await Cart(app).get("total") == 30
    await Cart(app).clear()


async def test_lock_tokens_expiry_and_wait_limit(backend_app: QueueTasks) -> None:
    storage = backend_app.storage
    await backend_app.start()
    assert await storage.state_acquire_lock("L", "k", "one", 30.0)
    assert not await storage.state_acquire_lock("L", "k", "two", 30.0)
    assert not await storage.state_release_lock("L", "k", "two")  # not the holder
    assert await storage.state_release_lock("L", "k", "one")
    assert await storage.state_acquire_lock("L", "k", "two", 0.01)
    deadline = time.monotonic() + 5
    while not await storage.state_acquire_lock("L", "k", "three", 30.0):  # "two" expires
        assert time.monotonic() < deadline
        await asyncio.sleep(0.01)

    class L(AsyncState):
        pass

    with pytest.raises(StateLockTimeout, match="lock 'k' of state 'L' not acquired"):
        await L(backend_app).lock("k", wait_seconds=0.05).__aenter__()
    assert await storage.state_release_lock("L", "k", "three")


def test_sync_state_from_the_sync_app(tmp_path: Path) -> None:
    app = SyncQueueTasks(broker_url=f"sqlite:///{tmp_path / 'sync.sqlite3'}")
    counters = Counters(app)
    counters.clear()
    assert counters.incr("visits") == 1
    with counters.lock():
        counters.set("last", "me")
    assert counters.get_all() == {"visits": 1, "last": "me"}
    app.close()


async def test_sync_state_refuses_to_block_the_loop(app: QueueTasks) -> None:
    with pytest.raises(RuntimeError, match="make it an AsyncState"):
        Counters(app.storage, loop=asyncio.get_running_loop()).get("x")


async def test_state_in_a_dependency(app: QueueTasks, run_until_idle) -> None:
    async def next_id(cart: Cart) -> int:
        return int(await cart.incr("ids"))

    @app.task
    async def create(ident: int = Depends(next_id)) -> int:
        return ident

    records = [await create.add_task() for _ in range(3)]
    await run_until_idle(app)
    assert sorted([(await app.get(r.uuid)).returning for r in records]) == [1, 2, 3]


class NoStateStorage(Storage):
    """A storage written before State existed: it inherits the State defaults."""

    def __init__(self) -> None:
        self.records = MemoryStorage()

    async def add(self, tasks: Sequence[Task]) -> None:
        await self.records.add(tasks)

    async def save(self, tasks: Sequence[Task]) -> None:
        await self.records.save(tasks)

    async def get(self, uuid: str) -> Task | None:
        return await self.records.get(uuid)

    async def wait(self, uuid: str, timeout: float) -> Task | None:
        return await self.records.wait(uuid, timeout)


async def test_a_storage_without_state_says_so(run_until_idle) -> None:
    app = QueueTasks(broker_url="memory://", storage=NoStateStorage())

    @app.task
    async def uses(cart: Cart) -> None:
        await cart.incr("n")

    record = await uses.add_task()
    await run_until_idle(app)
    final = await app.get(record.uuid)
    assert final.error_type == "StateNotSupported"
    assert "NoStateStorage keeps no State" in final.error_message
    with pytest.raises(StateNotSupported):
        await Cart(app).get("x")
    with pytest.raises(NotImplementedError):
        await Cart(app).get_all()
    await app.stop()


def test_state_needs_a_storage_or_an_app() -> None:
    with pytest.raises(TypeError, match="needs a Storage or an app"):
        Cart(42)
