"""Secure by default (issue 7): payload limits, HMAC signing, no pickle, redacted secrets.

Each guarantee is checked where a user would meet it: the producer API, a worker on the
memory broker, the CLI run in process, the dashboard's JSON, reprs and log lines.
"""

from __future__ import annotations

import logging
import pickle
import random
import sys
import textwrap
import traceback
import uuid as uuid_module
import warnings
from collections.abc import Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

import qtasks
from qtasks import (
    ConfigurationError,
    DecodeError,
    EncodeError,
    PayloadTooLarge,
    QTasksError,
    QueueConfig,
    TaskMessage,
    TaskStatusEnum,
)
from qtasks.asyncio import QueueTasks
from qtasks.brokers.memory import MemoryBroker
from qtasks.config import DEFAULT_MAX_PAYLOAD_BYTES, SIGNING_KEYS_ENV
from qtasks.global_configs.memory import MemoryGlobalConfig
from qtasks.interfaces import Storage
from qtasks.message import Envelope, Task, new_uuid
from qtasks.serializers import JsonSerializer, SigningSerializer
from qtasks.signing import SIGNATURE_PREFIX, Signer
from qtasks.storages.memory import MemoryStorage
from qtasks.urls import redact_url

KEY_OLD = "old-key-0123456789abcdef"
KEY_NEW = "new-key-fedcba9876543210"

PublishRaw = Callable[..., Awaitable[str]]
RunUntilIdle = Callable[..., Awaitable[Any]]


def _message(**kwargs: Any) -> TaskMessage:
    return TaskMessage(uuid=new_uuid(), name="job", **kwargs)


# -- payload limit: at the producer before any I/O, at the consumer before decoding -------


class NoIOBroker(MemoryBroker):
    """Fails the test on any I/O: a producer that checks first never gets here."""

    async def start(self) -> None:
        pytest.fail("the broker was started: the size check came after I/O")

    async def publish(self, envelopes: Sequence[Envelope]) -> None:
        pytest.fail("publish was called for a message over the limit")

    async def enqueue(
        self, storage: Storage, tasks: Sequence[Task], envelopes: Sequence[Envelope]
    ) -> None:
        pytest.fail("enqueue was called for a message over the limit")


class NoIOStorage(MemoryStorage):
    async def start(self) -> None:
        pytest.fail("the storage was started: the size check came after I/O")

    async def add(self, tasks: Sequence[Task]) -> None:
        pytest.fail("a record was written for a message over the limit")


def _no_io_app(limit: int | None = 1_000) -> QueueTasks:
    app = QueueTasks(
        "limits",
        broker=NoIOBroker(),
        storage=NoIOStorage(),
        global_config=MemoryGlobalConfig(),
        config=QueueConfig(max_payload_bytes=limit),
    )

    @app.task
    def store(blob: str) -> int:
        return len(blob)

    return app


def test_the_default_limit_is_one_mebibyte() -> None:
    assert QueueConfig().max_payload_bytes == DEFAULT_MAX_PAYLOAD_BYTES == 1_048_576
    app = QueueTasks(broker_url="memory://")
    serializer = app.serializer
    assert isinstance(serializer, JsonSerializer)
    assert serializer.max_payload_bytes == 1_048_576


async def test_add_task_raises_payload_too_large_before_any_io() -> None:
    app = _no_io_app()
    with pytest.raises(PayloadTooLarge) as info:
        await app.add_task("store", "x" * 2_000)
    error = info.value
    assert (error.name, error.limit) == ("store", 1_000)
    assert error.size > 2_000
    assert "max_payload_bytes=1,000" in str(error)
    assert "nothing was enqueued" in str(error)
    assert isinstance(error, EncodeError)  # "cannot go on the wire; nothing written"


async def test_add_tasks_checks_every_message_before_writing_any() -> None:
    app = _no_io_app()
    calls = [("store", ["small"]), ("store", ["x" * 2_000]), ("store", ["small"])]
    with pytest.raises(PayloadTooLarge, match="'store'"):
        await app.add_tasks(calls)


def test_the_sync_app_raises_it_too() -> None:
    app = qtasks.QueueTasks(
        "limits",
        broker=NoIOBroker(),
        storage=NoIOStorage(),
        global_config=MemoryGlobalConfig(),
        config=QueueConfig(max_payload_bytes=1_000),
    )

    @app.task
    def store(blob: str) -> int:
        return len(blob)

    try:
        with pytest.raises(PayloadTooLarge):
            store.add_task("x" * 2_000)
    finally:
        app.close()


