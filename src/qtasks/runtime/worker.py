"""The worker: takes deliveries, orders them, runs a bounded number at once, acks after storing.

Shape of one worker process:

    fetcher ──► priority buffer ──► N slots (each runs one task at a time) ──► writer
    (batches,    (priority, age)     (N = max_tasks_process: the semaphore)    (group commit:
     bounded                                                                   save records,
     prefetch)                                                                 then ack)

A fixed pool of N slot coroutines bounds concurrency exactly as a semaphore would, without
creating an asyncio task per message. The writer batches whatever finished while the
previous write was in flight, so acks and result writes cost one round trip per batch,
and a message is acked only after its record is stored (at-least-once).

A message handed out again after its worker died (delivery_count > 1) runs alone: the
fetcher gives the rest of its batch back uncounted, waits until the worker holds no other
claim, and then claims one message at a time until a fresh one comes (see ALONE_SECONDS).
So a task that kills its worker takes its neighbours down at most once, and only it
reaches max_deliveries. A redelivery whose attempt already succeeded is acked unrun.

A task registered with `at_most_once=True` trades that for the opposite promise: the
worker stores its `process` record (one storage write) before the function starts, and a
delivery of an attempt whose record shows it started is never run again; it is
dead-lettered `worker_lost` with `TaskInterrupted` instead (or acked, if it ended). A
task that must not run twice (a payment, an e-mail) then runs at most once per attempt,
and a crash shows up as a dead letter that a person can send again, never as a silent
second run.

The worker fires the worker_*, broker_fetch/ack, storage_save and
global_config_register_worker triggers, starts the plugins of the `worker` and
`task_executor` components and the tasks' own plugins, and owns the `worker` dependency
scope, closed when it stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import socket
import time
import uuid as uuid_module
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import msgspec

from qtasks._version import __version__
from qtasks.errors import DecodeError, PluginError, TaskInterrupted, UnknownTask, WorkerLost
from qtasks.interfaces import Delivery
from qtasks.logs import current_task
from qtasks.message import (
    DEFAULT_QUEUE,
    DeadLetter,
    DeadLetterReason,
    Envelope,
    Task,
    TaskMessage,
    TaskStatusEnum,
)
from qtasks.plugins.base import BasePlugin, PluginRegistry, start_plugins, stop_plugins
from qtasks.plugins.depends import DependencyScope, Scope
from qtasks.plugins.triggers import (
    BROKER_ACK,
    BROKER_FETCH,
    GLOBAL_CONFIG_REGISTER_WORKER,
    STORAGE_SAVE,
    WORKER_EXECUTE_AFTER,
    WORKER_EXECUTE_BEFORE,
    WORKER_START,
    WORKER_STOP,
    WORKER_TASK_ERROR_RETRY,
)
from qtasks.runtime.executor import Outcome, OutcomeKind, TaskExecutor
from qtasks.runtime.threads import TaskThreadPool
from qtasks.serializers import peek_identity
from qtasks.stats.counters import CANCELLED, FAILED, RETRIED, SUCCEEDED, WorkerCounters

if TYPE_CHECKING:
    from qtasks.app import AsyncQueueTasks

log = logging.getLogger(__name__)

_FINAL_STATUS = {
    OutcomeKind.SUCCESS: TaskStatusEnum.SUCCESS,
    OutcomeKind.ERROR: TaskStatusEnum.ERROR,
    OutcomeKind.CANCEL: TaskStatusEnum.CANCEL,
    OutcomeKind.RETRY: TaskStatusEnum.RETRY,
}


STARTED_RECORD_DELAY_SECONDS = 0.05
"""A task still running this long after it started gets its `process` record stored."""

ALONE_SECONDS = 10.0
"""How long a redelivered task runs alone before the worker takes other work beside it.

A message handed out again after its worker died (delivery_count > 1) may be what killed
it. Run beside others, it would take them down with it again and again, and they would
reach max_deliveries with it and be dead-lettered worker_lost though innocent. So the
worker claims it alone (the rest of its batch goes back uncounted), waits until nothing
else runs or waits to be written, and runs it by itself. A task that kills its worker
does so in the first seconds (a segfault, a huge allocation); one still alive after this
long is let be, so a long redelivered task does not idle the worker's other slots."""


