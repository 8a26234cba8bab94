"""Turning task messages into bytes and back; JSON by default, msgpack on request, never
pickle unless asked.

Decoding is where untrusted bytes enter a worker, so the JSON serializer checks them in
order, cheapest first, and names what is wrong in `DecodeError.reason`: `empty`,
`payload_too_large` (before any parsing), `bad_signature`, `pickle_refused` (such bytes
are never unpickled), `wrong_serializer` (the bytes are a msgpack message),
`not_utf8`, `too_deep`, `invalid_json`, `unsupported_version`, `bad_schema`. A
well-formed message pays for a few comparisons (and, past 128 bytes, two `bytes.count`
calls) beyond the decode itself. The msgpack serializer gives the same reasons, with
`invalid_msgpack` for `invalid_json` and `wrong_serializer` for a JSON message.
"""

from __future__ import annotations

import abc
import logging
import re
from collections.abc import Sequence
from itertools import chain
from typing import TYPE_CHECKING, Any

import msgspec

from qtasks.config import DEFAULT_MAX_PAYLOAD_BYTES
from qtasks.errors import ConfigurationError, DecodeError, EncodeError
from qtasks.message import MESSAGE_FORMAT_VERSION, TaskMessage
from qtasks.signing import Signer, is_signed, signed_payload

if TYPE_CHECKING:
    from qtasks.config import QueueConfig

log = logging.getLogger(__name__)

DEFAULT_MAX_DEPTH = 64
"""Deepest nesting of lists/objects in a message (the message object itself is level 1)."""


class Serializer(abc.ABC):
    """Encodes `TaskMessage` to bytes and back; must reject what it cannot round-trip."""

    content_type: str = "application/octet-stream"
    max_payload_bytes: int | None = None
    """Largest body `decode` accepts (None: no limit); the app sets it from its config."""

    @abc.abstractmethod
    def encode(self, message: TaskMessage) -> bytes:
        """Bytes for the wire; raise EncodeError naming the value that cannot be encoded."""

    @abc.abstractmethod
    def decode(self, body: bytes) -> TaskMessage:
        """The message; raise DecodeError (with a `reason`) saying what is wrong with the bytes."""


def _unverifiable() -> DecodeError:
    return DecodeError(
        "bad_signature: the message is signed but this app has no signing keys to verify "
        "it; set the producers' keys in QueueConfig.signing_keys or QTASKS_SIGNING_KEYS on "
        "the worker too",
        reason="bad_signature",
    )


def _pickle_refused(decodes: str) -> DecodeError:
    return DecodeError(
        f"pickle_refused: the message is a pickle; qtasks decodes {decodes} here and never "
        f"unpickles (unpickling runs code the sender chose)",
        reason="pickle_refused",
    )


def _not_utf8(exc: UnicodeDecodeError) -> DecodeError:
    return DecodeError(
        f"not_utf8: a string in the message is not UTF-8 ({exc.reason})", reason="not_utf8"
    )


def _stack_exhausted() -> DecodeError:
    return DecodeError("too_deep: nesting exhausted the stack", reason="too_deep")


def check_size(body: bytes, max_payload_bytes: int | None) -> None:
    """DecodeError `empty` or `payload_too_large` before anything looks inside `body`."""
    size = len(body)
    if not size:
        raise DecodeError("empty: the message body is empty", reason="empty")
    if max_payload_bytes is not None and size > max_payload_bytes:
        raise DecodeError(
            f"payload_too_large: the message is {size:,} bytes, more than "
            f"max_payload_bytes={max_payload_bytes:,}; not decoded. Raise "
            f"QueueConfig.max_payload_bytes on producers and workers to accept it",
            reason="payload_too_large",
        )


class _Version(msgspec.Struct):
    """Only the format version of a message that failed validation (all else skipped)."""

    v: Any = MESSAGE_FORMAT_VERSION


class _Identity(msgspec.Struct):
    """Only uuid and name of a message that failed to decode (all else skipped)."""

    uuid: Any = None
    name: Any = None


