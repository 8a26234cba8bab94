"""Scenarios 4, 5, 18 and 20: Redis restarted, connections killed, memory full, a soak."""

from __future__ import annotations

import re
import signal
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from qtasks import TaskNotFound

from .conftest import MakeScenario
from .harness import FAST_LIVENESS, Scenario, wait_for
from .servers import RedisServer

pytestmark = [pytest.mark.faults, pytest.mark.timeout(300)]


URGENT: tuple[Any, ...] = ("nap", (0.01,), {}, {"priority": -1})
"""A probe task that runs before the backlog (lower priority numbers run first)."""


class BackgroundProducer:
    """Enqueues small batches in a thread; counts acknowledged ones and raised errors."""

    def __init__(self, s: Scenario, batch: int = 20, pause: float = 0.05) -> None:
        self.s = s
        self.batch = batch
        self.pause = pause
        self.acked: list[str] = []
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                records = self.s.producer.add_tasks([("nap", (0.01,))] * self.batch)
            except Exception as exc:  # raised, never dropped silently: not acknowledged
                self.errors.append(type(exc).__name__)
                time.sleep(0.2)
                continue
            self.acked += [str(r.uuid) for r in records]
            time.sleep(self.pause)

    def __enter__(self) -> BackgroundProducer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)
        self.s.enqueued += self.acked


def first_start_after(s: Scenario, uuids: set[str], timeout: float) -> float:
    """Wall time at which the first of `uuids` started."""
    found: list[float] = []

    def started() -> bool:
        found[:] = [ln.t for ln in s.ledger.lines() if ln.kind == "S" and ln.uuid in uuids]
        return bool(found)

    wait_for(started, timeout, "a task enqueued after the fault to start", 0.02)
    return min(found)


def test_4_redis_restart_at_30_percent(
    make_scenario: MakeScenario, tmp_path: Path, scale: int
) -> None:
    redis = RedisServer(tmp_path / "redis-aof", aof=True)
    redis.start()
    try:
        s = make_scenario("4", "redis", redis=redis, config=FAST_LIVENESS)
        n = 6000 * scale
        s.enqueue(("nap", (0.01,)) for _ in range(n))
        workers = [s.start_worker("--concurrency", "10") for _ in range(2)]
        with BackgroundProducer(s) as bg:
            wait_for(lambda: len(s.ledger.ended()) >= 0.3 * n, 60, "30% done")
            redis.restart(down_seconds=1.0)
            back = time.time()
            probe = set(s.enqueue([URGENT] * 5))
            first = first_start_after(s, probe, 30)
            time.sleep(1.0)
        s.wait_all_ran(timeout=90 * scale)
        f = s.figures()
        s.report(
            f,
            consuming_again_s=first - back,
            producer_errors=len(bg.errors),
            background_acked=len(bg.acked),
        )
        assert all(w.alive() for w in workers), "workers healed without a restart"
        assert f.lost == 0, f.missing
        assert first - back <= 10.0
    finally:
        redis.stop()


def worker_clients(redis: RedisServer, pid: int) -> list[str]:
    """CLIENT LIST ids of one worker process's connections (named qtasks-<pid>)."""
    out = []
    for line in redis.cli("CLIENT", "LIST").splitlines():
        fields = dict(f.split("=", 1) for f in line.split() if "=" in f)
        if fields.get("name") == f"qtasks-{pid}":
            out.append(fields["id"])
    return out


def test_5_client_kill_of_the_workers_connections(
    make_scenario: MakeScenario, tmp_path: Path, scale: int
) -> None:
    redis = RedisServer(tmp_path / "redis-kill")
    redis.start()
    try:
        s = make_scenario("5", "redis", redis=redis, config=FAST_LIVENESS)
        n = 10_000 * scale
        s.enqueue(("nap", (0.01,)) for _ in range(n))
        workers = [s.start_worker("--concurrency", "10") for _ in range(2)]
        reconnects = []
        killed = 0
        for _ in range(3):
            wait_for(lambda: all(worker_clients(redis, w.pid) for w in workers), 30, "clients")
            time.sleep(1.0)
            at = time.time()
            for w in workers:
                for cid in worker_clients(redis, w.pid):
                    redis.cli("CLIENT", "KILL", "ID", cid)
                    killed += 1
            probe = set(s.enqueue([URGENT] * 20))
            reconnects.append(first_start_after(s, probe, 30) - at)
        s.wait_all_ran(timeout=90 * scale)
        f = s.figures()
        s.report(f, connections_killed=killed, reconnect_s=reconnects)
        assert all(w.alive() for w in workers)
        assert f.lost == 0, f.missing
        assert max(reconnects) <= 5.0
        assert f.dup == 0, "live workers' tasks were not taken from them"
    finally:
        redis.stop()


