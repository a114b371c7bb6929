"""Per-token logprobs without materialising [B, L, V] logits.

The vocabulary is the largest dimension in a small policy (SmolLM2-135M: V = 49,152
against a hidden size of 576), so one float32 logits tensor for a 4,096-token micro-batch
is 805 MB, and a log-softmax, its gradient and a temperature-scaled copy multiply that.
Both consumers of logprobs avoid it:

* the trainer (`token_logprobs`) runs the decoder once, keeps only the final hidden
  states of the positions it scores, and projects them onto the vocabulary a chunk of
  positions at a time (`selective_log_softmax`); each chunk's [chunk, V] logits are
  recomputed in the backward pass instead of being kept (activation checkpointing);
* the sampler (`SampledTokenLogprobs`) records log p(sampled token) as decoding goes,
  holding one [B, V] slice, where `output_logits=True` keeps every step's [B, V].

Both score tokens under the temperature-scaled distribution before top-k / top-p
filtering, so on-policy importance ratios start at 1.
"""

from __future__ import annotations

import inspect
from typing import Optional

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import LogitsProcessor

# Most bytes of float32 logits held at once per chunk of scored positions.
LOGITS_CHUNK_BYTES = 64 << 20


def _scaled_logprobs(logits: torch.Tensor, targets: torch.Tensor, temperature: float, with_entropy: bool):
    """(log p(targets), entropy or None) of float32 `logits` [..., V] at `temperature`;
    the entropy (nats) is computed without gradient: it is a statistic, not a loss term."""
    if temperature > 0:
        logits = logits / temperature
    log_norm = torch.logsumexp(logits, dim=-1)
    logp = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - log_norm
    if not with_entropy:
        return logp, None
    with torch.no_grad():
        # H = log Z - E_p[z], without materialising log p over the vocabulary.
        entropy = log_norm - (torch.softmax(logits, dim=-1) * logits).sum(dim=-1)
    return logp, entropy


def _chunk_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, temperature: float,
                    with_entropy: bool = False):
    # In float32 also under autocast: bf16 logits of magnitude ~20 are off by up to 0.06,
    # which would show up directly in every logprob and importance ratio.
    with torch.autocast(hidden.device.type, enabled=False):
        logits = nn.functional.linear(hidden.float(), weight.float())
    logp, entropy = _scaled_logprobs(logits, targets, temperature, with_entropy)
    return (logp, entropy) if with_entropy else logp