class ResultWriter:
    """Group-commits records, then acks/requeues/releases the deliveries they finish."""

    def __init__(
        self,
        app: AsyncQueueTasks,
        on_settled: Callable[[], None] | None = None,
        worker: Worker | None = None,
    ) -> None:
        self.app = app
        self.worker = worker
        """The worker it writes for (the `worker` of its triggers)."""
        self.unsettled = 0
        """Deliveries handed over and not yet acked, requeued or released: still claimed."""
        self._on_settled = on_settled
        self._saves: dict[uuid_module.UUID, Task] = {}
        self._started: dict[uuid_module.UUID, Task] = {}
        self._started_timer: asyncio.TimerHandle | None = None
        self._acks: list[Delivery] = []
        self._requeues: list[tuple[Delivery, Envelope]] = []
        self._releases: list[Delivery] = []
        self._dead: list[tuple[Delivery, DeadLetter]] = []
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Begin flushing in the background."""
        self._task = asyncio.ensure_future(self._run())

    def save(self, record: Task) -> None:
        """Store a record with the next batch (a later record of the same task wins)."""
        self._saves[record.uuid] = record
        self._kick()

    async def save_now(self, record: Task) -> None:
        """Store a record at once, through the storage_save trigger, before going on."""
        records = [record]
        plugins = self.app.plugins
        if plugins and STORAGE_SAVE in plugins:
            changes = await plugins.fire(
                STORAGE_SAVE, storage=self.app.storage, worker=self.worker, records=records
            )
            records = changes.get("records", records)
        await self.app.storage.save(records)

    def started(self, record: Task) -> None:
        """Note that a task began; its `process` record is stored only if it still runs later.

        A task that ends within STARTED_RECORD_DELAY_SECONDS goes from `new` to its final
        status in one write: for short tasks this halves the storage writes, and a
        `process` status that nobody could have seen is no loss.
        """
        self._started[record.uuid] = record
        if self._started_timer is None:
            self._started_timer = asyncio.get_running_loop().call_later(
                STARTED_RECORD_DELAY_SECONDS, self._store_long_running
            )

    def _store_long_running(self) -> None:
        self._started_timer = None
        cutoff = time.time() - STARTED_RECORD_DELAY_SECONDS
        due = [u for u, r in self._started.items() if (r.started_at or 0.0) <= cutoff]
        for uuid in due:
            self._saves.setdefault(uuid, self._started.pop(uuid))
        if self._started:
            self._started_timer = asyncio.get_running_loop().call_later(
                STARTED_RECORD_DELAY_SECONDS, self._store_long_running
            )
        if due:
            self._kick()

    def finish(self, delivery: Delivery, record: Task) -> None:
        """Store the final record, then ack its delivery."""
        self._started.pop(record.uuid, None)
        self._saves[record.uuid] = record
        self._acks.append(delivery)
        self.unsettled += 1
        self._kick()

    def retry(self, delivery: Delivery, record: Task, envelope: Envelope) -> None:
        """Store the retry record, then swap the delivery for the next attempt's message."""
        self._started.pop(record.uuid, None)
        self._saves[record.uuid] = record
        self._requeues.append((delivery, envelope))
        self.unsettled += 1
        self._kick()

    def requeue(self, delivery: Delivery, envelope: Envelope) -> None:
        """Swap the delivery for `envelope` without storing a record."""
        self._requeues.append((delivery, envelope))
        self.unsettled += 1
        self._kick()

    def dead(self, delivery: Delivery, record: Task, letter: DeadLetter) -> None:
        """Store the final record, then move the delivery to its queue's dead letters."""
        self._started.pop(record.uuid, None)
        self._saves[record.uuid] = record
        self._dead.append((delivery, letter))
        self.unsettled += 1
        self._kick()

    def ack(self, delivery: Delivery) -> None:
        """Ack a delivery with no record to store (a duplicate of a finished task)."""
        self._acks.append(delivery)
        self.unsettled += 1
        self._kick()

    def release(self, delivery: Delivery) -> None:
        """Give an unfinished delivery back to the broker."""
        self._releases.append(delivery)
        self.unsettled += 1
        self._kick()

    def _kick(self) -> None:
        self._idle.clear()
        self._wake.set()

    def _pending(self) -> bool:
        return bool(self._saves or self._acks or self._requeues or self._releases or self._dead)

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            try:
                await self.flush()
            except asyncio.CancelledError:
                # A client library may let a CancelledError of its own (a connection
                # dropped mid-call) escape; flush() kept what it had not written. Only a
                # cancellation of this task (close()) ends the writer: if it ended
                # otherwise, the worker would wait for room forever.
                me = asyncio.current_task()
                cancelling = getattr(me, "cancelling", None)
                if cancelling is None or cancelling():
                    raise
                log.warning("a broker or storage call was cancelled under the writer; retrying")
                await asyncio.sleep(0.05)
                self._wake.set()

    async def flush(self, give_up_after: float | None = None) -> None:
        """Write everything pending; on errors keep it and retry with backoff."""
        delay = 0.05
        deadline = None if give_up_after is None else time.monotonic() + give_up_after
        while self._pending():
            saves, acks, requeues, releases, dead = (
                self._saves,
                self._acks,
                self._requeues,
                self._releases,
                self._dead,
            )
            self._saves, self._acks, self._requeues, self._releases = {}, [], [], []
            self._dead = []
            plugins = self.app.plugins
            try:
                if saves:
                    records = list(saves.values())
                    if plugins and STORAGE_SAVE in plugins:
                        changes = await plugins.fire(
                            STORAGE_SAVE,
                            storage=self.app.storage,
                            worker=self.worker,
                            records=records,
                        )
                        records = changes.get("records", records)
                    if acks:
                        # Records and acks in one round trip where the broker can.
                        await self.app.broker.settle(self.app.storage, records, acks)
                        saves, done, acks = {}, acks, []
                        await self._acked(done)
                    else:
                        await self.app.storage.save(records)
                        saves = {}
                if requeues:
                    await self.app.broker.requeue(requeues)
                    self._settled(len(requeues))
                    requeues = []
                if acks:
                    await self.app.broker.ack(acks)
                    done, acks = acks, []
                    await self._acked(done)
                if dead:
                    # After the acks: moving a message aside can take a broker round trip
                    # (RabbitMQ, Kafka), which finished tasks' acks need not wait for.
                    await self._dead_letter(dead)
                    self._settled(len(dead))
                    dead = []
                if releases:
                    await self.app.broker.release(releases)
                    self._settled(len(releases))
                    releases = []
            except BaseException as exc:
                # Put back what was not written, older entries first so newer records win;
                # also when cancelled mid-write by close(), whose own flush then writes it.
                self._saves = {**saves, **self._saves}
                self._acks[:0] = acks
                self._requeues[:0] = requeues
                self._releases[:0] = releases
                self._dead[:0] = dead
                if not isinstance(exc, Exception):
                    raise
                log.exception("storing results failed; will retry in %.2fs", delay)
                if deadline is not None and time.monotonic() + delay > deadline:
                    log.error(
                        "giving up on %d unstored results; brokers will redeliver",
                        len(acks) + len(dead),
                    )
                    return
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
        self._idle.set()

    async def _acked(self, acks: list[Delivery]) -> None:
        self._settled(len(acks))
        plugins = self.app.plugins
        if plugins and BROKER_ACK in plugins:
            await plugins.fire(
                BROKER_ACK, broker=self.app.broker, worker=self.worker, deliveries=acks
            )

    async def _dead_letter(self, items: list[tuple[Delivery, DeadLetter]]) -> None:
        broker = self.app.broker
        try:
            await broker.dead_letter(items)
        except NotImplementedError:
            # A third-party broker without dead letters: the error records are stored, so
            # nothing is silently lost; settle the messages as finished.
            log.warning(
                "%s keeps no dead letters: %d messages acked instead (their error records "
                "are stored)",
                type(broker).__name__,
                len(items),
            )
            await broker.ack([d for d, _ in items])

    def _settled(self, count: int) -> None:
        self.unsettled -= count
        if self._on_settled is not None:
            self._on_settled()

    async def close(self, give_up_after: float) -> None:
        """Flush what is left and stop."""
        if self._started_timer is not None:
            self._started_timer.cancel()
            self._started_timer = None
        deadline = time.monotonic() + give_up_after
        if self._task is not None:
            # Let a flush under way end first: cancelled between a requeue's publish and
            # its ack, it would be written again below, sending the next attempt twice.
            # (Still failing after give_up_after: the flush below gets one last try.)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._idle.wait(), give_up_after)
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        await self.flush(give_up_after=max(deadline - time.monotonic(), 0.0))


