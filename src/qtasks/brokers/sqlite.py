"""The embedded broker: a queue table in one SQLite file, shared by every local process.

Why it works this way:

* A message is a row; a claim is `consumer = <this broker's id>` written in the same
  transaction that selected the row, and SQLite runs one write transaction at a time per
  file, so two workers (threads or processes) never get the same message.
* Rows stay until acked. Each consumer has a heartbeat row, refreshed by a THREAD (with
  its own connection) so a task that blocks the event loop cannot make a live worker look
  dead. The sweep (run by every consumer's thread) frees the claims of consumers silent
  for `worker_lost_after_seconds`, or with no consumer row at all: a killed worker's tasks
  come back. A live consumer's claims are never taken, however long a task runs.
* `eta = 0` marks a row as due. Delayed rows keep their eta until a fetch promotes them
  (`eta = 0`) once due, so the claim query reads a partial index holding only ready rows
  in (priority, created_at, id) order and stops after `max_count` rows, never walking
  over delayed or claimed ones.
* SQLite cannot push, so an empty fetch polls: with backoff from 2 ms to
  `poll_interval_seconds`, never past the next eta, and cheaply (`PRAGMA data_version`
  tells whether another process wrote at all; only then is a claim tried). Publishes,
  releases and requeues made in this process wake fetchers at once through a signal.
* Dead letters sit in their own table (`qtasks_dead_letters`), not as a row status: a
  retried letter is published again under its uuid before the letter is dropped. Moving
  a claimed row there is one transaction; the sweep deletes letters past their TTL.
* Ids come from AUTOINCREMENT, so a receipt (the row id) is never reused by a later
  message and a late ack cannot delete someone else's row.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket
import sqlite3
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

from qtasks._sqlite import (
    DEFAULT_NAMESPACE,
    SqliteComponent,
    SqliteDatabase,
    chunks,
    connect,
    placeholders,
)
from qtasks.errors import BrokerError, QTasksError
from qtasks.interfaces import Broker, Delivery, QueueStats, Storage
from qtasks.message import DeadLetter, Envelope, Task
from qtasks.runtime.heartbeat import HeartbeatThread
from qtasks.storages.sqlite import SqliteStorage

if TYPE_CHECKING:
    from qtasks.config import QueueConfig

log = logging.getLogger(__name__)

_FIRST_POLL_SECONDS = 0.002

_INSERT = (
    "INSERT INTO qtasks_queue (ns, queue, uuid, priority, created_at, eta, body)"
    " VALUES (?, ?, ?, ?, ?, ?, ?)"
)
# The literal `consumer IS NULL AND eta = 0` must match the partial index's WHERE clause.
_SELECT_READY = (
    "SELECT id, body, queue, priority, created_at, deliveries FROM qtasks_queue"
    " WHERE ns = ? AND queue = ? AND consumer IS NULL AND eta = 0"
    " ORDER BY priority, created_at, id LIMIT ?"
)
_NEXT_ETA = "SELECT MIN(eta) FROM qtasks_queue WHERE ns = ? AND queue = ? AND eta > 0"
_REQUEUE = (
    "UPDATE qtasks_queue SET queue = ?, uuid = ?, priority = ?, created_at = ?, eta = ?,"
    " body = ?, deliveries = ?, consumer = NULL WHERE id = ? AND (consumer = ? OR consumer IS NULL)"
)

_DEAD_COLUMNS = (
    "uuid, queue, reason, body, name, detail, priority, delivery_count, created_at, dead_at"
)
# OR REPLACE: a letter dead-lettered again (after a retry) replaces its older self.
_INSERT_DEAD = (
    f"INSERT OR REPLACE INTO qtasks_dead_letters (ns, {_DEAD_COLUMNS})"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)

_Row = tuple[int, bytes, str, int, float, int]


class _Claim(NamedTuple):
    rows: list[_Row]
    next_eta: float | None
    data_version: int


def beat(conn: sqlite3.Connection, namespace: str, consumer_id: str) -> None:
    """Record that `consumer_id` is alive now (re-creating its row if a sweep removed it)."""
    conn.execute(
        "INSERT OR REPLACE INTO qtasks_consumers (id, ns, heartbeat) VALUES (?, ?, ?)",
        (consumer_id, namespace, time.time()),
    )


def sweep(
    conn: sqlite3.Connection,
    namespace: str,
    lost_after_seconds: float,
    dead_letter_ttl_seconds: float | None = None,
) -> int:
    """Free the claims of consumers silent for `lost_after_seconds`; how many were freed.

    Also deletes dead letters older than `dead_letter_ttl_seconds` (None: keeps them).
    Runs its own transaction on `conn` (a connection in autocommit mode).
    """
    conn.execute("BEGIN IMMEDIATE")
    try:
        if dead_letter_ttl_seconds is not None:
            conn.execute(
                "DELETE FROM qtasks_dead_letters WHERE ns = ? AND dead_at < ?",
                (namespace, time.time() - dead_letter_ttl_seconds),
            )
        conn.execute(
            "DELETE FROM qtasks_consumers WHERE ns = ? AND heartbeat < ?",
            (namespace, time.time() - lost_after_seconds),
        )
        # Claims of consumers with no row: just removed above, or never seen again after a
        # crash. Deliveries are kept, so the next worker sees this was tried before.
        freed = conn.execute(
            "UPDATE qtasks_queue SET consumer = NULL"
            " WHERE ns = ? AND consumer IS NOT NULL"
            " AND consumer NOT IN (SELECT id FROM qtasks_consumers WHERE ns = ?)",
            (namespace, namespace),
        ).rowcount
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    return freed


class _HeartbeatThread(HeartbeatThread):
    """Beats and sweeps through its own SQLite connection (see qtasks.runtime.heartbeat)."""

    def __init__(self, broker: SqliteBroker) -> None:
        super().__init__(broker.consumer_id, broker.config)
        self.path = broker.path
        self.namespace = broker.namespace
        self.dead_letter_ttl = broker.config.dead_letter_ttl_seconds
        self._conn: sqlite3.Connection | None = None

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            self._conn = connect(self.path)
        return self._conn

    def beat(self) -> None:
        beat(self._connection(), self.namespace, self.consumer_id)

    def sweep(self) -> None:
        freed = sweep(self._connection(), self.namespace, self.lost_after, self.dead_letter_ttl)
        if freed:
            log.warning("%d messages of lost workers are deliverable again", freed)

    def failed(self, exc: Exception) -> bool:
        log.warning("SQLite heartbeat to %s failed: %r", self.path, exc)
        return False

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


class SqliteBroker(SqliteComponent, Broker):
    """The broker of `sqlite:///path.db` URLs; see the module docstring for how it works."""

    error_class = BrokerError

    def __init__(
        self,
        path: str | os.PathLike[str] | None = None,
        *,
        namespace: str = DEFAULT_NAMESPACE,
        config: QueueConfig | None = None,
    ) -> None:
        super().__init__(path, namespace=namespace, config=config)
        self.consumer_id = f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}"
        self._registered = False
        self._heartbeat: _HeartbeatThread | None = None

    async def stop(self) -> None:
        """Stop heartbeating, give back every claim still held, then close."""
        db = self._db
        if db is None:
            return
        heartbeat, self._heartbeat = self._heartbeat, None
        if heartbeat is not None:
            heartbeat.stop()
        if self._registered:
            self._registered = False
            ns, me = self.namespace, self.consumer_id

            def give_back(conn: sqlite3.Connection) -> int:
                n = conn.execute(
                    "UPDATE qtasks_queue SET consumer = NULL, deliveries = MAX(deliveries - 1, 0)"
                    " WHERE ns = ? AND consumer = ?",
                    (ns, me),
                ).rowcount
                conn.execute("DELETE FROM qtasks_consumers WHERE id = ?", (me,))
                return n

            try:
                if await self._run(give_back):
                    db.signal(ns).fire()
            except QTasksError as exc:
                # The consumer row stays without heartbeats: the sweep frees the claims later.
                log.warning("could not give back claims on stop: %s", exc)
        await super().stop()

    def _publish_job(self, envelopes: Sequence[Envelope]) -> Callable[[sqlite3.Connection], None]:
        ns = self.namespace
        now = time.time()
        rows = [
            (ns, e.queue, e.uuid, e.priority, e.created_at, _stored_eta(e.eta, now), e.body)
            for e in envelopes
        ]

        def insert(conn: sqlite3.Connection) -> None:
            conn.executemany(_INSERT, rows)

        return insert

    async def publish(self, envelopes: Sequence[Envelope]) -> None:
        """Insert every message in one transaction."""
        if not envelopes:
            return
        await self._run(self._publish_job(envelopes))
        self.db.signal(self.namespace).fire()

    async def enqueue(
        self, storage: Storage, tasks: Sequence[Task], envelopes: Sequence[Envelope]
    ) -> None:
        """Records and messages in ONE transaction when the storage uses the same file.

        Atomic (nothing to undo if it fails) and one round trip instead of two.
        """
        db = self.db
        if not (isinstance(storage, SqliteStorage) and storage._db is db):
            await super().enqueue(storage, tasks, envelopes)
            return
        add = storage.add_job(tasks) if tasks else None
        publish = self._publish_job(envelopes) if envelopes else None

        def both(conn: sqlite3.Connection) -> None:
            if add is not None:
                add(conn)
            if publish is not None:
                publish(conn)

        await self._run(both)
        if envelopes:
            db.signal(self.namespace).fire()

    async def _register(self) -> None:
        if self._registered:
            return
        ns, me = self.namespace, self.consumer_id
        # Before the first claim, so a sweep never sees our claims without our row.
        await self._run(lambda conn: beat(conn, ns, me))
        self._registered = True
        if self._heartbeat is None:
            self._heartbeat = _HeartbeatThread(self)
            self._heartbeat.start()

    async def fetch(self, queues: Sequence[str], max_count: int, timeout: float) -> list[Delivery]:
        """Claim due messages; poll (cheaply) until `timeout` if there are none."""
        db = self.db
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(timeout, 0.0)
        names = list(dict.fromkeys(queues))
        if max_count <= 0:
            return []
        if not names:
            await asyncio.sleep(max(timeout, 0.0))
            return []
        await self._register()
        signal = db.signal(self.namespace)
        delay = _FIRST_POLL_SECONDS
        poll_max = max(self.config.poll_interval_seconds, _FIRST_POLL_SECONDS)
        while True:
            seen = signal.version
            claim = await self._claim(db, names, max_count)
            if claim.rows:
                return [Delivery(r[1], r[0], r[2], r[3], r[4], r[5] + 1) for r in claim.rows]
            while True:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    return []
                step = min(delay, remaining)
                if claim.next_eta is not None:
                    step = min(step, max(0.0, claim.next_eta - time.time()))
                if await signal.wait(seen, step):
                    break  # something was published or given back in this process
                delay = min(delay * 2, poll_max)
                if claim.next_eta is not None and time.time() >= claim.next_eta:
                    break
                if loop.time() >= deadline:
                    return []
                if await self._run(_data_version, write=False) != claim.data_version:
                    break  # another process wrote: worth a real claim

    async def _claim(self, db: SqliteDatabase, queues: list[str], max_count: int) -> _Claim:
        ns, me = self.namespace, self.consumer_id

        def claim(conn: sqlite3.Connection) -> _Claim:
            now = time.time()
            conn.execute(
                f"UPDATE qtasks_queue SET eta = 0 WHERE ns = ? AND queue IN"
                f" ({placeholders(len(queues))}) AND eta > 0 AND eta <= ?",
                (ns, *queues, now),
            )
            rows: list[_Row] = []
            for queue in queues:
                rows += conn.execute(_SELECT_READY, (ns, queue, max_count)).fetchall()
            if len(queues) > 1:
                rows.sort(key=lambda r: (r[3], r[4], r[0]))
                del rows[max_count:]
            if rows:
                for part in chunks([r[0] for r in rows]):
                    conn.execute(
                        "UPDATE qtasks_queue SET consumer = ?, deliveries = deliveries + 1"
                        f" WHERE id IN ({placeholders(len(part))})",
                        (me, *part),
                    )
                return _Claim(rows, None, 0)
            etas = [conn.execute(_NEXT_ETA, (ns, q)).fetchone()[0] for q in queues]
            next_eta = min((e for e in etas if e is not None), default=None)
            return _Claim([], next_eta, _data_version(conn))

        inner = asyncio.ensure_future(self._run(claim))
        try:
            return await asyncio.shield(inner)
        except asyncio.CancelledError:
            # The claim runs anyway; give back what it took, since nobody will process it.
            inner.add_done_callback(lambda fut: self._give_back_orphans(db, fut))
            raise

    def _give_back_orphans(self, db: SqliteDatabase, fut: asyncio.Future[_Claim]) -> None:
        if fut.cancelled() or fut.exception() is not None:
            return
        ids = [r[0] for r in fut.result().rows]
        if ids:
            me = self.consumer_id
            # If the file is closed already, stop() gave back everything we held.
            with contextlib.suppress(sqlite3.Error):
                db.submit(lambda conn: _release(conn, ids, me))

    async def ack(self, deliveries: Sequence[Delivery]) -> None:
        """Delete finished messages."""
        ids = [d.receipt for d in deliveries]
        if not ids:
            return

        def delete(conn: sqlite3.Connection) -> None:
            for part in chunks(ids):
                conn.execute(
                    f"DELETE FROM qtasks_queue WHERE id IN ({placeholders(len(part))})", part
                )

        await self._run(delete)

    async def release(self, deliveries: Sequence[Delivery]) -> None:
        """Unclaim messages as if never delivered (their delivery count goes back down)."""
        ids = [d.receipt for d in deliveries]
        if not ids:
            return
        me = self.consumer_id
        await self._run(lambda conn: _release(conn, ids, me))
        self.db.signal(self.namespace).fire()

    async def requeue(self, items: Sequence[tuple[Delivery, Envelope]]) -> None:
        """Swap each claimed row's message for the next attempt's, in one transaction."""
        if not items:
            return
        now = time.time()
        me = self.consumer_id
        rows = [
            (
                e.queue,
                e.uuid,
                e.priority,
                e.created_at,
                _stored_eta(e.eta, now),
                e.body,
                e.deliveries,
                d.receipt,
                me,
            )
            for d, e in items
        ]

        def update(conn: sqlite3.Connection) -> None:
            conn.executemany(_REQUEUE, rows)

        await self._run(update)
        self.db.signal(self.namespace).fire()

    async def dead_letter(self, items: Sequence[tuple[Delivery, DeadLetter]]) -> None:
        """Delete each claimed row and store its dead letter, all in one transaction.

        Like `ack`, a row that is gone already (settled by another consumer after a sweep)
        leaves nothing behind: no second letter, nothing brought back.
        """
        if not items:
            return
        ns = self.namespace
        rows = [
            (
                d.receipt,
                (
                    ns,
                    x.uuid,
                    x.queue,
                    x.reason,
                    x.body,
                    x.name,
                    x.detail,
                    x.priority,
                    x.delivery_count,
                    x.created_at,
                    x.dead_at,
                ),
            )
            for d, x in items
        ]

        def move(conn: sqlite3.Connection) -> None:
            for receipt, letter in rows:
                if conn.execute("DELETE FROM qtasks_queue WHERE id = ?", (receipt,)).rowcount:
                    conn.execute(_INSERT_DEAD, letter)

        await self._run(move)

    def _dead_cutoff(self) -> float:
        # Letters older than this are expired (the sweep deletes them; reads skip them).
        ttl = self.config.dead_letter_ttl_seconds
        return float("-inf") if ttl is None else time.time() - ttl

    async def dead_letters(
        self, queues: Sequence[str], limit: int = 100, uuids: Sequence[str] | None = None
    ) -> list[DeadLetter]:
        """Dead letters of `queues`, newest first, at most `limit` (only `uuids` if given)."""
        ns = self.namespace
        names = list(dict.fromkeys(queues))
        wanted = None if uuids is None else list(dict.fromkeys(str(u) for u in uuids))
        if limit <= 0 or not names or wanted == []:
            return []
        cutoff = self._dead_cutoff()
        select = f"SELECT {_DEAD_COLUMNS} FROM qtasks_dead_letters WHERE ns = ? AND queue = ?"

        def read(conn: sqlite3.Connection) -> list[DeadLetter]:
            rows: list[tuple[Any, ...]] = []
            for q in names:
                if wanted is None:
                    sql = f"{select} AND dead_at >= ? ORDER BY dead_at DESC LIMIT ?"
                    rows += conn.execute(sql, (ns, q, cutoff, limit)).fetchall()
                    continue
                for part in chunks(wanted, 500):
                    sql = f"{select} AND uuid IN ({placeholders(len(part))}) AND dead_at >= ?"
                    rows += conn.execute(sql, (ns, q, *part, cutoff)).fetchall()
            rows.sort(key=lambda r: r[9], reverse=True)
            return [_dead_letter(r) for r in rows[:limit]]

        return await self._run(read, write=False)

    async def drop_dead_letters(
        self,
        queues: Sequence[str],
        uuids: Sequence[str] | None = None,
        dead_at_most: float | None = None,
    ) -> list[str]:
        """Delete dead letters of `queues` (only `uuids` if given); the uuids deleted."""
        ns = self.namespace
        names = list(dict.fromkeys(queues))
        wanted = None if uuids is None else list(dict.fromkeys(str(u) for u in uuids))
        if not names or wanted == []:
            return []
        cutoff = self._dead_cutoff()
        newest = float("inf") if dead_at_most is None else dead_at_most

        def delete(conn: sqlite3.Connection) -> list[str]:
            dropped: list[str] = []
            for q in names:
                if wanted is None:
                    where = "WHERE ns = ? AND queue = ? AND dead_at <= ?"
                    sql = f"SELECT uuid FROM qtasks_dead_letters {where} AND dead_at >= ?"
                    dropped += [str(r[0]) for r in conn.execute(sql, (ns, q, newest, cutoff))]
                    conn.execute(f"DELETE FROM qtasks_dead_letters {where}", (ns, q, newest))
                    continue
                for part in chunks(wanted, 500):
                    # SELECT then DELETE in the job's one transaction (no RETURNING before 3.35).
                    where = (
                        f"WHERE ns = ? AND queue = ? AND dead_at <= ? "
                        f"AND uuid IN ({placeholders(len(part))})"
                    )
                    sql = f"SELECT uuid FROM qtasks_dead_letters {where} AND dead_at >= ?"
                    found = {str(r[0]) for r in conn.execute(sql, (ns, q, newest, *part, cutoff))}
                    conn.execute(f"DELETE FROM qtasks_dead_letters {where}", (ns, q, newest, *part))
                    dropped += [u for u in part if u in found]
            return dropped

        return await self._run(delete)

    async def queue_sizes(self, queues: Sequence[str]) -> dict[str, int]:
        """Ready + delayed + claimed messages per queue."""
        ns = self.namespace
        names = list(dict.fromkeys(queues))

        def count(conn: sqlite3.Connection) -> dict[str, int]:
            sizes: dict[str, int] = {}
            for q in names:
                # Three counts, each answered by one partial index, not a table scan.
                ready = conn.execute(
                    "SELECT COUNT(*) FROM qtasks_queue"
                    " WHERE ns = ? AND queue = ? AND consumer IS NULL AND eta = 0",
                    (ns, q),
                ).fetchone()[0]
                delayed = conn.execute(
                    "SELECT COUNT(*) FROM qtasks_queue WHERE ns = ? AND queue = ? AND eta > 0",
                    (ns, q),
                ).fetchone()[0]
                claimed = conn.execute(
                    "SELECT COUNT(*) FROM qtasks_queue"
                    " WHERE ns = ? AND consumer IS NOT NULL AND queue = ?",
                    (ns, q),
                ).fetchone()[0]
                sizes[q] = int(ready) + int(delayed) + int(claimed)
            return sizes

        return await self._run(count, write=False)

    async def queue_stats(self, queues: Sequence[str]) -> list[QueueStats]:
        """Ready (per priority), delayed, claimed and dead-lettered messages of each queue."""
        ns = self.namespace
        names = list(dict.fromkeys(queues))
        cutoff = self._dead_cutoff()

        def count(conn: sqlite3.Connection) -> list[QueueStats]:
            out: list[QueueStats] = []
            for q in names:
                by_priority = {
                    int(p): int(n)
                    for p, n in conn.execute(
                        "SELECT priority, COUNT(*) FROM qtasks_queue"
                        " WHERE ns = ? AND queue = ? AND consumer IS NULL AND eta = 0"
                        " GROUP BY priority ORDER BY priority",
                        (ns, q),
                    )
                }
                delayed = conn.execute(
                    "SELECT COUNT(*) FROM qtasks_queue WHERE ns = ? AND queue = ? AND eta > 0",
                    (ns, q),
                ).fetchone()[0]
                claimed = conn.execute(
                    "SELECT COUNT(*) FROM qtasks_queue"
                    " WHERE ns = ? AND consumer IS NOT NULL AND queue = ?",
                    (ns, q),
                ).fetchone()[0]
                dead = conn.execute(
                    "SELECT COUNT(*) FROM qtasks_dead_letters"
                    " WHERE ns = ? AND queue = ? AND dead_at >= ?",
                    (ns, q, cutoff),
                ).fetchone()[0]
                ready = sum(by_priority.values())
                out.append(
                    QueueStats(
                        queue=q,
                        total=ready + int(delayed) + int(claimed),
                        ready=ready,
                        delayed=int(delayed),
                        in_flight=int(claimed),
                        dead_lettered=int(dead),
                        by_priority=by_priority,
                    )
                )
            return out

        return await self._run(count, write=False)

    async def discard(self, uuids: Sequence[str], queues: Sequence[str] | None = None) -> list[str]:
        """Delete unclaimed messages with these uuids in one transaction."""
        ns = self.namespace
        keys = list(dict.fromkeys(str(u) for u in uuids))

        def delete(conn: sqlite3.Connection) -> list[str]:
            removed: list[str] = []
            for part in chunks(keys, 500):
                # SELECT then DELETE in the job's one transaction (no RETURNING before 3.35).
                where = f"WHERE ns = ? AND consumer IS NULL AND uuid IN ({placeholders(len(part))})"
                removed += [
                    str(row[0])
                    for row in conn.execute(f"SELECT uuid FROM qtasks_queue {where}", (ns, *part))
                ]
                conn.execute(f"DELETE FROM qtasks_queue {where}", (ns, *part))
            return removed

        return await self._run(delete) if keys else []

    async def purge(self, queues: Sequence[str]) -> list[str]:
        """Delete the unclaimed messages of `queues` in one transaction."""
        ns = self.namespace
        names = list(dict.fromkeys(queues))

        def delete(conn: sqlite3.Connection) -> list[str]:
            dropped: list[str] = []
            for q in names:
                where = "WHERE ns = ? AND queue = ? AND consumer IS NULL"
                sql = f"SELECT uuid FROM qtasks_queue {where}"
                dropped += [str(row[0]) for row in conn.execute(sql, (ns, q))]
                conn.execute(f"DELETE FROM qtasks_queue {where}", (ns, q))
            return dropped

        return await self._run(delete)


def _stored_eta(eta: float | None, now: float) -> float:
    # 0 means due: such rows go straight into the ready index.
    return 0.0 if eta is None or eta <= now else float(eta)


def _dead_letter(row: tuple[Any, ...]) -> DeadLetter:
    # Columns in _DEAD_COLUMNS order.
    return DeadLetter(
        uuid=str(row[0]),
        queue=str(row[1]),
        reason=str(row[2]),
        body=bytes(row[3]),
        name=None if row[4] is None else str(row[4]),
        detail=str(row[5]),
        priority=int(row[6]),
        delivery_count=int(row[7]),
        created_at=float(row[8]),
        dead_at=float(row[9]),
    )


def _data_version(conn: sqlite3.Connection) -> int:
    # Changes whenever ANOTHER connection (process) committed to the file.
    return int(conn.execute("PRAGMA data_version").fetchone()[0])


def _release(conn: sqlite3.Connection, ids: Sequence[int], consumer_id: str) -> None:
    for part in chunks(ids):
        conn.execute(
            "UPDATE qtasks_queue SET consumer = NULL, deliveries = MAX(deliveries - 1, 0)"
            f" WHERE consumer = ? AND id IN ({placeholders(len(part))})",
            (consumer_id, *part),
        )
