"""Names every bench app shares: the Redis URL, the counter the tasks INCR, the round-trip list.

The benchmark flushes its Redis database (db 14 by default) before and after each system's
turn, so all systems can use the same key names without seeing each other's keys.
"""

from __future__ import annotations

import os

URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/14")
COUNTER = "bench:count"
ROUND_TRIP = "bench:rt"
NAP = 0.05  # seconds the I/O-bound `nap` task sleeps before its INCR
RESULT_TIMEOUT = 5.0  # seconds a result round trip may wait for the result
