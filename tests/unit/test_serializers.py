"""Encoding task messages: JSON and msgpack round trips, clear errors, never code execution."""

from __future__ import annotations

import base64
import dataclasses
import logging
import pickle
import uuid as uuid_module
from collections.abc import Awaitable, Callable
from datetime import datetime, timezone
from typing import Any

import msgspec
import pytest

from qtasks import (
    AsyncQueueTasks,
    ConfigurationError,
    DecodeError,
    EncodeError,
    TaskMessage,
    TaskStatusEnum,
)
from qtasks.message import MESSAGE_FORMAT_VERSION
from qtasks.serializers import (
    JsonSerializer,
    MsgpackSerializer,
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


# -- msgpack: a peer of JSON, checked the same way ---------------------------------------


@pytest.fixture
def packer() -> MsgpackSerializer:
    return MsgpackSerializer()


def _packed(**fields: object) -> bytes:
    """A msgpack map as another producer might write it (no TaskMessage checks)."""
    return msgspec.msgpack.encode(fields)


def test_msgpack_round_trip_keeps_every_field(packer: MsgpackSerializer) -> None:
    message = _message(
        args=[1, "two", 3.5, None, True, [1, 2], {"k": "v"}, b"\x00\xff raw"],
        kwargs={"x": {"nested": [1, {"deep": None}]}, "unicode": "héllo ✓", "blob": b"\x80"},
        priority=-3,
        queue="emails",
        eta=1234.5,
        attempt=2,
        created_at=1000.25,
        headers={"trace-id": "abc"},
    )
    body = packer.encode(message)
    assert isinstance(body, bytes)
    decoded = packer.decode(body)
    assert decoded == message
    assert type(decoded.args[7]) is bytes  # native, not base64 text as with JSON
    assert packer.content_type == "application/msgpack"
    assert isinstance(packer, Serializer)
    assert len(body) < len(JsonSerializer().encode(message))
    assert decoded.v == MESSAGE_FORMAT_VERSION


def test_msgpack_rich_values_encode_like_json_except_bytes_and_aware_datetimes(
    packer: MsgpackSerializer,
) -> None:
    @dataclasses.dataclass
    class Point:
        x: int
        y: int

    when = datetime(2024, 1, 2, 3, 4, 5, tzinfo=timezone.utc)
    ident = uuid_module.uuid4()
    decoded = packer.decode(packer.encode(_message(args=[when, ident, Point(1, 2), {3, 4}])))
    assert decoded.args == [when, str(ident), {"x": 1, "y": 2}, [3, 4]]


@pytest.mark.parametrize("value", [object(), lambda: 1, {1, object()}, {"k": Exception()}])
def test_msgpack_unencodable_values_raise_encode_error(
    packer: MsgpackSerializer, value: object
) -> None:
    with pytest.raises(EncodeError, match="cannot be encoded as msgpack") as info:
        packer.encode(_message(args=[value]))
    assert "'job'" in str(info.value)


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"", "empty"),
        (b"\xc1", "invalid_msgpack"),  # an opcode msgpack never uses
        (b"garbage", "invalid_msgpack"),  # the int 103, then trailing bytes
        (b"\x80", "bad_schema"),  # an empty map: no uuid
        (msgspec.msgpack.encode([1, 2, 3]), "bad_schema"),
        (_packed(name="job"), "bad_schema"),
        (_packed(uuid="not-a-uuid", name="job"), "bad_schema"),
        (_packed(uuid=GOOD_UUID, name="job", args="x"), "bad_schema"),
        (_packed(uuid=GOOD_UUID, name=5), "bad_schema"),
        (_packed(uuid=GOOD_UUID, name="job", args=[msgspec.msgpack.Ext(5, b"x")]), "bad_schema"),
        (_packed(uuid=GOOD_UUID, name="job", v=2), "unsupported_version"),
        (_packed(id=1, task={"name": "job"}, v=2), "unsupported_version"),
        (b"\x82\xa4uuid\xa4abcd\xa4name\xa4caf\xe9", "not_utf8"),  # Latin-1 é in a str
    ],
)
def test_msgpack_bad_bytes_raise_decode_error_with_a_reason(
    packer: MsgpackSerializer, body: bytes, reason: str
) -> None:
    with pytest.raises(DecodeError) as info:
        packer.decode(body)
    assert info.value.reason == reason
    assert str(info.value).startswith(f"{reason}: ")


