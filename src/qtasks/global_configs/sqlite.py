"""The embedded global config: settings and the worker registry in the app's SQLite file.

Values are stored as msgspec JSON so every process (and the CLI) reads them back the same
way; workers carry a heartbeat column refreshed on every `register_worker`.
"""

from __future__ import annotations

import sqlite3
import time
from typing import Any

import msgspec

from qtasks._sqlite import SqliteComponent
from qtasks.errors import EncodeError, QTasksError, StorageError
from qtasks.interfaces import GlobalConfig


def _encode(value: Any) -> bytes:
    try:
        return msgspec.json.encode(value)
    except (TypeError, ValueError, OverflowError) as exc:
        raise EncodeError(f"{value!r} cannot be stored as JSON: {exc}") from exc


class SqliteGlobalConfig(SqliteComponent, GlobalConfig):
    """The global config of `sqlite:///path.db` URLs."""

    # There is no GlobalConfigError; settings are stored records, so StorageError fits.
    error_class: type[QTasksError] = StorageError

    async def set(self, key: str, value: Any) -> None:
        """Store a JSON-encodable value under key."""
        row = (self.namespace, key, _encode(value))
        await self._run(
            lambda conn: conn.execute(
                "INSERT OR REPLACE INTO qtasks_global (ns, key, value) VALUES (?, ?, ?)", row
            )
        )

    async def get(self, key: str, default: Any = None) -> Any:
        """The value under key, or default."""
        args = (self.namespace, key)

        def read(conn: sqlite3.Connection) -> bytes | str | None:
            row = conn.execute(
                "SELECT value FROM qtasks_global WHERE ns = ? AND key = ?", args
            ).fetchone()
            return None if row is None else row[0]

        raw = await self._run(read, write=False)
        return default if raw is None else msgspec.json.decode(raw)

    async def delete(self, key: str) -> None:
        """Remove key if present."""
        args = (self.namespace, key)
        await self._run(
            lambda conn: conn.execute("DELETE FROM qtasks_global WHERE ns = ? AND key = ?", args)
        )

    async def items(self) -> dict[str, Any]:
        """Every stored setting."""
        ns = self.namespace

        # Values are bytes as written here; text (written by hand) decodes just as well.
        def read(conn: sqlite3.Connection) -> list[tuple[str, bytes | str]]:
            return [
                (str(k), v)
                for k, v in conn.execute(
                    "SELECT key, value FROM qtasks_global WHERE ns = ? ORDER BY key", (ns,)
                )
            ]

        return {k: msgspec.json.decode(v) for k, v in await self._run(read, write=False)}

    async def register_worker(self, info: dict[str, Any]) -> None:
        """Add or refresh a worker's entry with heartbeat = now."""
        row = (self.namespace, str(info["id"]), _encode(info), time.time())
        await self._run(
            lambda conn: conn.execute(
                "INSERT OR REPLACE INTO qtasks_workers (ns, id, info, heartbeat)"
                " VALUES (?, ?, ?, ?)",
                row,
            )
        )

    async def unregister_worker(self, worker_id: str) -> None:
        """Remove a worker's entry."""
        args = (self.namespace, worker_id)
        await self._run(
            lambda conn: conn.execute("DELETE FROM qtasks_workers WHERE ns = ? AND id = ?", args)
        )

    async def workers(self) -> list[dict[str, Any]]:
        """Every registered worker's last entry, with its `heartbeat` time."""
        ns = self.namespace

        def read(conn: sqlite3.Connection) -> list[tuple[bytes | str, float]]:
            return [
                (info, float(hb))
                for info, hb in conn.execute(
                    "SELECT info, heartbeat FROM qtasks_workers WHERE ns = ? ORDER BY id", (ns,)
                )
            ]

        out: list[dict[str, Any]] = []
        for info, heartbeat in await self._run(read, write=False):
            entry = msgspec.json.decode(info)
            entry["heartbeat"] = heartbeat
            out.append(entry)
        return out
