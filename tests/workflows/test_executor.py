"""WorkflowExecutor (the rollout controller) against a synthetic engine, and the batch helpers."""

from __future__ import annotations

import asyncio
import json
import random
import time

import pytest
import torch

from workflows.config import RolloutConfig
from workflows.controller.executor import WorkflowExecutor
from workflows.controller.failures import RolloutFailureError
from workflows.controller.task_result import TaskQueueFullError
from workflows.rollout.batch import concat_padded_tensors, oldest_version, staleness_stats

PROMPT_LEN = 3
NUM_SAMPLES = 2  # samples per episode (a GRPO group)


class FakeEngine:
    """Only the version: the workflow below stands in for generation."""

    def __init__(self) -> None:
        self.version = 0

    def get_version(self) -> int:
        return self.version

    def set_version(self, version: int) -> None:
        self.version = version


class SyntheticWorkflow:
    """Episodes whose behaviour is set by the data dict.

    `data = {"id": int, "delay": seconds, "mode": "ok" | "none" | "raise"}`. Generation is
    "interruptible": tokens sampled in the first half of the delay carry the version at
    start, the rest the version when the episode ends, as with AReaL's weight updates
    mid-generation, so the oldest token is the first generated one.
    """

    def __init__(self) -> None:
        self.running = 0
        self.max_running = 0
        self.started: list[int] = []
        self.gate: asyncio.Event | None = None  # when set, episodes block on it

    async def arun_episode(self, engine: FakeEngine, data: dict):
        self.running += 1
        self.max_running = max(self.max_running, self.running)
        self.started.append(data["id"])
        try:
            start_version = engine.get_version()
            if self.gate is not None:
                await self.gate.wait()
            delay = data.get("delay", 0.0)
            await asyncio.sleep(delay / 2)
            await asyncio.sleep(delay / 2)
            end_version = engine.get_version()
        finally:
            self.running -= 1
        mode = data.get("mode", "ok")
        if mode == "none":
            return None
        if mode == "raise":
            raise RuntimeError(f"episode {data['id']} failed")
        gen_len = 2 + data["id"] % 3  # ragged lengths exercise padding
        length = PROMPT_LEN + gen_len
        half = gen_len // 2
        versions = [-1] * PROMPT_LEN + [start_version] * half + [end_version] * (gen_len - half)
        return {
            "input_ids": torch.arange(length).repeat(NUM_SAMPLES, 1) + 100 * data["id"],
            "attention_mask": torch.ones(NUM_SAMPLES, length, dtype=torch.bool),
            "loss_mask": torch.tensor([0] * PROMPT_LEN + [1] * gen_len).repeat(NUM_SAMPLES, 1),
            "logprobs": torch.zeros(NUM_SAMPLES, length, dtype=torch.float32),
            "versions": torch.tensor(versions).repeat(NUM_SAMPLES, 1),
            "rewards": torch.full((NUM_SAMPLES,), float(data["id"]), dtype=torch.float32),
            "ids": torch.full((NUM_SAMPLES,), data["id"], dtype=torch.long),
        }


def make_executor(engine, *, batch=4, concurrent=8, offpolicy=0, queue_size=64, **kwargs) -> WorkflowExecutor:
    config = RolloutConfig(max_concurrent_rollouts=concurrent, max_head_offpolicyness=offpolicy, queue_size=queue_size)
    executor = WorkflowExecutor(config, engine, consumer_batch_size=batch, **kwargs)
    executor.initialize()
    return executor


@pytest.fixture
def engine():
    return FakeEngine()


# ---------------------------------------------------------------------- batch helpers


def test_concat_padded_tensors_pads_right_and_versions_with_minus_one():
    a = {"x": torch.ones(2, 3, dtype=torch.long), "versions": torch.zeros(2, 3, dtype=torch.long),
         "m": torch.ones(2, 3, dtype=torch.bool), "r": torch.tensor([1.0, 2.0])}
    b = {"x": torch.full((1, 5), 7), "versions": torch.ones(1, 5, dtype=torch.long),
         "m": torch.ones(1, 5, dtype=torch.bool), "r": torch.tensor([3.0])}
    out = concat_padded_tensors([a, b])
    assert out["x"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 0, 0], [7] * 5]
    assert out["versions"][0].tolist() == [0, 0, 0, -1, -1]
    assert out["m"].dtype == torch.bool and out["m"][0].tolist() == [True, True, True, False, False]
    assert out["r"].tolist() == [1.0, 2.0, 3.0]
    with pytest.raises(ValueError):
        concat_padded_tensors([])
    with pytest.raises(ValueError):
        concat_padded_tensors([a, {"x": a["x"]}])


