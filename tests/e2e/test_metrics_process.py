"""`qtasks run --metrics-port`: CLI workers serve /metrics; child i of --processes N on port+i."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from qtasks import QueueConfig, QueueTasks

from .conftest import WorkerProcess

pytestmark = pytest.mark.e2e


def free_ports(count: int) -> int:
    """A port P such that P .. P+count-1 are free now (the kernel's pick, then checked)."""
    for _ in range(50):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            first = probe.getsockname()[1]
        if first + count > 65535:
            continue
        sockets = []
        try:
            for port in range(first, first + count):
                s = socket.socket()
                sockets.append(s)
                s.bind(("127.0.0.1", port))
        except OSError:
            continue
        finally:
            for s in sockets:
                s.close()
        return first
    raise AssertionError(f"found no {count} consecutive free ports")


def scrape(port: int) -> dict[str, list[tuple[dict[str, str], float]]] | None:
    """Sample name -> (labels, value) pairs, or None while nothing listens yet."""
    try:
        response = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=2)
    except httpx.TransportError:
        return None
    response.raise_for_status()
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            out.setdefault(sample.name, []).append((sample.labels, sample.value))
    return out


def value(page: dict[str, list[tuple[dict[str, str], float]]], name: str, task: str) -> float:
    return sum(v for labels, v in page.get(name, []) if labels.get("task") == task)


def wait_for_page(
    port: int,
    predicate: Callable[[dict[str, list[tuple[dict[str, str], float]]]], bool],
    worker: WorkerProcess,
    timeout: float = 30.0,
) -> dict[str, list[tuple[dict[str, str], float]]]:
    deadline = time.monotonic() + timeout
    page = None
    while time.monotonic() < deadline:
        assert worker.proc.poll() is None, f"worker exited:\n{worker.log()}"
        page = scrape(port)
        if page is not None and predicate(page):
            return page
        time.sleep(0.1)
    raise AssertionError(f"port {port}: no matching metrics within {timeout}s; last: {page}")


def producer_app(folder: Path) -> QueueTasks:
    return QueueTasks(
        "e2e",
        broker_url=f"sqlite:///{folder / 'e2e.sqlite3'}",
        config=QueueConfig(poll_interval_seconds=0.01),
    )


def test_one_worker_serves_metrics_and_json_logs(
    e2e_dir: Callable[..., Path], start_worker: Callable[..., WorkerProcess]
) -> None:
    folder = e2e_dir()
    port = free_ports(1)
    worker = start_worker(folder, "--metrics-port", str(port), "--log-format", "json")
    wait_for_page(port, lambda page: "qtasks_worker_info" in page, worker)
    app = producer_app(folder)
    try:
        records = [app.add_task("square", n) for n in range(5)]
        for record in records:
            assert record is not None
            assert app.wait(record.uuid, 30).returning == record.args[0] ** 2
    finally:
        app.close()
    page = wait_for_page(
        port, lambda p: value(p, "qtasks_task_succeeded_total", "square") == 5, worker
    )
    assert value(page, "qtasks_task_processed_total", "square") == 5
    assert value(page, "qtasks_task_duration_seconds_count", "square") == 5
    ((info, _),) = page["qtasks_worker_info"]
    assert info["queues"] == "default"
    assert info["pid"] == str(worker.pid)
    assert "process_cpu_seconds_total" in page  # the process metrics come along
    lines = [json.loads(line) for line in worker.log().splitlines() if line.strip()]
    started = [e for e in lines if "started" in e["message"] and e["logger"].endswith("worker")]
    assert started, lines
    assert all(e["worker_id"] == info["worker_id"] for e in lines)
    assert {"time", "level", "logger", "message", "task_id", "task_name"} <= set(lines[0])


def test_each_child_serves_its_own_port(
    e2e_dir: Callable[..., Path], start_worker: Callable[..., WorkerProcess]
) -> None:
    folder = e2e_dir()
    port = free_ports(2)
    worker = start_worker(folder, "--processes", "2", "--metrics-port", str(port))
    pages = [
        wait_for_page(p, lambda page: "qtasks_worker_info" in page, worker)
        for p in (port, port + 1)
    ]
    ids = {page["qtasks_worker_info"][0][0]["worker_id"] for page in pages}
    assert len(ids) == 2  # two different workers
    app = producer_app(folder)
    try:
        records = [app.add_task("square", n) for n in range(20)]
        for record in records:
            assert record is not None
            app.wait(record.uuid, 30)
    finally:
        app.close()

    def total() -> float:
        pages = [scrape(p) or {} for p in (port, port + 1)]
        return sum(value(page, "qtasks_task_succeeded_total", "square") for page in pages)

    deadline = time.monotonic() + 30
    while total() != 20:
        assert time.monotonic() < deadline, f"children counted {total()} of 20"
        time.sleep(0.1)
