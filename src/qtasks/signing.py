"""HMAC-SHA256 signatures on task messages, with key rotation.

A signed message on the wire is

    b"qtasks-sig1:" + base64url(HMAC-SHA256(key, payload)) + b":" + payload

with the 43-character unpadded signature. The first key signs; every key verifies, so a
key is rotated by putting the new one first, waiting until the messages signed with the
old one are drained (and retries re-signed), then dropping the old one. Verification runs
on the raw bytes before any decoding, compares in constant time (`hmac.compare_digest`)
and tries every key, so which key signed is not told by timing or by the message.

What signing gives: a worker runs only messages made by a holder of a key, unchanged.
What it does not: secrecy (payloads are readable) and replay protection (a captured
signed message can be enqueued again; its task runs again under the same uuid).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from collections.abc import Sequence

from qtasks.errors import ConfigurationError, DecodeError

SIGNATURE_PREFIX = b"qtasks-sig1:"
"""Marks a signed message; the digit is the format (HMAC-SHA256, base64url) version."""
SIGNATURE_LENGTH = 43
"""Characters of an unpadded base64url SHA-256 digest."""
HEADER_LENGTH = len(SIGNATURE_PREFIX) + SIGNATURE_LENGTH + 1
MIN_KEY_LENGTH = 16
"""Shorter keys are refused: an HMAC is only as strong as its key is hard to guess."""


def is_signed(body: bytes) -> bool:
    """True when `body` carries a signature header (valid or not)."""
    return body.startswith(SIGNATURE_PREFIX)


def signed_payload(body: bytes) -> bytes:
    """The payload after a signature header, NOT verified (for error records only)."""
    return body[HEADER_LENGTH:] if is_signed(body) else body


class Signer:
    """Signs with the first key, verifies with any; keys are str (UTF-8) or bytes."""

    def __init__(self, keys: Sequence[str | bytes]) -> None:
        if isinstance(keys, str | bytes):
            # A single string would be split into one-character "keys" below.
            raise ConfigurationError("signing keys must be a list of keys, not one string")
        material = [k.encode() if isinstance(k, str) else bytes(k) for k in keys]
        if not material:
            raise ConfigurationError(
                "signing needs at least one key; generate one with "
                "python -c 'import secrets; print(secrets.token_urlsafe(32))'"
            )
        for position, key in enumerate(material):
            if len(key) < MIN_KEY_LENGTH:
                # The key itself is never put in the message, only where it is.
                raise ConfigurationError(
                    f"signing key #{position + 1} is {len(key)} bytes; use at least "
                    f"{MIN_KEY_LENGTH} (e.g. python -c 'import secrets; "
                    f"print(secrets.token_urlsafe(32))')"
                )
        self._keys = material

    def __repr__(self) -> str:
        return f"<Signer with {len(self._keys)} key(s)>"

    @staticmethod
    def _signature(key: bytes, payload: bytes) -> bytes:
        digest = hmac.digest(key, payload, hashlib.sha256)
        return base64.urlsafe_b64encode(digest)[:SIGNATURE_LENGTH]

    def sign(self, payload: bytes) -> bytes:
        """`payload` with a signature header made with the first key."""
        return b"".join((SIGNATURE_PREFIX, self._signature(self._keys[0], payload), b":", payload))

    def verify(self, body: bytes) -> bytes:
        """The payload of a correctly signed `body`; DecodeError `bad_signature` otherwise."""
        if not is_signed(body):
            raise DecodeError(
                "bad_signature: the message is not signed, and this app only accepts "
                "signed messages (its signing keys are set); every producer needs the same "
                "signing keys (QueueConfig.signing_keys or QTASKS_SIGNING_KEYS)",
                reason="bad_signature",
            )
        given = body[len(SIGNATURE_PREFIX) : HEADER_LENGTH - 1]
        if len(body) < HEADER_LENGTH or body[HEADER_LENGTH - 1 : HEADER_LENGTH] != b":":
            raise DecodeError(
                "bad_signature: the signature header is malformed", reason="bad_signature"
            )
        payload = body[HEADER_LENGTH:]
        # Every key is tried (no early exit) so timing tells nothing about which matched.
        valid = False
        for key in self._keys:
            valid |= hmac.compare_digest(given, self._signature(key, payload))
        if not valid:
            raise DecodeError(
                "bad_signature: the signature matches none of this app's signing keys: the "
                "message was altered, or signed with a key this app does not have (after a "
                "rotation keep the old key, listed after the new one, until old messages drain)",
                reason="bad_signature",
            )
        return payload
