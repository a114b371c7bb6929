import math

import torch

from workflows.training.trainer import logprob_agreement


def test_logprob_agreement_covers_fresh_trained_tokens_only():
    batch = {
        "loss_mask": torch.tensor([[0, 1, 1, 1], [0, 0, 1, 1]]),
        "versions": torch.tensor([[-1, 3, 3, 2], [-1, -1, 3, 3]]),
        "logprobs": torch.tensor([[0.0, -1.0, -2.0, -9.0], [0.0, 0.0, -0.5, -0.25]]),
    }
    recomputed = torch.tensor([[5.0, -1.5, -2.0, 0.0], [7.0, 7.0, -0.25, -0.25]])
    # Fresh (version 3) trained tokens: |0.5|, |0|, |0.25|, |0|; the version-2 token and
    # the prompt positions are left out.
    assert logprob_agreement(batch, recomputed, version=3)["logprob_abs_diff_mean"] == 0.1875
    assert math.isnan(logprob_agreement(batch, recomputed, version=4)["logprob_abs_diff_mean"])


def test_signal_share_counts_groups_with_a_non_zero_advantage():
    from engines.distributed import DistributedContext
    from workflows.config import ExperimentConfig
    from workflows.training.trainer import batch_stats, compute_advantages, gather_sequences

    cfg = ExperimentConfig()
    cfg.gconfig.n_samples = 2
    # Three prompts of two samples: all wrong, mixed, all right (with a reward shift that
    # must not turn the uniform groups into signal).
    cfg.actor.reward_bias, cfg.actor.reward_scaling = 0.1, 1.3
    batch = {
        "rewards": torch.tensor([0.0, 0.0, 0.0, 1.0, 1.0, 1.0]),
        "loss_mask": torch.tensor([[0, 1, 1]] * 6),
        "epoch": torch.zeros(6, dtype=torch.long),
        "prompt_id": torch.tensor([4, 4, 7, 7, 9, 9]),
    }
    batch["advantages"] = compute_advantages(batch, cfg)
    stats = batch_stats(gather_sequences(batch, DistributedContext()))
    assert stats["signal_share"] == 1 / 3
    assert stats["num_sequences"] == 6


def test_recomputed_logprobs_go_where_the_loss_reads_them():
    from types import SimpleNamespace

    from workflows.config import ExperimentConfig
    from workflows.training.trainer import recompute_logprobs

    sampler = torch.tensor([[0.0, -1.0, -2.0]])
    trainer = torch.tensor([[0.0, -1.5, -2.0]])
    engine = SimpleNamespace(compute_logp=lambda batch: trainer.clone())

    def prepare(**actor):
        cfg = ExperimentConfig()
        for key, value in actor.items():
            setattr(cfg.actor, key, value)
        batch = {"logprobs": sampler.clone(), "loss_mask": torch.tensor([[0, 1, 1]]), "versions": torch.tensor([[-1, 0, 0]])}
        return batch, recompute_logprobs(batch, cfg, engine, version=0)

    batch, extra = prepare()
    assert extra == {} and set(batch) == {"logprobs", "loss_mask", "versions"}
    batch, extra = prepare(recompute_logprob=True)
    assert torch.equal(batch["logprobs"], trainer) and "sampler_logp" not in batch
    assert extra["logprob_abs_diff_mean"] == 0.25
    # Truncated importance sampling keeps the sampler's logprobs beside the trainer's.
    batch, _ = prepare(recompute_logprob=True, tis_cap=2.0)
    assert torch.equal(batch["logprobs"], trainer) and torch.equal(batch["sampler_logp"], sampler)
    batch, _ = prepare(recompute_logprob=True, use_decoupled_loss=True)
    assert torch.equal(batch["logprobs"], sampler) and torch.equal(batch["prox_logp"], trainer)
