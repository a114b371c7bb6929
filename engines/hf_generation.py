"""transformers' `model.generate`, configured to sample exactly what a request asks: the
complete generation config (nothing filled in from a checkpoint's `generation_config.json`)
and a stop that ends decoding when the engine is destroyed. Used by
engines/inference.py's `LocalInferenceEngine`."""

from __future__ import annotations

import threading

import torch
from transformers import GenerationConfig as HFGenerationConfig
from transformers import StoppingCriteria


class StopWhenSet(StoppingCriteria):
    """Ends `model.generate` at the next token once `event` is set (engine destroyed)."""

    def __init__(self, event: threading.Event) -> None:
        self.event = event

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


class ExplicitGenerationConfig(HFGenerationConfig):
    """A transformers generation config that `model.generate` cannot complete from the
    model's own `generation_config`.

    `generate` fills every field a passed config leaves None from `model.generation_config`
    (`update(defaults_only=True)`), so a checkpoint's `repetition_penalty`,
    `no_repeat_ngram_size`, `min_new_tokens`, `suppress_tokens`, ... would shape the
    sampled distribution and the recorded logprobs, which the trainer never applies.
    Those fill-ins are refused here; `sampling_config` sets every field sampling needs.
    """

    def update(self, defaults_only: bool = False, allow_custom_entries: bool = False, **kwargs):
        if defaults_only:
            return kwargs
        return super().update(defaults_only=defaults_only, allow_custom_entries=allow_custom_entries, **kwargs)


def sampling_config(
    temperature: float, top_p: float, top_k: int | None, max_new_tokens: int, stop_ids: list[int], pad_token_id: int
) -> ExplicitGenerationConfig:
    """The complete generation config of one request: its temperature, top-k, top-p and
    budget (tokens), and the neutral value of every other processor (transformers' global
    defaults), whatever the model's `generation_config.json` says, as the vLLM and SGLang
    paths do (engines/servers.py, engines/remote_sglang.py)."""
    sample = temperature > 0
    return ExplicitGenerationConfig(
        do_sample=sample,
        # Greedy decoding takes no warpers; set, transformers warns that they are ignored.
        temperature=temperature if sample else 1.0,
        top_p=top_p if sample else 1.0,
        top_k=top_k if sample else None,
        max_new_tokens=max_new_tokens,
        # min_new_tokens stays None (no processor): set beside min_length, transformers
        # warns on every call.
        min_length=0, num_beams=1, num_beam_groups=1, num_return_sequences=1, early_stopping=False,
        typical_p=1.0, epsilon_cutoff=0.0, eta_cutoff=0.0, repetition_penalty=1.0, encoder_repetition_penalty=1.0,
        length_penalty=1.0, no_repeat_ngram_size=0, encoder_no_repeat_ngram_size=0, diversity_penalty=0.0,
        remove_invalid_values=False, renormalize_logits=False, output_scores=False, return_dict_in_generate=False,
        eos_token_id=list(stop_ids),
        pad_token_id=pad_token_id,
        use_cache=True,  # also when training turned it off for gradient checkpointing
        disable_compile=True,  # compiling for one batch shape costs more than it saves
    )
