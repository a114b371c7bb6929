"""Inference engines: where rollouts are generated.

The rest of areal sees only the `InferenceEngine` protocol: `await agenerate(request)`
returns the completion's token ids, their logprobs and the policy version that produced
each token. `LocalInferenceEngine` is the embedded default: a copy of the policy in this
process, decoding on one worker thread so the asyncio loop that calls it stays free.
Remote engines (vLLM / SGLang style servers over HTTP) implement the same protocol.

`AREAL_FAULT_GENERATE_FROM_VERSION=N` (tests only) makes every generation at policy
version >= N raise, so every rollout from then on fails (see `rollout.max_consecutive_rejections`).
"""

from __future__ import annotations

import asyncio
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Iterable, Mapping, Optional, Protocol, runtime_checkable

import torch
from transformers import LogitsProcessorList, PreTrainedModel, StaticCache, StoppingCriteriaList

from engines.config import GenerationConfig
from engines.factories import autocast
from engines.hf_generation import StopWhenSet, sampling_config
from engines.logprobs import SampledTokenLogprobs

FAULT_ENV = "AREAL_FAULT_GENERATE_FROM_VERSION"


def inject_generation_fault(version: int) -> None:
    """Raise when `$AREAL_FAULT_GENERATE_FROM_VERSION` is set and `version` has reached it.
    For tests of what a run does when every rollout fails."""
    value = os.environ.get(FAULT_ENV)
    if value is not None and value.strip().isdigit() and version >= int(value):
        raise RuntimeError(f"injected generation failure at policy version {version} ({FAULT_ENV}={value.strip()})")


@dataclass
class GenerationRequest:
    """One completion to sample. Token ids only: engines never see text."""

    input_ids: list[int]
    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    stop_token_ids: list[int] = field(default_factory=list)
    # With a seed, requests sharing it are sampled together, in batches of up to
    # `max_batch_size`, from an RNG seeded with it (batch k > 0 with hash((seed, k))),
    # so the samples do not depend on what else is being generated (deterministic mode;
    # data-parallel ranks then reproduce a single-process run).
    seed: Optional[int] = None

    @classmethod
    def from_gconfig(cls, input_ids: list[int], g: GenerationConfig, seed: Optional[int] = None) -> "GenerationRequest":
        return cls(
            input_ids=list(input_ids),
            max_new_tokens=g.max_new_tokens,
            temperature=g.temperature,
            top_p=g.top_p,
            top_k=g.top_k,
            stop_token_ids=list(g.stop_token_ids),
            seed=seed,
        )

    def sampling_key(self) -> tuple:
        return (self.max_new_tokens, self.temperature, self.top_p, self.top_k, tuple(self.stop_token_ids), self.seed)


@dataclass
class GenerationResponse:
    """A sampled completion.

    `output_logprobs[i]` is log p(output_ids[i]) in float32 under the temperature-scaled
    distribution (before top-k / top-p filtering), the same quantity the trainer
    recomputes. `output_versions[i]` is the policy version that sampled token i.
    """

    input_ids: list[int]
    output_ids: list[int]
    output_logprobs: list[float]
    output_versions: list[int]
    stop_reason: str  # "stop" (EOS or a stop token) | "length" (max_new_tokens reached)


@runtime_checkable
class InferenceEngine(Protocol):
    async def agenerate(self, request: GenerationRequest) -> GenerationResponse: ...

    def update_weights(self, state_dict: Mapping[str, torch.Tensor]) -> None: ...

    def set_version(self, version: int) -> None: ...

    def get_version(self) -> int: ...

    def pause(self) -> None: ...

    def resume(self) -> None: ...


