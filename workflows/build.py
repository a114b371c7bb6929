"""Building a run's parts from config, once: the process setup, the inference engine, the
reward scorer, the rollout workflow and the rollout controller.

The trainer (`workflows/training/run.py`), `areal eval` (`workflows/training/evaluation.py`)
and the disaggregated rollout worker (`workflows/control_plane/rollout_worker.py`) all
build their parts here, so each decision (which backend, whether the sampler holds its own
copy of the weights, which reward function, which sampling seed) is made in one place.
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Optional

from engines.distributed import DistributedContext
from engines.factories import setup_cpu_threads, setup_deterministic_mode, setup_malloc
from engines.inference import LocalInferenceEngine
from engines.model import load_tokenizer, resolve_model_dir
from engines.remote import RemoteInferenceEngine
from engines.servers import ServerGroup, find_server_python, start_servers, vllm_lora_args
from engines.weights import publish_weights
from workflows.config import MULTI_TURN_WORKFLOW, ExperimentConfig
from workflows.controller.executor import WorkflowExecutor
from workflows.rollout.environments import RetryEnvironment, ToolEnvironment
from workflows.rollout.multiturn import MultiTurnWorkflow
from workflows.rollout.reward import RewardScorer
from workflows.rollout.reward_fns import resolve_rewards
from workflows.rollout.rlvr import RLVRWorkflow, has_reward_variance
from workflows.rollout.sandbox import SandboxLimits
from workflows.rollout.tools import ToolRegistry, load_tools
from workflows.user_code import UserCodeError, load_object, workflow_keywords


def prepare_process(cfg: ExperimentConfig) -> tuple[Path, object]:
    """What every process that holds a model sets up first (the trainer, `areal eval`, a
    rollout worker): seeds and deterministic kernels, torch's threads, the allocator;
    then the model directory (downloaded or converted once) and its tokenizer.

    Raises:
        HubError: the model is on the hub, which cannot be reached, and no offline copy exists.
    """
    setup_deterministic_mode(cfg.seed, cfg.actor.deterministic)
    setup_cpu_threads()
    setup_malloc()
    model_dir = resolve_model_dir(cfg.model.path, Path(cfg.cache_dir) if cfg.cache_dir else None)
    return model_dir, load_tokenizer(model_dir)


def sampling_seed(cfg: ExperimentConfig) -> Optional[int]:
    """The seed rollouts and evaluation sample from: the run's seed in deterministic mode
    (each prompt group then gets its own seeded RNG), else None (unseeded sampling)."""
    return cfg.seed if cfg.actor.deterministic else None


def build_inference(
    cfg: ExperimentConfig, policy, tokenizer, model_dir: Path, run_dir: Path, dist_ctx: DistributedContext,
    *, trains_policy: bool = True,
) -> tuple[LocalInferenceEngine | RemoteInferenceEngine, Optional[ServerGroup]]:
    """The rollouts' inference engine per `rollout.backend`, and the servers it started
    (None when it started none).

    local: the policy itself, or a private copy of it when generation overlaps training
    (`trains_policy` and `rollout.max_head_offpolicyness > 0`). A process that never
    trains `policy` (`trains_policy=False`: a rollout worker, `areal eval`) decodes from it
    directly, and new weights reach it only through `update_weights`.
    vllm / sglang: the policy is published as version 0 under `<run_dir>/weights/` and
    `rollout.servers` servers are started from it (their logs in `<run_dir>/logs/`), or
    the listed running servers are attached to.

    Raises:
        FileNotFoundError: no interpreter with the server backend installed.
        ServerStartError: a server exited, or did not answer /health within
            `rollout.server_startup_timeout` seconds.
    """
    r = cfg.rollout
    if r.backend == "local":
        # With staleness > 0 generation runs while the trainer updates the policy, so the
        # sampler needs its own copy (it must never read half-updated weights). Synchronous
        # RL never overlaps the two, and the sampler decodes from the policy itself: one
        # model's worth of memory less.
        # A sharded policy (actor.parallelism=fsdp2) cannot decode on one rank alone: its
        # forward pass all-gathers with the other ranks. The sampler gets a whole copy.
        private_copy = trains_policy and (r.max_head_offpolicyness > 0 or cfg.actor.parallelism == "fsdp2")
        return LocalInferenceEngine(
            copy.deepcopy(policy) if private_copy else policy,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            max_batch_size=cfg.gconfig.max_batch_size,
            shares_weights=trains_policy and not private_copy,
        ), None
    from engines.remote_sglang import RemoteSGLangEngine
    from engines.remote_vllm import RemoteVLLMEngine

    weights_dir = run_dir / "weights" / f"rank{dist_ctx.rank}"
    servers = None
    if isinstance(r.servers, int):
        python = find_server_python(r.backend, r.server_python)
        initial = publish_weights(policy, weights_dir, version=0)
        servers = start_servers(
            r.backend, r.servers, initial, model_dir, run_dir / "logs", python=python,
            max_model_len=cfg.dataset.max_prompt_length + cfg.max_completion_tokens() + 1,
            dtype=r.server_dtype or cfg.model.dtype,
            extra_args=list(r.server_args) + lora_server_args(cfg), startup_timeout=r.server_startup_timeout,
        )
        addresses = servers.addresses
    else:
        addresses = list(r.servers)
    client = {"vllm": RemoteVLLMEngine, "sglang": RemoteSGLangEngine}[r.backend]
    return client(
        addresses, weights_dir=weights_dir, request_timeout=r.request_timeout, max_retries=r.request_retries,
        interruptible=r.interruptible_generation,
    ), servers


def lora_server_args(cfg: ExperimentConfig) -> list[str]:
    """The server arguments `actor.lora.sync=adapters` needs (vLLM: `--enable-lora`)."""
    lora = cfg.actor.lora
    if lora.enabled and lora.sync == "adapters" and cfg.rollout.backend == "vllm":
        return vllm_lora_args(lora.rank)
    return []


def close_inference(inference, servers: Optional[ServerGroup]) -> None:
    """Stop the inference engine, then the servers it ran on (even if the first fails)."""
    try:
        inference.destroy()
    finally:
        if servers is not None:
            servers.stop()


def build_scorer(cfg: ExperimentConfig) -> RewardScorer:
    """The reward scorer of `reward.fn` / `reward.weights` (the functions),
    `rollout.reward_workers` (processes) and `rollout.reward_timeout` (seconds per call).
    Close it when done.

    Raises:
        UserCodeError: a reward function that does not load or has the wrong signature.
    """
    r = cfg.rollout
    return RewardScorer(num_workers=r.reward_workers, timeout=r.reward_timeout, reward_fn=resolve_rewards(cfg))


def build_workflow(cfg: ExperimentConfig, tokenizer, scorer: RewardScorer):
    """The rollout workflow: `rollout.workflow` built with `rollout.workflow_args` plus
    whichever of `gconfig`, `tokenizer`, `scorer` and `seed` (the sampling seed) its
    constructor takes; by default `RLVRWorkflow` (`gconfig.n_samples` completions per
    prompt, scored by `scorer`); `multi_turn` is the shipped `MultiTurnWorkflow`
    (`build_multi_turn`). Every process that runs rollouts builds it here.

    Raises:
        UserCodeError: `rollout.workflow` does not load, its constructor does not take
            the arguments, or what it builds has no async `arun_episode`.
    """
    spec = cfg.rollout.workflow
    if spec is None:
        return RLVRWorkflow(gconfig=cfg.gconfig, tokenizer=tokenizer, scorer=scorer, seed=sampling_seed(cfg))
    if spec == MULTI_TURN_WORKFLOW:
        return build_multi_turn(cfg, tokenizer, scorer)
    factory = load_object(spec, "rollout.workflow")
    args = dict(cfg.rollout.workflow_args)
    given = {"gconfig": cfg.gconfig, "tokenizer": tokenizer, "scorer": scorer, "seed": sampling_seed(cfg)}
    workflow = factory(**args, **{k: given[k] for k in workflow_keywords(factory, args, spec)})
    if not callable(getattr(workflow, "arun_episode", None)):
        raise UserCodeError(f"rollout.workflow={spec!r} built a {type(workflow).__name__}, which has no "
                            "arun_episode(engine, data); see workflows/api.py, RolloutWorkflow")
    return workflow


def sandbox_limits(cfg: ExperimentConfig) -> SandboxLimits:
    """`multi_turn.sandbox.*` as the sandbox's limits."""
    return SandboxLimits(**dataclasses.asdict(cfg.multi_turn.sandbox))


