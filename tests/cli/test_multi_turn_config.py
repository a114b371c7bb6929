"""The multi-turn keys: the shipped configs load, every bad value is refused by name
before anything heavy starts, and the step record carries the per-turn shares."""

from __future__ import annotations

import pytest
import torch

from areal_cli.config import ConfigError, load_config
from workflows.metrics.plots import PANELS
from workflows.rollout.multiturn import EPISODE_KEYS
from workflows.training.trainer import batch_stats


@pytest.mark.parametrize("name", ["arith_multiturn", "tool_use_qwen"])
def test_the_shipped_multi_turn_configs_load(name):
    cfg = load_config(name, check_paths=False)
    assert cfg.rollout.workflow == "multi_turn" and cfg.max_completion_tokens() == cfg.multi_turn.max_total_tokens


def test_arith_multiturn_is_arith_grpo_with_two_turns():
    multi, single = load_config("arith_multiturn", check_paths=False), load_config("arith_grpo", check_paths=False)
    assert multi.dataset == single.dataset and multi.model == single.model and multi.reward == single.reward
    assert multi.multi_turn.environment == "retry" and multi.multi_turn.max_turns == 2


@pytest.mark.parametrize("override, key", [
    ("multi_turn.max_turns=0", "multi_turn.max_turns"),
    ("multi_turn.turn_discount=1.5", "multi_turn.turn_discount"),
    ("multi_turn.max_total_tokens=10", "multi_turn.max_total_tokens"),
    ("multi_turn.environment=shell", "multi_turn.environment"),
    ("multi_turn.sandbox.memory_mb=8", "multi_turn.sandbox.memory_mb"),
    ("multi_turn.sandbox.wall_seconds=0", "multi_turn.sandbox.wall_seconds"),
    ("multi_turn.tools=[os.system]", "multi_turn.tools"),
    ("multi_turn.environment=tools", "multi_turn.tools"),
    ("multi_turn.tools=[no_such_module_xyz:fn]", "multi_turn.tools"),
    ("+rollout.workflow_args.x=1", "rollout.workflow_args"),
    ("actor.max_tokens_per_mb=200", "actor.max_tokens_per_mb"),
])
def test_bad_multi_turn_values_are_refused_by_name(override, key):
    extra = ["multi_turn.environment=tools"] if "tools=[" in override else []
    # Only importing the tools needs the checks of this machine's files and code.
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config("arith_multiturn", [override, *extra], check_paths="no_such_module" in override)


def test_the_step_record_and_plot_carry_the_per_turn_shares():
    sequences = {
        "rewards": torch.tensor([1.0, 0.9, 0.0, 1.0]), "lengths": torch.tensor([5.0, 9.0, 9.0, 4.0]),
        "signal": torch.ones(4, dtype=torch.bool), "epoch": torch.zeros(4, dtype=torch.long),
        "prompt_id": torch.tensor([0, 0, 1, 1]),
        "num_turns": torch.tensor([1, 2, 2, 1]), "solved_turn": torch.tensor([1, 2, 0, 1]),
        "tool_errors": torch.tensor([0, 1, 2, 0]), "over_budget": torch.tensor([0, 0, 1, 0]),
    }
    stats = batch_stats(sequences)
    assert stats["solved_turn_1"] == 0.5 and stats["solved_turn_2"] == 0.25 and stats["turns_mean"] == 1.5
    assert stats["tool_errors"] == 3 and stats["over_budget"] == 1
    assert stats["accuracy"] == 0.75  # solved at any turn, though the turn-2 reward is 0.9
    assert "solved_turn_1" not in batch_stats({k: v for k, v in sequences.items() if k not in EPISODE_KEYS})
    assert {"solved_turn_1", "solved_turn_2"} <= {key for key, _ in PANELS}
