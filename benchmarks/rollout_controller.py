"""Rollout controller benchmark: pipeline throughput against staleness, and runner latency.

    .venv/bin/python benchmarks/rollout_controller.py            # CPU, ~30 s, no model

(a) Pipeline throughput. A synthetic inference engine answers each episode after a
long-tailed latency (lognormal, seeded per episode, so every setting sees the same
workload); a fixed-cost trainer (`time.sleep`) runs in the main thread while rollouts run
on the runner thread; after each `prepare_batch` the trainer "trains" and bumps the policy
version. Throughput (trained samples/s) is printed for `max_head_offpolicyness` 0, 1, 2,
4 and 8, as a ratio to staleness 0 (synchronous RL) and to the ideal pipeline bound.

The bound: with B episodes per batch, at most C rollouts at once, mean latency E[lat]
and train time T per batch,
  - synchronous RL generates a batch, then trains on it:
        step time = E[max of B latencies] + T
  - with overlap, generation and training run side by side, so the step time is at
    least the slower of the two: training (T) or generating B episodes with C in flight
    (Little's law: B * E[lat] / C):
        step time >= max(B * E[lat] / C, T)
The workload sets T = E[max of B latencies] (a batch's generation costs what training
costs), so the bound is close to 2x the synchronous rate. Target: staleness 2 reaches at
least 1.8x the synchronous rate.

(b) AsyncTaskRunner costs: per-task overhead (submit + run + wait of a no-op coroutine,
microseconds) and wake-up latency from a task returning to `wait` returning (median and
p99, milliseconds), next to a waiter that polls the output queue every 10 ms (how
AReaL's reference waits). Target: median wake-up under 2 ms.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import statistics
import time
from dataclasses import dataclass

import torch

from workflows.config import RolloutConfig
from workflows.controller.executor import WorkflowExecutor
from workflows.controller.task_runner import AsyncTaskRunner

# ---------------------------------------------------------------------- workload

BATCH_EPISODES = 8  # consumer_batch_size
SAMPLES_PER_EPISODE = 4  # a GRPO group
MAX_CONCURRENT = 16
LATENCY_MEDIAN_S = 0.008
LATENCY_SIGMA = 1.0  # lognormal shape: p99 is ~10x the median
STEPS = 80
WARMUP_STEPS = 5  # pipeline fill, not steady state
OFFPOLICY = (0, 1, 2, 4, 8)
SEED = 0
POLL_INTERVAL_S = 0.01  # the polling waiter compared against in (b)


def episode_latency(episode_id: int) -> float:
    """Seconds; seeded per episode so the draw does not depend on scheduling."""
    return random.Random(SEED * 1_000_003 + episode_id).lognormvariate(math.log(LATENCY_MEDIAN_S), LATENCY_SIGMA)


def expected_max_latency(num: int, *, trials: int = 20_000) -> float:
    """Monte Carlo E[max of `num` latencies], seconds."""
    rng = random.Random(SEED + 1)
    mu = math.log(LATENCY_MEDIAN_S)
    return statistics.fmean(max(rng.lognormvariate(mu, LATENCY_SIGMA) for _ in range(num)) for _ in range(trials))


class SyntheticEngine:
    def __init__(self) -> None:
        self.version = 0

    def get_version(self) -> int:
        return self.version

    def set_version(self, version: int) -> None:
        self.version = version


class SyntheticWorkflow:
    """Waits the episode's latency and returns a tiny trajectory stamped with its version."""

    async def arun_episode(self, engine: SyntheticEngine, data: dict):
        version = engine.get_version()
        await asyncio.sleep(data["latency"])
        n, prompt, gen = SAMPLES_PER_EPISODE, 4, 8
        return {
            "input_ids": torch.zeros(n, prompt + gen, dtype=torch.long),
            "attention_mask": torch.ones(n, prompt + gen, dtype=torch.bool),
            "loss_mask": torch.tensor([0] * prompt + [1] * gen).repeat(n, 1),
            "logprobs": torch.zeros(n, prompt + gen),
            "versions": torch.tensor([-1] * prompt + [version] * gen).repeat(n, 1),
            "rewards": torch.zeros(n),
        }


@dataclass
class PipelineResult:
    offpolicy: int
    samples_per_s: float
    mean_lag: float
    max_lag: int
    num_expired: int


def run_pipeline(offpolicy: int, *, train_time: float) -> PipelineResult:
    engine = SyntheticEngine()
    config = RolloutConfig(
        max_concurrent_rollouts=MAX_CONCURRENT, max_head_offpolicyness=offpolicy, queue_size=4 * MAX_CONCURRENT
    )
    executor = WorkflowExecutor(config, engine, consumer_batch_size=BATCH_EPISODES)
    num_items = (STEPS + max(OFFPOLICY) + 2) * BATCH_EPISODES
    dataloader = [
        [{"latency": episode_latency(i + j)} for j in range(BATCH_EPISODES)] for i in range(0, num_items, BATCH_EPISODES)
    ]
    workflow = SyntheticWorkflow()
    lags: list[int] = []
    executor.initialize()
    try:
        for step in range(STEPS):
            if step == WARMUP_STEPS:
                t0 = time.perf_counter()
            batch = executor.prepare_batch(dataloader, workflow)
            version = engine.get_version()
            lags += (version - batch["versions"][:, -1]).tolist()
            time.sleep(train_time)  # the trainer's fixed cost
            engine.set_version(version + 1)
        elapsed = time.perf_counter() - t0
    finally:
        executor.destroy()
    samples = (STEPS - WARMUP_STEPS) * BATCH_EPISODES * SAMPLES_PER_EPISODE
    return PipelineResult(offpolicy, samples / elapsed, statistics.fmean(lags), max(lags), executor.num_expired)


