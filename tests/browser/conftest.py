"""A real dashboard in a real browser: Debian's Chromium driven by Playwright.

Each test gets a fresh folder holding an app module on an SQLite file, a CLI worker
process (`python -m qtasks -A <module>:app run`) on it, the dashboard served by uvicorn
in a thread on 127.0.0.1 (ephemeral port), and a headless Chromium page. HOME and TMPDIR
point into a temporary folder removed afterwards, so the browser leaves nothing behind.

Locally a missing Chromium or Playwright skips these tests; under `CI=true` it fails
them (`.ci/run` installs Chromium, the dev extra pins Playwright).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import uuid
from collections.abc import Coroutine, Iterator
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, TypeVar

import pytest

from tests.servers import in_ci

if TYPE_CHECKING:
    from playwright.sync_api import Browser, Page

CHROMIUM = Path("/usr/lib/chromium/chromium")
# From /work/shared/SERVERS.md: no sandbox (containers), and no traffic anywhere but the
# dashboard on 127.0.0.1, so a test never waits on (or depends on) the network.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1",
]
MODULE_PREFIX = "qt_dash_app_"

APP_SOURCE = """
import asyncio
from pathlib import Path

from qtasks import QueueConfig
from qtasks.asyncio import QueueTasks

FOLDER = Path(__file__).resolve().parent


def build() -> QueueTasks:
    # Fast heartbeats and polling: the dashboard shows a worker and its counters at once.
    config = QueueConfig(
        heartbeat_interval_seconds=0.2,
        worker_lost_after_seconds=10,
        poll_interval_seconds=0.02,
    )
    app = QueueTasks("dashboard", broker_url=f"sqlite:///{FOLDER / 'q.sqlite3'}", config=config)

    @app.task
    async def ship(order: str) -> str:
        # The first run fails (leaving a flag file); a retry then waits for the test to
        # write `release`, so the page is seen before the task succeeds.
        flag = FOLDER / "failed-once"
        if not flag.exists():
            flag.touch()
            raise RuntimeError(f"carrier rejected {order}")
        for _ in range(1200):
            if (FOLDER / "release").exists():
                return f"{order} shipped"
            await asyncio.sleep(0.05)
        raise TimeoutError("the test never released the retry")

    @app.task
    def add(x: int, y: int) -> int:
        return x + y

    @app.task(queue="parked")
    def parked(n: int) -> int:
        # The worker does not listen on `parked`: these messages only fill the queue.
        return n

    return app


app = build()
"""

T = TypeVar("T")


def require_browser() -> None:
    """Skip (locally) or fail (under CI) when Chromium or Playwright is missing."""
    missing = []
    if not CHROMIUM.exists():
        missing.append(f"Chromium ({CHROMIUM}; apt-get install -y chromium)")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        missing.append("Playwright (pip install playwright==1.65.2)")
    if not missing:
        return
    message = "browser tests need " + " and ".join(missing)
    if in_ci():
        pytest.fail(f"{message}; CI must provide it (see .ci/run)")
    pytest.skip(message)


class Site:
    """One test's world: the folder, the app module, the dashboard's address, and a
    client app of its own for enqueueing and waiting.

    The client runs on a loop in a thread of its own: the dashboard's app belongs to
    uvicorn's loop, and sync Playwright keeps an event loop running in the test's thread,
    where `asyncio.run` is refused.
    """

    def __init__(self, folder: Path, module: ModuleType, base_url: str) -> None:
        self.folder = folder
        self.module = module
        self.base_url = base_url
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.client = module.build()
        self.run(self.client.start())

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 60.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def add(self, name: str, *args: Any) -> str:
        """Enqueue one task; its uuid."""
        return str(self.run(self.client.add_task(name, *args)).uuid)

    def wait(self, uuid: str, timeout: float = 30.0) -> Any:
        """The final record of `uuid`."""
        return self.run(self.client.wait(uuid, timeout), timeout + 5)

    def close(self) -> None:
        try:
            self.run(self.client.stop())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(timeout=10)
            self.loop.close()


class WorkerProcess:
    """`python -m qtasks -A <module>:app run` in the folder; always killed and reaped."""

    def __init__(self, folder: Path, module: str) -> None:
        self.log_path = folder / "worker.log"
        self._log = self.log_path.open("wb")
        env = {**os.environ, "PYTHONPATH": str(folder)}
        cmd = [sys.executable, "-m", "qtasks", "-A", f"{module}:app", "run", "--queues", "default"]
        self.proc = subprocess.Popen(cmd, cwd=folder, env=env, stdout=self._log, stderr=self._log)

    def close(self) -> str:
        """Stop the worker; its log."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self._log.close()
        return self.log_path.read_text(errors="replace")


