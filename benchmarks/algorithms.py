"""RL algorithms compared on one task: the same model, data, seeds and step budget each.

    python benchmarks/algorithms.py                         # arith_grpo, 2 seeds, 30 steps
    python benchmarks/algorithms.py --seeds 1 2 3 --steps 30 --algorithms grpo rloo
    python benchmarks/algorithms.py --summarise-only        # the table of runs already there
    python benchmarks/algorithms.py --smoke --algorithms grpo ppo_critic --seeds 1

Each algorithm is `areal train config=<config>` with its overrides (`ALGORITHMS`), run in
a subprocess per seed into `<run-root>/<algorithm>-s<seed>`, evaluated greedily on the
held-out problems before the first step and at the end. The table (Markdown, for
docs/benchmarks.md) has, per algorithm: held-out greedy accuracy at the start and the
end (mean over seeds, then each seed's), each seed's gain with its paired standard error
(the same problems scored twice: the SE of the per-problem differences,
benchmarks/learning_runs.py), the policy's token entropy over the last 5 steps, wall
time, peak RSS and tokens trained (completion tokens in the loss, summed over steps).
A run directory that already holds its final step is summarised, not run again.

`--smoke` checks the script end to end in about a minute per algorithm: config=smoke
(a tiny random model, GSM8K), 1 step, 4 held-out problems. Its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.learning_runs import greedy_correct, paired_gain  # noqa: E402
from workflows.metrics.stats import read_stats  # noqa: E402

# algorithm -> overrides of the base config. GRPO is the config as it is.
ALGORITHMS: dict[str, list[str]] = {
    "grpo": [],
    # Liu et al. 2025: no std normalisation, a constant loss denominator.
    "dr_grpo": ["actor.group_adv_std_norm=false", "actor.loss_normalization=constant"],
    # Yu et al. 2025: clip-higher (0.2 / 0.28) and dynamic sampling.
    "dapo": ["actor.eps_clip_higher=0.28", "actor.dynamic_sampling=true"],
    # Zheng et al. 2025: the sequence ratio with the paper's clip range.
    "gspo": ["actor.importance_level=sequence", "actor.eps_clip=3e-4", "actor.eps_clip_higher=4e-4"],
    "rloo": ["actor.adv_estimator=rloo"],
    "reinforce_plus_plus": ["actor.adv_estimator=reinforce_plus_plus"],
    "ppo_critic": ["actor.adv_estimator=gae"],
}


def run_dir_of(root: Path, algorithm: str, seed: int) -> Path:
    return root / f"{algorithm}-s{seed}"


def train(config: str, algorithm: str, seed: int, steps: int, root: Path, extra: list[str]) -> float:
    """Run one (algorithm, seed) to `steps` unless its directory already got there; returns
    the wall time in seconds (0 when it was already done)."""
    run_dir = run_dir_of(root, algorithm, seed)
    stats = run_dir / "stats.jsonl"
    if stats.exists() and any(r["step"] == steps for r in read_stats(stats)):
        return 0.0
    cmd = [sys.executable, "-m", "areal_cli.main", "train", f"config={config}", f"run_dir={run_dir}", f"seed={seed}",
           f"trainer.total_steps={steps}", f"trainer.eval_freq_steps={steps}", f"trainer.save_freq_steps={steps}",
           *extra, *ALGORITHMS[algorithm]]
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    start = time.perf_counter()
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{algorithm} seed {seed} failed ({' '.join(cmd)}):\n{result.stderr[-3000:]}")
    return time.perf_counter() - start


def summarise_run(run_dir: Path, wall_s: float = 0.0) -> dict:
    """One run's figures for the table (see the module docstring)."""
    records = read_stats(run_dir / "stats.jsonl")
    steps = [r for r in records if r["step"] > 0]
    evals = {r["step"]: 100 * r["eval_accuracy"] for r in records if r.get("eval_accuracy") is not None}
    first, last = min(evals), max(evals)
    gain, se = paired_gain(greedy_correct(run_dir, first), greedy_correct(run_dir, last))
    late = [r["entropy"] for r in steps[-5:] if r.get("entropy") is not None]
    return {
        "start": evals[first],
        "end": evals[last],
        "gain": gain,
        "se": se,
        "entropy_end": statistics.fmean(late) if late else float("nan"),
        # A run summarised from its files: the loop's own step times (no start-up).
        "minutes": (wall_s or sum(r.get("step_time_s", 0.0) for r in steps)) / 60,
        "peak_rss_gb": max((r.get("peak_rss_gb") or 0.0) for r in steps) if steps else float("nan"),
        "tokens": sum(int(r.get("num_loss_tokens", 0)) for r in steps),
    }


def _each(values: list[float], fmt: str) -> str:
    return ", ".join(format(v, fmt) for v in values)


def table(results: dict[str, list[dict]]) -> str:
    """Markdown, one row per algorithm: means over its seeds, and each seed's value."""
    head = ["algorithm", "seeds", "start acc % (mean; each)", "end acc % (mean; each)",
            "gain, points (paired SE), each seed", "entropy, last 5 steps", "wall min", "peak RSS GB", "tokens trained"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, runs in results.items():
        if not runs:
            continue
        def mean(key: str, runs: list[dict] = runs) -> float:
            return statistics.fmean(r[key] for r in runs)

        cells = [
            name,
            str(len(runs)),
            f"{mean('start'):.1f}; {_each([r['start'] for r in runs], '.1f')}",
            f"{mean('end'):.1f}; {_each([r['end'] for r in runs], '.1f')}",
            ", ".join(f"{r['gain']:+.1f} ({r['se']:.1f})" for r in runs),
            f"{mean('entropy_end'):.3f}",
            f"{mean('minutes'):.1f}",
            f"{max(r['peak_rss_gb'] for r in runs):.2f}",
            f"{round(mean('tokens')):,}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="arith_grpo")
    parser.add_argument("--algorithms", nargs="+", default=list(ALGORITHMS), choices=list(ALGORITHMS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--run-root", type=Path, default=REPO / "runs" / "algorithms")
    parser.add_argument("--summarise-only", action="store_true", help="only tabulate the runs already there")
    parser.add_argument("--smoke", action="store_true", help="config=smoke, 1 step: checks the script, not the methods")
    parser.add_argument("overrides", nargs="*", help="more key=value overrides for every run")
    args = parser.parse_args()
    extra = list(args.overrides)
    if args.smoke:
        args.config, args.steps = "smoke", 1
        extra = [f"dataset.path={REPO / 'workflows' / 'data' / 'gsm8k'}", *extra]
    results: dict[str, list[dict]] = {}
    for name in args.algorithms:
        results[name] = []
        for seed in args.seeds:
            run_dir = run_dir_of(args.run_root, name, seed)
            wall = 0.0 if args.summarise_only else train(args.config, name, seed, args.steps, args.run_root, extra)
            found = (run_dir / "stats.jsonl").exists()
            if found:
                results[name].append(summarise_run(run_dir, wall))
            print(f"{name} seed {seed}: {run_dir if found else 'no run'}", file=sys.stderr)
    print(f"config={args.config}, {args.steps} steps, seeds {' '.join(map(str, args.seeds))}\n")
    print(table(results))


if __name__ == "__main__":
    main()
