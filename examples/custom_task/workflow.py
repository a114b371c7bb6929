"""The rollout workflow: n samples of one prompt, each reward less a length penalty."""
import asyncio

import torch

from workflows import GenerationRequest, pack_trajectory


class ReverseWorkflow:
    def __init__(self, gconfig, tokenizer, scorer, length_penalty: float = 0.0):
        self.gconfig, self.tokenizer, self.scorer = gconfig, tokenizer, scorer
        self.length_penalty = length_penalty

    async def arun_episode(self, engine, data):
        request = GenerationRequest.from_gconfig(data["prompt_ids"], self.gconfig)
        responses = await asyncio.gather(*(engine.agenerate(request) for _ in range(self.gconfig.n_samples)))
        texts = [self.tokenizer.decode(r.output_ids, skip_special_tokens=True) for r in responses]
        scores = await asyncio.gather(*(self.scorer.ascore(t, data["answer"], row=data["columns"]) for t in texts))
        rewards = [s - self.length_penalty * len(r.output_ids) for s, r in zip(scores, responses)]
        trajectory = pack_trajectory(responses, rewards, pad_token_id=self.tokenizer.pad_token_id)
        trajectory["prompt_id"] = torch.full((len(texts),), data["id"])
        trajectory["epoch"] = torch.full((len(texts),), data.get("epoch", 0))
        return trajectory
