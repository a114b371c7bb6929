import copy
import math

import pytest
import torch

from engines.config import ActorConfig, OptimizerConfig
from engines.micro_batches import split_micro_batches
from engines.train_engine import TrainEngine


def synthetic_batch(B=4, L=12, vocab=500, seed=0):
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, vocab, (B, L), generator=g)
    attention_mask = torch.ones(B, L, dtype=torch.long)
    attention_mask[1, 9:] = 0  # a shorter sequence
    loss_mask = attention_mask.clone()
    loss_mask[:, :5] = 0  # the prompt
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "loss_mask": loss_mask,
        "logprobs": torch.zeros(B, L),
        "advantages": torch.tensor([1.0, -1.0, 0.5, -0.5])[:, None] * loss_mask.float(),
    }


def make_engine(model, **actor):
    cfg = ActorConfig(optimizer=OptimizerConfig(lr=1e-2, weight_decay=0.0), **actor)
    return TrainEngine(cfg, model, total_steps=4, max_sequence_tokens=12, temperature=1.0)


def test_parameters_change_after_a_step(tiny_model):
    before = copy.deepcopy(tiny_model.state_dict())
    engine = make_engine(tiny_model)
    batch = synthetic_batch()
    batch["logprobs"] = engine.compute_logp(batch)
    stats = engine.train_batch(batch)
    assert stats.grad_norm > 0 and stats.num_loss_tokens == int(batch["loss_mask"].sum())
    changed = [k for k, v in tiny_model.state_dict().items() if not torch.equal(v, before[k])]
    assert len(changed) == len(before)


def test_micro_batching_does_not_change_the_update(model_dir, tiny_model):
    twin = copy.deepcopy(tiny_model)
    batch = synthetic_batch()
    whole = make_engine(tiny_model, max_tokens_per_mb=64)
    split = make_engine(twin, max_tokens_per_mb=12)  # one sequence per micro-batch
    a, b = whole.train_batch(batch), split.train_batch(batch)
    assert a.loss == pytest.approx(b.loss, abs=1e-6)
    assert a.grad_norm == pytest.approx(b.grad_norm, rel=1e-4)
    # Adam turns float rounding in near-zero gradients into differences of a few 1e-6
    # against updates of lr = 1e-2.
    for p, q in zip(tiny_model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, atol=1e-5, rtol=1e-5)


def test_compute_logp_is_zero_outside_sequences(tiny_model):
    engine = make_engine(tiny_model)
    batch = synthetic_batch()
    tokens = {k: batch[k] for k in ("input_ids", "attention_mask")}
    logp = engine.compute_logp(tokens)
    assert logp.shape == batch["input_ids"].shape and logp.dtype == torch.float32
    assert torch.all(logp[:, 0] == 0) and torch.all(logp[1, 9:] == 0)
    assert torch.all(logp[0, 1:] < 0)
    # With a loss mask only the trained tokens are scored, to the same values.
    scored = engine.compute_logp(batch)
    mask = batch["loss_mask"].bool()
    assert torch.all(scored[~mask] == 0)
    torch.testing.assert_close(scored[mask], logp[mask], atol=1e-5, rtol=1e-5)


def test_split_micro_batches():
    assert split_micro_batches([4, 4, 4], max_tokens=8) == [[0, 1], [2]]
    assert split_micro_batches([2, 6, 1], max_tokens=12) == [[0, 1], [2]]
    assert split_micro_batches([3, 3], max_tokens=10, pad_to=5) == [[0, 1]]
    assert split_micro_batches([3, 3], max_tokens=9, pad_to=5) == [[0], [1]]


def test_save_and_load_round_trip(tmp_path, tiny_model, tokenizer, model_dir):
    from transformers import AutoModelForCausalLM

    engine = make_engine(tiny_model)
    engine.save(tmp_path / "ckpt", tokenizer)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt")
    for v, w in zip(tiny_model.state_dict().values(), loaded.state_dict().values()):
        torch.testing.assert_close(v, w)
    with torch.no_grad():
        for p in tiny_model.parameters():
            p.zero_()
    engine.load(tmp_path / "ckpt")
    torch.testing.assert_close(tiny_model.state_dict()["model.norm.weight"], loaded.state_dict()["model.norm.weight"])


