"""Reaching the broker servers integration tests need.

Locally a missing server skips its tests; under `CI=true` it fails them, so CI can never
pass by skipping what it was meant to check.
"""

from __future__ import annotations

import os
import socket

import pytest

REDIS_URL = os.environ.get("QTASKS_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
RABBITMQ_URL = os.environ.get("QTASKS_TEST_RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672/")


def in_ci() -> bool:
    """True when running under CI (CI=true or 1)."""
    return os.environ.get("CI", "").lower() in {"1", "true", "yes"}


def reachable(host: str, port: int, timeout: float = 1.0) -> bool:
    """True if a TCP connection to host:port succeeds."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def require_server(name: str, host: str, port: int) -> None:
    """Skip (locally) or fail (under CI) the current test if the server is not reachable."""
    if reachable(host, port):
        return
    message = f"{name} is not reachable at {host}:{port}"
    if in_ci():
        pytest.fail(f"{message}; CI must provide it (see .ci/run)")
    pytest.skip(message)
