import asyncio

import pytest
import torch

from engines.config import GenerationConfig
from engines.inference import LocalInferenceEngine
from workflows.api import TRAJECTORY_KEYS, RolloutWorkflow
from workflows.rollout.reward import RewardScorer
from workflows.rollout.rlvr import RLVRWorkflow


@pytest.fixture(scope="module")
def scorer():
    s = RewardScorer(num_workers=1, timeout=10)
    yield s
    s.close()


def test_episode_is_a_padded_scored_group(tiny_model, tokenizer, scorer):
    engine = LocalInferenceEngine(tiny_model, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    engine.set_version(3)
    workflow = RLVRWorkflow(gconfig=GenerationConfig(n_samples=3, max_new_tokens=6), tokenizer=tokenizer, scorer=scorer)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "1+1?"}], add_generation_prompt=True)
    prompt = list(prompt["input_ids"] if hasattr(prompt, "keys") else prompt)
    row = {"id": 11, "epoch": 2, "prompt_ids": prompt, "answer": "2"}
    t = asyncio.run(workflow.arun_episode(engine, row))
    engine.destroy()

    assert isinstance(workflow, RolloutWorkflow)
    assert set(t) == set(TRAJECTORY_KEYS)  # exactly the contract's format
    n, width = t["input_ids"].shape
    assert n == 3 and t["rewards"].shape == (3,) and t["rewards"].dtype == torch.float32
    assert set(t["rewards"].tolist()) <= {0.0, 1.0}
    p = len(prompt)
    assert torch.equal(t["input_ids"][:, :p], torch.tensor([prompt] * 3))
    completion = t["loss_mask"].bool()
    assert not completion[:, :p].any() and completion.sum(dim=1).min() >= 1
    assert torch.all(t["versions"][completion] == 3) and torch.all(t["versions"][~completion] == -1)
    assert torch.all(t["logprobs"][completion] <= 0) and torch.all(t["logprobs"][~completion] == 0)
    assert torch.equal(t["attention_mask"].sum(dim=1), p + completion.sum(dim=1))
    assert t["prompt_id"].tolist() == [11] * 3 and t["epoch"].tolist() == [2] * 3
    assert t["logprobs"].dtype == torch.float32 and width <= p + 6
