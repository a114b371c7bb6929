"""Configuration of what computes: the policy model, sampling, the optimizer and the actor.

Plain dataclasses. Hydra merges the YAML files in `areal_cli/configs/` onto them, so every field
here is a key a user can override from the command line (`actor.optimizer.lr=1e-5`).
Runtime objects (a model, a tokenizer, a process group) never live in a config; they are
passed to the factories in `engines/factories.py`.

Each field carries its help text, and its choices where it has them, as field metadata
(`option`): `areal config show --doc` prints them and `areal_cli/rules.py` refuses a value
outside the choices, so each enumeration below is written once.
"""

from __future__ import annotations

import copy
import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional

# The valid values of the string-typed keys: the fields below name them as `choices`, and
# the factories build from them.
MODEL_DTYPES = ("float32", "bfloat16", "float16")
ATTN_IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2")
DEVICES = ("auto", "cpu", "cuda")
OPTIMIZERS = ("adamw", "sgd")
LR_SCHEDULERS = ("constant", "linear", "cosine")
KL_ESTIMATORS = ("k1", "k2", "k3")
MIXED_PRECISION = ("none", "bf16", "auto")
LOSS_NORMALIZATIONS = ("token", "constant")
TIS_MODES = ("truncate", "mask")
ADV_ESTIMATORS = ("grpo", "rloo", "reinforce_plus_plus", "gae")
IMPORTANCE_LEVELS = ("token", "sequence")
PARALLELISMS = ("ddp", "fsdp2")
LORA_SYNCS = ("merged", "adapters")