class LocalInferenceEngine:
    """In-process sampling, from a private copy of the policy or from the trainer's own.

    Concurrent `agenerate` calls made on one event loop are gathered into batches of up
    to `max_batch_size` and decoded together with `model.generate` on a single worker
    thread; weight updates run on that same thread, so a batch never mixes versions.

    Args:
        model: a causal LM.
        eos_token_id: ends every completion.
        pad_token_id: fills prompts on the left and finished sequences on the right.
        shares_weights: `model` is the trainer's policy itself, not a copy. Then
            `update_weights` has nothing to copy, and the caller guarantees that no
            generation runs while the trainer updates the weights (synchronous RL, where
            the staleness bound leaves no rollout running during a training step). A
            private copy (the default) is moved to eval mode and frozen.
        autocast_dtype: decode under `torch.autocast` to this dtype (e.g. the trainer's
            bf16 mixed precision); None: in the weights' dtype. benchmarks/first_ratio.py
            measures what it does to the first PPO ratio.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        *,
        eos_token_id: int,
        pad_token_id: int,
        max_batch_size: int = 64,
        shares_weights: bool = False,
        autocast_dtype: Optional[torch.dtype] = None,
    ):
        self.shares_weights = shares_weights
        self.autocast_dtype = autocast_dtype
        self.model = model if shares_weights else model.eval().requires_grad_(False)
        self.eos_token_id = eos_token_id
        self.pad_token_id = pad_token_id
        self.max_batch_size = max_batch_size
        self._version = 0
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="areal-generate")
        self._pending: list[tuple[GenerationRequest, asyncio.Future]] = []
        self._flush_scheduled = False
        self._seed_parts: dict[tuple, int] = {}  # sampling key -> batches of that seeded group issued so far
        self._running = threading.Event()
        self._running.set()
        self._destroyed = threading.Event()
        self.num_generated_tokens = 0

    # -- control ------------------------------------------------------------------------

    def get_version(self) -> int:
        return self._version

    def set_version(self, version: int) -> None:
        self._version = version

    def pause(self) -> None:
        """Start no new batch until `resume`; a batch already decoding finishes."""
        self._running.clear()

    def resume(self) -> None:
        self._running.set()

    def update_weights(self, state_dict: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy new policy weights in, between batches (blocks until the copy is done);
        nothing to do when the engine shares the trainer's weights. `state_dict` is a
        mapping, or (name, tensor) pairs consumed one at a time (a sharded trainer
        gathers each tensor as it is asked for, `engines.parallel.full_tensors`; LoRA's
        merged weights are made one at a time, engines/lora_merge.py).

        Raises:
            RuntimeError: names or shapes that do not match the model (pairs: a name
                missing, unknown, or of another shape).
        """
        if not self.shares_weights:
            self._worker.submit(self._load, state_dict).result()

    def _load(self, state_dict) -> None:
        with torch.no_grad():
            if isinstance(state_dict, Mapping):
                self.model.load_state_dict(state_dict, strict=True)
                return
            own = self.model.state_dict()
            seen = set()
            for name, tensor in state_dict:
                if name not in own or own[name].shape != tensor.shape:
                    raise RuntimeError(f"weight {name} {tuple(tensor.shape)} does not match the sampler's model")
                own[name].copy_(tensor)
                seen.add(name)
            if missing := sorted(set(own) - seen):
                raise RuntimeError(f"weights missing from the update: {missing[:5]}")

    def generate_blocking(self, requests: list[GenerationRequest]) -> list[GenerationResponse]:
        """`generate` on the engine's worker thread, for callers without an event loop
        (evaluation); it queues behind any batch in progress."""
        return self._worker.submit(self.generate, requests).result()

    def destroy(self) -> None:
        """Stop: a batch being decoded ends at its next token (its callers get an error),
        queued ones are cancelled, and the worker thread is joined."""
        self._destroyed.set()
        self._running.set()  # a batching task waiting for `resume` must not block a thread forever
        self._worker.shutdown(wait=True, cancel_futures=True)

    # -- generation -----------------------------------------------------------------------

    async def agenerate(self, request: GenerationRequest) -> GenerationResponse:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._pending.append((request, future))
        if not self._flush_scheduled:
            # A task created now runs after every coroutine that is already ready, so
            # requests issued together (asyncio.gather) land in one batch.
            self._flush_scheduled = True
            loop.create_task(self._flush())
        return await future

    async def _flush(self) -> None:
        try:
            await self._flush_pending()
        finally:
            self._flush_scheduled = False

    async def _flush_pending(self) -> None:
        loop = asyncio.get_running_loop()
        while self._pending:
            await loop.run_in_executor(None, self._running.wait)
            key = self._pending[0][0].sampling_key()
            batch = [item for item in self._pending if item[0].sampling_key() == key][: self.max_batch_size]
            for item in batch:
                self._pending.remove(item)
            requests = self._seed_sub_batch(key, [r for r, _ in batch])
            try:
                responses = await loop.run_in_executor(self._worker, self.generate, requests)
            except Exception as exc:  # every waiter learns of the failure; the engine lives on
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(exc)
                continue
            for (_, fut), response in zip(batch, responses):
                if not fut.done():
                    fut.set_result(response)

    def _seed_sub_batch(self, key: tuple, requests: list[GenerationRequest]) -> list[GenerationRequest]:
        """`requests` (one batch of a seeded group) with the seed of their batch: a group
        larger than `max_batch_size` is decoded in several batches, and re-seeding each
        with the group's seed would repeat the first batch's samples. Batch k > 0 of a
        group gets seed hash((seed, k)); the first keeps the group's seed."""
        seed = requests[0].seed
        if seed is None:
            return requests
        part = self._seed_parts.get(key, 0)
        if any(item[0].sampling_key() == key for item in self._pending):
            self._seed_parts[key] = part + 1
        else:  # the group's last batch: forget it, so the table does not grow with the run
            self._seed_parts.pop(key, None)
        return requests if part == 0 else [replace(r, seed=hash((seed, part)) % (2**31)) for r in requests]

    @torch.no_grad()
    def generate(self, requests: list[GenerationRequest]) -> list[GenerationResponse]:
        """Sample one completion per request, in one batch. Requests must share
        sampling parameters (`sampling_key`). Uses the global torch RNG, re-seeded from
        the requests' `seed` when they carry one."""
        if self._destroyed.is_set():
            raise RuntimeError("LocalInferenceEngine was destroyed")
        inject_generation_fault(self._version)
        first = requests[0]
        if first.seed is not None:
            torch.manual_seed(first.seed)
        version = self._version
        max_len = max(len(r.input_ids) for r in requests)
        input_ids = torch.full((len(requests), max_len), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros_like(input_ids)
        for i, r in enumerate(requests):  # left padding: every completion starts at max_len
            input_ids[i, max_len - len(r.input_ids) :] = torch.tensor(r.input_ids)
            attention_mask[i, max_len - len(r.input_ids) :] = 1
        input_ids, attention_mask = input_ids.to(self.model.device), attention_mask.to(self.model.device)
        stop_ids = [self.eos_token_id, *first.stop_token_ids]
        recorder = SampledTokenLogprobs(first.temperature)
        was_training = self.model.training  # a shared policy is in train mode between steps
        self.model.eval()
        try:
            with autocast(self.autocast_dtype, self.model.device):
                out = self._generate(input_ids, attention_mask, first, stop_ids, recorder)
        finally:
            self.model.train(was_training)
        if self._destroyed.is_set():
            raise RuntimeError("LocalInferenceEngine was destroyed during generation")
        new_tokens = out[:, max_len:]  # [B, T]
        # One copy to the host per batch, not one per row.
        logprobs = recorder.finish(new_tokens).cpu()  # [B, T] float32
        new_tokens = new_tokens.cpu()
        responses = []
        for i, r in enumerate(requests):
            tokens = new_tokens[i].tolist()
            length, reason = len(tokens), "length"
            for t, token in enumerate(tokens):
                if token in stop_ids:
                    length, reason = t + 1, "stop"
                    break
            self.num_generated_tokens += length
            responses.append(
                GenerationResponse(
                    input_ids=list(r.input_ids),
                    output_ids=tokens[:length],
                    output_logprobs=logprobs[i, :length].tolist(),
                    output_versions=[version] * length,
                    stop_reason=reason,
                )
            )
        return responses

    def _generate(self, input_ids, attention_mask, first: GenerationRequest, stop_ids, recorder) -> torch.Tensor:
        """`model.generate` on a left-padded [B, P] batch; returns [B, P + T] token ids."""
        return self.model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            cache=self._prompt_cache(input_ids, attention_mask, first.max_new_tokens),
            generation_config=sampling_config(
                first.temperature, first.top_p, first.top_k, first.max_new_tokens, stop_ids, self.pad_token_id
            ),
            logits_processor=LogitsProcessorList([recorder]),
            stopping_criteria=StoppingCriteriaList([StopWhenSet(self._destroyed)]),
        )

    def _prompt_cache(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int) -> StaticCache:
        """A KV cache holding every row's prompt but its last token, prefilled once per
        distinct prompt and copied to the rows that repeat it: GRPO samples each prompt
        `n_samples` times, so a batch is mostly repeats, and prefilling them all would
        compute the same keys and values n times.

        The cache is preallocated ([B, kv heads, P + max_new_tokens, head dim] per layer,
        the size a growing cache reaches at the end anyway): a growing cache copies all
        of itself at every decoding step, a quarter of the step time at 32 rows on CPU.
        """
        cache = StaticCache(config=self.model.config, max_cache_len=input_ids.shape[1] + max_new_tokens)
        if input_ids.shape[1] < 2:
            return cache
        distinct, row_to_distinct = torch.unique(input_ids, dim=0, return_inverse=True)
        rows = torch.arange(len(input_ids), device=input_ids.device)
        first_row = torch.zeros(len(distinct), dtype=torch.long, device=input_ids.device).scatter_reduce(
            0, row_to_distinct, rows, reduce="amin", include_self=False
        )
        ids, mask = input_ids[first_row, :-1], attention_mask[first_row, :-1]
        # The positions `generate` gives left-padded rows: count real tokens only.
        positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
        self.model(
            input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True, logits_to_keep=1
        )
        cache.reorder_cache(row_to_distinct)
        return cache
