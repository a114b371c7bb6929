"""Experiment trackers: TensorBoard and Weights & Biases, beside the console and stats.jsonl.

`stats_logger.backends` picks any of `console`, `jsonl`, `tensorboard`, `wandb`; each
step's record goes to all of them (workflows/metrics/stats.py fans it out). Both trackers get the
record's numeric values as scalars at the record's `step`:

- TensorBoard: torch's `SummaryWriter`, event files in `<run_dir>/tensorboard/`
  (`tensorboard --logdir <run_dir>/tensorboard`).
- W&B: `wandb.init(mode=stats_logger.wandb_mode)` with the run directory as its `dir`.
  `offline` (the default) needs no network and no account: the run is written under
  `<run_dir>/wandb/offline-run-*`, and `wandb sync <that directory>` uploads it later.
  The run id is kept in `<run_dir>/wandb_run_id`, so a resumed run continues the same W&B
  run. `WANDB_API_KEY` is read by wandb itself from the environment; it is never put in
  the config, a command line or a log line.
"""

from __future__ import annotations

import math
import uuid
from pathlib import Path
from typing import Any, Optional

# Record keys that are lists or identifiers, not curves.
NOT_SCALARS = {"step", "prompt_ids", "prompt_epochs"}


def scalars(record: dict) -> dict[str, float]:
    """The record's finite numbers (bools excluded), as floats."""
    out = {}
    for key, value in record.items():
        if key in NOT_SCALARS or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if math.isfinite(value):
            out[key] = float(value)
    return out


class TensorBoardTracker:
    """Scalars to TensorBoard event files under `log_dir`.

    Raises:
        ImportError: tensorboard is not installed (`pip install tensorboard`).
    """

    def __init__(self, log_dir: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(log_dir))

    def log(self, record: dict, step: int) -> None:
        for key, value in scalars(record).items():
            self.writer.add_scalar(key, value, global_step=step)
        self.writer.flush()  # a crashed run keeps every finished step

    def close(self) -> None:
        self.writer.close()


class WandbTracker:
    """Scalars to a Weights & Biases run (see the module docstring).

    Args:
        run_dir: the run's directory (W&B writes `<run_dir>/wandb/`).
        project, name: the W&B project and run name.
        mode: `offline`, `online` or `disabled`.
        config: the resolved config as a plain dict (holds no secrets).

    Raises:
        ImportError: wandb is not installed (`pip install wandb`).
    """

    def __init__(self, run_dir: Path, *, project: str, name: str, mode: str, config: dict[str, Any]) -> None:
        import wandb

        id_file = Path(run_dir) / "wandb_run_id"
        run_id: Optional[str] = id_file.read_text().strip() if id_file.exists() else None
        if run_id is None:
            run_id = uuid.uuid4().hex[:12]
            id_file.write_text(run_id + "\n")
        self.run = wandb.init(project=project, name=name, id=run_id, resume="allow", dir=str(run_dir), mode=mode,
                              config=config, settings=wandb.Settings(console="off", silent=True))

    def log(self, record: dict, step: int) -> None:
        self.run.log(scalars(record), step=step)

    def close(self) -> None:
        self.run.finish()
