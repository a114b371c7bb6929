"""Accepted trajectories waiting for the trainer: handed out oldest policy version first,
dropped once they are staler than the bound, and optionally dumped as JSON lines when
taken.

Why the rollout controller drops any: its admission rule bounds staleness only when
trajectories finish in the order they started; with long-tailed generation times a slow
trajectory can outlive any number of versions. So every accepted trajectory whose oldest
generated token is more than `max_head_offpolicyness` versions behind the current one is
expired before a hand-out, which makes the bound hard. To waste as little generation as
possible, ready trajectories are handed out oldest version first.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from workflows.api import Trajectory
from workflows.rollout.batch import oldest_version

logger = logging.getLogger(__name__)


@dataclass
class _Ready:
    trajectory: Trajectory
    oldest_version: int | None  # cached: checked against the version on every wait


class ReadyTrajectories:
    """Accepted trajectories by task id, in completion order. Not thread-safe: the rollout
    controller touches it from the consumer (trainer) thread only."""

    def __init__(self) -> None:
        self._ready: dict[int, _Ready] = {}

    def __len__(self) -> int:
        return len(self._ready)

    def __contains__(self, task_id: object) -> bool:
        return task_id in self._ready

    def add(self, task_id: int, trajectory: Trajectory) -> None:
        """Keep `trajectory` until it is taken or expires. Without a `versions` tensor
        (the policy version of each token, -1 for prompt and padding) it never expires."""
        versions = trajectory.get("versions")
        oldest = oldest_version(versions) if isinstance(versions, torch.Tensor) else None
        self._ready[task_id] = _Ready(trajectory, oldest)

    def oldest_first(self, count: int) -> list[int]:
        """The task ids of the `count` trajectories (fewer if fewer are ready) whose oldest
        generated token is oldest; those without versions last, ties in completion order."""

        # Earliest deadline first: a trajectory expires `max_head_offpolicyness` versions
        # after its oldest token, so taking the oldest first minimises expiries (EDF is
        # optimal for meeting deadlines). In completion order a straggler would queue
        # behind a full staleness window of fresh trajectories and expire there.
        def deadline(item: tuple[int, _Ready]) -> float:
            oldest = item[1].oldest_version
            return float("inf") if oldest is None else oldest

        return [task_id for task_id, _ in sorted(self._ready.items(), key=deadline)[:count]]

    def expire(self, version: int, max_head_offpolicyness: int) -> list[int]:
        """Drop (and log) every trajectory with a generated token more than
        `max_head_offpolicyness` policy versions behind `version`; returns the task ids
        of the dropped ones, in completion order."""
        bound = version - max_head_offpolicyness
        expired = []
        for task_id, ready in list(self._ready.items()):
            if ready.oldest_version is not None and ready.oldest_version < bound:
                del self._ready[task_id]
                expired.append(task_id)
                logger.info(
                    "dropped rollout %d: oldest token from version %d, trainer at %d (max_head_offpolicyness=%d)",
                    task_id,
                    ready.oldest_version,
                    version,
                    max_head_offpolicyness,
                )
        return expired

    def take(self, task_ids: list[int]) -> list[Trajectory]:
        """Remove and return the trajectories of `task_ids`, in that order.

        Raises:
            KeyError: a task id that is not ready.
        """
        return [self._ready.pop(task_id).trajectory for task_id in task_ids]


def dump_trajectories(path: Path, version: int, task_ids: list[int], trajectories: list[Trajectory]) -> None:
    """Append one JSON line per sample to `path`: `{"version", "task_id", **sample_records}`."""
    with open(path, "a", encoding="utf-8") as f:
        for task_id, trajectory in zip(task_ids, trajectories):
            for record in sample_records(trajectory):
                f.write(json.dumps({"version": version, "task_id": task_id, **record}) + "\n")


def sample_records(trajectory: Trajectory) -> Iterator[dict]:
    """One JSON-ready dict per sample: token ids (padding stripped), versions, loss mask, reward."""
    input_ids = trajectory["input_ids"]
    mask = trajectory.get("attention_mask")
    for i in range(input_ids.shape[0]):
        keep = mask[i].bool() if mask is not None else torch.ones_like(input_ids[i], dtype=torch.bool)
        record: dict[str, Any] = {"input_ids": input_ids[i][keep].tolist()}
        for key in ("versions", "loss_mask"):
            if key in trajectory:
                record[key] = trajectory[key][i][keep].tolist()
        if "rewards" in trajectory:
            record["reward"] = float(trajectory["rewards"][i])
        yield record
