"""Scenarios 6, 7 (RabbitMQ), 8 (Kafka), 11 (argument mismatch) and 15 (clock skew)."""

from __future__ import annotations

import contextlib
import time
from typing import Any

import pytest

from .conftest import MakeScenario
from .harness import FAST_LIVENESS, wait_for
from .servers import RabbitNode
from .test_redis_faults import URGENT, BackgroundProducer, first_start_after

pytestmark = [pytest.mark.faults, pytest.mark.timeout(300)]


def test_6_rabbitmq_connections_closed_twice(
    make_scenario: MakeScenario, rabbit_node: RabbitNode, scale: int
) -> None:
    s = make_scenario("6", "rabbitmq", config=FAST_LIVENESS)
    n = 8000 * scale
    s.enqueue(("nap", (0.01,)) for _ in range(n))
    workers = [s.start_worker("--concurrency", "10") for _ in range(2)]
    back: list[float] = []
    published: list[float] = []
    for _ in range(2):
        wait_for(lambda: len(s.ledger.ended()) >= 500, 60, "the run to be under way")
        time.sleep(1.0)
        at = time.time()
        rabbit_node.close_all_connections()
        probe = set(s.enqueue([URGENT] * 10))
        published.append(time.time() - at)  # the producer reconnects too
        back.append(first_start_after(s, probe, 30) - at)
    s.wait_all_ran(timeout=90 * scale)
    f = s.figures()
    s.report(f, closes=2, consumers_back_s=back, producer_published_s=published)
    assert all(w.alive() for w in workers)
    assert f.lost == 0, f.missing
    assert max(back) <= 5.0
    assert f.dup <= 2 * 2 * 20, "redelivered: at most what the workers held"


def test_7_rabbitmq_stop_app_start_app_at_50_percent(
    make_scenario: MakeScenario, rabbit_node: RabbitNode, scale: int
) -> None:
    s = make_scenario("7", "rabbitmq", config=FAST_LIVENESS)
    n = 6000 * scale
    s.enqueue(("nap", (0.01,)) for _ in range(n))
    workers = [s.start_worker("--concurrency", "10") for _ in range(2)]
    with BackgroundProducer(s) as bg:
        wait_for(lambda: len(s.ledger.ended()) >= 0.5 * n, 60, "50% done")
        rabbit_node.stop_app()
        time.sleep(1.0)
        rabbit_node.start_app()
        up = time.time()
        probe = set(s.enqueue([URGENT] * 10))
        first = first_start_after(s, probe, 30)
        time.sleep(1.0)
    s.wait_all_ran(timeout=90 * scale)
    f = s.figures()
    s.report(
        f,
        consuming_again_s=first - up,
        producer_errors=len(bg.errors),
        background_acked=len(bg.acked),
    )
    assert all(w.alive() for w in workers)
    assert f.lost == 0, f.missing
    assert first - up <= 10.0


def test_8_kafka_consumer_killed_between_processing_and_commit(
    make_scenario: MakeScenario, scale: int
) -> None:
    s = make_scenario("8", "kafka", config=FAST_LIVENESS, log_partitions=True)
    n = 6000 * scale
    victim, survivor = (s.start_worker("--concurrency", "10") for _ in range(2))
    # a trickle until both members hold partitions (a tansu group join takes seconds)
    deadline = time.monotonic() + 60
    while {victim.pid, survivor.pid} - {ln.pid for ln in s.ledger.lines()}:
        assert time.monotonic() < deadline, "both members joined the group"
        s.enqueue([("noop", (0,))] * 16)
        time.sleep(0.5)
    main = set(s.enqueue(("nap", (0.01,)) for _ in range(n)))
    wait_for(lambda: len(s.ledger.ended() & main) >= 0.3 * n, 60, "30% of the tasks to run")
    victim.kill()  # mid-run: tasks processed whose offsets are not committed yet
    killed_at = time.time()
    lines = s.ledger.lines()
    in_flight = {ln.uuid for ln in lines if ln.pid == victim.pid and ln.kind == "S"} - {
        ln.uuid for ln in lines if ln.pid == victim.pid and ln.kind == "E"
    }
    s.wait_all_ran(timeout=120 * scale)
    f = s.figures()
    parts = s.ledger.partitions()

    def band_parts(pid: int) -> set[tuple[str, int]]:
        return {p for p in parts[pid] if ".b" in p[0]}

    taken_over = [
        ln.t - killed_at
        for ln in s.ledger.lines()
        if ln.pid == survivor.pid and ln.kind == "S" and ln.uuid in in_flight
    ]
    s.report(
        f,
        running_at_kill=len(in_flight),
        victim_partitions=len(band_parts(victim.pid)),
        survivor_partitions=len(band_parts(survivor.pid)),
        takeover_s=min(taken_over, default=float("nan")),
    )
    assert f.lost == 0, f.missing
    assert f.dup >= len(in_flight), "every task running at the kill ran again"
    assert band_parts(victim.pid) <= band_parts(survivor.pid), "survivor owns all partitions"