def test_staleness_stats_over_trained_tokens_only():
    versions = torch.tensor([[-1, 3, 4], [-1, -1, 5], [-1, 0, 0], [-1, -1, -1]])
    loss_mask = torch.tensor([[0, 1, 1], [0, 0, 1], [0, 0, 0], [0, 0, 0]])
    # sample 2 has generated tokens but none trained; sample 3 none at all
    assert staleness_stats(versions, loss_mask, 5) == {"max_lag": 2.0, "mean_lag": 1.0, "num_samples": 2.0}
    assert staleness_stats(versions[2:], loss_mask[2:], 5) == {"max_lag": 0.0, "mean_lag": 0.0, "num_samples": 0.0}
    assert oldest_version(versions) == 0 and oldest_version(torch.tensor([-1, -1])) is None
    with pytest.raises(ValueError):
        staleness_stats(versions, loss_mask[:, :2], 5)


# ---------------------------------------------------------------------- construction


def test_consumer_batch_size_must_be_given_once(engine):
    with pytest.raises(ValueError, match="consumer_batch_size"):
        WorkflowExecutor(RolloutConfig(), engine)
    with pytest.raises(ValueError, match="contradicts"):
        WorkflowExecutor(RolloutConfig(consumer_batch_size=4), engine, consumer_batch_size=8)
    assert WorkflowExecutor(RolloutConfig(consumer_batch_size=4), engine).consumer_batch_size == 4
    with pytest.raises(RuntimeError, match="initialize"):
        WorkflowExecutor(RolloutConfig(), engine, consumer_batch_size=2).submit({"id": 0}, SyntheticWorkflow())


# ---------------------------------------------------------------------- rejection


def test_none_raise_and_should_accept_false_are_rejected_and_counted(engine):
    workflow = SyntheticWorkflow()
    executor = make_executor(engine, batch=8)
    try:
        modes = ["ok", "none", "raise", "ok"] * 2
        data = [{"id": i, "mode": mode} for i, mode in enumerate(modes)]
        # reject the episode with id 3 by its reward
        batch = executor.rollout_batch(data, workflow, should_accept=lambda t: float(t["rewards"][0]) != 3.0)
        assert batch["ids"].tolist() == [0, 0, 4, 4, 7, 7]  # submission order, samples of each episode
        stats = executor.get_stats()
        assert (stats.accepted, stats.rejected, stats.running, stats.enqueued) == (3, 5, 0, 0)
        assert executor.rejection_counts == {"none": 2, "error": 2, "should_accept": 1}
        # All rejected: an empty batch, not a crash.
        assert executor.rollout_batch([{"id": 20, "mode": "none"}], workflow) == {}
    finally:
        executor.destroy()


def test_should_accept_that_raises_is_a_rejection(engine):
    executor = make_executor(engine, batch=2)
    try:
        def broken(_):
            raise KeyError("rewards")

        assert executor.rollout_batch([{"id": 0}, {"id": 1}], SyntheticWorkflow(), should_accept=broken) == {}
        assert executor.rejection_counts == {"error": 2}
    finally:
        executor.destroy()


# ---------------------------------------------------------------------- submit / wait


def test_wait_returns_padded_batch_in_completion_order_within_a_version(engine):
    executor = make_executor(engine, batch=3)
    workflow = SyntheticWorkflow()
    try:
        for i, delay in [(0, 0.12), (1, 0.01), (2, 0.06)]:
            executor.submit({"id": i, "delay": delay}, workflow)
        batch = executor.wait(3, timeout=5)
        assert batch["ids"].tolist() == [1, 1, 2, 2, 0, 0]
        assert batch["input_ids"].shape == (6, PROMPT_LEN + 4)  # id 2 has the longest generation
        assert batch["versions"][0].tolist()[-1] == -1  # padding of the shorter one
        assert batch["attention_mask"].dtype == torch.bool
        assert batch["rewards"].shape == (6,)
    finally:
        executor.destroy()


