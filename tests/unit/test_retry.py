"""Retry decisions and backoff schedules: plain functions, no loop."""

from __future__ import annotations

import pytest

from qtasks import Backoff, Retry
from qtasks.retry import backoff_delay, should_retry


def test_backoff_grows_geometrically_without_jitter() -> None:
    policy = Backoff(base_seconds=2, factor=3, max_seconds=1000, jitter=0)
    assert [policy.delay(n) for n in (1, 2, 3, 4)] == [2, 6, 18, 54]


def test_backoff_is_capped() -> None:
    policy = Backoff(base_seconds=1, factor=10, max_seconds=50, jitter=0)
    assert policy.delay(1) == 1
    assert policy.delay(2) == 10
    assert policy.delay(3) == 50
    assert policy.delay(30) == 50


def test_backoff_retry_number_below_one_is_the_base() -> None:
    policy = Backoff(base_seconds=4, factor=2, jitter=0)
    assert policy.delay(0) == 4
    assert policy.delay(-3) == 4


def test_backoff_jitter_stays_within_its_fraction() -> None:
    policy = Backoff(base_seconds=10, factor=1, jitter=0.2)
    delays = {policy.delay(1) for _ in range(200)}
    assert all(8 <= d <= 12 for d in delays)
    assert len(delays) > 1  # it does vary


def test_backoff_defaults() -> None:
    policy = Backoff()
    assert (policy.base_seconds, policy.factor, policy.max_seconds, policy.jitter) == (
        1.0,
        2.0,
        300.0,
        0.1,
    )
    with pytest.raises(AttributeError):
        policy.base_seconds = 5  # type: ignore[misc]  # frozen


def test_backoff_never_negative() -> None:
    assert Backoff(base_seconds=-5, jitter=0).delay(1) == 0.0


@pytest.mark.parametrize(
    ("policy", "retry_number", "expected"),
    [
        (Backoff(base_seconds=3, factor=2, jitter=0), 3, 12.0),
        (5, 1, 5.0),
        (2.5, 7, 2.5),
        (0, 1, 0.0),
        (lambda n: n * 1.5, 4, 6.0),
    ],
)
def test_backoff_delay_accepts_each_policy_kind(
    policy: object, retry_number: int, expected: float
) -> None:
    assert backoff_delay(policy, retry_number) == expected  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("exc", "attempt", "retries", "retry_on_exc", "expected"),
    [
        (ValueError(), 0, 0, None, False),  # no retries configured
        (ValueError(), 0, 2, None, True),  # any Exception without retry_on_exc
        (ValueError(), 1, 2, None, True),
        (ValueError(), 2, 2, None, False),  # retries used up
        (ValueError(), 0, 2, [ValueError], True),
        (ValueError(), 0, 2, [LookupError], False),  # not listed
        (KeyError(), 0, 2, [LookupError], True),  # subclasses match
        (KeyError(), 0, 2, [ValueError, LookupError], True),
        (KeyError(), 0, 2, [], False),  # an empty list retries nothing
        (Retry(), 0, 2, [ValueError], True),  # Retry always asks, within the limit
        (Retry(), 2, 2, None, False),
        (KeyboardInterrupt(), 0, 2, None, False),  # not an Exception
        (KeyboardInterrupt(), 0, 2, [KeyboardInterrupt], True),
    ],
)
def test_should_retry(
    exc: BaseException,
    attempt: int,
    retries: int,
    retry_on_exc: list[type[BaseException]] | None,
    expected: bool,
) -> None:
    assert (
        should_retry(exc, attempt=attempt, retries=retries, retry_on_exc=retry_on_exc) is expected
    )


def test_retry_signal_carries_its_delay() -> None:
    assert Retry().delay is None
    assert str(Retry()) == "retry requested"
    signal = Retry("rate limited", delay=3.5)
    assert signal.delay == 3.5
    assert str(signal) == "rate limited"