async def test_the_default_limit_refuses_two_megabytes() -> None:
    app = QueueTasks(
        "limits", broker=NoIOBroker(), storage=NoIOStorage(), global_config=MemoryGlobalConfig()
    )
    with pytest.raises(PayloadTooLarge, match="1,048,576"):
        await app.add_task("anything", "x" * 2_000_000)


TEN_MB = 10 * 1024 * 1024


@pytest.mark.parametrize("backend", ["memory", "sqlite"])
async def test_ten_megabytes_round_trip_when_the_limit_allows(
    backend: str, tmp_path: Path, running_worker: Any
) -> None:
    url = "memory://" if backend == "memory" else f"sqlite:///{tmp_path / 'big.db'}"
    app = QueueTasks("big", broker_url=url, config=QueueConfig(max_payload_bytes=16 * 1024**2))

    @app.task
    def measure(blob: str) -> list[int]:
        return [len(blob), blob.count("y")]

    blob = "x" * (TEN_MB - 1) + "y"
    try:
        async with running_worker(app):
            record = await app.add_task("measure", blob, timeout=60)
        assert record is not None
        assert record.status is TaskStatusEnum.SUCCESS, record.error_message
        assert record.returning == [TEN_MB, 1]
    finally:
        await app.stop()


class SpyDecoder:
    """Stands in for msgspec's decoder and records every body it is asked to parse."""

    def __init__(self, real: Any) -> None:
        self.real = real
        self.bodies: list[bytes] = []

    def decode(self, body: bytes) -> Any:
        self.bodies.append(body)
        return self.real.decode(body)


async def test_a_raw_oversize_message_is_dead_lettered_undecoded(
    make_app: Callable[..., QueueTasks],
    run_until_idle: RunUntilIdle,
    publish_raw: PublishRaw,
) -> None:
    app = make_app(config=QueueConfig(max_payload_bytes=10_000))

    @app.task
    async def ok() -> str:
        return "ok"

    serializer = app.serializer
    assert isinstance(serializer, JsonSerializer)
    spy = SpyDecoder(serializer._decoder)
    serializer._decoder = spy  # type: ignore[assignment]
    big = JsonSerializer(max_payload_bytes=None).encode(_message(args=["x" * 20_000]))
    await publish_raw(app, big)
    good = await ok.add_task()
    await run_until_idle(app)

    assert (await app.get(good.uuid)).returning == "ok"
    (letter,) = await app.dead_letters()
    assert letter.reason == "payload_too_large"
    assert letter.body == big
    assert big not in spy.bodies, "the oversize body was parsed"
    assert len(spy.bodies) == 1  # the good task's


async def test_undecoded_or_untrusted_bodies_do_not_name_the_dead_letter(
    make_app: Callable[..., QueueTasks],
    run_until_idle: RunUntilIdle,
    publish_raw: PublishRaw,
) -> None:
    app = make_app(config=QueueConfig(max_payload_bytes=10_000, signing_keys=[KEY_NEW]))
    oversize = _message(args=["x" * 20_000])
    unsigned = _message()
    await publish_raw(app, JsonSerializer(max_payload_bytes=None).encode(oversize))
    await publish_raw(app, JsonSerializer().encode(unsigned))
    await run_until_idle(app)
    letters = await app.dead_letters()
    assert len(letters) == 2
    # Not parsed for its name (oversize), not trusted to choose a record (unsigned).
    assert all(letter.name is None for letter in letters)
    assert {letter.uuid for letter in letters}.isdisjoint({str(oversize.uuid), str(unsigned.uuid)})


# -- signing -------------------------------------------------------------------------------


class CountingSerializer(JsonSerializer):
    """Counts how often the inner decode runs: a rejected signature must never reach it."""

    def __init__(self) -> None:
        super().__init__()
        self.decoded = 0

    def decode(self, body: bytes) -> TaskMessage:
        self.decoded += 1
        return super().decode(body)


def test_keys_sign_every_message_and_verify_it() -> None:
    inner = CountingSerializer()
    serializer = SigningSerializer(inner, [KEY_NEW])
    message = _message(args=[1, "two"])
    body = serializer.encode(message)
    assert body.startswith(SIGNATURE_PREFIX)
    assert serializer.decode(body) == message
    assert inner.decoded == 1


