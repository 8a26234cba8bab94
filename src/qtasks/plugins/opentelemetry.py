"""OpenTelemetry tracing: one trace from `add_task` to every attempt that runs the task.

    from qtasks.plugins.opentelemetry import OpenTelemetryPlugin
    app.add_plugin(OpenTelemetryPlugin())        # in the producers and in the workers

* Producer: `qtasks_add_task_before_broker` opens a PRODUCER span `add_task NAME` (a
  child of whatever span is current where add_task is called) and writes its W3C trace
  context (`traceparent`, `tracestate`, baggage) into the message's `headers`;
  `qtasks_add_task_after_broker` ends it once the message is stored and published.
* Worker: `worker_execute_before` reads the context from the headers and opens a
  CONSUMER span `run NAME` whose parent is the producer span, and makes it current
  while the task runs, so spans the task opens (HTTP clients, databases, subtasks'
  add_task) are its children — in sync tasks' threads too, which get the task's
  context variables. `worker_execute_after` records the outcome: an error or a retry
  sets the span status to ERROR with an `exception` event (type, message, traceback).
  Retries carry the same headers, so every attempt is a child of the one producer span.

Spans go to the tracer provider given, else the global one (set up the SDK and an
exporter as usual). Needs the `otel` extra: `pip install 'qtasks[otel]'` (the API only;
install `opentelemetry-sdk` and an exporter to record anything).
"""

from __future__ import annotations

import collections
import uuid as uuid_module
from typing import TYPE_CHECKING, Any

import msgspec

from qtasks.errors import ConfigurationError
from qtasks.plugins.base import BasePlugin
from qtasks.plugins.triggers import (
    QTASKS_ADD_TASK_AFTER_BROKER,
    QTASKS_ADD_TASK_BEFORE_BROKER,
    WORKER_EXECUTE_AFTER,
    WORKER_EXECUTE_BEFORE,
    WORKER_STOP,
)

if TYPE_CHECKING:
    from opentelemetry.propagators.textmap import TextMapPropagator
    from opentelemetry.trace import Span, TracerProvider

    from qtasks.message import TaskMessage
    from qtasks.runtime.executor import Outcome

INSTALL_HINT = "tracing needs OpenTelemetry: pip install 'qtasks[otel]'"

MAX_OPEN_SPANS = 10_000
"""Spans kept open at most per side. A producer span whose add_task failed between the
two triggers (the broker was down) never sees its end trigger; past this many the oldest
is ended as failed, so a long-lived producer cannot leak them."""

MESSAGING_SYSTEM = "qtasks"


