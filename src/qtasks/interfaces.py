"""The replaceable parts, each a small interface with the guarantee it must keep.

Brokers move bytes (`Envelope` in, `Delivery` out); storages keep `Task` records; global
configs keep settings and the live worker registry. Every method that does I/O is
`async`. Implementations live in `brokers/`, `storages/` and `global_configs/`; the
contract suites in `tests/contract/` run against each of them.
"""

from __future__ import annotations

import abc
import asyncio
import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from qtasks.errors import StateNotSupported
from qtasks.message import DeadLetter, Envelope, Task, TaskStatusEnum


@dataclasses.dataclass(slots=True)
class Delivery:
    """One message handed to a worker; it stays claimed until acked, released or requeued."""

    body: bytes
    receipt: Any
    """Broker-specific token that identifies this claim in ack/release/requeue."""
    queue: str
    priority: int
    created_at: float
    delivery_count: int = 1
    """How many times this message was handed out, this time included."""


@dataclasses.dataclass(slots=True)
class QueueStats:
    """Depth of one queue; a field is None when the broker cannot tell it apart."""

    queue: str
    total: int
    """Messages waiting or in flight (what `queue_sizes` reports)."""
    ready: int | None = None
    """Due and not claimed."""
    delayed: int | None = None
    """Waiting for their eta (scheduled tasks and retries)."""
    in_flight: int | None = None
    """Claimed by a worker and not yet acked."""
    dead_lettered: int | None = None
    """Given up on and set aside (brokers with a dead-letter queue)."""
    by_priority: dict[int, int] | None = None
    """Ready messages per priority."""


class Broker(abc.ABC):
    """Moves task messages; a delivered message is kept until acked, so a dead worker loses none."""

    consumer_id: str = ""
    claim_limit_seconds: float | None = None
    """How long the server lets a claimed message stay unacked before it takes it back and
    hands it out again (RabbitMQ's consumer_timeout); None: as long as the consumer lives.
    The worker warns at start about tasks allowed to run longer (they would run twice)."""

    async def start(self) -> None:
        """Connect; called before any other method. Must be callable again after stop."""

    async def stop(self) -> None:
        """Release this process's claims it still holds and disconnect."""

    @abc.abstractmethod
    async def publish(self, envelopes: Sequence[Envelope]) -> None:
        """Make messages deliverable (after their eta); raise BrokerError if any was not stored."""

    @abc.abstractmethod
    async def fetch(self, queues: Sequence[str], max_count: int, timeout: float) -> list[Delivery]:
        """Claim up to max_count due messages, lowest priority number then oldest first.

        Waits at most `timeout` seconds for the first one; returns [] if none came.
        """

    @abc.abstractmethod
    async def ack(self, deliveries: Sequence[Delivery]) -> None:
        """Forget finished messages; called only after their result is stored."""

    @abc.abstractmethod
    async def release(self, deliveries: Sequence[Delivery]) -> None:
        """Give unstarted messages back, as they were, for any worker to take."""

    @abc.abstractmethod
    async def requeue(self, items: Sequence[tuple[Delivery, Envelope]]) -> None:
        """Replace each claimed message by a new one (a retry) in one atomic step."""

    async def enqueue(
        self, storage: Storage, tasks: Sequence[Task], envelopes: Sequence[Envelope]
    ) -> None:
        """Store the `new` records, then publish; if publishing fails the records are removed.

        Brokers that share a transaction or round trip with the storage (SQLite in one
        file, Redis) override this to do both at once.
        """
        await storage.add(tasks)
        try:
            await self.publish(envelopes)
        except BaseException:
            await asyncio.shield(storage.remove([str(t.uuid) for t in tasks]))
            raise

    async def settle(
        self, storage: Storage, records: Sequence[Task], deliveries: Sequence[Delivery]
    ) -> None:
        """Store `records`, then ack `deliveries`: the worker's write for finished tasks.

        Brokers that can share a round trip with the storage (Redis with a Redis storage on
        the same server) override this to send both at once; the records must still be
        written before the acks take effect.
        """
        if records:
            await storage.save(records)
        if deliveries:
            await self.ack(deliveries)

    async def heartbeat(self) -> None:
        """Tell the broker this consumer is alive (brokers that track liveness override it)."""

    async def queue_sizes(self, queues: Sequence[str]) -> dict[str, int]:
        """Messages waiting or in flight per queue, for stats and tests."""
        return {}

    async def queue_stats(self, queues: Sequence[str]) -> list[QueueStats]:
        """Depth of each queue, split as finely as this broker can (default: totals only)."""
        sizes = await self.queue_sizes(queues)
        return [QueueStats(queue=q, total=sizes.get(q, 0)) for q in queues]

    async def discard(self, uuids: Sequence[str], queues: Sequence[str] | None = None) -> list[str]:
        """Remove messages no worker has claimed yet; the uuids of those removed.

        Used to cancel tasks that have not started. `queues` says where to look (brokers
        that cannot search every queue need it); None: everywhere this broker can.
        NotImplementedError if unsupported.
        """
        raise NotImplementedError(f"{type(self).__name__} cannot remove queued messages")

    async def purge(self, queues: Sequence[str]) -> list[str]:
        """Drop every unclaimed message (ready or delayed) of `queues`; the uuids dropped.

        Claimed messages stay with their workers. NotImplementedError if unsupported.
        """
        raise NotImplementedError(f"{type(self).__name__} cannot purge queues")

    # -- dead letters: messages set aside for an operator instead of run or retried ------
    #
    # A broker keeps each queue's dead letters next to the queue, for at least the
    # configured `dead_letter_ttl_seconds` (None: until dropped). Brokers that cannot keep
    # them inherit these defaults; the worker then acks the message (its error record
    # stays in the storage) and logs that it could not be set aside.

    async def dead_letter(self, items: Sequence[tuple[Delivery, DeadLetter]]) -> None:
        """Settle claimed deliveries by moving each into its queue's dead letters.

        Like `ack`, the claim ends; unlike it, the message is kept. Where the backend
        allows, both happen in one atomic step; otherwise the dead letter is stored first,
        so a crash in between leaves a duplicate, never a loss.
        """
        raise NotImplementedError(f"{type(self).__name__} keeps no dead letters")

    async def dead_letters(
        self, queues: Sequence[str], limit: int = 100, uuids: Sequence[str] | None = None
    ) -> list[DeadLetter]:
        """Dead letters of `queues`, newest first, at most `limit` (only `uuids` if given)."""
        raise NotImplementedError(f"{type(self).__name__} keeps no dead letters")

    async def drop_dead_letters(
        self,
        queues: Sequence[str],
        uuids: Sequence[str] | None = None,
        dead_at_most: float | None = None,
    ) -> list[str]:
        """Delete dead letters of `queues` (only `uuids` if given); the uuids deleted.

        With `dead_at_most`, only letters set aside at or before that time go: a retried
        message that failed again at once has a newer letter under the same uuid, which
        the retry's own clean-up must not delete.
        """
        raise NotImplementedError(f"{type(self).__name__} keeps no dead letters")

    async def startup_warnings(self) -> list[str]:
        """Server settings that put tasks at risk (eviction, no persistence), one line each.

        Called once after `start()`; the worker logs each line as a warning. A broker that
        cannot read its server's settings (a managed service refusing CONFIG) returns [],
        never raises: a warning is advice, not a reason to stop.
        """
        return []


