"""The critic of PPO with a value function (`actor.adv_estimator=gae`).

`ValueModel` puts a value head on the policy's architecture; `CriticEngine` scores a
batch's states and trains them towards the GAE returns with PPO's clipped value loss,
with its own optimizer and LR schedule from the same factories as the policy's
(engines/factories.py). Values are aligned with the logprobs (engines/ppo.py):
`values[:, t]` is V of the state that token t was sampled from, read from the final
hidden state at t - 1, and 0 outside `loss_mask`.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from engines.config import CriticConfig
from engines.factories import autocast, create_lr_scheduler, create_optimizer
from engines.micro_batches import micro_batches


class ValueModel(nn.Module):
    """A causal LM's decoder with a linear value head on its final hidden states.

    The head starts at zero, so the first values are 0 and the first advantages are the
    discounted rewards themselves (what REINFORCE would use).

    Args:
        lm: a transformers causal LM (its LM head is not used); usually a copy of the
            initial policy, as PPO for language models initialises the critic.
    """

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm
        parameter = next(lm.parameters())
        self.value_head = nn.Linear(lm.config.hidden_size, 1, device=parameter.device, dtype=torch.float32)
        nn.init.zeros_(self.value_head.weight)
        nn.init.zeros_(self.value_head.bias)
        # logits_to_keep=1 spares the [B, L, V] projection the value head does not need.
        self._keep = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(lm.forward).parameters else {}

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """[B, L] long ids and mask -> [B, L] float32 values, 0 at position 0 (no state
        precedes the first token)."""
        out = self.lm(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, output_hidden_states=True,
                      **self._keep)
        with torch.autocast(input_ids.device.type, enabled=False):
            values = self.value_head(out.hidden_states[-1].float()).squeeze(-1)
        return nn.functional.pad(values[:, :-1], (1, 0))


def clipped_value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    loss_mask: torch.Tensor,
    *,
    value_eps_clip: Optional[float],
    num_loss_tokens: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's value loss (Schulman et al., 2017, arXiv 1707.06347, as in its baselines
    code): 0.5 max((V - R)^2, (V_old + clip(V - V_old, -eps, eps) - R)^2) per token, summed
    over the trained tokens and divided by `num_loss_tokens`.

    Args:
        values: [B, L] float32, differentiable; old_values, returns: [B, L] float32.
        loss_mask: [B, L] 0/1.
        value_eps_clip: eps, or None for the plain squared error.
    Returns:
        (loss scalar, share of trained tokens where the clipped error was the larger).
    """
    mask = loss_mask.float()
    error = (values - returns).square()
    if value_eps_clip is None:
        clipped_share = torch.zeros((), device=values.device)
        worst = error
    else:
        moved = old_values + (values - old_values).clamp(-value_eps_clip, value_eps_clip)
        clipped_error = (moved - returns).square()
        worst = torch.maximum(error, clipped_error)
        clipped_share = ((clipped_error > error).float() * mask).sum().detach() / mask.sum().clamp(min=1)
    return 0.5 * (worst * mask).sum() / max(num_loss_tokens, 1.0), clipped_share


@dataclass
class CriticStats:
    """One critic update: loss, gradient norm before clipping, clipped share, averaged
    over the minibatches; `explained_variance` = 1 - Var(R - V_old) / Var(R) over the
    trained tokens (1: the values predicted the returns, 0: no better than their mean)."""

    value_loss: float
    value_grad_norm: float
    value_clip_fraction: float
    explained_variance: float