def option(default: Any, help: str, *, choices: Optional[tuple[str, ...]] = None, null: Optional[str] = None) -> Any:
    """A schema field with its `default` and `help` text (metadata "help").

    `choices`: the only valid values (metadata "choices"; for a list-valued key, of each
    element). `null`: what None means, for an Optional key with choices (the refusal of a
    bad value then ends ", or null for <null>"). A list or dict default is copied for
    each instance.
    """
    metadata: dict[str, Any] = {"help": help}
    if choices is not None:
        metadata["choices"] = tuple(choices)
    if null is not None:
        metadata["null"] = null
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: copy.deepcopy(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def leaf_fields(cls: type, prefix: str = "") -> Iterator[tuple[str, dataclasses.Field, Any]]:
    """(dotted key, field, resolved type hint) for every leaf key under the dataclass `cls`,
    in declaration order; a field whose default is a dataclass is descended into."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(default):
            yield from leaf_fields(type(default), prefix + f.name + ".")
        else:
            yield prefix + f.name, f, hints[f.name]


@dataclass
class ModelConfig:
    """Which policy model to load, and how.

    `path` is a local directory, a Hugging Face hub id, or `gguf:<package>/<file>` for a
    GGUF file shipped inside an installed Python package. A hub id that cannot be
    reached falls back to a packaged offline copy when one is known (see
    `engines/model.py`).
    """

    path: str = option(
        "HuggingFaceTB/SmolLM2-135M-Instruct",
        "The policy model: a local model directory, a Hugging Face hub id, or gguf:<package>/<file> (a GGUF "
        "file inside an installed Python package). A hub id that cannot be reached is read from the local HF "
        "cache or a packaged offline copy when one is known.",
    )
    dtype: str = option(
        "float32", "The dtype of the policy's weights. float32 is the only dtype that trains well on CPU.",
        choices=MODEL_DTYPES,
    )
    init_from_scratch: bool = option(
        False,
        "Build a randomly initialised model with the architecture and tokenizer of `path`, with the fields of "
        "`config_overrides` changed (tests and the smoke config use a tiny model this way).",
    )
    config_overrides: dict[str, Any] = option(
        {}, "Architecture fields changed when `init_from_scratch` is set (e.g. hidden_size: 64)."
    )
    attn_implementation: str = option(
        "sdpa", "The attention implementation passed to transformers.", choices=ATTN_IMPLEMENTATIONS
    )
    device: str = option(
        "auto",
        "Where the policy (and the in-process sampler's copy) lives. auto: cuda:<LOCAL_RANK> where CUDA is "
        "visible, else cpu; cuda: this process's GPU, cuda:<LOCAL_RANK>, as `areal launch` and torchrun set it.",
        choices=DEVICES,
    )


@dataclass
class GenerationConfig:
    """Sampling parameters for rollouts (names follow AReaL's `gconfig`)."""

    n_samples: int = option(4, "Completions per prompt: the GRPO group size.")
    max_new_tokens: int = option(256, "Most tokens generated per completion.")
    temperature: float = option(
        1.0, "Sampling temperature; logprobs are of the temperature-scaled distribution. 0 samples greedily."
    )
    top_p: float = option(1.0, "Nucleus sampling: the probability mass sampled from; 1.0 disables it.")
    top_k: int = option(0, "Sample from the k most likely tokens only; 0 disables top-k filtering.")
    stop_token_ids: list[int] = option([], "Extra token ids that end a completion, besides the tokenizer's EOS token.")
    max_batch_size: int = option(64, "Most sequences the in-process engine decodes in one batch.")


@dataclass
class OptimizerConfig:
    """The optimizer of the policy and its learning-rate schedule."""

    type: str = option("adamw", "The optimizer.", choices=OPTIMIZERS)
    lr: float = option(1e-6, "Base learning rate.")
    weight_decay: float = option(0.01, "Decoupled weight decay (AdamW) or L2 penalty (SGD).")
    beta1: float = option(0.9, "AdamW's beta1.")
    beta2: float = option(0.999, "AdamW's beta2.")
    eps: float = option(1e-8, "AdamW's epsilon.")
    gradient_clipping: float = option(1.0, "Maximum global gradient norm; 0 disables clipping.")
    lr_scheduler_type: str = option("constant", "How the learning rate decays after warm-up.", choices=LR_SCHEDULERS)
    warmup_steps_proportion: float = option(0.0, "Fraction of the total steps spent warming up the learning rate.")
    min_lr_ratio: float = option(0.0, "Floor of the learning-rate decay, as a fraction of `lr`.")


@dataclass
class LoraConfig:
    """LoRA (Hu et al., 2021, arXiv 2106.09685) through peft: the policy's weights stay
    frozen and only low-rank adapters train (engines/lora.py)."""

    enabled: bool = option(
        False,
        "Train LoRA adapters instead of every weight: only the adapters are in the optimizer, the KL reference is "
        "the base model with the adapters disabled (no second copy), recover checkpoints hold only the adapters "
        "and the final checkpoint merges them into the weights.",
    )
    rank: int = option(16, "The adapters' rank r (the inner dimension of B @ A).")
    alpha: float = option(32.0, "LoRA's alpha: the update B @ A is scaled by alpha / rank.")
    dropout: float = option(0.0, "Dropout on the adapters' input while training, in [0, 1).")
    target_modules: list[str] = option(
        ["all-linear"],
        "The module names that get adapters (suffixes such as q_proj, v_proj), or [all-linear]: every linear layer "
        "but the LM head.",
    )
    sync: str = option(
        "merged",
        "What the samplers receive after each step. merged: full weights, each adapted matrix W + (alpha / rank) "
        "B @ A computed one tensor at a time without touching the trained model; adapters: with rollout.backend="
        "vllm, the adapter files only, loaded through vLLM's /v1/load_lora_adapter (servers started with "
        "--enable-lora); the in-process sampler and SGLang always get merged weights.",
        choices=LORA_SYNCS,
    )


@dataclass
class ActorConfig:
    """The policy being trained: optimisation, memory and the PPO/GRPO objective."""

    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    gradient_checkpointing: bool = option(
        False,
        "Recompute each decoder layer's activations in the backward pass instead of keeping them (less memory, "
        "more compute).",
    )
    deterministic: bool = option(
        False, "Deterministic kernels, per-prompt seeded sampling and padded shapes: identical runs from one seed."
    )
    mixed_precision: str = option(
        "none",
        "Autocast of the trainer's forward and backward passes. none: float32 compute; bf16: bfloat16 autocast; "
        "auto: bf16 where the hardware computes it natively (CUDA with bf16, CPUs with AVX512-BF16 or AMX), else "
        "none. Weights, optimizer state and the LM-head projection that scores tokens stay float32; it changes "
        "numerics on purpose (logprob_abs_diff_mean shows by how much the trainer's logprobs then differ from the "
        "sampler's).",
        choices=MIXED_PRECISION,
    )
    parallelism: str = option(
        "ddp",
        "How the policy is spread over data-parallel ranks (engines/parallel.py). ddp: every rank holds the whole "
        "model, gradients and optimizer state (DistributedDataParallel; best for small models); fsdp2: PyTorch "
        "FSDP2 (fully_shard per decoder layer and at the root) keeps 1/ranks of each per rank, with bf16 "
        "parameters and float32 gradient reduction when mixed_precision resolves to bf16. fsdp2 writes recover "
        "checkpoints with torch.distributed.checkpoint (resumable at another rank count).",
        choices=PARALLELISMS,
    )
    cpu_offload: bool = option(
        False,
        "parallelism=fsdp2 only: keep the sharded parameters, gradients and optimizer state in host memory "
        "(FSDP2's CPUOffloadPolicy), copying each layer to the device when it is used.",
    )
    pad_to_maximum: bool = option(
        False,
        "Right-pad every sequence to dataset.max_prompt_length + gconfig.max_new_tokens (static shapes at every "
        "step); deterministic mode turns it on.",
    )
    max_tokens_per_mb: int = option(8192, "Tokens per micro-batch (prompt + completion).")
    ppo_n_minibatches: int = option(1, "Optimizer steps per training batch.")
    eps_clip: float = option(0.2, "The PPO ratio clip: the ratio is kept within [1 - eps_clip, 1 + eps_clip_higher].")
    eps_clip_higher: Optional[float] = option(
        None,
        "The upper ratio clip (DAPO's clip-higher, Yu et al., 2025, arXiv 2503.14476, uses 0.28 with eps_clip 0.2: "
        "unlikely tokens with a positive advantage can gain more probability, against entropy collapse); null: "
        "eps_clip.",
    )
    c_clip: Optional[float] = option(
        None,
        "Dual clip (Ye et al., 2020, arXiv 1912.09729; 3 in the paper): a token with a negative advantage adds at "
        "most c_clip x |advantage| to the loss whatever its ratio; null: off.",
    )
    reward_scaling: float = option(1.0, "The advantage's input is (reward + reward_bias) * reward_scaling.")
    reward_bias: float = option(0.0, "Added to each reward before scaling (see reward_scaling).")
    kl_ctl: float = option(0.0, "KL penalty coefficient against the initial policy; 0 disables the penalty.")
    kl_estimator: str = option(
        "k3",
        "The estimator of the KL penalty in the loss (Schulman, 'Approximating KL Divergence', 2020). k3, as "
        "GRPO (DeepSeekMath eq. 4): unbiased and >= 0; k2: r^2/2; k1 is refused there, because the gradient of "
        "log p - log p_ref is zero on average under the policy's own samples.",
        choices=KL_ESTIMATORS,
    )
    adv_estimator: str = option(
        "grpo",
        "How a sequence's advantage comes from the rewards. grpo: minus the group mean, over the group std "
        "(DeepSeekMath, arXiv 2402.03300; see group_reward_norm, group_adv_std_norm); rloo: minus the mean of the "
        "other samples of its prompt (Ahmadian et al., 2024, arXiv 2402.14740); reinforce_plus_plus: minus the "
        "group mean when group_reward_norm (else the raw reward), normalised by the global batch's mean and std "
        "(Hu, 2025, arXiv 2501.03262); gae: PPO with a critic (the `critic` section), generalised advantage "
        "estimation per token (Schulman et al., 2016, arXiv 1506.02438) with gae_gamma and gae_lambda.",
        choices=ADV_ESTIMATORS,
    )
    gae_gamma: float = option(1.0, "adv_estimator=gae: the discount per token (1: none, as usual for LLMs).")
    gae_lambda: float = option(
        0.95, "adv_estimator=gae: GAE's lambda, between the critic's one-step estimate (0) and the Monte Carlo return (1)."
    )
    importance_level: str = option(
        "token",
        "The PPO ratio. token: per token; sequence: GSPO (Zheng et al., 2025, arXiv 2507.18071), one ratio per "
        "sequence, exp(mean over its tokens of log pi - log pi_old), clipped per sequence (the paper clips at "
        "eps_clip 3e-4, eps_clip_higher 4e-4), with the token-mean loss.",
        choices=IMPORTANCE_LEVELS,
    )
    group_reward_norm: bool = option(
        True,
        "grpo and reinforce_plus_plus: subtract each prompt's group mean from its rewards; false uses the shifted, "
        "scaled reward itself (grpo: as the advantage, REINFORCE with baseline -reward_bias). rloo always uses "
        "its leave-one-out baseline.",
    )
    group_adv_std_norm: bool = option(
        True, "grpo: divide the group-normalised advantage by the group's std (Dr. GRPO sets false)."
    )
    loss_normalization: str = option(
        "token",
        "The PPO loss's denominator. token: the batch's trained-token count (DAPO's token-level mean); constant: "
        "sequences x gconfig.max_new_tokens (Dr. GRPO, Liu et al., 2025, arXiv 2503.20783, together with "
        "group_adv_std_norm=false).",
        choices=LOSS_NORMALIZATIONS,
    )
    overlong_buffer_tokens: int = option(
        0,
        "DAPO's soft overlong punishment (Yu et al., 2025, arXiv 2503.14476), in tokens: a completion longer than "
        "gconfig.max_new_tokens minus this loses up to overlong_penalty reward, linearly over the buffer. 0: off.",
    )
    overlong_penalty: float = option(1.0, "The reward lost by a completion that reaches gconfig.max_new_tokens.")
    dynamic_sampling: bool = option(
        False,
        "DAPO's dynamic sampling: drop prompt groups whose rewards are all equal (no advantage, no gradient) and "
        "keep generating until the batch is full.",
    )
    recompute_logprob: Optional[bool] = option(
        None,
        "Recompute logprobs with the current weights before the update: the proximal policy of the decoupled loss "
        "(the trust-region anchor), or the PPO anchor without it. null: only when the trainer computes in another "
        "precision than the sampler (mixed_precision bf16 against a float32 sampler), and only the anchors of the "
        "tokens the current weights sampled, so the first PPO ratio is 1 (benchmarks/first_ratio.py).",
    )
    use_decoupled_loss: bool = option(False, "AReaL's decoupled PPO objective (needs recompute_logprob).")
    behav_imp_weight_cap: Optional[float] = option(
        None,
        "Tokens whose behaviour importance weight exceeds this are masked out of the decoupled loss; null: no cap.",
    )
    tis_cap: Optional[float] = option(
        None,
        "Truncated importance sampling against the sampler-trainer mismatch (Yao et al., 2025, 'Your efficient RL "
        "framework secretly brings you off-policy RL training'; C = 2 there): each token's loss is weighted by "
        "rho = pi_trainer_old / pi_sampler, truncated at this cap (see tis_mode). Needs recompute_logprob (the "
        "trainer's own logprobs) and not use_decoupled_loss (whose behaviour weight already corrects it); null: off.",
    )
    tis_mode: str = option(
        "truncate",
        "How tis_cap bounds rho. truncate: weight min(rho, tis_cap); mask: weight rho, and tokens with "
        "rho > tis_cap are dropped from the loss (counted in masked_fraction).",
        choices=TIS_MODES,
    )


@dataclass
class CriticConfig:
    """The value model of PPO with a critic (`actor.adv_estimator=gae`): a value head on a
    copy of the initial policy, trained on the GAE returns with its own optimizer."""

    optimizer: OptimizerConfig = field(default_factory=lambda: OptimizerConfig(lr=1e-5))
    value_eps_clip: Optional[float] = option(
        0.2,
        "PPO's value clip: the new value may move at most this far from the one the advantages were computed "
        "with, and the loss is the larger of the clipped and unclipped squared errors; null: no clip.",
    )
