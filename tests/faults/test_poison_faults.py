"""Scenarios 3, 9, 10, 12, 13 and 19: poison tasks, bad input and hostile input.

Every message that is not run ends as a dead letter with a machine-readable reason (its
record says `error`); the figures count dead-lettered tasks as done-with-reason.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import re
import signal
import subprocess
import sys
import time
import uuid as uuid_module
from pathlib import Path
from typing import Any

import msgspec
import pytest

from qtasks import PayloadTooLarge
from qtasks.message import DeadLetter, Envelope, TaskMessage
from qtasks.signing import Signer

from .conftest import MakeScenario
from .harness import FAST_LIVENESS, REPO, Scenario, wait_for
from .tasks import SETTINGS_ENV, build_app, digest

pytestmark = [pytest.mark.faults, pytest.mark.timeout(300)]

ALL = ["sqlite", "redis", "rabbitmq", "kafka"]


# -- helpers ---------------------------------------------------------------------------


def publish_raw(s: Scenario, bodies: list[bytes], queue: str = "default") -> list[str]:
    """Put `bodies` on the queue as they are, through the broker (no record, no checks)."""
    core = s.producer.core
    now = time.time()
    envelopes = [Envelope(str(uuid_module.uuid4()), queue, 0, None, now, b) for b in bodies]

    async def go() -> None:
        await core.start()
        await core.broker.publish(envelopes)

    s.producer.portal.call(go())
    return [e.uuid for e in envelopes]


def letters(s: Scenario, uuids: list[str] | None = None) -> list[DeadLetter]:
    return s.producer.dead_letters(limit=10_000, uuids=uuids)


def wait_letters(s: Scenario, count: int, timeout: float) -> list[DeadLetter]:
    found: list[DeadLetter] = []

    def enough() -> bool:
        found[:] = letters(s)
        return len(found) >= count

    wait_for(enough, timeout, f"{count} dead letters", 0.3)
    return found


def message(name: str, args: list[Any], **kw: Any) -> bytes:
    return msgspec.json.encode(TaskMessage(uuid=uuid_module.uuid4(), name=name, args=args, **kw))


def ledger_times(s: Scenario, kind: str) -> list[float]:
    out = []
    for w in s.ledger.raw_lines():
        if w and w[0] == kind:
            out.append(float(w[-1]))
    return sorted(out)


def cli(s: Scenario, *args: str, stderr: bool = True) -> str:
    """`qtasks -A tests.faults.worker_app:app ARGS` with the scenario's settings: its output
    (stdout, and stderr unless `stderr=False`)."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
        SETTINGS_ENV: msgspec.json.encode(s.settings).decode(),
    }
    cmd = [sys.executable, "-m", "qtasks", "-A", "tests.faults.worker_app:app", *args]
    out = subprocess.run(
        cmd, cwd=s.folder, env=env, capture_output=True, text=True, timeout=60, check=False
    )
    assert out.returncode == 0, f"{args}: {out.stdout}\n{out.stderr}"
    return out.stdout + out.stderr if stderr else out.stdout


# -- scenario 3 ------------------------------------------------------------------------


def run_poison(make_scenario: MakeScenario, broker: str, limit: int) -> dict[str, Any]:
    """999 noops and one task that SIGKILLs its worker; workers restarted after each death."""
    s = make_scenario("3", broker, config={**FAST_LIVENESS, "max_deliveries": limit})
    # The poison task has a lower priority, so most of the 999 run around it (on Kafka its
    # band gets a share of every batch).
    calls: list[tuple[Any, ...]] = [("noop", (i,)) for i in range(999)]
    calls.insert(500, ("suicide", (), {}, {"priority": 1}))
    uuids = s.enqueue(calls)
    poison = uuids[500]
    others = [u for u in uuids if u != poison]
    workers = [s.start_worker("--concurrency", "4") for _ in range(2)]
    deaths = 0
    started = time.monotonic()
    record = None
    while time.monotonic() - started < 50:
        for i, w in enumerate(workers):
            if not w.alive():
                deaths += 1
                workers[i] = s.start_worker("--concurrency", "4")
        if s.ledger.starts()[poison] > limit + 1:
            break  # a crash loop: more runs than allowed already
        record = s.records([poison])[poison]
        if record is not None and record.status == "error":
            break
        time.sleep(0.2)
    dead_s = time.monotonic() - started
    time.sleep(1.0)  # a run after the dead letter, if any, would show now
    with contextlib.suppress(AssertionError):
        s.wait_all_ran(timeout=20, uuids=others)
    f = s.figures(timeout=5)
    runs = s.ledger.starts()
    others_records = s.records(others)
    collateral = [u for u, r in others_records.items() if r is None or r.status != "success"]
    found = letters(s, [poison])
    s.report(
        f,
        max_deliveries=limit,
        poison_runs=runs[poison],
        deaths=deaths,
        reason=found[0].reason if found else "-",
        dead_lettered_s=dead_s,
        innocents_not_success=len(collateral),
        their_runs=sorted({runs[u] for u in collateral}),
    )
    return {
        "s": s,
        "f": f,
        "runs": runs[poison],
        "record": record,
        "found": found,
        "collateral": collateral,
        "workers": workers,
    }