def test_kl_needs_reference_model(tiny_model):
    with pytest.raises(ValueError, match="reference model"):
        make_engine(tiny_model, kl_ctl=0.1)


@pytest.mark.parametrize(
    "advantages, loss",
    [
        ([1.0, 0.0, -0.5, 0.0], {}),
        ([0.0, 0.0, 0.0, 0.0], {}),
        # GSPO's sequence ratio and truncated importance weights keep a zero-advantage row at 0.
        ([1.0, 0.0, -0.5, 0.0], {"importance_level": "sequence", "tis_cap": 1.2, "tis_mode": "mask"}),
    ],
)
def test_rows_without_advantage_are_skipped_without_changing_the_update(tiny_model, advantages, loss):
    """Sequences whose advantage is 0 everywhere add nothing to the loss or its gradient;
    leaving them out (also all of them: the optimizer still steps, so weight decay and
    Adam's moments move as before) gives the same parameters and loss."""
    twin = copy.deepcopy(tiny_model)
    before = copy.deepcopy(tiny_model.state_dict())
    batch = synthetic_batch()
    batch["advantages"] = torch.tensor(advantages)[:, None] * batch["loss_mask"].float()
    if "tis_cap" in loss:
        batch["sampler_logp"] = -torch.rand(batch["logprobs"].shape, generator=torch.Generator().manual_seed(1))
    actor = dict(optimizer=OptimizerConfig(lr=1e-2, weight_decay=0.1), **loss)
    skipping = TrainEngine(ActorConfig(**actor), tiny_model, total_steps=4, max_sequence_tokens=12, temperature=1.0)
    everything = TrainEngine(ActorConfig(**actor), twin, total_steps=4, max_sequence_tokens=12, temperature=1.0)
    everything._rows_with_gradient = lambda mini: mini
    forwards = []
    original = skipping._micro_batch_loss
    skipping._micro_batch_loss = lambda mb, n: forwards.append(len(mb["input_ids"])) or original(mb, n)

    a, b = skipping.train_batch(batch), everything.train_batch(batch)
    assert sum(forwards) == sum(1 for x in advantages if x != 0)
    assert a.loss == pytest.approx(b.loss, abs=1e-7) and a.num_loss_tokens == b.num_loss_tokens
    assert a.grad_norm == pytest.approx(b.grad_norm, rel=1e-5, abs=1e-9)
    for p, q in zip(tiny_model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, atol=1e-5, rtol=1e-5)
    # The step happened: weight decay moves every weight even with a zero gradient.
    assert not torch.equal(tiny_model.state_dict()["model.norm.weight"], before["model.norm.weight"])


def test_micro_batches_group_sequences_of_similar_length(tiny_model):
    engine = make_engine(tiny_model, max_tokens_per_mb=24)
    mask = torch.zeros(4, 12, dtype=torch.long)
    for row, n in enumerate([3, 12, 4, 11]):
        mask[row, :n] = 1
    groups = engine._micro_batches({"input_ids": torch.ones(4, 12, dtype=torch.long), "attention_mask": mask})
    assert [idx for idx, _ in groups] == [[1, 3], [2, 0]]  # 24 + 8 tokens, not 24 + 22 in batch order
    assert [mb["input_ids"].shape[1] for _, mb in groups] == [12, 4]


def test_bf16_autocast_keeps_float32_weights_and_close_logprobs(tiny_model):
    twin = copy.deepcopy(tiny_model)
    batch = synthetic_batch()
    full = make_engine(tiny_model).compute_logp(batch)
    engine = make_engine(twin, mixed_precision="bf16")
    assert engine.autocast_dtype is torch.bfloat16
    mixed = engine.compute_logp(batch)
    assert mixed.dtype is torch.float32
    diff = (full - mixed).abs()[batch["loss_mask"].bool()]
    # bf16 changes the numbers (it really ran) but not the distribution.
    assert 0 < float(diff.mean()) < 0.05
    batch["logprobs"] = mixed
    stats = engine.train_batch(batch)
    assert stats.grad_norm > 0
    assert all(p.dtype is torch.float32 for p in twin.parameters())


