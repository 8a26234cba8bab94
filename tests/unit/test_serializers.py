"""Encoding task messages: JSON round trips, clear errors, never code execution."""

from __future__ import annotations

import dataclasses
import uuid as uuid_module
from datetime import datetime, timezone

import msgspec
import pytest

from qtasks import DecodeError, EncodeError, TaskMessage
from qtasks.message import MESSAGE_FORMAT_VERSION
from qtasks.serializers import JsonSerializer, Serializer, peek_identity, to_builtins


@pytest.fixture
def serializer() -> JsonSerializer:
    return JsonSerializer()


def _message(**kwargs: object) -> TaskMessage:
    return TaskMessage(uuid=uuid_module.uuid4(), name="job", **kwargs)  # type: ignore[arg-type]


def test_round_trip_keeps_every_field(serializer: JsonSerializer) -> None:
    message = _message(
        args=[1, "two", 3.5, None, True, [1, 2], {"k": "v"}],
        kwargs={"x": {"nested": [1, {"deep": None}]}, "unicode": "héllo ✓"},
        priority=-3,
        queue="emails",
        eta=1234.5,
        attempt=2,
        created_at=1000.25,
        headers={"trace-id": "abc"},
    )
    body = serializer.encode(message)
    assert isinstance(body, bytes)
    assert serializer.decode(body) == message
    assert serializer.content_type == "application/json"
    assert isinstance(serializer, Serializer)


def test_defaults_round_trip_and_carry_the_format_version(serializer: JsonSerializer) -> None:
    message = _message()
    decoded = serializer.decode(serializer.encode(message))
    assert decoded == message
    assert decoded.v == MESSAGE_FORMAT_VERSION
    assert decoded.args == []
    assert decoded.kwargs == {}
    assert decoded.priority == 0


def test_rich_values_encode_to_plain_data(serializer: JsonSerializer) -> None:
    @dataclasses.dataclass
    class Point:
        x: int
        y: int

    when = datetime(2024, 1, 2, 3, 4, 5, tzinfo=timezone.utc)
    ident = uuid_module.uuid4()
    decoded = serializer.decode(serializer.encode(_message(args=[when, ident, Point(1, 2)])))
    assert decoded.args == [when.isoformat().replace("+00:00", "Z"), str(ident), {"x": 1, "y": 2}]


@pytest.mark.parametrize("value", [object(), lambda: 1, {1, object()}, {"k": Exception()}])
def test_unencodable_values_raise_encode_error(serializer: JsonSerializer, value: object) -> None:
    with pytest.raises(EncodeError, match="cannot be encoded") as info:
        serializer.encode(_message(args=[value]))
    assert "'job'" in str(info.value)
    assert isinstance(info.value, TypeError)


@pytest.mark.parametrize(
    "body",
    [
        b"garbage",
        b"",
        b"[1, 2, 3]",
        b'{"name": "job"}',  # no uuid
        b'{"uuid": "not-a-uuid", "name": "job"}',
        b'{"uuid": "6f1c1c8e-7a8e-4b7c-9d1e-2f3a4b5c6d7e", "name": "job", "args": "x"}',
        b'{"uuid": "6f1c1c8e-7a8e-4b7c-9d1e-2f3a4b5c6d7e", "name": 5}',
        b"\xff\xfe",
    ],
)
def test_bad_bytes_raise_decode_error(serializer: JsonSerializer, body: bytes) -> None:
    with pytest.raises(DecodeError, match="undecodable task message"):
        serializer.decode(body)


def test_decode_error_is_a_value_error(serializer: JsonSerializer) -> None:
    with pytest.raises(ValueError, match="undecodable"):
        serializer.decode(b"{")


def test_unknown_fields_are_ignored_for_forward_compatibility(serializer: JsonSerializer) -> None:
    message = _message(args=[1])
    raw = msgspec.json.decode(serializer.encode(message))
    raw["added_in_a_later_version"] = {"x": 1}
    assert serializer.decode(msgspec.json.encode(raw)) == message


def test_to_builtins() -> None:
    assert to_builtins({"a": [1, {2, 3}]}) == {"a": [1, [2, 3]]}
    assert to_builtins(None) is None
    with pytest.raises(EncodeError, match="result cannot be stored"):
        to_builtins(object())


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (b'{"uuid": "u-1", "name": "job", "args": 5}', ("u-1", "job")),
        (b'{"uuid": 5, "name": ["x"]}', (None, None)),
        (b"[1]", (None, None)),
        (b"garbage", (None, None)),
    ],
)
def test_peek_identity(body: bytes, expected: tuple[str | None, str | None]) -> None:
    assert peek_identity(body) == expected
