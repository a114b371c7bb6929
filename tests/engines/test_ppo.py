import math

import pytest
import torch

from engines.ppo import group_normalized_advantages, kl_penalty, ppo_clipped_loss


def test_group_advantages_by_hand():
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0])
    adv = group_normalized_advantages(rewards, group_size=3, eps=0.0)
    # group 1: mean 1/3, unbiased std sqrt(1/3); group 2: mean 2/3, same std
    std = math.sqrt(1 / 3)
    expected = torch.tensor([2 / 3 / std, -1 / 3 / std, -1 / 3 / std, -2 / 3 / std, 1 / 3 / std, 1 / 3 / std])
    torch.testing.assert_close(adv, expected)
    centred = group_normalized_advantages(rewards, group_size=3, std_norm=False)
    torch.testing.assert_close(centred, torch.tensor([2 / 3, -1 / 3, -1 / 3, -2 / 3, 1 / 3, 1 / 3]))


def test_uniform_group_has_zero_advantage_and_bad_size_raises():
    assert torch.all(group_normalized_advantages(torch.ones(4), group_size=2) == 0)
    # (reward + bias) * scale of equal rewards: a float32 mean off in the last bit,
    # divided by std ~0 + eps, must not become an advantage.
    shifted = (torch.full((8,), 1.0) + 0.1) * 1.3
    adv = group_normalized_advantages(torch.cat([shifted, torch.tensor([0.0, 1.0] * 4)]), group_size=8)
    assert torch.all(adv[:8] == 0) and torch.all(adv[8:] != 0)
    with pytest.raises(ValueError, match="groups of 3"):
        group_normalized_advantages(torch.ones(4), group_size=3)


def test_kl_estimators_by_hand():
    logp, ref = torch.tensor([[-1.0]]), torch.tensor([[-1.5]])
    r = 0.5
    assert kl_penalty(logp, ref, "k1").item() == pytest.approx(r)
    assert kl_penalty(logp, ref, "k2").item() == pytest.approx(r * r / 2)
    assert kl_penalty(logp, ref, "k3").item() == pytest.approx(math.exp(-r) - 1 + r)
    with pytest.raises(ValueError, match="k1, k2, k3"):
        kl_penalty(logp, ref, "k4")


