"""Turning task messages into bytes and back; JSON by default, never pickle."""

from __future__ import annotations

import abc
from typing import Any

import msgspec

from qtasks.errors import DecodeError, EncodeError
from qtasks.message import TaskMessage


class Serializer(abc.ABC):
    """Encodes `TaskMessage` to bytes and back; must reject what it cannot round-trip."""

    content_type: str = "application/octet-stream"

    @abc.abstractmethod
    def encode(self, message: TaskMessage) -> bytes:
        """Bytes for the wire; raise EncodeError naming the value that cannot be encoded."""

    @abc.abstractmethod
    def decode(self, body: bytes) -> TaskMessage:
        """The message; raise DecodeError saying what is wrong with the bytes."""


class JsonSerializer(Serializer):
    """msgspec JSON: fast, typed on decode, and safe (no code runs while decoding)."""

    content_type = "application/json"

    def __init__(self) -> None:
        self._encoder = msgspec.json.Encoder(enc_hook=encode_extra)
        self._decoder = msgspec.json.Decoder(TaskMessage)

    def encode(self, message: TaskMessage) -> bytes:
        try:
            return self._encoder.encode(message)
        except (TypeError, msgspec.EncodeError, OverflowError) as exc:
            raise EncodeError(
                f"task {message.name!r}: arguments cannot be encoded as JSON ({exc}); "
                f"pass plain data (str, int, float, bool, None, list, dict, datetime, UUID, "
                f"dataclasses) or a serializable representation"
            ) from exc

    def decode(self, body: bytes) -> TaskMessage:
        try:
            return self._decoder.decode(body)
        except msgspec.DecodeError as exc:
            raise DecodeError(f"undecodable task message: {exc}") from exc


def encode_extra(value: Any) -> Any:
    """Plain data for what msgspec cannot encode itself: pydantic models (`model_dump`)."""
    dump = getattr(value, "model_dump", None)
    if callable(dump) and not isinstance(value, type):
        return dump(mode="json")
    raise TypeError(f"Encoding objects of type {type(value).__name__} is unsupported")


def to_builtins(value: Any) -> Any:
    """A result as plain JSON-compatible data; EncodeError if it has no such form."""
    try:
        return msgspec.to_builtins(value)
    except (TypeError, msgspec.EncodeError):
        pass  # maybe a pydantic model; enc_hook= costs every call, so only on this path
    try:
        return msgspec.to_builtins(value, enc_hook=encode_extra)
    except (TypeError, msgspec.EncodeError) as exc:
        raise EncodeError(
            f"the task's result cannot be stored: {exc}; return plain data or set "
            f"decode=... on the task to convert it"
        ) from exc


def peek_identity(body: bytes) -> tuple[str | None, str | None]:
    """Best-effort (uuid, name) of a message that failed to decode, for the error record."""
    try:
        raw = msgspec.json.decode(body)
    except msgspec.DecodeError:
        return None, None
    if not isinstance(raw, dict):
        return None, None
    uuid, name = raw.get("uuid"), raw.get("name")
    return (uuid if isinstance(uuid, str) else None, name if isinstance(name, str) else None)
