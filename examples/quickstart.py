"""qtasks in one file: define tasks, start a worker process, send tasks, print results.

Run it with `./scripts/demo` (or `python examples/quickstart.py` inside the venv). The
worker is the real CLI (`qtasks -A quickstart:app run`) on the embedded SQLite default:
a file `qtasks.sqlite3` in the working directory, no server needed.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from qtasks import QueueTasks, TaskContext

app = QueueTasks(name="quickstart")


@app.task
def add(x: int, y: int) -> int:
    """A plain function: runs in the worker's thread pool."""
    return x + y


@app.task(priority=1, max_time=5)
async def slow_square(x: int) -> int:
    """A coroutine: runs on the worker's event loop."""
    await asyncio.sleep(0.1)
    return x * x


def shout(step: str) -> str:
    """Called with every value the generator yields; its return is sent back in."""
    return step.upper()


@app.task(generate_handler=shout)
def pipeline(name: str):  # type: ignore[no-untyped-def]
    """A generator: each yield goes to `shout`, whose result comes back into the generator."""
    first = yield f"fetch {name}"
    second = yield f"parse {name}"
    return f"{first} -> {second}"


@app.task(echo=True, retry=2, retry_backoff=0.2, retry_on_exc=[ConnectionError])
def flaky(ctx: TaskContext, url: str) -> str:
    """Fails twice with a retryable error, then succeeds: ctx.attempt counts the retries."""
    if ctx.attempt < 2:
        raise ConnectionError(f"{url} unreachable (attempt {ctx.attempt})")
    return f"fetched {url} on attempt {ctx.attempt}"


@app.task
def divide(x: int, y: int) -> float:
    """Fails for y == 0: the error and its traceback are recorded, the worker goes on."""
    return x / y


def main() -> int:
    console = Console()
    here = Path(__file__).resolve().parent
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(here), os.environ.get("PYTHONPATH", "")]),
    }
    cmd = [sys.executable, "-m", "qtasks", "-A", "quickstart:app", "run", "--log-level", "WARNING"]
    console.print(f"[bold]starting a worker:[/] {' '.join(cmd[2:])}")
    worker = subprocess.Popen(cmd, env=env)
    try:
        started = time.perf_counter()
        sent = [
            ("add(2, 3)", add.add_task(2, 3)),
            ("slow_square(7)", slow_square.add_task(7)),
            ("pipeline('report')", pipeline.add_task("report")),
            ("flaky('example.org')", flaky.add_task("example.org")),
            ("divide(1, 0)", divide.add_task(1, 0)),
        ]
        table = Table(title="qtasks quickstart: results from the worker")
        for column in ("task", "status", "result / error", "attempts", "uuid"):
            table.add_column(column)
        ok = True
        for label, record in sent:
            final = app.wait(record.uuid, timeout=30)
            shown = (
                repr(final.returning)
                if final.status == "success"
                else f"{final.error_type}: {final.error_message}"
            )
            ok &= final.status == ("error" if label.startswith("divide") else "success")
            table.add_row(label, str(final.status), shown, str(final.attempts), str(final.uuid)[:8])
        console.print(table)
        console.print(f"all done in {time.perf_counter() - started:.2f}s")
        return 0 if ok else 1
    finally:
        worker.send_signal(signal.SIGTERM)
        worker.wait(timeout=60)
        app.close()


if __name__ == "__main__":
    sys.exit(main())
