"""The Redis global config: settings and the live worker registry of one app.

Settings are one hash (`qtasks:{<app>}:config`, key → msgspec JSON). The registry is a
hash of worker id → JSON info plus a sorted set of worker id → last heartbeat, taken from
Redis's clock (`TIME`) so workers on machines with skewed clocks still compare fairly.
Registering writes both in one script; `workers()` reads both in one round trip.
"""

from __future__ import annotations

from typing import Any

import msgspec

from qtasks._redis import RedisComponent, script
from qtasks.errors import EncodeError, QTasksError, StorageError
from qtasks.interfaces import GlobalConfig

REGISTER = script(
    "register_worker",
    """
-- KEYS[1] workers hash, KEYS[2] heartbeats zset; ARGV[1] worker id, ARGV[2] info
local t = redis.call('TIME')
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('ZADD', KEYS[2], tonumber(t[1]) + tonumber(t[2]) / 1000000, ARGV[1])
return 1
""",
)


def _encode(value: Any) -> bytes:
    try:
        return msgspec.json.encode(value)
    except (TypeError, ValueError, OverflowError) as exc:
        raise EncodeError(f"{value!r} cannot be stored as JSON: {exc}") from exc


class RedisGlobalConfig(RedisComponent, GlobalConfig):
    """The global config of `redis://`, `rediss://` and `unix://` URLs."""

    # There is no GlobalConfigError; settings are stored records, so StorageError fits.
    error_class: type[QTasksError] = StorageError

    async def set(self, key: str, value: Any) -> None:
        """Store a JSON-encodable value under key."""
        await self._call("HSET", self.keys.config, key, _encode(value))

    async def get(self, key: str, default: Any = None) -> Any:
        """The value under key, or default."""
        raw = await self._call("HGET", self.keys.config, key)
        return default if raw is None else msgspec.json.decode(raw)

    async def delete(self, key: str) -> None:
        """Remove key if present."""
        await self._call("HDEL", self.keys.config, key)

    async def items(self) -> dict[str, Any]:
        """Every stored setting."""
        flat = await self._call("HGETALL", self.keys.config)
        pairs = {flat[i].decode(): msgspec.json.decode(flat[i + 1]) for i in range(0, len(flat), 2)}
        return dict(sorted(pairs.items()))

    async def register_worker(self, info: dict[str, Any]) -> None:
        """Add or refresh a worker's entry with heartbeat = Redis's now."""
        k = self.keys
        await self._eval(REGISTER, [k.workers, k.worker_beats], [str(info["id"]), _encode(info)])

    async def unregister_worker(self, worker_id: str) -> None:
        """Remove a worker's entry."""
        k = self.keys
        await self._run([("HDEL", k.workers, worker_id), ("ZREM", k.worker_beats, worker_id)])

    async def workers(self) -> list[dict[str, Any]]:
        """Every registered worker's last entry, with its `heartbeat` time, by id."""
        k = self.keys
        infos, beats = await self._run(
            [("HGETALL", k.workers), ("ZRANGE", k.worker_beats, 0, -1, "WITHSCORES")]
        )
        heartbeat = {beats[i]: float(beats[i + 1]) for i in range(0, len(beats), 2)}
        out: list[dict[str, Any]] = []
        for i in range(0, len(infos), 2):
            entry = msgspec.json.decode(infos[i + 1])
            entry["heartbeat"] = heartbeat.get(infos[i], 0.0)
            out.append(entry)
        out.sort(key=lambda w: str(w.get("id", "")))
        return out