@pytest.mark.parametrize("broker", ALL)
def test_3_task_that_kills_its_worker(make_scenario: MakeScenario, broker: str) -> None:
    """max_deliveries lowered to 3 (from 5) to fit the time budget on every broker."""
    limit = 3
    out = run_poison(make_scenario, broker, limit)
    assert out["runs"] == limit, f"the poison task ran {out['runs']} times, max {limit}"
    record = out["record"]
    assert record is not None
    assert record.error_type == "WorkerLost"
    assert [x.reason for x in out["found"]] == ["worker_lost"]
    assert out["f"].lost == 0, out["f"].missing
    for u in out["collateral"]:  # see test_3_innocent_companions_complete
        r = out["s"].records([u])[u]
        assert r is not None
        assert r.error_type == "WorkerLost"
    assert all(w.alive() for w in out["workers"])


@pytest.mark.parametrize("broker", ALL)
def test_3_innocent_companions_complete(make_scenario: MakeScenario, broker: str) -> None:
    """Tasks fetched beside the poison task die with it once, then come back as
    redeliveries, each run alone: none reaches max_deliveries with it. (Was a bug: the
    same batch came back together, died together, and ~5 of 999 were dead-lettered.)"""
    out = run_poison(make_scenario, broker, 3)
    assert out["f"].statuses == {"success": 999, "error": 1}


# -- scenario 9 ------------------------------------------------------------------------

LIMIT_9 = 64 * 1024


