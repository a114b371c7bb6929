import pytest
import torch
from transformers import LogitsProcessorList

import engines.logprobs as logprobs_module
from engines.logprobs import SampledTokenLogprobs, selective_log_softmax, supports_selective_logprobs, token_logprobs


def full_log_softmax(hidden, weight, targets, temperature):
    logits = (hidden @ weight.T).float() / temperature
    return torch.log_softmax(logits, dim=-1).gather(-1, targets[:, None]).squeeze(-1)


@pytest.mark.parametrize("chunk_bytes", [4 * 50 * 7, 4 * 50 * 1000])  # 7 rows per chunk; one chunk
def test_selective_log_softmax_matches_the_full_one_in_value_and_gradient(chunk_bytes):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(20, 8, generator=g, requires_grad=True)
    weight = torch.randn(50, 8, generator=g, requires_grad=True)
    targets = torch.randint(0, 50, (20,), generator=g)
    upstream = torch.randn(20, generator=g)

    got = selective_log_softmax(hidden, weight, targets, 0.7, chunk_bytes=chunk_bytes)
    (got * upstream).sum().backward()
    got_grads = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    want = full_log_softmax(hidden, weight, targets, 0.7)
    (want * upstream).sum().backward()

    torch.testing.assert_close(got, want)
    torch.testing.assert_close(got_grads[0], hidden.grad)
    torch.testing.assert_close(got_grads[1], weight.grad)


def test_token_logprobs_selective_path_equals_full_logits(tiny_model):
    assert supports_selective_logprobs(tiny_model)
    g = torch.Generator().manual_seed(1)
    input_ids = torch.randint(3, 2000, (3, 10), generator=g)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[2, 7:] = 0
    score_mask = attention_mask.clone()
    score_mask[:, :4] = 0

    got = token_logprobs(tiny_model, input_ids, attention_mask, 0.8, score_mask)
    logits = tiny_model(input_ids=input_ids, attention_mask=attention_mask).logits.float() / 0.8
    want = torch.log_softmax(logits[:, :-1], -1).gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    want = torch.nn.functional.pad(want * score_mask[:, 1:], (1, 0))
    assert torch.all(got[score_mask == 0] == 0)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("selective", [True, False])
def test_token_entropy_is_that_of_the_scaled_distribution_with_unchanged_logprobs(tiny_model, monkeypatch, selective):
    g = torch.Generator().manual_seed(3)
    input_ids = torch.randint(3, 2000, (2, 9), generator=g)
    attention_mask = torch.ones_like(input_ids)
    score_mask = attention_mask.clone()
    score_mask[:, :3] = 0
    if not selective:  # the fallback path for models whose logits are not lm_head(hidden)
        monkeypatch.setattr(logprobs_module, "supports_selective_logprobs", lambda model: False)

    logp, entropy = token_logprobs(tiny_model, input_ids, attention_mask, 0.8, score_mask, with_entropy=True)
    logits = tiny_model(input_ids=input_ids, attention_mask=attention_mask).logits.float() / 0.8
    want = torch.distributions.Categorical(logits=logits[:, :-1]).entropy()
    want = torch.nn.functional.pad(want * score_mask[:, 1:], (1, 0))
    torch.testing.assert_close(entropy, want, atol=1e-4, rtol=1e-5)
    assert entropy[:, 4:].min() > 0 and not entropy.requires_grad
    torch.testing.assert_close(logp, token_logprobs(tiny_model, input_ids, attention_mask, 0.8, score_mask))


def _largest_allocation(fn) -> int:
    """Bytes of the largest single CPU allocation any op made while `fn` ran."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return max(e.self_cpu_memory_usage for e in prof.events())


def test_training_logprobs_never_hold_batch_by_vocab_logits(tiny_model, monkeypatch):
    """Forward and backward of the trainer's logprobs allocate at most one chunk of
    logits at a time, where the full projection needs [B, L, V] float32."""
    B, L = 8, 128
    V = tiny_model.config.vocab_size
    full_bytes = B * L * V * 4  # 201 MB; the largest parameter gradient (embeddings) is 13 MB
    monkeypatch.setattr(logprobs_module, "LOGITS_CHUNK_BYTES", full_bytes // 16)
    input_ids = torch.randint(3, 2000, (B, L), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(input_ids)

    def step():
        token_logprobs(tiny_model, input_ids, mask, 1.0, mask).sum().backward()

    assert _largest_allocation(step) < full_bytes // 8


def test_sampled_token_logprobs_keeps_one_step_of_logits(tiny_model, tokenizer):
    """Recording during generation gives the same values as scoring every step's logits
    afterwards, without holding them."""
    torch.manual_seed(3)
    recorder = SampledTokenLogprobs(temperature=0.9)
    prompt = torch.tensor([[1, 520, 9531, 198], [1, 4093, 198, 1780]])
    out = tiny_model.generate(
        input_ids=prompt, attention_mask=torch.ones_like(prompt), do_sample=True, temperature=0.9, max_new_tokens=6,
        min_new_tokens=6, pad_token_id=tokenizer.pad_token_id, logits_processor=LogitsProcessorList([recorder]),
        return_dict_in_generate=True, output_logits=True,
    )
    new_tokens = out.sequences[:, prompt.shape[1] :]
    got = recorder.finish(new_tokens)
    want = torch.log_softmax(torch.stack(out.logits, 1).float() / 0.9, -1).gather(-1, new_tokens[..., None]).squeeze(-1)
    torch.testing.assert_close(got, want)