class Worker:
    """Runs tasks from the app's broker in this process; see the module docstring."""

    def __init__(self, *, concurrency: int | None = None, queues: Sequence[str] | None = None):
        self.concurrency = concurrency
        self.queues = list(queues) if queues else None
        self.id = f"{socket.gethostname()}-{os.getpid()}-{uuid_module.uuid4().hex[:8]}"
        self.started_at: float | None = None
        self.processed = 0
        self.counters = WorkerCounters()
        """Per task name: processed, succeeded, failed, ... (published with the heartbeat)."""
        self.dependency_scope = DependencyScope(Scope.WORKER, owner=f"worker {self.id}")
        """Values of `worker`-scope dependencies: created on first use, closed at stop."""
        self._plugins: list[BasePlugin] = []
        self._reset()

    def _reset(self) -> None:
        self._app: AsyncQueueTasks | None = None
        self._stopping = False
        self._tasks: list[asyncio.Task[None]] = []
        self._busy: dict[asyncio.Task[Any], Delivery] = {}
        self._pool: TaskThreadPool | None = None
        self._writer: ResultWriter | None = None

    @property
    def app(self) -> AsyncQueueTasks:
        """The app this worker runs for (set by start)."""
        if self._app is None:
            raise RuntimeError("the worker is not started")
        return self._app

    def resolved_queues(self, app: AsyncQueueTasks) -> list[str]:
        """Queues to consume: the ones given, else every queue a registered task uses."""
        if self.queues:
            return self.queues
        return sorted({d.queue for d in app.tasks.values()} | {DEFAULT_QUEUE})

    async def start(self, app: AsyncQueueTasks) -> None:
        """Start fetching and running tasks in the background."""
        self._reset()
        self._app = app
        config = app.config
        self._concurrency = self.concurrency or config.max_tasks_process
        self._prefetch = config.resolved_prefetch(self._concurrency)
        self._queue_names = self.resolved_queues(app)
        self._buffer: asyncio.PriorityQueue[tuple[int, float, int, Delivery]] = (
            asyncio.PriorityQueue()
        )
        self._seq = itertools.count()
        self._room = asyncio.Event()
        self._changed = asyncio.Event()
        """Set whenever a slot ends a task or the writer settles: `_until` waits on it."""
        plugins = app.plugins.owned_by("worker")
        for definition in app.tasks.values():
            for entry in definition.plugins:
                if not any(p is entry.plugin for p in plugins):
                    plugins.append(entry.plugin)
        await start_plugins(plugins)
        self._plugins = plugins
        self._pool = TaskThreadPool(config.max_threads or self._concurrency)
        # Finished deliveries stay claimed until the writer settles them: they count
        # against the prefetch bound, so a slow storage slows fetching down.
        self._writer = ResultWriter(app, on_settled=self._wake, worker=self)
        self._writer.start()
        self.started_at = time.time()
        self._tasks = [asyncio.ensure_future(self._fetch_loop())]
        self._tasks += [asyncio.ensure_future(self._slot()) for _ in range(self._concurrency)]
        self._tasks.append(asyncio.ensure_future(self._registry_loop()))
        log.info(
            "worker %s started: queues=%s concurrency=%d broker=%s",
            self.id,
            ",".join(self._queue_names),
            self._concurrency,
            type(app.broker).__name__,
        )
        await self._warn_about_broker(app)
        if WORKER_START in app.plugins:
            try:
                await app.plugins.fire(WORKER_START, worker=self)
            except BaseException:
                await self.stop(grace_seconds=0)
                raise

    def info(self) -> dict[str, Any]:
        """What the worker registry shows about this worker."""
        return {
            "id": self.id,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "queues": self._queue_names,
            "concurrency": self._concurrency,
            "started_at": self.started_at,
            "processed": self.processed,
            "running": len(self._busy),
            "version": __version__,
            "tasks": self.counters.snapshot(),
        }

    @staticmethod
    async def _warn_about_broker(app: AsyncQueueTasks) -> None:
        warnings: list[str] = []
        try:
            warnings += await app.broker.startup_warnings()
        except Exception:  # advice only: never a reason not to start
            log.debug("could not check the broker's settings", exc_info=True)
        limit = app.broker.claim_limit_seconds
        if limit is not None:
            long = sorted(
                d.name for d in app.tasks.values() if d.max_time is None or d.max_time > limit
            )
            if long:
                warnings.append(
                    f"{type(app.broker).__name__} takes a claimed message back after "
                    f"{limit:g}s unacked and delivers it again, but task(s) "
                    f"{', '.join(long[:10])}{' ...' if len(long) > 10 else ''} may run longer "
                    f"(no max_time, or a longer one): they would run twice. Give them a "
                    f"max_time below {limit:g}s, or raise the server's limit and say so in "
                    f"the URL (RabbitMQ: consumer_timeout=SECONDS or none)"
                )
        for line in warnings:
            log.warning("%s", line)

    async def register(self) -> None:
        """Publish `info()` (with the counters) to the worker registry now; one heartbeat."""
        app = self.app
        info = self.info()
        if GLOBAL_CONFIG_REGISTER_WORKER in app.plugins:
            changes = await app.plugins.fire(
                GLOBAL_CONFIG_REGISTER_WORKER,
                global_config=app.global_config,
                worker=self,
                info=info,
            )
            info = changes.get("info", info)
        await app.global_config.register_worker(info)

    async def _registry_loop(self) -> None:
        app = self.app
        while True:
            try:
                await self.register()
            except Exception:
                log.warning("could not refresh the worker registry", exc_info=True)
            await asyncio.sleep(app.config.heartbeat_interval_seconds)

    # -- fetching ----------------------------------------------------------------------

    def _wake(self) -> None:
        self._room.set()
        self._changed.set()

    async def _until(self, done: Callable[[], bool], timeout: float | None = None) -> bool:
        """Wait until `done()` holds (checked after every settle and task end); its value."""
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while not done():
            self._changed.clear()
            if deadline is None:
                await self._changed.wait()
            else:
                left = deadline - loop.time()
                if left <= 0:
                    return False
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._changed.wait(), left)
        return True

    def _quiet(self) -> bool:
        """Nothing runs, waits to run or waits to be written: this worker holds no claim."""
        return not self._busy and self._buffer.empty() and self.writer.unsettled == 0

    async def _run_alone(self, delivery: Delivery) -> None:
        """Run a redelivered message with no other claim held here (see ALONE_SECONDS)."""
        for d in self._take_buffered():
            self.writer.release(d)
        try:
            await self._until(self._quiet)
        except asyncio.CancelledError:
            self.writer.release(delivery)  # stopping: stop()'s flush gives it back
            raise
        self._buffer.put_nowait((delivery.priority, delivery.created_at, next(self._seq), delivery))
        if not await self._until(self._quiet, ALONE_SECONDS):
            log.info(
                "redelivered task on queue %s still runs after %.0fs alone; taking other "
                "work beside it",
                delivery.queue,
                ALONE_SECONDS,
            )

    def _take_buffered(self) -> list[Delivery]:
        out: list[Delivery] = []
        while not self._buffer.empty():
            out.append(self._buffer.get_nowait()[3])
        return out

    async def _fetch_loop(self) -> None:
        broker = self.app.broker
        batch = self.app.config.fetch_batch
        limit = self._concurrency + self._prefetch
        backoff = 0.1
        careful = False
        """After a redelivered message: claim one at a time until a fresh one comes."""
        while not self._stopping:
            room = limit - self._buffer.qsize() - len(self._busy) - self.writer.unsettled
            if room <= 0:
                self._room.clear()
                await self._room.wait()
                continue
            try:
                want = 1 if careful else min(room, batch)
                deliveries = await broker.fetch(self._queue_names, want, 1.0)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("fetching from the broker failed; retrying in %.1fs", backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
                continue
            backoff = 0.1
            if deliveries and BROKER_FETCH in self.app.plugins:
                await self.app.plugins.fire(
                    BROKER_FETCH, broker=broker, worker=self, deliveries=deliveries
                )
            if self.stopping:
                for d in deliveries:
                    self.writer.release(d)
                return
            suspect = next((d for d in deliveries if d.delivery_count > 1), None)
            if suspect is not None:
                # Uncounted give-backs: the others were not started here.
                for d in deliveries:
                    if d is not suspect:
                        self.writer.release(d)
                careful = True
                await self._run_alone(suspect)
                continue
            if deliveries:
                careful = False
            for d in deliveries:
                self._buffer.put_nowait((d.priority, d.created_at, next(self._seq), d))

    @property
    def stopping(self) -> bool:
        """True once stop() was called."""
        return self._stopping

    @property
    def writer(self) -> ResultWriter:
        """The result writer (exists while started)."""
        assert self._writer is not None
        return self._writer

    # -- running -----------------------------------------------------------------------

    async def _slot(self) -> None:
        me = asyncio.current_task()
        assert me is not None
        while not self._stopping:
            _, _, _, delivery = await self._buffer.get()
            self._busy[me] = delivery
            try:
                await self.process(delivery)
            except asyncio.CancelledError:
                # Given up on at shutdown: the broker gets it back for another worker.
                self.writer.release(delivery)
                raise
            finally:
                del self._busy[me]
                self._wake()
                self.processed += 1

    async def process(self, delivery: Delivery) -> None:
        """Decode, run and record one delivery; bad input is recorded, never raised."""
        app = self.app
        try:
            message = app.serializer.decode(delivery.body)
        except DecodeError as exc:
            self._record_bad_input(delivery, exc)
            return
        if delivery.delivery_count > 1:
            self.counters[message.name].redelivered += 1
            if await self._ran_already(delivery, message):
                return
        definition = app.tasks.get(message.name)
        limit = app.config.max_deliveries
        if definition is None:
            if app.config.requeue_unknown_tasks and (
                limit is None or delivery.delivery_count < limit
            ):
                # Rolling deploy: a newer worker may know this task; try again later.
                self._defer(delivery, message)
                return
            self._record_failure(
                delivery, message, UnknownTask(message.name), DeadLetterReason.UNKNOWN_TASK
            )
            return
        if limit is not None and delivery.delivery_count > limit:
            # Handed out more often than allowed without ever finishing: its worker died
            # each time (OOM, a crash the task causes). Running it again would crash-loop.
            self._record_failure(
                delivery,
                message,
                WorkerLost(delivery.delivery_count - 1),
                DeadLetterReason.WORKER_LOST,
            )
            return
        started = time.time()
        record = _record(message, TaskStatusEnum.PROCESS, started)
        plugins = app.plugins_for(definition) if definition.plugins else app.plugins
        if plugins and WORKER_EXECUTE_BEFORE in plugins:
            try:
                changes = await plugins.fire(
                    WORKER_EXECUTE_BEFORE,
                    worker=self,
                    message=message,
                    definition=definition,
                    record=record,
                )
            except PluginError as exc:
                self._record_failure(delivery, message, exc, DeadLetterReason.REJECTED)
                return
            record = changes.get("record", record)
        if definition.at_most_once and not await self._start_once(delivery, message, record):
            return
        self.writer.started(record)
        executor_cls = definition.executor or app.executor_class
        executor = executor_cls(definition, message, app, self._pool)
        executor.worker = self
        counter = self.counters[message.name]
        counter.running += 1
        # The worker's own lines about this attempt (failed, retry) carry the task too.
        log_token = current_task.set(executor)
        try:
            try:
                outcome = await executor.run()
                if plugins and (
                    WORKER_EXECUTE_AFTER in plugins or WORKER_TASK_ERROR_RETRY in plugins
                ):
                    outcome = await self._after(plugins, executor, message, outcome)
            finally:
                counter.running -= 1
            finished = self._finish(delivery, message, record, outcome)
        finally:
            current_task.reset(log_token)
        kind = outcome.kind
        if kind is OutcomeKind.SUCCESS:
            index = SUCCEEDED
        elif kind is OutcomeKind.ERROR:
            index = FAILED
        else:
            index = RETRIED if kind is OutcomeKind.RETRY else CANCELLED
        # Queue wait: from when the message became due (its eta, else its creation).
        counter.done(index, finished - started, started - (message.eta or message.created_at))

    async def _after(
        self,
        plugins: PluginRegistry,
        executor: TaskExecutor,
        message: TaskMessage,
        outcome: Outcome,
    ) -> Outcome:
        """Outcome after worker_execute_after (and worker_task_error_retry for retries)."""
        definition = executor.task
        for trigger in (WORKER_EXECUTE_AFTER, WORKER_TASK_ERROR_RETRY):
            if trigger not in plugins:
                continue
            if trigger is WORKER_TASK_ERROR_RETRY and outcome.kind is not OutcomeKind.RETRY:
                continue
            try:
                changes = await plugins.fire(
                    trigger, worker=self, message=message, definition=definition, outcome=outcome
                )
            except PluginError as exc:
                return executor.failure(exc)  # PluginError is never retried
            outcome = changes.get("outcome", outcome)
        return outcome

    def _finish(
        self, delivery: Delivery, message: TaskMessage, record: Task, outcome: Outcome
    ) -> float:
        """Hand the outcome to the writer; returns the time the attempt finished."""
        finished = time.time()
        final = msgspec.structs.replace(
            record,
            status=_FINAL_STATUS[outcome.kind],
            returning=outcome.result,
            error_type=outcome.error_type,
            error_message=outcome.error_message,
            traceback=outcome.traceback,
            finished_at=finished,
        )
        if outcome.kind is OutcomeKind.RETRY:
            final.finished_at = None
            nxt = msgspec.structs.replace(
                message, attempt=message.attempt + 1, eta=finished + outcome.retry_delay
            )
            final.eta = nxt.eta
            body = self.app.serializer.encode(nxt)
            env = Envelope(str(nxt.uuid), nxt.queue, nxt.priority, nxt.eta, nxt.created_at, body)
            log.info(
                "task %s %s failed (%s: %s); retry %d in %.2fs",
                message.name,
                message.uuid,
                outcome.error_type,
                outcome.error_message,
                nxt.attempt,
                outcome.retry_delay,
            )
            self.writer.retry(delivery, final, env)
            return finished
        if outcome.kind is OutcomeKind.ERROR:
            log.warning(
                "task %s %s failed: %s: %s",
                message.name,
                message.uuid,
                outcome.error_type,
                outcome.error_message,
            )
            if self.app.config.dead_letter_failures:
                detail = f"{outcome.error_type}: {outcome.error_message}"
                if outcome.traceback:
                    detail = f"{detail}\n{outcome.traceback}"
                letter = _letter(delivery, DeadLetterReason.FAILED, detail, message, finished)
                self.writer.dead(delivery, final, letter)
                return finished
        self.writer.finish(delivery, final)
        return finished

    def _record_failure(
        self, delivery: Delivery, message: TaskMessage, exc: Exception, reason: str
    ) -> None:
        log.error("task %s %s dead-lettered (%s): %s", message.name, message.uuid, reason, exc)
        self.counters[message.name].outcomes[FAILED] += 1
        now = time.time()
        record = _record(message, TaskStatusEnum.ERROR, now)
        record.error_type = type(exc).__name__
        record.error_message = str(exc)
        record.finished_at = now
        detail = f"{record.error_type}: {record.error_message}"
        self.writer.dead(delivery, record, _letter(delivery, reason, detail, message, now))

    async def _ran_already(self, delivery: Delivery, message: TaskMessage) -> bool:
        """Ack a redelivered message whose attempt has run to its end already; True if so.

        Brokers redeliver a message whose ack did not reach them (a worker killed after
        storing the result, Kafka offsets above an unfinished one, RabbitMQ's window
        between a retry's publish and the old message's ack): the stored record tells.
        Only redeliveries pay this read; on a storage error the task runs (at-least-once).
        """
        try:
            record = await self.app.storage.get(str(message.uuid))
        except Exception:
            log.warning("could not read the record of redelivered task %s", message.uuid)
            return False
        if record is None or record.status is TaskStatusEnum.NEW:
            return False  # nothing started since it was (re)sent
        # Not `error`: the letter of a dead-lettered task may not have reached the broker
        # (record stored first); running it again sets it aside again. Not `retry`: the
        # next attempt's message may not exist yet (record stored before the requeue).
        # A later attempt that started proves the requeue happened.
        ran = record.attempts > message.attempt + 1 or (
            record.attempts == message.attempt + 1
            and record.status in (TaskStatusEnum.SUCCESS, TaskStatusEnum.CANCEL)
        )
        if not ran:
            return False
        log.info(
            "task %s %s attempt %d was delivered again after it ended (%s); not run twice",
            message.name,
            message.uuid,
            message.attempt + 1,
            record.status.value,
        )
        self.writer.ack(delivery)
        return True

    async def _start_once(self, delivery: Delivery, message: TaskMessage, record: Task) -> bool:
        """at_most_once: store `record` (process) before the attempt starts; True to run.

        False when this attempt started before (its delivery is then dealt with), or when
        the storage cannot tell (the delivery goes back: running blind could run it twice).
        """
        storage = self.app.storage
        attempt = message.attempt + 1
        try:
            stored = await storage.get(str(message.uuid))
            started_before = (
                stored is not None
                and stored.status is not TaskStatusEnum.NEW
                and stored.attempts >= attempt
            )
            if not started_before:
                await self.writer.save_now(record)
        except Exception as exc:
            log.warning(
                "task %s %s is at_most_once and its record could not be read or written (%s); "
                "giving it back instead of running it",
                message.name,
                message.uuid,
                exc,
            )
            await asyncio.sleep(1.0)  # the storage is failing: do not spin on the message
            self.writer.release(delivery)
            return False
        if not started_before:
            return True
        assert stored is not None
        if stored.attempts > attempt or stored.status in (
            TaskStatusEnum.SUCCESS,
            TaskStatusEnum.CANCEL,
        ):
            self.writer.ack(delivery)  # it ended (or a later attempt exists): nothing to do
            return False
        self._record_failure(
            delivery,
            message,
            TaskInterrupted(attempt, stored.status.value),
            DeadLetterReason.WORKER_LOST,
        )
        return False

    def _defer(self, delivery: Delivery, message: TaskMessage) -> None:
        """Send an unknown task back with a growing delay (requeue_unknown_tasks)."""
        delay = min(float(delivery.delivery_count), 30.0)
        log.warning(
            "unknown task %r (%s): delivery %d, trying again in %.0fs",
            message.name,
            message.uuid,
            delivery.delivery_count,
            delay,
        )
        eta = time.time() + delay
        env = Envelope(
            str(message.uuid),
            delivery.queue,
            delivery.priority,
            eta,
            message.created_at,
            delivery.body,
            deliveries=delivery.delivery_count,
        )
        self.writer.requeue(delivery, env)

    def _record_bad_input(self, delivery: Delivery, exc: DecodeError) -> None:
        reason = getattr(exc, "reason", None) or "undecodable"
        uuid_text, name = peek_identity(delivery.body, reason)
        try:
            task_uuid = uuid_module.UUID(uuid_text) if uuid_text else uuid_module.uuid4()
        except ValueError:
            task_uuid = uuid_module.uuid4()
        preview = delivery.body[:512].decode("utf-8", "replace")
        log.error(
            "undecodable message on queue %s dead-lettered as %s (%s): %s",
            delivery.queue,
            task_uuid,
            reason,
            exc,
        )
        now = time.time()
        record = Task(
            uuid=task_uuid,
            name=name or "<undecodable>",
            status=TaskStatusEnum.ERROR,
            queue=delivery.queue,
            priority=delivery.priority,
            error_type="DecodeError",
            error_message=f"{exc}; payload starts with: {preview!r}",
            attempts=delivery.delivery_count,
            created_at=delivery.created_at,
            started_at=now,
            finished_at=now,
        )
        letter = DeadLetter(
            uuid=str(task_uuid),
            queue=delivery.queue,
            reason=reason,
            body=delivery.body,
            name=name,
            detail=str(exc),
            priority=delivery.priority,
            delivery_count=delivery.delivery_count,
            created_at=delivery.created_at,
            dead_at=now,
        )
        self.writer.dead(delivery, record, letter)

    # -- stopping ----------------------------------------------------------------------

    @property
    def running(self) -> int:
        """Tasks running right now."""
        return len(self._busy)

    async def stop(self, grace_seconds: float | None = None) -> None:
        """Stop fetching, let running tasks finish within the grace period, return the rest."""
        if self._app is None:
            return
        app = self.app
        grace = app.config.graceful_shutdown_seconds if grace_seconds is None else grace_seconds
        self._stopping = True
        fetcher, *rest = self._tasks
        fetcher.cancel()
        await asyncio.gather(fetcher, return_exceptions=True)
        unstarted: list[Delivery] = []
        while not self._buffer.empty():
            unstarted.append(self._buffer.get_nowait()[3])
        for d in unstarted:
            self.writer.release(d)
        if unstarted:
            log.info("returned %d unstarted tasks to the broker", len(unstarted))
        idle = [t for t in rest if t not in self._busy]
        for t in idle:
            t.cancel()
        busy = list(self._busy)
        if busy:
            log.info("waiting up to %.1fs for %d running tasks", grace, len(busy))
            _, pending = await asyncio.wait(busy, timeout=grace) if grace > 0 else (set(), busy)
            for t in pending:
                t.cancel()
            if pending:
                log.warning("gave up on %d running tasks; they go back to the queue", len(pending))
        await asyncio.gather(*rest, return_exceptions=True)
        await self.writer.close(give_up_after=max(grace, 5.0))
        try:
            await app.global_config.unregister_worker(self.id)
        except Exception:
            log.warning("could not unregister worker %s", self.id, exc_info=True)
        if WORKER_STOP in app.plugins:
            await app.plugins.fire(WORKER_STOP, worker=self)
        await self.dependency_scope.close()
        await stop_plugins(self._plugins)
        self._plugins = []
        if self._pool is not None:
            # Threads of sync tasks that outlived the grace period cannot be killed; do not
            # wait for them, the process exit ends them.
            self._pool.shutdown()
        log.info("worker %s stopped after %d tasks", self.id, self.processed)
        self._app = None


def _letter(
    delivery: Delivery, reason: str, detail: str, message: TaskMessage, now: float
) -> DeadLetter:
    return DeadLetter(
        uuid=str(message.uuid),
        queue=delivery.queue,
        reason=reason,
        body=delivery.body,
        name=message.name,
        detail=detail,
        priority=delivery.priority,
        delivery_count=delivery.delivery_count,
        created_at=message.created_at,
        dead_at=now,
    )


def _record(message: TaskMessage, status: TaskStatusEnum, started: float) -> Task:
    return Task(
        uuid=message.uuid,
        name=message.name,
        status=status,
        priority=message.priority,
        queue=message.queue,
        args=message.args,
        kwargs=message.kwargs,
        attempts=message.attempt + 1,
        created_at=message.created_at,
        started_at=started,
        eta=message.eta,
    )
