"""Training curves of one or more runs, drawn from their `stats.jsonl` with matplotlib.

    areal plot runs/gsm8k-grpo/trial0 [runs/other/trial0 ...] [--out curves.png]

One panel per quantity (`PANELS`), step on the x axis, one line per run (labelled by
its directory). A quantity no run logged leaves its panel saying so; steps where a run
logged nothing for it (evaluation every few steps) are skipped, not drawn as zero.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional, Sequence

from workflows.metrics.stats import read_stats

# (stats key, panel title)
PANELS = (
    ("reward_mean", "reward (mean)"),
    ("accuracy", "training accuracy"),
    ("eval_accuracy", "held-out accuracy"),
    ("entropy", "policy entropy (nats/token)"),
    ("signal_share", "groups with signal (share)"),
    ("solved_turn_1", "episodes solved at turn 1 (share)"),
    ("solved_turn_2", "episodes solved at turn 2 (share)"),
    ("loss", "loss"),
    ("response_length_mean", "response length (tokens)"),
    ("staleness_max", "staleness (max versions behind)"),
    ("step_time_s", "step time (s)"),
)


def curve(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of `key`, without the steps where it is missing or not finite."""
    steps, values = [], []
    for record in records:
        value = record.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            steps.append(int(record["step"]))
            values.append(float(value))
    return steps, values


def run_label(run_dir: Path, others: Sequence[Path]) -> str:
    """The shortest tail of the run's path that tells it apart from the others."""
    parts = Path(run_dir).resolve().parts
    for n in range(1, len(parts) + 1):
        tail = "/".join(parts[-n:])
        if all("/".join(Path(o).resolve().parts[-n:]) != tail for o in others if Path(o) != Path(run_dir)):
            return tail
    return str(run_dir)


def plot_runs(run_dirs: Sequence[Path], out: Path, *, title: Optional[str] = None) -> Path:
    """Write a PNG of every panel for `run_dirs` to `out`; returns `out`.

    Raises:
        FileNotFoundError: a run directory without `stats.jsonl` (names it).
    """
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    runs = []
    for run_dir in run_dirs:
        stats = Path(run_dir) / "stats.jsonl"
        if not stats.is_file():
            raise FileNotFoundError(f"{run_dir} has no stats.jsonl; pass run directories of `areal train`")
        runs.append((run_label(Path(run_dir), run_dirs), read_stats(stats)))
    cols = 3
    rows = math.ceil(len(PANELS) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    for ax, (key, panel) in zip(axes.flat, PANELS):
        drawn = False
        for label, records in runs:
            steps, values = curve(records, key)
            if steps:
                ax.plot(steps, values, marker="o" if len(steps) < 30 else None, markersize=3, label=label)
                drawn = True
        ax.set_title(panel, fontsize=10)
        ax.set_xlabel("step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if not drawn:
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes, color="gray")
    for ax in list(axes.flat)[len(PANELS):]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    if not handles:
        for ax in axes.flat:
            handles, labels = ax.get_legend_handles_labels()
            if handles:
                break
    # Above the panels, which fill the grid.
    top = 1.0
    if handles:
        fig.legend(handles, labels, loc="upper center", ncol=min(len(handles), 4), fontsize=9)
        top -= 0.05
    if title:
        fig.suptitle(title, y=top)
        top -= 0.04
    fig.tight_layout(rect=(0, 0, 1, top))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
