"""The shared SQLite handle behind the sqlite broker, storage and global config.

Why it looks like this:

* One `SqliteDatabase` per database file per process, shared through a ref-counted
  registry (`acquire` / `SqliteDatabase.release`). SQLite lets one writer in at a time per
  file, so several connections of one process would only queue up on the file lock (and
  time out under load); one connection owned by one thread never fights itself.
* That thread is the only user of its connection and runs every job. `run(fn)` hands it a
  function and awaits the result on the caller's loop, so the event loop never blocks on
  disk I/O or on another process's write lock.
* Group commit: the thread takes every job that is waiting and runs them in ONE
  transaction, each inside its own SAVEPOINT (a failing job rolls back only itself and
  gets the exception), then commits once. A commit is the expensive part (WAL append,
  lock hand-over), so 100 concurrent `add_task` calls cost about one commit, not 100.
* Batches with only read jobs open a deferred transaction, so readers never take the
  write lock that other processes need. Reads go through the same thread rather than a
  second connection: they are short, get batched like writes, and see this process's
  own writes in order.
* WAL mode with synchronous=NORMAL: readers and the writer do not block each other, and
  a commit does not fsync (a power cut may lose the last commits, never corrupt the file).
  busy_timeout makes a writer wait for another process's transaction instead of failing.
* `Signal` wakes this process's fetchers at once when something here published, so the
  broker only polls for writes made by OTHER processes.
* Each table has an `ns` column (the app's namespace), so two apps can share one file.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, Generic, TypeVar
from urllib.parse import unquote, urlsplit

from qtasks.config import QueueConfig
from qtasks.errors import ConfigurationError, QTasksError
from qtasks.urls import redact_url

T = TypeVar("T")

log = logging.getLogger(__name__)

DEFAULT_FILENAME = "qtasks.sqlite3"
DEFAULT_NAMESPACE = "QueueTasks"
BUSY_TIMEOUT_SECONDS = 10.0
_BEGIN_ATTEMPTS = 3
# Old SQLite builds allow at most 999 bound parameters per statement.
MAX_PARAMS = 900

SCHEMA = """
CREATE TABLE IF NOT EXISTS qtasks_queue (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    ns TEXT NOT NULL,
    queue TEXT NOT NULL,
    uuid TEXT NOT NULL,
    priority INTEGER NOT NULL,
    created_at REAL NOT NULL,
    eta REAL NOT NULL DEFAULT 0,
    body BLOB NOT NULL,
    consumer TEXT,
    deliveries INTEGER NOT NULL DEFAULT 0
);
-- Ready rows only (unclaimed, eta = 0), in claim order: the claim is an index range scan
-- that stops after max_count rows and never walks over claimed or delayed rows.
CREATE INDEX IF NOT EXISTS qtasks_queue_ready
    ON qtasks_queue (ns, queue, priority, created_at, id)
    WHERE consumer IS NULL AND eta = 0;
-- Delayed rows only: promoting due ones and finding the next eta are range scans.
CREATE INDEX IF NOT EXISTS qtasks_queue_delayed
    ON qtasks_queue (ns, queue, eta)
    WHERE eta > 0;
-- Claimed rows only: the sweep, stop() and release by consumer touch nothing else.
CREATE INDEX IF NOT EXISTS qtasks_queue_claimed
    ON qtasks_queue (ns, consumer, queue)
    WHERE consumer IS NOT NULL;
-- Dead letters (messages set aside for an operator), apart from the queue: a retried one
-- is published again under its uuid before its letter is dropped, so both coexist.
-- A new table, so files of earlier versions gain it when opened.
CREATE TABLE IF NOT EXISTS qtasks_dead_letters (
    ns TEXT NOT NULL,
    queue TEXT NOT NULL,
    uuid TEXT NOT NULL,
    reason TEXT NOT NULL,
    body BLOB NOT NULL,
    name TEXT,
    detail TEXT NOT NULL,
    priority INTEGER NOT NULL,
    delivery_count INTEGER NOT NULL,
    created_at REAL NOT NULL,
    dead_at REAL NOT NULL,
    PRIMARY KEY (ns, queue, uuid)
);
-- Newest first per queue, and the sweep's expiry: range scans.
CREATE INDEX IF NOT EXISTS qtasks_dead_letters_queue
    ON qtasks_dead_letters (ns, queue, dead_at);
