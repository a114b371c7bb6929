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
