"""The embedded storage: task records in the same SQLite file as the queue.

Why it works this way:

* A record is one row holding the whole `Task` as msgspec JSON, plus the few columns
  queries need (status, expiry). Encoding happens in the caller, so the writer thread only
  runs `executemany`; a batch of 100 results is one short transaction.
* Reads (`get`) go through the shared writer thread as read-only jobs: they are batched
  with other work, take no write lock and always see this process's own earlier writes.
* `wait` is woken at once by writers in this process (waiters shared per file and
  namespace, so a producer and a worker built separately still wake each other); for
  workers in other processes it re-reads with backoff up to `poll_interval_seconds`.
* Finished records get `expires_at = finished_at + result_ttl_seconds`; `get` hides expired
  rows at once and `save` purges them in bounded chunks at most once per sweep interval.
* Steps of generator tasks are rows of `qtasks_steps` (task, seq, value); `steps` reads
  them with the task's status in one read job, so a final record it returns comes with
  every step. Readers wait like `wait`: woken at once by this process's writers, re-reading
  with backoff for other processes'. Steps are purged with their task's record.
* State lives in `qtasks_state` (one row per key). Every State method is one job of the
  writer thread, and each job runs inside a `BEGIN IMMEDIATE` transaction that holds the
  file's write lock: a read-modify-write such as `state_incr` is atomic across processes.
  Locks are rows of `qtasks_state_locks` with an owner token and an expiry time.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import msgspec

from qtasks._sqlite import DEFAULT_NAMESPACE, SqliteComponent, chunks, placeholders
from qtasks._waiters import Waiters
from qtasks.errors import EncodeError, StorageError
from qtasks.interfaces import Steps, Storage
from qtasks.message import Task, TaskStatusEnum
from qtasks.plugins.state import add_number, encode_value
from qtasks.storages.steps import StepWaiters

if TYPE_CHECKING:
    from qtasks.config import QueueConfig

_PURGE_CHUNK = 1000

_COLUMNS = "(ns, uuid, name, status, record, updated_at, expires_at) VALUES (?, ?, ?, ?, ?, ?, ?)"
if sqlite3.sqlite_version_info >= (3, 24, 0):
    # An upsert updates the row in place: about twice as fast as REPLACE, which deletes
    # and re-inserts (touching the primary-key index twice). Older SQLite lacks it.
    _UPSERT = (
        f"INSERT INTO qtasks_tasks {_COLUMNS} ON CONFLICT (ns, uuid) DO UPDATE SET"
        " name = excluded.name, status = excluded.status, record = excluded.record,"
        " updated_at = excluded.updated_at, expires_at = excluded.expires_at"
    )
else:  # pragma: no cover - SQLite before 2018
    _UPSERT = f"INSERT OR REPLACE INTO qtasks_tasks {_COLUMNS}"
_STATE_UPSERT = "INSERT OR REPLACE INTO qtasks_state (ns, name, key, value) VALUES (?, ?, ?, ?)"
_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(Task)

_Row = tuple[str, str, str, str, bytes, float, "float | None"]


class SqliteStorage(SqliteComponent, Storage):
    """The storage of `sqlite:///path.db` URLs; see the module docstring."""

    error_class = StorageError

    def __init__(
        self,
        path: str | os.PathLike[str] | None = None,
        *,
        namespace: str = DEFAULT_NAMESPACE,
        config: QueueConfig | None = None,
    ) -> None:
        super().__init__(path, namespace=namespace, config=config)
        self._waiters = Waiters()
        self._step_waiters = StepWaiters()
        self._next_purge = 0.0

    async def start(self) -> None:
        """Open the file and join this process's waiters for it."""
        await super().start()
        self._waiters = self.db.shared("waiters", self.namespace, Waiters)
        self._step_waiters = self.db.shared("step_waiters", self.namespace, StepWaiters)

    def _rows(self, tasks: Sequence[Task], now: float, with_expiry: bool) -> list[_Row]:
        ttl = self.config.result_ttl_seconds
        ns = self.namespace
        rows: list[_Row] = []
        for task in tasks:
            try:
                record = _encoder.encode(task)
            except (TypeError, ValueError, OverflowError) as exc:
                raise EncodeError(f"task {task.uuid} cannot be stored: {exc}") from exc
            expires = None
            if with_expiry and ttl is not None and task.is_final:
                expires = (task.finished_at or now) + ttl
            rows.append((ns, str(task.uuid), task.name, task.status.value, record, now, expires))
        return rows

    def add_job(self, tasks: Sequence[Task]) -> Callable[[sqlite3.Connection], None]:
        """A database job that inserts new records, for a broker's own transaction."""
        rows = self._rows(tasks, time.time(), with_expiry=False)

        def insert(conn: sqlite3.Connection) -> None:
            conn.executemany(_UPSERT, rows)

        return insert

    async def add(self, tasks: Sequence[Task]) -> None:
        """Insert new records (a record with the same uuid is replaced)."""
        if tasks:
            await self._run(self.add_job(tasks))

    async def save(self, tasks: Sequence[Task]) -> None:
        """Upsert records in one transaction, then wake their waiters in this process."""
        if not tasks:
            return
        now = time.time()
        rows = self._rows(tasks, now, with_expiry=True)
        purge = now >= self._next_purge
        if purge:
            self._next_purge = now + self.config.sweep_interval_seconds

        def upsert(conn: sqlite3.Connection) -> int:
            conn.executemany(_UPSERT, rows)
            return _purge(conn, now) if purge else 0

        if await self._run(upsert) >= _PURGE_CHUNK:
            self._next_purge = 0.0  # more expired rows are left: purge again next time
        self._waiters.notify(tasks)
        if self._step_waiters:
            self._step_waiters.notify(str(t.uuid) for t in tasks if t.is_final)

    async def get(self, uuid: str) -> Task | None:
        """The record, or None if unknown or expired."""
        key = (self.namespace, str(uuid))

        def read(conn: sqlite3.Connection) -> tuple[bytes, float | None] | None:
            row: tuple[bytes, float | None] | None = conn.execute(
                "SELECT record, expires_at FROM qtasks_tasks WHERE ns = ? AND uuid = ?", key
            ).fetchone()
            return row

        row = await self._run(read, write=False)
        if row is None:
            return None
        record, expires_at = row
        if expires_at is not None and expires_at <= time.time():
            return None
        try:
            return _decoder.decode(record)
        except msgspec.DecodeError as exc:
            raise StorageError(f"record {uuid} in {self.path} is corrupt: {exc}") from exc

    async def wait(self, uuid: str, timeout: float) -> Task | None:
        """The final record, or None after `timeout`; see the module docstring for how."""
        return await self._waiters.wait_final(
            str(uuid),
            timeout,
            lambda: self.get(uuid),
            recheck_max_seconds=self.config.poll_interval_seconds,
        )

    async def remove(self, uuids: Sequence[str]) -> None:
        """Delete records."""
        keys = [str(u) for u in uuids]
        if not keys:
            return
        ns = self.namespace

        def delete(conn: sqlite3.Connection) -> None:
            for part in chunks(keys):
                marks = placeholders(len(part))
                conn.execute(
                    f"DELETE FROM qtasks_tasks WHERE ns = ? AND uuid IN ({marks})", (ns, *part)
                )
                conn.execute(
                    f"DELETE FROM qtasks_steps WHERE ns = ? AND uuid IN ({marks})", (ns, *part)
                )

        await self._run(delete)

    async def recent(self, status: TaskStatusEnum, limit: int) -> list[Task]:
        """Unexpired records with `status`, most recently updated first."""
        args = (self.namespace, status.value, time.time(), max(limit, 0))

        def read(conn: sqlite3.Connection) -> list[bytes]:
            # A scan of the namespace's rows: fine for an operator's query, not a hot path.
            return [
                row[0]
                for row in conn.execute(
                    "SELECT record FROM qtasks_tasks WHERE ns = ? AND status = ?"
                    " AND (expires_at IS NULL OR expires_at > ?)"
                    " ORDER BY updated_at DESC LIMIT ?",
                    args,
                )
            ]

        rows = await self._run(read, write=False)
        try:
            return [_decoder.decode(raw) for raw in rows]
        except msgspec.DecodeError as exc:
            raise StorageError(f"a record in {self.path} is corrupt: {exc}") from exc

    # -- Steps ---------------------------------------------------------------------------

    async def add_steps(self, uuid: str, values: Sequence[Any]) -> None:
        """Append steps in one transaction, then wake their readers in this process."""
        uuid = str(uuid)
        encoded = []
        for value in values:
            try:
                encoded.append(_encoder.encode(value))
            except (TypeError, ValueError, OverflowError) as exc:
                raise EncodeError(f"a step of task {uuid} cannot be stored: {exc}") from exc
        if not encoded:
            return
        key = (self.namespace, uuid)

        def append(conn: sqlite3.Connection) -> None:
            # Under the write lock: no other writer can take the same seq meanwhile.
            (first,) = conn.execute(
                "SELECT COALESCE(MAX(seq) + 1, 0) FROM qtasks_steps WHERE ns = ? AND uuid = ?",
                key,
            ).fetchone()
            conn.executemany(
                "INSERT INTO qtasks_steps (ns, uuid, seq, value) VALUES (?, ?, ?, ?)",
                [(*key, first + i, value) for i, value in enumerate(encoded)],
            )

        await self._run(append)
        self._step_waiters.notify((uuid,))

    async def steps(self, uuid: str, after: int, timeout: float) -> Steps:
        """Steps from `after` on, or the final record; see the module docstring for waiting."""
        uuid = str(uuid)
        after = max(after, 0)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(timeout, 0.0)
        interval = 0.001
        waiters = self._step_waiters
        while True:
            # Registered before reading, so a write in this process in between wakes us.
            fut = waiters.register(uuid)
            try:
                page = await self._read_steps(uuid, after)
                if page.values or page.final is not None:
                    return page
                remaining = deadline - loop.time()
                if remaining <= 0:
                    return page
                # Writers in other processes cannot reach `fut`: re-read with backoff.
                await waiters.wait(fut, min(remaining, interval))
                interval = min(interval * 2, self.config.poll_interval_seconds)
            finally:
                waiters.discard(uuid, fut)

    async def _read_steps(self, uuid: str, after: int) -> Steps:
        key = (self.namespace, uuid)

        def read(conn: sqlite3.Connection) -> tuple[bytes | None, list[bytes]]:
            # One read transaction: the status and the steps are one consistent snapshot.
            row = conn.execute(
                "SELECT record, status, expires_at FROM qtasks_tasks WHERE ns = ? AND uuid = ?",
                key,
            ).fetchone()
            if row is not None and row[2] is not None and row[2] <= time.time():
                return None, []  # expired: its steps are gone too, whatever the purge did
            values = [
                r[0]
                for r in conn.execute(
                    "SELECT value FROM qtasks_steps WHERE ns = ? AND uuid = ? AND seq >= ?"
                    " ORDER BY seq",
                    (*key, after),
                )
            ]
            final = row[0] if row is not None and TaskStatusEnum(row[1]).is_final else None
            return final, values

        final, raw = await self._run(read, write=False)
        try:
            values = [msgspec.json.decode(v) for v in raw]
            record = None if final is None else _decoder.decode(final)
        except msgspec.DecodeError as exc:
            raise StorageError(f"steps of task {uuid} in {self.path} are corrupt: {exc}") from exc
        return Steps(values, after + len(values), record)

    # -- State: each method is one job, so one transaction under the write lock -----------

    async def state_get(self, name: str, key: str, default: Any = None) -> Any:
        """The value under key of state `name`, or default."""
        args = (self.namespace, name, key)

        def read(conn: sqlite3.Connection) -> bytes | None:
            row = conn.execute(
                "SELECT value FROM qtasks_state WHERE ns = ? AND name = ? AND key = ?", args
            ).fetchone()
            return None if row is None else row[0]

        raw = await self._run(read, write=False)
        return default if raw is None else msgspec.json.decode(raw)

    async def state_get_all(self, name: str) -> dict[str, Any]:
        """Every key and value of state `name`."""
        args = (self.namespace, name)

        def read(conn: sqlite3.Connection) -> list[tuple[str, bytes]]:
            return list(
                conn.execute(
                    "SELECT key, value FROM qtasks_state WHERE ns = ? AND name = ? ORDER BY key",
                    args,
                )
            )

        return {k: msgspec.json.decode(v) for k, v in await self._run(read, write=False)}

    async def state_update(self, name: str, values: Mapping[str, Any]) -> None:
        """Set several keys in one transaction."""
        rows = [(self.namespace, name, k, encode_value(v)) for k, v in values.items()]
        if not rows:
            return

        def write(conn: sqlite3.Connection) -> None:
            conn.executemany(_STATE_UPSERT, rows)

        await self._run(write)

    async def state_delete(self, name: str, keys: Sequence[str] | None = None) -> None:
        """Delete keys (every key when None) in one transaction."""
        ns = self.namespace

        def delete(conn: sqlite3.Connection) -> None:
            if keys is None:
                conn.execute("DELETE FROM qtasks_state WHERE ns = ? AND name = ?", (ns, name))
                return
            conn.executemany(
                "DELETE FROM qtasks_state WHERE ns = ? AND name = ? AND key = ?",
                [(ns, name, k) for k in keys],
            )

        await self._run(delete)

    async def state_incr(self, name: str, key: str, amount: int | float = 1) -> int | float:
        """Read, add and write in one transaction that holds the file's write lock."""
        args = (self.namespace, name, key)

        def incr(conn: sqlite3.Connection) -> int | float:
            row = conn.execute(
                "SELECT value FROM qtasks_state WHERE ns = ? AND name = ? AND key = ?", args
            ).fetchone()
            current = 0 if row is None else msgspec.json.decode(row[0])
            value = add_number(name, key, current, amount)
            conn.execute(_STATE_UPSERT, (*args, encode_value(value)))
            return value

        return await self._run(incr)

    async def state_acquire_lock(
        self, name: str, key: str, token: str, expire_seconds: float
    ) -> bool:
        """Take the lock if it is free or expired, in one transaction."""
        args = (self.namespace, name, key)

        def acquire(conn: sqlite3.Connection) -> bool:
            now = time.time()
            conn.execute(
                "DELETE FROM qtasks_state_locks"
                " WHERE ns = ? AND name = ? AND key = ? AND expires_at <= ?",
                (*args, now),
            )
            inserted = conn.execute(
                "INSERT OR IGNORE INTO qtasks_state_locks (ns, name, key, token, expires_at)"
                " VALUES (?, ?, ?, ?, ?)",
                (*args, token, now + expire_seconds),
            ).rowcount
            return bool(inserted)

        return await self._run(acquire)

    async def state_release_lock(self, name: str, key: str, token: str) -> bool:
        """Free the lock if `token` holds it."""
        args = (self.namespace, name, key, token)

        def release(conn: sqlite3.Connection) -> bool:
            return bool(
                conn.execute(
                    "DELETE FROM qtasks_state_locks"
                    " WHERE ns = ? AND name = ? AND key = ? AND token = ?",
                    args,
                ).rowcount
            )

        return await self._run(release)

    async def purge_expired(self) -> int:
        """Delete up to 1000 expired records now (of every namespace); how many went."""
        now = time.time()
        return await self._run(lambda conn: _purge(conn, now))


def _purge(conn: sqlite3.Connection, now: float) -> int:
    # Expiry times are absolute, so deleting other namespaces' expired rows is correct too.
    # Bounded, so a large backlog never holds the write lock for long. The steps of the
    # same tasks go in the same transaction.
    rows = conn.execute(
        "SELECT rowid, ns, uuid FROM qtasks_tasks WHERE expires_at <= ? LIMIT ?",
        (now, _PURGE_CHUNK),
    ).fetchall()
    if rows:
        conn.executemany(
            "DELETE FROM qtasks_steps WHERE ns = ? AND uuid = ?", [(ns, u) for _, ns, u in rows]
        )
        conn.executemany("DELETE FROM qtasks_tasks WHERE rowid = ?", [(r,) for r, _, _ in rows])
    return len(rows)
