"""Argument validation on the worker: JSON data in, validated model instances out.

A task parameter annotated with a dataclass, a msgspec Struct or a pydantic model (also
`Model | None`) receives an instance built from the JSON data of the message: dataclasses
and Structs through `msgspec.convert`, pydantic models through `model_validate`. pydantic
is optional: it is never imported here; a class is a pydantic model only if pydantic is
already loaded (the class's own module imported it).

A failure raises `ValidationFailed`, which the executor records as `error` with the
field-level messages and never retries: the same data would fail again.
"""

from __future__ import annotations

import dataclasses
import sys
import types
import typing
from collections.abc import Callable, Sequence
from typing import Any

import msgspec

Converter = Callable[[Any], Any]


class ValidationFailed(ValueError):  # noqa: N818 - reads as the reason recorded on the task
    """Arguments do not validate against the task's annotated models; never retried."""

    def __init__(self, task: str, param: str, errors: list[str]) -> None:
        super().__init__(f"invalid argument {param!r} of task {task!r}: " + "; ".join(errors))
        self.task = task
        self.param = param
        self.errors = errors


def _strip_optional(hint: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(hint)
    if origin is typing.Union or origin is types.UnionType:
        members = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(members) == 1 and len(typing.get_args(hint)) == 2:
            return members[0], True
    return hint, False


def _pydantic_model(cls: type) -> bool:
    pydantic = sys.modules.get("pydantic")
    base = getattr(pydantic, "BaseModel", None) if pydantic is not None else None
    return base is not None and issubclass(cls, base)


def converter_for(hint: Any) -> Converter | None:
    """A function that validates one JSON value into `hint`, or None for other annotations."""
    target, optional = _strip_optional(hint)
    if not isinstance(target, type):
        return None
    if _pydantic_model(target):
        validate = getattr(target, "model_validate")  # noqa: B009 - pydantic's, untyped here

        def from_pydantic(value: Any) -> Any:
            if value is None and optional:
                return None
            return value if isinstance(value, target) else validate(value)

        return from_pydantic
    if issubclass(target, msgspec.Struct) or dataclasses.is_dataclass(target):

        def from_json(value: Any) -> Any:
            if isinstance(value, target):
                return value
            return msgspec.convert(value, hint)

        return from_json
    return None


def validate(task: str, param: str, convert: Converter, value: Any) -> Any:
    """`convert(value)`, with any validation error turned into ValidationFailed."""
    try:
        return convert(value)
    except msgspec.ValidationError as exc:
        raise ValidationFailed(task, param, [str(exc)]) from None
    except ValueError as exc:  # pydantic.ValidationError is a ValueError
        errors = getattr(exc, "errors", None)
        if callable(errors):
            messages = [
                f"{'.'.join(str(p) for p in e.get('loc', ())) or param}: {e.get('msg')}"
                for e in errors()
            ]
            raise ValidationFailed(task, param, messages) from None
        raise ValidationFailed(task, param, [str(exc)]) from None
    except TypeError as exc:
        raise ValidationFailed(task, param, [str(exc)]) from None


def plain_models(
    args: Sequence[Any], kwargs: dict[str, Any]
) -> tuple[Sequence[Any], dict[str, Any]]:
    """Arguments with pydantic models replaced by their JSON data (`model_dump(mode="json")`).

    Dataclasses and msgspec Structs need nothing: every encoder handles them.
    """
    base = getattr(sys.modules.get("pydantic"), "BaseModel", None)
    if base is None:
        return args, kwargs
    if any(isinstance(a, base) for a in args):
        args = [a.model_dump(mode="json") if isinstance(a, base) else a for a in args]
    if any(isinstance(v, base) for v in kwargs.values()):
        kwargs = {
            k: v.model_dump(mode="json") if isinstance(v, base) else v for k, v in kwargs.items()
        }
    return args, kwargs