def test_100_of_100_tampered_messages_are_rejected_before_decoding() -> None:
    inner = CountingSerializer()
    serializer = SigningSerializer(inner, [KEY_NEW])
    rng = random.Random(7)
    rejected = 0
    for i in range(100):
        body = bytearray(serializer.encode(_message(args=[i, "payload"], priority=i % 5)))
        position = rng.randrange(len(body))  # header or payload: every byte is covered
        body[position] ^= rng.randrange(1, 256)
        with pytest.raises(DecodeError) as info:
            serializer.decode(bytes(body))
        assert info.value.reason == "bad_signature"
        rejected += 1
    assert rejected == 100
    assert inner.decoded == 0, "a tampered message reached the JSON decoder"


def test_unsigned_and_foreign_signed_messages_are_rejected_before_decoding() -> None:
    inner = CountingSerializer()
    serializer = SigningSerializer(inner, [KEY_NEW])
    unsigned = JsonSerializer().encode(_message())
    forged = Signer(["attacker-key-0123456789"]).sign(unsigned)
    for body, why in ((unsigned, "not signed"), (forged, "matches none")):
        with pytest.raises(DecodeError, match=why) as info:
            serializer.decode(body)
        assert info.value.reason == "bad_signature"
    with pytest.raises(DecodeError) as truncated:
        serializer.decode(SIGNATURE_PREFIX + b"abc")
    assert truncated.value.reason == "bad_signature"
    assert inner.decoded == 0


def test_key_rotation_new_key_signs_old_key_still_verifies() -> None:
    before = SigningSerializer(JsonSerializer(), [KEY_OLD])  # producers before the rotation
    during = SigningSerializer(JsonSerializer(), [KEY_NEW, KEY_OLD])  # new first, old kept
    after = SigningSerializer(JsonSerializer(), [KEY_NEW])  # old key dropped
    old_message, new_message = _message(args=["old"]), _message(args=["new"])
    old_body = before.encode(old_message)
    new_body = during.encode(new_message)
    assert during.decode(old_body) == old_message  # old messages still drain
    assert after.decode(new_body) == new_message  # the new key is the one signing
    with pytest.raises(DecodeError) as info:
        before.decode(new_body)
    assert info.value.reason == "bad_signature"
    with pytest.raises(DecodeError):
        after.decode(old_body)


def test_the_app_takes_keys_from_config_or_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    configured = QueueTasks(broker_url="memory://", config=QueueConfig(signing_keys=[KEY_NEW]))
    assert isinstance(configured.serializer, SigningSerializer)

    monkeypatch.setenv(SIGNING_KEYS_ENV, f"{KEY_NEW}, {KEY_OLD}")
    from_env = QueueTasks(broker_url="memory://")
    assert isinstance(from_env.serializer, SigningSerializer)
    body = from_env.serializer.encode(_message())
    assert SigningSerializer(JsonSerializer(), [KEY_NEW]).decode(body).name == "job"

    off = QueueTasks(broker_url="memory://", config=QueueConfig(signing_keys=[]))
    assert isinstance(off.serializer, JsonSerializer), "[] turns signing off despite the env"


def test_keys_never_show_in_reprs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(SIGNING_KEYS_ENV, KEY_OLD)
    config = QueueConfig(signing_keys=[KEY_NEW])
    app = QueueTasks(broker_url="memory://", config=config)
    shown = " ".join([repr(config), str(config), repr(app), repr(app.serializer)])
    assert KEY_NEW not in shown
    assert KEY_OLD not in shown


@pytest.mark.parametrize(
    ("keys", "match"),
    [([], "at least one key"), (["short"], "at least 16"), (KEY_NEW, "a list of keys")],
)
def test_weak_or_missing_keys_are_refused(keys: Any, match: str) -> None:
    with pytest.raises(ConfigurationError, match=match) as info:
        Signer(keys)
    assert "short" not in str(info.value).replace("at least", "")  # the key is never echoed


