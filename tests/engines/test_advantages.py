"""The advantage estimators against values computed by hand from each paper's formula."""

import math

import pytest
import torch

from engines.advantages import reinforce_plus_plus_advantages, rloo_advantages, sequence_advantages


def test_rloo_by_hand():
    # Ahmadian et al. 2024: A_i = r_i - 1/(k-1) sum_{j != i} r_j.
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 3.0, 1.0, 2.0, 5.0])
    adv = rloo_advantages(rewards[:4], group_size=4)
    torch.testing.assert_close(adv, torch.tensor([1 - 1 / 3, 0 - 2 / 3, 0 - 2 / 3, 1 - 1 / 3]))
    adv = rloo_advantages(torch.tensor([3.0, 1.0, 2.0]), group_size=3)
    torch.testing.assert_close(adv, torch.tensor([3 - 1.5, 1 - 2.5, 2 - 2.0]))
    # k/(k-1) times GRPO's centred reward (Dr. GRPO's, without the std).
    adv = rloo_advantages(rewards, group_size=4)
    centred = sequence_advantages(rewards, estimator="grpo", group_size=4, std_norm=False)
    torch.testing.assert_close(adv, centred * 4 / 3)


def test_rloo_uniform_groups_are_exactly_zero_and_bad_groups_raise():
    shifted = (torch.full((6,), 1.0) + 0.1) * 1.3
    adv = rloo_advantages(torch.cat([shifted, torch.tensor([0.0, 1.0, 1.0])]), group_size=3)
    assert torch.all(adv[:6] == 0) and torch.all(adv[6:] != 0)
    with pytest.raises(ValueError, match="at least 2"):
        rloo_advantages(torch.ones(3), group_size=1)
    with pytest.raises(ValueError, match="groups of 2"):
        rloo_advantages(torch.ones(3), group_size=2)


def test_reinforce_plus_plus_with_group_baseline_by_hand():
    # Hu 2025 (REINFORCE++-baseline): a = r - group mean, then a / std over the batch.
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0])
    centred = torch.tensor([0.75, -0.25, -0.25, -0.25, 0.0, 0.0, 0.0, 0.0])
    std = math.sqrt((0.75**2 + 3 * 0.25**2) / 8)  # population std; the mean is 0
    adv = reinforce_plus_plus_advantages(rewards, group_size=4, eps=0.0)
    torch.testing.assert_close(adv, centred / std)
    assert torch.all(adv[4:] == 0)  # the uniform group stays exactly 0 after the division


def test_reinforce_plus_plus_raw_by_hand_and_uniform_batch():
    # Hu 2025: A = (r - mean_batch) / std_batch; no group baseline.
    adv = reinforce_plus_plus_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0]), group_size=1, group_baseline=False, eps=0.0)
    torch.testing.assert_close(adv, torch.tensor([1.0, -1.0, -1.0, 1.0]))
    adv = reinforce_plus_plus_advantages(torch.tensor([2.0, 0.0, 1.0]), group_size=1, group_baseline=False, eps=0.0)
    torch.testing.assert_close(adv, torch.tensor([1.0, -1.0, 0.0]) / math.sqrt(2 / 3))
    # A batch that scored the same everywhere has nothing to learn: exactly 0, not
    # rounding error over eps.
    same = (torch.full((5,), 1.0) + 0.1) * 1.3
    assert torch.all(reinforce_plus_plus_advantages(same, group_size=1, group_baseline=False) == 0)
    assert torch.all(reinforce_plus_plus_advantages(same, group_size=5) == 0)


def test_reinforce_plus_plus_normalises_by_the_global_batch():
    """A replica's advantages use the statistics of the whole global batch, so replicas
    add up to the single-process computation."""
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 3.0, 0.0, 0.0, 1.0])
    whole = reinforce_plus_plus_advantages(rewards, group_size=2)
    halves = [reinforce_plus_plus_advantages(part, group_size=2, batch_rewards=rewards) for part in rewards.split(4)]
    torch.testing.assert_close(torch.cat(halves), whole)
    # batch: centred [0.5, -0.5, 0, 0, 1.5, -1.5, -0.5, 0.5], std sqrt(5.5 / 8)
    torch.testing.assert_close(whole[:2], torch.tensor([0.5, -0.5]) / math.sqrt(5.5 / 8), rtol=1e-5, atol=1e-5)
    alone = reinforce_plus_plus_advantages(rewards[:4], group_size=2)
    assert not torch.allclose(alone, whole[:4])  # its own half alone would normalise differently