class Dashboard:
    """uvicorn serving `create_app(app)` from a thread, on 127.0.0.1 and a free port."""

    def __init__(self, app: Any) -> None:
        import uvicorn

        from qtasks.web.app import create_app

        # Binding here (port 0) and handing the socket over means the port is known
        # before the thread starts and no other process can take it in between.
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        config = uvicorn.Config(create_app(app), log_level="warning", lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True
        )
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the dashboard did not start")
            time.sleep(0.02)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)
        self.sock.close()


@pytest.fixture
def browser_home(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """HOME and TMPDIR in a fresh folder: Chromium's profile and caches go there.

    The folder is short-named in the system temp dir, not under pytest's tmp_path:
    Chromium puts a Unix socket in TMPDIR, and a socket path may not exceed 107 bytes.
    """
    require_browser()
    home = Path(tempfile.mkdtemp(prefix="qtb-"))
    (home / "tmp").mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("TMPDIR", str(home / "tmp"))
    try:
        yield home
    finally:
        shutil.rmtree(home, ignore_errors=True)


@pytest.fixture
def site(
    browser_home: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    request: pytest.FixtureRequest,
) -> Iterator[Site]:
    """The app module, a CLI worker on it and the dashboard; all stopped afterwards."""
    folder = tmp_path / "app"
    folder.mkdir()
    name = MODULE_PREFIX + uuid.uuid4().hex[:8]
    (folder / f"{name}.py").write_text(textwrap.dedent(APP_SOURCE))
    monkeypatch.chdir(folder)
    monkeypatch.syspath_prepend(str(folder))
    module = importlib.import_module(name)
    worker = WorkerProcess(folder, name)
    # Stopped newest first, and each one even when starting a later one failed.
    with contextlib.ExitStack() as stack:
        stack.callback(sys.modules.pop, name, None)
        stack.callback(show_log_on_failure, request, worker)
        dashboard = Dashboard(module.app)
        stack.callback(dashboard.close)
        site = Site(folder, module, dashboard.url)
        stack.callback(site.close)
        yield site


def show_log_on_failure(request: pytest.FixtureRequest, worker: WorkerProcess) -> None:
    """Stop the worker; print its log if the test failed."""
    log = worker.close()
    rep = getattr(request.node, "rep_call", None)
    if rep is not None and rep.failed:
        print(f"--- worker log ---\n{log}")


@pytest.fixture
def browser(browser_home: Path) -> Iterator[Browser]:
    """Headless Debian Chromium (never a browser Playwright downloads)."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture
def page(browser: Browser, site: Site) -> Iterator[Page]:
    """A fresh page whose relative URLs go to the dashboard."""
    context = browser.new_context(base_url=site.base_url, viewport={"width": 1280, "height": 900})
    page = context.new_page()
    # Long enough for a worker on a busy machine, short enough to fail fast when broken.
    page.set_default_timeout(20_000)
    try:
        yield page
    finally:
        context.close()


@pytest.fixture
def screenshots(tmp_path: Path) -> Path:
    """Where screenshots go: the test's temporary folder, never the repository."""
    folder = tmp_path / "screenshots"
    folder.mkdir()
    return folder


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # type: ignore[no-untyped-def]
    rep = yield
    if rep.when == "call":
        item.rep_call = rep  # type: ignore[attr-defined]
    return rep
