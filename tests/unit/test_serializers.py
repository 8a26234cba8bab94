"""Encoding task messages: JSON round trips, clear errors, never code execution."""

from __future__ import annotations

import dataclasses
import logging
import pickle
import uuid as uuid_module
from datetime import datetime, timezone

import msgspec
import pytest

from qtasks import ConfigurationError, DecodeError, EncodeError, TaskMessage
from qtasks.message import MESSAGE_FORMAT_VERSION
from qtasks.serializers import (
    JsonSerializer,
    PickleSerializer,
    Serializer,
    SigningSerializer,
    peek_identity,
    to_builtins,
)


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


GOOD_UUID = "6f1c1c8e-7a8e-4b7c-9d1e-2f3a4b5c6d7e"


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"garbage", "invalid_json"),
        (b"", "empty"),
        (b"[1, 2, 3]", "bad_schema"),
        (b'{"name": "job"}', "bad_schema"),  # no uuid
        (b'{"uuid": "not-a-uuid", "name": "job"}', "bad_schema"),
        (b'{"uuid": "' + GOOD_UUID.encode() + b'", "name": "job", "args": "x"}', "bad_schema"),
        (b'{"uuid": "' + GOOD_UUID.encode() + b'", "name": 5}', "bad_schema"),
        (b"\xff\xfe", "not_utf8"),
    ],
)
def test_bad_bytes_raise_decode_error_with_a_reason(
    serializer: JsonSerializer, body: bytes, reason: str
) -> None:
    with pytest.raises(DecodeError) as info:
        serializer.decode(body)
    assert info.value.reason == reason
    assert str(info.value).startswith(f"{reason}: ")  # the human message names it too


def test_decode_error_is_a_value_error(serializer: JsonSerializer) -> None:
    with pytest.raises(ValueError, match="invalid_json"):
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
        (b'{"uuid": "u-1", "name": "\xff"}', (None, None)),
        (b'{"args": ' + b"[" * 5000 + b', "uuid": "u-1"}', (None, None)),  # no RecursionError
    ],
)
def test_peek_identity(body: bytes, expected: tuple[str | None, str | None]) -> None:
    assert peek_identity(body) == expected


@pytest.mark.parametrize("reason", ["bad_signature", "payload_too_large", "pickle_refused"])
def test_peek_identity_trusts_nothing_it_should_not_read(reason: str) -> None:
    # A forger without the key could name a real task's uuid and overwrite its record.
    assert peek_identity(b'{"uuid": "u-1", "name": "job"}', reason) == (None, None)
    assert peek_identity(b'{"uuid": "u-1", "name": "job"}', "bad_schema") == ("u-1", "job")


# -- classifying bad input: issue 7, scenario 9 -------------------------------------------
#
# Each malformed message a worker may meet gets its own machine-readable reason, decided
# before (or instead of) parsing, so dead letters can be grouped and acted on.


def _valid_body(serializer: JsonSerializer, **kwargs: object) -> bytes:
    return serializer.encode(_message(**kwargs))


def test_scenario_bad_json(serializer: JsonSerializer) -> None:
    with pytest.raises(DecodeError) as info:
        serializer.decode(b'{"uuid": "' + GOOD_UUID.encode() + b'", "name": job}')
    assert info.value.reason == "invalid_json"


