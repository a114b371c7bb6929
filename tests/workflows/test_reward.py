import asyncio
import subprocess
import sys
import time

import pytest

from tests.conftest import REPO, cli_env
from workflows.config import BUILTIN_REWARDS
from workflows.rollout.reward import RewardFunctionError, RewardScorer
from workflows.rollout.reward_fns import CONFIGURED_REWARDS, REWARD_FUNCTIONS


def slow_reward(completion: str, reference: str) -> float:
    time.sleep(30)
    return 1.0


def broken_reward(completion: str, reference: str) -> float:
    raise RuntimeError("parser exploded")


@pytest.fixture(scope="module")
def scorer():
    s = RewardScorer(num_workers=2, timeout=10)
    yield s
    s.close()


@pytest.mark.parametrize(
    "completion, reference, expected",
    [
        ("18 eggs, so \\boxed{18}", "18", 1.0),
        ("The answer is \\boxed{17}.", "18", 0.0),
        ("\\boxed{1234}", "1234", 1.0),
        ("\\boxed{0.5}", "1/2", 1.0),
        ("I don't know", "7", 0.0),
        ("", "7", 0.0),
    ],
)
def test_math_verify_scores(scorer, completion, reference, expected):
    assert scorer.score(completion, reference) == expected


def test_async_scoring_runs_concurrently(scorer):
    async def go():
        return await asyncio.gather(*(scorer.ascore(f"\\boxed{{{i}}}", "3") for i in range(6)))

    assert asyncio.run(go()) == [0.0, 0.0, 0.0, 1.0, 0.0, 0.0]


def test_timeout_scores_zero_and_is_counted():
    s = RewardScorer(num_workers=1, timeout=1.0, reward_fn=slow_reward)
    try:
        start = time.monotonic()
        assert s.score("\\boxed{1}", "1") == 0.0
        assert time.monotonic() - start < 10
        assert s.stats.num_timeouts == 1 and s.stats.num_failed == 1
    finally:
        s.close()


def test_an_error_raises_naming_the_function_and_the_pool_survives():
    """A reward function that raises is a bug, not a wrong answer: scoring it 0.0 would
    train on zeros; the call raises instead (the rollout fails and is counted)."""
    s = RewardScorer(num_workers=1, timeout=5, reward_fn=[broken_reward, "math_verify"])
    try:
        for completion in ("x", "y"):
            with pytest.raises(RewardFunctionError) as info:
                s.score(completion, "1")
            message = str(info.value)  # with where the function raised, in the worker's traceback
            assert message.startswith("reward.fn 'broken_reward' raised RuntimeError: parser exploded (")
            assert message.endswith(f"test_reward.py, line {broken_reward.__code__.co_firstlineno + 1})")
        assert s.stats.num_failed == 2 and s.stats.num_errors == 2 and s.stats.num_timeouts == 0
        s.terms = s.terms[1:]  # the pool and the other function still score
        assert s.score("\\boxed{1}", "1") == 1.0
    finally:
        s.close()


def test_reward_formats_close_the_restated_question_loophole():
    """math-verify evaluates an expression: restating "74 + 30 =" scores 1.0 under `any`,
    which a first arith_grpo run learned to exploit; `number` takes only a written number."""
    from workflows.rollout.reward_fns import boxed_math_verify_reward, final_number_reward, math_verify_reward

    assert math_verify_reward("74 + 30 =", "104") == 1.0  # the loophole
    assert final_number_reward("74 + 30 =", "104") == 0.0
    assert final_number_reward("74 + 30 = 104.", "104") == 1.0
    assert final_number_reward("59 - 68 = -9", "-9") == 1.0
    assert final_number_reward("about 1,234 apples", "1234") == 1.0
    assert final_number_reward("no digits here", "3") == 0.0
    assert boxed_math_verify_reward("so 9", "9") == 0.0
    assert boxed_math_verify_reward("so \\boxed{9}", "9") == 1.0


def faulty_reward(completion: str, reference: str) -> float:
    """A reward function that misbehaves as `completion` says: hangs, exits its process,
    segfaults, or scores normally (math-verify)."""
    import ctypes
    import os

    if completion == "hang":
        time.sleep(3600)
    if completion == "exit":
        os._exit(3)
    if completion == "segfault":
        ctypes.string_at(0)  # reads address 0: SIGSEGV
    from workflows.rollout.reward_fns import math_verify_reward

    return math_verify_reward(completion, reference)


def worker_pid(completion: str, reference: str) -> int:
    import os

    return os.getpid()


@pytest.mark.parametrize("fault", ["hang", "exit", "segfault"])
def test_a_reward_worker_that_hangs_or_dies_is_replaced_and_the_scoring_goes_on(fault):
    s = RewardScorer(num_workers=1, timeout=2.0, reward_fn=faulty_reward)
    try:
        before = s._pool.schedule(worker_pid, args=("", "")).result()
        start = time.monotonic()
        assert s.score(fault, "1") == 0.0
        assert time.monotonic() - start < 15  # the hang is cut at the timeout
        assert s.stats.num_failed == 1 and s.stats.num_timeouts == (1 if fault == "hang" else 0)
        assert s.stats.num_crashes == (0 if fault == "hang" else 1)
        # The pool started a new worker, which scores the next completion correctly.
        assert s.score("\\boxed{1}", "1") == 1.0
        assert s._pool.schedule(worker_pid, args=("", "")).result() != before
        assert s.stats.num_scored == 2 and s.stats.num_failed == 1
    finally:
        s.close()