def test_wait_hands_out_the_oldest_policy_version_first(engine):
    executor = make_executor(engine, batch=2, offpolicy=2)
    workflow = SyntheticWorkflow()
    try:
        executor.submit({"id": 0, "delay": 0.15}, workflow)  # generated by version 0, finishes last
        time.sleep(0.02)
        engine.set_version(1)
        executor.submit({"id": 1}, workflow)
        executor.submit({"id": 2}, workflow)
        time.sleep(0.25)  # all three ready
        assert executor.wait(2, timeout=5)["ids"].tolist() == [0, 0, 1, 1]
    finally:
        executor.destroy()


def test_wait_timeout_loses_nothing(engine):
    executor = make_executor(engine, batch=2)
    workflow = SyntheticWorkflow()
    try:
        executor.submit({"id": 0}, workflow)
        executor.submit({"id": 1, "delay": 0.3}, workflow)
        with pytest.raises(TimeoutError):
            executor.wait(2, timeout=0.05)
        assert sorted(executor.wait(2, timeout=5)["ids"].tolist()) == [0, 0, 1, 1]
    finally:
        executor.destroy()


def test_wait_that_can_never_finish_raises_instead_of_hanging(engine):
    executor = make_executor(engine, batch=2)
    try:
        with pytest.raises(RuntimeError, match="no rollout pending or running"):
            executor.wait(1)
        # Three episodes at version 0 with no off-policyness: only two may ever start.
        with pytest.raises(RuntimeError, match="capacity is exhausted"):
            executor.rollout_batch([{"id": i} for i in range(3)], SyntheticWorkflow())
    finally:
        executor.destroy()


def test_full_pending_queue_raises(engine):
    executor = make_executor(engine, batch=1, queue_size=2)
    workflow = SyntheticWorkflow()
    try:
        executor.pause()
        executor.submit({"id": 0}, workflow)
        executor.submit({"id": 1}, workflow)
        with pytest.raises(TaskQueueFullError, match="rollout.queue_size"):
            executor.submit({"id": 2}, workflow)
    finally:
        executor.destroy()


# ---------------------------------------------------------------------- capacity


def test_staleness_capacity_bounds_submission(engine):
    workflow = SyntheticWorkflow()
    executor = make_executor(engine, batch=2, concurrent=8, offpolicy=0)
    try:
        for i in range(5):
            executor.submit({"id": i, "delay": 0.02}, workflow)
        assert executor.get_stats().running == 2 and executor.get_stats().enqueued == 3
        assert executor.get_capacity() == 0
        assert sorted(executor.wait(2, timeout=5)["ids"].tolist()) == [0, 0, 1, 1]
        time.sleep(0.05)
        assert workflow.started == [0, 1]  # nothing else started at version 0
        engine.set_version(1)
        assert sorted(executor.wait(2, timeout=5)["ids"].tolist()) == [2, 2, 3, 3]
        engine.set_version(2)
        assert executor.wait(1, timeout=5)["ids"].tolist() == [4, 4]
        assert workflow.max_running == 2
    finally:
        executor.destroy()


def test_concurrency_capacity_bounds_running_rollouts(engine):
    workflow = SyntheticWorkflow()
    executor = make_executor(engine, batch=20, concurrent=3, offpolicy=0)
    try:
        batch = executor.rollout_batch([{"id": i, "delay": 0.01} for i in range(12)], workflow)
        assert batch["ids"].shape == (24,)
        assert workflow.max_running == 3
    finally:
        executor.destroy()


def test_pause_holds_new_rollouts_and_resume_releases_them(engine):
    workflow = SyntheticWorkflow()
    executor = make_executor(engine, batch=4)
    try:
        executor.pause()
        executor.submit({"id": 0}, workflow)
        time.sleep(0.05)
        assert workflow.started == [] and executor.get_stats().enqueued == 1
        with pytest.raises(TimeoutError):
            executor.wait(1, timeout=0.05)
        executor.resume()
        assert executor.wait(1, timeout=5)["ids"].tolist() == [0, 0]
    finally:
        executor.destroy()


def test_destroy_cancels_in_flight_rollouts_promptly(engine):
    executor = make_executor(engine, batch=8, concurrent=8, destroy_timeout=0.5)
    workflow = SyntheticWorkflow()
    for i in range(8):
        executor.submit({"id": i, "delay": 60}, workflow)
    time.sleep(0.05)
    t0 = time.monotonic()
    executor.destroy()
    assert time.monotonic() - t0 < 0.5 + 1.0  # the rollouts would run for a minute
    stats = executor.get_stats()
    assert (stats.running, stats.rejected) == (0, 8)
    assert executor.rejection_counts == {"cancelled": 8}


