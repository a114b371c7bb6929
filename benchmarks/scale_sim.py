"""The staleness bound at scale: a discrete-event simulation of the rollout controller and
the trainer on 64 to 1,024 simulated GPUs, with long-tailed generation lengths.

    .venv/bin/python benchmarks/scale_sim.py [--gpus 64 128 256 512 1024] [--bounds 0 1 2 4 8] [--plot docs/scale_sim.png]

No model runs: every rollout is a sampled generation length, every step a training time.
Admission is the project's own `StalenessManager` (workflows/controller/staleness.py), driven
exactly as the `WorkflowExecutor` drives it (enqueue, submit, accept, expire), and the
trainer takes the oldest trajectories first and drops any older than the bound, as the
executor's `wait` does. So the figures are those of the real admission rule, at scales
this machine cannot run.

Model (AReaL's setting, arXiv 2505.24298): of G GPUs, 3/4 generate and 1/4 train. Each
generating GPU decodes `--slots` sequences at once at `--decode-tps` tokens/s each; a
rollout's length is log-normal (median `--median-tokens`, sigma `--sigma`, capped at
`--max-tokens`), so a few take many times the median. A step trains `8 G` sequences at
`--train-tps` tokens/s per training GPU. Throughput is trained sequences per second over
`--steps` steps. Printed per (G, max_head_offpolicyness): throughput, its ratio to the
synchronous schedule and to the ideal bound `min(generation rate, training rate)` of the
split placement, and the share of finished rollouts dropped as too stale. The synchronous
schedule is a colocated one: all G GPUs generate a batch (bound 0), then all G train.

Decoding is processor-shared: with fewer sequences in flight each decodes faster, up to
`--boost` times `--decode-tps`, so a synchronous batch's last long sequences speed up as
on a real server, within a limit (memory-bound decoding does not scale without end).
"""

from __future__ import annotations

import argparse
import heapq
import math
import random
import sys
from dataclasses import dataclass, replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from workflows.controller.staleness import StalenessManager  # noqa: E402


@dataclass(frozen=True)
class Cluster:
    gpus: int
    slots: int  # concurrent sequences per generating GPU
    decode_tps: float  # tokens/s per sequence
    train_tps: float  # tokens/s per training GPU
    median_tokens: float
    sigma: float
    max_tokens: int
    boost: float = 4.0  # a sequence decodes at most this many times faster on a nearly empty GPU
    colocated: bool = False  # every GPU generates, then every GPU trains (the synchronous baseline)

    @property
    def gen_gpus(self) -> int:
        return self.gpus if self.colocated else self.gpus * 3 // 4

    @property
    def train_gpus(self) -> int:
        return self.gpus if self.colocated else self.gpus - self.gen_gpus

    @property
    def batch(self) -> int:
        return 8 * self.gpus

    def length(self, rng: random.Random) -> int:
        return min(self.max_tokens, max(1, int(rng.lognormvariate(math.log(self.median_tokens), self.sigma))))

    def train_seconds(self, tokens: int) -> float:
        return tokens / (self.train_tps * self.train_gpus)

    def ideal(self, rng: random.Random, n: int = 20000) -> float:
        """Sequences/s if generation and training overlapped perfectly: the slower of the two rates."""
        mean = sum(self.length(rng) for _ in range(n)) / n
        generation = self.gen_gpus * self.slots * self.decode_tps / mean
        training = self.train_tps * self.train_gpus / mean
        return min(generation, training)