@dataclasses.dataclass(slots=True)
class Steps:
    """What `Storage.steps` returns: the next steps of one task, and its end once it ended."""

    values: list[Any]
    """Steps from position `after` on, in the order they were added (JSON data)."""
    after: int
    """The position after the last value: pass it as `after` to read on."""
    final: Task | None = None
    """The task's final record once it finished; `values` then holds every step left."""


class Storage(abc.ABC):
    """Keeps task records; `save` of a final record wakes everyone waiting on it."""

    async def start(self) -> None:
        """Connect; callable again after stop."""

    async def stop(self) -> None:
        """Disconnect."""

    @abc.abstractmethod
    async def add(self, tasks: Sequence[Task]) -> None:
        """Store new records; raise StorageError if any was not stored."""

    @abc.abstractmethod
    async def save(self, tasks: Sequence[Task]) -> None:
        """Insert or replace records (status changes, results) in one batch."""

    @abc.abstractmethod
    async def get(self, uuid: str) -> Task | None:
        """The record, or None if unknown or expired."""

    @abc.abstractmethod
    async def wait(self, uuid: str, timeout: float) -> Task | None:
        """The record once final, or None if `timeout` seconds pass first; no busy polling.

        TaskNotFound if there is no record (never enqueued, expired, evicted): at once, or
        at the timeout if it vanished meanwhile, so a lost result is never waited out.
        """

    async def remove(self, uuids: Sequence[str]) -> None:
        """Delete records (used when a publish failed after the record was added)."""

    async def recent(self, status: TaskStatusEnum, limit: int) -> list[Task]:
        """Up to `limit` records with `status`, most recently updated first (for stats).

        NotImplementedError if this storage cannot list records.
        """
        raise NotImplementedError(f"{type(self).__name__} cannot list records by status")

    # -- Steps: what a generator task yielded, streamed to producers while it runs ----------
    #
    # A task's steps are an append-only log next to its record: the worker adds each
    # handler result of a generator task, in order, and producers read them from any
    # position (`task.stream()`, `app.stream(uuid)`). The worker stores a task's last step
    # before its final record, so a reader that sees the final record has every step. The
    # log lives as long as the record (result_ttl_seconds after the task finished).

    async def add_steps(self, uuid: str, values: Sequence[Any]) -> None:
        """Append JSON values to task `uuid`'s steps, in order, and wake its readers.

        NotImplementedError if this storage keeps no steps (the worker then streams none).
        """
        raise NotImplementedError(
            f"{type(self).__name__} keeps no task steps, so generator tasks cannot be "
            f"streamed; use a storage that does (memory://, sqlite:///..., redis://...) or "
            f"implement add_steps and steps of qtasks.interfaces.Storage"
        )

    async def steps(self, uuid: str, after: int, timeout: float) -> Steps:
        """Task `uuid`'s steps from position `after` on (0 = the first step added).

        Read on from the previous answer's `after` rather than by counting values: a
        storage may keep entries of its own in the log (Redis: end marks).

        Returns at once when there are any, or when the task's record is final (with that
        record and every step left); otherwise waits up to `timeout` seconds for either,
        without busy polling, and returns no values and no record if neither came.
        NotImplementedError if this storage keeps no steps.
        """
        raise NotImplementedError(
            f"{type(self).__name__} keeps no task steps, so generator tasks cannot be "
            f"streamed; use a storage that does (memory://, sqlite:///..., redis://...) or "
            f"implement add_steps and steps of qtasks.interfaces.Storage"
        )

    # -- State (qtasks.plugins.AsyncState): named key/value maps shared by every process --
    #
    # A state is addressed by `name` (the State class's name) within the app's namespace;
    # values are JSON data. Storages that keep no state inherit these defaults, which
    # raise StateNotSupported. Each method is ONE atomic step on the backend (one SQL
    # transaction, one Redis command or script): the whole step happens or none of it,
    # and no other process sees it half done.

    async def state_get(self, name: str, key: str, default: Any = None) -> Any:
        """The value under `key` of state `name`, or `default`."""
        raise StateNotSupported(self)

    async def state_get_all(self, name: str) -> dict[str, Any]:
        """Every key and value of state `name` (a consistent snapshot)."""
        raise StateNotSupported(self)

    async def state_update(self, name: str, values: Mapping[str, Any]) -> None:
        """Set several keys at once: all are written or none (EncodeError if one is not JSON)."""
        raise StateNotSupported(self)

    async def state_delete(self, name: str, keys: Sequence[str] | None = None) -> None:
        """Delete `keys` (every key of the state when None) in one step."""
        raise StateNotSupported(self)

    async def state_incr(self, name: str, key: str, amount: int | float = 1) -> int | float:
        """Add `amount` to the number under `key` (missing counts as 0); the new value.

        Read, add and write are one atomic step: concurrent calls from any number of
        processes never lose an increment. TypeError if the value is not a number.
        """
        raise StateNotSupported(self)

    async def state_acquire_lock(
        self, name: str, key: str, token: str, expire_seconds: float
    ) -> bool:
        """Take lock `key` of state `name` for `token` if it is free or expired; True if taken.

        Test-and-set in one atomic step, so two callers never both get True. The lock
        frees itself `expire_seconds` after it was taken (its holder may have died).
        """
        raise StateNotSupported(self)

    async def state_release_lock(self, name: str, key: str, token: str) -> bool:
        """Free lock `key` if `token` still holds it (atomic compare-and-delete); True if freed."""
        raise StateNotSupported(self)


class GlobalConfig(abc.ABC):
    """Settings and live facts shared by every process of one app."""

    async def start(self) -> None:
        """Connect; callable again after stop."""

    async def stop(self) -> None:
        """Disconnect."""

    @abc.abstractmethod
    async def set(self, key: str, value: Any) -> None:
        """Store a JSON-encodable value under key."""

    @abc.abstractmethod
    async def get(self, key: str, default: Any = None) -> Any:
        """The value under key, or default."""

    @abc.abstractmethod
    async def delete(self, key: str) -> None:
        """Remove key if present."""

    @abc.abstractmethod
    async def items(self) -> dict[str, Any]:
        """Every stored setting."""

    @abc.abstractmethod
    async def register_worker(self, info: dict[str, Any]) -> None:
        """Add or refresh a live worker's entry (info['id'] identifies it)."""

    @abc.abstractmethod
    async def unregister_worker(self, worker_id: str) -> None:
        """Remove a worker's entry when it stops."""

    @abc.abstractmethod
    async def workers(self) -> list[dict[str, Any]]:
        """Every registered worker's last entry, with its `heartbeat` time."""
