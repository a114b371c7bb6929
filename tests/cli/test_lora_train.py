"""`actor.lora` through the real CLI: a 2-step run of the smoke config with LoRA, a KL term
(the reference is the base model with the adapters disabled) and staleness 1 (a private
sampler copy that receives merged weights); then (slow) a resume from its recover
checkpoint."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from tests.cli.test_train_smoke import train
from workflows.metrics.stats import read_stats

LORA = ["actor.lora.enabled=true", "actor.lora.rank=4", "actor.lora.alpha=8", "actor.kl_ctl=0.05",
        "rollout.max_head_offpolicyness=1", "actor.reward_bias=-0.5", "actor.group_reward_norm=false"]


def two_lora_steps(run_dir, gsm8k_dir) -> None:
    train(run_dir, gsm8k_dir, *LORA, "trainer.total_steps=2", "trainer.recover_freq_steps=1")


def test_lora_trains_with_kl_checkpoints_the_adapters_and_exports_a_plain_model(tmp_path, gsm8k_dir):
    two_lora_steps(tmp_path, gsm8k_dir)
    recover = tmp_path / "checkpoints" / "recover" / "model"
    assert json.loads((recover / "adapter_config.json").read_text())["r"] == 4
    assert not (recover / "model.safetensors").exists()
    records = read_stats(tmp_path / "stats.jsonl")
    assert [r["step"] for r in records] == [1, 2]
    assert abs(records[0]["kl"]) < 1e-6  # the adapters start at B = 0: the policy is the reference
    assert records[1]["kl"] > 0 and all(r["grad_norm"] > 0 for r in records)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "checkpoints" / "step_2")
    assert not any("lora" in name for name in model.state_dict())
    assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()


@pytest.mark.slow
def test_a_lora_run_resumes_from_its_adapters(tmp_path, gsm8k_dir):
    two_lora_steps(tmp_path, gsm8k_dir)
    result = train(tmp_path, gsm8k_dir, *LORA, "trainer.total_steps=3")
    assert "resuming from step 2" in result.stdout + result.stderr
    assert [r["step"] for r in read_stats(tmp_path / "stats.jsonl")] == [1, 2, 3]
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "checkpoints" / "step_3").config.num_hidden_layers == 2