_version_decoder = msgspec.json.Decoder(_Version)
_identity_decoder = msgspec.json.Decoder(_Identity)
_msgpack_version_decoder = msgspec.msgpack.Decoder(_Version)
_msgpack_identity_decoder = msgspec.msgpack.Decoder(_Identity)

_MSGPACK_MAP_HEADERS = frozenset((*range(0x81, 0x90), 0xDE, 0xDF))
"""First bytes of a non-empty msgpack map (fixmap, map 16, map 32): how every msgpack task
message starts, and never how JSON text starts."""

# Depth check: JSON strings are cut out (they may hold brackets), then only brackets kept,
# `{}` folded onto `[]`. Each `replace(b"[]", b"")` pass removes one level of nesting
# everywhere, so a depth-d document is gone after d passes: the cost is C-speed passes
# over the brackets alone, as many as the document is deep (a handful in practice).
_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')
_FOLD_BRACKETS = bytes.maketrans(b"{}", b"[]")
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")


def nesting_exceeds(body: bytes, max_depth: int) -> bool:
    """True when lists/objects in the JSON `body` nest deeper than `max_depth`."""
    if body.count(b"[") + body.count(b"{") <= max_depth:
        return False  # fewer openers than the limit: cannot be deeper (the common case)
    brackets = _JSON_STRING.sub(b"", body).translate(_FOLD_BRACKETS, _NOT_BRACKETS)
    for _ in range(max_depth):
        if b"[]" not in brackets:
            return False
        brackets = brackets.replace(b"[]", b"")
    # Unmatched brackets of broken JSON never form a pair, so a pair left is real depth.
    return b"[]" in brackets


def looks_like_pickle(body: bytes) -> bool:
    """True for bytes that are a pickle (any protocol); checked without unpickling."""
    if body[:1] == b"\x80":
        return True  # protocol 2+ header; no JSON or UTF-8 text starts with this byte
    if not body.rstrip().endswith(b"."):
        return False  # every pickle ends with the STOP opcode; no JSON document does
    try:
        # pickletools only parses opcodes, it never imports or calls anything.
        import pickletools  # only for bytes that start like a pickle

        for _opcode, _arg, _pos in pickletools.genops(body.rstrip()):
            pass
    except Exception:  # any parse failure just means "not a pickle"
        return False
    return True


class JsonSerializer(Serializer):
    """msgspec JSON: fast, typed on decode, and safe (no code runs while decoding).

    `max_payload_bytes` (None: no limit) and `max_depth` bound what `decode` accepts; the
    app passes `QueueConfig.max_payload_bytes`.
    """

    content_type = "application/json"

    def __init__(
        self,
        *,
        max_payload_bytes: int | None = DEFAULT_MAX_PAYLOAD_BYTES,
        max_depth: int = DEFAULT_MAX_DEPTH,
    ) -> None:
        self.max_payload_bytes = max_payload_bytes
        self.max_depth = max_depth
        self._deep_size = 2 * max_depth
        """Smallest body that can nest deeper than max_depth is one byte longer."""
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
        # The hot path of every worker: a well-formed message passes a few inline tests
        # and goes straight to msgspec; anything odd takes `_screen` for the slower checks
        # that name what is wrong. Nesting deeper than max_depth needs more than
        # 2 * max_depth bytes of brackets, so shorter bodies skip counting them (~100 ns
        # per count on a slow machine, as much as the rest of these tests together).
        size = len(body)
        limit = self.max_payload_bytes
        if (
            not size
            or (limit is not None and size > limit)
            or body[0] != _OPEN_BRACE
            or (size > self._deep_size and body.count(b"[") + body.count(b"{") > self.max_depth)
        ):
            self._screen(body)
        try:
            message = self._decoder.decode(body)
        except msgspec.ValidationError as exc:
            raise _invalid(body, exc, _schema_error(body, exc)) from exc
        except msgspec.DecodeError as exc:
            raise _invalid(
                body, exc, DecodeError(f"invalid_json: {exc}", reason="invalid_json")
            ) from exc
        except UnicodeDecodeError as exc:
            raise _invalid(body, exc, None) from exc
        except RecursionError as exc:  # deeper than Python's stack despite the check above
            raise _stack_exhausted() from exc
        if message.v != MESSAGE_FORMAT_VERSION:
            raise _unsupported(message.v)
        return message

    def _screen(self, body: bytes) -> None:
        """The checks before parsing, in order; returns if msgspec may parse `body`."""
        check_size(body, self.max_payload_bytes)
        if body[0] != _OPEN_BRACE:  # the encoder writes "{" first: other bytes are suspect
            if is_signed(body):
                raise _unverifiable()
            if looks_like_pickle(body):
                raise _pickle_refused("JSON")
            if looks_like_msgpack(body):
                raise _wrong_serializer("msgpack", "MsgpackSerializer", "JsonSerializer")
        if nesting_exceeds(body, self.max_depth):
            raise DecodeError(
                f"too_deep: lists/objects nest deeper than {self.max_depth} levels; not decoded",
                reason="too_deep",
            )


