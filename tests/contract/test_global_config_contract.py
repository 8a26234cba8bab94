"""The GlobalConfig contract: every global config backend must pass these (see conftest.py)."""

from __future__ import annotations

import time

from qtasks.interfaces import GlobalConfig


async def test_set_get_delete_items(global_config: GlobalConfig) -> None:
    assert await global_config.get("missing") is None
    assert await global_config.get("missing", 7) == 7
    await global_config.set("number", 3)
    await global_config.set("nested", {"a": [1, 2.5, "x", None, True]})
    await global_config.set("text", "hello")
    assert await global_config.get("number") == 3
    assert await global_config.get("nested") == {"a": [1, 2.5, "x", None, True]}
    await global_config.set("number", 4)
    assert await global_config.items() == {
        "number": 4,
        "nested": {"a": [1, 2.5, "x", None, True]},
        "text": "hello",
    }
    await global_config.delete("text")
    await global_config.delete("never-set")
    assert await global_config.get("text", "gone") == "gone"
    assert set(await global_config.items()) == {"number", "nested"}


async def test_workers_registry(global_config: GlobalConfig) -> None:
    assert await global_config.workers() == []
    before = time.time()
    await global_config.register_worker({"id": "w1", "pid": 10, "queues": ["default"]})
    await global_config.register_worker({"id": "w2", "pid": 11, "queues": ["a", "b"]})
    workers = {w["id"]: w for w in await global_config.workers()}
    assert set(workers) == {"w1", "w2"}
    assert workers["w2"]["queues"] == ["a", "b"]
    assert workers["w1"]["pid"] == 10
    assert workers["w1"]["heartbeat"] >= before - 1

    first_beat = workers["w1"]["heartbeat"]
    await global_config.register_worker({"id": "w1", "pid": 10, "queues": ["default"], "n": 5})
    (w1,) = [w for w in await global_config.workers() if w["id"] == "w1"]
    assert w1["n"] == 5
    assert w1["heartbeat"] >= first_beat

    await global_config.unregister_worker("w1")
    await global_config.unregister_worker("never-registered")
    assert [w["id"] for w in await global_config.workers()] == ["w2"]
