"""What flows: rollout workflows and rewards, prompt data, the rollout controller, the
control plane and the training loop.

The public names, for users who bring their own workflow or reward, are importable from
here (`from workflows import RolloutWorkflow, RLVRWorkflow`); they load on first use, so
`import workflows` itself stays light. The contracts are in `workflows/api.py`.
"""

from __future__ import annotations

import importlib

# public name -> the module that defines it
_EXPORTS = {
    "AcceptFn": "workflows.api",
    "GenerationRequest": "workflows.api",
    "GenerationResponse": "workflows.api",
    "InferenceEngine": "workflows.api",
    "RewardFn": "workflows.api",
    "RolloutWorkflow": "workflows.api",
    "Trajectory": "workflows.api",
    "TRAJECTORY_KEYS": "workflows.api",
    "ExperimentConfig": "workflows.config",
    "RLVRWorkflow": "workflows.rollout.rlvr",
    "has_reward_variance": "workflows.rollout.rlvr",
    "pack_trajectory": "workflows.rollout.rlvr",
    "MultiTurnWorkflow": "workflows.rollout.multiturn",
    "RetryEnvironment": "workflows.rollout.environments",
    "ToolEnvironment": "workflows.rollout.environments",
    "ToolRegistry": "workflows.rollout.tools",
    "run_python": "workflows.rollout.sandbox",
    "Scorer": "workflows.api",
    "RewardScorer": "workflows.rollout.reward",
    "RewardFunctionError": "workflows.rollout.reward",
    "math_verify_reward": "workflows.rollout.reward_fns",
    "boxed_math_verify_reward": "workflows.rollout.reward_fns",
    "final_number_reward": "workflows.rollout.reward_fns",
    "exact_match_reward": "workflows.rollout.reward_fns",
    "reasoning_gym_reward": "workflows.rollout.reward_fns",
    "WorkflowExecutor": "workflows.controller.executor",
    "RolloutFailureError": "workflows.controller.failures",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'workflows' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
