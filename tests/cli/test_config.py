import dataclasses
import subprocess
import typing

import pytest

from areal_cli.config import ConfigError, load_config, split_cli_args
from engines.config import leaf_fields
from tests.conftest import REPO, areal_cli, cli_env, schema_leaves
from workflows.config import ExperimentConfig


def run_cli(*args):
    return subprocess.run(areal_cli(*args), capture_output=True, text=True, cwd=REPO, env=cli_env(), timeout=120)


def test_typo_exits_2_naming_key_and_suggestion():
    result = run_cli("train", "config=gsm8k_grpo", "trainer.totl_steps=3")
    assert result.returncode == 2
    assert "trainer.totl_steps" in result.stderr
    assert "total_steps" in result.stderr.split("did you mean", 1)[1]


def test_wrong_type_exits_2():
    result = run_cli("config", "show", "config=gsm8k_grpo", "gconfig.n_samples=abc")
    assert result.returncode == 2
    assert "gconfig.n_samples" in result.stderr


def test_show_prints_resolved_overrides():
    result = run_cli("config", "show", "config=gsm8k_grpo", "actor.optimizer.lr=3e-5", "trainer.total_steps=7")
    assert result.returncode == 0, result.stderr
    assert "lr: 3.0e-05" in result.stdout and "total_steps: 7" in result.stdout


def test_help_lists_commands():
    result = run_cli("--help")
    assert result.returncode == 0
    assert "train" in result.stdout and "config" in result.stdout


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        (["+foo=1"], "'foo'"),
        (["+actor.optimizer.lrr=1"], "did you mean 'lr'"),
        (["dataset.batchsize=3"], "did you mean 'batch_size'"),
        (["seed=notanint"], "seed: Value 'notanint'"),
        (["~trainer.total_steps"], "trainer.total_steps=null"),
    ],
)
def test_bad_overrides_are_refused(overrides, fragment):
    with pytest.raises(ConfigError, match=None) as info:
        load_config("smoke", overrides)
    assert fragment in str(info.value)


def test_typed_result_and_deletion_of_optional():
    cfg = load_config("smoke", ["trainer.total_steps=5", "rollout.max_head_offpolicyness=2"])
    assert isinstance(cfg, ExperimentConfig)
    assert cfg.trainer.total_steps == 5 and cfg.rollout.max_head_offpolicyness == 2


def test_unknown_config_name_suggests():
    with pytest.raises(ConfigError, match="did you mean config=smoke"):
        load_config("smok")


def test_missing_config_word():
    with pytest.raises(ConfigError, match="config=NAME"):
        split_cli_args(["trainer.total_steps=3"])


def test_configuration_reference_lists_every_key():
    """docs/configuration.md documents each key of the schema (and nothing stale)."""
    import re

    documented = set(re.findall(r"^\| `([\w.]+)` \|", (REPO / "docs" / "configuration.md").read_text(), re.M))
    assert documented == {key for key, _ in schema_leaves()}


# The schema's field metadata: help for every key, choices where a key has them.
LEAF_FIELDS = list(leaf_fields(ExperimentConfig))
CHOICE_FIELDS = [(key, f, hint) for key, f, hint in LEAF_FIELDS if "choices" in f.metadata]


def test_every_leaf_key_has_help():
    missing = [key for key, f, _ in LEAF_FIELDS if not str(f.metadata.get("help", "")).strip()]
    assert missing == []


def test_the_enumerated_keys_are_found():
    assert {"model.dtype", "dataset.answer_format", "stats_logger.backends", "metadata_store"} <= {
        key for key, _, _ in CHOICE_FIELDS
    }


@pytest.mark.parametrize("key, f, hint", CHOICE_FIELDS, ids=[key for key, _, _ in CHOICE_FIELDS])
def test_each_default_is_among_its_choices(key, f, hint):
    default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
    choices = f.metadata["choices"]
    if typing.get_origin(hint) is list:
        assert set(default) <= set(choices), (key, default)
    elif default is None:
        assert type(None) in typing.get_args(hint), f"{key} defaults to None but is not Optional"
    else:
        assert default in choices, (key, default)


@pytest.mark.parametrize("key, f, hint", CHOICE_FIELDS, ids=[key for key, _, _ in CHOICE_FIELDS])
def test_a_value_outside_the_metadata_choices_is_refused(key, f, hint):
    listed = typing.get_origin(hint) is list
    with pytest.raises(ConfigError) as info:
        load_config("smoke", [f"{key}=[not_a_choice]" if listed else f"{key}=not_a_choice"], check_paths=False)
    message = str(info.value)
    assert message.startswith(f"{key}=") and "not_a_choice" in message and "\n" not in message, message
    assert ", ".join(f.metadata["choices"]) in message
    assert ("must list distinct" if listed else "must be one of") in message


def test_show_doc_prints_each_key_with_its_value_help_and_choices():
    result = run_cli("config", "show", "--doc", "config=smoke", "gconfig.n_samples=3")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    help_of = {key: f.metadata["help"] for key, f, _ in LEAF_FIELDS}
    at = lines.index("gconfig.n_samples=3")
    assert lines[at + 1].strip() == help_of["gconfig.n_samples"]
    at = lines.index("actor.optimizer.type=adamw")
    assert lines[at + 1].strip() == help_of["actor.optimizer.type"] + " [one of: adamw, sgd]"
    assert {line.split("=", 1)[0] for line in lines if not line.startswith(" ")} == set(help_of)