class CriticEngine:
    """The value model, its optimizer and its update.

    Args:
        cfg: the `critic` section.
        model: a `ValueModel`.
        total_steps: training steps in the run (sizes the LR schedule).
        n_minibatches: optimizer steps per batch (`actor.ppo_n_minibatches`).
        max_tokens_per_mb: padded tokens per micro-batch (`actor.max_tokens_per_mb`).
        pad_to: pad every micro-batch to this width (0: to its longest row).
        autocast_dtype: the trainer's mixed precision (None: float32).
    """

    def __init__(self, cfg: CriticConfig, model: ValueModel, *, total_steps: int, n_minibatches: int = 1,
                 max_tokens_per_mb: int = 8192, pad_to: int = 0, autocast_dtype: Optional[torch.dtype] = None):
        self.cfg, self.model = cfg, model
        self.n_minibatches, self.max_tokens, self.pad_to = n_minibatches, max_tokens_per_mb, pad_to
        self.autocast_dtype = autocast_dtype
        self.device = next(model.parameters()).device
        self.optimizer = create_optimizer(model.parameters(), cfg.optimizer)
        self.lr_scheduler = create_lr_scheduler(self.optimizer, cfg.optimizer, total_steps=total_steps * n_minibatches)

    def _micro_batches(self, batch: dict[str, torch.Tensor]):
        return micro_batches(batch, max_tokens=self.max_tokens, pad_to=self.pad_to, device=self.device)

    @torch.no_grad()
    def compute_values(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """[B, L] float32 values of `batch["input_ids"]`'s states, on the CPU, 0 outside
        `batch["loss_mask"]`."""
        was_training = self.model.training
        self.model.eval()
        B, L = batch["input_ids"].shape
        out = torch.zeros(B, L, dtype=torch.float32)
        tokens = {k: batch[k] for k in ("input_ids", "attention_mask", "loss_mask")}
        for idx, mb in self._micro_batches(tokens):
            with autocast(self.autocast_dtype, self.device):
                values = self.model(mb["input_ids"], mb["attention_mask"]) * mb["loss_mask"]
            width = min(L, values.shape[1])
            out[idx, :width] = values[:, :width].float().cpu()
        self.model.train(was_training)
        return out

    def train_batch(self, batch: dict[str, torch.Tensor]) -> CriticStats:
        """Fit the values to `batch["returns"]` ([B, L] float32), anchored at
        `batch["values"]` (the values the advantages were computed with), in
        `n_minibatches` optimizer steps."""
        self.model.train()
        keys = ("input_ids", "attention_mask", "loss_mask", "values", "returns")
        B = batch["input_ids"].shape[0]
        records = []
        for idx in torch.arange(B).chunk(min(self.n_minibatches, B)):
            records.append(self._optimizer_step({k: batch[k][idx] for k in keys}))
        mask = batch["loss_mask"].bool()
        returns = batch["returns"][mask].double()
        residual = returns - batch["values"][mask].double()
        variance = float(returns.var(unbiased=False)) if returns.numel() else 0.0
        explained = 1.0 - float(residual.var(unbiased=False)) / variance if variance > 0 else float("nan")
        return CriticStats(
            value_loss=sum(r[0] for r in records) / len(records),
            value_grad_norm=sum(r[1] for r in records) / len(records),
            value_clip_fraction=sum(r[2] for r in records) / len(records),
            explained_variance=explained,
        )

    def _optimizer_step(self, mini: dict[str, torch.Tensor]) -> tuple[float, float, float]:
        self.optimizer.zero_grad(set_to_none=True)
        num_tokens = float(mini["loss_mask"].sum())
        loss_sum, clipped_sum = 0.0, 0.0
        for _, mb in self._micro_batches(mini):
            with autocast(self.autocast_dtype, self.device):
                values = self.model(mb["input_ids"], mb["attention_mask"])
            loss, clipped = clipped_value_loss(values.float(), mb["values"], mb["returns"], mb["loss_mask"],
                                               value_eps_clip=self.cfg.value_eps_clip, num_loss_tokens=num_tokens)
            loss.backward()
            loss_sum += float(loss.detach())
            clipped_sum += float(clipped) * float(mb["loss_mask"].sum()) / max(num_tokens, 1.0)
        max_norm = self.cfg.optimizer.gradient_clipping or float("inf")
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.lr_scheduler.step()
        return loss_sum, grad_norm, clipped_sum

    def save(self, path: Path) -> None:
        """Write the value model's weights (`value_model.safetensors`) and the optimizer
        and LR-scheduler state (`optimizer.pt`) into the directory `path`."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        # Tied embeddings share storage, which safetensors refuses; contiguous copies do not.
        state = {k: v.detach().contiguous().clone() for k, v in self.model.state_dict().items()}
        save_file(state, str(path / "value_model.safetensors"))
        torch.save({"optimizer": self.optimizer.state_dict(), "lr_scheduler": self.lr_scheduler.state_dict()},
                   path / "optimizer.pt")

    def load(self, path: Path) -> None:
        """Restore what `save` wrote.

        Raises:
            FileNotFoundError: a file of `save` is missing under `path`.
            ValueError: the weights or optimizer state do not fit this critic.
        """
        path = Path(path)
        for name in ("value_model.safetensors", "optimizer.pt"):
            if not (path / name).is_file():
                raise FileNotFoundError(f"no critic {name} in {path}")
        try:
            self.model.load_state_dict(load_file(str(path / "value_model.safetensors")), strict=True)
            state = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
            self.optimizer.load_state_dict(state["optimizer"])
            self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        except (KeyError, RuntimeError, ValueError) as exc:
            raise ValueError(f"critic state {path} does not fit this critic: {exc}") from exc
