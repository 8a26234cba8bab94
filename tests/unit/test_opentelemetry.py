"""OpenTelemetry plugin: one trace from add_task (PRODUCER) to each attempt (CONSUMER)."""

from __future__ import annotations

import sys
from typing import Any

import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from qtasks.asyncio import QueueTasks
from qtasks.errors import ConfigurationError
from qtasks.runtime.worker import Worker


@pytest.fixture
def tracing() -> tuple[TracerProvider, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider, exporter


def one(spans: list[ReadableSpan], name: str) -> ReadableSpan:
    (span,) = [s for s in spans if s.name == name]
    return span


async def run_tasks(app: QueueTasks, *calls: tuple[str, tuple[Any, ...]]) -> list[Any]:
    worker = Worker()
    await app.start()
    await worker.start(app)
    try:
        return [await app.add_task(name, *args, timeout=5) for name, args in calls]
    finally:
        await worker.stop()
        await app.stop()


async def test_worker_span_continues_the_producer_trace(
    tracing: tuple[TracerProvider, InMemorySpanExporter],
) -> None:
    from qtasks.plugins.opentelemetry import OpenTelemetryPlugin

    provider, exporter = tracing
    tracer = provider.get_tracer("test")
    app = QueueTasks("otel", broker_url="memory://")
    app.add_plugin(OpenTelemetryPlugin(tracer_provider=provider))
    seen_headers: list[dict[str, str]] = []

    @app.task(echo=True)
    def work(ctx: Any, n: int) -> int:
        seen_headers.append(dict(ctx.headers))
        with tracer.start_as_current_span("inside the task"):  # a sync task, in a thread
            return n * 2

    with tracer.start_as_current_span("request") as request:
        (record,) = await run_tasks(app, ("work", (21,)))
    assert record.returning == 42
    spans = list(exporter.get_finished_spans())
    producer = one(spans, "add_task work")
    consumer = one(spans, "run work")
    inner = one(spans, "inside the task")
    assert producer.kind is SpanKind.PRODUCER
    assert consumer.kind is SpanKind.CONSUMER
    assert producer.context is not None
    assert consumer.context is not None
    # The producer span is a child of the caller's span ...
    assert producer.parent is not None
    assert producer.parent.span_id == request.get_span_context().span_id
    # ... the worker span continues the same trace, under the producer span ...
    assert consumer.context.trace_id == producer.context.trace_id
    assert consumer.parent is not None
    assert consumer.parent.span_id == producer.context.span_id
    assert consumer.parent.is_remote
    # ... and the task's own spans are children of the worker span, threads included.
    assert inner.parent is not None
    assert inner.parent.span_id == consumer.context.span_id
    assert seen_headers[0]["traceparent"].split("-")[1] == f"{producer.context.trace_id:032x}"
    attributes = dict(consumer.attributes or {})
    assert attributes["messaging.system"] == "qtasks"
    assert attributes["messaging.destination.name"] == "default"
    assert attributes["messaging.message.id"] == str(record.uuid)
    assert attributes["qtasks.task.name"] == "work"
    assert attributes["qtasks.outcome"] == "success"
    assert consumer.status.status_code is StatusCode.UNSET


async def test_errors_and_retries_are_recorded(
    tracing: tuple[TracerProvider, InMemorySpanExporter],
) -> None:
    from qtasks.plugins.opentelemetry import OpenTelemetryPlugin

    provider, exporter = tracing
    app = QueueTasks("otel-errors", broker_url="memory://")
    app.add_plugin(OpenTelemetryPlugin(tracer_provider=provider))

    @app.task(retry=1, retry_backoff=0)
    async def fails() -> None:
        raise ValueError("no luck")

    (record,) = await run_tasks(app, ("fails", ()))
    assert record.status == "error"
    spans = list(exporter.get_finished_spans())
    producer = one(spans, "add_task fails")
    attempts = sorted(
        (s for s in spans if s.name == "run fails"),
        key=lambda s: dict(s.attributes or {})["qtasks.task.attempt"],
    )
    assert [dict(s.attributes or {})["qtasks.outcome"] for s in attempts] == ["retry", "error"]
    assert producer.context is not None
    for attempt in attempts:
        assert attempt.parent is not None
        assert attempt.parent.span_id == producer.context.span_id  # both under the one send
        assert attempt.status.status_code is StatusCode.ERROR
        assert attempt.status.description == "ValueError: no luck"
        (event,) = attempt.events
        assert event.name == "exception"
        event_attributes = dict(event.attributes or {})
        assert event_attributes["exception.type"] == "ValueError"
        assert "raise ValueError" in str(event_attributes["exception.stacktrace"])


def test_without_opentelemetry_the_error_names_the_extra(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from qtasks.plugins.opentelemetry import OpenTelemetryPlugin

    monkeypatch.setitem(sys.modules, "opentelemetry", None)
    with pytest.raises(ConfigurationError, match=r"qtasks\[otel\]"):
        OpenTelemetryPlugin()
