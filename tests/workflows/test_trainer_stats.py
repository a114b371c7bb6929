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


def test_recompute_mode_follows_the_precisions():
    from workflows.config import ExperimentConfig
    from workflows.training.anchors import recompute_mode

    cfg = ExperimentConfig()
    assert recompute_mode(cfg, None) == "none"  # float32 trainer, float32 sampler
    assert recompute_mode(cfg, torch.bfloat16) == "fresh"  # bf16 autocast against the float32 sampler
    cfg.rollout.backend, cfg.rollout.server_dtype = "vllm", "bfloat16"
    assert recompute_mode(cfg, torch.bfloat16) == "none" and recompute_mode(cfg, None) == "fresh"
    cfg.actor.recompute_logprob = False
    assert recompute_mode(cfg, None) == "none"
    cfg.actor.recompute_logprob = True
    assert recompute_mode(cfg, torch.bfloat16) == "all"


def test_first_ratio_is_one_under_bf16_autocast(tiny_model, tokenizer):
    """The trainer in bf16 autocast, the in-process sampler in float32: with the default
    actor.recompute_logprob=null the anchors of the current version's tokens are the
    trainer's own, so the loss's first ratio is 1; an older version's keep the sampler's."""
    from engines.factories import autocast
    from engines.inference import GenerationRequest, LocalInferenceEngine
    from engines.logprobs import token_logprobs
    from engines.train_engine import TrainEngine
    from workflows.config import ExperimentConfig
    from workflows.training.anchors import recompute_logprobs

    cfg = ExperimentConfig()
    cfg.actor.mixed_precision = "bf16"
    engine = TrainEngine(cfg.actor, tiny_model, total_steps=1, max_sequence_tokens=64, temperature=1.0)
    sampler = LocalInferenceEngine(tiny_model, eos_token_id=tokenizer.eos_token_id,
                                   pad_token_id=tokenizer.pad_token_id, shares_weights=True)
    prompt = tokenizer("What is 2 + 3?")["input_ids"]
    responses = sampler.generate([GenerationRequest(input_ids=prompt, max_new_tokens=12, seed=3)] * 4)
    sampler.destroy()
    L = max(len(prompt) + len(r.output_ids) for r in responses)
    batch = {k: torch.zeros(4, L, dtype=torch.long) for k in ("input_ids", "attention_mask", "loss_mask")}
    batch["logprobs"], batch["versions"] = torch.zeros(4, L), torch.full((4, L), -1)
    for i, r in enumerate(responses):
        p, n = len(prompt), len(r.output_ids)
        batch["input_ids"][i, : p + n] = torch.tensor(prompt + r.output_ids)
        batch["attention_mask"][i, : p + n] = 1
        batch["loss_mask"][i, p : p + n] = 1
        batch["logprobs"][i, p : p + n] = torch.tensor(r.output_logprobs)
        batch["versions"][i, p : p + n] = 5 if i < 3 else 4  # the last row is one version stale
    sampled = batch["logprobs"].clone()

    def first_log_ratio():
        engine.model.train()
        with autocast(engine.autocast_dtype, engine.device):
            logp = token_logprobs(engine.model, batch["input_ids"], batch["attention_mask"], 1.0, batch["loss_mask"])
        return (logp.detach() - batch["logprobs"]) * batch["loss_mask"]

    mismatch = first_log_ratio()[:3].abs().max()
    assert mismatch > 1e-4  # bf16 against float32: the sampler's anchors are off
    extra = recompute_logprobs(batch, cfg, engine, version=5)
    assert extra["logprob_abs_diff_mean"] > 0
    assert first_log_ratio()[:3].abs().max() < 1e-6
    assert torch.equal(batch["logprobs"][3], sampled[3])
