"""URL schemes → backends: built-ins, registration, entry points, redaction, env vars."""

from __future__ import annotations

from typing import Any

import pytest

import qtasks.urls as urls
from qtasks import ConfigurationError
from qtasks.asyncio import QueueTasks
from qtasks.brokers.memory import MemoryBroker
from qtasks.config import (
    BROKER_URL_ENV,
    DEFAULT_SQLITE_URL,
    STORAGE_URL_ENV,
    QueueConfig,
    url_from_env,
)
from qtasks.global_configs.memory import MemoryGlobalConfig
from qtasks.storages.memory import MemoryStorage
from qtasks.urls import Backend, backend_for, redact_url, register_backend


@pytest.fixture(autouse=True)
def isolated_registry(monkeypatch: pytest.MonkeyPatch) -> dict[str, Backend]:
    """Registrations and entry points made by a test do not leak into others."""
    registry: dict[str, Backend] = {}
    monkeypatch.setattr(urls, "_registered", registry)
    monkeypatch.setattr(urls, "_entry_points_loaded", False)
    monkeypatch.setattr(urls, "entry_points", lambda group: [])
    return registry


class FakeEntryPoint:
    def __init__(self, name: str, obj: Any) -> None:
        self.name = name
        self.obj = obj
        self.loads = 0

    def load(self) -> Any:
        self.loads += 1
        return self.obj


def _memory_backend() -> Backend:
    return Backend(
        broker=lambda url, ns, cfg: MemoryBroker(),
        storage=lambda url, ns, cfg: MemoryStorage(),
        global_config=lambda url, ns, cfg: MemoryGlobalConfig(),
    )


# -- built-in schemes ----------------------------------------------------------------------


@pytest.mark.parametrize("scheme", ["memory", "sqlite", "redis", "rediss", "unix"])
def test_builtin_schemes_resolve(scheme: str) -> None:
    backend = backend_for(f"{scheme}://somewhere")
    assert backend.broker is not None
    assert backend.storage is not None
    assert backend.global_config is not None


def test_scheme_is_case_insensitive() -> None:
    assert backend_for("MEMORY://") is backend_for("memory://")


def test_unknown_scheme_lists_the_known_ones() -> None:
    with pytest.raises(ConfigurationError) as info:
        backend_for("nats://localhost:4222")
    message = str(info.value)
    assert "'nats'" in message
    for known in ("memory", "redis", "sqlite"):
        assert known in message
    assert urls.ENTRY_POINT_GROUP in message


def test_url_without_scheme_is_a_clear_error() -> None:
    with pytest.raises(ConfigurationError, match="has no scheme"):
        backend_for("just-a-path")


def test_app_with_unknown_scheme_fails_at_construction() -> None:
    with pytest.raises(ConfigurationError, match="known schemes"):
        QueueTasks(broker_url="nats://localhost")


def test_missing_optional_backend_names_the_extra(isolated_registry) -> None:
    register_backend(
        "fancy", Backend(broker=urls._lazy("qtasks_no_such_module:FancyBroker", "fancy"))
    )
    with pytest.raises(ConfigurationError, match=r"pip install 'qtasks\[fancy\]'"):
        QueueTasks(broker_url="fancy://host")


def test_backend_without_a_part_asks_for_it() -> None:
    register_backend("brokeronly", Backend(broker=lambda url, ns, cfg: MemoryBroker()))
    with pytest.raises(ConfigurationError, match="provides no storage"):
        QueueTasks(broker_url="brokeronly://x")
    app = QueueTasks(
        broker_url="brokeronly://x",
        storage=MemoryStorage(),
        global_config=MemoryGlobalConfig(),
    )
    assert isinstance(app.broker, MemoryBroker)


# -- registration --------------------------------------------------------------------------


def test_register_backend_adds_a_scheme() -> None:
    seen: list[tuple[str, str, QueueConfig]] = []

    def broker(url: str, namespace: str, config: QueueConfig) -> MemoryBroker:
        seen.append((url, namespace, config))
        return MemoryBroker()

    backend = Backend(
        broker=broker,
        storage=lambda url, ns, cfg: MemoryStorage(),
        global_config=lambda url, ns, cfg: MemoryGlobalConfig(),
    )
    register_backend("Custom", backend)
    assert backend_for("custom://x") is backend
    app = QueueTasks("myapp", broker_url="custom://host/1")
    assert isinstance(app.broker, MemoryBroker)
    assert seen == [("custom://host/1", "myapp", app.config)]


def test_register_backend_overrides_a_builtin() -> None:
    backend = _memory_backend()
    register_backend("redis", backend)
    assert backend_for("redis://localhost") is backend


# -- entry points --------------------------------------------------------------------------


def test_entry_point_backends_are_loaded(monkeypatch: pytest.MonkeyPatch) -> None:
    backend = _memory_backend()
    ep = FakeEntryPoint("plugged", backend)
    groups: list[str] = []

    def fake_entry_points(group: str) -> list[FakeEntryPoint]:
        groups.append(group)
        return [ep]

    monkeypatch.setattr(urls, "entry_points", fake_entry_points)
    assert backend_for("plugged://x") is backend
    assert backend_for("plugged://y") is backend
    assert groups == ["qtasks.backends"]
    assert ep.loads == 1  # loaded once


