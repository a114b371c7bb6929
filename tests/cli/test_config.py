import subprocess

import pytest

from areal_cli.config import ConfigError, load_config, split_cli_args
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
