"""Prometheus metrics of a worker: `qtasks run --metrics-port 9100`, or `MetricsPlugin`.

The worker already counts every attempt per task name (`worker.counters`, see
`qtasks.stats.counters`) for its heartbeat. `WorkerCollector` turns those counters into
Prometheus families when /metrics is scraped, so the hot path pays nothing for metrics
and nothing is counted twice. The HTTP server is prometheus_client's own, in a daemon
thread: a scrape never waits for the event loop, except for the optional queue depth,
which asks the broker on the worker's loop with a short timeout.

From code:

    from qtasks.metrics import MetricsPlugin
    app.add_plugin(MetricsPlugin(port=9100))      # serves while the worker runs

or, with a worker object at hand, `server = serve_metrics(worker, 9100)` ...
`server.close()`. Needs the `metrics` extra: `pip install 'qtasks[metrics]'`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import os
import socket
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from qtasks.errors import ConfigurationError
from qtasks.plugins.base import BasePlugin
from qtasks.plugins.triggers import WORKER_START, WORKER_STOP
from qtasks.stats.counters import (
    CANCELLED,
    FAILED,
    RETRIED,
    SUCCEEDED,
    TIME_BUCKETS_SECONDS,
    TaskCounter,
)

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric
    from prometheus_client.registry import CollectorRegistry

    from qtasks.runtime.worker import Worker

log = logging.getLogger(__name__)

INSTALL_HINT = "Prometheus metrics need prometheus_client: pip install 'qtasks[metrics]'"

QUEUE_DEPTH_TIMEOUT_SECONDS = 1.0
"""How long a scrape waits for the broker's queue sizes before leaving them out."""

_OUTCOMES = (
    ("succeeded", SUCCEEDED),
    ("failed", FAILED),
    ("retried", RETRIED),
    ("cancelled", CANCELLED),
)

# Every family the collector serves: (kind, name, help, labels). Declared once so
# `describe()` can name them all, which lets a registry refuse a second worker's
# collector instead of serving duplicate series.
_FAMILIES: tuple[tuple[str, str, str, tuple[str, ...]], ...] = (
    ("counter", "qtasks_task_processed", "Attempts finished, any outcome.", ("task",)),
    ("counter", "qtasks_task_succeeded", "Attempts that succeeded.", ("task",)),
    (
        "counter",
        "qtasks_task_failed",
        "Attempts that failed for good (no retry left, never retried, or rejected).",
        ("task",),
    ),
    ("counter", "qtasks_task_retried", "Attempts that failed and were scheduled again.", ("task",)),
    ("counter", "qtasks_task_cancelled", "Attempts that ended cancelled.", ("task",)),
    ("gauge", "qtasks_task_running", "Attempts running now.", ("task",)),
    (
        "counter",
        "qtasks_task_redelivered",
        "Deliveries taken again after a fault (worker lost, connection dropped).",
        ("task",),
    ),
    ("histogram", "qtasks_task_duration_seconds", "Run time of finished attempts.", ("task",)),
    (
        "histogram",
        "qtasks_task_queue_wait_seconds",
        "Time from when a message was due (its eta, else its creation) to its start.",
        ("task",),
    ),
    (
        "info",
        "qtasks_worker",
        "The worker serving these metrics.",
        ("worker_id", "host", "pid", "queues", "concurrency", "app"),
    ),
    ("gauge", "qtasks_worker_concurrency", "Tasks the worker runs at once, at most.", ()),
    ("gauge", "qtasks_worker_running", "Tasks the worker runs now.", ()),
    (
        "gauge",
        "qtasks_worker_start_time_seconds",
        "When the worker started, in seconds since the epoch.",
        (),
    ),
    (
        "gauge",
        "qtasks_queue_depth",
        "Messages waiting or in flight per queue, as the broker reports them (brokers that "
        "cannot tell report nothing).",
        ("queue",),
    ),
)


def _prometheus() -> Any:
    """The prometheus_client module; ConfigurationError naming the extra if missing."""
    try:
        import prometheus_client
    except ImportError:
        raise ConfigurationError(INSTALL_HINT) from None
    return prometheus_client


