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
"""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import msgspec

from qtasks._sqlite import DEFAULT_NAMESPACE, SqliteComponent, chunks, placeholders
from qtasks._waiters import Waiters
from qtasks.errors import EncodeError, StorageError
from qtasks.interfaces import Storage
from qtasks.message import Task

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
        self._next_purge = 0.0

    async def start(self) -> None:
        """Open the file and join this process's waiters for it."""
        await super().start()
        self._waiters = self.db.shared("waiters", self.namespace, Waiters)

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

        await self._run(delete)

    async def purge_expired(self) -> int:
        """Delete up to 1000 expired records now (of every namespace); how many went."""
        now = time.time()
        return await self._run(lambda conn: _purge(conn, now))


def _purge(conn: sqlite3.Connection, now: float) -> int:
    # Expiry times are absolute, so deleting other namespaces' expired rows is correct too.
    # Bounded, so a large backlog never holds the write lock for long.
    return conn.execute(
        "DELETE FROM qtasks_tasks WHERE rowid IN"
        " (SELECT rowid FROM qtasks_tasks WHERE expires_at <= ? LIMIT ?)",
        (now, _PURGE_CHUNK),
    ).rowcount
