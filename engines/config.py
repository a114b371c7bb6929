"""Configuration of what computes: the policy model, sampling, the optimizer and the actor.

Plain dataclasses. Hydra merges the YAML files in `areal_cli/configs/` onto them, so every field
here is a key a user can override from the command line (`actor.optimizer.lr=1e-5`).
Runtime objects (a model, a tokenizer, a process group) never live in a config; they are
passed to the factories in `engines/factories.py`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

# The valid values of the string-typed keys; areal_cli/validation.py checks configs
# against them and the factories build from them.
MODEL_DTYPES = ("float32", "bfloat16", "float16")
ATTN_IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2")
# model.device: auto is cuda:<LOCAL_RANK> where CUDA is visible, else cpu.
DEVICES = ("auto", "cpu", "cuda")
OPTIMIZERS = ("adamw", "sgd")
LR_SCHEDULERS = ("constant", "linear", "cosine")
KL_ESTIMATORS = ("k1", "k2", "k3")
# none: float32 compute; bf16: bfloat16 autocast; auto: bf16 where the hardware computes it
# natively (CUDA with bf16, CPUs with AVX512-BF16 or AMX), else none.
MIXED_PRECISION = ("none", "bf16", "auto")
# actor.loss_normalization: the PPO loss's denominator. token: the batch's trained-token
# count (DAPO's token-level mean); constant: sequences x gconfig.max_new_tokens (Dr. GRPO).
LOSS_NORMALIZATIONS = ("token", "constant")


@dataclass
class ModelConfig:
    """Which policy model to load, and how.

    `path` is a local directory, a Hugging Face hub id, or `gguf:<package>/<file>` for a
    GGUF file shipped inside an installed Python package. A hub id that cannot be
    reached falls back to a packaged offline copy when one is known (see
    `engines/model.py`).
    """

    path: str = "HuggingFaceTB/SmolLM2-135M-Instruct"
    # float32 | bfloat16 | float16. float32 is the only dtype that trains well on CPU.
    dtype: str = "float32"
    # Build a randomly initialised model with the architecture and tokenizer of `path`,
    # with the fields of `config_overrides` changed (tests and the smoke config use a
    # tiny model this way).
    init_from_scratch: bool = False
    config_overrides: dict[str, Any] = field(default_factory=dict)
    # attention implementation passed to transformers ("sdpa" or "eager").
    attn_implementation: str = "sdpa"
    # Where the policy (and the in-process sampler's copy) lives: auto | cpu | cuda.
    # cuda means this process's GPU, cuda:<LOCAL_RANK>, as `areal launch` and torchrun set it.
    device: str = "auto"


@dataclass
class GenerationConfig:
    """Sampling parameters for rollouts (names follow AReaL's `gconfig`)."""

    n_samples: int = 4  # completions per prompt: the GRPO group size
    max_new_tokens: int = 256  # tokens
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 disables top-k filtering
    # Extra token ids that end a completion, besides the tokenizer's EOS token.
    stop_token_ids: list[int] = field(default_factory=list)
    # Most sequences the in-process engine decodes in one batch.
    max_batch_size: int = 64


@dataclass
class OptimizerConfig:
    type: str = "adamw"  # adamw | sgd
    lr: float = 1e-6
    weight_decay: float = 0.01
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    gradient_clipping: float = 1.0  # max global grad norm; 0 disables clipping
    lr_scheduler_type: str = "constant"  # constant | linear | cosine
    warmup_steps_proportion: float = 0.0  # fraction of total steps spent warming up
    min_lr_ratio: float = 0.0  # floor of the decay, as a fraction of `lr`


@dataclass
class ActorConfig:
    """The policy being trained: optimisation, memory and the PPO/GRPO objective."""

    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    gradient_checkpointing: bool = False
    deterministic: bool = False
    # Autocast of the trainer's forward and backward passes: none | bf16 | auto (see
    # MIXED_PRECISION). Weights, optimizer state and the LM-head projection that scores
    # tokens stay float32; changes numerics on purpose (logprob_abs_diff_mean shows by
    # how much the trainer's logprobs then differ from the sampler's).
    mixed_precision: str = "none"
    # Right-pad every sequence to dataset.max_prompt_length + gconfig.max_new_tokens
    # (static shapes at every step); deterministic mode turns it on.
    pad_to_maximum: bool = False
    max_tokens_per_mb: int = 8192  # tokens per micro-batch (prompt + completion)
    ppo_n_minibatches: int = 1  # optimizer steps per training batch
    eps_clip: float = 0.2  # PPO ratio clip
    reward_scaling: float = 1.0
    reward_bias: float = 0.0
    kl_ctl: float = 0.0  # KL penalty coefficient against the initial policy; 0 disables
    kl_estimator: str = "k1"  # k1 | k2 | k3
    # GRPO: normalise rewards within each prompt's group; false uses the shifted, scaled
    # reward itself as the advantage (REINFORCE with baseline -reward_bias).
    group_reward_norm: bool = True
    group_adv_std_norm: bool = True  # divide by the group's std (Dr. GRPO sets False)
    # token | constant (see LOSS_NORMALIZATIONS); Dr. GRPO (Liu et al., 2025, arXiv
    # 2503.20783) is group_adv_std_norm=false with loss_normalization=constant.
    loss_normalization: str = "token"
    # DAPO's soft overlong punishment (Yu et al., 2025, arXiv 2503.14476): a completion
    # longer than gconfig.max_new_tokens - overlong_buffer_tokens loses up to
    # overlong_penalty reward, linearly over the buffer. 0 tokens: off.
    overlong_buffer_tokens: int = 0
    overlong_penalty: float = 1.0
    # DAPO's dynamic sampling: drop prompt groups whose rewards are all equal (no
    # advantage, no gradient) and keep generating until the batch is full.
    dynamic_sampling: bool = False
    # Decoupled PPO (AReaL): recompute proximal logprobs with the current weights before
    # the update and use them as the trust-region anchor.
    recompute_logprob: bool = False
    use_decoupled_loss: bool = False
    behav_imp_weight_cap: Optional[float] = None
