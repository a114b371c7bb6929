"""LoRA on the policy through peft (Hu et al., 2021, "LoRA: Low-Rank Adaptation of Large
Language Models", arXiv 2106.09685).

`apply_lora` injects adapters into the transformers model in place (peft's
`get_peft_model`): every targeted `nn.Linear` becomes a peft `lora.Linear` whose base
weight W is frozen and whose output adds `(alpha / rank) * B @ A @ x`, with B initialised
to zero so that step 0 is the base model exactly. The trainer keeps calling the
transformers model itself (its forward, `logits_to_keep`, LM head and state all stay
reachable), and the `PeftModel` returned is kept beside it for what only peft knows:
`disable_adapter()` (the base model, i.e. the KL reference, without a second copy) and
the adapters' own state dict (recover checkpoints, `/v1/load_lora_adapter`).

Samplers and exports receive merged weights (engines/lora_merge.py: W + (alpha / rank)
B @ A one tensor at a time, the trained model untouched).
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import load_file
from torch import nn

from engines.config import LoraConfig
from engines.lora_merge import merged_named_tensors, merged_state_dict
from engines.weights import publish_directory, publish_weights

ADAPTER_NAME = "default"  # peft's name for the one adapter get_peft_model creates
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def apply_lora(model: nn.Module, cfg: LoraConfig):
    """Inject LoRA adapters into `model` (in place) and freeze everything else.

    Args:
        model: a transformers causal LM in float weights.
        cfg: `actor.lora` (rank, alpha, dropout, target modules).
    Returns:
        The `peft.PeftModel` around `model`; `model` itself now holds the adapters, with
        only their A and B matrices requiring gradients.
    Raises:
        ValueError: no module of `model` matches `cfg.target_modules` (peft's message).
    """
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    targets = list(cfg.target_modules)
    peft_cfg = PeftLoraConfig(
        r=cfg.rank,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        # peft expands the string "all-linear" (every linear layer but the output head);
        # a list is matched as module-name suffixes.
        target_modules="all-linear" if targets == ["all-linear"] else targets,
        bias="none",
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, peft_cfg, adapter_name=ADAPTER_NAME)


def save_adapter(peft_model, path: Path) -> Path:
    """Write the adapters only (peft's format: `adapter_config.json` +
    `adapter_model.safetensors`, which `PeftModel.from_pretrained` and vLLM's LoRA loader
    read) to the directory `path`; returns it."""
    path = Path(path)
    peft_model.save_pretrained(str(path), safe_serialization=True)
    return path


def load_adapter(peft_model, path: Path) -> None:
    """Load adapters written by `save_adapter` into `peft_model` (in place).

    Raises:
        FileNotFoundError: `path` holds no adapter files.
        ValueError: they do not fit this model's adapters (another rank, other target
            modules, another base model).
    """
    from peft import set_peft_model_state_dict

    path = Path(path)
    if not (path / ADAPTER_WEIGHTS).is_file():
        raise FileNotFoundError(f"no LoRA adapter ({ADAPTER_WEIGHTS}) in {path}")
    saved = json.loads((path / ADAPTER_CONFIG).read_text())
    ours = peft_model.peft_config[ADAPTER_NAME]
    if saved.get("r") != ours.r or sorted(saved.get("target_modules") or []) != sorted(ours.target_modules or []):
        raise ValueError(
            f"the LoRA adapter in {path} (rank {saved.get('r')}, targets {saved.get('target_modules')}) does not fit "
            f"this run's actor.lora (rank {ours.r}, targets {sorted(ours.target_modules or [])})"
        )
    result = set_peft_model_state_dict(peft_model, load_file(str(path / ADAPTER_WEIGHTS)), adapter_name=ADAPTER_NAME)
    unexpected = list(getattr(result, "unexpected_keys", []) or [])
    missing = [k for k in getattr(result, "missing_keys", []) or [] if ".lora_" in k]
    if unexpected or missing:
        raise ValueError(f"the LoRA adapter in {path} does not match the model: missing={missing} unexpected={unexpected}")


def is_adapter_dir(path: Path) -> bool:
    """Whether `path` holds adapters written by `save_adapter` (not full weights)."""
    return (Path(path) / ADAPTER_CONFIG).is_file()


def save_merged(model: nn.Module, path: Path) -> None:
    """Write `model` with its adapters merged as a Hugging Face model directory (config +
    safetensors) that `AutoModelForCausalLM.from_pretrained` loads as a plain model."""
    state = merged_state_dict(model)
    # The transformers model that holds the adapters saves under the base names given in
    # `state_dict`; tied embeddings are written once, as for an unadapted model.
    model.save_pretrained(Path(path), state_dict=state, safe_serialization=True)


class LoraAdapters:
    """The LoRA side of a `TrainEngine` (engines/train_engine.py): the adapters injected
    into its policy and what the engine does differently because of them.

    Args:
        model: the trainer's transformers model; adapters are injected into it in place.
        cfg: `actor.lora`.
    """

    def __init__(self, model: nn.Module, cfg: LoraConfig) -> None:
        self.model = model
        self.cfg = cfg
        self.peft = apply_lora(model, cfg)

    def reference(self):
        """A context in which `model` computes as the base model (peft's
        `disable_adapter()`): the KL reference policy, without a second copy."""
        return self.peft.disable_adapter()

    def upload(self, inference_engine, version: int) -> None:
        """Send policy `version` to an inference engine: merged tensors one at a time to an
        in-process sampler; to servers, a versioned directory of merged weights, or of the
        adapters alone when `sync=adapters` and the client loads adapters
        (`accepts_lora_adapters`, vLLM)."""
        weights_dir = getattr(inference_engine, "weights_dir", None)
        if weights_dir is None:
            inference_engine.update_weights(merged_named_tensors(self.model))
            return
        if self.cfg.sync == "adapters" and getattr(inference_engine, "accepts_lora_adapters", False):
            path = publish_adapter(self.peft, weights_dir, version)
        else:
            path = publish_weights(self.model, weights_dir, version)
        inference_engine.update_weights_from_disk(path, version)

    def save(self, path: Path, tokenizer=None, *, adapters_only: bool = False) -> None:
        """The adapters alone (`adapters_only`: recover checkpoints, a few MB), or the
        merged model as a plain Hugging Face directory (exports)."""
        if adapters_only:
            save_adapter(self.peft, path)
        else:
            save_merged(self.model, path)
        if tokenizer is not None:
            tokenizer.save_pretrained(path)

    def load(self, path: Path) -> None:
        """Load the adapters `save(..., adapters_only=True)` wrote.

        Raises:
            ValueError: `path` holds full weights (a run without LoRA wrote it), or
                adapters of another shape.
        """
        if not is_adapter_dir(path):
            raise ValueError(f"{path} holds full model weights, not LoRA adapters; resume with actor.lora.enabled=false "
                             "or set trainer.resume=false")
        load_adapter(self.peft, path)


def publish_adapter(peft_model, root: Path, version: int, keep: int = 2) -> Path:
    """`save_adapter` into `<root>/v<version>`, atomically and with the same versioning as
    `engines.weights.publish_weights`; returns the directory.

    Raises:
        OSError: the write failed (nothing is left under the final name).
    """
    return publish_directory(root, version, lambda tmp: save_adapter(peft_model, tmp), keep=keep)
