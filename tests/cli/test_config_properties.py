"""Property-based: any words a user may type give exit 0 or a one-line exit 2, never a
traceback, and a config the CLI accepts is one the engines accept.

Overrides are drawn from the schema's own keys (valid and invalid values) plus malformed
words, and run through the real `areal` entrypoint in-process. Only `run_training` is
replaced, by a stub that receives the validated config and builds what the engines build
from it without a model (the factories, the staleness bound, the micro-batch budget).
"""

import dataclasses

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from areal_cli.main import app
from tests.conftest import schema_leaves
from workflows.config import ExperimentConfig

LEAVES = dict(schema_leaves())
# Keys whose valid values would make the stub touch the network or the file system.
PATH_KEYS = {"model.path", "dataset.path", "run_dir", "run_root", "cache_dir"}

# Mostly small values around the boundaries the rules draw (0, 1, the unit interval).
numbers = st.one_of(
    st.integers(-2, 8).map(str),
    st.sampled_from(["0.0", "0.5", "1.0", "1.5", "-0.5", "1e-6", "4096", "nan", "inf", "-inf", "null"]),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
)
junk = st.one_of(
    st.sampled_from(["", "abc", "[1,2]", "{a: 1}", "${oc.env:NOPE}", "'quoted'", "=", "~", " "]),
    st.text(alphabet="ab01.=-+~[]{}$:,' \"", max_size=8),
)
enum_values = st.sampled_from(
    ["adamw", "sgd", "adamax", "constant", "linear", "cosine", "warmup", "k1", "k2", "k3", "k4",
     "float32", "bfloat16", "float16", "float8", "sdpa", "eager", "fast"]
)


def value_for(annotation) -> st.SearchStrategy[str]:
    text = str(annotation)
    if "bool" in text:
        return st.one_of(st.sampled_from(["true", "false"]), junk)
    if "int" in text or "float" in text:
        if "list" in text:
            return st.one_of(st.lists(st.integers(-3, 5), max_size=3).map(lambda v: str(v).replace(" ", "")), junk)
        return numbers | junk  # `|` keeps numbers first, so shrinking prefers them
    if "dict" in text:
        return st.one_of(st.just("{}"), junk)
    return enum_values | st.text(alphabet="abc_-", min_size=1, max_size=6) | junk


@st.composite
def override(draw) -> str:
    kind = draw(st.sampled_from(["set"] * 12 + ["add", "delete", "typo", "junk"]))
    key = draw(st.sampled_from(sorted(k for k in LEAVES if k not in PATH_KEYS)))
    if kind == "junk":
        return draw(st.text(alphabet="abc.=+~[]{} $:", min_size=0, max_size=12))
    if kind == "delete":
        return f"~{key}"
    if kind == "typo":
        key = key + draw(st.sampled_from(["x", "_", "s"]))
    value = draw(value_for(LEAVES[key.rstrip("x_s")] if kind == "typo" and key.rstrip("x_s") in LEAVES else LEAVES.get(key, str)))
    return ("+" if kind == "add" else "") + f"{key}={value}"


def build_without_model(cfg: ExperimentConfig) -> None:
    """What `run_training` derives from the config before loading the model; each call
    raises on a value the validation should have refused."""
    from engines.factories import create_lr_scheduler, create_optimizer, validate_and_force_pad_to_maximum
    from engines.model import torch_dtype
    from engines.ppo import kl_penalty
    from workflows.controller.staleness import StalenessManager

    param = torch.nn.Parameter(torch.zeros(2))
    optimizer = create_optimizer([param], cfg.actor.optimizer)
    create_lr_scheduler(optimizer, cfg.actor.optimizer, total_steps=cfg.trainer.total_steps or 10)
    validate_and_force_pad_to_maximum(
        dataclasses.replace(cfg.actor), max_sequence_tokens=cfg.dataset.max_prompt_length + cfg.gconfig.max_new_tokens
    )
    torch_dtype(cfg.model.dtype)
    kl_penalty(torch.zeros(1, 2), torch.zeros(1, 2), cfg.actor.kl_estimator)
    StalenessManager(
        max_concurrent_rollouts=cfg.rollout.max_concurrent_rollouts,
        consumer_batch_size=cfg.rollout.consumer_batch_size or cfg.dataset.batch_size,
        max_head_offpolicyness=cfg.rollout.max_head_offpolicyness,
        version_provider=lambda: 0,
    )


@pytest.fixture(scope="module")
def cli(tmp_path_factory):
    import workflows.training.trainer

    accepted = []

    def fake_run_training(cfg, worker_launcher=None):
        build_without_model(cfg)
        accepted.append(cfg)

    original = workflows.training.trainer.run_training
    workflows.training.trainer.run_training = fake_run_training
    yield CliRunner(), accepted
    workflows.training.trainer.run_training = original


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(words=st.lists(override(), min_size=1, max_size=3), command=st.sampled_from(["train", "config show"]))
def test_any_overrides_exit_0_or_a_one_line_2(cli, words, command):
    runner, accepted = cli
    before = len(accepted)
    result = runner.invoke(app, [*command.split(), "config=smoke", *words])
    assert result.exit_code in (0, 2), (words, result.output, result.exception)
    # A SystemExit is how typer ends; anything else escaped as a traceback.
    assert result.exception is None or isinstance(result.exception, SystemExit), (words, repr(result.exception))
    assert "Traceback" not in result.output
    event(f"exit {result.exit_code}")
    if result.exit_code == 2:
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("config error: "), (words, result.stderr)
        assert len(accepted) == before  # refused before anything ran
    elif command == "train":
        assert len(accepted) == before + 1  # accepted, and the engines' constructors agree


BOUNDARY_VALUES = ["-1", "0", "0.5", "1", "2", "nan", "inf", "null"]
NUMERIC_KEYS = sorted(k for k, a in LEAVES.items() if ("int" in str(a) or "float" in str(a)) and "list" not in str(a))


@pytest.mark.parametrize("key", NUMERIC_KEYS)
def test_every_numeric_key_at_its_boundaries(key):
    """Each numeric key at each boundary value is refused with one line, or accepted and
    then accepted by the engines too: the table in rules.py misses no key."""
    from areal_cli.config import ConfigError, load_config

    for value in BOUNDARY_VALUES:
        try:
            cfg = load_config("smoke", [f"{key}={value}"])
        except ConfigError as exc:
            assert "\n" not in str(exc) and key in str(exc), (value, str(exc))
            continue
        build_without_model(cfg)
