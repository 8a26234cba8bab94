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


async def delete_namespace(url: str, namespace: str) -> int:
    """Delete every key of one qtasks namespace (on a Cluster too); how many there were."""
    import redis.asyncio

    from qtasks._redis import parse_url

    target = parse_url(url)
    client: redis.asyncio.Redis | redis.asyncio.RedisCluster
    if target.cluster:
        client = redis.asyncio.RedisCluster.from_url(target.connect_url)
    else:
        client = redis.asyncio.Redis.from_url(target.connect_url)
    try:
        pattern = f"qtasks:{{{namespace}}}:*"
        keys = [k async for k in client.scan_iter(match=pattern, count=1000)]
        for i in range(0, len(keys), 500):
            await client.delete(*keys[i : i + 500])  # one hash slot: fine on a Cluster
        return len(keys)
    finally:
        await client.aclose()
