import asyncio

import pytest
import torch

from engines.inference import GenerationRequest, InferenceEngine, LocalInferenceEngine
from engines.logprobs import token_logprobs


def make_engine(model, tokenizer, **kw):
    return LocalInferenceEngine(model, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **kw)


def test_sampled_logprobs_match_trainer_recomputation(tiny_model, tokenizer):
    """The behaviour logprobs the sampler returns are the quantity the trainer computes
    (temperature-scaled), so on-policy PPO ratios start at exactly 1."""
    torch.manual_seed(0)
    engine = make_engine(tiny_model, tokenizer)
    assert isinstance(engine, InferenceEngine)
    prompts = [[1, 520, 9531, 198], [1, 4093, 198, 1780, 314, 216]]
    requests = [GenerationRequest(input_ids=p, max_new_tokens=8, temperature=0.7) for p in prompts]
    responses = engine.generate(requests)
    for r in responses:
        assert 1 <= len(r.output_ids) <= 8
        assert len(r.output_logprobs) == len(r.output_ids) == len(r.output_versions)
        ids = torch.tensor([r.input_ids + r.output_ids])
        logp = token_logprobs(engine.model, ids, torch.ones_like(ids), temperature=0.7)[0, len(r.input_ids) :]
        torch.testing.assert_close(torch.tensor(r.output_logprobs), logp, atol=1e-4, rtol=1e-4)
        assert all(lp <= 0 for lp in r.output_logprobs)
    engine.destroy()


def test_stop_token_ends_completion(tiny_model, tokenizer):
    engine = make_engine(tiny_model, tokenizer)
    greedy = dict(input_ids=[1, 4093, 198], max_new_tokens=6, top_k=1)
    free = engine.generate([GenerationRequest(**greedy)])[0]
    assert free.stop_reason == "length" or free.output_ids[-1] == tokenizer.eos_token_id
    stop = free.output_ids[1]
    first = free.output_ids.index(stop)
    stopped = engine.generate([GenerationRequest(**greedy, stop_token_ids=[stop])])[0]
    assert stopped.output_ids == free.output_ids[: first + 1]
    assert stopped.stop_reason == "stop"
    engine.destroy()


def test_gathered_requests_share_one_batch_and_carry_version(tiny_model, tokenizer):
    engine = make_engine(tiny_model, tokenizer)
    engine.set_version(7)
    calls = []
    original = engine.generate

    def spy(requests):
        calls.append(len(requests))
        return original(requests)

    engine.generate = spy

    async def go():
        req = GenerationRequest(input_ids=[1, 2, 3, 4], max_new_tokens=4)
        return await asyncio.gather(*(engine.agenerate(req) for _ in range(5)))

    responses = asyncio.run(go())
    assert calls == [5]
    assert all(v == 7 for r in responses for v in r.output_versions)
    engine.destroy()


def test_update_weights_changes_samples(tiny_model, tokenizer):
    engine = make_engine(tiny_model, tokenizer)
    new_state = {k: torch.zeros_like(v) for k, v in tiny_model.state_dict().items()}
    engine.update_weights(new_state)
    assert all(torch.count_nonzero(p) == 0 for p in engine.model.parameters())
    engine.destroy()


def test_destroy_ends_a_generation_in_progress(tiny_model, tokenizer):
    """Stopping a run must not wait for a long batch to finish decoding."""
    import threading
    import time

    import pytest

    engine = make_engine(tiny_model, tokenizer)
    outcome = {}

    def generate():
        try:
            # Greedy, with a stop token the model does not pick: it would decode 4000 tokens.
            outcome["result"] = engine.generate_blocking([GenerationRequest(input_ids=[1, 4093, 198], max_new_tokens=4000, top_k=1)])
        except Exception as exc:  # noqa: BLE001
            outcome["error"] = exc

    engine.eos_token_id = tokenizer.vocab_size + 10  # never sampled
    thread = threading.Thread(target=generate)
    thread.start()
    time.sleep(0.5)  # decoding (it would take many seconds)
    t0 = time.monotonic()
    engine.destroy()
    thread.join(10)
    assert time.monotonic() - t0 < 2.0
    assert "result" not in outcome and "destroyed" in str(outcome["error"])
    with pytest.raises(RuntimeError, match="destroyed"):
        engine.generate([GenerationRequest(input_ids=[1, 2], max_new_tokens=2)])


