"""Scenarios 1 and 16: no faults, and two processes racing for the same tasks."""

from __future__ import annotations

import time

import pytest

from .conftest import MakeScenario

pytestmark = [pytest.mark.faults, pytest.mark.timeout(300)]

N1 = {"sqlite": 10_000, "redis": 10_000, "rabbitmq": 10_000, "kafka": 10_000}
"""Tasks per broker for scenarios 1 and 16 (the issue's 10,000 on every broker)."""


@pytest.mark.parametrize("broker", ["sqlite", "redis", "rabbitmq", "kafka"])
def test_1_no_faults_two_workers(make_scenario: MakeScenario, broker: str, scale: int) -> None:
    s = make_scenario("1", broker)
    n = N1[broker] * scale
    s.enqueue(("noop", (i,)) for i in range(n))
    started = time.monotonic()
    workers = [s.start_worker("--concurrency", "10") for _ in range(2)]
    s.wait_all_ran(timeout=60 * scale)
    drain = time.monotonic() - started
    f = s.figures()
    pids = {ln.pid for ln in s.ledger.lines()}
    s.report(f, seconds=drain, rate=n / drain, processes=len(pids))
    assert f.lost == 0, f.missing
    assert f.dup == 0
    assert f.statuses == {"success": n}
    assert pids == {w.pid for w in workers}, "both worker processes took tasks"


@pytest.mark.parametrize("broker", ["sqlite", "redis", "rabbitmq", "kafka"])
def test_16_two_processes_16_slots_race(
    make_scenario: MakeScenario, broker: str, scale: int
) -> None:
    """Both workers start on a full queue at once and race for every task."""
    s = make_scenario("16", broker)
    n = N1[broker] * scale
    s.enqueue(("noop", (i,)) for i in range(n))
    started = time.monotonic()
    workers = [s.start_worker("--concurrency", "16") for _ in range(2)]
    s.wait_all_ran(timeout=60 * scale)
    drain = time.monotonic() - started
    f = s.figures()
    per_pid = {w.pid: 0 for w in workers}
    for ln in s.ledger.lines():
        if ln.kind == "E":
            per_pid[ln.pid] += 1
    s.report(f, seconds=drain, per_process=sorted(per_pid.values()))
    assert f.lost == 0, f.missing
    assert f.dup == 0
    assert all(per_pid.values()), "both processes took tasks"
