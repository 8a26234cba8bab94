"""The README's examples for plugins, Depends, State, middlewares, validation and the context
run here, as written, against memory and SQLite (and Redis where it is available).

Each example follows a `<!-- example: NAME -->` line. It builds `app = QueueTasks()`,
which picks its backend from QTASKS_BROKER_URL as a user's app would; the scenario below
then enqueues through the app's async core and runs a worker until the tasks are final.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from qtasks import TaskStatusEnum
from qtasks.asyncio import QueueTasks

from .plugin_backends import run_tasks

README = Path(__file__).resolve().parents[2] / "README.md"
EXAMPLE = re.compile(r"<!-- example: (\w+) -->\n```python\n(.*?)```", re.S)


def examples() -> dict[str, str]:
    """Example name -> its code, from the README."""
    return dict(EXAMPLE.findall(README.read_text()))


Scenario = Callable[[QueueTasks, dict[str, Any]], Awaitable[None]]
SCENARIOS: dict[str, Scenario] = {}


def scenario(name: str) -> Callable[[Scenario], Scenario]:
    def register(fn: Scenario) -> Scenario:
        SCENARIOS[name] = fn
        return fn

    return register


@scenario("plugins")
async def _plugins(app: QueueTasks, ns: dict[str, Any]) -> None:
    greet, price = await run_tasks(
        app, [await app.add_task("greet", "ann"), await app.add_task("price", "pen")]
    )
    assert greet.returning == "hello ANN"
    assert price.returning == 0.0


@scenario("depends")
async def _depends(app: QueueTasks, ns: dict[str, Any]) -> None:
    finals = await run_tasks(app, [await app.add_task("save", t) for t in "abc"], concurrency=1)
    assert [f.returning for f in finals] == [1, 2, 3]  # one connection for the worker


@scenario("state")
async def _state(app: QueueTasks, ns: dict[str, Any]) -> None:
    sells = [await app.add_task("sell", "pen") for _ in range(3)]
    visits = [await app.add_task("visit", "home") for _ in range(3)]
    finals = await run_tasks(app, sells + visits)
    assert sorted(f.returning for f in finals[:3]) == [7, 8, 9]
    assert sorted(f.returning for f in finals[3:]) == [1, 2, 3]
    assert await ns["Stock"](app).get("sold") == 3


@scenario("middlewares")
async def _middlewares(app: QueueTasks, ns: dict[str, Any]) -> None:
    (final,) = await run_tasks(app, [await app.add_task("shout", " hi ")])
    assert final.returning == {"task": "shout", "result": "HI"}


@scenario("validation")
async def _validation(app: QueueTasks, ns: dict[str, Any]) -> None:
    good, bad = await run_tasks(
        app,
        [
            await app.add_task("walk", ns["Point"](1, 2), {"steps": 3}),
            await app.add_task("walk", {"x": "left", "y": 0}, ns["Move"](1)),
        ],
    )
    assert good.returning == 6
    assert bad.status is TaskStatusEnum.ERROR
    assert bad.error_message == (
        "invalid argument 'start' of task 'walk': Expected `int`, got `str` - at `$.x`"
    )
    with pytest.raises(TypeError, match="missing a required argument"):
        await app.add_task("walk", {"x": 1, "y": 2})


@scenario("context")
async def _context(app: QueueTasks, ns: dict[str, Any]) -> None:
    ok, cancelled = await run_tasks(
        app, [await app.add_task("parent", 2), await app.add_task("parent", -1)]
    )
    assert ok.returning.startswith("billing parent: child ")
    child = await app.wait(ok.returning.rsplit(" ", 1)[1], 10)
    assert child.returning == 4
    assert (cancelled.status, cancelled.error_message) == (TaskStatusEnum.CANCEL, "nothing to do")


def test_every_section_example_has_a_scenario() -> None:
    assert set(examples()) == set(SCENARIOS)


@pytest.mark.parametrize("backend", ["memory", "sqlite"])
@pytest.mark.parametrize("name", sorted(SCENARIOS))
async def test_readme_example_runs(
    name: str, backend: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = "memory://" if backend == "memory" else f"sqlite:///{tmp_path / 'readme.sqlite3'}"
    monkeypatch.setenv("QTASKS_BROKER_URL", url)
    ns: dict[str, Any] = {"__name__": f"readme_{name}"}
    code = compile(examples()[name], f"README.md ({name} example)", "exec", dont_inherit=True)
    exec(code, ns)
    sync_app = ns["app"]
    core: QueueTasks = sync_app.core
    try:
        await SCENARIOS[name](core, ns)
    finally:
        await core.stop()