# ---------------------------------------------------------------------- prepare_batch


def test_prepare_batch_reiterates_the_dataloader_and_keeps_rollouts_in_flight(engine):
    workflow = SyntheticWorkflow()
    dataloader = [[{"id": 0}, {"id": 1}], [{"id": 2}, {"id": 3}]]  # 4 episodes per epoch
    executor = make_executor(engine, batch=3, concurrent=8, offpolicy=1)
    try:
        seen = []
        for step in range(4):
            batch = executor.prepare_batch(dataloader, workflow, timeout=5)
            assert batch["ids"].shape == (3 * NUM_SAMPLES,)
            seen += batch["ids"][::NUM_SAMPLES].tolist()
            engine.set_version(step + 1)
        assert sorted(seen) == sorted([0, 1, 2, 3] * 3)  # three epochs, nothing lost
        # Off-policyness 1 lets the next batch be generated before this one is trained.
        stats = executor.get_stats()
        assert stats.accepted + stats.running > 4 * 3
    finally:
        executor.destroy()


def test_prepare_batch_rejects_bad_dataloaders(engine):
    executor = make_executor(engine, batch=2)
    try:
        with pytest.raises(ValueError, match="no data"):
            executor.prepare_batch([], SyntheticWorkflow(), timeout=1)
        with pytest.raises(TypeError, match="lists of data dicts"):
            executor.prepare_batch([{"id": 0}], SyntheticWorkflow(), timeout=1)
    finally:
        executor.destroy()


