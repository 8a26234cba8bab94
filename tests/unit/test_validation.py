"""Argument validation: models built from JSON on the worker, clear errors, never retried."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from datetime import datetime, timezone
from pathlib import Path

import msgspec
import pydantic
import pytest

from qtasks import TaskStatusEnum
from qtasks.asyncio import QueueTasks
from qtasks.plugins.validation import ValidationFailed, converter_for

from .plugin_backends import BACKENDS, app_on, run_tasks


@pytest.fixture(params=BACKENDS)
async def backend_app(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[QueueTasks]:
    """An async app on each backend in turn."""
    async with app_on(request.param, tmp_path) as app:
        yield app


@dataclasses.dataclass
class Point:
    x: int
    y: int


class Order(msgspec.Struct):
    item: str
    quantity: int
    placed: datetime


class User(pydantic.BaseModel):
    name: str
    age: int


async def test_models_arrive_as_validated_instances(backend_app: QueueTasks) -> None:
    app = backend_app

    @app.task
    def describe(p: Point, order: Order, user: User, maybe: Point | None = None) -> list[str]:
        assert isinstance(p, Point)
        assert isinstance(order, Order)
        assert isinstance(user, User)
        return [
            f"{p.x},{p.y}",
            f"{order.quantity}x{order.item}@{order.placed.year}",
            f"{user.name}:{user.age}",
            repr(maybe),
        ]

    placed = datetime(2024, 5, 1, tzinfo=timezone.utc)
    records = [
        # Instances are encoded as JSON objects by the producer ...
        await describe.add_task(Point(1, 2), Order("pen", 3, placed), User(name="Ann", age=30)),
        # ... and plain JSON data works the same.
        await describe.add_task(
            {"x": 5, "y": 6},
            order={"item": "ink", "quantity": 1, "placed": placed.isoformat()},
            user={"name": "Bo", "age": "41"},  # pydantic's lax mode converts "41"
            maybe={"x": 0, "y": 0},
        ),
    ]
    first, second = await run_tasks(app, records)
    assert first.returning == ["1,2", "3xpen@2024", "Ann:30", "None"]
    assert second.returning == ["5,6", "1xink@2024", "Bo:41", "Point(x=0, y=0)"]


async def test_invalid_data_fails_with_field_messages_and_is_not_retried(
    backend_app: QueueTasks,
) -> None:
    app = backend_app

    @app.task(retry=3)
    def move(p: Point) -> int:
        return p.x

    @app.task(retry=3)
    def greet(user: User) -> str:
        return user.name

    bad_point, bad_user = await run_tasks(
        app, [await move.add_task({"x": "left", "y": 1}), await greet.add_task({"name": "Cy"})]
    )
    assert bad_point.status is TaskStatusEnum.ERROR
    assert bad_point.error_type == "ValidationFailed"
    assert bad_point.error_message == (
        "invalid argument 'p' of task 'move': Expected `int`, got `str` - at `$.x`"
    )
    assert bad_point.attempts == 1  # never retried: the same data fails again
    assert bad_user.error_message == "invalid argument 'user' of task 'greet': age: Field required"
    assert bad_user.attempts == 1


async def test_the_signature_is_still_checked_at_add_task(app: QueueTasks) -> None:
    @app.task
    def move(p: Point) -> int:
        return p.x

    with pytest.raises(TypeError, match="missing a required argument: 'p'; nothing was enqueued"):
        await move.add_task()


def test_only_models_get_a_converter() -> None:
    for plain in (int, str, list[int], dict, None, "Point", Point | int):
        assert converter_for(plain) is None
    for model in (Point, Order, User, Point | None):
        assert converter_for(model) is not None


def test_validation_failed_keeps_its_context() -> None:
    error = ValidationFailed("t", "p", ["a: bad", "b: worse"])
    assert (error.task, error.param, error.errors) == ("t", "p", ["a: bad", "b: worse"])
    assert str(error) == "invalid argument 'p' of task 't': a: bad; b: worse"
