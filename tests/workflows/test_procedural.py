"""Procedural tasks from reasoning-gym: seeded splits of reasoning-gym's own entries, a
held-out split that is a different draw, and clear errors for an unknown task."""

import pytest

from workflows.config import DatasetConfig
from workflows.data.dataset import load_prompt_dataset, procedural_split

pytest.importorskip("reasoning_gym")

CHAIN_SUM = DatasetConfig(path="reasoning_gym:chain_sum", task_args={"min_terms": 2, "max_terms": 2, "max_digits": 2},
                          task_size=200)


def test_splits_are_seeded_and_different_draws():
    train, again, test = (procedural_split(CHAIN_SUM, s) for s in ("train", "train", "test"))
    questions = [[row["question"] for row in split] for split in (train, again, test)]
    assert questions[0] == questions[1]  # the same seed, the same problems
    assert questions[0] != questions[2]
    row = train[0]
    assert row["question"].endswith("=") and row["metadata"]["source_dataset"] == "chain_sum"
    a, b = row["question"].rsplit(":", 1)[1].strip(" =").split(" + ") if " + " in row["question"] else (None, None)
    if a is not None:
        assert int(row["answer"]) == int(a) + int(b)


def test_procedural_rows_reach_the_prompt_pipeline(tokenizer):
    data = load_prompt_dataset(CHAIN_SUM, tokenizer, split="test")
    assert len(data) == 200 and data.num_malformed == 0
    assert data.rows[0]["answer"].lstrip("-").isdigit()


def test_unknown_task_is_refused_in_one_line():
    from areal_cli.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="reasoning-gym has no task 'chain_sums'; did you mean chain_sum"):
        load_config("smoke", ["dataset.path=reasoning_gym:chain_sums"])