_OPEN_BRACE = ord("{")


def _invalid(body: bytes, exc: Exception, otherwise: DecodeError | None) -> DecodeError:
    """`not_utf8` when the bytes are not UTF-8 text (JSON must be), else `otherwise`."""
    try:
        body.decode("utf-8")
    except UnicodeDecodeError as bad:
        return DecodeError(
            f"not_utf8: the message is not UTF-8 text ({bad.reason} at byte {bad.start})",
            reason="not_utf8",
        )
    if otherwise is None:  # msgspec's UTF-8 error on text that decodes: report it as is
        return DecodeError(f"not_utf8: {exc}", reason="not_utf8")
    return otherwise


def _unsupported(version: object) -> DecodeError:
    return DecodeError(
        f"unsupported_version: message format v={version!r}, this qtasks reads "
        f"v={MESSAGE_FORMAT_VERSION}; run workers of the producers' qtasks version",
        reason="unsupported_version",
    )


def _schema_error(
    body: bytes,
    exc: msgspec.ValidationError,
    version_decoder: msgspec.json.Decoder[_Version]
    | msgspec.msgpack.Decoder[_Version] = _version_decoder,
) -> DecodeError:
    """`unsupported_version` when the message says another format, else `bad_schema`."""
    try:
        version = version_decoder.decode(body).v
    except (msgspec.DecodeError, RecursionError, UnicodeDecodeError):
        version = MESSAGE_FORMAT_VERSION  # not even an object: a schema problem
    if version != MESSAGE_FORMAT_VERSION:
        return _unsupported(version)
    return DecodeError(f"bad_schema: not a task message: {exc}", reason="bad_schema")


def _wrong_serializer(found: str, producer: str, worker: str) -> DecodeError:
    return DecodeError(
        f"wrong_serializer: the message is {found}, but this app decodes with {worker}; "
        f"the producer seems to use {producer}: give producers and workers the same "
        f"serializer (QueueTasks(serializer=...)), then retry the dead letter",
        reason="wrong_serializer",
    )


def looks_like_msgpack(body: bytes) -> bool:
    """True for a msgpack task message (even a cut-off one); never for JSON text."""
    if not body or body[0] not in _MSGPACK_MAP_HEADERS:
        return False
    try:
        found = _msgpack_identity_decoder.decode(body)
    except (msgspec.DecodeError, RecursionError, UnicodeDecodeError):
        # A cut-off message: what MsgpackSerializer writes opens with its "uuid" key.
        return body[1:6] == b"\xa4uuid"
    return isinstance(found.uuid, str) or isinstance(found.name, str)


def looks_like_json(body: bytes) -> bool:
    """True for a JSON task message (even a cut-off one); never for a msgpack message."""
    text = body.lstrip(b" \t\r\n")
    if text[:1] != b"{":
        return False  # a msgpack message starts with a map header, which "{" is not
    try:
        found = _identity_decoder.decode(text)
    except (msgspec.DecodeError, RecursionError, UnicodeDecodeError):
        return text.startswith(b'{"uuid"')  # a cut-off message as JsonSerializer writes it
    return isinstance(found.uuid, str) or isinstance(found.name, str)


class _UnsupportedExtensionError(Exception):
    """A msgpack extension type other than the timestamp: qtasks never writes one."""

    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


