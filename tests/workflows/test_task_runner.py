"""AsyncTaskRunner: ordering, waking, flow control, failures and shutdown."""

from __future__ import annotations

import asyncio
import logging
import threading
import time

import pytest

from workflows.controller.task_result import TaskQueueFullError, TaskResult
from workflows.controller.task_runner import AsyncTaskRunner


async def sleep_then(value, delay: float = 0.0):
    await asyncio.sleep(delay)
    return value


async def fail(message: str):
    await asyncio.sleep(0)
    raise ValueError(message)


@pytest.fixture
def runner():
    r = AsyncTaskRunner(max_queue_size=64, name="test-runner")
    r.start()
    yield r
    r.destroy(timeout=2.0)


def test_results_come_in_completion_order(runner):
    ids = [runner.submit(sleep_then, name, delay) for name, delay in [("slow", 0.15), ("fast", 0.01), ("mid", 0.07)]]
    assert len(set(ids)) == 3
    results = runner.wait(3, timeout=5)
    assert [r.data for r in results] == ["fast", "mid", "slow"]
    assert all(r.accepted and r.error is None for r in results)
    assert runner.num_completed == 3
    assert runner.get_output_queue_size() == 0


def test_kwargs_reach_the_coroutine_and_task_id_is_taken_by_the_runner(runner):
    async def combine(a, *, b):
        return (a, b)

    runner.submit(combine, 1, b=2, task_id="custom")
    [result] = runner.wait(1, timeout=5)
    assert result == TaskResult("custom", data=(1, 2))


def test_duplicate_task_id_rejected_until_its_result_is_taken(runner):
    runner.submit(sleep_then, 1, 0.01, task_id=7)
    with pytest.raises(ValueError, match="7"):
        runner.submit(sleep_then, 2, task_id=7)
    runner.wait(1, timeout=5)
    runner.submit(sleep_then, 3, task_id=7)
    assert runner.wait(1, timeout=5)[0].data == 3
    # An automatic id never collides with an explicit one still in use.
    runner.submit(sleep_then, "x", 0.05, task_id=0)
    auto = runner.submit(sleep_then, "y")
    assert auto != 0


def test_wait_timeout_keeps_results_for_the_next_wait(runner):
    runner.submit(sleep_then, "quick")
    runner.submit(sleep_then, "late", 2.0)
    t0 = time.monotonic()
    with pytest.raises(TimeoutError):
        runner.wait(2, timeout=0.05)
    # Returned at its timeout, not when the late task finished (bounds leave room for a
    # loaded CI machine; latency itself is measured in benchmarks/rollout_controller.py).
    assert time.monotonic() - t0 < 1.0
    assert runner.get_output_queue_size() == 1
    assert [r.data for r in runner.wait(2, timeout=5)] == ["quick", "late"]


def test_waiter_is_woken_when_the_result_lands(runner):
    # A polling waiter with a coarse sleep would overshoot; the Condition wakes at once.
    runner.submit(sleep_then, None, 0.05)
    t0 = time.perf_counter()
    runner.wait(1, timeout=5)
    elapsed = time.perf_counter() - t0
    assert 0.045 <= elapsed < 0.045 + 0.5


def test_wait_from_another_thread(runner):
    got: list[TaskResult] = []
    waiter = threading.Thread(target=lambda: got.extend(runner.wait(2, timeout=5)))
    waiter.start()
    runner.submit(sleep_then, "a", 0.02)
    runner.submit(sleep_then, "b", 0.04)
    waiter.join(5)
    assert [r.data for r in got] == ["a", "b"]


def test_pause_stops_new_tasks_and_running_ones_continue(runner):
    runner.submit(sleep_then, "running", 0.1)
    time.sleep(0.02)  # let it start
    runner.pause()
    assert runner.paused
    runner.submit(sleep_then, "held")
    assert runner.wait(1, timeout=5)[0].data == "running"
    time.sleep(0.05)
    assert runner.get_input_queue_size() == 1
    assert runner.get_output_queue_size() == 0
    with pytest.raises(TimeoutError):
        runner.wait(1, timeout=0.05)
    runner.resume()
    assert runner.wait(1, timeout=5)[0].data == "held"
    assert runner.get_input_queue_size() == 0


def test_full_input_queue_raises_named_error():
    runner = AsyncTaskRunner(max_queue_size=3)
    runner.start()
    try:
        runner.pause()
        for i in range(3):
            runner.submit(sleep_then, i)
        with pytest.raises(TaskQueueFullError, match="max_queue_size=3"):
            runner.submit(sleep_then, 99)
        runner.resume()
        assert sorted(r.data for r in runner.wait(3, timeout=5)) == [0, 1, 2]
        runner.submit(sleep_then, 4)  # room again once the queue drained
        assert runner.wait(1, timeout=5)[0].data == 4
    finally:
        runner.destroy(timeout=1)


def test_failing_task_becomes_a_logged_counted_result(runner, caplog):
    caplog.set_level(logging.WARNING, logger="workflows.controller.task_runner")
    runner.submit(fail, "boom", task_id="bad")
    runner.submit(sleep_then, "fine", 0.05)
    bad, fine = runner.wait(2, timeout=5)
    assert bad.task_id == "bad" and bad.data is None and not bad.accepted
    assert "ValueError: boom" in bad.error and "Traceback" in bad.error
    assert fine.accepted and fine.data == "fine"
    assert runner.num_failed == 1 and runner.num_cancelled == 0
    assert any("boom" in record.getMessage() for record in caplog.records)