async def test_a_worker_with_keys_runs_signed_tasks_end_to_end(
    make_app: Callable[..., QueueTasks],
    run_until_idle: RunUntilIdle,
    publish_raw: PublishRaw,
) -> None:
    app = make_app(config=QueueConfig(signing_keys=[KEY_NEW, KEY_OLD]))
    attempts: list[int] = []

    @app.task(retry=1, retry_backoff=0.0)
    async def double(n: int) -> int:
        attempts.append(n)
        if len(attempts) == 1:
            raise RuntimeError("first attempt fails: the retry is re-encoded by the worker")
        return n * 2

    record = await double.add_task(21)
    plain_message, tampered_message = _message(args=[1]), _message(args=[2])
    plain = JsonSerializer().encode(plain_message)
    tampered = bytearray(app.serializer.encode(tampered_message))
    tampered[-3] ^= 1
    await publish_raw(app, plain)
    await publish_raw(app, bytes(tampered))
    await run_until_idle(app)

    done = await app.get(record.uuid)
    assert done is not None
    assert done.status is TaskStatusEnum.SUCCESS
    assert done.returning == 42
    assert attempts == [21, 21], "the retry the worker signed was accepted"
    letters = {letter.body: letter for letter in await app.dead_letters()}
    assert set(letters) == {plain, bytes(tampered)}
    assert {letter.reason for letter in letters.values()} == {"bad_signature"}
    # A forger must not choose which task's record the error lands on.
    assert letters[bytes(tampered)].uuid != str(tampered_message.uuid)


# -- pickle: never unpickled by default ------------------------------------------------------