CREATE INDEX IF NOT EXISTS qtasks_dead_letters_expiry
    ON qtasks_dead_letters (ns, dead_at);
CREATE TABLE IF NOT EXISTS qtasks_consumers (
    id TEXT PRIMARY KEY,
    ns TEXT NOT NULL,
    heartbeat REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS qtasks_tasks (
    ns TEXT NOT NULL,
    uuid TEXT NOT NULL,
    name TEXT NOT NULL,
    status TEXT NOT NULL,
    record BLOB NOT NULL,
    updated_at REAL NOT NULL,
    expires_at REAL,
    PRIMARY KEY (ns, uuid)
);
CREATE INDEX IF NOT EXISTS qtasks_tasks_expires
    ON qtasks_tasks (expires_at)
    WHERE expires_at IS NOT NULL;
CREATE TABLE IF NOT EXISTS qtasks_global (
    ns TEXT NOT NULL,
    key TEXT NOT NULL,
    value BLOB NOT NULL,
    PRIMARY KEY (ns, key)
);
CREATE TABLE IF NOT EXISTS qtasks_workers (
    ns TEXT NOT NULL,
    id TEXT NOT NULL,
    info BLOB NOT NULL,
    heartbeat REAL NOT NULL,
    PRIMARY KEY (ns, id)
);
-- State (qtasks.plugins.AsyncState): one row per key of each named state.
CREATE TABLE IF NOT EXISTS qtasks_state (
    ns TEXT NOT NULL,
    name TEXT NOT NULL,
    key TEXT NOT NULL,
    value BLOB NOT NULL,
    PRIMARY KEY (ns, name, key)
);
CREATE TABLE IF NOT EXISTS qtasks_state_locks (
    ns TEXT NOT NULL,
    name TEXT NOT NULL,
    key TEXT NOT NULL,
    token TEXT NOT NULL,
    expires_at REAL NOT NULL,
    PRIMARY KEY (ns, name, key)
);
-- Steps of generator tasks (streamed to producers), seq 0, 1, ... per task, deleted
-- with their task's record. (No semicolons in comments: SCHEMA is split on them.)
CREATE TABLE IF NOT EXISTS qtasks_steps (
    ns TEXT NOT NULL,
    uuid TEXT NOT NULL,
    seq INTEGER NOT NULL,
    value BLOB NOT NULL,
    PRIMARY KEY (ns, uuid, seq)
) WITHOUT ROWID;
"""


def path_from_url(url: str) -> str:
    """The database file named by a sqlite:// URL, absolute.

    `sqlite:///rel/path.db` is relative to the working directory, `sqlite:////abs/path.db`
    absolute, and `sqlite://` or `sqlite:///` mean `qtasks.sqlite3` in the working directory.
    """
    parts = urlsplit(url)
    if parts.scheme.lower() != "sqlite":
        raise ConfigurationError(f"{redact_url(url)!r} is not a sqlite:// URL")
    if parts.netloc:
        raise ConfigurationError(
            f"{redact_url(url)!r} has a host part; use sqlite:///relative/path.db or "
            f"sqlite:////abs/path.db"
        )
    path = unquote(parts.path)
    if path.startswith("/"):
        path = path[1:]
    return resolve_path(path or DEFAULT_FILENAME)


def resolve_path(path: str | os.PathLike[str]) -> str:
    """An absolute path for a database file (in-memory databases cannot be shared)."""
    text = os.fspath(path)
    if not text or text == ":memory:" or text.startswith("file:"):
        raise ConfigurationError(
            f"SQLite path {text!r} is not a file; use memory:// for an in-process backend"
        )
    return os.path.abspath(os.path.expanduser(text))


def connect(path: str) -> sqlite3.Connection:
    """A connection with the settings every qtasks connection uses."""
    conn = sqlite3.connect(
        path,
        timeout=BUSY_TIMEOUT_SECONDS,
        isolation_level=None,  # transactions are explicit: BEGIN IMMEDIATE ... COMMIT
    )
    try:
        conn.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_SECONDS * 1000)}")
        mode = _retry_locked(lambda: conn.execute("PRAGMA journal_mode = WAL").fetchone()[0])
        if str(mode).lower() != "wal":
            # Some file systems (network shares) cannot do WAL: it works, only slower.
            log.warning("SQLite database %s runs in %s mode, not WAL", path, mode)
        conn.execute("PRAGMA synchronous = NORMAL")
    except BaseException:
        conn.close()
        raise
    return conn


def is_locked(exc: sqlite3.Error) -> bool:
    """True for 'database is locked' / 'busy' errors, which are worth a retry."""
    text = str(exc).lower()
    return "locked" in text or "busy" in text


def _retry_locked(fn: Callable[[], T]) -> T:
    for attempt in range(_BEGIN_ATTEMPTS):
        try:
            return fn()
        except sqlite3.OperationalError as exc:
            if not is_locked(exc) or attempt == _BEGIN_ATTEMPTS - 1:
                raise
            time.sleep(0.01 * (attempt + 1))
    raise AssertionError("unreachable")  # pragma: no cover


def chunks(seq: Sequence[T], size: int = MAX_PARAMS) -> list[Sequence[T]]:
    """`seq` cut into pieces that fit in one statement's parameters."""
    return [seq[i : i + size] for i in range(0, len(seq), size)]


def placeholders(n: int) -> str:
    """'?,?,…' with n marks."""
    return ",".join("?" * n)


class Signal:
    """A version counter whose waiters wake when it changes, from any thread or loop."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.version = 0
        self._futures: list[asyncio.Future[None]] = []

    def fire(self) -> None:
        """Bump the version and wake every waiter."""
        with self._lock:
            self.version += 1
            futures, self._futures = self._futures, []
        for fut in futures:
            _resolve(fut, None, None)

    async def wait(self, since: int, timeout: float) -> bool:
        """Wait up to `timeout` for the version to differ from `since`; True if it does."""
        loop = asyncio.get_running_loop()
        with self._lock:
            if self.version != since:
                return True
            fut: asyncio.Future[None] = loop.create_future()
            self._futures.append(fut)
        try:
            await asyncio.wait((fut,), timeout=max(timeout, 0.0))
        finally:
            with self._lock, contextlib.suppress(ValueError):
                self._futures.remove(fut)
            if not fut.done():
                fut.cancel()
        return self.version != since


class _Job(Generic[T]):
    __slots__ = ("callback", "fn", "future", "loop", "write")

    def __init__(
        self,
        fn: Callable[[sqlite3.Connection], T],
        write: bool,
        loop: asyncio.AbstractEventLoop | None,
        future: asyncio.Future[T] | None,
        callback: Callable[[T | None, BaseException | None], None] | None = None,
    ) -> None:
        self.fn = fn
        self.write = write
        self.loop = loop
        self.future = future
        self.callback = callback


_STOP = object()


class SqliteDatabase:
    """One file's writer thread and connection; see the module docstring."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.pid = os.getpid()
        self.refs = 0
        self.batches = 0
        """Transactions run so far (for tests and benchmarks)."""
        self.jobs = 0
        """Jobs run so far."""
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._closed = False
        self._put_lock = threading.Lock()
        self._open_error: BaseException | None = None
        self._signals: dict[str, Signal] = {}
        self._shared: dict[tuple[str, str], Any] = {}
        self._thread = threading.Thread(
            target=self._main, name=f"qtasks-sqlite:{os.path.basename(path)}", daemon=True
        )
        self._thread.start()

    # -- public API ----------------------------------------------------------------------

    async def run(self, fn: Callable[[sqlite3.Connection], T], *, write: bool = True) -> T:
        """Run `fn(connection)` in the writer thread inside a transaction; its result.

        `write=False` promises `fn` only reads, letting a batch of reads skip the write lock.
        If the caller is cancelled, `fn` still runs (its work is already queued).
        """
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[T] = loop.create_future()
        self._put(_Job(fn, write, loop, fut))
        return await fut

    def submit(
        self,
        fn: Callable[[sqlite3.Connection], T],
        callback: Callable[[T | None, BaseException | None], None] | None = None,
        *,
        write: bool = True,
    ) -> None:
        """Queue `fn` without waiting; `callback(result, error)` runs in the writer thread."""
        self._put(_Job(fn, write, None, None, callback))

    def signal(self, namespace: str) -> Signal:
        """The wake-up signal of one namespace's queues in this process."""
        sig = self._signals.get(namespace)
        if sig is None:
            sig = self._signals.setdefault(namespace, Signal())
        return sig

    def shared(self, kind: str, namespace: str, factory: Callable[[], T]) -> T:
        """A per-(kind, namespace) object shared by this file's components in this process."""
        key = (kind, namespace)
        obj = self._shared.get(key)
        if obj is None:
            obj = self._shared.setdefault(key, factory())
        return obj  # type: ignore[no-any-return]

    def release(self) -> None:
        """Drop one reference; the last one flushes pending jobs and closes the file."""
        with _registry_lock:
            self.refs -= 1
            if self.refs > 0:
                return
            if _registry.get(self.path) is self:
                del _registry[self.path]
            with self._put_lock:
                self._closed = True
                self._queue.put(_STOP)
        if threading.current_thread() is not self._thread:
            self._thread.join()

    # -- writer thread -------------------------------------------------------------------

    def _put(self, job: _Job[Any]) -> None:
        # Under the lock so no job can slip in behind the stop marker and never run.
        with self._put_lock:
            if self._closed:
                raise sqlite3.ProgrammingError(f"the SQLite database {self.path} is closed")
            self._queue.put(job)

    def _open(self) -> sqlite3.Connection:
        conn = connect(self.path)
        try:
            _retry_locked(lambda: conn.execute("BEGIN IMMEDIATE"))
            try:
                # Statement by statement: executescript() would commit the open transaction.
                for statement in SCHEMA.split(";"):
                    if statement.strip():
                        conn.execute(statement)
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
        except BaseException:
            conn.close()
            raise
        return conn

    def _main(self) -> None:
        conn: sqlite3.Connection | None = None
        try:
            conn = self._open()
        except Exception as exc:  # every job fails with the reason the file did not open
            log.error("cannot open SQLite database %s: %s", self.path, exc)
            self._open_error = exc
        try:
            stopping = False
            while not stopping:
                item = self._queue.get()
                batch: list[_Job[Any]] = []
                while True:
                    if item is _STOP:
                        stopping = True
                    else:
                        batch.append(item)
                    try:
                        item = self._queue.get_nowait()
                    except queue.Empty:
                        break
                if not batch:
                    continue
                try:
                    outcomes = self._run_batch(conn, batch)
                except BaseException as exc:  # a bug here must not leave callers hanging
                    log.exception("SQLite writer failed on a batch")
                    outcomes = [(None, exc)] * len(batch)
                self._finish(batch, outcomes)
        finally:
            if conn is not None:
                conn.close()

    def _run_batch(
        self, conn: sqlite3.Connection | None, batch: list[_Job[Any]]
    ) -> list[tuple[Any, BaseException | None]]:
        if conn is None:
            error = self._open_error or sqlite3.OperationalError("database not open")
            return [(None, error)] * len(batch)
        write = any(job.write for job in batch)
        try:
            _retry_locked(lambda: conn.execute("BEGIN IMMEDIATE" if write else "BEGIN"))
        except sqlite3.Error as exc:
            return [(None, exc)] * len(batch)
        self.batches += 1
        self.jobs += len(batch)
        if len(batch) == 1:
            # No savepoint needed: on error the whole transaction is this one job.
            job = batch[0]
            try:
                value = job.fn(conn)
            except BaseException as exc:
                _rollback(conn)
                return [(None, exc)]
            try:
                conn.execute("COMMIT")
            except sqlite3.Error as exc:
                _rollback(conn)
                return [(None, exc)]
            return [(value, None)]
        outcomes: list[tuple[Any, BaseException | None]] = []
        try:
            for job in batch:
                conn.execute("SAVEPOINT job")
                try:
                    value = job.fn(conn)
                except BaseException as exc:
                    if not conn.in_transaction:
                        raise  # the transaction is gone (I/O error, disk full): all fail
                    conn.execute("ROLLBACK TO job")
                    conn.execute("RELEASE job")
                    outcomes.append((None, exc))
                else:
                    conn.execute("RELEASE job")
                    outcomes.append((value, None))
            conn.execute("COMMIT")
        except BaseException as exc:
            _rollback(conn)
            return [(None, exc)] * len(batch)
        return outcomes

    def _finish(
        self, batch: list[_Job[Any]], outcomes: list[tuple[Any, BaseException | None]]
    ) -> None:
        # One call_soon_threadsafe per loop, not per job: each one is a pipe write + wakeup.
        per_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future[Any], Any, Any]]] = {}
        for job, (value, error) in zip(batch, outcomes, strict=True):
            if job.callback is not None:
                try:
                    job.callback(value, error)
                except Exception:
                    log.exception("callback of a SQLite job failed")
            if job.loop is not None and job.future is not None:
                per_loop.setdefault(job.loop, []).append((job.future, value, error))
        for loop, items in per_loop.items():
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits
                loop.call_soon_threadsafe(_resolve_many, items)