def test_entry_point_may_be_a_factory(monkeypatch: pytest.MonkeyPatch) -> None:
    backend = _memory_backend()
    monkeypatch.setattr(
        urls, "entry_points", lambda group: [FakeEntryPoint("made", lambda: backend)]
    )
    assert backend_for("made://x") is backend
    app = QueueTasks(broker_url="made://x")
    assert isinstance(app.storage, MemoryStorage)


def test_entry_point_giving_no_backend_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(urls, "entry_points", lambda group: [FakeEntryPoint("bad", lambda: 42)])
    with pytest.raises(ConfigurationError, match="not a Backend"):
        backend_for("bad://x")


def test_entry_point_does_not_override_an_explicit_registration(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    explicit = _memory_backend()
    register_backend("both", explicit)
    monkeypatch.setattr(
        urls, "entry_points", lambda group: [FakeEntryPoint("both", _memory_backend())]
    )
    assert backend_for("both://x") is explicit
    urls._load_entry_points()
    assert backend_for("both://x") is explicit


def test_unknown_scheme_lists_entry_point_schemes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(
        urls, "entry_points", lambda group: [FakeEntryPoint("plugged", _memory_backend())]
    )
    with pytest.raises(ConfigurationError, match="plugged"):
        backend_for("nope://x")


# -- redaction -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("redis://user:s3cret@host:6379/0", "redis://user:***@host:6379/0"),
        ("redis://:s3cret@host:6379/0", "redis://:***@host:6379/0"),
        ("amqp://guest:p%40ss@rabbit/vhost", "amqp://guest:***@rabbit/vhost"),
        ("redis://user:pa@ss@host/0", "redis://user:***@host/0"),
        ("redis://host:6379/0", "redis://host:6379/0"),
        ("redis://user@host/0", "redis://user@host/0"),
        ("sqlite:///qtasks.sqlite3", "sqlite:///qtasks.sqlite3"),
        ("memory://", "memory://"),
    ],
)
def test_redact_url_hides_passwords(url: str, expected: str) -> None:
    assert redact_url(url) == expected


def test_secret_never_appears_in_errors() -> None:
    register_backend("brokeronly", Backend(broker=lambda url, ns, cfg: MemoryBroker()))
    with pytest.raises(ConfigurationError) as info:
        QueueTasks(broker_url="brokeronly://admin:topsecret@host")
    assert "topsecret" not in str(info.value)
    assert "admin:***@host" in str(info.value)


# -- environment ---------------------------------------------------------------------------


def test_broker_url_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(BROKER_URL_ENV, "memory://")
    app = QueueTasks()
    assert app.broker_url == "memory://"
    assert isinstance(app.broker, MemoryBroker)
    assert isinstance(app.storage, MemoryStorage)
    assert isinstance(app.global_config, MemoryGlobalConfig)


def test_explicit_url_beats_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(BROKER_URL_ENV, "nats://not-used")
    app = QueueTasks(broker_url="memory://")
    assert isinstance(app.broker, MemoryBroker)


def test_storage_url_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    register_backend("custom", _memory_backend())
    monkeypatch.setenv(STORAGE_URL_ENV, "custom://store")
    app = QueueTasks(broker_url="memory://")
    assert app.storage_url == "custom://store"
    assert isinstance(app.storage, MemoryStorage)


def test_url_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(BROKER_URL_ENV, raising=False)
    assert url_from_env(None, BROKER_URL_ENV) is None
    assert url_from_env("memory://", BROKER_URL_ENV) == "memory://"
    monkeypatch.setenv(BROKER_URL_ENV, "   ")
    assert url_from_env(None, BROKER_URL_ENV) is None  # blank means unset
    monkeypatch.setenv(BROKER_URL_ENV, " memory:// ")
    assert url_from_env(None, BROKER_URL_ENV) == "memory://"
    assert url_from_env("redis://x", BROKER_URL_ENV) == "redis://x"


def test_default_is_the_embedded_sqlite_file(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(BROKER_URL_ENV, raising=False)
    monkeypatch.delenv(STORAGE_URL_ENV, raising=False)
    assert DEFAULT_SQLITE_URL.startswith("sqlite://")
    # the default URL is chosen without building a SQLite file here: the scheme is swapped
    register_backend("sqlite", _memory_backend())
    app = QueueTasks()
    assert app.broker_url == DEFAULT_SQLITE_URL
    assert isinstance(app.broker, MemoryBroker)


def test_broker_instance_needs_no_url(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(BROKER_URL_ENV, raising=False)
    monkeypatch.delenv(STORAGE_URL_ENV, raising=False)
    with pytest.raises(ConfigurationError, match="storage"):
        QueueTasks(broker=MemoryBroker())
    app = QueueTasks(
        broker=MemoryBroker(), storage=MemoryStorage(), global_config=MemoryGlobalConfig()
    )
    assert app.broker_url is None
