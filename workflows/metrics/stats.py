"""Per-step statistics: the console line, `stats.jsonl`, and any experiment trackers.

`stats_logger.backends` chooses where each step's record goes, several at once:
`console` (one line per step), `jsonl` (one JSON object per line in `stats.jsonl`,
written and flushed before the next step starts, so a crashed run keeps every finished
step's record; crash recovery rolls it back), `tensorboard` and `wandb`
(workflows/metrics/trackers.py). Only rank 0 of a data-parallel job writes; other ranks get a
logger that does nothing.
"""

from __future__ import annotations

import json
import math
import resource
import sys
from pathlib import Path
from typing import Optional, Sequence

from rich.console import Console

# (key, label, format) of the fields printed on the console line of each step.
CONSOLE_FIELDS = (
    ("reward_mean", "reward", ".3f"),
    ("accuracy", "acc", ".3f"),
    ("response_length_mean", "len", ".0f"),
    ("eval_accuracy", "eval acc", ".3f"),
    ("signal_share", "signal", ".2f"),
    ("solved_turn_1", "solved@1", ".2f"),
    ("solved_turn_2", "solved@2", ".2f"),
    ("entropy", "ent", ".3f"),
    ("loss", "loss", ".4g"),
    ("grad_norm", "gnorm", ".3g"),
    ("lr", "lr", ".2e"),
    ("gen_tokens_per_s", "gen tok/s", ".0f"),
    ("staleness_max", "stale", "d"),
    ("step_time_s", "time s", ".1f"),
    ("peak_rss_gb", "rss GB", ".2f"),
)


def peak_rss_gb() -> float:
    """This process's peak resident set size so far, in GB (10^9 bytes); child processes
    (reward workers) are not included."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return peak * (1 if sys.platform == "darwin" else 1024) / 1e9


class StatsLogger:
    """Each step's record to the console line, `path` (JSONL) and `trackers`.

    Args:
        path: the JSONL file, or None for no file (`stats_logger.backends` without jsonl).
        print_every: steps between console lines (the last step is always printed);
            0 prints none (no `console` backend). Messages (`info`) are always printed.
        trackers: objects with `log(record, step)` and `close()` (workflows/metrics/trackers.py).
    """

    def __init__(self, path: Optional[Path], *, console: Optional[Console] = None, print_every: int = 1,
                 trackers: Sequence = ()):
        self.path = Path(path) if path else None
        self.console = console or Console(soft_wrap=True)
        self.print_every = print_every
        self.trackers = list(trackers)
        if self.path:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def log(self, record: dict, *, total_steps: Optional[int] = None) -> None:
        clean = {k: _jsonable(v) for k, v in record.items()}
        if self.path:
            with self.path.open("a") as f:
                f.write(json.dumps(clean) + "\n")
        step = clean.get("step", 0)
        for tracker in self.trackers:
            tracker.log(clean, step)
        if self.print_every > 0 and (step % self.print_every == 0 or step == total_steps):
            self.console.print(format_line(clean, total_steps), highlight=False)

    def info(self, message: str) -> None:
        self.console.print(message, highlight=False)

    def close(self) -> None:
        """Flush and close every tracker (each even if an earlier one fails)."""
        trackers, self.trackers = self.trackers, []
        errors = []
        for tracker in trackers:
            try:
                tracker.close()
            except Exception as exc:  # noqa: BLE001 - the next tracker still closes
                errors.append(exc)
        if errors:
            raise errors[0]


class NullStatsLogger(StatsLogger):
    """For ranks other than 0: accepts everything, writes nothing."""

    def __init__(self) -> None:
        self.path = None
        self.trackers = []

    def log(self, record: dict, *, total_steps: Optional[int] = None) -> None:
        pass

    def info(self, message: str) -> None:
        pass


def format_line(record: dict, total_steps: Optional[int]) -> str:
    head = f"step {record.get('step')}" + (f"/{total_steps}" if total_steps else "")
    parts = [head]
    for key, label, fmt in CONSOLE_FIELDS:
        if record.get(key) is not None:
            parts.append(f"{label} {format(record[key], fmt)}")
    return " | ".join(parts)


def _jsonable(value):
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def read_stats(path: Path) -> list[dict]:
    """All records of a stats.jsonl file, in step order."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