def _empty_families() -> dict[str, Any]:
    """Name -> a family of _FAMILIES with no samples yet."""
    from prometheus_client.core import (
        CounterMetricFamily,
        GaugeMetricFamily,
        HistogramMetricFamily,
        InfoMetricFamily,
    )

    kinds = {
        "counter": CounterMetricFamily,
        "gauge": GaugeMetricFamily,
        "histogram": HistogramMetricFamily,
        "info": InfoMetricFamily,
    }
    return {
        name: kinds[kind](name, doc, labels=[] if kind == "info" else list(labels))
        for kind, name, doc, labels in _FAMILIES
    }


class WorkerCollector:
    """Prometheus families read from a worker's counters at scrape time.

    Runs in the HTTP server's thread while the worker updates the counters on its loop:
    every read copies a list first (one C-level step under the GIL), so a scrape sees
    each counter whole, and a histogram's count always equals its +Inf bucket.
    """

    def __init__(self, worker: Worker | None = None) -> None:
        self.worker = worker
        """The worker to report; None reports nothing (not started yet)."""
        self.loop: asyncio.AbstractEventLoop | None = None
        """The worker's event loop, for the queue depth; None leaves the depth out."""

    def describe(self) -> list[Metric]:
        """Every family's name (no samples), so registries can check for duplicates."""
        return list(_empty_families().values())

    def collect(self) -> Iterator[Metric]:
        """Every family: per-task counters, gauges and histograms, worker info, queue depth."""
        worker = self.worker
        if worker is None:
            return
        families = _empty_families()
        tasks: list[tuple[str, TaskCounter]] = list(worker.counters.items())
        for name, counter in tasks:
            counts = list(counter.outcomes)
            families["qtasks_task_processed"].add_metric([name], sum(counts))
            for outcome, index in _OUTCOMES:
                families[f"qtasks_task_{outcome}"].add_metric([name], counts[index])
            families["qtasks_task_running"].add_metric([name], counter.running)
            families["qtasks_task_redelivered"].add_metric([name], counter.redelivered)
            families["qtasks_task_duration_seconds"].add_metric(
                [name], _buckets(list(counter.duration_counts)), counter.duration_sum
            )
            families["qtasks_task_queue_wait_seconds"].add_metric(
                [name], _buckets(list(counter.wait_counts)), counter.wait_sum
            )
        self._add_worker_samples(worker, families)
        # Families with no samples (a worker not started has no start time) are left out.
        yield from (family for family in families.values() if family.samples)

    def _add_worker_samples(self, worker: Worker, families: dict[str, Any]) -> None:
        try:
            app = worker.app
        except RuntimeError:  # not started, or stopped: only its id is known
            app = None
        queues = worker.resolved_queues(app) if app is not None else list(worker.queues or ())
        concurrency = worker.concurrency or (app.config.max_tasks_process if app else 0)
        families["qtasks_worker"].add_metric(
            [],
            {
                "worker_id": worker.id,
                "host": socket.gethostname(),
                "pid": str(os.getpid()),
                "queues": ",".join(queues),
                "concurrency": str(concurrency),
                "app": app.name if app is not None else "",
            },
        )
        families["qtasks_worker_concurrency"].add_metric([], concurrency)
        families["qtasks_worker_running"].add_metric([], worker.running if app else 0)
        if worker.started_at is not None:
            families["qtasks_worker_start_time_seconds"].add_metric([], worker.started_at)
        if app is not None and queues:
            sizes = self._queue_sizes(app, queues) or {}
            for queue in queues:
                if queue in sizes:
                    families["qtasks_queue_depth"].add_metric([queue], sizes[queue])

    def _queue_sizes(self, app: Any, queues: list[str]) -> dict[str, int] | None:
        """The broker's queue sizes, asked on the worker's loop; None if it cannot say soon."""
        loop = self.loop
        if loop is None or loop.is_closed() or not loop.is_running():
            return None
        with contextlib.suppress(RuntimeError):
            if asyncio.get_running_loop() is loop:
                # Collected on the worker's own loop (generate_latest in an async handler):
                # waiting for the loop here would block it until the timeout.
                return None
        try:
            future = asyncio.run_coroutine_threadsafe(app.broker.queue_sizes(queues), loop)
        except RuntimeError:  # the loop closed between the check and the call
            return None
        try:
            sizes: dict[str, int] = future.result(QUEUE_DEPTH_TIMEOUT_SECONDS)
        except concurrent.futures.TimeoutError:
            future.cancel()
            log.debug(
                "queue sizes took over %.1fs; left out of this scrape",
                QUEUE_DEPTH_TIMEOUT_SECONDS,
            )
            return None
        except Exception:
            log.warning("reading queue sizes for /metrics failed", exc_info=True)
            return None
        return sizes