class _CreatesFile:
    """Unpickling this calls open(path, "w"): the file appearing means code ran."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (self.path, "w"))


def test_the_json_serializer_never_unpickles(tmp_path: Path) -> None:
    target = tmp_path / "pwned"
    for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
        body = pickle.dumps(_CreatesFile(target), protocol=protocol)
        with pytest.raises(DecodeError) as info:
            JsonSerializer().decode(body)
        assert info.value.reason == "pickle_refused"
    assert not target.exists()
    # The pickle really does create the file when unpickled (the test proves something).
    proof = tmp_path / "proof"
    pickle.loads(pickle.dumps(_CreatesFile(proof))).close()
    assert proof.exists()


async def test_a_worker_fed_a_malicious_pickle_does_not_run_it(
    make_app: Callable[..., QueueTasks],
    run_until_idle: RunUntilIdle,
    publish_raw: PublishRaw,
    tmp_path: Path,
) -> None:
    app = make_app()

    @app.task
    async def ok() -> str:
        return "ok"

    target = tmp_path / "pwned-by-worker"
    body = pickle.dumps(_CreatesFile(target))
    await publish_raw(app, body)
    good = await ok.add_task()
    await run_until_idle(app)

    assert not target.exists()
    assert (await app.get(good.uuid)).returning == "ok"
    (letter,) = await app.dead_letters()
    assert letter.reason == "pickle_refused"


# -- redaction ---------------------------------------------------------------------------------

SECRET = "s3cr3t-pw"
LEAKY_URL = f"redis://user:{SECRET}@127.0.0.1:1/0"  # nothing listens on port 1


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("redis://h/0?password=s3cr3t&db=1", "redis://h/0?password=***&db=1"),
        ("kafka://h:9092?sasl_plain_password=a%26b", "kafka://h:9092?sasl_plain_password=***"),
        ("amqps://u:pw@h/v?auth_mechanism=PLAIN", "amqps://u:***@h/v?auth_mechanism=PLAIN"),
        ("redis://u:s3cr3t@[::1/0", "redis://***@[::1/0"),  # unparseable: still hidden
        ("redis://redis:redis@redis/0", "redis://redis:***@redis/0"),
    ],
)
def test_redact_url_hides_query_secrets_and_survives_bad_urls(url: str, expected: str) -> None:
    assert redact_url(url) == expected


async def test_a_secret_in_the_redis_url_shows_nowhere(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    app = QueueTasks("leaky", broker_url=LEAKY_URL)
    shown = [repr(app), repr(app.broker), repr(app.storage), repr(app.global_config)]
    with pytest.raises(QTasksError) as info:
        await app.add_task("anything", 1)
    shown.append(str(info.value))
    shown.append("".join(traceback.format_exception(info.value)))  # causes included
    await app.stop()
    shown.append(caplog.text)
    assert all(SECRET not in text for text in shown), [t for t in shown if SECRET in t]
    assert "user:***@127.0.0.1:1" in str(info.value), "the error still says where it went"


@pytest.fixture
def leaky_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[ModuleType]:
    monkeypatch.setattr(sys, "path", [str(tmp_path), *sys.path])
    name = f"qt_security_leaky_{uuid_module.uuid4().hex[:8]}"
    source = f"""
        from qtasks.asyncio import QueueTasks

        app = QueueTasks("leaky", broker_url={LEAKY_URL!r})

        @app.task
        def add(x: int, y: int) -> int:
            return x + y
    """
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(source))
    import importlib

    module = importlib.import_module(name)
    yield module
    del sys.modules[name]


@pytest.mark.parametrize(
    "argv",
    [
        ["stats", "inspect", "app"],
        ["stats", "inspect", "app", "--json"],
        ["stats", "inspect", "workers"],
        ["stats", "inspect", "queues"],
        ["stats", "inspect", "failures", "5"],
        ["add", "add", "1", "2"],
    ],
)
def test_cli_errors_never_print_the_secret(
    leaky_module: ModuleType,
    argv: list[str],
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    from qtasks.cli.main import main

    caplog.set_level(logging.DEBUG)
    code = main(["-A", f"{leaky_module.__name__}:app", *argv])
    out, err = capsys.readouterr()
    assert code == 1, (out, err)
    assert "127.0.0.1:1" in err, "the error names the server it could not reach"
    assert SECRET not in out + err + caplog.text


def test_the_dashboard_json_shows_urls_redacted() -> None:
    pytest.importorskip("starlette")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*install `httpx2` instead")
        from starlette.testclient import TestClient

    from qtasks.web.app import create_app

    app = QueueTasks(
        "dash",
        broker_url=LEAKY_URL,
        storage_url=LEAKY_URL.replace("/0", "/1"),
        broker=MemoryBroker(),
        storage=MemoryStorage(),
        global_config=MemoryGlobalConfig(),
    )
    with TestClient(create_app(app)) as client:
        for path in ("/api/app", "/api/overview", "/"):
            response = client.get(path)
            assert response.status_code == 200, (path, response.text[:200])
            assert SECRET not in response.text, path
        assert client.get("/api/app").json()["urls"]["broker"] == redact_url(LEAKY_URL)


# -- startup warnings: the interface's default ------------------------------------------------


async def test_brokers_without_settings_to_check_warn_about_nothing() -> None:
    broker = MemoryBroker()
    await broker.start()
    try:
        assert await broker.startup_warnings() == []
    finally:
        await broker.stop()


def test_the_new_errors_survive_pickling_with_their_fields() -> None:
    too_large = pickle.loads(pickle.dumps(PayloadTooLarge("job", 2_000, 1_000)))
    assert (too_large.name, too_large.size, too_large.limit) == ("job", 2_000, 1_000)
    decode = pickle.loads(pickle.dumps(DecodeError("empty: no bytes", reason="empty")))
    assert (str(decode), decode.reason) == ("empty: no bytes", "empty")


@pytest.mark.parametrize("kind", ["json", "msgpack", "signed msgpack"])
async def test_a_serializer_passed_in_takes_the_configs_limit(
    kind: str, running_worker: Any
) -> None:
    """Producers check QueueConfig.max_payload_bytes; a serializer passed to the app kept
    its own 1 MiB default, so its worker dead-lettered the 2 MB task they had accepted."""
    from qtasks.serializers import JsonSerializer, MsgpackSerializer

    serializer = JsonSerializer() if kind == "json" else MsgpackSerializer()
    keys = ["k" * 32] if kind.startswith("signed") else []
    config = QueueConfig(max_payload_bytes=4 * 1024**2, signing_keys=keys)
    app = QueueTasks("limits", broker_url="memory://", serializer=serializer, config=config)

    @app.task
    def size(blob: str) -> int:
        return len(blob)

    try:
        async with running_worker(app):
            record = await app.add_task("size", "x" * 2_000_000, timeout=30)
        assert record is not None
        assert (record.status, record.returning) == (TaskStatusEnum.SUCCESS, 2_000_000)
        own = MsgpackSerializer(max_payload_bytes=100)
        other = QueueTasks("limits2", broker_url="memory://", serializer=own, config=config)
        assert own.max_payload_bytes == 100, "a limit given to the serializer is kept"
        await other.stop()
    finally:
        await app.stop()
