"""Evaluation: the unbiased pass@k estimator against hand-computed values, the report's
aggregation over prompts with the real reward function, and held-out filtering."""

import asyncio
import math

import pytest

from engines.config import GenerationConfig
from engines.inference import GenerationResponse
from workflows.data.dataset import held_out_rows
from workflows.rollout.reward import RewardScorer
from workflows.training.evaluation import evaluate_rows, pass_at_k, summarize


@pytest.mark.parametrize(
    "n, c, k, expected",
    [
        (5, 2, 2, 1 - 3 / 10),  # 1 - C(3,2)/C(5,2)
        (10, 3, 1, 0.3),  # pass@1 is the fraction correct
        (4, 0, 1, 0.0),
        (3, 3, 2, 1.0),
        (8, 5, 4, 1.0),  # fewer than k wrong: every draw of k holds a correct one
        (6, 1, 3, 1 - 10 / 20),  # 1 - C(5,3)/C(6,3)
    ],
)
def test_pass_at_k_matches_the_binomial_formula(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected)
    assert pass_at_k(n, c, k) == pytest.approx(1 - math.comb(n - c, k) / math.comb(n, k))


def test_pass_at_k_rejects_impossible_counts():
    for n, c, k in ((3, 4, 1), (3, 1, 0), (3, 1, 4)):
        with pytest.raises(ValueError):
            pass_at_k(n, c, k)


def test_summary_by_hand():
    prompts = [
        {"id": 2, "greedy_correct": True, "num_correct": 4},
        {"id": 1, "greedy_correct": False, "num_correct": 1},
        {"id": 3, "greedy_correct": False, "num_correct": 0},
        {"id": 0, "greedy_correct": True, "num_correct": 2},
    ]
    report = summarize(prompts, n_samples=4, pass_k=[1, 2, 8])
    assert report["accuracy"] == 0.5
    assert report["accuracy_se"] == pytest.approx(math.sqrt(0.25 / 4))
    assert report["pass@1"] == pytest.approx((4 + 1 + 0 + 2) / 16)
    assert report["pass@2"] == pytest.approx((1 + 0.5 + 0 + 5 / 6) / 4)  # 1 - C(4-c,2)/6 per prompt
    assert "pass@8" not in report  # k above n_samples is not estimable
    assert [p["id"] for p in report["prompts"]] == [0, 1, 2, 3]


def test_held_out_rows_never_contain_a_training_question():
    train = [{"question": "a"}, {"question": "b"}]
    kept, dropped = held_out_rows([{"question": "b"}, {"question": "c"}], train)
    assert kept == [{"question": "c"}] and dropped == 1


class ScriptedEngine:
    """An InferenceEngine whose completions are fixed text: greedy says `greedy`, the
    sampled ones cycle through `samples`; the tokenizer is the real one."""

    def __init__(self, tokenizer, greedy, samples):
        self.tokenizer, self.greedy, self.samples, self.calls = tokenizer, greedy, list(samples), 0

    def get_version(self):
        return 0

    async def agenerate(self, request):
        if request.temperature == 0:
            text = self.greedy
        else:
            text = self.samples[self.calls % len(self.samples)]
            self.calls += 1
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        return GenerationResponse(request.input_ids, ids, [0.0] * len(ids), [0] * len(ids), "stop")


def test_evaluate_rows_scores_greedy_and_samples_with_the_reward(tokenizer):
    rows = [{"id": i, "prompt_ids": [1, 2, 3], "answer": "42", "question": str(i)} for i in range(3)]
    engine = ScriptedEngine(tokenizer, greedy="The answer is \\boxed{42}", samples=["\\boxed{42}", "\\boxed{7}"])
    scorer = RewardScorer(num_workers=1, timeout=10)
    try:
        report = asyncio.run(evaluate_rows(engine, scorer, tokenizer, rows, GenerationConfig(max_new_tokens=8),
                                           n_samples=4, pass_k=[1, 4], concurrency=1))
    finally:
        scorer.close()
    assert report["accuracy"] == 1.0 and report["num_prompts"] == 3
    # Concurrency 1: each prompt's 4 samples alternate right, wrong.
    assert [p["num_correct"] for p in report["prompts"]] == [2, 2, 2]
    assert report["pass@1"] == pytest.approx(0.5) and report["pass@4"] == 1.0