class OpenTelemetryPlugin(BasePlugin):
    """PRODUCER spans around add_task, CONSUMER spans around each attempt; one trace."""

    triggers = (
        QTASKS_ADD_TASK_BEFORE_BROKER,
        QTASKS_ADD_TASK_AFTER_BROKER,
        WORKER_EXECUTE_BEFORE,
        WORKER_EXECUTE_AFTER,
        WORKER_STOP,
    )

    def __init__(
        self,
        tracer_provider: TracerProvider | None = None,
        propagator: TextMapPropagator | None = None,
        *,
        name: str | None = None,
    ) -> None:
        super().__init__(name)
        try:
            from opentelemetry import propagate, trace
        except ImportError:
            raise ConfigurationError(INSTALL_HINT) from None
        self._trace = trace
        self.tracer = trace.get_tracer("qtasks", tracer_provider=tracer_provider)
        self.propagator = propagator if propagator is not None else propagate.get_global_textmap()
        self._producing: collections.OrderedDict[uuid_module.UUID, Span] = collections.OrderedDict()
        self._consuming: collections.OrderedDict[tuple[uuid_module.UUID, int], tuple[Span, Any]] = (
            collections.OrderedDict()
        )

    def trigger(self, name: str, **payload: Any) -> dict[str, Any] | None:
        if name == QTASKS_ADD_TASK_BEFORE_BROKER:
            return {"message": self._produce(payload["message"])}
        if name == QTASKS_ADD_TASK_AFTER_BROKER:
            span = self._producing.pop(payload["message"].uuid, None)
            if span is not None:
                span.end()
        elif name == WORKER_EXECUTE_BEFORE:
            self._consume(payload["message"], payload["worker"])
        elif name == WORKER_EXECUTE_AFTER:
            self._consumed(payload["message"], payload["outcome"])
        elif name == WORKER_STOP:
            self._end_all("the worker stopped before the attempt ended")
        return None

    # -- producer ------------------------------------------------------------------------

    def _produce(self, message: TaskMessage) -> TaskMessage:
        """Open the PRODUCER span; the message with its trace context in the headers."""
        trace = self._trace
        span = self.tracer.start_span(
            f"add_task {message.name}",
            kind=trace.SpanKind.PRODUCER,
            attributes={
                **_message_attributes(message),
                "messaging.operation.type": "send",
                "messaging.operation.name": "add_task",
            },
        )
        headers = dict(message.headers)
        self.propagator.inject(headers, context=trace.set_span_in_context(span))
        self._remember(self._producing, message.uuid, span)
        return msgspec.structs.replace(message, headers=headers)

    # -- worker --------------------------------------------------------------------------

    def _consume(self, message: TaskMessage, worker: Any) -> None:
        """Open the CONSUMER span under the producer's context and make it current."""
        from opentelemetry import context

        trace = self._trace
        parent = self.propagator.extract(message.headers)
        attributes = {
            **_message_attributes(message),
            "messaging.operation.type": "process",
            "messaging.operation.name": "run",
            "qtasks.task.attempt": message.attempt,
        }
        worker_id = getattr(worker, "id", None)
        if isinstance(worker_id, str):
            attributes["qtasks.worker.id"] = worker_id
        span = self.tracer.start_span(
            f"run {message.name}",
            context=parent,
            kind=trace.SpanKind.CONSUMER,
            attributes=attributes,
        )
        # Attached in the worker's slot (the same asyncio task fires execute_after), so the
        # executor, its threads and the task's own spans run inside it.
        token = context.attach(trace.set_span_in_context(span, parent))
        self._remember(self._consuming, (message.uuid, message.attempt), (span, token))

    def _consumed(self, message: TaskMessage, outcome: Outcome) -> None:
        """Record the outcome on the CONSUMER span, end it, restore the previous context."""
        from opentelemetry import context

        entry = self._consuming.pop((message.uuid, message.attempt), None)
        if entry is None:
            return
        span, token = entry
        kind = outcome.kind.value
        span.set_attribute("qtasks.outcome", kind)
        if kind in ("error", "retry"):
            description = f"{outcome.error_type}: {outcome.error_message}"
            span.add_event(
                "exception",
                {
                    "exception.type": outcome.error_type or "",
                    "exception.message": outcome.error_message or "",
                    "exception.stacktrace": outcome.traceback or "",
                },
            )
            span.set_status(self._trace.Status(self._trace.StatusCode.ERROR, description))
            if kind == "retry":
                span.set_attribute("qtasks.retry_delay_seconds", outcome.retry_delay)
        span.end()
        context.detach(token)

    # -- bookkeeping -----------------------------------------------------------------------

    def _remember(self, spans: collections.OrderedDict[Any, Any], key: Any, value: Any) -> None:
        spans[key] = value
        while len(spans) > MAX_OPEN_SPANS:
            _, old = spans.popitem(last=False)
            self._end_failed(old[0] if isinstance(old, tuple) else old, "never ended")

    def _end_all(self, why: str) -> None:
        for span, _ in self._consuming.values():
            self._end_failed(span, why)
        self._consuming.clear()

    def _end_failed(self, span: Span, why: str) -> None:
        span.set_status(self._trace.Status(self._trace.StatusCode.ERROR, why))
        span.end()

    def stop(self) -> None:
        self._end_all("the plugin stopped before the attempt ended")
        for span in self._producing.values():
            self._end_failed(span, "the plugin stopped before the message was published")
        self._producing.clear()


def _message_attributes(message: TaskMessage) -> dict[str, Any]:
    return {
        "messaging.system": MESSAGING_SYSTEM,
        "messaging.destination.name": message.queue,
        "messaging.message.id": str(message.uuid),
        "qtasks.task.name": message.name,
        "qtasks.task.priority": message.priority,
    }