def test_dr_grpo_constant_normalisation_divides_by_the_generation_budget(tiny_model):
    """Dr. GRPO (arXiv 2503.20783): loss = sum over tokens / (sequences x max_new_tokens)
    instead of / trained tokens, so the same batch's loss scales by their ratio."""
    batch = synthetic_batch()
    twin = copy.deepcopy(tiny_model)
    token = make_engine(tiny_model)
    cfg = ActorConfig(optimizer=OptimizerConfig(lr=1e-2, weight_decay=0.0), loss_normalization="constant")
    constant = TrainEngine(cfg, twin, total_steps=4, max_sequence_tokens=12, temperature=1.0, max_new_tokens=20)
    batch["logprobs"] = token.compute_logp(batch)
    a, b = token.train_batch(dict(batch)), constant.train_batch(dict(batch))
    tokens = int(batch["loss_mask"].sum())
    assert b.num_loss_tokens == 4 * 20
    assert b.loss == pytest.approx(a.loss * tokens / (4 * 20), rel=1e-5)
    with pytest.raises(ValueError, match="needs max_new_tokens"):
        TrainEngine(cfg, copy.deepcopy(twin), total_steps=4, max_sequence_tokens=12, temperature=1.0)


@pytest.mark.parametrize("mode", ["truncate", "mask"])
def test_truncated_importance_sampling_weights_the_loss(tiny_model, mode):
    """With `sampler_logp` in the batch and `actor.tis_cap`, each token's surrogate is
    weighted by min(pi_train_old / pi_sampler, C) (or dropped above C, mode mask)."""
    engine = make_engine(tiny_model, tis_cap=2.0, tis_mode=mode)
    batch = synthetic_batch()
    batch["logprobs"] = engine.compute_logp(batch)  # the trainer's own: every ratio starts at 1
    # The sampler put log 4 less on row 0's tokens (rho = 4) and log 1.5 more on row 2's (rho = 2/3).
    batch["sampler_logp"] = batch["logprobs"] - torch.tensor([math.log(4.0), 0.0, -math.log(1.5), 0.0])[:, None]
    counts = batch["loss_mask"].sum(dim=1).tolist()  # 7, 4, 7, 7 tokens
    weight0 = 2.0 if mode == "truncate" else 0.0
    expected = -(weight0 * 1.0 * counts[0] - counts[1] + 0.5 / 1.5 * counts[2] - 0.5 * counts[3]) / sum(counts)
    stats = engine.train_batch(batch)
    assert stats.loss == pytest.approx(expected, abs=1e-5)
    assert stats.masked_fraction == pytest.approx(counts[0] / sum(counts) if mode == "mask" else 0.0)


def test_gspo_reaches_the_loss(tiny_model):
    """`actor.importance_level=sequence`: with old logprobs moved per token (geometric
    mean 1 in row 0), the loss is GSPO's, not the token-level one."""
    token, sequence = make_engine(copy.deepcopy(tiny_model)), make_engine(tiny_model, importance_level="sequence")
    batch = synthetic_batch()
    logp = token.compute_logp(batch)
    shift = torch.tensor([0.3, -0.3] * 6)[None, :] * batch["loss_mask"].float()
    batch["logprobs"] = logp + shift * torch.tensor([1.0, 0.0, 0.0, 0.0])[:, None]
    # Row 0 has 7 trained tokens: shifts +-0.3 alternate, summing to +-0.3; the rest have ratio 1.
    log_s0 = -float(shift[0].sum()) / 7
    counts = batch["loss_mask"].sum(dim=1).tolist()
    s0 = min(math.exp(log_s0), 1.2) if log_s0 > 0 else math.exp(log_s0)
    expected = -(s0 * 1.0 * counts[0] - counts[1] + 0.5 * counts[2] - 0.5 * counts[3]) / sum(counts)
    assert sequence.train_batch(dict(batch)).loss == pytest.approx(expected, abs=1e-5)
    assert token.train_batch(dict(batch)).loss != pytest.approx(expected, abs=1e-3)
