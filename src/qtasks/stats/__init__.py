"""See a running system: `AsyncStats(app).inspect()` / `SyncStats(app).inspect()`.

Workers keep per-task counters (`qtasks.stats.counters`) and publish them with their
registry heartbeat; `inspect()` reads them, the queues and the records from any process.
The names below load on first use, so a worker importing the counters does not load the
reporting code (and rich).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from qtasks.stats.inspect import (
        AsyncInspect,
        AsyncStats,
        Report,
        StatsNotSupported,
        SyncInspect,
        SyncStats,
    )
    from qtasks.stats.report import AppStats, TaskStats, WorkerStats

_HOMES = {
    "AsyncInspect": "qtasks.stats.inspect",
    "AsyncStats": "qtasks.stats.inspect",
    "Report": "qtasks.stats.inspect",
    "StatsNotSupported": "qtasks.stats.inspect",
    "SyncInspect": "qtasks.stats.inspect",
    "SyncStats": "qtasks.stats.inspect",
    "AppStats": "qtasks.stats.report",
    "TaskStats": "qtasks.stats.report",
    "WorkerStats": "qtasks.stats.report",
}


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'qtasks.stats' has no attribute {name!r}")
    return getattr(importlib.import_module(home), name)


__all__ = [
    "AppStats",
    "AsyncInspect",
    "AsyncStats",
    "Report",
    "StatsNotSupported",
    "SyncInspect",
    "SyncStats",
    "TaskStats",
    "WorkerStats",
]