def build_multi_turn(cfg: ExperimentConfig, tokenizer, scorer: RewardScorer) -> MultiTurnWorkflow:
    """`rollout.workflow=multi_turn`: a `MultiTurnWorkflow` per `multi_turn.*`, each episode
    against a fresh `RetryEnvironment` or `ToolEnvironment` (the tools loaded once).

    Raises:
        UserCodeError: a `multi_turn.tools` entry does not load.
        ValueError: a tool has no usable JSON schema, or two share a name.
    """
    m = cfg.multi_turn
    if m.environment == "tools":
        registry = ToolRegistry(load_tools(list(m.tools)), sandbox_limits(cfg))

        def make_env():
            return ToolEnvironment(scorer, registry, turn_discount=m.turn_discount)
    else:
        def make_env():
            return RetryEnvironment(scorer, turn_discount=m.turn_discount, feedback=m.feedback)
    return MultiTurnWorkflow(
        make_env=make_env, gconfig=cfg.gconfig, tokenizer=tokenizer, max_turns=m.max_turns,
        max_tokens_per_turn=m.max_tokens_per_turn, max_total_tokens=m.max_total_tokens, seed=sampling_seed(cfg),
        instruction=cfg.dataset.instruction, system_prompt=cfg.dataset.system_prompt,
        max_prompt_tokens=cfg.dataset.max_prompt_length,
    )


def build_executor(
    cfg: ExperimentConfig, inference, *, consumer_batch_size: int, trajectory_dump_dir: Optional[Path] = None,
) -> WorkflowExecutor:
    """The rollout controller over `inference`, handing out batches of `consumer_batch_size`
    trajectories (the caller resolves `rollout.consumer_batch_size` against its loader's
    batch size); with `actor.dynamic_sampling` it keeps only prompt groups whose rewards
    differ (DAPO). Call `initialize()` to start it and `destroy()` when done."""
    return WorkflowExecutor(
        dataclasses.replace(cfg.rollout, consumer_batch_size=None),
        inference,
        consumer_batch_size=consumer_batch_size,
        trajectory_dump_dir=trajectory_dump_dir,
        group_filter=has_reward_variance if cfg.actor.dynamic_sampling else None,
    )