def malformed() -> list[tuple[str, bytes, str]]:
    """(what, body, expected reason): the issue's 7 and 3 more."""
    uid = str(uuid_module.uuid4()).encode()
    valid = message("noop", [1])
    nest = 100
    return [
        ("bad_json", b'{"uuid": "' + uid + b'", "name": noop, "args": [1]}', "invalid_json"),
        ("truncated", valid[: len(valid) // 2], "invalid_json"),
        ("empty", b"", "empty"),
        ("wrong_version", message("noop", [1], v=99), "unsupported_version"),
        ("not_utf8", b'{"uuid": "' + uid + b'", "name": "n\xff\xfeop"}', "not_utf8"),
        (
            "deep_100",
            b'{"uuid": "' + uid + b'", "name": "noop", "args": ' + b"[" * nest + b"]" * nest + b"}",
            "too_deep",
        ),
        ("pickle", pickle.dumps({"name": "noop", "args": [1]}, protocol=4), "pickle_refused"),
        ("oversize", message("noop", ["x" * (LIMIT_9 + 1000)]), "payload_too_large"),
        (
            "signed_no_keys",
            Signer(["a-key-the-worker-does-not-have"]).sign(message("noop", [1])),
            "bad_signature",
        ),
        ("wrong_shape", b'{"hello": "world", "n": [1, 2, 3]}', "bad_schema"),
    ]


@pytest.mark.parametrize("broker", ALL)
def test_9_malformed_messages_among_valid_ones(make_scenario: MakeScenario, broker: str) -> None:
    s = make_scenario("9", broker, config={"max_payload_bytes": LIMIT_9}, count_decodes=True)
    bad = malformed()
    # the bad ones first, so the valid ones queue behind them
    publish_raw(s, [body for _, body, _ in bad])
    s.enqueue(("noop", (i,)) for i in range(100))
    t0 = time.time()
    worker = s.start_worker("--concurrency", "4")
    s.wait_all_ran(timeout=45)
    found = wait_letters(s, len(bad), 15)
    f = s.figures()
    decodes = s.ledger.decodes("D")
    by_body = {letter.body: letter for letter in found}
    got = {what: (by_body[body].reason if body in by_body else "-") for what, body, _ in bad}
    first_decode = min(ledger_times(s, "D"))
    last_done = max(ledger_times(s, "E"))
    s.report(
        f,
        dead_letters=len(found),
        max_decodes=max(decodes[digest(b)] for _, b, _ in bad),
        drain_s=last_done - first_decode,
        first_decode_after_start_s=first_decode - t0,
        reasons=sorted(set(got.values())),
    )
    assert f.lost == 0, f.missing
    assert f.statuses == {"success": 100}
    assert f.dup == 0
    assert got == {what: reason for what, _, reason in bad}
    assert len(found) == len(bad), "one dead letter each"
    for what, body, _ in bad:
        assert decodes[digest(body)] == 1, f"{what} decoded {decodes[digest(body)]} times"
    assert worker.alive(), "no crash"
    assert "Traceback" not in worker.log()
    assert last_done - first_decode < 5.0, "the valid messages behind them were not blocked"
    # every dead letter's record says error, with the reason in its message
    records = s.records([letter.uuid for letter in found])
    assert all(r is not None and r.status == "error" for r in records.values())


# -- scenario 10 -----------------------------------------------------------------------


@pytest.mark.parametrize("broker", ALL)
def test_10_unknown_task_dead_lettered(make_scenario: MakeScenario, broker: str) -> None:
    s = make_scenario("10", broker, config=FAST_LIVENESS)
    worker = s.start_worker("--concurrency", "4")
    s.enqueue([("noop", (0,))])
    s.wait_all_ran(timeout=45)  # consuming (Kafka: in the group)
    t0 = time.monotonic()
    waited = s.producer.add_task("ghost", 0, timeout=10)
    wait_s = time.monotonic() - t0
    assert waited is not None
    s.enqueued.append(str(waited.uuid))
    uuids = s.enqueue(("ghost", (i,)) for i in range(1, 10))
    final = s.wait_final(15)
    found = wait_letters(s, 10, 15)
    f = s.figures()
    ghost_ids = [str(waited.uuid), *uuids]
    reasons = {letter.uuid: letter.reason for letter in found}
    s.report(
        f,
        dead_lettered=sum(reasons.get(u) == "unknown_task" for u in ghost_ids),
        waiter_s=wait_s,
        error_type=waited.error_type,
    )
    assert waited.status == "error"
    assert waited.error_type == "UnknownTask"
    assert wait_s <= 2.0, "the waiter learns within 2 s"
    assert all(reasons.get(u) == "unknown_task" for u in ghost_ids)
    assert all(final[u].error_type == "UnknownTask" for u in ghost_ids)
    assert f.lost == 0
    assert f.dup == 0
    assert worker.alive()

    # `qtasks dlq list|retry|drop` on these letters
    listed = msgspec.json.decode(cli(s, "dlq", "list", "--json", stderr=False))
    listed_ids = {item["uuid"] for item in listed}
    assert set(ghost_ids) <= listed_ids, listed
    assert {item["reason"] for item in listed} == {"unknown_task"}
    again = ghost_ids[0]
    before = {x.uuid: x.dead_at for x in letters(s)}[again]
    out = cli(s, "dlq", "retry", again)
    assert again in out
    # sent again under the same uuid: still unknown, so dead-lettered again, newer
    wait_for(
        lambda: any(x.uuid == again and x.dead_at > before for x in letters(s)),
        20,
        "the retried letter to come back",
        0.3,
    )
    out = cli(s, "dlq", "drop", "--all")
    after = letters(s)
    s.report(None, cli="dlq list/retry/drop", listed=len(listed), left_after_drop=len(after))
    assert not after, after


@pytest.mark.parametrize("broker", ALL)
def test_10_unknown_task_requeued_on_opt_in(make_scenario: MakeScenario, broker: str) -> None:
    """requeue_unknown_tasks=True: sent back up to max_deliveries times, then dead-lettered;
    a worker that knows the task and starts meanwhile (a rolling deploy) runs it."""
    limit = 3
    config = {**FAST_LIVENESS, "requeue_unknown_tasks": True, "max_deliveries": limit}
    s = make_scenario("10r", broker, config=config)
    old = s.start_worker("--concurrency", "4")
    s.enqueue([("noop", (0,))])
    s.wait_all_ran(timeout=45)
    t0 = time.monotonic()
    uuids = s.enqueue(("ghost", (i,)) for i in range(10))
    final = s.wait_final(30, uuids)
    found = letters(s, uuids)
    took = time.monotonic() - t0
    counts = sorted({letter.delivery_count for letter in found})
    s.report(
        None,
        variant="requeued",
        max_deliveries=limit,
        dead_lettered=len(found),
        delivery_counts=counts,
        seconds=took,
    )
    assert len(final) == 10
    assert all(r.error_type == "UnknownTask" for r in final.values())
    assert len(found) == 10
    assert {x.reason for x in found} == {"unknown_task"}
    assert counts == [limit], "requeued up to max_deliveries, then dead-lettered"
    assert took >= 1.0 + 2.0 - 0.5, "requeued with a growing delay (1 s, 2 s)"
    assert not set(s.ledger.starts()) & set(uuids), "the old worker never ran them"

    # rolling deploy: the old worker defers them, a new one that knows `ghost` takes over
    s2 = make_scenario("10d", broker, config={**config, "max_deliveries": 8})
    old = s2.start_worker("--concurrency", "4")
    s2.enqueue([("noop", (0,))])
    s2.wait_all_ran(timeout=45)
    uuids = s2.enqueue(("ghost", (i,)) for i in range(10))
    wait_for(lambda: old.log().count("unknown task 'ghost'") >= 10, 20, "the old worker to defer")
    t1 = time.monotonic()
    old.signal(signal.SIGTERM)
    old.wait(timeout=15)
    new = s2.start_worker("--concurrency", "4", knows_ghost=True)
    s2.wait_all_ran(timeout=45, uuids=uuids)
    took = time.monotonic() - t1
    f = s2.figures()
    s2.report(
        f,
        variant="rolling-deploy",
        ran_on_new=len({ln.uuid for ln in s2.ledger.lines() if ln.pid == new.pid} & set(uuids)),
        seconds=took,
    )
    assert f.lost == 0
    # Regression (RabbitMQ, Kafka): the old worker's SIGTERM landed while its writer was
    # requeueing the deferred tasks; closing the writer cancelled that flush and wrote
    # the requeues again, so every deferred task ran twice. Fixed in ResultWriter.close.
    assert f.dup == 0
    assert f.statuses == {"success": 11}
    assert not letters(s2, uuids)
    assert new.alive()


# -- scenario 12 -----------------------------------------------------------------------

LIMIT_12 = 64 * 1024
UNREACHABLE = {
    "sqlite": {"broker_url": "sqlite:////nonexistent-dir/qtasks/q.sqlite3"},
    "redis": {"broker_url": "redis://127.0.0.1:1/0"},
    "rabbitmq": {
        "broker_url": "amqp://guest:guest@127.0.0.1:1/",
        "storage_url": "redis://127.0.0.1:1/0",
    },
    "kafka": {"broker_url": "kafka://127.0.0.1:1", "storage_url": "redis://127.0.0.1:1/0"},
}


@pytest.mark.parametrize("broker", ALL)
def test_12_payload_limits(make_scenario: MakeScenario, broker: str) -> None:
    s = make_scenario("12", broker, config={"max_payload_bytes": LIMIT_12}, count_decodes=True)
    # 1. the producer raises before any I/O: its backends do not even exist
    offline = build_app({**s.settings, **UNREACHABLE[broker]}, producer=True)
    try:
        t0 = time.monotonic()
        with pytest.raises(PayloadTooLarge):
            offline.add_task("digest_of", "x" * (LIMIT_12 + 1))
        with pytest.raises(PayloadTooLarge):
            offline.add_tasks([("digest_of", ("x",)), ("digest_of", ("x" * (LIMIT_12 + 1),))])
        raise_s = time.monotonic() - t0
        assert not offline.core._started, "nothing was connected"
    finally:
        offline.close()
    # 2. a raw oversize message is dead-lettered before it is decoded
    worker = s.start_worker("--concurrency", "4")
    body = message("digest_of", ["x" * (LIMIT_12 + 1)])
    publish_raw(s, [body])
    small = s.enqueue([("digest_of", ("x" * 1000,))])
    s.wait_all_ran(timeout=45)
    (letter,) = wait_letters(s, 1, 15)
    parsed = s.ledger.decodes("J")[digest(body)]
    f = s.figures()
    s.report(
        f,
        producer_raise_s=raise_s,
        oversize_reason=letter.reason,
        oversize_parsed=parsed,
    )
    assert letter.reason == "payload_too_large"
    assert letter.body == body
    assert letter.name is None, "its bytes were not looked into"
    assert parsed == 0, "not decoded"
    assert f.lost == 0, small
    assert f.statuses == {"success": 1}
    assert worker.alive()


@pytest.mark.parametrize("broker", ALL)
def test_12_ten_megabytes_round_trip(make_scenario: MakeScenario, broker: str) -> None:
    s = make_scenario("12b", broker, config={"max_payload_bytes": 16 * 1024 * 1024})
    s.start_worker("--concurrency", "2")
    data = os.urandom(5_000_000).hex()  # 10 MB of text
    t0 = time.monotonic()
    record = s.producer.add_task("digest_of", data, timeout=45)
    took = time.monotonic() - t0
    assert record is not None
    s.enqueued.append(str(record.uuid))
    f = s.figures()
    import hashlib

    s.report(f, payload_mb=len(data) / 1e6, round_trip_s=took, status=record.status)
    assert record.status == "success", (record.error_type, record.error_message)
    assert record.returning == [len(data), hashlib.sha256(data.encode()).hexdigest()]


# -- scenario 13 -----------------------------------------------------------------------


@pytest.mark.parametrize("broker", ALL)
def test_13_always_failing_task_backs_off_then_dead_letters(
    make_scenario: MakeScenario, broker: str
) -> None:
    """retry=3, Backoff(base 1 s, factor 2, jitter ±10%): retries after 1, 2 and 4 s."""
    s = make_scenario("13", broker, config=FAST_LIVENESS)
    worker = s.start_worker("--concurrency", "8")
    s.enqueue([("noop", (0,))])
    s.wait_all_ran(timeout=45)
    uuids = s.enqueue(("always_fail", (i,)) for i in range(5))
    final = s.wait_final(40, uuids)
    found = wait_letters(s, 5, 15)
    schedule = [1.0, 2.0, 4.0]
    lines = sorted(s.ledger.lines(), key=lambda ln: ln.t)
    gaps: dict[str, list[float]] = {}
    for u in uuids:
        mine = [ln for ln in lines if ln.uuid == u]
        fails = [ln.t for ln in mine if ln.kind == "F"]
        starts = [ln.t for ln in mine if ln.kind == "S"]
        gaps[u] = [b - a for a, b in zip(fails, starts[1:], strict=False)]
    late = [g - d for gs in gaps.values() for g, d in zip(gs, schedule, strict=False)]
    # the delays the worker chose (schedule +-10% jitter), from its log lines
    chosen: dict[str, list[float]] = {u: [] for u in uuids}
    for m in re.finditer(
        r"task always_fail (\S+) failed .*?; retry \d+ in ([\d.]+)s", worker.log()
    ):
        chosen[m.group(1)].append(float(m.group(2)))
    over = [g - c for u in uuids for g, c in zip(gaps[u], chosen[u], strict=False)]
    runs = s.ledger.starts()
    f = s.figures()
    s.report(
        f,
        runs_each=sorted({runs[u] for u in uuids}),
        planned_retries=3 * len(uuids),
        min_late_s=min(late),
        max_late_s=max(late),
        gaps_first=[round(g, 2) for g in gaps[uuids[0]]],
        broker_delay_granularity_s=f"{min(over):.3f}..{max(over):.3f}",
    )
    granularity = GRANULARITY[broker]
    assert all(runs[u] == 4 for u in uuids), "1 run + 3 retries"
    assert all(len(g) == 3 for g in gaps.values())
    assert all(len(c) == 3 for c in chosen.values()), chosen
    assert min(over) >= -0.05, "a retry ran before the delay its worker chose"
    assert max(over) <= granularity
    for u, gs in gaps.items():
        for gap, due in zip(gs, schedule, strict=True):
            assert abs(gap - due) <= 0.25 * due + granularity, (u, gs)
    assert all(r.status == "error" and r.attempts == 4 for r in final.values())
    by_uuid = {x.uuid: x for x in found}
    for u in uuids:
        assert by_uuid[u].reason == "failed"
        assert "Traceback" in by_uuid[u].detail
        assert "fails on purpose" in by_uuid[u].detail
    assert f.lost == 0
    assert worker.alive()


GRANULARITY = {"sqlite": 0.25, "redis": 0.25, "rabbitmq": 0.25, "kafka": 0.5}
"""Seconds a broker may add to a delay beyond its schedule (polling, bucket hops); the
report's max_late_s is the measured figure."""


# -- scenario 19 -----------------------------------------------------------------------


class _CreatesFile:
    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (str(self.path), "w"))


@pytest.mark.parametrize("broker", ALL)
def test_19_pickles_and_tampered_signed_messages(
    make_scenario: MakeScenario, broker: str, tmp_path: Path
) -> None:
    keys = ["fault-suite-signing-key-0123456789"]
    config = {"signing_keys": keys}
    s = make_scenario("19", broker, config=config, count_decodes=True)
    worker = s.start_worker("--concurrency", "8")
    # pickles that would create a file when unpickled (protocol 0: text; 4: binary)
    targets = [tmp_path / f"pwned-{p}" for p in (0, 4)]
    pickles = [
        pickle.dumps(_CreatesFile(t), protocol=p) for t, p in zip(targets, (0, 4), strict=True)
    ]
    # 100 messages signed with the right key, then altered (arguments changed)
    signer = Signer(keys)
    tampered = []
    for i in range(100):
        signed = signer.sign(message("noop", [i]))
        altered = signed.replace(f'"args":[{i}]'.encode(), f'"args":[{i + 1000}]'.encode())
        assert altered != signed
        tampered.append(altered)
    publish_raw(s, pickles + tampered)
    good = s.enqueue(("noop", (i,)) for i in range(10))  # signed by the producer
    s.wait_all_ran(timeout=45, uuids=good)
    found = wait_letters(s, 102, 30)
    by_body = {x.body: x for x in found}
    parsed = s.ledger.decodes("J")
    f = s.figures()
    rejected = sum(by_body[b].reason == "bad_signature" for b in tampered if b in by_body)
    s.report(
        f,
        tampered_rejected=f"{rejected}/100",
        tampered_parsed=sum(parsed[digest(b)] for b in tampered),
        pickle_reasons=sorted({by_body[b].reason for b in pickles if b in by_body}),
        files_created=sum(t.exists() for t in targets),
    )
    assert not any(t.exists() for t in targets), "a pickle was unpickled"
    # With keys, an unsigned pickle fails the signature check first: never unpickled
    # either way. Without keys (scenario 9) its reason is pickle_refused; checked below.
    assert all(by_body[b].reason in {"bad_signature", "pickle_refused"} for b in pickles)
    assert rejected == 100
    assert all(parsed[digest(b)] == 0 for b in tampered), "rejected before decoding"
    assert f.lost == 0
    assert f.statuses == {"success": 10}
    assert worker.alive()


@pytest.mark.parametrize("broker", ALL)
def test_19_pickle_refused_without_keys(
    make_scenario: MakeScenario, broker: str, tmp_path: Path
) -> None:
    s = make_scenario("19p", broker, count_decodes=True)
    worker = s.start_worker("--concurrency", "4")
    targets = [tmp_path / f"pwned-{p}" for p in (0, 2, 4, 5)]
    pickles = [
        pickle.dumps(_CreatesFile(t), protocol=p)
        for t, p in zip(targets, (0, 2, 4, 5), strict=True)
    ]
    publish_raw(s, pickles)
    found = wait_letters(s, len(pickles), 45)
    reasons = sorted(x.reason for x in found)
    s.report(
        None, pickles=len(pickles), reasons=reasons, files_created=sum(map(Path.exists, targets))
    )
    assert reasons == ["pickle_refused"] * len(pickles)
    assert not any(t.exists() for t in targets)
    assert worker.alive()


SECRET = "Xy7-secret-pw-Q4zK9"


@pytest.mark.parametrize("broker", ["redis", "rabbitmq", "kafka"])
def test_19_password_in_url_never_shown(
    make_scenario: MakeScenario, broker: str, request: pytest.FixtureRequest
) -> None:
    """A user with a password on the private servers; the password must appear 0 times.

    Redis: an ACL user (broker and storage); RabbitMQ: a user on the private node (and
    the Redis storage's ACL user); Kafka (tansu has no SASL): the Redis storage's user.
    """
    import warnings

    with warnings.catch_warnings():  # starlette: "httpx is deprecated, install httpx2"
        warnings.simplefilter("ignore")
        from starlette.testclient import TestClient

    from qtasks.web.app import create_app
    from tests.kafka_server import free_port

    from .servers import RabbitNode, RedisServer

    redis: RedisServer = request.getfixturevalue("shared_redis")
    assert (
        redis.cli("ACL", "SETUSER", "qtuser", "on", f">{SECRET}", "~*", "&*", "+@all").strip()
        == "OK"
    )
    redis_url = f"redis://qtuser:{SECRET}@127.0.0.1:{redis.port}/0"
    s = make_scenario("19s", broker, config=FAST_LIVENESS)
    if broker == "redis":
        s.settings["broker_url"] = redis_url
    else:
        s.settings["storage_url"] = redis_url
    if broker == "rabbitmq":
        node: RabbitNode = request.getfixturevalue("rabbit_node")
        with contextlib.suppress(RuntimeError):  # already there from an earlier run
            node.ctl("add_user", "qtuser", SECRET)
        node.ctl("set_permissions", "-p", "/", "qtuser", ".*", ".*", ".*")
        s.settings["broker_url"] = f"amqp://qtuser:{SECRET}@127.0.0.1:{node.port}/"
    urls = [s.settings["broker_url"], s.settings.get("storage_url") or ""]
    assert any(SECRET in u for u in urls)
    port = free_port()
    worker = s.start_worker(
        "--concurrency", "4", "--log-level", "debug", "--metrics-port", str(port)
    )
    s.enqueue([("noop", (i,)) for i in range(5)] + [("fail", (1,))])
    s.wait_all_ran(timeout=45)
    ghost = s.producer.add_task("ghost", 1, timeout=15)  # unknown to the worker: an error
    assert ghost is not None
    assert ghost.error_type == "UnknownTask"
    wait_letters(s, 2, 15)
    seen: dict[str, str] = {}
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as page:
        seen["metrics"] = page.read().decode()
    assert "qtasks_task_processed_total" in seen["metrics"]
    core = s.producer.core
    seen["reprs"] = "\n".join(
        repr(x)
        for x in (s.producer, core, core.broker, core.storage, core.global_config, core.config)
    )
    seen["cli"] = "\n".join(
        cli(s, *args)
        for args in (
            ("stats", "inspect", "app"),
            ("stats", "inspect", "workers"),
            ("stats", "inspect", "queues"),
            ("stats", "inspect", "failures", "5"),
            ("dlq", "list"),
            ("dlq", "list", "--json"),
        )
    )
    # errors: the same password, a port nothing listens on
    import traceback

    dead_port = free_port()
    wrong = {
        "redis": {"broker_url": f"redis://qtuser:{SECRET}@127.0.0.1:{dead_port}/0"},
        "rabbitmq": {
            "broker_url": f"amqp://qtuser:{SECRET}@127.0.0.1:{dead_port}/?connect_timeout=1",
            "storage_url": redis_url,
        },
        "kafka": {"storage_url": f"redis://qtuser:{SECRET}@127.0.0.1:{dead_port}/0"},
    }[broker]
    offline = build_app({**s.settings, **wrong}, producer=True)
    errors = []
    try:
        try:
            offline.add_task("noop", 1)
        except Exception as exc:  # what the user sees: message, repr, traceback, causes
            errors.append("".join(traceback.format_exception(exc)) + repr(exc))
        else:
            raise AssertionError("enqueueing on a dead port raised nothing")
    finally:
        with contextlib.suppress(Exception):
            offline.close()
    seen["errors"] = "\n".join(errors)
    # the dashboard's JSON (a fresh app: the dashboard starts it on its own loop)
    web_app = build_app(s.settings, producer=True)
    with TestClient(create_app(web_app)) as client:
        pages = []
        for path in ("overview", "app", "workers", "queues", "tasks", "dead-letters"):
            response = client.get(f"/api/{path}")
            assert response.status_code == 200, (path, response.text[:500])
            pages.append(response.text)
        seen["dashboard"] = "\n".join(pages)
    worker.signal(signal.SIGTERM)
    worker.wait(timeout=20)
    seen["worker log"] = worker.log()
    assert "dead-lettered" in seen["worker log"]
    counts = {k: v.count(SECRET) for k, v in seen.items()}
    shown = {k: v.count("qtuser:***@") for k, v in seen.items() if "qtuser:***@" in v}
    s.report(None, secret_hits=counts, redacted_url_shown=shown)
    assert counts == dict.fromkeys(seen, 0), counts
