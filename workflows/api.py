"""The public contracts: what a user implements to bring their own rollout workflow or
reward, and the trajectory format the rollout controller and the trainer exchange.

A rollout workflow turns one dataset row into one trajectory: it samples completions from
the inference engine it is given (`await engine.agenerate(GenerationRequest(...))`, token
ids in, token ids, logprobs and policy versions out) and scores them. The rollout
controller (`workflows/controller/`) runs many episodes concurrently within the staleness
bound and hands accepted trajectories to the trainer. `workflows/rollout/rlvr.py`'s
`RLVRWorkflow` is the shipped example: n completions of one prompt, one reward each;
`workflows/rollout/multiturn.py`'s `MultiTurnWorkflow` (`rollout.workflow=multi_turn`)
runs conversations of several turns on exact tokens (docs/multi_turn.md).

Everything here is also importable from `workflows` itself (`from workflows import
RolloutWorkflow`); the rest of the package is internals that may change.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
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
    "Scorer",
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

The rows of one trajectory form one group: GRPO normalises rewards within it. A workflow
may add per-sample columns ([n]) that every trajectory it returns carries: the shipped
multi-turn workflow adds `num_turns`, `solved_turn`, `tool_errors` and `over_budget`
(workflows/rollout/multiturn.py's EPISODE_KEYS), which reach the step's statistics. In a
multi-turn row the completion is several runs of loss mask 1 (the sampled turns) between
runs of 0 (the appended messages), and `versions` may differ between turns."""

TRAJECTORY_KEYS = ("input_ids", "attention_mask", "loss_mask", "logprobs", "versions", "rewards", "prompt_id", "epoch")

AcceptFn = Callable[[Trajectory], bool]
"""Called with a finished trajectory; False rejects it (counted, never trained)."""

RewardFn = Callable[..., float | Awaitable[float]]
"""`reward_fn(completion: str, reference: str, *, prompt=..., row=...) -> float`.

`completion` is the decoded completion text, `reference` the row's reference answer (read
from `dataset.answer_column` per `dataset.answer_format`); the keywords are passed only
if the function names them (or takes `**kwargs`): `prompt`, the row's prompt as the
dataset has it (the `dataset.prompt_column` text, or the `dataset.messages_column`
list), and `row`, a dict of all the row's columns. It returns a finite number (1.0 right,
0.0 wrong for the shipped rewards); an `async def` function works too.

Name it in the config as `reward.fn=package.module:function` or
`reward.fn=path/to/file.py:function` (a list for several, weighted by `reward.weights`);
the signature is checked when the config is read. It runs in a worker process of
`RewardScorer` (workflows/rollout/reward.py) with a per-call timeout
(`rollout.reward_timeout` seconds): a timeout or a crashed worker scores 0.0 and is
counted; an exception (or a value that is no finite number) fails the rollout with a
`RewardFunctionError` naming the function, and rollouts that keep failing stop the run
(`rollout.max_consecutive_rejections`)."""


@runtime_checkable
class Scorer(Protocol):
    """What a rollout workflow scores with: the `scorer` its constructor receives (the
    run's `RewardScorer`, running `reward.fn`)."""

    async def ascore(self, completion: str, reference: str, *, prompt=None, row: Optional[dict] = None) -> float:
        """The weighted reward of `completion`; raises RewardFunctionError (see RewardFn)."""
        ...


@runtime_checkable
class RolloutWorkflow(Protocol):
    """What the rollout controller runs: one episode per call.

    `engine` is the run's inference engine (in-process or a server client); sample from
    it with `await engine.agenerate(request)`, and read the policy version it is serving
    with `engine.get_version()`. `data` is one dataset row: `{"id": int, "prompt_ids":
    list[int] (the chat-templated prompt), "prompt": the prompt as the dataset has it,
    "question": str, "answer": str (the reference), "columns": dict (every column of the
    row), "epoch": int}`.

    Name a class of your own in the config as `rollout.workflow=package.module:Class` (or
    `path/to/file.py:Class`) with `rollout.workflow_args={...}`; every process that runs
    rollouts (the trainer, a disaggregated rollout worker, `areal eval`'s controller)
    builds it as `Class(**workflow_args, gconfig=..., tokenizer=..., scorer=..., seed=...)`,
    passing only the last four that the constructor names (or all with `**kwargs`):
    `gconfig` the sampling settings (engines/config.py `GenerationConfig`), `tokenizer`
    the model's, `scorer` a `Scorer`, `seed` the sampling seed or None.

    Returns a `Trajectory`, or None to reject the episode (counted as rejected, never
    trained). An exception is counted as a failed rollout; it never stops the controller,
    but too many in a row stop the run with `RolloutFailureError`
    (`rollout.max_consecutive_rejections`, `rollout.max_failure_rate`).
    """

    async def arun_episode(self, engine: InferenceEngine, data: dict) -> Optional[Trajectory]: ...