def selective_log_softmax(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    temperature: float,
    chunk_bytes: Optional[int] = None,
    with_entropy: bool = False,
):
    """log softmax(hidden @ weight.T / temperature)[n, targets[n]] for each row n.

    Args:
        hidden: [N, D] final hidden states (any float dtype), one row per scored position.
        weight: [V, D] the output projection (the LM head).
        targets: [N] long, the token each row scores.
        temperature: divides the logits when > 0 (0 means greedy: raw logits).
        chunk_bytes: float32 logits held at once, bytes (default `LOGITS_CHUNK_BYTES`);
            rows are processed in chunks of `chunk_bytes // (4 V)`. Under autograd each chunk is checkpointed, so its
            logits are recomputed in the backward pass rather than stored.
        with_entropy: also return each row's entropy of the same distribution.
    Returns:
        [N] float32 logprobs; with `with_entropy`, a pair (logprobs, [N] float32
        entropies in nats, without gradient).
    """
    rows = max(1, (chunk_bytes or LOGITS_CHUNK_BYTES) // (4 * weight.shape[0]))
    track = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    parts = []
    for start in range(0, hidden.shape[0], rows):
        args = (hidden[start : start + rows], weight, targets[start : start + rows], temperature, with_entropy)
        parts.append(checkpoint(_chunk_logprobs, *args, use_reentrant=False) if track else _chunk_logprobs(*args))
    empty = hidden.new_zeros(0, dtype=torch.float32)
    if not with_entropy:
        return torch.cat(parts) if parts else empty
    if not parts:
        return empty, empty
    return torch.cat([p for p, _ in parts]), torch.cat([e for _, e in parts])


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def supports_selective_logprobs(model: nn.Module) -> bool:
    """Whether `model`'s logits are exactly `lm_head(final hidden state)`: a bias-free
    linear head, no logit scaling or soft-capping (Gemma, Cohere), and a forward that
    takes `logits_to_keep`. Other models fall back to full logits."""
    model = _unwrap(model)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    config = getattr(model, "config", None)
    return (
        isinstance(head, nn.Linear)
        and head.bias is None
        and getattr(config, "final_logit_softcapping", None) is None
        and getattr(config, "logit_scale", None) in (None, 1.0)
        and "logits_to_keep" in inspect.signature(model.forward).parameters
    )


def token_logprobs(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    temperature: float,
    score_mask: Optional[torch.Tensor] = None,
    with_entropy: bool = False,
):
    """log p(input_ids[:, t] | input_ids[:, :t]) under `model` at `temperature`.

    Args:
        model: a transformers causal LM, possibly wrapped in DistributedDataParallel
            (called through the wrapper, so gradients are all-reduced).
        input_ids, attention_mask: [B, L] long, right-padded.
        score_mask: [B, L] 0/1, the positions to score (the trainer passes `loss_mask`);
            default: every real token after the first.
        with_entropy: also return the entropy of the distribution each scored token was
            drawn from (the policy's token entropy, a collapse detector), from the same
            logits, so it costs no extra forward pass.
    Returns:
        [B, L] float32, differentiable when grad is enabled; 0 at position 0 (nothing
        predicts the first token), on padding and wherever `score_mask` is 0. With
        `with_entropy`, a pair (logprobs, [B, L] float32 entropies in nats, without
        gradient, 0 where logprobs are 0).
    """
    B, L = input_ids.shape
    mask = attention_mask if score_mask is None else score_mask * attention_mask
    mask = mask[:, 1:].bool()  # position t is predicted from the hidden state at t - 1
    targets = input_ids[:, 1:]
    if not supports_selective_logprobs(model):
        logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits.float()
        logp, entropy = _scaled_logprobs(logits[:, :-1], targets, temperature, with_entropy)
        logp = torch.nn.functional.pad(logp * mask, (1, 0))
        return (logp, torch.nn.functional.pad(entropy * mask, (1, 0))) if with_entropy else logp
    # logits_to_keep=1 skips the [B, L, V] projection; the hidden states feed our own.
    outputs = model(
        input_ids=input_ids, attention_mask=attention_mask, use_cache=False, logits_to_keep=1, output_hidden_states=True
    )
    hidden = outputs.hidden_states[-1][:, :-1][mask]  # [N, D], after the final norm
    weight = _unwrap(model).get_output_embeddings().weight
    scored = selective_log_softmax(hidden, weight, targets[mask], temperature, with_entropy=with_entropy)

    def unpack(values: torch.Tensor) -> torch.Tensor:
        shifted = torch.zeros(B, L - 1, dtype=torch.float32, device=input_ids.device).masked_scatter(mask, values)
        return torch.nn.functional.pad(shifted, (1, 0))

    return (unpack(scored[0]), unpack(scored[1])) if with_entropy else unpack(scored)


class SampledTokenLogprobs(LogitsProcessor):
    """Records the logprob of each sampled token during `model.generate`, holding one
    [B, V] float32 log-softmax at a time.

    transformers calls custom logits processors before its temperature / top-k / top-p
    warpers, so `scores` are the model's logits; this processor returns them unchanged.
    At decoding step t it scores the token sampled at step t - 1 (now the last column of
    `input_ids`); `finish` scores the final one.
    """

    def __init__(self, temperature: float) -> None:
        self.temperature = temperature
        self._last: Optional[torch.Tensor] = None  # [B, V] float32 log-softmax of the previous step
        self._values: list[torch.Tensor] = []  # [B] per finished step

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self._last is not None:
            self._values.append(self._last.gather(-1, input_ids[:, -1:]).squeeze(-1))
        logits = scores.float()
        if self.temperature > 0:
            logits = logits / self.temperature
        self._last = torch.log_softmax(logits, dim=-1)
        return scores

    def finish(self, new_tokens: torch.Tensor) -> torch.Tensor:
        """[B, T] float32 logprobs of `new_tokens` ([B, T] long, the generated columns)."""
        if self._last is not None:
            self._values.append(self._last.gather(-1, new_tokens[:, -1:]).squeeze(-1))
            self._last = None
        values = torch.stack(self._values, dim=1) if self._values else torch.zeros(new_tokens.shape[0], 0, device=new_tokens.device)
        return values[:, : new_tokens.shape[1]]
