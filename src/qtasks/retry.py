"""Retry decisions and backoff schedules: plain logic, no I/O."""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable, Sequence

from qtasks.errors import Retry


@dataclasses.dataclass(frozen=True)
class Backoff:
    """Delay before retry n (1-based): base * factor**(n-1), capped, with ± jitter."""

    base_seconds: float = 1.0
    factor: float = 2.0
    max_seconds: float = 300.0
    jitter: float = 0.1
    """Fraction of the delay added or removed at random so retries do not stampede."""

    def delay(self, retry_number: int) -> float:
        """Seconds to wait before retry number `retry_number` (1 is the first retry)."""
        raw = min(self.base_seconds * self.factor ** max(retry_number - 1, 0), self.max_seconds)
        if self.jitter:
            raw *= 1 + random.uniform(-self.jitter, self.jitter)
        return max(raw, 0.0)


BackoffPolicy = Backoff | float | Callable[[int], float]
"""A Backoff, a constant delay in seconds, or a function of the retry number."""


def backoff_delay(policy: BackoffPolicy, retry_number: int) -> float:
    """The delay a policy gives for retry number `retry_number`."""
    if isinstance(policy, Backoff):
        return policy.delay(retry_number)
    if isinstance(policy, (int, float)):
        return float(policy)
    return float(policy(retry_number))


def should_retry(
    exc: BaseException,
    *,
    attempt: int,
    retries: int,
    retry_on_exc: Sequence[type[BaseException]] | None,
) -> bool:
    """Whether a failed attempt (0-based `attempt`) gets another one.

    `Retry` raised by the task always asks for one (within `retries`); otherwise the error
    must match `retry_on_exc` when given, and any Exception matches when it is not.
    """
    if attempt >= retries:
        return False
    if isinstance(exc, Retry):
        return True
    if retry_on_exc is None:
        return isinstance(exc, Exception)
    return isinstance(exc, tuple(retry_on_exc))
