"""The sync-task thread pool: results, errors, contextvars, bounded growth."""

from __future__ import annotations

import asyncio
import contextvars
import threading
import time

import pytest

from qtasks.runtime.threads import TaskThreadPool

var: contextvars.ContextVar[str] = contextvars.ContextVar("var", default="unset")


async def test_results_errors_and_context_reach_the_caller() -> None:
    pool = TaskThreadPool(4)
    try:
        var.set("caller")
        assert await pool.run(lambda x: x + 1, 1) == 2
        assert await pool.run(var.get) == "caller"
        assert await pool.run(threading.current_thread) is not threading.current_thread()
        with pytest.raises(ZeroDivisionError):
            await pool.run(lambda: 1 / 0)
    finally:
        pool.shutdown()


async def test_short_calls_do_not_grow_the_pool_to_its_bound() -> None:
    pool = TaskThreadPool(16)
    try:
        for _ in range(50):
            await asyncio.gather(*(pool.run(int, "1") for _ in range(16)))
        assert pool.threads < 16
    finally:
        pool.shutdown()


async def test_blocking_calls_grow_the_pool_and_run_in_parallel() -> None:
    pool = TaskThreadPool(8)
    try:
        started = time.perf_counter()
        await asyncio.gather(*(pool.run(time.sleep, 0.2) for _ in range(8)))
        elapsed = time.perf_counter() - started
        assert pool.threads == 8
        assert elapsed < 0.2 * 3, f"8 sleeps of 0.2s took {elapsed:.2f}s: not parallel"
    finally:
        pool.shutdown()


async def test_a_call_whose_waiter_gave_up_before_it_started_is_skipped() -> None:
    pool = TaskThreadPool(1)
    ran: list[int] = []
    gate = threading.Event()
    try:
        first = pool.run(gate.wait, 5)
        second = pool.run(ran.append, 2)
        second.cancel()
        gate.set()
        await first
        await pool.run(ran.append, 3)
        assert ran == [3]
    finally:
        pool.shutdown()


def test_bound_must_be_positive() -> None:
    with pytest.raises(ValueError, match="max_threads"):
        TaskThreadPool(0)