def _refuse_extension(code: int, data: memoryview) -> Any:
    raise _UnsupportedExtensionError(code)


_NESTED = frozenset((list, dict, tuple))
_NOT_CONTAINER_HEADERS = bytes(
    b for b in range(256) if not (0x80 <= b <= 0x9F or 0xDC <= b <= 0xDF)
)
_COUNT_HEADERS_UP_TO = 4096
"""Bodies this short are screened by counting their container-header bytes (~0.3 µs);
longer ones go straight to `nested_deeper`, cheaper than counting from here on."""


def nested_deeper(values: list[Any], depth: int, max_depth: int) -> bool:
    """True when decoded `values`, at nesting level `depth`, hold lists/dicts deeper than
    `max_depth`; level by level, one comprehension per level (no recursion, no Python call
    per container): about as costly as JsonSerializer's bracket count."""
    level = [v for v in values if type(v) in _NESTED]
    while level:
        if depth > max_depth:
            return True
        inner = chain.from_iterable([c.values() if type(c) is dict else c for c in level])
        below = [v for v in inner if type(v) in _NESTED]
        dicts = [c for c in level if type(c) is dict]
        if dicts:  # msgpack array keys decode to tuples, which nest too
            below += [k for k in chain.from_iterable(dicts) if type(k) is tuple]
        level = below
        depth += 1
    return False


class MsgpackSerializer(Serializer):
    """msgspec MessagePack: smaller than JSON, carries `bytes` as is, as safe to decode.

    A peer of JsonSerializer, checked the same way with the same reasons, for apps whose
    arguments hold binary data or that want smaller messages: `QueueTasks(serializer=
    MsgpackSerializer())` on producers and workers alike. Arguments arrive as with JSON,
    except that `bytes` stay bytes, timezone-aware datetimes stay datetimes (msgpack's
    timestamp) and dict keys keep their type. Extension types other than the timestamp
    are refused (`bad_schema`). `max_payload_bytes` and `max_depth` bound what `decode`
    accepts, as for JsonSerializer.
    """

    content_type = "application/msgpack"

    def __init__(
        self,
        *,
        max_payload_bytes: int | None = DEFAULT_MAX_PAYLOAD_BYTES,
        max_depth: int = DEFAULT_MAX_DEPTH,
    ) -> None:
        self.max_payload_bytes = max_payload_bytes
        self.max_depth = max_depth
        self._encoder = msgspec.msgpack.Encoder(enc_hook=encode_extra)
        self._decoder = msgspec.msgpack.Decoder(TaskMessage, ext_hook=_refuse_extension)

    def encode(self, message: TaskMessage) -> bytes:
        try:
            return self._encoder.encode(message)
        except (TypeError, msgspec.EncodeError, OverflowError) as exc:
            raise EncodeError(
                f"task {message.name!r}: arguments cannot be encoded as msgpack ({exc}); "
                f"pass plain data (str, int, float, bool, None, bytes, list, dict, datetime, "
                f"UUID, dataclasses) or a serializable representation"
            ) from exc

    def decode(self, body: bytes) -> TaskMessage:
        # As JsonSerializer: a well-formed message passes a few inline tests and goes
        # straight to msgspec. Nesting is checked after decoding (msgpack has no brackets
        # to count before; msgspec's own recursion limit bounds the decode): a short body
        # with no more container-header bytes than max_depth cannot nest deeper, the
        # rest are walked (cheap for large bodies of bytes or text: few containers).
        size = len(body)
        limit = self.max_payload_bytes
        if not size or (limit is not None and size > limit) or body[0] not in _MSGPACK_MAP_HEADERS:
            self._screen(body)
        try:
            message = self._decoder.decode(body)
        except _UnsupportedExtensionError as exc:
            raise DecodeError(
                f"bad_schema: msgpack extension type {exc.code} is not part of a task "
                f"message (qtasks writes only timestamps)",
                reason="bad_schema",
            ) from exc
        except msgspec.ValidationError as exc:
            raise _msgpack_schema_error(body, exc) from exc
        except msgspec.DecodeError as exc:
            raise DecodeError(f"invalid_msgpack: {exc}", reason="invalid_msgpack") from exc
        except UnicodeDecodeError as exc:  # msgpack strings must be UTF-8
            raise _not_utf8(exc) from exc
        except RecursionError as exc:
            raise _stack_exhausted() from exc
        max_depth = self.max_depth
        if (
            size > max_depth
            and (
                size > _COUNT_HEADERS_UP_TO
                or len(body.translate(None, _NOT_CONTAINER_HEADERS)) > max_depth
            )
            and nested_deeper([message.args, message.kwargs], 2, max_depth)
        ):
            raise DecodeError(
                f"too_deep: lists/maps nest deeper than {max_depth} levels; not run",
                reason="too_deep",
            )
        if message.v != MESSAGE_FORMAT_VERSION:
            raise _unsupported(message.v)
        return message

    def _screen(self, body: bytes) -> None:
        """The checks before parsing, in order; returns if msgspec may parse `body`."""
        check_size(body, self.max_payload_bytes)
        if is_signed(body):
            raise _unverifiable()
        # b"\x80" alone is an empty msgpack map (a bad_schema); longer, it is a pickle's
        # header, as no msgpack message has anything after an empty top-level map.
        if body != b"\x80" and looks_like_pickle(body):
            raise _pickle_refused("msgpack")
        if looks_like_json(body):
            raise _wrong_serializer("JSON", "JsonSerializer", "MsgpackSerializer")


