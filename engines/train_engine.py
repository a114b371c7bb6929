"""The training engine: one policy, its optimizer and schedule, and the PPO/GRPO update.

Built only through the factories in `engines/factories.py`. It works on padded token
batches (dicts of tensors, see `workflows/rollout/batch.py`) and knows nothing of text, rewards
or rollouts.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
from safetensors.torch import load_file
from torch import nn

from engines.config import ActorConfig
from engines.distributed import DistributedContext
from engines.distributed_lock import DistributedLock
from engines.factories import (
    autocast,
    build_ac_config,
    create_lr_scheduler,
    create_optimizer,
    resolve_mixed_precision,
    validate_and_force_pad_to_maximum,
)
from engines.logprobs import token_logprobs
from engines.lora import LoraAdapters
from engines.micro_batches import micro_batches
from engines.parallel import (
    clip_grad_norm,
    full_tensors,
    gradient_sync,
    is_sharded,
    pad_to_common_count,
    wrap_data_parallel,
)
from engines.ppo import kl_penalty, masked_mean, ppo_clipped_loss
from engines.sharded_state import gather_full_state, is_main, load_full_state
from engines.train_stats import TrainStats, average_minibatches
from engines.weights import publish_weights


class TrainEngine:
    """The policy under training.

    Args:
        cfg: the actor config (optimizer, schedule, micro-batching, loss knobs).
        model: a transformers causal LM (float weights).
        total_steps: training steps in the run; sizes the LR schedule.
        max_sequence_tokens: the longest possible sequence (prompt + completion), tokens.
        max_new_tokens: the generation budget per completion, tokens; the denominator of
            `actor.loss_normalization=constant` (Dr. GRPO) is sequences x this.
        temperature: sampling temperature, so recomputed logprobs match the sampler's.
        ref_model: frozen initial policy for the KL penalty (needed iff `cfg.kl_ctl > 0`,
            unless `cfg.lora.enabled`: the reference is then `model` with its adapters
            disabled, see `compute_ref_logp`).
        dist_ctx: the data-parallel job this engine belongs to (default: one process).
            With several ranks, each trains on its shard of the global batch through
            `DistributedDataParallel`, which all-reduces gradients in the backward pass.

    `engine_lock` (a `DistributedLock` across ranks, a thread lock in one process) is held
    while weights are uploaded: `with engine.engine_lock: engine.upload_weights(...)`.
    """

    def __init__(
        self,
        cfg: ActorConfig,
        model: nn.Module,
        *,
        total_steps: int,
        max_sequence_tokens: int,
        temperature: float,
        ref_model: Optional[nn.Module] = None,
        dist_ctx: Optional[DistributedContext] = None,
        max_new_tokens: Optional[int] = None,
    ):
        if cfg.kl_ctl > 0 and ref_model is None and not cfg.lora.enabled:
            raise ValueError("actor.kl_ctl > 0 needs a reference model")
        self.cfg = cfg
        self.model = model
        self.ref_model = ref_model.eval().requires_grad_(False) if ref_model is not None else None
        self.temperature = temperature
        self.pad_to = validate_and_force_pad_to_maximum(cfg, max_sequence_tokens=max_sequence_tokens)
        if cfg.loss_normalization == "constant" and not max_new_tokens:
            raise ValueError("actor.loss_normalization=constant needs max_new_tokens (gconfig.max_new_tokens)")
        self.max_new_tokens = max_new_tokens
        # None: float32 compute. The weights stay float32 either way (autocast casts them
        # per matmul), so the optimizer updates full-precision parameters.
        self.autocast_dtype = resolve_mixed_precision(cfg.mixed_precision)
        build_ac_config(model, cfg.gradient_checkpointing)
        # actor.lora: adapters injected into `model` itself, everything else frozen.
        self.lora = LoraAdapters(model, cfg.lora) if cfg.lora.enabled else None
        dist_ctx = dist_ctx or DistributedContext()
        self.world_size = dist_ctx.world_size
        # Every tensor of a step goes where the weights are (engines.model.load_model put
        # them on `model.device`); batches arrive on the CPU and results go back there.
        self.device = next(model.parameters()).device
        # actor.parallelism (engines/parallel.py): DDP's wrapper, or None (FSDP2 shards
        # `model` in place; one-process DDP wraps nothing).
        self.ddp = wrap_data_parallel(model, parallelism=cfg.parallelism, cpu_offload=cfg.cpu_offload,
                                      world_size=self.world_size, device=self.device, param_dtype=self.autocast_dtype)
        self.sharded = is_sharded(model)
        self.engine_lock = (
            DistributedLock("engine-weights", store=dist_ctx.store, rank=dist_ctx.rank)
            # Sharded weights are gathered by every rank together: a lock that admits one
            # rank at a time would deadlock the gather.
            if dist_ctx.store is not None and not self.sharded
            else threading.Lock()
        )
        self.optimizer = create_optimizer([p for p in model.parameters() if p.requires_grad], cfg.optimizer)
        self.lr_scheduler = create_lr_scheduler(
            self.optimizer, cfg.optimizer, total_steps=total_steps * cfg.ppo_n_minibatches
        )
        self._version = 0

    # -- versions and weights --------------------------------------------------------------

    def get_version(self) -> int:
        return self._version

    def set_version(self, version: int) -> None:
        self._version = version

    def upload_weights(self, inference_engine, version: int) -> None:
        """Send the current weights, as policy `version`, to an inference engine: a tensor
        copy in process, or, for an engine with a `weights_dir` (inference servers), a
        versioned directory written atomically (engines/weights.py) that it loads. With
        LoRA, merged weights or adapters (`LoraAdapters.upload`)."""
        if self.lora is not None:
            return self.lora.upload(inference_engine, version)
        weights_dir = getattr(inference_engine, "weights_dir", None)
        if weights_dir is None:
            # Sharded: (name, full tensor) pairs gathered one at a time as they are copied.
            inference_engine.update_weights(full_tensors(self.model) if self.sharded else self.model.state_dict())
            return
        inference_engine.update_weights_from_disk(publish_weights(self.model, weights_dir, version), version)

    def save(self, path: Path, tokenizer=None, *, adapters_only: bool = False) -> None:
        """Write a Hugging Face model directory (config + safetensors) loadable with
        `AutoModelForCausalLM.from_pretrained(path)`, LoRA adapters merged; with LoRA and
        `adapters_only` (recover checkpoints), the adapters alone. Sharded: a collective that
        gathers the weights on rank 0, which alone writes (`path` is ignored elsewhere)."""
        state = gather_full_state(self.model) if self.sharded else None
        if not is_main():
            return
        path = Path(path)
        if self.lora is not None:
            return self.lora.save(path, tokenizer, adapters_only=adapters_only)
        self.model.save_pretrained(path, state_dict=state, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(path)

    def save_optimizer_state(self, path: Path) -> None:
        """Write the optimizer and LR-scheduler state dicts and the policy version to one
        `torch.save` file at `path` (for crash recovery; see workflows/training/recover.py).
        Sharded, the optimizer state goes to the DCP checkpoint (engines/sharded_state.py)
        and this file holds the rest."""
        state = {"lr_scheduler": self.lr_scheduler.state_dict(), "version": self._version}
        if not self.sharded:
            state["optimizer"] = self.optimizer.state_dict()
        torch.save(state, Path(path))

    def load_optimizer_state(self, path: Path) -> int:
        """Restore what `save_optimizer_state` wrote; returns the saved policy version
        (not applied: the caller sets versions on every engine together).

        Raises:
            FileNotFoundError: no file at `path`.
            ValueError: the state does not fit this optimizer (another model or
                `actor.optimizer.type`).
        """
        state = torch.load(Path(path), map_location="cpu", weights_only=True)
        if self.sharded != ("optimizer" not in state):
            raise ValueError(f"optimizer state {path} was written with another actor.parallelism; resume with it")
        try:
            if not self.sharded:
                self.optimizer.load_state_dict(state["optimizer"])
            self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        except (KeyError, ValueError, RuntimeError) as exc:
            raise ValueError(f"optimizer state {path} does not fit this optimizer: {exc}") from exc
        return int(state.get("version", 0))

    def load(self, path: Path) -> None:
        """Load weights written by `save` into the current model.

        Raises:
            FileNotFoundError: `path` holds no `*.safetensors` file.
            ValueError: the weights do not match the model's parameters (or its LoRA adapters).
        """
        if self.lora is not None:
            return self.lora.load(path)
        state = {}
        files = sorted(Path(path).glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"no *.safetensors weights in {path}")
        for file in files:
            state.update(load_file(file))
        if self.sharded:
            return load_full_state(self.model, state)
        missing, unexpected = self.model.load_state_dict(state, strict=False)
        # Tied embeddings are stored once; anything else missing is a real mismatch.
        missing = [k for k in missing if not k.endswith("lm_head.weight")]
        if missing or unexpected:
            raise ValueError(f"checkpoint {path} does not match the model: missing={missing} unexpected={unexpected}")

    # -- computation ----------------------------------------------------------------------------

    def _micro_batches(self, batch: dict[str, torch.Tensor]) -> list[tuple[list[int], dict[str, torch.Tensor]]]:
        """`engines.micro_batches.micro_batches` with this engine's token budget
        (`max_tokens_per_mb`), `pad_to` and device."""
        return micro_batches(batch, max_tokens=self.cfg.max_tokens_per_mb, pad_to=self.pad_to, device=self.device)

    @torch.no_grad()
    def compute_logp(self, batch: dict[str, torch.Tensor], model: Optional[nn.Module] = None) -> torch.Tensor:
        """Per-token logprobs of `batch["input_ids"]` under the current policy (or
        `model`), without gradients. Returns [B, L] float32, same L as the batch; with a
        `loss_mask` in the batch, 0 outside it (only trained tokens are scored)."""
        model = model or self.model
        was_training = model.training
        model.eval()
        B, L = batch["input_ids"].shape
        out = torch.zeros(B, L, dtype=torch.float32, device=self.device)
        # The same micro-batches (and shapes) as the training forward pass; only the
        # trained tokens are scored when the batch says which they are.
        keys = ("input_ids", "attention_mask", "loss_mask")
        tokens = {k: batch[k] for k in keys if k in batch}
        padded, real = pad_to_common_count(self._micro_batches(tokens), model)
        for i, (idx, mb) in enumerate(padded):
            with autocast(self.autocast_dtype, self.device):
                logp = token_logprobs(model, mb["input_ids"], mb["attention_mask"], self.temperature, mb.get("loss_mask"))
            if i >= real:
                continue
            width = min(L, logp.shape[1])
            out[idx, :width] = logp[:, :width]
        model.train(was_training)
        return out.cpu()

    def compute_ref_logp(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """`compute_logp` under the KL reference policy: the frozen initial copy, or with
        LoRA the base model, the adapters disabled for the call (peft's `disable_adapter`)."""
        if self.lora is None:
            return self.compute_logp(batch, model=self.ref_model)
        with self.lora.reference():
            return self.compute_logp(batch)

    def _micro_batch_loss(self, mb: dict[str, torch.Tensor], num_tokens: float):
        """Loss of one micro-batch, normalised by the minibatch's `num_tokens`; returns
        (differentiable loss, PPO statistics, this micro-batch's share of the KL as a
        scalar tensor, the summed token entropy of its trained tokens as a scalar tensor)."""
        cfg = self.cfg
        model = self.ddp if self.ddp is not None else self.model
        with autocast(self.autocast_dtype, self.device):
            logp, entropy = token_logprobs(
                model, mb["input_ids"], mb["attention_mask"], self.temperature, mb["loss_mask"], with_entropy=True
            )
        use_prox = cfg.use_decoupled_loss and "prox_logp" in mb
        out = ppo_clipped_loss(
            logp,
            mb["logprobs"],
            mb["advantages"],
            mb["loss_mask"],
            eps_clip=cfg.eps_clip,
            eps_clip_higher=cfg.eps_clip_higher,
            c_clip=cfg.c_clip,
            num_loss_tokens=num_tokens,
            proximal_logprobs=mb["prox_logp"] if use_prox else None,
            behav_imp_weight_cap=cfg.behav_imp_weight_cap if use_prox else None,
            sampler_logprobs=mb.get("sampler_logp"),
            tis_cap=cfg.tis_cap,
            tis_mode=cfg.tis_mode,
            importance_level=cfg.importance_level,
        )
        loss, kl_value = out.loss, torch.zeros((), device=self.device)
        if cfg.kl_ctl > 0:
            # GRPO puts the KL term in the loss rather than in the reward
            # (DeepSeekMath, arXiv 2402.03300, eq. 3).
            kl = masked_mean(kl_penalty(logp, mb["ref_logp"], cfg.kl_estimator), mb["loss_mask"], num_tokens)
            loss = loss + cfg.kl_ctl * kl
            kl_value = kl.detach()
        return loss, out, kl_value, entropy.sum()

    def train_batch(self, batch: dict[str, torch.Tensor]) -> TrainStats:
        """One PPO/GRPO update on a batch, in `ppo_n_minibatches` optimizer steps.

        Expects [B, L] tensors `input_ids`, `attention_mask`, `loss_mask`, `logprobs`
        (behaviour policy), `advantages` (float32, per token), and optionally
        `prox_logp` (decoupled loss), `sampler_logp` (the sampler's logprobs when
        `logprobs` are the trainer's, for `actor.tis_cap`) and `ref_logp` (KL penalty).

        Returns statistics averaged over the minibatches (loss, grad norm before clipping,
        lr, clip fraction, importance weights, KL).
        """
        self.model.train()
        B = batch["input_ids"].shape[0]
        n_mini = min(self.cfg.ppo_n_minibatches, B)
        minibatches = [idx.tolist() for idx in torch.arange(B).chunk(n_mini)]
        records = []
        for idx in minibatches:
            mini = {k: v[idx] for k, v in batch.items()}
            records.append(self._optimizer_step(mini))
        return average_minibatches(records)

    def _rows_with_gradient(self, mini: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The rows of a minibatch that can change the policy.

        Without a KL term, a sequence whose advantage is 0 on every trained token adds
        exactly 0 to the clipped surrogate and to its gradient (the loss keeps dividing by
        the whole minibatch's token count), so it is left out of the forward and backward
        passes. In GRPO that is every group whose samples all scored the same, most
        groups while a policy rarely or always solves its prompts. With several ranks
        each keeps at least one row so that every rank joins the gradient all-reduce.
        """
        if self.cfg.kl_ctl > 0:
            return mini
        keep = ((mini["advantages"] != 0) & mini["loss_mask"].bool()).any(dim=1)
        if self.world_size > 1 and not keep.any():
            keep[0] = True
        if bool(keep.all()):
            return mini
        return {k: v[keep] for k, v in mini.items()}

    def _optimizer_step(self, mini: dict[str, torch.Tensor]) -> TrainStats:
        cfg = self.cfg
        self.optimizer.zero_grad(set_to_none=True)
        num_tokens = float(mini["loss_mask"].sum())
        if cfg.loss_normalization == "constant":
            # Dr. GRPO: every sequence counts as the full generation budget, so a token's
            # weight does not depend on its answer's length.
            num_tokens = float(len(mini["loss_mask"]) * self.max_new_tokens)
        if self.world_size > 1:
            # Normalise by the token count of the whole global minibatch so that the
            # all-reduced gradient equals the single-process one.
            total = torch.tensor(num_tokens, device=self.device)
            dist.all_reduce(total)
            num_tokens = float(total)
        # Running sums stay on the device and are read once after the loop: reading one
        # per micro-batch (`.item()`) would make the host wait for the GPU each time.
        # float64, as the Python floats they replace. Order: loss, kl, summed entropy,
        # clip fraction, dual-clip fraction, importance weight mean, masked fraction (the
        # last four token-weighted).
        sums = torch.zeros(7, dtype=torch.float64, device=self.device)
        weight_max = torch.zeros((), device=self.device)
        mini = self._rows_with_gradient(mini)
        local_tokens = float(mini["loss_mask"].sum())
        micro_batches = [mb for _, mb in self._micro_batches(mini)] if len(mini["input_ids"]) else []
        micro_batches, real = pad_to_common_count(micro_batches, self.model)
        if not micro_batches:
            # Nothing carries a gradient: the optimizer still steps (zero gradient), as it
            # would have after a backward pass whose loss was exactly zero.
            for param in self.model.parameters():
                if param.requires_grad:
                    param.grad = torch.zeros_like(param)
        for i, mb in enumerate(micro_batches):
            # DDP all-reduces gradients on the last micro-batch's backward only.
            last = i == len(micro_batches) - 1
            with gradient_sync(self.model, self.ddp, last):
                loss, out, kl, entropy = self._micro_batch_loss(mb, num_tokens)
                # The loss is already divided by the global token count, so the gradient
                # we want is the sum over ranks; DDP and FSDP2 average, hence the factor.
                # A padding micro-batch (FSDP2) adds nothing.
                (loss * (self.world_size if i < real else 0.0)).backward()
            if i >= real:
                continue
            share = mb["loss_mask"].sum().double() / max(local_tokens, 1.0)
            stats = (out.clip_fraction, out.dual_clip_fraction, out.importance_weight_mean, out.masked_fraction)
            sums += torch.stack(
                [loss.detach().double(), kl.double(), entropy.double(), *(v.double() * share for v in stats)]
            )
            weight_max = torch.maximum(weight_max, out.importance_weight_max.float())
        if self.world_size > 1:
            dist.all_reduce(sums[:2])  # loss and KL are sums over ranks; the rest stay local
        loss_sum, kl_sum, entropy_sum, clip_fraction, dual_clip_fraction, weight_mean, masked_fraction = sums.tolist()
        max_norm = cfg.optimizer.gradient_clipping if cfg.optimizer.gradient_clipping > 0 else float("inf")
        grad_norm = clip_grad_norm(self.model, max_norm)
        self.optimizer.step()
        # Free the gradients now rather than at the next step: generation runs in between.
        self.optimizer.zero_grad(set_to_none=True)
        lr = self.optimizer.param_groups[0]["lr"]
        self.lr_scheduler.step()
        return TrainStats(
            loss=loss_sum,
            grad_norm=grad_norm,
            lr=lr,
            entropy=entropy_sum / local_tokens if local_tokens else float("nan"),
            clip_fraction=clip_fraction,
            dual_clip_fraction=dual_clip_fraction,
            importance_weight_mean=weight_mean,
            importance_weight_max=float(weight_max),
            masked_fraction=masked_fraction,
            kl=kl_sum,
            num_loss_tokens=int(num_tokens),
        )