@pytest.mark.parametrize("broker", ["sqlite", "redis", "rabbitmq", "kafka"])
def test_11_argument_mismatch_fails_once(make_scenario: MakeScenario, broker: str) -> None:
    s = make_scenario("11", broker, config=FAST_LIVENESS)
    worker = s.start_worker("--concurrency", "4")
    # the producer's `strict(a)` (retry=3) against the worker's `strict(a, b)`
    uuids = s.enqueue([("strict", (1,))] * 10 + [("noop", (1,))])
    final = s.wait_final(30)
    time.sleep(1.0)  # a retry, if any, would be due within the default 1 s backoff
    again = s.records(uuids)
    f = s.figures()
    strict = [again[u] for u in uuids[:10]]
    types = {r.error_type for r in strict if r is not None}
    s.report(
        f,
        failed=sum(r is not None and r.status == "error" for r in strict),
        attempts=sorted({r.attempts for r in strict if r is not None}),
        error_type=",".join(sorted(t or "-" for t in types)),
    )
    assert len(final) == 11
    assert all(r is not None and r.status == "error" for r in strict)
    assert all(r is not None and r.attempts == 1 for r in strict), "no retry"
    assert types, "the error type is recorded"
    assert None not in types, "the error type is recorded"
    assert "retry 1 in" not in worker.log()
    assert s.ledger.starts()[uuids[0]] == 0, "the function never ran"


@pytest.mark.parametrize("broker", ["redis", "rabbitmq", "kafka"])
def test_15_delayed_tasks_under_worker_clock_skew(make_scenario: MakeScenario, broker: str) -> None:
    """Workers 30 s ahead and 30 s behind; due times must come from the broker's clock.

    SQLite is left out: it is one file on one machine, so its workers share one clock.
    """
    s = make_scenario("15", broker, config=FAST_LIVENESS)
    fast = s.start_worker("--concurrency", "10", skew_seconds=30.0)
    slow = s.start_worker("--concurrency", "10", skew_seconds=-30.0)
    time.sleep(2.0)  # both consuming (Kafka: both in the group)
    calls: list[tuple[Any, ...]] = [
        ("noop", (i,), {}, {"delay": 1.5 + (i % 12) * 0.25}) for i in range(48)
    ]
    records = s.producer.add_tasks(calls)
    s.enqueued += [str(r.uuid) for r in records]
    due = {str(r.uuid): float(r.eta or 0.0) for r in records}
    with contextlib.suppress(AssertionError):  # late ones are counted below
        s.wait_all_ran(timeout=50)
    f = s.figures(timeout=1.0)
    starts: dict[str, tuple[float, int]] = {}
    for ln in s.ledger.lines():
        if ln.kind == "S" and ln.uuid in due and ln.uuid not in starts:
            starts[ln.uuid] = (ln.t, ln.pid)
    lateness = {u: t - due[u] for u, (t, _) in starts.items()}
    early = [u for u, x in lateness.items() if x < -0.01]
    late = [u for u, x in lateness.items() if x > 2.0]
    by = {fast.pid: "+30s", slow.pid: "-30s"}
    late += [u for u in due if u not in starts]  # not run at all within 50 s
    s.report(
        f,
        early=len(early),
        late=len(late),
        min_lateness_s=min(lateness.values(), default=float("nan")),
        max_lateness_s=max(lateness.values(), default=float("nan")),
        ran_by={k: sum(by[p] == k for _, p in starts.values()) for k in by.values()},
    )
    assert not early, f"ran early: {[(by[starts[u][1]], lateness[u]) for u in early][:5]}"
    assert not late, f"ran late or not at all: {[lateness.get(u) for u in late][:5]}"
    assert f.lost == 0