def test_18_redis_with_an_evicting_policy(make_scenario: MakeScenario, tmp_path: Path) -> None:
    redis = RedisServer(
        tmp_path / "redis-lru", extra=("--maxmemory", "4mb", "--maxmemory-policy", "allkeys-lru")
    )
    redis.start()
    try:
        s = make_scenario("18", "redis", redis=redis, config=FAST_LIVENESS)
        worker = s.start_worker("--concurrency", "10")
        wait_for(lambda: "maxmemory-policy allkeys-lru" in worker.log(), 20, "the warning")
        uuids = s.enqueue(("noop", (i,)) for i in range(3000))
        s.wait_all_ran(timeout=60)
        # fill Redis past maxmemory: LRU evicts some of the finished records
        for i in range(200):
            redis.cli("SET", f"filler:{i}", "x" * 50_000)
            if not re.search(r"evicted_keys:0\b", redis.cli("INFO", "stats")):
                break
        records = s.records(uuids)
        gone = [u for u, r in records.items() if r is None]
        kept = [u for u, r in records.items() if r is not None]
        assert gone, "eviction removed some records (else the scenario proves nothing)"
        waited = []
        for uuid in gone[:5]:
            t0 = time.monotonic()
            with pytest.raises(TaskNotFound) as err:  # lost, and said so at once
                s.producer.wait(uuid, timeout=2.0)
            waited.append(time.monotonic() - t0)
        s.report(
            None,
            warned=True,
            records=len(uuids),
            evicted=len(gone),
            kept_success=sum(r.status == "success" for u in kept if (r := records[u])),
            wait_on_evicted_s=max(waited),
            error=type(err.value).__name__,
        )
        assert max(waited) < 1.0, "a lost result is reported at once, never a hang"
    finally:
        redis.stop()


PERMANENT_KEYS: set[str] = set()
"""Kinds of keys allowed to stay without a TTL once every worker stopped (none: the
consumer set and the worker registry empty themselves when their last member leaves)."""


def keys_without_ttl(url: str, namespace: str) -> list[str]:
    """The kinds (`qtasks:{ns}:<kind>:...`) of the namespace's keys that never expire."""
    import redis

    client = redis.Redis.from_url(url)
    try:
        kinds = set()
        for key in client.scan_iter(match=f"qtasks:{{{namespace}}}:*", count=1000):
            if client.ttl(key) == -1:
                kinds.add(key.decode().split(":", 2)[2].split(":")[0])
        return sorted(kinds)
    finally:
        client.close()


def test_18_wait_on_a_lost_record_says_so_at_once(make_scenario: MakeScenario) -> None:
    import redis

    s = make_scenario("18b", "redis", config=FAST_LIVENESS)
    s.start_worker("--concurrency", "2")
    (uuid,) = s.enqueue([("noop", (1,))])
    s.wait_all_ran(timeout=30)
    assert s.wait_final(10)
    client = redis.Redis.from_url(s.settings["broker_url"])
    try:  # what an evicting maxmemory-policy does to a finished record
        assert client.delete(f"qtasks:{{{s.settings['name']}}}:task:{uuid}") == 1
    finally:
        client.close()
    t0 = time.monotonic()
    with pytest.raises(TaskNotFound) as err:  # reported as lost, not as still running
        s.producer.wait(uuid, timeout=3.0)
    took = time.monotonic() - t0
    s.report(None, wait_on_deleted_record_s=took, error=type(err.value).__name__)
    assert took < 1.0, "never a hang"


@pytest.mark.parametrize("broker", ["redis", "sqlite"])
def test_20_soak_resources_return_to_baseline(
    make_scenario: MakeScenario, broker: str, scale: int
) -> None:
    s = make_scenario("20", broker, config=FAST_LIVENESS)
    worker = s.start_worker("--concurrency", "10")
    s.enqueue(("noop", (i,)) for i in range(2000))  # warm-up
    s.wait_all_ran(timeout=60)
    time.sleep(1.0)
    s.enqueue([("probe", ())])
    wait_for(lambda: len(s.ledger.probes()) >= 1, 30, "the baseline probe")
    n_ok, n_fail = 5000 * scale, 100 * scale
    calls = [("noop", (i,)) for i in range(n_ok)] + [("fail", (i,)) for i in range(n_fail)]
    s.enqueue(calls)
    s.wait_all_ran(timeout=60 * scale)
    time.sleep(2.0)  # idle again: heartbeats and sweeps only
    s.enqueue([("probe", ())])
    wait_for(lambda: len(s.ledger.probes()) >= 2, 30, "the final probe")
    base, end = s.ledger.probes()[0], s.ledger.probes()[-1]
    f = s.figures()
    worker.signal(signal.SIGTERM)
    code = worker.wait(timeout=30)
    no_ttl = []
    if broker == "redis":
        no_ttl = keys_without_ttl(s.settings["broker_url"], s.settings["name"])
    s.report(
        f,
        rss_growth_mb=(end["rss_kb"] - base["rss_kb"]) / 1024,
        fds=f"{int(base['fds'])}->{int(end['fds'])}",
        asyncio_tasks=f"{int(base['tasks'])}->{int(end['tasks'])}",
        threads=f"{int(base['threads'])}->{int(end['threads'])}",
        keys_without_ttl=no_ttl,
    )
    assert code == 0
    assert f.lost == 0
    assert f.statuses == {"success": 2000 + n_ok + 2, "error": n_fail}
    assert end["rss_kb"] - base["rss_kb"] < 10 * 1024
    assert end["fds"] <= base["fds"]
    assert end["tasks"] <= base["tasks"]
    assert set(no_ttl) <= PERMANENT_KEYS, f"keys that never expire: {no_ttl}"