def _rollback(conn: sqlite3.Connection) -> None:
    if conn.in_transaction:
        with contextlib.suppress(sqlite3.Error):
            conn.execute("ROLLBACK")


def _resolve_many(items: list[tuple[asyncio.Future[Any], Any, BaseException | None]]) -> None:
    for fut, value, error in items:
        if fut.done():
            continue
        if error is not None:
            fut.set_exception(error)
        else:
            fut.set_result(value)


def _resolve(fut: asyncio.Future[Any], value: Any, error: BaseException | None) -> None:
    loop = fut.get_loop()
    try:
        running: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
    except RuntimeError:
        running = None
    if running is loop:
        _resolve_many([(fut, value, error)])
    else:
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(_resolve_many, [(fut, value, error)])


_registry: dict[str, SqliteDatabase] = {}
_registry_lock = threading.Lock()


def acquire(path: str) -> SqliteDatabase:
    """The process's handle on `path` (absolute), opened on first use; pair with release()."""
    with _registry_lock:
        db = _registry.get(path)
        if db is not None and db.pid != os.getpid():
            # Inherited through fork: its thread does not exist here and its connection must
            # not be used in two processes. Abandon it and open a fresh one.
            db = None
        if db is None:
            db = SqliteDatabase(path)
            _registry[path] = db
        db.refs += 1
        return db