def _buckets(counts: list[int]) -> list[tuple[str, float]]:
    """Cumulative Prometheus buckets from per-bucket counts (the last one is +Inf)."""
    out: list[tuple[str, float]] = []
    total = 0
    for bound, count in zip(TIME_BUCKETS_SECONDS, counts, strict=False):
        total += count
        out.append((repr(float(bound)), total))
    total += counts[-1]
    out.append(("+Inf", total))
    return out


class MetricsServer:
    """A running /metrics endpoint; `close()` stops it and unregisters the collector."""

    def __init__(
        self,
        collector: WorkerCollector,
        port: int,
        host: str = "127.0.0.1",
        registry: CollectorRegistry | None = None,
    ) -> None:
        prometheus_client = _prometheus()
        self.collector = collector
        self.registry: CollectorRegistry = (
            registry if registry is not None else prometheus_client.REGISTRY
        )
        try:
            self.registry.register(collector)
        except ValueError:
            raise ConfigurationError(
                "this registry serves another worker's metrics already (the names are "
                "taken); pass registry=prometheus_client.CollectorRegistry(), a fresh "
                "CollectorRegistry, for a second worker in one process"
            ) from None
        try:
            server, thread = prometheus_client.start_http_server(
                port, addr=host, registry=self.registry
            )
        except OSError as exc:
            self.registry.unregister(collector)
            raise ConfigurationError(
                f"cannot serve metrics on {host}:{port}: {exc.strerror or exc}; "
                f"pick another --metrics-port (or stop what listens there)"
            ) from None
        self._server = server
        self._thread: threading.Thread = thread
        self.host = host
        self.port: int = server.server_address[1]
        """The port listened on (the one chosen by the system when 0 was asked for)."""
        self._closed = False

    @property
    def url(self) -> str:
        """The address of the metrics page."""
        shown = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{shown}:{self.port}/metrics"

    def close(self) -> None:
        """Stop serving (idempotent)."""
        if self._closed:
            return
        self._closed = True
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
        with contextlib.suppress(KeyError):  # unregistered by someone else already
            self.registry.unregister(self.collector)


def serve_metrics(
    worker: Worker,
    port: int,
    host: str = "127.0.0.1",
    *,
    registry: CollectorRegistry | None = None,
) -> MetricsServer:
    """Serve `worker`'s metrics at http://host:port/metrics until `.close()`.

    `registry` defaults to prometheus_client's global one, so metrics the app defines
    itself, and the process metrics, are on the same page; pass a fresh
    `CollectorRegistry()` for a second worker in one process. Called on the worker's
    event loop, it also reports queue depth. ConfigurationError if the port cannot be
    bound or the `metrics` extra is missing.
    """
    collector = WorkerCollector(worker)
    with contextlib.suppress(RuntimeError):  # no loop here: no queue depth
        collector.loop = asyncio.get_running_loop()
    return MetricsServer(collector, port, host, registry)


class MetricsPlugin(BasePlugin):
    """Serves /metrics for the app's worker while it runs: `app.add_plugin(MetricsPlugin())`.

    The port is bound when the worker starts, or earlier with `bind()` (the CLI does, so a
    busy port is reported before anything else starts).
    """

    triggers = (WORKER_START, WORKER_STOP)

    def __init__(
        self,
        port: int = 9100,
        host: str = "127.0.0.1",
        *,
        registry: CollectorRegistry | None = None,
    ) -> None:
        super().__init__()
        _prometheus()  # fail at configuration time, not when the worker starts
        self.port = port
        self.host = host
        self.registry = registry
        self.server: MetricsServer | None = None
        self._collector = WorkerCollector()

    def bind(self) -> MetricsServer:
        """Start serving now (the worker's families appear once it starts)."""
        if self.server is None:
            self.server = MetricsServer(self._collector, self.port, self.host, self.registry)
            log.info("serving metrics at %s", self.server.url)
        return self.server

    def trigger(self, name: str, **payload: Any) -> None:
        if name == WORKER_START:
            self._collector.worker = payload["worker"]
            self._collector.loop = asyncio.get_running_loop()
            self.bind()
        elif name == WORKER_STOP:
            self._collector.loop = None  # the loop is about to go; no more depth asks
            self.close()

    def stop(self) -> None:
        self.close()

    def close(self) -> None:
        """Stop serving; a later worker start binds again."""
        if self.server is not None:
            self.server.close()
            self.server = None
