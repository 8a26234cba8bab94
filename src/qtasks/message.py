"""The wire message, the stored task record and the status enum.

`TaskMessage` is what a producer sends and a worker receives: one typed struct with a
format version, never a joined string. `Task` is what a Storage keeps and what
`add_task`/`get` return. Times are epoch seconds (floats) because every backend can store
and compare them cheaply; `Task.created`/`started`/`finished` give `datetime` views.
"""

from __future__ import annotations

import enum
import os
import uuid as uuid_module
from datetime import datetime, timezone
from typing import Any

import msgspec

MESSAGE_FORMAT_VERSION = 1
DEFAULT_QUEUE = "default"


class TaskStatusEnum(str, enum.Enum):
    """Where a task is in its life; the last three are final."""

    NEW = "new"
    PROCESS = "process"
    RETRY = "retry"
    SUCCESS = "success"
    ERROR = "error"
    CANCEL = "cancel"

    def __str__(self) -> str:
        return self.value

    @property
    def is_final(self) -> bool:
        """True when the task will not run again."""
        return self in _FINAL


_FINAL = frozenset({TaskStatusEnum.SUCCESS, TaskStatusEnum.ERROR, TaskStatusEnum.CANCEL})


_UUID_CLEAR = ~((0xC000 << 48) | (0xF000 << 64))
_UUID_V4 = (0x8000 << 48) | (4 << 76)
_SAFE_UNKNOWN = uuid_module.SafeUUID.unknown
_new_object = object.__new__
_set_slot = object.__setattr__


def new_uuid() -> uuid_module.UUID:
    """A fresh random task id: what `uuid.uuid4()` returns, at half its cost per task.

    16 bytes from os.urandom with the version-4 and RFC 4122 variant bits set, in a plain
    `uuid.UUID`, built without `UUID.__init__`'s argument parsing (a bulk enqueue's
    largest single cost).
    """
    u = _new_object(uuid_module.UUID)
    _set_slot(u, "int", (int.from_bytes(os.urandom(16), "big") & _UUID_CLEAR) | _UUID_V4)
    _set_slot(u, "is_safe", _SAFE_UNKNOWN)
    return u


class TaskMessage(msgspec.Struct, kw_only=True, omit_defaults=True):
    """One task to run, as it travels from producer to worker."""

    uuid: uuid_module.UUID
    name: str
    args: list[Any] = []
    kwargs: dict[str, Any] = {}
    priority: int = 0
    queue: str = DEFAULT_QUEUE
    eta: float | None = None
    attempt: int = 0
    created_at: float = 0.0
    headers: dict[str, str] = {}
    v: int = MESSAGE_FORMAT_VERSION


class Envelope(msgspec.Struct, frozen=True):
    """An encoded message with the routing facts a broker needs without decoding it."""

    uuid: str
    queue: str
    priority: int
    eta: float | None
    created_at: float
    body: bytes
    deliveries: int = 0
    """Deliveries already counted for this message: 0 for a new message and for a retry
    (a new attempt starts its count over); a message sent back unrun (an unknown task
    deferred during a rolling deploy) keeps its count, so `max_deliveries` still ends it."""


class DeadLetterReason(str, enum.Enum):
    """Why a message was set aside instead of run or retried (machine-readable)."""

    FAILED = "failed"
    """The task raised and has no retries left (or none were allowed)."""
    WORKER_LOST = "worker_lost"
    """Delivered `max_deliveries` times without finishing: its worker died each time."""
    UNKNOWN_TASK = "unknown_task"
    """No task of that name is registered in the worker."""
    REJECTED = "rejected"
    """A plugin or middleware refused it before it ran."""
    # Undecodable messages use DecodeError.reason: empty, payload_too_large, bad_signature,
    # pickle_refused, wrong_serializer, not_utf8, invalid_json, invalid_msgpack, too_deep,
    # unsupported_version, bad_schema.

    def __str__(self) -> str:
        return self.value


class DeadLetter(msgspec.Struct, kw_only=True):
    """A message set aside for an operator: what it was, why, and when.

    `body` is the message exactly as it arrived, so it can be inspected or sent again
    (`app.retry_dead_letters`) even when it could not be decoded.
    """

    uuid: str
    queue: str
    reason: str
    """A DeadLetterReason value, or a DecodeError reason for undecodable messages."""
    body: bytes
    name: str | None = None
    detail: str = ""
    """Human-readable: the error type and message, or what is wrong with the bytes."""
    priority: int = 0
    delivery_count: int = 1
    created_at: float = 0.0
    dead_at: float = 0.0


def _as_datetime(ts: float | None) -> datetime | None:
    return None if ts is None else datetime.fromtimestamp(ts, tz=timezone.utc)


class Task(msgspec.Struct, kw_only=True):
    """The stored record of one task: what `add_task` and `get` return."""

    uuid: uuid_module.UUID
    name: str
    status: TaskStatusEnum
    priority: int = 0
    queue: str = DEFAULT_QUEUE
    args: list[Any] = []
    kwargs: dict[str, Any] = {}
    returning: Any = None
    error_type: str | None = None
    error_message: str | None = None
    traceback: str | None = None
    attempts: int = 0
    created_at: float = 0.0
    started_at: float | None = None
    finished_at: float | None = None
    eta: float | None = None

    @property
    def is_final(self) -> bool:
        """True once the task succeeded, failed for good or was cancelled."""
        return self.status.is_final

    @property
    def created(self) -> datetime:
        """Creation time as an aware UTC datetime."""
        return datetime.fromtimestamp(self.created_at, tz=timezone.utc)

    @property
    def started(self) -> datetime | None:
        """Start of the last attempt, if any."""
        return _as_datetime(self.started_at)

    @property
    def finished(self) -> datetime | None:
        """When the task reached a final status, if it did."""
        return _as_datetime(self.finished_at)

    @property
    def duration_seconds(self) -> float | None:
        """Run time of the last attempt, once finished."""
        if self.started_at is None or self.finished_at is None:
            return None
        return self.finished_at - self.started_at


def record_for(message: TaskMessage) -> Task:
    """The `new` record stored for a message being enqueued."""
    return Task(
        uuid=message.uuid,
        name=message.name,
        status=TaskStatusEnum.NEW,
        priority=message.priority,
        queue=message.queue,
        args=message.args,
        kwargs=message.kwargs,
        created_at=message.created_at,
        eta=message.eta,
    )
