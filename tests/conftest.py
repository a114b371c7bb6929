"""Shared fixtures: the real SmolLM2 tokenizer and tiny random models of its architecture."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# The copy the package ships (workflows/data/gsm8k), so a fresh clone needs nothing beside it.
GSM8K_DIR = REPO / "workflows" / "data" / "gsm8k"
TINY_OVERRIDES = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16
)


@pytest.fixture(scope="session")
def gsm8k_dir() -> Path:
    if not GSM8K_DIR.exists():
        pytest.fail(f"the packaged GSM8K is missing at {GSM8K_DIR}")
    return GSM8K_DIR


@pytest.fixture(scope="session")
def model_dir() -> Path:
    """SmolLM2-135M-Instruct as a local model directory (converted from the packaged GGUF
    once per machine, then cached)."""
    from engines.model import resolve_model_dir

    return resolve_model_dir("HuggingFaceTB/SmolLM2-135M-Instruct")


@pytest.fixture(scope="session")
def tokenizer(model_dir):
    from engines.model import load_tokenizer

    return load_tokenizer(model_dir)


@pytest.fixture
def tiny_model(model_dir):
    """A freshly initialised 2-layer model with SmolLM2's tokenizer (seed 0)."""
    from engines.config import ModelConfig
    from engines.model import load_model

    cfg = ModelConfig(init_from_scratch=True, config_overrides=dict(TINY_OVERRIDES))
    return load_model(cfg, model_dir, seed=0)


def schema_leaves(cls=None, prefix: str = ""):
    """(dotted key, annotation) for every leaf key of the config schema (ExperimentConfig)."""
    from engines.config import leaf_fields

    if cls is None:
        from workflows.config import ExperimentConfig

        cls = ExperimentConfig
    for key, _, hint in leaf_fields(cls, prefix):
        yield key, hint


def areal_cli(*args: str) -> list[str]:
    """argv that runs the real `areal` CLI of this checkout in a subprocess."""
    return [sys.executable, "-m", "areal_cli.main", *args]


def cli_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env
