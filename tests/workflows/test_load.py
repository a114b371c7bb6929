"""The rollout controller under load: thousands of concurrent rollouts with long-tailed
latency, sampled from a second thread while they run, and a queue of ten thousand.

The figures these print (`-s`) are in docs/reliability.md.
"""

import random
import threading
import time

import psutil
import pytest

from tests.workflows.test_executor import NUM_SAMPLES, FakeEngine, SyntheticWorkflow
from workflows.config import RolloutConfig
from workflows.controller.executor import WorkflowExecutor
from workflows.controller.task_result import TaskQueueFullError


def current_rss_gb() -> float:
    return psutil.Process().memory_info().rss / 1e9


def latency(i: int) -> float:
    """Seconds: log-normal, median 20 ms, one in a hundred above 0.6 s, capped at 3 s."""
    return min(random.Random(i).lognormvariate(-3.9, 1.5), 3.0)


class Monitor(threading.Thread):
    """Samples the controller every millisecond and records the worst it saw."""

    def __init__(self, executor: WorkflowExecutor, workflow: SyntheticWorkflow, engine: FakeEngine) -> None:
        super().__init__(daemon=True)
        self.executor, self.workflow, self.engine = executor, workflow, engine
        self.stop = threading.Event()
        self.samples = self.max_running = self.max_episodes = 0
        self.violations: list[str] = []

    def run(self) -> None:
        manager = self.executor.staleness_manager
        cfg = self.executor.config
        while not self.stop.is_set():
            stats = manager.get_stats()
            # Read after the counters: the version only grows, so the limit computed
            # from it is never tighter than the one the counters were admitted under.
            version = self.engine.get_version()
            limit = (cfg.max_head_offpolicyness + version + 1) * self.executor.consumer_batch_size
            if stats.running > cfg.max_concurrent_rollouts:
                self.violations.append(f"{stats.running} running > {cfg.max_concurrent_rollouts}")
            if stats.accepted + stats.running > limit:
                self.violations.append(f"accepted {stats.accepted} + running {stats.running} > {limit} at v{version}")
            self.samples += 1
            self.max_running = max(self.max_running, stats.running)
            self.max_episodes = max(self.max_episodes, self.workflow.running)
            time.sleep(0.001)


def test_2000_concurrent_rollouts_stay_within_both_bounds_in_bounded_memory():
    concurrent, batch, offpolicy, steps = 2000, 1000, 1, 12
    engine, workflow = FakeEngine(), SyntheticWorkflow()
    config = RolloutConfig(max_concurrent_rollouts=concurrent, max_head_offpolicyness=offpolicy, queue_size=concurrent)
    executor = WorkflowExecutor(config, engine, consumer_batch_size=batch)
    executor.initialize()
    dataloader = [[{"id": b * batch + j, "delay": latency(b * batch + j)} for j in range(batch)] for b in range(steps + 4)]
    monitor = Monitor(executor, workflow, engine)
    monitor.start()
    rss = []
    start = time.monotonic()
    try:
        for step in range(steps):
            out = executor.prepare_batch(dataloader, workflow, timeout=60)
            assert out["ids"].shape == (batch * NUM_SAMPLES,)
            del out
            engine.set_version(step + 1)
            rss.append(current_rss_gb())
        elapsed = time.monotonic() - start
    finally:
        monitor.stop.set()
        monitor.join()
        executor.destroy()
    finished = executor.get_stats().accepted
    growth_mb = (rss[-1] - rss[2]) * 1024
    print(f"\n{finished} rollouts in {elapsed:.1f} s; most running at once {monitor.max_running} "
          f"(episodes {monitor.max_episodes}); {monitor.samples} samples; RSS {rss[2]:.3f} GB after step 3, "
          f"{rss[-1]:.3f} GB after step {steps} ({growth_mb:+.1f} MB)")
    assert monitor.violations == []
    assert monitor.samples > 1000
    assert monitor.max_running > concurrent // 2  # the load really was thousands at once
    assert elapsed < 120
    # Finished rollouts are not kept: memory after 12,000 is that after 3,000.
    assert growth_mb < 64, rss


def test_ten_thousand_queued_rollouts_a_full_queue_refuses_and_all_finish():
    queued, batch = 10_000, 500
    engine, workflow = FakeEngine(), SyntheticWorkflow()
    config = RolloutConfig(max_concurrent_rollouts=1000, max_head_offpolicyness=queued // batch, queue_size=queued)
    executor = WorkflowExecutor(config, engine, consumer_batch_size=batch)
    executor.initialize()
    try:
        executor.pause()
        for i in range(queued):
            executor.submit({"id": i, "delay": latency(i) / 10}, workflow)
        with pytest.raises(TaskQueueFullError, match="rollout.queue_size=10000"):
            executor.submit({"id": queued}, workflow)
        assert executor.get_stats().enqueued == queued  # the refusal lost nothing
        rss_queued = current_rss_gb()
        start = time.monotonic()
        executor.resume()
        ids = []
        for _ in range(queued // batch):
            ids += executor.wait(batch, timeout=60)["ids"][::NUM_SAMPLES].tolist()
        elapsed = time.monotonic() - start
        print(f"\n{queued} queued rollouts finished in {elapsed:.1f} s; RSS {rss_queued:.3f} GB while queued, "
              f"{current_rss_gb():.3f} GB after")
        assert sorted(ids) == list(range(queued))
        assert elapsed < 120
    finally:
        executor.destroy()