def _msgpack_schema_error(body: bytes, exc: msgspec.ValidationError) -> DecodeError:
    """`invalid_msgpack` for malformed bytes (msgspec checks types before it finds
    trailing or cut-off bytes), else as `_schema_error`."""
    try:
        msgspec.msgpack.decode(body, ext_hook=_refuse_extension)
    except _UnsupportedExtensionError:
        pass  # well-formed; the schema error says what is wrong
    except msgspec.DecodeError as malformed:
        return DecodeError(f"invalid_msgpack: {malformed}", reason="invalid_msgpack")
    except UnicodeDecodeError as bad:
        return _not_utf8(bad)
    except RecursionError:
        return _stack_exhausted()
    return _schema_error(body, exc, _msgpack_version_decoder)


class SigningSerializer(Serializer):
    """Wraps a serializer: signs what it encodes, verifies before it decodes.

    Built by the app when `QueueConfig.signing_keys` (or QTASKS_SIGNING_KEYS) gives keys;
    see `qtasks.signing` for the format and key rotation. The inner serializer never sees
    bytes whose signature did not verify.
    """

    def __init__(
        self,
        inner: Serializer,
        keys: Sequence[str | bytes],
        *,
        max_payload_bytes: int | None = DEFAULT_MAX_PAYLOAD_BYTES,
    ) -> None:
        self.inner = inner
        self.signer = Signer(keys)
        self.max_payload_bytes = max_payload_bytes
        self.content_type = inner.content_type

    def __repr__(self) -> str:
        return f"SigningSerializer({self.inner!r}, {self.signer!r})"

    def encode(self, message: TaskMessage) -> bytes:
        return self.signer.sign(self.inner.encode(message))

    def decode(self, body: bytes) -> TaskMessage:
        check_size(body, self.max_payload_bytes)  # before the HMAC: it reads every byte
        return self.inner.decode(self.signer.verify(body))