def test_trajectory_dump_per_version(engine, tmp_path):
    executor = make_executor(engine, batch=2, trajectory_dump_dir=tmp_path / "dump")
    dataloader = [[{"id": i} for i in range(2)], [{"id": i} for i in range(2, 4)]]
    try:
        for step in range(2):
            executor.prepare_batch(dataloader, SyntheticWorkflow(), timeout=5)
            engine.set_version(step + 1)
    finally:
        executor.destroy()
    for version in (0, 1):
        lines = [json.loads(line) for line in (tmp_path / "dump" / f"{version}.jsonl").read_text().splitlines()]
        assert len(lines) == 2 * NUM_SAMPLES
        assert {line["version"] for line in lines} == {version}
        for line in lines:
            assert len(line["input_ids"]) == len(line["versions"]) == len(line["loss_mask"])
            assert line["versions"][:PROMPT_LEN] == [-1] * PROMPT_LEN
            assert line["reward"] == float(line["input_ids"][0] // 100)


# ---------------------------------------------------------------------- the staleness invariant


@pytest.mark.parametrize("offpolicy, expect_expired", [(1, True), (100, False)])
def test_a_straggler_is_expired_only_beyond_the_bound(engine, offpolicy, expect_expired):
    """Episode 0 runs for many versions while the rest flow past it (admission alone cannot bound that)."""
    workflow = SyntheticWorkflow()
    dataloader = [[{"id": i, "delay": 0.3 if i == 0 else 0.002}] for i in range(200)]
    executor = make_executor(engine, batch=1, concurrent=4, offpolicy=offpolicy)
    consumed = []
    try:
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and 0 not in consumed and executor.num_expired == 0:
            batch = executor.prepare_batch(dataloader, workflow, timeout=5)
            version = engine.get_version()
            assert int(batch["versions"].max()) <= version
            assert oldest_version(batch["versions"]) >= version - offpolicy
            consumed += batch["ids"][::NUM_SAMPLES].tolist()
            time.sleep(0.01)
            engine.set_version(version + 1)
        # The straggler spanned several versions either way (~25 at ~12 ms per step).
        assert engine.get_version() > 5
        assert (executor.num_expired == 1) == expect_expired
        assert (0 in consumed) != expect_expired
        if expect_expired:
            stats = executor.get_stats()
            assert stats.rejected == 1 and executor.rejection_counts == {"expired": 1}
    finally:
        executor.destroy()


def run_async_training(*, offpolicy: int, steps: int, batch: int, concurrent: int, train_time: float, seed: int):
    """A fake trainer: prepare_batch, check staleness, 'train' (sleep), bump the version."""
    engine = FakeEngine()
    workflow = SyntheticWorkflow()

    def delay(i: int) -> float:
        # Seeded per episode, so the draw does not depend on thread interleaving.
        return min(random.Random(seed * 1_000_003 + i).lognormvariate(-5.3, 1.0), 0.5)  # median 5 ms

    dataloader = [[{"id": i * batch + j, "delay": delay(i * batch + j)} for j in range(batch)] for i in range(64)]
    executor = make_executor(engine, batch=batch, concurrent=concurrent, offpolicy=offpolicy)
    lags = []
    try:
        for _ in range(steps):
            out = executor.prepare_batch(dataloader, workflow, timeout=30)
            version = engine.get_version()
            assert out["rewards"].shape == (batch * NUM_SAMPLES,)
            trained = out["loss_mask"].bool() & (out["versions"] >= 0)
            assert trained.any(dim=1).all()
            oldest = torch.where(trained, out["versions"], torch.full_like(out["versions"], 1 << 40)).min(dim=1).values
            # THE invariant: no trained sample's oldest token is older than the bound.
            assert (oldest >= version - offpolicy).all(), (version, oldest.tolist())
            stats = staleness_stats(out["versions"], out["loss_mask"], version)
            assert stats["max_lag"] == float(version - oldest.min())
            lags.append(stats["max_lag"])
            time.sleep(train_time)
            engine.set_version(version + 1)
        assert workflow.max_running <= concurrent
        rollout_stats = executor.get_stats()
        assert rollout_stats.accepted >= steps * batch
        return lags, executor.num_expired
    finally:
        executor.destroy()


@pytest.mark.parametrize("offpolicy", [0, 1, 2])
def test_staleness_invariant_fast(offpolicy):
    lags, num_expired = run_async_training(
        offpolicy=offpolicy, steps=15, batch=4, concurrent=8, train_time=0.01, seed=offpolicy
    )
    assert max(lags) <= offpolicy
    if offpolicy == 0:
        # Synchronous: every batch was generated entirely by the current policy.
        assert lags == [0.0] * 15 and num_expired == 0
    else:
        # Rollouts did overlap training; otherwise the check above would be vacuous.
        assert max(lags) >= 1


@pytest.mark.slow
@pytest.mark.parametrize("offpolicy", [0, 1, 2])
def test_staleness_invariant_long(offpolicy):
    lags, num_expired = run_async_training(
        offpolicy=offpolicy, steps=300, batch=8, concurrent=12, train_time=0.01, seed=100 + offpolicy
    )
    assert max(lags) <= offpolicy
    if offpolicy == 0:
        assert set(lags) == {0.0} and num_expired == 0
    else:
        assert max(lags) == offpolicy


# ---------------------------------------------------------------------- rollouts that keep failing


def failing_executor(engine, limit, **kwargs) -> WorkflowExecutor:
    config = RolloutConfig(max_concurrent_rollouts=kwargs.pop("concurrent", 4), max_consecutive_rejections=limit,
                           max_head_offpolicyness=kwargs.pop("offpolicy", 0))
    executor = WorkflowExecutor(config, engine, consumer_batch_size=kwargs.pop("batch", 2), **kwargs)
    executor.initialize()
    return executor


class EmptyGroupWorkflow:
    """The issue's hang: `gconfig.n_samples=-4` made every episode of the RLVR workflow
    pack an empty group, raising `max() arg is an empty sequence`."""

    def __init__(self) -> None:
        from engines.config import GenerationConfig
        from workflows.rollout.rlvr import RLVRWorkflow

        class Tokenizer:
            pad_token_id = 0

        self.inner = RLVRWorkflow(gconfig=GenerationConfig(n_samples=-4), tokenizer=Tokenizer(), scorer=None)
        self.started = 0

    async def arun_episode(self, engine, data):
        self.started += 1
        return await self.inner.arun_episode(engine, data)


def test_prepare_batch_stops_when_every_rollout_raises(engine):
    workflow = EmptyGroupWorkflow()
    dataloader = [[{"id": i, "prompt_ids": [1, 2], "answer": "1"} for i in range(2)]]
    executor = failing_executor(engine, limit=16)
    try:
        t0 = time.monotonic()
        with pytest.raises(RolloutFailureError) as info:
            executor.prepare_batch(dataloader, workflow, timeout=30)  # a regression: TimeoutError, not a hang
        assert time.monotonic() - t0 < 10
        error = info.value
        assert (error.count, error.reasons, error.last_error) == (16, {"error": 16}, "ValueError: max() arg is an empty sequence")
        message = str(error)
        assert "\n" not in message
        assert message.startswith("16 rollouts in a row were rejected and none accepted (16 raised)")
        assert "last error: ValueError: max() arg is an empty sequence" in message
        assert "rollout.max_consecutive_rejections" in message
        # It starts no more rollouts, and every later call fails the same way.
        time.sleep(0.05)
        started = workflow.started
        assert started <= 16 + 4  # the streak plus what was in flight when it ended
        for call in (lambda: executor.prepare_batch(dataloader, workflow, timeout=5), lambda: executor.wait(1, timeout=5),
                     lambda: executor.rollout_batch([{"id": 9, "prompt_ids": [1], "answer": "1"}], workflow)):
            with pytest.raises(RolloutFailureError, match="16 rollouts in a row"):
                call()
        time.sleep(0.05)
        assert workflow.started == started
        assert executor.failure is not None and executor.failure.count == 16
    finally:
        executor.destroy()


def test_none_and_should_accept_rejections_count_and_are_named(engine):
    workflow = SyntheticWorkflow()
    data = [{"id": i, "mode": "none" if i % 2 else "ok"} for i in range(12)]
    executor = failing_executor(engine, limit=6, batch=20, concurrent=2)
    try:
        with pytest.raises(RolloutFailureError) as info:
            executor.rollout_batch(data, workflow, should_accept=lambda t: False)
        error = info.value
        assert error.count == 6 and error.reasons == {"none": 3, "should_accept": 3} and error.last_error is None
        assert "(3 returned None, 3 failed should_accept)" in str(error) or "(3 failed should_accept, 3 returned None)" in str(error)
        assert "last error" not in str(error)
    finally:
        executor.destroy()


def test_an_accepted_rollout_resets_the_streak(engine):
    """Five rejections in six, forever, never make a streak of six."""
    workflow = SyntheticWorkflow()
    modes = ["raise", "none", "raise", "none", "raise", "ok"]
    dataloader = [[{"id": 6 * b + j, "mode": mode}] for b in range(4) for j, mode in enumerate(modes)]
    # One at a time, so that completion order is submission order.
    executor = failing_executor(engine, limit=6, batch=1, concurrent=1)
    try:
        for step in range(8):
            batch = executor.prepare_batch(dataloader, workflow, timeout=10)
            assert batch["ids"][0] % 6 == 5
            engine.set_version(step + 1)
        assert executor.failure is None
        counts = executor.rejection_counts
        assert counts["error"] >= 24 and counts["none"] >= 16  # 40 rejections, never 6 in a row
    finally:
        executor.destroy()


def test_a_single_rejection_limit_raises_on_the_first(engine):
    executor = failing_executor(engine, limit=1)
    try:
        executor.submit({"id": 0, "mode": "raise"}, SyntheticWorkflow())
        with pytest.raises(RolloutFailureError, match=r"1 rollouts in a row .*RuntimeError: episode 0 failed"):
            executor.wait(1, timeout=10)
    finally:
        executor.destroy()


def test_cancellations_and_staleness_expiries_are_not_failures(engine):
    # Cancelled by destroy: not a failure.
    executor = failing_executor(engine, limit=1, batch=8, concurrent=8, destroy_timeout=0.5)
    for i in range(4):
        executor.submit({"id": i, "delay": 60}, SyntheticWorkflow())
    time.sleep(0.05)
    executor.destroy()
    assert executor.rejection_counts == {"cancelled": 4} and executor.failure is None

    # Expired after acceptance: not a failure either (see the straggler test above).
    workflow = SyntheticWorkflow()
    dataloader = [[{"id": i, "delay": 0.3 if i == 0 else 0.002}] for i in range(200)]
    executor = failing_executor(engine, limit=1, batch=1, concurrent=4, offpolicy=1)
    try:
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and executor.num_expired == 0:
            executor.prepare_batch(dataloader, workflow, timeout=5)
            time.sleep(0.01)
            engine.set_version(engine.get_version() + 1)
        assert executor.num_expired == 1 and executor.failure is None
    finally:
        executor.destroy()


def test_max_consecutive_rejections_must_be_positive(engine):
    with pytest.raises(ValueError, match="max_consecutive_rejections"):
        WorkflowExecutor(RolloutConfig(max_consecutive_rejections=0), engine, consumer_batch_size=2)


# ---------------------------------------------------------------------- dynamic sampling


def test_group_filter_drops_groups_and_keeps_generating_until_the_batch_is_full(engine):
    """DAPO's dynamic sampling: filtered groups free their slot; the batch still fills."""
    executor = make_executor(engine, batch=4, group_filter=lambda t: int(t["ids"][0]) % 2 == 0)
    try:
        dataloader = [[{"id": i} for i in range(start, start + 4)] for start in range(0, 64, 4)]
        batch = executor.prepare_batch(dataloader, SyntheticWorkflow(), timeout=10)
        ids = sorted(set(batch["ids"].tolist()))
        assert len(ids) == 4 and all(i % 2 == 0 for i in ids)
        assert executor.rejection_counts["filtered"] >= 3  # at least the odd ids among 0..6
        assert executor.failure is None
    finally:
        executor.destroy()


def test_a_long_run_of_filtered_groups_stops_with_its_own_error(engine):
    config = RolloutConfig(max_concurrent_rollouts=4, max_consecutive_filtered=6, max_consecutive_rejections=2)
    executor = WorkflowExecutor(config, engine, consumer_batch_size=2, group_filter=lambda t: False)
    executor.initialize()
    try:
        dataloader = [[{"id": i}, {"id": i + 1}] for i in range(0, 40, 2)]
        with pytest.raises(RolloutFailureError, match="had all-equal rewards and were dropped by dynamic sampling"):
            executor.prepare_batch(dataloader, SyntheticWorkflow(), timeout=10)
        # Filtered groups are not failures: 6 of them passed max_consecutive_rejections=2.
        assert executor.rejection_counts["filtered"] >= 6 and "should_accept" not in executor.rejection_counts
    finally:
        executor.destroy()


class FlakyEngine(FakeEngine):
    """An inference engine whose `agenerate` raises on a seeded random share of requests."""

    def __init__(self, failure_share: float, seed: int = 0) -> None:
        super().__init__()
        self.failure_share = failure_share
        self.rng = random.Random(seed)
        self.requests = self.failures = 0

    async def agenerate(self, request):
        self.requests += 1
        await asyncio.sleep(0)
        if self.rng.random() < self.failure_share:
            self.failures += 1
            raise ConnectionError(f"inference backend refused request {self.requests}")
        return request


class GeneratingWorkflow(SyntheticWorkflow):
    async def arun_episode(self, engine, data):
        await engine.agenerate(data["id"])
        return await super().arun_episode(engine, data)


def flaky_run(failure_share: float, steps: int):
    engine = FlakyEngine(failure_share)
    config = RolloutConfig(max_concurrent_rollouts=4, max_consecutive_rejections=10_000, max_failure_rate=0.5,
                           failure_rate_window=32)
    executor = WorkflowExecutor(config, engine, consumer_batch_size=2)
    executor.initialize()
    dataloader = [[{"id": 2 * b + j} for j in range(2)] for b in range(1000)]
    workflow = GeneratingWorkflow()
    try:
        for step in range(steps):
            executor.prepare_batch(dataloader, workflow, timeout=30)
            engine.set_version(step + 1)  # the trainer's step
        return engine, executor.rejection_counts
    finally:
        executor.destroy()


def test_a_backend_failing_on_some_requests_is_counted_and_the_run_goes_on():
    engine, counts = flaky_run(0.3, steps=60)
    assert engine.failures > 15  # many failed requests, never enough of them to stop
    assert counts["error"] == engine.failures


def test_a_backend_failing_on_most_requests_stops_the_run_by_its_failure_rate():
    t0 = time.monotonic()
    with pytest.raises(RolloutFailureError) as info:
        flaky_run(0.7, steps=1000)
    assert time.monotonic() - t0 < 30
    error = info.value
    assert error.window == 32 and 16 < error.count <= 32  # a streak of 10,000 never happened
    message = str(error)
    assert message.startswith(f"{error.count} of the last 32 rollouts failed ({error.count} raised)")
    assert "rollout.max_failure_rate=0.5" in message and "ConnectionError: inference backend refused" in message
    assert "\n" not in message