C = TypeVar("C", bound="SqliteComponent")


class SqliteComponent:
    """What the sqlite broker, storage and global config share: path, lifecycle, errors."""

    error_class: type[QTasksError] = QTasksError
    """Raised (with the file path) in place of sqlite3 errors."""

    def __init__(
        self,
        path: str | os.PathLike[str] | None = None,
        *,
        namespace: str = DEFAULT_NAMESPACE,
        config: QueueConfig | None = None,
    ) -> None:
        self.path = resolve_path(path if path is not None else DEFAULT_FILENAME)
        self.namespace = namespace
        self.config = config if config is not None else QueueConfig()
        self._db: SqliteDatabase | None = None

    @classmethod
    def from_url(cls: type[C], url: str, *, namespace: str, config: QueueConfig) -> C:
        """Build from `sqlite:///relative.db`, `sqlite:////abs.db` or `sqlite://`."""
        return cls(path_from_url(url), namespace=namespace, config=config)

    @property
    def url(self) -> str:
        """A sqlite:// URL naming the same file (absolute)."""
        return "sqlite:///" + self.path

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.path!r}, namespace={self.namespace!r})"

    async def start(self) -> None:
        """Open the shared database handle (schema included); fails early if it cannot."""
        if self._db is not None:
            return
        db = acquire(self.path)
        try:
            await db.run(_noop, write=False)
        except sqlite3.Error as exc:
            db.release()
            raise self._error(exc) from exc
        except BaseException:
            db.release()
            raise
        self._db = db

    async def stop(self) -> None:
        """Give the shared handle back; the last user closes the file."""
        db, self._db = self._db, None
        if db is not None:
            db.release()

    @property
    def db(self) -> SqliteDatabase:
        """The open handle; an error naming the component if start() was not called."""
        if self._db is None:
            raise self.error_class(f"{self!r} is not started; await its start() first")
        return self._db

    def _error(self, exc: BaseException) -> QTasksError:
        return self.error_class(f"SQLite database {self.path}: {exc}")

    async def _run(self, fn: Callable[[sqlite3.Connection], T], *, write: bool = True) -> T:
        db = self.db
        try:
            return await db.run(fn, write=write)
        except sqlite3.Error as exc:
            raise self._error(exc) from exc


def _noop(conn: sqlite3.Connection) -> None:
    return None