def simulate(cluster: Cluster, bound: int, steps: int, seed: int) -> tuple[float, float]:
    """(trained sequences per second, share of finished rollouts expired) for one run.

    Decoding is processor-shared: the generating GPUs together decode `gen_gpus * slots *
    decode_tps` tokens/s, split evenly over the sequences in flight, each at most
    `boost * decode_tps` (a nearly empty server decodes faster per sequence, not without
    limit). All running sequences advance at the same rate, so the simulation tracks one
    progress counter (tokens decoded per sequence) and finishes them in order of length.
    """
    rng = random.Random(seed)
    version = 0
    manager = StalenessManager(max_concurrent_rollouts=cluster.gen_gpus * cluster.slots,
                               consumer_batch_size=cluster.batch, max_head_offpolicyness=bound,
                               version_provider=lambda: version)
    fleet_tps = cluster.gen_gpus * cluster.slots * cluster.decode_tps
    running: list[tuple[float, int, int, int]] = []  # (progress at which it ends, tie, start version, tokens)
    progress = now = 0.0
    tie = 0
    ready: list[tuple[int, int]] = []  # (start version, tokens), a heap: oldest first
    training_until: float | None = None
    finished = expired = 0

    def rate() -> float:
        return min(cluster.boost * cluster.decode_tps, fleet_tps / max(len(running), 1))

    def admit() -> None:
        nonlocal tie
        for _ in range(max(0, manager.get_capacity())):
            manager.on_rollout_enqueued()
            manager.on_rollout_submitted()
            tokens = cluster.length(rng)
            tie += 1
            heapq.heappush(running, (progress + tokens, tie, version, tokens))

    def try_train() -> None:
        nonlocal training_until, expired
        if training_until is not None:
            return
        while ready and ready[0][0] < version - bound:  # the executor's staleness drop
            heapq.heappop(ready)
            manager.on_rollout_expired()
            expired += 1
        if len(ready) >= cluster.batch:
            batch = [heapq.heappop(ready) for _ in range(cluster.batch)]
            training_until = now + cluster.train_seconds(sum(t for _, t in batch))

    admit()
    while version < steps:
        done_at = now + (running[0][0] - progress) / rate() if running else math.inf
        if training_until is not None and training_until <= done_at:
            progress += rate() * (training_until - now) if running else 0.0
            now, training_until = training_until, None
            version += 1
        else:
            progress, now = running[0][0], done_at
            _, _, start_version, tokens = heapq.heappop(running)
            manager.on_rollout_accepted()
            heapq.heappush(ready, (start_version, tokens))
            finished += 1
        try_train()
        admit()
    return steps * cluster.batch / now, expired / max(finished, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpus", type=int, nargs="+", default=[64, 128, 256, 512, 1024])
    parser.add_argument("--bounds", type=int, nargs="+", default=[0, 1, 2, 4, 8])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--slots", type=int, default=16)
    parser.add_argument("--decode-tps", type=float, default=40.0)
    parser.add_argument("--train-tps", type=float, default=2000.0)
    parser.add_argument("--median-tokens", type=float, default=1000.0)
    parser.add_argument("--sigma", type=float, default=1.0)
    parser.add_argument("--max-tokens", type=int, default=16384)
    parser.add_argument("--boost", type=float, default=4.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--plot", type=Path, default=None, help="write the curve to this PNG")
    args = parser.parse_args()
    print(f"{'GPUs':>5} {'bound':>5} {'seq/s':>9} {'vs sync':>8} {'vs ideal':>9} {'expired':>8}")
    curves: dict[int, list[tuple[int, float]]] = {}
    sync_ratios: list[float] = []
    for gpus in args.gpus:
        cluster = Cluster(gpus, args.slots, args.decode_tps, args.train_tps, args.median_tokens, args.sigma,
                          args.max_tokens, boost=args.boost)
        ideal = cluster.ideal(random.Random(args.seed))
        # The synchronous schedule a colocated framework runs: all G GPUs generate a
        # batch, then all G train on it.
        sync, _ = simulate(replace(cluster, colocated=True), 0, args.steps, args.seed)
        sync_ratios.append(sync / ideal)
        print(f"{gpus:5d}  sync {sync:9.1f} {1:7.2f}x {sync / ideal:8.2f}x {0:7.2f}%   (colocated, generate then train)")
        for bound in sorted(args.bounds):
            rate, dropped = simulate(cluster, bound, args.steps, args.seed)
            print(f"{gpus:5d} {bound:5d} {rate:9.1f} {rate / sync:7.2f}x {rate / ideal:8.2f}x {dropped * 100:7.2f}%",
                  flush=True)
            curves.setdefault(gpus, []).append((bound, rate / ideal))
        print(f"{gpus:5d} ideal {ideal:9.1f}           1.00x            (min of generation and training rate)")
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        for gpus, points in curves.items():
            ax.plot([b for b, _ in points], [r for _, r in points], marker="o", label=f"{gpus} GPUs")
        ax.axhline(sum(sync_ratios) / len(sync_ratios), color="gray", linestyle="--", label="synchronous, colocated")
        ax.set_xlabel("max_head_offpolicyness (versions)")
        ax.set_ylabel("throughput / ideal bound")
        ax.set_ylim(0, 1.05)
        ax.grid(alpha=0.3)
        ax.legend()
        ax.set_title("Simulated throughput against the staleness bound")
        fig.tight_layout()
        args.plot.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(args.plot, dpi=110)
        print(f"wrote {args.plot}")


if __name__ == "__main__":
    main()
