"""Scenarios 2, 14 and 17: workers killed, stopped, or merely slow."""

from __future__ import annotations

import signal
import time
from functools import partial

import pytest

from .conftest import MakeScenario
from .harness import FAST_LIVENESS, Scenario, wait_for

pytestmark = [pytest.mark.faults, pytest.mark.timeout(300)]

ALL = ["sqlite", "redis", "rabbitmq", "kafka"]
CONCURRENCY = 10
WINDOW = 2 * CONCURRENCY
"""Most deliveries one worker holds at once: running + prefetched (prefetch = concurrency)."""


def orphans_rerun(s: Scenario, kills: list[tuple[int, float]]) -> tuple[int, list[float]]:
    """Tasks started by a killed process and not ended there; seconds until each ran again."""
    lines = s.ledger.lines()
    delays = []
    count = 0
    for pid, killed_at in kills:
        started = {ln.uuid for ln in lines if ln.pid == pid and ln.kind == "S"}
        ended = {ln.uuid for ln in lines if ln.pid == pid and ln.kind in {"E", "F"}}
        for uuid in started - ended:
            count += 1
            again = [ln.t for ln in lines if ln.uuid == uuid and ln.kind == "S" and ln.pid != pid]
            delays.append(min(again) - killed_at if again else float("inf"))
    return count, delays


def finished_then_rerun(s: Scenario) -> int:
    """Runs of tasks whose function had already returned once (replays of finished work)."""
    ended: set[str] = set()
    count = 0
    for ln in sorted(s.ledger.lines(), key=lambda ln: ln.t):
        if ln.kind == "S" and ln.uuid in ended:
            count += 1
        elif ln.kind == "E":
            ended.add(ln.uuid)
    return count


def ran_tasks(s: Scenario, pid: int) -> bool:
    return any(ln.pid == pid for ln in s.ledger.lines())


def run_kills(
    s: Scenario, n: int, kills: int, every: float, task: tuple[str, float]
) -> list[tuple[int, float]]:
    s.enqueue((task[0], (task[1],)) for _ in range(n))
    workers = [s.start_worker("--concurrency", str(CONCURRENCY)) for _ in range(2)]
    killed: list[tuple[int, float]] = []
    for k in range(kills):
        victim = workers[k % 2]
        # kill only while it runs tasks, so there is something in flight to lose
        wait_for(partial(ran_tasks, s, victim.pid), 60, "the victim to run tasks")
        time.sleep(every)
        victim.kill()
        killed.append((victim.pid, time.time()))
        workers[k % 2] = s.start_worker("--concurrency", str(CONCURRENCY))
    return killed


@pytest.mark.parametrize("broker", ALL)
def test_2_sigkill_a_worker_5_times(make_scenario: MakeScenario, broker: str, scale: int) -> None:
    s = make_scenario("2", broker, config=FAST_LIVENESS)
    n = 10_000 * scale
    # 10 ms tasks: about 1,000/s over 2 workers, so the 5 kills land mid-run
    killed = run_kills(s, n, kills=5, every=1.0, task=("nap", 0.01))
    s.wait_all_ran(timeout=120 * scale)
    f = s.figures()
    count, delays = orphans_rerun(s, killed)
    bound = FAST_LIVENESS["worker_lost_after_seconds"] + FAST_LIVENESS["sweep_interval_seconds"]
    in_flight = len(killed) * WINDOW  # what the killed workers held
    if broker == "kafka":
        # Kafka's liveness is the group's session timeout (1 s here), not qtasks's
        # heartbeat; tansu then takes about 9 s to rebalance. The 17 s applies.
        bound = 16.0
        # Every kill and every restart is a rebalance, and a rebalance also replays what
        # the SURVIVOR held in the partitions it loses (finished, not yet committed:
        # documented in qtasks.brokers.kafka), so both workers' windows count, twice.
        in_flight = len(killed) * 2 * 2 * WINDOW
    replayed_finished = finished_then_rerun(s)
    s.report(
        f,
        kills=len(killed),
        orphans=count,
        replayed_finished=replayed_finished,
        max_rerun_s=max(delays, default=0.0),
    )
    assert f.lost == 0, f.missing
    assert f.statuses == {"success": n}
    assert f.dup <= in_flight, "dup at most what was in flight"
    assert f.dup >= count, "each orphan ran again"
    assert max(delays, default=0.0) <= bound + 1.0


