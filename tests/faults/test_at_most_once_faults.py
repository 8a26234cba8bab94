"""Scenario 2a: `at_most_once` tasks under real SIGKILLs of CLI worker processes.

Scenario 2 shows that a killed worker's tasks run again (at-least-once). An
`@app.task(at_most_once=True)` task promises the opposite: its `process` record is stored
before the function starts, and a delivery of an attempt that started is never run
again; it is dead-lettered `worker_lost` with `TaskInterrupted` on its record. Here two
workers run 1,000 such tasks while one of them is SIGKILLed 3 times, and the ledger and
the records must show: no task started twice, nothing lost, and exactly the tasks the
killed processes left unfinished are interrupted (each with its dead letter), everything
else succeeded. "Unfinished" is wider than "its function did not return": a process can
die after storing the `process` record and before the function starts, or after the
function returns and before its result is stored (seen on RabbitMQ and Kafka, where a
batch of tasks ends together); such attempts are interrupted too, and counted apart.
"""

from __future__ import annotations

import collections
import time
from functools import partial

import pytest

from .conftest import MakeScenario
from .harness import FAST_LIVENESS, Scenario, wait_for
from .test_crashes import ALL, CONCURRENCY, ran_tasks

pytestmark = [pytest.mark.faults, pytest.mark.timeout(300)]

INTERRUPTED = "TaskInterrupted"


def run_kills_of_one(
    s: Scenario, n: int, kills: int, every: float, task: tuple[str, float]
) -> list[tuple[int, float]]:
    """Enqueue `n` tasks, start 2 workers, SIGKILL the first `kills` times (restarting it)."""
    s.enqueue((task[0], (task[1],)) for _ in range(n))
    workers = [s.start_worker("--concurrency", str(CONCURRENCY)) for _ in range(2)]
    killed: list[tuple[int, float]] = []
    for _ in range(kills):
        victim = workers[0]
        # kill only while it runs tasks, so several are in flight at the kill
        wait_for(partial(ran_tasks, s, victim.pid), 60, "the victim to run tasks")
        time.sleep(every)
        victim.kill()
        killed.append((victim.pid, time.time()))
        workers[0] = s.start_worker("--concurrency", str(CONCURRENCY))
    return killed


@pytest.mark.parametrize("broker", ALL)
def test_2a_sigkill_at_most_once_tasks_3_times(
    make_scenario: MakeScenario, broker: str, scale: int
) -> None:
    s = make_scenario("2a", broker, config=FAST_LIVENESS)
    n = 1_000 * scale
    # 200 ms tasks, 10 at once per worker: about 100/s over 2 workers, so the 3 kills land
    # mid-run with about 10 tasks running in the victim each time
    killed = run_kills_of_one(s, n, kills=3, every=1.0, task=("once_nap", 0.2))
    killed_pids = [pid for pid, _ in killed]
    # Every task ends final: a success, or a dead letter of an interrupted attempt (whose
    # function may never have ended, so the ledger cannot be waited on).
    final = s.wait_final(timeout=120 * scale)
    f = s.figures()

    lines = s.ledger.lines()
    starts = s.ledger.starts()
    started_twice = sorted(u for u, k in starts.items() if k > 1)
    # Started by a killed process and not ended there (as `orphans_rerun` counts them).
    orphans: set[str] = set()
    per_kill: list[int] = []
    ended_in_killed: set[str] = set()  # the function returned, then its process died
    for pid in killed_pids:
        started = {ln.uuid for ln in lines if ln.pid == pid and ln.kind == "S"}
        ended = {ln.uuid for ln in lines if ln.pid == pid and ln.kind in {"E", "F"}}
        orphans |= started - ended
        per_kill.append(len(started - ended))
        ended_in_killed |= started & ended

    interrupted = {u for u, r in final.items() if r.error_type == INTERRUPTED}
    outcomes = collections.Counter(
        str(r.status) if r.error_type is None else f"{r.status}:{r.error_type}"
        for r in final.values()
    )
    # Interrupted but not orphans: the killed process stored the record (`process`) and
    # died before the function wrote its S line, or after the function returned and
    # before its result was stored. Both are interrupted attempts too, never rerun.
    never_started = {u for u in interrupted if not starts[u]}
    unrecorded = interrupted & ended_in_killed
    unexplained = sorted(interrupted - orphans - never_started - unrecorded)

    # every dead letter of the run (not only the interrupted tasks'): a task that
    # succeeded must have none
    letters = s.producer.dead_letters(limit=10_000)
    lettered = {d.uuid for d in letters if d.reason == "worker_lost"}

    s.report(
        f,
        kills=len(killed),
        started_twice=len(started_twice),
        interrupted=len(interrupted),
        orphans=len(orphans),
        per_kill=per_kill,
        never_started=len(never_started),
        unrecorded=len(unrecorded),
        letters=len(lettered),
    )
    evidence = {
        u: [(ln.kind, ln.pid, round(ln.t, 3)) for ln in lines if ln.uuid == u]
        for u in (started_twice + unexplained)[:10]
    }
    assert not started_twice, f"at_most_once task started twice: {evidence}"
    assert f.lost == 0, f.missing
    assert set(outcomes) <= {"success", f"error:{INTERRUPTED}"}, outcomes
    assert len(orphans) > 0, "the kills interrupted running tasks"
    assert orphans <= interrupted, f"orphans not interrupted: {sorted(orphans - interrupted)}"
    assert not unexplained, f"interrupted, but not by a kill: {evidence}"
    # so: interrupted = orphans + the two rarer cases above, all of killed processes
    assert len(interrupted) == len(orphans) + len(never_started) + len(unrecorded)
    assert lettered >= interrupted, f"no worker_lost letter: {sorted(interrupted - lettered)}"
    assert len(letters) == len(interrupted), f"letters of tasks that succeeded: {letters[:3]}"
    assert outcomes["success"] == n - len(interrupted)
