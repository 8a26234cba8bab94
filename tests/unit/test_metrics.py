"""Prometheus metrics: the worker's counters scraped over HTTP, and the CLI's run flags."""

from __future__ import annotations

import asyncio
import logging
import math
import socket
import sys
import uuid
from pathlib import Path

import httpx
import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from qtasks.asyncio import QueueTasks
from qtasks.cli.args import RunArgs
from qtasks.cli.main import main
from qtasks.errors import ConfigurationError, Retry
from qtasks.metrics import MetricsPlugin, serve_metrics
from qtasks.runtime.worker import Worker


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """(sample name, sorted labels) -> value, from a /metrics page."""
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


async def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    async with httpx.AsyncClient() as client:
        response = await client.get(url)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    return samples(response.text)


def task(name: str, **labels: str) -> tuple[tuple[str, str], ...]:
    return tuple(sorted({"task": name, **labels}.items()))


async def test_scrape_shows_counters_moving() -> None:
    app = QueueTasks("metrics", broker_url="memory://")
    release = asyncio.Event()

    @app.task
    async def ok(n: int) -> int:
        return n

    @app.task(retry=1, retry_backoff=0)
    async def flaky() -> None:
        raise Retry(delay=0) if not release.is_set() else ValueError("boom")

    @app.task
    async def slow() -> None:
        await release.wait()

    worker = Worker(concurrency=4)
    await app.start()
    await worker.start(app)
    server = serve_metrics(worker, 0, registry=CollectorRegistry())
    try:
        before = await scrape(server.url)
        assert ("qtasks_task_processed_total", task("ok")) not in before
        info = next(k for k in before if k[0] == "qtasks_worker_info")
        assert ("worker_id", worker.id) in info[1]
        assert ("concurrency", "4") in info[1]
        assert ("queues", "default") in info[1]
        assert before[("qtasks_worker_concurrency", ())] == 4

        for n in range(3):
            await app.add_task("ok", n, timeout=5)
        running = await app.add_task("slow")
        assert running is not None
        while worker.counters["slow"].running == 0:
            await asyncio.sleep(0.01)
        mid = await scrape(server.url)
        assert mid[("qtasks_task_processed_total", task("ok"))] == 3
        assert mid[("qtasks_task_succeeded_total", task("ok"))] == 3
        assert mid[("qtasks_task_running", task("slow"))] == 1
        assert mid[("qtasks_worker_running", ())] == 1
        assert mid[("qtasks_task_duration_seconds_count", task("ok"))] == 3
        assert mid[("qtasks_task_duration_seconds_bucket", task("ok", le="+Inf"))] == 3
        assert mid[("qtasks_task_queue_wait_seconds_count", task("ok"))] == 3
        assert mid[("qtasks_task_duration_seconds_sum", task("ok"))] >= 0
        # The memory broker reports its queue: the slow task is in flight.
        assert mid[("qtasks_queue_depth", (("queue", "default"),))] == 1

        first = await app.add_task("flaky")
        assert first is not None
        while worker.counters["flaky"].outcomes[2] == 0:  # retried once
            await asyncio.sleep(0.01)
        release.set()
        await app.wait(first.uuid, 5)
        await app.wait(running.uuid, 5)
        after = await scrape(server.url)
        assert after[("qtasks_task_retried_total", task("flaky"))] == 1
        assert after[("qtasks_task_failed_total", task("flaky"))] == 1
        assert after[("qtasks_task_processed_total", task("flaky"))] == 2
        assert after[("qtasks_task_running", task("slow"))] == 0
        assert after[("qtasks_task_succeeded_total", task("slow"))] == 1
        # Buckets are cumulative and end at the count.
        buckets = [
            value
            for (name, labels), value in after.items()
            if name == "qtasks_task_duration_seconds_bucket" and ("task", "ok") in labels
        ]
        assert buckets == sorted(buckets)
        assert max(buckets) == 3
    finally:
        server.close()
        await worker.stop()
        await app.stop()
    with pytest.raises(httpx.ConnectError):
        await scrape(server.url)