def test_sequence_advantages_dispatches_by_estimator():
    rewards = torch.tensor([1.0, 0.0, 0.5, 0.5])
    grpo = sequence_advantages(rewards, estimator="grpo", group_size=2)
    assert grpo[2:].tolist() == [0.0, 0.0] and grpo[0] > 0 > grpo[1]
    torch.testing.assert_close(sequence_advantages(rewards, estimator="grpo", group_size=2, group_reward_norm=False), rewards)
    torch.testing.assert_close(sequence_advantages(rewards, estimator="rloo", group_size=2), torch.tensor([1.0, -1.0, 0, 0]))
    torch.testing.assert_close(sequence_advantages(rewards, estimator="reinforce_plus_plus", group_size=2),
                               reinforce_plus_plus_advantages(rewards, group_size=2))
    with pytest.raises(ValueError, match="grpo, rloo, reinforce_plus_plus"):
        sequence_advantages(rewards, estimator="ppo", group_size=2)


@pytest.mark.parametrize("estimator", ["grpo", "rloo", "reinforce_plus_plus"])
def test_trainer_advantages_follow_the_estimator(estimator):
    from workflows.config import ExperimentConfig
    from workflows.training.trainer import compute_advantages

    cfg = ExperimentConfig()
    cfg.gconfig.n_samples = 2
    cfg.actor.adv_estimator = estimator
    batch = {"rewards": torch.tensor([1.0, 0.0, 1.0, 1.0]), "loss_mask": torch.tensor([[0, 1, 1]] * 4)}
    adv = compute_advantages(batch, cfg)
    expected = sequence_advantages(batch["rewards"], estimator=estimator, group_size=2)
    torch.testing.assert_close(adv, expected[:, None] * batch["loss_mask"].float())
    assert torch.all(adv[2:] == 0)  # the uniform group: skipped by the training engine


def test_gae_by_hand():
    """Schulman et al. 2016, eq. 16: delta_t = r_t + gamma V_{t+1} - V_t, A_t = sum_l
    (gamma lambda)^l delta_{t+l}, the reward on the last completion token, V = 0 after it."""
    from engines.advantages import gae_advantages

    # One row: 2 prompt tokens, 3 completion tokens, 1 padding position.
    mask = torch.tensor([[0, 0, 1, 1, 1, 0]])
    values = torch.tensor([[9.0, 9.0, 0.5, 0.6, 0.7, 9.0]])  # off the completion: ignored
    adv, returns = gae_advantages(torch.tensor([1.0]), values, mask, gamma=0.9, lam=0.8)
    d4 = 1.0 - 0.7
    d3 = 0.9 * 0.7 - 0.6
    d2 = 0.9 * 0.6 - 0.5
    a4 = d4
    a3 = d3 + 0.72 * a4
    a2 = d2 + 0.72 * a3
    torch.testing.assert_close(adv, torch.tensor([[0.0, 0.0, a2, a3, a4, 0.0]]))
    torch.testing.assert_close(returns, torch.tensor([[0.0, 0.0, a2 + 0.5, a3 + 0.6, a4 + 0.7, 0.0]]))
    # lambda = 1, gamma = 1: the Monte Carlo return minus the value; lambda = 0: the TD error.
    adv, returns = gae_advantages(torch.tensor([1.0]), values, mask, gamma=1.0, lam=1.0)
    torch.testing.assert_close(adv, torch.tensor([[0.0, 0.0, 0.5, 0.4, 0.3, 0.0]]))
    torch.testing.assert_close(returns, torch.tensor([[0.0, 0.0, 1.0, 1.0, 1.0, 0.0]]))
    adv, _ = gae_advantages(torch.tensor([1.0]), values, mask, gamma=0.9, lam=0.0)
    torch.testing.assert_close(adv, torch.tensor([[0.0, 0.0, d2, d3, d4, 0.0]]))


def test_gae_rows_of_different_lengths_and_the_trainer():
    from engines.advantages import gae_advantages
    from workflows.config import ExperimentConfig
    from workflows.training.trainer import compute_advantages

    mask = torch.tensor([[0, 1, 1, 1], [0, 1, 0, 0]])
    values = torch.zeros(2, 4)
    adv, _ = gae_advantages(torch.tensor([2.0, -1.0]), values, mask, gamma=0.5, lam=1.0)
    torch.testing.assert_close(adv, torch.tensor([[0.0, 0.5, 1.0, 2.0], [0.0, -1.0, 0.0, 0.0]]))
    cfg = ExperimentConfig()
    cfg.actor.adv_estimator, cfg.actor.gae_gamma, cfg.actor.gae_lambda = "gae", 0.5, 1.0
    cfg.actor.reward_bias = 1.0  # shaped like every estimator's rewards
    batch = {"rewards": torch.tensor([1.0, -2.0]), "loss_mask": mask, "values": values}
    torch.testing.assert_close(compute_advantages(batch, cfg), adv)
    with pytest.raises(ValueError, match="per token"):
        sequence_advantages(torch.ones(2), estimator="gae", group_size=2)
