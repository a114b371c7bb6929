"""Summarise learning runs of one config over seeds: a Markdown table for docs/benchmarks.md.

    python benchmarks/learning_runs.py runs/arith-s1 runs/arith-s2 runs/arith-s3

For each run directory (of `areal train`): its seed, held-out greedy accuracy at every
evaluation, the gain of the last evaluation over step 0 with its paired standard error
(the same problems scored twice, so the SE is of the per-problem differences), how far
the end lies below the run's best evaluation, the policy's token entropy early and late,
and the share of steps in which no group carried signal (nothing trained). The last line
names the worst run: a config's result is its worst seed, never its best.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from workflows.metrics.stats import read_stats  # noqa: E402


def greedy_correct(run_dir: Path, step: int) -> dict[int, bool]:
    """Problem id -> greedy answer right, from `<run_dir>/eval/step_<step>.json`."""
    report = json.loads((run_dir / "eval" / f"step_{step}.json").read_text())
    return {p["id"]: bool(p["greedy_correct"]) for p in report["prompts"]}


def paired_gain(before: dict[int, bool], after: dict[int, bool]) -> tuple[float, float]:
    """(gain, paired standard error), in accuracy points (percent), over the shared problems."""
    diffs = [float(after[i]) - float(before[i]) for i in before if i in after]
    if len(diffs) < 2:
        return float("nan"), float("nan")
    return 100 * statistics.fmean(diffs), 100 * statistics.stdev(diffs) / math.sqrt(len(diffs))


def summarise(run_dir: Path) -> dict:
    records = read_stats(run_dir / "stats.jsonl")
    seed = yaml.safe_load((run_dir / "config.yaml").read_text()).get("seed")
    evals = {r["step"]: 100 * r["eval_accuracy"] for r in records if r.get("eval_accuracy") is not None}
    steps = [r for r in records if r["step"] > 0]
    last = max(evals)
    gain, se = paired_gain(greedy_correct(run_dir, 0), greedy_correct(run_dir, last))
    entropies = [r.get("entropy") for r in steps]
    early = [e for e in entropies[:5] if e is not None]
    late = [e for e in entropies[-5:] if e is not None]
    return {
        "run": run_dir.name,
        "seed": seed,
        "evals": evals,
        "gain": gain,
        "se": se,
        "below_best": max(evals.values()) - evals[last],
        "entropy_early": statistics.fmean(early) if early else float("nan"),
        "entropy_late": statistics.fmean(late) if late else float("nan"),
        "no_signal_share": sum(1 for r in steps if not r.get("signal_share")) / max(len(steps), 1),
        "minutes": sum(r.get("step_time_s", 0) for r in steps) / 60,
    }


def table(rows: list[dict]) -> str:
    eval_steps = sorted({s for r in rows for s in r["evals"]})
    head = ["run", "seed", *(f"step {s}" for s in eval_steps), "gain (paired SE)", "end below best",
            "entropy, steps 1-5 / last 5", "steps without signal", "train loop min"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["run"], str(r["seed"]), *(f"{r['evals'][s]:.1f} %" if s in r["evals"] else "-" for s in eval_steps),
                 f"{r['gain']:+.1f} ({r['se']:.1f}): {r['gain'] / r['se']:.1f} SE", f"{r['below_best']:.1f}",
                 f"{r['entropy_early']:.3f} / {r['entropy_late']:.3f}", f"{100 * r['no_signal_share']:.0f} %",
                 f"{r['minutes']:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    worst = min(rows, key=lambda r: r["gain"])
    lines.append("")
    lines.append(f"Worst run: {worst['run']} (seed {worst['seed']}), {worst['gain']:+.1f} points "
                 f"({worst['gain'] / worst['se']:.1f} paired SE).")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dirs", nargs="+", type=Path)
    args = parser.parse_args()
    print(table([summarise(Path(d)) for d in args.run_dirs]))


if __name__ == "__main__":
    main()