def test_generation_fault_injection(tiny_model, tokenizer, monkeypatch):
    import pytest

    from engines.inference import FAULT_ENV

    engine = make_engine(tiny_model, tokenizer)
    request = GenerationRequest(input_ids=[1, 2, 3], max_new_tokens=2)
    monkeypatch.setenv(FAULT_ENV, "2")
    engine.set_version(1)
    assert len(engine.generate([request])) == 1
    engine.set_version(2)
    with pytest.raises(RuntimeError, match=f"injected generation failure at policy version 2 \\({FAULT_ENV}=2\\)"):
        engine.generate([request])
    engine.destroy()


def test_shared_prompt_prefill_matches_plain_generate(tiny_model, tokenizer):
    """Rows repeating a prompt are prefilled once and decoded from a preallocated cache;
    greedy completions and their logprobs equal transformers' own generate."""
    engine = make_engine(tiny_model, tokenizer)
    prompts = [[1, 520, 9531, 198], [1, 4093, 198, 1780, 314, 216], [1, 520, 9531, 198], [7, 8]]
    responses = engine.generate([GenerationRequest(input_ids=p, max_new_tokens=7, top_k=1) for p in prompts])
    for prompt, response in zip(prompts, responses):
        ids = torch.tensor([prompt])
        out = tiny_model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=7,
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        )
        expected = out[0, len(prompt) :].tolist()
        if tokenizer.eos_token_id in expected:
            expected = expected[: expected.index(tokenizer.eos_token_id) + 1]
        assert response.output_ids == expected
        full = torch.tensor([prompt + response.output_ids])
        logp = token_logprobs(tiny_model, full, torch.ones_like(full), temperature=1.0)[0, len(prompt) :]
        torch.testing.assert_close(torch.tensor(response.output_logprobs), logp, atol=1e-4, rtol=1e-4)
    engine.destroy()


@pytest.mark.parametrize(
    "setting",
    [
        {"repetition_penalty": 3.0},
        {"no_repeat_ngram_size": 1},
        {"min_new_tokens": 8},
        {"suppress_tokens": list(range(100, 20000))},
    ],
    ids=lambda s: next(iter(s)),
)
def test_model_generation_config_does_not_shape_sampling(tiny_model, tokenizer, setting):
    """A model's own generation_config (Qwen2.5-Instruct ships a repetition penalty) must
    not reach the sampler: it would shape the sampled distribution and the recorded
    logprobs, but not the trainer's, so on-policy ratios would not start at 1."""
    # Peaked logits, so that a repetition penalty moves the logprobs by much more than
    # numerics do.
    with torch.no_grad():
        tiny_model.get_output_embeddings().weight.mul_(40.0)
    for key, value in setting.items():
        setattr(tiny_model.generation_config, key, value)
    prompts = [[1, 520, 9531, 198, 520, 9531], [1, 4093, 198, 1780, 314, 216]]
    engine = make_engine(tiny_model, tokenizer)
    if "min_new_tokens" in setting:
        # The end token must be likely for forbidding it to move the logprobs: make it
        # the model's first choice after the first prompt.
        with torch.no_grad():
            engine.eos_token_id = int(tiny_model(torch.tensor([prompts[0]])).logits[0, -1].argmax())
    torch.manual_seed(0)
    responses = engine.generate([GenerationRequest(input_ids=p, max_new_tokens=8, temperature=1.0) for p in prompts])
    for r in responses:
        ids = torch.tensor([r.input_ids + r.output_ids])
        logp = token_logprobs(engine.model, ids, torch.ones_like(ids), temperature=1.0)[0, len(r.input_ids) :]
        torch.testing.assert_close(torch.tensor(r.output_logprobs), logp, atol=1e-4, rtol=1e-4)
    engine.destroy()


def test_seeded_group_larger_than_a_batch_does_not_repeat_samples(tiny_model, tokenizer):
    """Deterministic mode with gconfig.n_samples > gconfig.max_batch_size: the group is
    decoded in several batches, and each must draw its own samples (re-seeding each with
    the group's seed made them copies), still reproducibly."""
    engine = make_engine(tiny_model, tokenizer, max_batch_size=2)

    async def group():
        request = GenerationRequest(input_ids=[1, 520, 9531, 198], max_new_tokens=6, seed=1234)
        return [tuple(r.output_ids) for r in await asyncio.gather(*(engine.agenerate(request) for _ in range(6)))]

    first = asyncio.run(group())
    assert len(set(first)) == 6
    assert asyncio.run(group()) == first
    # The first batch of a group is seeded as before, so groups that fit in one batch
    # sample what they always did.
    alone = engine.generate([GenerationRequest(input_ids=[1, 520, 9531, 198], max_new_tokens=6, seed=1234)] * 2)
    assert [tuple(r.output_ids) for r in alone] == first[:2]
    engine.destroy()
