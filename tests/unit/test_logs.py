"""Structured logs: lines logged while a task runs carry its id and name, in every thread."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from qtasks import logs
from qtasks.asyncio import QueueTasks
from qtasks.cli import commands
from qtasks.logs import JsonFormatter, TaskFieldsFilter, TextFormatter, current_task
from qtasks.plugins.base import BasePlugin
from qtasks.runtime.worker import Worker


@pytest.fixture
def root_logger() -> Iterator[logging.Logger]:
    """The root logger at DEBUG, with its level and handlers put back after the test."""
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    root.setLevel(logging.DEBUG)
    yield root
    root.setLevel(level)
    root.handlers[:] = handlers


def capture(root: logging.Logger, formatter: logging.Formatter) -> io.StringIO:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(TaskFieldsFilter("the-process-worker"))
    handler.setFormatter(formatter)
    root.addHandler(handler)
    return stream


class BrokenCloseHook(BasePlugin):
    """Makes qtasks itself log an error while the task's attempt is being closed."""

    triggers = ("task_executor_task_close",)

    def trigger(self, name: str, **payload: Any) -> None:
        raise RuntimeError("close hook broke")


async def test_every_line_of_a_task_carries_it(root_logger: logging.Logger) -> None:
    stream = capture(root_logger, JsonFormatter())
    app = QueueTasks("logs", broker_url="memory://")
    threads: list[str] = []

    @app.task
    def sync_job(n: int) -> int:
        threads.append(threading.current_thread().name)
        logging.getLogger("user.sync").info("sync job %d", n)
        return n

    @app.task(max_time=5)  # runs in a wait_for task: the context must follow it there too
    def timed_sync_job(n: int) -> int:
        logging.getLogger("user.sync").info("timed sync job %d", n)
        return n

    @app.task(plugins=[BrokenCloseHook()])
    async def async_job(n: int) -> int:
        logging.getLogger("user.async").warning("async job %d", n)
        await asyncio.sleep(0)
        logging.getLogger("user.async").warning("async job %d after a switch", n)
        return n

    worker = Worker(concurrency=4)
    await app.start()
    await worker.start(app)
    try:
        jobs = await asyncio.gather(
            *(
                app.add_task(name, n, timeout=5)
                for name in ("sync_job", "timed_sync_job", "async_job")
                for n in range(3)
            )
        )
    finally:
        await worker.stop()
        await app.stop()
    assert all(job is not None and job.status == "success" for job in jobs)
    assert threads
    assert all(name.startswith("qtasks-task") for name in threads)
    by_uuid = {str(job.uuid): job for job in jobs if job is not None}

    entries = [json.loads(line) for line in stream.getvalue().splitlines()]
    task_lines = [
        e for e in entries if e["logger"].startswith("user.") or "close hook" in e["message"]
    ]
    assert len(task_lines) == 3 + 3 + 3 * 2 + 3  # user lines, and qtasks's own plugin errors
    for entry in task_lines:
        job = by_uuid[entry["task_id"]]
        assert entry["task_name"] == job.name, entry
        assert entry["worker_id"] == worker.id
        if "close hook" not in entry["message"]:
            # The line names the job that logged it, not a neighbour running at the time.
            assert f"job {job.args[0]}" in entry["message"], entry
        assert entry["time"].endswith("Z")
        assert entry["level"] in ("INFO", "WARNING", "ERROR")
    plugin_errors = [e for e in task_lines if "close hook" in e["message"]]
    assert {e["task_name"] for e in plugin_errors} == {"async_job"}
    assert all("RuntimeError" in e["exc_info"] for e in plugin_errors)
    # Lines outside any task: no task fields, the process's worker id.
    started = next(
        e for e in entries if "started" in e["message"] and e["logger"] == "qtasks.runtime.worker"
    )
    assert started["task_id"] is None
    assert started["task_name"] is None
    assert started["worker_id"] == "the-process-worker"
    assert current_task.get() is None  # nothing leaked into the test's own context


async def test_text_lines_name_the_task(root_logger: logging.Logger) -> None:
    stream = capture(root_logger, TextFormatter())
    app = QueueTasks("logs-text", broker_url="memory://")

    @app.task(echo=True)
    def job(ctx: Any) -> None:
        logging.getLogger("user").info("plain line")
        ctx.logger.info("context line")

    worker = Worker()
    await app.start()
    await worker.start(app)
    try:
        record = await app.add_task("job", timeout=5)
    finally:
        await worker.stop()
        await app.stop()
    assert record is not None
    lines = stream.getvalue().splitlines()
    (plain,) = [line for line in lines if "plain line" in line]
    assert plain.endswith(f"user: plain line [task job {record.uuid}]")
    (context_line,) = [line for line in lines if "context line" in line]
    # ctx.logger already starts with the task; it is not repeated.
    assert context_line.endswith(f"qtasks.task.job: [job {record.uuid}] context line")


def test_cli_json_format_prints_one_object_per_line(
    root_logger: logging.Logger, capsys: pytest.CaptureFixture[str]
) -> None:
    root_logger.handlers[:] = []  # a fresh process, where the CLI adds its handler
    commands.configure_logging(None, default="INFO", log_format="json", worker_id="w-1")
    try:
        raise ValueError("bad")
    except ValueError:
        logging.getLogger("qtasks.test").exception("it broke: %s", "details")
    entry = json.loads(capsys.readouterr().err.strip())
    assert entry["message"] == "it broke: details"
    assert entry["level"] == "ERROR"
    assert entry["logger"] == "qtasks.test"
    assert entry["worker_id"] == "w-1"
    assert entry["task_id"] is None
    assert "ValueError: bad" in entry["exc_info"]


def test_app_configured_handlers_get_the_fields(root_logger: logging.Logger) -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(task_id)s|%(worker_id)s|%(message)s"))
    root_logger.handlers[:] = [handler]
    commands.configure_logging(None, default="INFO", worker_id="w-2")
    commands.configure_logging(None, default="INFO", worker_id="w-2")  # idempotent
    assert len(handler.filters) == 1
    logging.getLogger("x").warning("hello")
    assert stream.getvalue() == "None|w-2|hello\n"
    with pytest.raises(ValueError, match="unknown log format"):
        logs.configure("INFO", "xml")
