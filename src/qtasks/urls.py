"""URL schemes → backend factories, extensible by third-party packages.

A scheme maps to a `Backend`: factories for a broker, a storage and a global config, each
called as `factory(url, namespace, config)`. Packages add schemes through the
`qtasks.backends` entry-point group; the entry point's object is a `Backend` (or a
zero-argument callable returning one) and its name is the scheme.
"""

from __future__ import annotations

import dataclasses
import importlib
import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit

from qtasks.errors import ConfigurationError

if TYPE_CHECKING:
    from qtasks.config import QueueConfig
    from qtasks.interfaces import Broker, GlobalConfig, Storage

ENTRY_POINT_GROUP = "qtasks.backends"

BrokerFactory = Callable[[str, str, "QueueConfig"], "Broker"]
StorageFactory = Callable[[str, str, "QueueConfig"], "Storage"]
GlobalConfigFactory = Callable[[str, str, "QueueConfig"], "GlobalConfig"]


@dataclasses.dataclass(frozen=True)
class Backend:
    """Factories for the parts one URL scheme provides; None where it provides none."""

    broker: BrokerFactory | None = None
    storage: StorageFactory | None = None
    global_config: GlobalConfigFactory | None = None
    install_hint: str | None = None


def _lazy(path: str, extra: str | None = None) -> Callable[[str, str, QueueConfig], Any]:
    """A factory that imports `module:Class` on first use, with an install hint if missing."""
    module_name, _, attr = path.partition(":")

    def factory(url: str, namespace: str, config: QueueConfig) -> Any:
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            hint = f"; install it with: pip install 'qtasks[{extra}]'" if extra else ""
            raise ConfigurationError(
                f"the backend for {urlsplit(url).scheme}:// needs {exc.name!r}{hint}"
            ) from exc
        cls = getattr(module, attr)
        return cls.from_url(url, namespace=namespace, config=config)

    return factory


_BUILTIN: dict[str, Backend] = {
    "memory": Backend(
        broker=_lazy("qtasks.brokers.memory:MemoryBroker"),
        storage=_lazy("qtasks.storages.memory:MemoryStorage"),
        global_config=_lazy("qtasks.global_configs.memory:MemoryGlobalConfig"),
    ),
    "sqlite": Backend(
        broker=_lazy("qtasks.brokers.sqlite:SqliteBroker"),
        storage=_lazy("qtasks.storages.sqlite:SqliteStorage"),
        global_config=_lazy("qtasks.global_configs.sqlite:SqliteGlobalConfig"),
    ),
}
for _scheme in ("redis", "rediss", "unix"):
    _BUILTIN[_scheme] = Backend(
        broker=_lazy("qtasks.brokers.redis:RedisBroker", "redis"),
        storage=_lazy("qtasks.storages.redis:RedisStorage", "redis"),
        global_config=_lazy("qtasks.global_configs.redis:RedisGlobalConfig", "redis"),
    )
# Brokers only: RabbitMQ and Kafka keep no results, the app pairs them with storage_url.
for _scheme in ("amqp", "amqps"):
    _BUILTIN[_scheme] = Backend(broker=_lazy("qtasks.brokers.rabbitmq:RabbitMQBroker", "rabbitmq"))
_BUILTIN["kafka"] = Backend(broker=_lazy("qtasks.brokers.kafka:KafkaBroker", "kafka"))

_registered: dict[str, Backend] = {}
_entry_points_loaded = False


def register_backend(scheme: str, backend: Backend) -> None:
    """Make `scheme://` URLs resolve to `backend` (overrides a built-in one)."""
    _registered[scheme.lower()] = backend


def entry_points(group: str) -> Any:
    """The installed entry points of `group`.

    importlib.metadata is imported only here: with the email package it pulls in, it
    costs every worker ~3 MiB, and most apps never name a third-party scheme.
    """
    from importlib.metadata import entry_points as installed

    return installed(group=group)


def _load_entry_points() -> None:
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        obj = ep.load()
        backend = obj if isinstance(obj, Backend) else obj()
        if not isinstance(backend, Backend):
            raise ConfigurationError(
                f"entry point {ep.name!r} in {ENTRY_POINT_GROUP} gave {backend!r}, not a Backend"
            )
        _registered.setdefault(ep.name.lower(), backend)


def backend_for(url: str) -> Backend:
    """The backend registered for the URL's scheme; a clear error if there is none."""
    scheme = urlsplit(url).scheme.lower()
    if not scheme:
        raise ConfigurationError(
            f"{redact_url(url)!r} has no scheme; use e.g. sqlite:///qtasks.sqlite3, "
            f"redis://localhost:6379/0 or memory://"
        )
    if scheme not in _registered:
        _load_entry_points()
    backend = _registered.get(scheme) or _BUILTIN.get(scheme)
    if backend is None:
        known = ", ".join(sorted({*_BUILTIN, *_registered}))
        raise ConfigurationError(
            f"no backend for URL scheme {scheme!r}; known schemes: {known}. "
            f"Third-party backends register through the {ENTRY_POINT_GROUP!r} entry point"
        )
    return backend


_SECRET_PARAMETER = re.compile(
    r"pass|pwd|secret|token|credential|api_?key|^auth$|authorization", re.IGNORECASE
)
"""Query parameters whose value is a secret: password=, sasl_plain_password=, token=, ..."""


def redact_url(url: str) -> str:
    """The URL with its password and secret query values replaced by '***'; safe to show.

    The one redaction function: logs, reprs, errors, the CLI and the dashboard show broker
    and storage URLs only through it. The user name, host, port, path and other
    parameters stay, so the URL still says where it points. It never raises: a URL it
    cannot parse loses everything between the scheme and the last '@'.
    """
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:  # e.g. a broken IPv6 host: hide whatever may be credentials
        scheme, sep, rest = url.partition("://")
        return f"{scheme}{sep}***@{rest.rsplit('@', 1)[1]}" if "@" in rest else url
    if password is not None:
        userinfo, _, hostinfo = parts.netloc.rpartition("@")
        user = userinfo.partition(":")[0]
        start = url.index(parts.netloc)  # the netloc text as written, not re-encoded
        url = f"{url[:start]}{user}:***@{hostinfo}{url[start + len(parts.netloc) :]}"
    if parts.query and _SECRET_PARAMETER.search(parts.query):
        url = _redact_query(url, parts.query)
    return url


def _redact_query(url: str, query: str) -> str:
    pairs = []
    for item in query.split("&"):
        name, eq, value = item.partition("=")
        secret = eq and value and _SECRET_PARAMETER.search(unquote(name))
        pairs.append(f"{name}=***" if secret else item)
    head, _, tail = url.rpartition(query)  # the query is the last part (fragments are rare)
    return f"{head}{'&'.join(pairs)}{tail}"