class PickleSerializer(Serializer):
    """pickle on the wire, for arguments JSON cannot carry. DANGEROUS, opt-in only.

    Unpickling runs whatever code the bytes name: anyone who can put a message on the
    broker can then run code on every worker. Use it only with signing keys (so only key
    holders can make messages) and only if JSON truly cannot carry the data.
    """

    content_type = "application/x-python-pickle"

    def __init__(
        self,
        *,
        i_understand_the_risk: bool = False,
        max_payload_bytes: int | None = DEFAULT_MAX_PAYLOAD_BYTES,
    ) -> None:
        if i_understand_the_risk is not True:
            raise ConfigurationError(
                "PickleSerializer lets anyone who can write to the broker run code on the "
                "workers; pass i_understand_the_risk=True to use it anyway (with signing "
                "keys), or keep the default JSON serializer"
            )
        self.max_payload_bytes = max_payload_bytes
        log.warning(
            "PICKLE SERIALIZER ENABLED: messages are unpickled, so anyone able to write to "
            "the broker can run code on the workers; set signing keys, or use JSON"
        )

    def encode(self, message: TaskMessage) -> bytes:
        import pickle  # the opt-in's module: JSON apps never load it

        try:
            return pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
        except Exception as exc:  # pickling fails in many types: all mean "cannot encode"
            raise EncodeError(f"task {message.name!r}: cannot be pickled: {exc}") from exc

    def decode(self, body: bytes) -> TaskMessage:
        check_size(body, self.max_payload_bytes)
        import pickle

        try:
            message = pickle.loads(body)  # the explicit, warned-about opt-in
        except Exception as exc:  # a broken pickle raises any type
            raise DecodeError(f"invalid_pickle: {exc}", reason="invalid_pickle") from exc
        if not isinstance(message, TaskMessage):
            raise DecodeError(
                f"bad_schema: the pickle holds a {type(message).__name__}, not a TaskMessage",
                reason="bad_schema",
            )
        if message.v != MESSAGE_FORMAT_VERSION:
            raise _unsupported(message.v)
        return message


SERIALIZER_NAMES = ("json", "msgpack")
"""What `QueueTasks(serializer=...)` takes by name; pickle only as an explicit instance."""


def serializer_for(config: QueueConfig, serializer: Serializer | str | None = None) -> Serializer:
    """The app's serializer: `serializer` (an instance, or "json" / "msgpack") or JSON,
    with the config's limit, signed if keyed.

    A serializer passed in with the default limit gets the config's: producers check
    `QueueConfig.max_payload_bytes`, and a worker whose serializer kept 1 MiB would
    dead-letter what they had accepted. A limit given to the serializer itself is kept.
    """
    if serializer is None:
        serializer = JsonSerializer(max_payload_bytes=config.max_payload_bytes)
    elif isinstance(serializer, str):
        name = serializer.strip().lower()
        if name not in SERIALIZER_NAMES:
            raise ConfigurationError(
                f"unknown serializer {serializer!r}: use 'json' or 'msgpack', or pass a "
                f"Serializer instance (qtasks.serializers)"
            )
        factory = JsonSerializer if name == "json" else MsgpackSerializer
        serializer = factory(max_payload_bytes=config.max_payload_bytes)
    layer: Serializer | None = serializer
    while layer is not None:
        if layer.max_payload_bytes == DEFAULT_MAX_PAYLOAD_BYTES:
            layer.max_payload_bytes = config.max_payload_bytes
        layer = getattr(layer, "inner", None)
    keys = config.resolved_signing_keys()
    if keys and not isinstance(serializer, SigningSerializer):
        serializer = SigningSerializer(serializer, keys, max_payload_bytes=config.max_payload_bytes)
    return serializer


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


_PEEK_REFUSED = frozenset({"bad_signature", "payload_too_large", "pickle_refused"})


def peek_identity(body: bytes, reason: str | None = None) -> tuple[str | None, str | None]:
    """Best-effort (uuid, name) of a message that failed to decode, for the error record.

    Pass the DecodeError's `reason`: for `bad_signature` the ids are not trusted (a forger
    could name a real task's uuid to overwrite its record), for `payload_too_large` and
    `pickle_refused` the bytes are not looked into; (None, None) then.
    """
    if reason in _PEEK_REFUSED or is_signed(body):
        return None, None
    payload = signed_payload(body)
    # Either format, whichever serializer failed: msgpack maps and JSON text never share
    # a first byte.
    msgpack = bool(payload) and payload[0] in _MSGPACK_MAP_HEADERS
    try:
        if msgpack:
            found = _msgpack_identity_decoder.decode(payload)
        else:
            found = _identity_decoder.decode(payload)
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError):
        return None, None
    uuid, name = found.uuid, found.name
    return (uuid if isinstance(uuid, str) else None, name if isinstance(name, str) else None)