def test_clipped_surrogate_by_hand():
    # token 1: ratio e^0.5 ~ 1.65, advantage +1 -> clipped at 1.2
    # token 2: ratio e^-0.5 ~ 0.61, advantage -1 -> min(-0.61, -0.8) = -0.8 (clipped)
    # token 3: ratio 1, advantage +2 -> 2
    # token 4: masked out
    old = torch.zeros(1, 4)
    new = torch.tensor([[0.5, -0.5, 0.0, 3.0]], requires_grad=True)
    adv = torch.tensor([[1.0, -1.0, 2.0, 5.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    out = ppo_clipped_loss(new, old, adv, mask, eps_clip=0.2)
    assert out.loss.item() == pytest.approx(-(1.2 - 0.8 + 2.0) / 3)
    assert out.clip_fraction.item() == pytest.approx(2 / 3)
    out.loss.backward()
    # clipped tokens carry no gradient; the unclipped one gets -A/N * ratio
    torch.testing.assert_close(new.grad, torch.tensor([[0.0, 0.0, -2.0 / 3, 0.0]]))


def test_token_level_normalisation_uses_given_count():
    old = torch.zeros(1, 2)
    out = ppo_clipped_loss(old.clone(), old, torch.ones(1, 2), torch.ones(1, 2), eps_clip=0.2, num_loss_tokens=8)
    assert out.loss.item() == pytest.approx(-2 / 8)


def test_decoupled_loss_weights_and_caps():
    behav = torch.zeros(1, 3)
    prox = torch.tensor([[0.0, math.log(2.0), math.log(10.0)]])
    new = prox.clone()
    adv = torch.ones(1, 3)
    out = ppo_clipped_loss(new, behav, adv, torch.ones(1, 3), eps_clip=0.2, proximal_logprobs=prox, behav_imp_weight_cap=5.0)
    # ratio to the proximal policy is 1; weights 1, 2 and 10 -> the last is masked
    assert out.loss.item() == pytest.approx(-(1.0 + 2.0) / 2)
    assert out.masked_fraction.item() == pytest.approx(1 / 3)
    # The capped token is left out of the weight statistics, as it is of the loss.
    assert out.importance_weight_max.item() == pytest.approx(2.0)
    assert out.importance_weight_mean.item() == pytest.approx(1.5)


def test_clip_higher_is_asymmetric_and_counts_only_the_clipped_branch():
    # ratios e^0.25 ~ 1.28 (inside [0.8, 1.28+] only with eps_clip_higher) and
    # e^0.5 ~ 1.65 with a negative advantage: outside the band, but min() takes the
    # unclipped branch, so that token keeps its gradient and is not counted as clipped.
    old = torch.zeros(1, 2)
    new = torch.tensor([[0.25, 0.5]], requires_grad=True)
    adv = torch.tensor([[1.0, -1.0]])
    symmetric = ppo_clipped_loss(new, old, adv, torch.ones(1, 2), eps_clip=0.2)
    assert symmetric.clip_fraction.item() == pytest.approx(1 / 2)
    higher = ppo_clipped_loss(new, old, adv, torch.ones(1, 2), eps_clip=0.2, eps_clip_higher=0.3)
    assert higher.clip_fraction.item() == 0.0
    higher.loss.backward()
    torch.testing.assert_close(new.grad, torch.tensor([[-math.exp(0.25), math.exp(0.5)]]) / 2)


def test_dual_clip_bounds_negative_advantage_tokens():
    old = torch.zeros(1, 3)
    # ratios e^2 ~ 7.4 and e^0.5 ~ 1.65 with advantage -1; e^2 with advantage +1.
    new = torch.tensor([[2.0, 0.5, 2.0]], requires_grad=True)
    adv = torch.tensor([[-1.0, -1.0, 1.0]])
    out = ppo_clipped_loss(new, old, adv, torch.ones(1, 3), eps_clip=0.2, c_clip=3.0)
    # surrogates: max(-7.4, -3) = -3; -1.65 (above the floor); min(7.4, 1.2) = 1.2
    assert out.loss.item() == pytest.approx(-(-3.0 - math.exp(0.5) + 1.2) / 3)
    assert out.dual_clip_fraction.item() == pytest.approx(1 / 3)
    assert out.clip_fraction.item() == pytest.approx(1 / 3)
    out.loss.backward()
    assert new.grad[0, 0].item() == 0.0 and new.grad[0, 2].item() == 0.0 and new.grad[0, 1].item() > 0


def test_overlong_penalty_by_hand():
    from engines.ppo import overlong_penalty

    # Budget 10 tokens, buffer 4: free up to 6 tokens, then -1/4 per token down to -1 at 10.
    lengths = torch.tensor([3, 6, 7, 8, 10])
    penalty = overlong_penalty(lengths, max_new_tokens=10, buffer_tokens=4, factor=1.0)
    assert penalty.tolist() == [0.0, 0.0, -0.25, -0.5, -1.0]
    assert overlong_penalty(lengths, max_new_tokens=10, buffer_tokens=4, factor=0.5)[-1] == -0.5
    with pytest.raises(ValueError):
        overlong_penalty(lengths, max_new_tokens=10, buffer_tokens=0, factor=1.0)


def test_has_reward_variance():
    from workflows.rollout.rlvr import has_reward_variance

    assert not has_reward_variance({"rewards": torch.tensor([0.0, 0.0, 0.0])})
    assert not has_reward_variance({"rewards": torch.tensor([1.0, 1.0])})
    assert has_reward_variance({"rewards": torch.tensor([0.0, 1.0, 0.0])})


def test_truncated_importance_sampling_by_hand():
    """Yao et al. 2025: rho = pi_train_old / pi_sampler per token; truncate weights by
    min(rho, C), mask drops the tokens with rho > C and keeps rho elsewhere."""
    from engines.ppo import truncated_importance_weights

    train = torch.tensor([[0.0, math.log(0.5), math.log(3.0), 0.0]])  # the trainer's old logprobs, log rho here
    sampler = torch.zeros(1, 4)
    mask = torch.tensor([[1, 1, 1, 0]])
    weight, keep = truncated_importance_weights(train, sampler, cap=2.0, mode="truncate")
    torch.testing.assert_close(weight, torch.tensor([[1.0, 0.5, 2.0, 1.0]]))
    assert keep.tolist() == [[1.0, 1.0, 1.0, 1.0]]
    weight, keep = truncated_importance_weights(train, sampler, cap=2.0, mode="mask")
    torch.testing.assert_close(weight, torch.tensor([[1.0, 0.5, 0.0, 1.0]]))
    assert keep.tolist() == [[1.0, 1.0, 0.0, 1.0]]
    with pytest.raises(ValueError, match="truncate, mask"):
        truncated_importance_weights(train, sampler, cap=2.0, mode="clip")

    # In the loss: the current policy equals the trainer's old one (ratio 1), advantages
    # 1, -2, 1; surrogate x weight, over the 3 trained tokens.
    adv = torch.tensor([[1.0, -2.0, 1.0, 7.0]])
    new = train.clone().requires_grad_(True)
    out = ppo_clipped_loss(new, train, adv, mask, eps_clip=0.2, sampler_logprobs=sampler, tis_cap=2.0)
    assert out.loss.item() == pytest.approx(-(1.0 * 1 + 0.5 * -2 + 2.0 * 1) / 3)
    assert out.importance_weight_max.item() == pytest.approx(2.0)
    assert out.importance_weight_mean.item() == pytest.approx((1.0 + 0.5 + 2.0) / 3)
    out.loss.backward()
    # d/dlogp of -w A ratio / N at ratio 1: -w A / N.
    torch.testing.assert_close(new.grad, torch.tensor([[-1.0, 1.0, -2.0, 0.0]]) / 3)
    masked = ppo_clipped_loss(train, train, adv, mask, eps_clip=0.2, sampler_logprobs=sampler, tis_cap=2.0,
                              tis_mode="mask", num_loss_tokens=3)
    assert masked.loss.item() == pytest.approx(-(1.0 * 1 + 0.5 * -2) / 3)
    assert masked.masked_fraction.item() == pytest.approx(1 / 3)
    # Without a cap the sampler's logprobs change nothing.
    plain = ppo_clipped_loss(train, train, adv, mask, eps_clip=0.2, sampler_logprobs=sampler)
    assert plain.loss.item() == pytest.approx(-(1.0 - 2.0 + 1.0) / 3)


def test_gspo_sequence_ratio_by_hand():
    """GSPO (Zheng et al. 2025): s_i = exp(mean_t (logp - old_logp)), clipped per
    sequence; token-mean loss, so each token's gradient is -s_i A_i / N."""
    from engines.ppo import sequence_log_ratio

    old = torch.zeros(2, 3)
    # Row 0: token log-ratios 0.1, -0.1 -> s = 1 (inside the band); row 1: 0.6, 0.2 ->
    # s = e^0.4 ~ 1.49, clipped at 1.2 (advantage +1). The third column is padding.
    new = torch.tensor([[0.1, -0.1, 0.0], [0.6, 0.2, 9.0]], requires_grad=True)
    mask = torch.tensor([[1, 1, 0], [1, 1, 0]])
    adv = torch.ones(2, 3)
    torch.testing.assert_close(sequence_log_ratio(new.detach(), mask), torch.tensor([[0.0] * 3, [0.4] * 3]))
    out = ppo_clipped_loss(new, old, adv, mask, eps_clip=0.2, importance_level="sequence")
    assert out.loss.item() == pytest.approx(-(1.0 + 1.0 + 1.2 + 1.2) / 4)
    assert out.clip_fraction.item() == pytest.approx(2 / 4)  # both tokens of the clipped sequence
    out.loss.backward()
    torch.testing.assert_close(new.grad, torch.tensor([[-0.25, -0.25, 0.0], [0.0, 0.0, 0.0]]))
    # Per token, the same row 0 would clip nothing and weigh its tokens by their own ratios.
    token = new.detach().clone().requires_grad_(True)
    ppo_clipped_loss(token, old, adv, mask, eps_clip=0.2).loss.backward()
    torch.testing.assert_close(token.grad[0, :2], -torch.tensor([math.exp(0.1), math.exp(-0.1)]) / 4)
    # A negative advantage with a sequence ratio below 1 - eps: clipped at 0.8 for the whole sequence.
    low = ppo_clipped_loss(torch.tensor([[-0.5, -0.1]]), torch.zeros(1, 2), -torch.ones(1, 2), torch.ones(1, 2),
                           eps_clip=0.2, importance_level="sequence")
    assert low.loss.item() == pytest.approx(0.8)
    with pytest.raises(ValueError, match="token, sequence"):
        ppo_clipped_loss(new, old, adv, mask, eps_clip=0.2, importance_level="segment")
