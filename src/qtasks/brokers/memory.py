"""An in-process broker for tests and single-process apps; nothing survives the process."""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from qtasks._aio import wait_event
from qtasks.interfaces import Broker, Delivery, QueueStats
from qtasks.message import DeadLetter, Envelope

if TYPE_CHECKING:
    from qtasks.config import QueueConfig

_Ready = tuple[int, float, int, Envelope, int]  # priority, created_at, seq, envelope, deliveries


class MemoryBroker(Broker):
    """Priority heaps per queue plus a delay heap; claims are kept until ack or release.

    `join()` waits until every message is acked, so tests run until idle without sleeping.
    """

    def __init__(self, *, dead_letter_ttl_seconds: float | None = 7 * 86_400.0) -> None:
        self.dead_letter_ttl_seconds = dead_letter_ttl_seconds
        self._dead: dict[str, dict[str, DeadLetter]] = {}
        self._ready: dict[str, list[_Ready]] = {}
        self._delayed: list[tuple[float, int, Envelope, int]] = []
        self._in_flight: dict[int, tuple[Envelope, int]] = {}
        self._seq = itertools.count()
        self._receipts = itertools.count()
        self._changed: asyncio.Event | None = None
        self._idle: asyncio.Event | None = None
        self.consumer_id = "memory"

    @classmethod
    def from_url(cls, url: str, *, namespace: str, config: QueueConfig) -> MemoryBroker:
        """Build from `memory://`."""
        return cls(dead_letter_ttl_seconds=config.dead_letter_ttl_seconds)

    def _events(self) -> tuple[asyncio.Event, asyncio.Event]:
        # Created lazily on the loop that uses them: a sync app may restart on a new loop.
        if self._changed is None or self._idle is None:
            self._changed = asyncio.Event()
            self._idle = asyncio.Event()
            self._update_idle()
        return self._changed, self._idle

    async def start(self) -> None:
        self._changed = None
        self._idle = None

    async def stop(self) -> None:
        for receipt in list(self._in_flight):
            self._put_back(receipt, undo=True)
        self._changed = None
        self._idle = None

    def _update_idle(self) -> None:
        if self._idle is None:
            return
        if self._in_flight or self._delayed or any(self._ready.values()):
            self._idle.clear()
        else:
            self._idle.set()

    def _push_ready(self, env: Envelope, deliveries: int) -> None:
        heap = self._ready.setdefault(env.queue, [])
        heapq.heappush(heap, (env.priority, env.created_at, next(self._seq), env, deliveries))

    async def publish(self, envelopes: Sequence[Envelope]) -> None:
        changed, _ = self._events()
        now = time.time()
        for env in envelopes:
            if env.eta is not None and env.eta > now:
                heapq.heappush(self._delayed, (env.eta, next(self._seq), env, 0))
            else:
                self._push_ready(env, 0)
        self._update_idle()
        changed.set()

    def _promote_due(self) -> float | None:
        """Move due delayed messages to ready; seconds until the next one, if any."""
        now = time.time()
        while self._delayed and self._delayed[0][0] <= now:
            _, _, env, deliveries = heapq.heappop(self._delayed)
            self._push_ready(env, deliveries)
        return self._delayed[0][0] - now if self._delayed else None

    def _take(self, queues: Sequence[str], max_count: int) -> list[Delivery]:
        heaps = [self._ready[q] for q in queues if self._ready.get(q)]
        out: list[Delivery] = []
        while heaps and len(out) < max_count:
            heap = heaps[0] if len(heaps) == 1 else min(heaps, key=lambda h: h[0][:3])
            priority, created_at, _, env, deliveries = heapq.heappop(heap)
            if not heap:
                heaps.remove(heap)
            receipt = next(self._receipts)
            self._in_flight[receipt] = (env, deliveries + 1)
            out.append(Delivery(env.body, receipt, env.queue, priority, created_at, deliveries + 1))
        return out

    async def fetch(self, queues: Sequence[str], max_count: int, timeout: float) -> list[Delivery]:
        changed, _ = self._events()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            next_due = self._promote_due()
            out = self._take(queues, max_count)
            if out:
                return out
            remaining = deadline - loop.time()
            if remaining <= 0:
                return []
            changed.clear()
            wait = remaining if next_due is None else min(remaining, next_due)
            await wait_event(changed, wait)

    async def ack(self, deliveries: Sequence[Delivery]) -> None:
        for d in deliveries:
            self._in_flight.pop(d.receipt, None)
        self._update_idle()

    def _put_back(
        self, receipt: int, replacement: Envelope | None = None, undo: bool = False
    ) -> None:
        entry = self._in_flight.pop(receipt, None)
        if entry is None:
            return
        env, deliveries = entry
        if undo:
            deliveries -= 1
        if replacement is not None:
            env, deliveries = replacement, replacement.deliveries
        if env.eta is not None and env.eta > time.time():
            heapq.heappush(self._delayed, (env.eta, next(self._seq), env, deliveries))
        else:
            self._push_ready(env, deliveries)

    async def release(self, deliveries: Sequence[Delivery]) -> None:
        changed, _ = self._events()
        for d in deliveries:
            self._put_back(d.receipt, undo=True)
        self._update_idle()
        changed.set()

    async def requeue(self, items: Sequence[tuple[Delivery, Envelope]]) -> None:
        changed, _ = self._events()
        for d, env in items:
            self._put_back(d.receipt, env)
        self._update_idle()
        changed.set()

    async def queue_sizes(self, queues: Sequence[str]) -> dict[str, int]:
        sizes = {q: len(self._ready.get(q, ())) for q in queues}
        for _, _, env, _ in self._delayed:
            if env.queue in sizes:
                sizes[env.queue] += 1
        for env, _ in self._in_flight.values():
            if env.queue in sizes:
                sizes[env.queue] += 1
        return sizes

    async def _queue_stats(self, queues: Sequence[str]) -> list[QueueStats]:
        out = {q: QueueStats(queue=q, total=0, ready=0, delayed=0, in_flight=0) for q in queues}
        for q, stats in out.items():
            by_priority: dict[int, int] = {}
            for priority, *_ in self._ready.get(q, ()):
                by_priority[priority] = by_priority.get(priority, 0) + 1
            stats.by_priority = dict(sorted(by_priority.items()))
            stats.ready = sum(by_priority.values())
        for _, _, env, _ in self._delayed:
            if env.queue in out:
                out[env.queue].delayed = (out[env.queue].delayed or 0) + 1
        for env, _ in self._in_flight.values():
            if env.queue in out:
                out[env.queue].in_flight = (out[env.queue].in_flight or 0) + 1
        for stats in out.values():
            stats.total = (stats.ready or 0) + (stats.delayed or 0) + (stats.in_flight or 0)
        return list(out.values())

    async def discard(self, uuids: Sequence[str], queues: Sequence[str] | None = None) -> list[str]:
        """Remove unclaimed (ready or delayed) messages with these uuids."""
        wanted = set(uuids)
        removed: list[str] = []
        for q, heap in self._ready.items():
            keep = [entry for entry in heap if entry[3].uuid not in wanted]
            if len(keep) != len(heap):
                removed += [entry[3].uuid for entry in heap if entry[3].uuid in wanted]
                heapq.heapify(keep)
                self._ready[q] = keep
        delayed = [entry for entry in self._delayed if entry[2].uuid not in wanted]
        if len(delayed) != len(self._delayed):
            removed += [entry[2].uuid for entry in self._delayed if entry[2].uuid in wanted]
            heapq.heapify(delayed)
            self._delayed = delayed
        self._update_idle()
        return removed

    async def purge(self, queues: Sequence[str]) -> list[str]:
        """Drop the ready and delayed messages of `queues`."""
        names = set(queues)
        dropped = [entry[3].uuid for q in names for entry in self._ready.pop(q, ())]
        dropped += [entry[2].uuid for entry in self._delayed if entry[2].queue in names]
        delayed = [entry for entry in self._delayed if entry[2].queue not in names]
        heapq.heapify(delayed)
        self._delayed = delayed
        self._update_idle()
        return dropped

    async def dead_letter(self, items: Sequence[tuple[Delivery, DeadLetter]]) -> None:
        for d, letter in items:
            if self._in_flight.pop(d.receipt, None) is not None:
                self._dead.setdefault(letter.queue, {})[letter.uuid] = letter
        self._update_idle()

    def _live_dead(self, queue: str) -> dict[str, DeadLetter]:
        letters = self._dead.get(queue, {})
        ttl = self.dead_letter_ttl_seconds
        if ttl is not None and letters:
            cutoff = time.time() - ttl
            for uuid in [u for u, x in letters.items() if x.dead_at < cutoff]:
                del letters[uuid]
        return letters

    async def dead_letters(
        self, queues: Sequence[str], limit: int = 100, uuids: Sequence[str] | None = None
    ) -> list[DeadLetter]:
        wanted = None if uuids is None else set(uuids)
        found = [
            x
            for q in queues
            for x in self._live_dead(q).values()
            if wanted is None or x.uuid in wanted
        ]
        found.sort(key=lambda x: x.dead_at, reverse=True)
        return found[:limit]

    async def drop_dead_letters(
        self,
        queues: Sequence[str],
        uuids: Sequence[str] | None = None,
        dead_at_most: float | None = None,
    ) -> list[str]:
        dropped: list[str] = []
        for q in dict.fromkeys(queues):
            letters = self._live_dead(q)
            names = list(letters) if uuids is None else list(dict.fromkeys(uuids))
            for uuid in names:
                letter = letters.get(uuid)
                if letter is not None and (dead_at_most is None or letter.dead_at <= dead_at_most):
                    del letters[uuid]
                    dropped.append(uuid)
        return dropped

    async def queue_stats(self, queues: Sequence[str]) -> list[QueueStats]:
        """Ready (per priority), delayed, in-flight and dead-lettered messages of each queue."""
        out = await self._queue_stats(queues)
        for stats in out:
            stats.dead_lettered = len(self._live_dead(stats.queue))
        return out

    async def join(self, timeout: float | None = None) -> None:
        """Wait until no message is ready, delayed or in flight."""
        _, idle = self._events()
        self._update_idle()
        await asyncio.wait_for(idle.wait(), timeout)