async def test_plugin_serves_while_the_worker_runs() -> None:
    registry = CollectorRegistry()
    app = QueueTasks("metrics-plugin", broker_url="memory://")

    @app.task
    def add(x: int, y: int) -> int:
        return x + y

    plugin = MetricsPlugin(port=0, registry=registry)
    app.add_plugin(plugin, component="worker")
    worker = Worker()
    await app.start()
    await worker.start(app)
    try:
        assert plugin.server is not None
        url = plugin.server.url
        await app.add_task("add", 1, 2, timeout=5)
        page = await scrape(url)
        assert page[("qtasks_task_succeeded_total", task("add"))] == 1
        assert math.isfinite(page[("qtasks_worker_start_time_seconds", ())])
    finally:
        await worker.stop()
        await app.stop()
    assert plugin.server is None  # closed with the worker
    assert list(registry.collect()) == []  # and unregistered


async def test_busy_port_is_a_clear_configuration_error() -> None:
    first = serve_metrics(Worker(), 0, registry=CollectorRegistry())
    try:
        with pytest.raises(ConfigurationError, match=rf"127\.0\.0\.1:{first.port}.*--metrics"):
            serve_metrics(Worker(), first.port, registry=CollectorRegistry())
    finally:
        first.close()


async def test_a_worker_not_started_reports_only_its_identity() -> None:
    worker = Worker()
    server = serve_metrics(worker, 0, registry=CollectorRegistry())
    try:
        page = await scrape(server.url)
    finally:
        server.close()
    assert page[("qtasks_worker_running", ())] == 0
    assert not [k for k in page if k[0].startswith("qtasks_task_")]


def test_children_get_consecutive_metrics_ports() -> None:
    args = RunArgs("m:app", processes=3, metrics_port=9100, metrics_host="0.0.0.0")
    children = [args.for_child(i) for i in range(3)]
    assert [c.metrics_port for c in children] == [9100, 9101, 9102]
    assert all(c.processes == 1 for c in children)
    assert children[2].to_argv()[-4:] == ["--metrics-port", "9102", "--metrics-host", "0.0.0.0"]
    assert RunArgs("m:app", processes=2, metrics_port=0).for_child(1).metrics_port == 0
    assert RunArgs("m:app").for_child(0).metrics_port is None
    with pytest.raises(ValueError, match="past 65535"):
        RunArgs("m:app", processes=3, metrics_port=65534).check_metrics_ports()


async def test_a_second_worker_in_one_registry_is_refused() -> None:
    registry = CollectorRegistry()
    first = serve_metrics(Worker(), 0, registry=registry)
    try:
        with pytest.raises(ConfigurationError, match="fresh CollectorRegistry"):
            serve_metrics(Worker(), 0, registry=registry)
    finally:
        first.close()


def test_without_prometheus_client_the_error_names_the_extra(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "prometheus_client", None)
    with pytest.raises(ConfigurationError, match=r"pip install 'qtasks\[metrics\]'"):
        MetricsPlugin(port=0)


def test_run_with_a_busy_metrics_port_exits_2_before_starting(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    module = f"metrics_busy_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{module}.py").write_text(
        "from qtasks import QueueTasks\napp = QueueTasks('busy', broker_url='memory://')\n"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [str(tmp_path), *sys.path])
    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", list(root.handlers))
    monkeypatch.setattr(root, "level", root.level)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code = main(["-A", f"{module}:app", "run", "--metrics-port", str(port)])
    sys.modules.pop(module, None)
    assert code == 2
    err = capsys.readouterr().err
    assert f"cannot serve metrics on 127.0.0.1:{port}" in err
    assert "--metrics-port" in err


async def test_collecting_on_the_worker_loop_does_not_block_it() -> None:
    from prometheus_client import generate_latest

    app = QueueTasks("metrics-on-loop", broker_url="memory://")
    registry = CollectorRegistry()
    worker = Worker()
    await app.start()
    await worker.start(app)
    server = serve_metrics(worker, 0, registry=registry)
    try:
        started = asyncio.get_running_loop().time()
        page = generate_latest(registry).decode()  # on the loop, as an async web app would
        assert asyncio.get_running_loop().time() - started < 0.5
    finally:
        server.close()
        await worker.stop()
        await app.stop()
    assert "qtasks_worker_info" in page
    assert "qtasks_queue_depth" not in page  # left out rather than waited for
