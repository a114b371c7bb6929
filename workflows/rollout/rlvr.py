"""RL with verifiable rewards: one prompt in, a scored group of completions out."""

from __future__ import annotations

import asyncio
from typing import Optional

import torch

from engines.config import GenerationConfig
from engines.inference import GenerationRequest, GenerationResponse, InferenceEngine
from workflows.api import Trajectory
from workflows.rollout.batch import pack_rows
from workflows.rollout.reward import RewardScorer


class RLVRWorkflow:
    """Sample `gconfig.n_samples` completions of one prompt concurrently and score them.

    `await arun_episode(engine, data)` with a dataset row `data = {"prompt_ids":
    list[int], "answer": str, "prompt": ..., "columns": dict, "id": int, "epoch": int}`
    returns a `Trajectory` (workflows/api.py), one row per completion (n = n_samples),
    whose `rewards` [n] float32 are the scorer's (reward.fn's) values; `epoch` is 0 when
    `data` has none.

    With `seed`, each prompt's group is sampled from its own seeded RNG (deterministic
    mode). An engine failure, or a reward function that raises (RewardFunctionError),
    propagates; the rollout controller counts the rollout as rejected.
    """

    def __init__(self, *, gconfig: GenerationConfig, tokenizer, scorer: RewardScorer, seed: Optional[int] = None):
        self.gconfig = gconfig
        self.tokenizer = tokenizer
        self.scorer = scorer
        self.seed = seed

    async def arun_episode(self, engine: InferenceEngine, data: dict) -> Optional[Trajectory]:
        seed = None
        if self.seed is not None:
            # One seed per (run seed, prompt, policy version): the group's samples are
            # the same whichever process or batch generates them.
            seed = hash((self.seed, data["id"], engine.get_version())) % (2**31)
        request = GenerationRequest.from_gconfig(data["prompt_ids"], self.gconfig, seed=seed)
        responses = await asyncio.gather(*(engine.agenerate(request) for _ in range(self.gconfig.n_samples)))
        texts = [self.tokenizer.decode(r.output_ids, skip_special_tokens=True) for r in responses]
        rewards = await asyncio.gather(
            *(self.scorer.ascore(t, data["answer"], prompt=data.get("prompt"), row=data.get("columns")) for t in texts)
        )
        trajectory = pack_trajectory(responses, rewards, pad_token_id=self.tokenizer.pad_token_id)
        n = len(responses)
        trajectory["prompt_id"] = torch.full((n,), int(data["id"]), dtype=torch.long)
        trajectory["epoch"] = torch.full((n,), int(data.get("epoch", 0)), dtype=torch.long)
        return trajectory


def has_reward_variance(trajectory: dict[str, torch.Tensor]) -> bool:
    """DAPO's dynamic-sampling filter (Yu et al., 2025, arXiv 2503.14476): keep a prompt
    group only if its rewards ([n] float32) are not all equal; an all-correct or
    all-wrong group has zero group-normalised advantage and gives no gradient."""
    rewards = trajectory["rewards"]
    return bool((rewards != rewards[0]).any())


def pack_trajectory(
    responses: list[GenerationResponse], rewards: list[float], *, pad_token_id: int
) -> dict[str, torch.Tensor]:
    """Right-pad prompt+completion rows into a `Trajectory`'s tensors (all but `prompt_id`
    and `epoch`, which the workflow adds)."""
    return pack_rows(
        [r.input_ids + r.output_ids for r in responses],
        [[0] * len(r.input_ids) + [1] * len(r.output_ids) for r in responses],
        [[0.0] * len(r.input_ids) + list(r.output_logprobs) for r in responses],
        [[-1] * len(r.input_ids) + list(r.output_versions) for r in responses],
        rewards,
        pad_token_id=pad_token_id,
    )