# ---------------------------------------------------------------------- runner costs


def runner_overhead_us(num_tasks: int = 20_000) -> float:
    async def noop():
        return 1

    with AsyncTaskRunner(max_queue_size=num_tasks) as runner:
        runner.submit(noop)
        runner.wait(1)  # warm the loop
        t0 = time.perf_counter()
        for _ in range(num_tasks):
            runner.submit(noop)
        runner.wait(num_tasks)
        return (time.perf_counter() - t0) / num_tasks * 1e6


def wakeup_latencies_ms(*, poll: bool, num_tasks: int = 200, spacing_s: float = 0.004) -> list[float]:
    """Completion-to-return latency of a waiter taking results one at a time."""

    async def stamped(delay: float) -> float:
        await asyncio.sleep(delay)
        return time.perf_counter()

    rng = random.Random(SEED + 2)
    latencies = []
    with AsyncTaskRunner(max_queue_size=num_tasks) as runner:
        for i in range(num_tasks):
            # Spaced so each result is awaited on its own rather than found already queued.
            runner.submit(stamped, spacing_s * (i + 1) + rng.uniform(0, spacing_s / 4))
        for _ in range(num_tasks):
            if poll:
                while runner.get_output_queue_size() == 0:
                    time.sleep(POLL_INTERVAL_S)
            [result] = runner.wait(1)
            latencies.append((time.perf_counter() - result.data) * 1e3)
    return latencies


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


# ---------------------------------------------------------------------- main


def main() -> None:
    logging.basicConfig(level=logging.WARNING)
    started = time.perf_counter()
    mean_latency = LATENCY_MEDIAN_S * math.exp(LATENCY_SIGMA**2 / 2)
    max_latency = expected_max_latency(BATCH_EPISODES)
    train_time = max_latency  # generation of a batch costs what training it costs
    sync_bound = BATCH_EPISODES * SAMPLES_PER_EPISODE / (max_latency + train_time)
    async_bound = BATCH_EPISODES * SAMPLES_PER_EPISODE / max(BATCH_EPISODES * mean_latency / MAX_CONCURRENT, train_time)

    print("(a) rollout + train pipeline")
    print(
        f"    batch {BATCH_EPISODES} episodes x {SAMPLES_PER_EPISODE} samples, max_concurrent_rollouts "
        f"{MAX_CONCURRENT}, latency lognormal(median {LATENCY_MEDIAN_S * 1e3:.0f} ms, sigma {LATENCY_SIGMA}), "
        f"mean {mean_latency * 1e3:.1f} ms, E[max of {BATCH_EPISODES}] {max_latency * 1e3:.1f} ms"
    )
    print(f"    train {train_time * 1e3:.1f} ms/batch, {STEPS - WARMUP_STEPS} timed steps after {WARMUP_STEPS} warm-up")
    print(f"    ideal synchronous: {sync_bound:7.1f} samples/s; ideal overlapped bound: {async_bound:7.1f} samples/s")
    print(f"    {'staleness':>9} {'samples/s':>10} {'vs sync':>8} {'vs bound':>9} {'mean lag':>9} {'max lag':>8} {'expired':>8}")
    results = [run_pipeline(k, train_time=train_time) for k in OFFPOLICY]
    sync_rate = results[0].samples_per_s
    for r in results:
        print(
            f"    {r.offpolicy:>9} {r.samples_per_s:>10.1f} {r.samples_per_s / sync_rate:>7.2f}x "
            f"{r.samples_per_s / async_bound:>8.2f}x {r.mean_lag:>9.2f} {r.max_lag:>8} {r.num_expired:>8}"
        )
    ratio_2 = next(r for r in results if r.offpolicy == 2).samples_per_s / sync_rate
    print(f"    target: staleness 2 >= 1.8x synchronous -> {ratio_2:.2f}x {'PASS' if ratio_2 >= 1.8 else 'FAIL'}")

    print("(b) AsyncTaskRunner")
    print(f"    per-task overhead (submit + run + wait, no-op coroutine): {runner_overhead_us():.1f} us")
    event = wakeup_latencies_ms(poll=False)
    polled = wakeup_latencies_ms(poll=True)
    print(
        f"    wake-up latency, Condition: median {statistics.median(event):.3f} ms, p99 {percentile(event, 0.99):.3f} ms"
    )
    print(
        f"    wake-up latency, {POLL_INTERVAL_S * 1e3:.0f} ms polling: median {statistics.median(polled):.3f} ms, "
        f"p99 {percentile(polled, 0.99):.3f} ms"
    )
    median = statistics.median(event)
    print(f"    target: median wake-up < 2 ms -> {median:.3f} ms {'PASS' if median < 2 else 'FAIL'}")
    print(f"total {time.perf_counter() - started:.1f} s")


if __name__ == "__main__":
    main()