def test_many_faults_among_good_completions_are_each_counted_once():
    # One worker: every fault is followed by a good completion on its replacement, so no
    # replacement is still starting when the pool closes.
    s = RewardScorer(num_workers=1, timeout=2.0, reward_fn=faulty_reward)

    async def go():
        completions = ["\\boxed{1}", "exit", "\\boxed{2}", "segfault", "\\boxed{1}", "hang", "\\boxed{1}"]
        return await asyncio.gather(*(s.ascore(c, "1") for c in completions))

    try:
        assert asyncio.run(go()) == [1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 1.0]
        assert (s.stats.num_scored, s.stats.num_failed, s.stats.num_crashes, s.stats.num_timeouts) == (7, 3, 2, 1)
    finally:
        s.close()


def test_builtin_rewards_are_one_list():
    """REWARD_FUNCTIONS and CONFIGURED_REWARDS map exactly the built-in names reward.fn
    accepts, and a mismatch fails the import of workflows/rollout/reward_fns.py."""
    assert set(REWARD_FUNCTIONS) | set(CONFIGURED_REWARDS) == set(BUILTIN_REWARDS)
    assert not set(REWARD_FUNCTIONS) & set(CONFIGURED_REWARDS)
    code = (
        "import workflows.config as c\n"
        "c.BUILTIN_REWARDS = c.BUILTIN_REWARDS + ('latex',)\n"
        "import workflows.rollout.reward_fns\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=cli_env(), capture_output=True, text=True,
                            timeout=120)
    assert result.returncode != 0 and "ImportError" in result.stderr and "latex" in result.stderr, result.stderr


# ---------------------------------------------------------------------------------------
# Reward functions by name and by import path.


def test_exact_match_and_reasoning_gym_scorer_on_a_non_numeric_task():
    import reasoning_gym

    from workflows.rollout.reward_fns import exact_match_reward, reasoning_gym_reward

    assert exact_match_reward("so \\boxed{tac}", "tac") == 1.0
    assert exact_match_reward("<answer> a  b </answer>", "a b") == 1.0
    assert exact_match_reward("tac", "tac") == 0.0  # no final answer given
    entry = reasoning_gym.create_dataset("word_sorting", size=1, seed=3)[0]
    row = {"question": entry["question"], "answer": entry["answer"], "metadata": entry["metadata"]}
    right = f"Sorted: \\boxed{{{entry['answer']}}}"
    assert reasoning_gym_reward(right, entry["answer"], row) == 1.0
    assert reasoning_gym_reward("\\boxed{}", entry["answer"], row) == 0.0
    # math-verify, the old default, cannot score a word list: the reason for the new default.
    assert REWARD_FUNCTIONS["math_verify"](right, entry["answer"]) == 0.0
    with pytest.raises(ValueError, match="reasoning_gym:<task> only"):
        reasoning_gym_reward(right, "x", {"question": "q"})


USER_REWARDS = '''
import asyncio

def plain(completion, reference):
    return float(completion == reference)

async def later(completion, reference, **kwargs):
    await asyncio.sleep(0)
    return len(kwargs["row"]) + (kwargs["prompt"] == "p")

def by_row(completion, reference, *, row):
    return row["bonus"]

def wrong(completion, reference, extra):
    return 0.0

def not_a_number(completion, reference):
    return "yes"
'''


def test_user_functions_by_file_path_sync_async_weighted(tmp_path):
    from workflows.rollout.reward_fns import resolve_reward
    from workflows.user_code import UserCodeError

    path = tmp_path / "rewards.py"
    path.write_text(USER_REWARDS)
    s = RewardScorer(num_workers=1, timeout=10, reward_fn=[f"{path}:plain", f"{path}:later", f"{path}:by_row"],
                     weights=[1.0, 0.5, 2.0])
    try:
        assert [t.keywords for t in s.terms] == [frozenset(), frozenset({"prompt", "row"}), frozenset({"row"})]
        value = asyncio.run(s.ascore("a", "a", prompt="p", row={"bonus": 0.25, "x": 1}))
        assert value == pytest.approx(1.0 + 0.5 * (2 + 1) + 2.0 * 0.25)
        assert s.take_means() == {f"{path}:plain": 1.0, f"{path}:later": 3.0, f"{path}:by_row": 0.25}
        assert s.take_means() == {}
        s.terms = [resolve_reward(f"{path}:not_a_number")]
        with pytest.raises(RewardFunctionError, match="returned 'yes', not a finite number"):
            s.score("a", "a")
    finally:
        s.close()
    for spec, fragment in [
        (f"{path}:wrong", "wrong(completion, reference, extra) cannot be called as fn(completion, reference)"),
        (f"{path}:absent", "has no 'absent'"),
        (f"{tmp_path}/none.py:f", "no such file"),
        ("no_such_pkg.mod:f", "cannot import 'no_such_pkg.mod'"),
        ("latex", "is no built-in reward"),
    ]:
        with pytest.raises(UserCodeError) as info:
            resolve_reward(spec)
        assert fragment in str(info.value) and str(info.value).startswith(f"reward.fn={spec!r}")
