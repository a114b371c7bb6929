"""The public contracts: what a user implements to bring their own rollout workflow or
reward, and the trajectory format the rollout controller and the trainer exchange.

A rollout workflow turns one dataset row into one trajectory: it samples completions from
the inference engine it is given (`await engine.agenerate(GenerationRequest(...))`, token
ids in, token ids, logprobs and policy versions out) and scores them. The rollout
controller (`workflows/controller/`) runs many episodes concurrently within the staleness
bound and hands accepted trajectories to the trainer. `workflows/rollout/rlvr.py`'s
`RLVRWorkflow` is the shipped example: n completions of one prompt, one reward each.

Everything here is also importable from `workflows` itself (`from workflows import
RolloutWorkflow`); the rest of the package is internals that may change.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Optional, Protocol, runtime_checkable

import torch

from engines.inference import GenerationRequest, GenerationResponse, InferenceEngine

__all__ = [
    "TRAJECTORY_KEYS",
    "AcceptFn",
    "GenerationRequest",
    "GenerationResponse",
    "InferenceEngine",
    "RewardFn",
    "RolloutWorkflow",
    "Trajectory",
]

Trajectory = dict[str, torch.Tensor]
"""One episode's samples as right-padded tensors, one row per sample (n rows, L = the
longest prompt + completion, in tokens):

    input_ids       [n, L] long     prompt then completion, padded with the pad token id
    attention_mask  [n, L] long     1 on real tokens
    loss_mask       [n, L] long     1 on the tokens trained (the model's own completion)
    logprobs        [n, L] float32  behaviour logprob of each trained token (nats), else 0
    versions        [n, L] long     policy version that sampled the token; -1 elsewhere
    rewards         [n]    float32  the sample's reward
    prompt_id       [n]    long     the dataset row's `id`, to keep batches in a stable order
    epoch           [n]    long     the row's `epoch` (0 if absent), for crash recovery

The rows of one trajectory form one group: GRPO normalises rewards within it."""

TRAJECTORY_KEYS = ("input_ids", "attention_mask", "loss_mask", "logprobs", "versions", "rewards", "prompt_id", "epoch")

AcceptFn = Callable[[Trajectory], bool]
"""Called with a finished trajectory; False rejects it (counted, never trained)."""

RewardFn = Callable[[str, str], float]
"""`reward_fn(completion, reference) -> float`: the decoded completion text and the
dataset row's reference answer, to a reward (1.0 right, 0.0 wrong for the shipped
math rewards). It runs in a worker process of `RewardScorer` with a per-call timeout
(`rollout.reward_timeout` seconds), so it must be a picklable top-level function; an
exception or a timeout scores 0.0 and is counted."""


@runtime_checkable
class RolloutWorkflow(Protocol):
    """What the rollout controller runs: one episode per call.

    `engine` is the run's inference engine (in-process or a server client); sample from
    it with `await engine.agenerate(request)`, and read the policy version it is serving
    with `engine.get_version()`. `data` is one dataset row (`{"id": int, "prompt_ids":
    list[int], "answer": str, "epoch": int, ...}`).

    Returns a `Trajectory`, or None to reject the episode (counted as rejected, never
    trained). An exception is counted as a failed rollout; it never stops the controller,
    but too many in a row stop the run with `RolloutFailureError`
    (`rollout.max_consecutive_rejections`, `rollout.max_failure_rate`).
    """

    async def arun_episode(self, engine: InferenceEngine, data: dict) -> Optional[Trajectory]: ...