def test_a_repeated_error_is_logged_in_full_once(runner, caplog):
    """Rollouts that all fail the same way must not fill the log with one traceback each."""
    caplog.set_level(logging.WARNING, logger="workflows.controller.task_runner")
    for _ in range(5):
        runner.submit(fail, "same")
    runner.submit(fail, "other")
    results = runner.wait(6, timeout=5)
    assert all("Traceback" in r.error for r in results)  # the results keep the whole traceback
    messages = [record.getMessage() for record in caplog.records]
    assert sum("Traceback" in m for m in messages) == 2  # once per distinct error
    assert sum(m.endswith("failed: ValueError: same") for m in messages) == 4


def test_non_coroutine_callable_is_a_failure_not_a_crash(runner):
    runner.submit(lambda: 42)  # not awaitable
    [result] = runner.wait(1, timeout=5)
    assert result.data is None and "TypeError" in result.error
    runner.submit(sleep_then, "still alive")
    assert runner.wait(1, timeout=5)[0].data == "still alive"


def test_callbacks_run_on_the_loop_thread_before_the_waiter_sees_the_result():
    seen: list[tuple[str, object, str]] = []

    def global_cb(result: TaskResult) -> None:
        seen.append(("global", result.task_id, threading.current_thread().name))

    def broken_cb(result: TaskResult) -> None:
        raise RuntimeError("callback bug")

    runner = AsyncTaskRunner(max_queue_size=8, name="cb-runner", on_result=global_cb)
    runner.start()
    try:
        runner.submit(sleep_then, 1, task_id="a", on_result=lambda r: seen.append(("task", r.task_id, r.data)))
        runner.submit(sleep_then, 2, 0.02, task_id="b", on_result=broken_cb)
        runner.wait(1, timeout=5)
        assert seen == [("task", "a", 1), ("global", "a", "cb-runner")]
        runner.wait(1, timeout=5)
        assert seen[-1] == ("global", "b", "cb-runner")
        assert runner.num_callback_errors == 1
    finally:
        runner.destroy(timeout=1)


def test_destroy_cancels_in_flight_tasks_within_its_timeout():
    runner = AsyncTaskRunner(max_queue_size=500)
    runner.start()
    started = threading.Semaphore(0)

    async def long_task():
        started.release()
        await asyncio.sleep(60)

    async def stubborn_task():
        # Ignores the first cancellation; destroy must still return in time.
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            await asyncio.sleep(60)

    for _ in range(200):
        runner.submit(long_task)
    runner.submit(stubborn_task)
    for _ in range(200):
        assert started.acquire(timeout=5)
    runner.pause()
    for _ in range(50):
        runner.submit(long_task)  # queued, never started

    t0 = time.monotonic()
    runner.destroy(timeout=0.5)
    assert time.monotonic() - t0 < 0.5 + 1.0  # the tasks would run for a minute
    assert not runner._thread.is_alive()
    assert runner.num_cancelled == 251
    results = runner.wait(251, timeout=0)
    assert all(r.cancelled and r.data is None for r in results)
    with pytest.raises(RuntimeError, match="destroyed"):
        runner.wait(1, timeout=5)
    with pytest.raises(RuntimeError):
        runner.submit(sleep_then, 1)


def test_destroy_also_cancels_tasks_that_tasks_started():
    """An inference engine's batching task is started by the rollouts, not submitted; it
    must not be left pending (and warned about) when the loop closes."""
    runner = AsyncTaskRunner(max_queue_size=4)
    runner.start()
    cancelled = threading.Event()

    async def background():
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    async def starts_background():
        asyncio.get_running_loop().create_task(background())
        await asyncio.sleep(60)

    runner.submit(starts_background)
    time.sleep(0.05)
    t0 = time.monotonic()
    runner.destroy(timeout=1.0)
    assert time.monotonic() - t0 < 2.0
    assert cancelled.is_set()


def test_destroy_wakes_a_blocked_waiter():
    runner = AsyncTaskRunner(max_queue_size=4)
    runner.start()
    errors: list[BaseException] = []

    def waiter():
        try:
            runner.wait(5)
        except BaseException as e:  # noqa: BLE001 - recorded for the assertion
            errors.append(e)

    thread = threading.Thread(target=waiter)
    thread.start()
    runner.submit(sleep_then, 1, 60)
    time.sleep(0.05)
    runner.destroy(timeout=1)
    thread.join(2)
    assert not thread.is_alive()
    assert len(errors) == 1 and isinstance(errors[0], RuntimeError)


def test_lifecycle_misuse():
    runner = AsyncTaskRunner(max_queue_size=1)
    with pytest.raises(RuntimeError):
        runner.submit(sleep_then, 1)
    runner.start()
    with pytest.raises(RuntimeError):
        runner.start()
    with pytest.raises(ValueError):
        runner.wait(-1)
    runner.destroy(timeout=1)
    runner.destroy(timeout=1)  # idempotent
    with pytest.raises(ValueError):
        AsyncTaskRunner(max_queue_size=0)