def test_msgpack_truncated(packer: MsgpackSerializer) -> None:
    body = packer.encode(_message(args=[1, "two", b"three"]))
    with pytest.raises(DecodeError, match="truncated") as info:
        packer.decode(body[: len(body) // 2])
    assert info.value.reason == "invalid_msgpack"


def test_msgpack_unknown_fields_are_ignored(packer: MsgpackSerializer) -> None:
    message = _message(args=[1])
    raw = msgspec.msgpack.decode(packer.encode(message))
    raw["added_in_a_later_version"] = {"x": 1}
    assert packer.decode(msgspec.msgpack.encode(raw)) == message


def test_msgpack_nesting_is_bounded_like_json() -> None:
    packer = MsgpackSerializer(max_depth=10)
    nested: object = "x"
    for _ in range(8):  # + the args list + the message map = 10 levels
        nested = [nested]
    assert packer.decode(packer.encode(_message(args=[nested]))).args == [nested]
    key: object = 1
    for _ in range(8):  # msgpack array keys decode to tuples: they nest too
        key = (key,)
    for deeper in ([[nested]], [{"k": [nested]}], [{key: 1}]):
        with pytest.raises(DecodeError, match="deeper than 10") as info:
            packer.decode(packer.encode(_message(args=deeper)))
        assert info.value.reason == "too_deep"
    deep = b"\x91" * 100 + b"\x01"  # 100 one-element arrays
    body = b"\x83\xa4uuid\xd9$" + GOOD_UUID.encode() + b"\xa4name\xa3job\xa4args\x91" + deep
    with pytest.raises(DecodeError, match="deeper than 64") as bare:
        MsgpackSerializer().decode(body)
    assert bare.value.reason == "too_deep"


def test_msgpack_nesting_far_past_the_stack_is_too_deep_not_a_crash(
    packer: MsgpackSerializer,
) -> None:
    body = b"\x81\xa4args" + b"\x91" * 100_000 + b"\x01"
    with pytest.raises(DecodeError) as info:
        packer.decode(body)
    assert info.value.reason == "too_deep"


def test_msgpack_many_shallow_containers_and_container_bytes_in_data_are_fine(
    packer: MsgpackSerializer,
) -> None:
    rows = [{"id": i, "tags": ["a", "b"], "nested": {"k": [i]}} for i in range(5_000)]
    blob = bytes(range(0x80, 0xA0)) * 100  # bytes that are container headers elsewhere
    assert packer.decode(packer.encode(_message(args=[rows, blob]))).args == [rows, blob]


@pytest.mark.parametrize("protocol", [0, 1, 2, pickle.HIGHEST_PROTOCOL])
def test_msgpack_refuses_a_pickle_unread(packer: MsgpackSerializer, protocol: int) -> None:
    body = pickle.dumps({"uuid": GOOD_UUID, "name": "job", "args": [1]}, protocol=protocol)
    with pytest.raises(DecodeError, match="never unpickles") as info:
        packer.decode(body)
    assert info.value.reason == "pickle_refused"


def test_msgpack_size_limit_is_checked_before_parsing() -> None:
    packer = MsgpackSerializer(max_payload_bytes=100)
    fits = packer.encode(_message())
    assert packer.decode(fits).name == "job"
    big = packer.encode(_message(args=[b"x" * 100]))
    with pytest.raises(DecodeError, match="max_payload_bytes=100") as info:
        packer.decode(big)
    assert info.value.reason == "payload_too_large"
    with pytest.raises(DecodeError) as junk:
        packer.decode(b"\x80" + b"\xff" * 200)  # refused for size before any look inside
    assert junk.value.reason == "payload_too_large"
    assert MsgpackSerializer(max_payload_bytes=None).decode(big).args == [b"x" * 100]


def test_msgpack_under_signing(packer: MsgpackSerializer) -> None:
    key = "k" * 32
    signing = SigningSerializer(MsgpackSerializer(), [key], max_payload_bytes=500)
    assert signing.content_type == "application/msgpack"
    message = _message(args=[b"\x00\x01"])
    body = signing.encode(message)
    assert signing.decode(body) == message
    tampered = bytearray(body)
    tampered[-2] ^= 1
    with pytest.raises(DecodeError) as forged:
        signing.decode(bytes(tampered))
    assert forged.value.reason == "bad_signature"
    with pytest.raises(DecodeError) as unsigned:
        signing.decode(packer.encode(message))
    assert unsigned.value.reason == "bad_signature"
    with pytest.raises(DecodeError, match="no signing keys") as keyless:
        packer.decode(body)
    assert keyless.value.reason == "bad_signature"
    with pytest.raises(DecodeError) as big:
        signing.decode(signing.encode(_message(args=[b"x" * 600])))
    assert big.value.reason == "payload_too_large"


@pytest.mark.parametrize("cut", [None, 30])
def test_a_msgpack_message_on_a_json_app_is_a_wrong_serializer(
    serializer: JsonSerializer, packer: MsgpackSerializer, cut: int | None
) -> None:
    body = packer.encode(_message(args=[1, b"x"]))[:cut]
    with pytest.raises(DecodeError, match=r"msgpack.*MsgpackSerializer") as info:
        serializer.decode(body)
    assert info.value.reason == "wrong_serializer"


@pytest.mark.parametrize("cut", [None, 30])
def test_a_json_message_on_a_msgpack_app_is_a_wrong_serializer(
    serializer: JsonSerializer, packer: MsgpackSerializer, cut: int | None
) -> None:
    body = serializer.encode(_message(args=[1, "x"]))[:cut]
    with pytest.raises(DecodeError, match=r"JSON.*JsonSerializer") as info:
        packer.decode(body)
    assert info.value.reason == "wrong_serializer"
    with pytest.raises(DecodeError) as other:
        packer.decode(b"{not json at all}")  # starts like JSON, is neither
    assert other.value.reason == "invalid_msgpack"


def test_signed_cross_format_is_still_a_wrong_serializer() -> None:
    key = "k" * 32
    body = SigningSerializer(MsgpackSerializer(), [key]).encode(_message())
    with pytest.raises(DecodeError) as info:
        SigningSerializer(JsonSerializer(), [key]).decode(body)
    assert info.value.reason == "wrong_serializer"


def test_peek_identity_reads_msgpack_too(packer: MsgpackSerializer) -> None:
    message = _message(args=[b"x"])
    body = packer.encode(message)
    assert peek_identity(body) == (str(message.uuid), "job")
    assert peek_identity(_packed(uuid="u-1", name="job", args=5), "bad_schema") == ("u-1", "job")
    assert peek_identity(_packed(uuid=5, name=["x"])) == (None, None)
    assert peek_identity(body[:20]) == (None, None)  # cut off: nothing to trust
    assert peek_identity(b"\x81\xa4args" + b"\x91" * 100_000 + b"\x01") == (None, None)
    assert peek_identity(body, "payload_too_large") == (None, None)
    signed = SigningSerializer(packer, ["k" * 32]).encode(message)
    assert peek_identity(signed, "bad_signature") == (None, None)


async def test_a_msgpack_app_runs_bytes_arguments_end_to_end(
    make_app: Callable[..., AsyncQueueTasks], run_until_idle: Callable[..., Awaitable[Any]]
) -> None:
    app = make_app(serializer=MsgpackSerializer())
    seen: list[object] = []

    @app.task
    async def checksum(blob: bytes, label: str, *, scale: int = 1) -> bytes:
        seen.append(blob)
        return bytes([sum(blob) % 256]) * scale + label.encode()

    record = await checksum.add_task(b"\x00\x01\xfe", "ok", scale=2)
    await run_until_idle(app)

    assert seen == [b"\x00\x01\xfe"]  # bytes on the wire, bytes in the task (JSON: base64)
    done = await app.get(record.uuid)
    assert done is not None
    assert done.status is TaskStatusEnum.SUCCESS
    # Results are stored by the storage, in its own JSON encoding: bytes come back base64.
    assert done.returning == base64.b64encode(b"\xff\xffok").decode()


async def test_a_worker_dead_letters_the_other_format_with_a_clear_reason(
    make_app: Callable[..., AsyncQueueTasks],
    run_until_idle: Callable[..., Awaitable[Any]],
    publish_raw: Callable[..., Awaitable[str]],
) -> None:
    for worker_serializer, producer_serializer in (
        (MsgpackSerializer(), JsonSerializer()),
        (JsonSerializer(), MsgpackSerializer()),
    ):
        app = make_app(serializer=worker_serializer)

        @app.task
        async def job(n: int) -> int:
            return n

        foreign = _message(args=[1])
        body = producer_serializer.encode(foreign)
        await publish_raw(app, body)
        good = await job.add_task(2)
        await run_until_idle(app)

        done = await app.get(good.uuid)
        assert done is not None
        assert done.returning == 2
        (letter,) = await app.dead_letters()
        assert (letter.reason, letter.name, letter.body) == ("wrong_serializer", "job", body)
        assert letter.uuid == str(foreign.uuid)  # peek_identity named it in either format
        record = await app.get(foreign.uuid)
        assert record is not None
        assert record.status is TaskStatusEnum.ERROR
        assert "give producers and workers the same serializer" in (record.error_message or "")


def test_the_app_takes_a_serializer_by_name() -> None:
    from qtasks import QueueConfig
    from qtasks import QueueTasks as SyncQueueTasks
    from qtasks.asyncio import QueueTasks
    from qtasks.errors import ConfigurationError
    from qtasks.serializers import JsonSerializer, SigningSerializer

    packed = QueueTasks(broker_url="memory://", serializer="msgpack")
    assert isinstance(packed.serializer, MsgpackSerializer)
    assert isinstance(
        QueueTasks(broker_url="memory://", serializer="JSON").serializer, JsonSerializer
    )
    limited = QueueTasks(
        broker_url="memory://",
        serializer="msgpack",
        config=QueueConfig(max_payload_bytes=2048, signing_keys=["s" * 32]),
    )
    assert isinstance(limited.serializer, SigningSerializer)
    assert isinstance(limited.serializer.inner, MsgpackSerializer)
    assert limited.serializer.inner.max_payload_bytes == 2048
    sync_app = SyncQueueTasks(broker_url="memory://", serializer="msgpack")
    try:
        assert isinstance(sync_app.core.serializer, MsgpackSerializer)
    finally:
        sync_app.close()
    with pytest.raises(ConfigurationError, match="unknown serializer 'yaml': use 'json' or"):
        QueueTasks(broker_url="memory://", serializer="yaml")
    with pytest.raises(ConfigurationError, match="unknown serializer 'pickle'"):
        QueueTasks(broker_url="memory://", serializer="pickle")
