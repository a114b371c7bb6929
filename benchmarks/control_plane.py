"""The control plane's cost per sample in each deployment mode, beside the smoke config's step time.

    make bench-control                          # or:
    .venv/bin/python benchmarks/control_plane.py [--steps 3] [--rounds 300]

One run: first `areal train config=smoke` (in this process, local_colocated) for
`--steps` steps gives the median step time and the prompt groups (samples) per step.
Then, for `--rounds` simulated steps of that many samples, each of the smoke run's
trajectory shape, it times exactly what the control plane does per step in each mode:

- local_colocated: `ControlPlane.record` + `acknowledge` on the no-op store;
- dataflow_colocated: the same on SQLite (commit, lease, ack: one transaction each);
- disaggregated: a worker's `write_sample` (safetensors, fsync, rename) and commit with
  its incarnation, then the trainer's lease, `read_sample`, ack, on SQLite.

It prints microseconds per sample and the cost per step as a fraction of the step time.
Targets: local_colocated under 1 %, SQLite (dataflow_colocated) under 5 %.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from areal_cli.config import load_config  # noqa: E402
from workflows.control_plane.modes import resolve_control_plane, sample_ref, samples_dir  # noqa: E402
from workflows.control_plane.samples import read_sample, write_sample  # noqa: E402
from workflows.metrics.stats import read_stats  # noqa: E402
from workflows.training.trainer import run_training  # noqa: E402


def smoke_step_time(steps: int, run_dir: Path) -> tuple[float, int, int, int]:
    """Median step time (s), samples (prompt groups) per step, sequence width and group size of the smoke config."""
    cfg = load_config("smoke", [f"trainer.total_steps={steps}", f"run_dir={run_dir}"])
    run_training(cfg)
    records = read_stats(run_dir / "stats.jsonl")
    width = cfg.dataset.max_prompt_length // 4 + cfg.gconfig.max_new_tokens  # a typical GSM8K prompt + completion
    # The first step includes start-up work (threads, allocator warm-up); it is left out.
    times = [r["step_time_s"] for r in records[1:]] or [records[0]["step_time_s"]]
    return statistics.median(times), cfg.dataset.batch_size, width, cfg.gconfig.n_samples


def trajectory(prompt_id: int, n: int, width: int, version: int) -> dict[str, torch.Tensor]:
    versions = torch.full((n, width), -1)
    versions[:, width // 2 :] = version
    return {
        "input_ids": torch.randint(0, 49152, (n, width)), "attention_mask": torch.ones(n, width, dtype=torch.long),
        "loss_mask": (versions >= 0).long(), "logprobs": torch.randn(n, width), "versions": versions,
        "rewards": torch.rand(n), "prompt_id": torch.full((n,), prompt_id), "epoch": torch.zeros(n, dtype=torch.long),
    }


def colocated(mode: str, root: Path, rounds: int, per_step: int, n: int, width: int) -> float:
    """Seconds of control-plane work per sample in a colocated mode."""
    control = resolve_control_plane(mode, root / mode)
    batches = [[trajectory(s * per_step + i, n, width, s) for i in range(per_step)] for s in range(rounds)]
    start = time.perf_counter()
    for step, batch in enumerate(batches, 1):
        control.record(batch)
        control.acknowledge(step)
    seconds = time.perf_counter() - start
    control.close()
    return seconds / (rounds * per_step)


def disaggregated(root: Path, rounds: int, per_step: int, n: int, width: int) -> float:
    """Seconds per sample for the worker's write + commit and the trainer's lease + read + ack."""
    run_dir = root / "disaggregated"
    control = resolve_control_plane("disaggregated", run_dir)
    incarnation = control.store.begin_incarnation()
    batches = [[trajectory(s * per_step + i, n, width, s) for i in range(per_step)] for s in range(rounds)]
    start = time.perf_counter()
    for step, batch in enumerate(batches, 1):
        refs = [replace(sample_ref(t), path=str(write_sample(samples_dir(run_dir), sample_ref(t).sample_id, t))) for t in batch]
        control.store.commit(refs, incarnation=incarnation)
        leased = control.store.lease(per_step)
        control.leased(leased)
        for ref in leased:
            read_sample(ref.path)
        control.acknowledge(step)
    seconds = time.perf_counter() - start
    assert control.store.status().acked == rounds * per_step
    control.close()
    return seconds / (rounds * per_step)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3, help="smoke steps for the step time")
    parser.add_argument("--rounds", type=int, default=300, help="simulated steps per mode")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        step_s, per_step, width, n = smoke_step_time(args.steps, root / "smoke")
        costs = {
            "local_colocated": colocated("local_colocated", root, args.rounds, per_step, n, width),
            "dataflow_colocated": colocated("dataflow_colocated", root, args.rounds, per_step, n, width),
            "disaggregated": disaggregated(root, args.rounds, per_step, n, width),
        }
    print(f"\nsmoke config: median step {step_s:.3f} s, {per_step} samples (prompt groups of {n}) per step, "
          f"{width} tokens per sequence")
    print(f"{'mode':<20} {'us/sample':>10} {'per step':>10} {'of step time':>13}")
    for mode, seconds in costs.items():
        fraction = seconds * per_step / step_s
        print(f"{mode:<20} {seconds * 1e6:10.1f} {seconds * per_step * 1e3:8.3f}ms {fraction * 100:12.3f}%")
    local, sqlite = (costs[m] * per_step / step_s for m in ("local_colocated", "dataflow_colocated"))
    print(f"targets: local_colocated < 1% -> {'PASS' if local < 0.01 else 'FAIL'}; "
          f"SQLite < 5% -> {'PASS' if sqlite < 0.05 else 'FAIL'}")


if __name__ == "__main__":
    main()