def test_scenario_truncated(serializer: JsonSerializer) -> None:
    body = _valid_body(serializer, args=[1, "two"])
    with pytest.raises(DecodeError, match="truncated") as info:
        serializer.decode(body[: len(body) // 2])
    assert info.value.reason == "invalid_json"


def test_scenario_empty(serializer: JsonSerializer) -> None:
    with pytest.raises(DecodeError) as info:
        serializer.decode(b"")
    assert info.value.reason == "empty"


def test_scenario_wrong_schema_version(serializer: JsonSerializer) -> None:
    body = b'{"uuid": "' + GOOD_UUID.encode() + b'", "name": "job", "v": 2}'
    with pytest.raises(DecodeError, match="v=2") as info:
        serializer.decode(body)
    assert info.value.reason == "unsupported_version"


def test_a_later_version_with_another_shape_is_still_a_version_problem(
    serializer: JsonSerializer,
) -> None:
    # A v2 message need not fit v1's fields; what to tell the operator is "upgrade".
    body = b'{"id": 1, "task": {"name": "job"}, "v": 2}'
    with pytest.raises(DecodeError) as info:
        serializer.decode(body)
    assert info.value.reason == "unsupported_version"


def test_scenario_not_utf8(serializer: JsonSerializer) -> None:
    body = b'{"uuid": "' + GOOD_UUID.encode() + b'", "name": "caf\xe9"}'  # Latin-1 é
    with pytest.raises(DecodeError) as info:
        serializer.decode(body)
    assert info.value.reason == "not_utf8"


def test_scenario_100_deep_nesting_is_refused(serializer: JsonSerializer) -> None:
    deep = b"[" * 100 + b"]" * 100
    body = b'{"uuid": "' + GOOD_UUID.encode() + b'", "name": "job", "args": [' + deep + b"]}"
    with pytest.raises(DecodeError, match="deeper than 64") as info:
        serializer.decode(body)
    assert info.value.reason == "too_deep"
    with pytest.raises(DecodeError) as bare:
        serializer.decode(deep)  # deep and not even an object: depth is what is reported
    assert bare.value.reason == "too_deep"


def test_nesting_far_past_the_stack_is_too_deep_not_a_crash(serializer: JsonSerializer) -> None:
    body = b'{"args": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    with pytest.raises(DecodeError) as info:
        serializer.decode(body)
    assert info.value.reason == "too_deep"


def test_nesting_up_to_the_limit_and_brackets_in_strings_are_fine() -> None:
    serializer = JsonSerializer(max_depth=10)
    nested: object = "x"
    for _ in range(8):  # + the args list + the message object = 10 levels
        nested = [nested]
    body = _valid_body(serializer, args=[nested])
    assert serializer.decode(body).args == [nested]
    with pytest.raises(DecodeError) as info:
        serializer.decode(_valid_body(serializer, args=[[nested]]))
    assert info.value.reason == "too_deep"
    # Brackets inside strings (escaped quotes too) are text, not nesting.
    text = 'say "[[[[' + "[" * 50 + '"'
    assert serializer.decode(_valid_body(serializer, args=[text, "{" * 50])).args[0] == text


def test_many_shallow_containers_are_not_too_deep(serializer: JsonSerializer) -> None:
    rows = [{"id": i, "tags": ["a", "b"], "nested": {"k": [i]}} for i in range(5_000)]
    assert serializer.decode(_valid_body(serializer, args=[rows])).args == [rows]


@pytest.mark.parametrize("protocol", [0, 1, 2, pickle.HIGHEST_PROTOCOL])
def test_scenario_a_pickle_is_refused_unread(serializer: JsonSerializer, protocol: int) -> None:
    body = pickle.dumps({"uuid": GOOD_UUID, "name": "job", "args": [1]}, protocol=protocol)
    with pytest.raises(DecodeError, match="never unpickles") as info:
        serializer.decode(body)
    assert info.value.reason == "pickle_refused"


def test_scenario_wrong_shape_is_bad_schema(serializer: JsonSerializer) -> None:
    with pytest.raises(DecodeError, match="uuid") as info:
        serializer.decode(b'{"uuid": 12, "name": "job"}')
    assert info.value.reason == "bad_schema"


def test_the_size_limit_is_checked_before_parsing() -> None:
    serializer = JsonSerializer(max_payload_bytes=100)
    fits = _valid_body(serializer)
    assert len(fits) <= 100
    assert serializer.decode(fits).name == "job"
    big = _valid_body(serializer, args=["x" * 100])
    with pytest.raises(DecodeError, match="max_payload_bytes=100") as info:
        serializer.decode(big)
    assert info.value.reason == "payload_too_large"
    with pytest.raises(DecodeError) as junk:
        serializer.decode(b"\x80" + b"\xff" * 200)  # refused for size before any look inside
    assert junk.value.reason == "payload_too_large"
    assert JsonSerializer(max_payload_bytes=None).decode(big).args == ["x" * 100]


def test_a_signed_message_without_keys_is_a_signature_problem(serializer: JsonSerializer) -> None:
    signed = SigningSerializer(JsonSerializer(), ["k" * 32]).encode(_message())
    with pytest.raises(DecodeError, match="no signing keys") as info:
        serializer.decode(signed)
    assert info.value.reason == "bad_signature"


def test_pickle_serializer_needs_an_explicit_opt_in_and_warns(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with pytest.raises(ConfigurationError, match="i_understand_the_risk=True"):
        PickleSerializer()
    with caplog.at_level(logging.WARNING, logger="qtasks.serializers"):
        chosen = PickleSerializer(i_understand_the_risk=True)
    assert any("PICKLE" in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)
    message = _message(args=[{1, 2}])  # a set: JSON cannot carry it, pickle can
    assert chosen.decode(chosen.encode(message)) == message
    with pytest.raises(DecodeError) as info:
        chosen.decode(pickle.dumps(["not a message"]))
    assert info.value.reason == "bad_schema"
