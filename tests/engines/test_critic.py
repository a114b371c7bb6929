"""PPO's critic (engines/critic.py): the clipped value loss by hand, training towards the
returns, and its state through save/load and recover checkpoints."""

import copy

import pytest
import torch

from engines.config import CriticConfig, OptimizerConfig
from engines.critic import CriticEngine, ValueModel, clipped_value_loss


def test_clipped_value_loss_by_hand():
    old = torch.tensor([[0.0, 0.0, 0.0, 5.0]])
    returns = torch.tensor([[1.0, 1.0, -1.0, 0.0]])
    values = torch.tensor([[0.1, 0.5, 0.5, 0.0]], requires_grad=True)
    mask = torch.tensor([[1, 1, 1, 0]])
    loss, clipped = clipped_value_loss(values, old, returns, mask, value_eps_clip=0.2, num_loss_tokens=3)
    # token 0: inside the clip, (0.1 - 1)^2 = 0.81; token 1: clipped to 0.2, (0.2 - 1)^2 =
    # 0.64 > (0.5 - 1)^2 = 0.25; token 2: (0.5 + 1)^2 = 2.25 > clipped (0.2 + 1)^2 = 1.44.
    assert loss.item() == pytest.approx(0.5 * (0.81 + 0.64 + 2.25) / 3)
    assert clipped.item() == pytest.approx(1 / 3)
    loss.backward()
    # The clipped branch has no gradient; the others 0.5 * 2 (V - R) / 3.
    torch.testing.assert_close(values.grad, torch.tensor([[-0.9 / 3, 0.0, 1.5 / 3, 0.0]]))
    plain, _ = clipped_value_loss(values.detach(), old, returns, mask, value_eps_clip=None, num_loss_tokens=3)
    assert plain.item() == pytest.approx(0.5 * (0.81 + 0.25 + 2.25) / 3)


def make_critic(model, lr=1e-2, **cfg):
    cfg = CriticConfig(optimizer=OptimizerConfig(lr=lr, weight_decay=0.0), **cfg)
    return CriticEngine(cfg, ValueModel(copy.deepcopy(model)), total_steps=10, max_tokens_per_mb=24)


def batch_of(values=None):
    g = torch.Generator().manual_seed(0)
    input_ids = torch.randint(3, 500, (4, 10), generator=g)
    attention_mask = torch.ones(4, 10, dtype=torch.long)
    attention_mask[2, 7:] = 0
    loss_mask = attention_mask.clone()
    loss_mask[:, :4] = 0
    returns = torch.tensor([1.0, -1.0, 0.5, 0.0])[:, None] * loss_mask.float()
    return {"input_ids": input_ids, "attention_mask": attention_mask, "loss_mask": loss_mask, "returns": returns}


def test_critic_starts_at_zero_and_learns_the_returns(tiny_model):
    critic = make_critic(tiny_model, lr=1e-3, value_eps_clip=None)
    batch = batch_of()
    values = critic.compute_values(batch)
    assert values.shape == (4, 10) and torch.all(values == 0)  # the head starts at zero
    losses = []
    for _ in range(8):
        batch["values"] = critic.compute_values(batch)
        stats = critic.train_batch(batch)
        losses.append(stats.value_loss)
    assert losses[-1] < 0.5 * losses[0] and losses == sorted(losses, reverse=True)
    values = critic.compute_values(batch)
    assert torch.all(values[batch["loss_mask"] == 0] == 0) and torch.any(values[batch["loss_mask"] == 1] != 0)
    # Micro-batching (24 tokens: two rows at a time) does not change the values.
    whole = CriticEngine(critic.cfg, critic.model, total_steps=10, max_tokens_per_mb=1000)
    torch.testing.assert_close(whole.compute_values(batch), values, atol=1e-5, rtol=1e-5)


def test_critic_save_load_round_trip(tmp_path, tiny_model):
    critic = make_critic(tiny_model)
    batch = batch_of()
    batch["values"] = critic.compute_values(batch)
    critic.train_batch(batch)
    critic.save(tmp_path / "critic")
    fresh = make_critic(tiny_model)
    assert not torch.equal(fresh.compute_values(batch), critic.compute_values(batch))
    fresh.load(tmp_path / "critic")
    torch.testing.assert_close(fresh.compute_values(batch), critic.compute_values(batch))
    assert fresh.optimizer.state_dict()["state"].keys() == critic.optimizer.state_dict()["state"].keys()
    with pytest.raises(FileNotFoundError, match="no critic"):
        fresh.load(tmp_path / "nowhere")


def test_recover_checkpoint_carries_the_critic(tmp_path, tiny_model):
    from engines.config import ActorConfig
    from engines.train_engine import TrainEngine
    from workflows.training.recover import RecoverInfo, load_recover_checkpoint, save_recover_checkpoint

    engine = TrainEngine(ActorConfig(), tiny_model, total_steps=4, max_sequence_tokens=10, temperature=1.0)
    critic = make_critic(tiny_model)
    batch = batch_of()
    batch["values"] = critic.compute_values(batch)
    critic.train_batch(batch)
    info = RecoverInfo(step=0, total_steps=4, stats_records=0, data_position={}, num_prompts=1)
    path = save_recover_checkpoint(tmp_path, engine, info, critic=critic)
    assert (path / "critic" / "value_model.safetensors").is_file()
    fresh = make_critic(tiny_model)
    load_recover_checkpoint(path, engine, None, critic=fresh)
    torch.testing.assert_close(fresh.compute_values(batch), critic.compute_values(batch))
    without = save_recover_checkpoint(tmp_path / "plain", engine, info)
    with pytest.raises(ValueError, match="holds no critic"):
        load_recover_checkpoint(without, engine, None, critic=fresh)