@pytest.mark.parametrize("broker", ["sqlite", "redis"])
def test_2_sigkill_with_default_liveness_settings(make_scenario: MakeScenario, broker: str) -> None:
    """One kill with QueueConfig's defaults (heartbeat 5 s, lost after 20 s, sweep 5 s).

    The issue asks for orphans back within 17 s (10 s + 5 s + slack); the defaults give
    up to worker_lost_after_seconds + sweep_interval_seconds = 25 s. Asserted against the
    defaults themselves; the report shows the measured figure.
    """
    from qtasks import QueueConfig

    defaults = QueueConfig()
    s = make_scenario("2d", broker, config={})
    killed = run_kills(s, 400, kills=1, every=0.5, task=("nap", 0.05))
    s.wait_all_ran(timeout=90)
    f = s.figures()
    count, delays = orphans_rerun(s, killed)
    bound = defaults.worker_lost_after_seconds + defaults.sweep_interval_seconds
    s.report(f, kills=1, orphans=count, max_rerun_s=max(delays, default=0.0), bound_s=bound)
    assert f.lost == 0, f.missing
    assert count > 0
    assert f.dup <= WINDOW
    assert max(delays) <= bound + 1.0


@pytest.mark.parametrize("broker", ALL)
@pytest.mark.parametrize("second_signal", [False, True], ids=["one-sigterm", "two-sigterms"])
def test_14_sigterm_drains_within_grace(
    make_scenario: MakeScenario, broker: str, second_signal: bool
) -> None:
    grace = 5.0
    s = make_scenario("14", broker, config={**FAST_LIVENESS, "graceful_shutdown_seconds": grace})
    seconds = 2.0 if not second_signal else 6.0
    uuids = s.enqueue(("nap", (seconds,)) for _ in range(24))
    worker = s.start_worker("--concurrency", "8")
    wait_for(lambda: len(s.ledger.starts()) >= 8, 60, "8 running tasks")
    term = time.time()
    worker.signal(signal.SIGTERM)
    if second_signal:
        time.sleep(0.5)
        worker.signal(signal.SIGTERM)
    code = worker.wait(timeout=grace + 10)
    exit_s = time.time() - term
    lines = s.ledger.lines()
    late_starts = [
        ln for ln in lines if ln.pid == worker.pid and ln.kind == "S" and ln.t > term + 1
    ]
    first_started = {ln.uuid for ln in lines if ln.pid == worker.pid and ln.kind == "S"}
    first_ended = {ln.uuid for ln in lines if ln.pid == worker.pid and ln.kind == "E"}
    # the rest (and, after a second signal, the abandoned ones) come back to the queue
    nxt = s.start_worker("--concurrency", "8")
    rest = [u for u in uuids if u not in first_ended]
    s.wait_all_ran(timeout=60, uuids=rest)
    f = s.figures()
    s.report(
        f,
        signals=2 if second_signal else 1,
        exit_s=exit_s,
        started_first=len(first_started),
        finished_first=len(first_ended),
        late_starts=len(late_starts),
    )
    nxt.signal(signal.SIGTERM)
    assert code == 0, worker.log()[-3000:]
    assert not late_starts, "fetching stopped within 1 s of SIGTERM"
    assert len(first_started) == 8
    assert f.lost == 0, f.missing
    if second_signal:
        assert exit_s <= 0.5 + 2.0, "a second SIGTERM exits within 2 s"
        assert not first_ended
        assert f.dup <= 8, "only the abandoned running tasks run again"
    else:
        assert exit_s <= grace + 2.0
        assert first_started == first_ended, "running tasks finished"
        assert f.dup == 0


@pytest.mark.parametrize("broker", ALL)
def test_17_long_tasks_of_a_live_worker_run_once(make_scenario: MakeScenario, broker: str) -> None:
    lost_after = FAST_LIVENESS["worker_lost_after_seconds"]
    kafka_params = "session_timeout_ms=3000&heartbeat_interval_ms=300&fetch_max_wait_ms=10"
    extra = {"kafka_params": kafka_params} if broker == "kafka" else {}
    s = make_scenario("17", broker, config=FAST_LIVENESS, **extra)
    seconds = 3 * lost_after  # Kafka: also 3x its session timeout (the group's lease)
    # sync tasks hold a thread; `hog` blocks the event loop itself. On Kafka the group
    # heartbeat runs on the loop, so a loop-blocking task longer than the session
    # timeout is taken away by design (documented): only thread-held tasks there.
    calls = [("block", (seconds,))] * 4
    if broker != "kafka":
        calls += [("hog", (seconds,))] * 2
    s.enqueue(calls)
    # two workers: the idle one keeps sweeping and would steal the tasks if it could
    workers = [s.start_worker("--concurrency", "8") for _ in range(2)]
    s.wait_all_ran(timeout=seconds * 2 + 30)
    f = s.figures()
    s.report(f, task_s=seconds, lease_s=lost_after, workers=len(workers))
    assert f.lost == 0
    assert f.dup == 0, "a live worker's long task is never run twice"
