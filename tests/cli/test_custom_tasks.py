"""Bring your own task through the real CLI: the documented example, a reward function
from a file outside the repository, a reward function that always raises, and one-line
refusals (exit status 2, before any model loads) of the user's bad files."""

import json
import re
import shlex
import subprocess
import time

import pytest

from tests.conftest import REPO, areal_cli, cli_env
from workflows.metrics.stats import read_stats

DOC = REPO / "docs" / "custom_tasks.md"
EXAMPLE = REPO / "examples" / "custom_task"


def run(*args, timeout=300):
    return subprocess.run(areal_cli(*args), capture_output=True, text=True, cwd=REPO, env=cli_env(), timeout=timeout)


def test_the_documented_example_is_the_tested_files_and_under_60_lines():
    text = DOC.read_text()
    files = [EXAMPLE / name for name in ("reward.py", "workflow.py", "task.yaml")]
    for path in files:
        assert path.read_text().rstrip() in text, f"{path.name} differs from its copy in docs/custom_tasks.md"
    assert sum(len(p.read_text().splitlines()) for p in files) < 60


def test_the_documented_example_trains_two_steps_as_written(tmp_path):
    """The doc's smoke command, word for word (plus run_dir, to keep the repository clean)."""
    command = next(line for line in DOC.read_text().splitlines()
                   if line.startswith("areal train config=examples/custom_task/task.yaml model=tiny_random"))
    result = run(*shlex.split(command)[1:], f"run_dir={tmp_path}")
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    records = read_stats(tmp_path / "stats.jsonl")
    assert [r["step"] for r in records] == [1, 2]
    # The workflow's length penalty (workflow_args.length_penalty=0.001) is in the reward:
    # the random model never boxes the reversed word, so the reward is the penalty alone.
    for r in records:
        assert r["reward_mean"] == pytest.approx(-0.001 * r["response_length_mean"], abs=1e-5)
        assert r["num_sequences"] == 4 * 4 and r["reward_failures"] == 0
    assert "data: train: 34 prompts" in result.stdout


MY_REWARD = '''
async def score(completion, reference, *, prompt, row):
    # The row's columns and prompt reach the function; an async function works too.
    assert isinstance(prompt, str) and row["question"] == prompt and reference in row["answer"]
    return 0.25
'''


def test_a_reward_function_in_a_file_outside_the_repository_trains_and_reaches_the_stats(tmp_path, gsm8k_dir):
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "my_reward.py").write_text(MY_REWARD)
    spec = f"{tmp_path / 'tasks' / 'my_reward.py'}:score"
    result = run("train", "config=smoke", f"dataset.path={gsm8k_dir}", f"run_dir={tmp_path / 'run'}",
                 f"reward.fn=[{spec},exact_match]", "reward.weights=[2.0,1.0]")
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    records = read_stats(tmp_path / "run" / "stats.jsonl")
    assert len(records) == 2
    for r in records:
        # 2 x 0.25 from ours; a random model never gives GSM8K's exact boxed answer.
        assert r["reward_mean"] == pytest.approx(0.5) and r[f"reward/{spec}"] == pytest.approx(0.25)
        assert r["reward/exact_match"] == 0.0 and r["reward_failures"] == 0


def test_a_reward_function_that_always_raises_stops_the_run_with_one_line(tmp_path, gsm8k_dir):
    (tmp_path / "bad_reward.py").write_text("def score(completion, reference):\n    return 1 / 0\n")
    result = run("train", "config=smoke", f"dataset.path={gsm8k_dir}", f"run_dir={tmp_path / 'run'}",
                 f"reward.fn={tmp_path / 'bad_reward.py'}:score", "rollout.max_consecutive_rejections=4")
    assert result.returncode == 1, result.stderr[-3000:]
    # The first failure of each kind is logged with its traceback, as for any failing
    # rollout; the run ends with one line naming the function and where it raised.
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and result.stderr.strip().endswith(errors[0]), result.stderr[-3000:]
    assert "4 rollouts in a row were rejected" in errors[0]
    assert (f"bad_reward.py:score' raised ZeroDivisionError: division by zero ({tmp_path / 'bad_reward.py'}, line 2)"
            in errors[0])
    assert not (tmp_path / "run" / "stats.jsonl").exists() or read_stats(tmp_path / "run" / "stats.jsonl") == []


# ---------------------------------------------------------------------------------------
# The user's bad files: each refused with one line naming it, exit status 2, within 15 s,
# with nothing started (no run directory).


def _bad_inputs(tmp: "Path") -> list[tuple[list[str], str]]:  # noqa: F821
    data = tmp / "data"
    data.mkdir()
    (data / "cols.jsonl").write_text(json.dumps({"prompt": "2+2?", "solution": "4"}) + "\n")
    (data / "broken.jsonl").write_text('{"question": "a", "answer": "#### 1"}\n{"question": "b", "answer": \n')
    (data / "empty.jsonl").write_text("")
    (tmp / "reward.py").write_text("def two_args(completion):\n    return 0.0\n")
    (tmp / "syntax.py").write_text("def score(completion, reference)\n    return 0.0\n")
    (tmp / "workflow.py").write_text("class NoEpisode:\n    def __init__(self, tokenizer):\n        pass\n")
    (tmp / "bad.yaml").write_text("trainer:\n  total_steps: 3\n bad: [1,\n")
    (tmp / "a_file").write_text("x")
    (tmp / "model").mkdir()
    (tmp / "model" / "config.json").write_text("{}")
    return [
        ([f"dataset.path={data / 'cols.jsonl'}"],
         "has the columns [prompt, solution], not the expected [question, answer] (missing: question, answer); set "
         "dataset.prompt_column=<column> and dataset.answer_column=<column>"),
        ([f"dataset.path={data / 'broken.jsonl'}"], f"{data / 'broken.jsonl'} line 2 is not valid JSON"),
        ([f"dataset.path={data / 'empty.jsonl'}"], f"{data / 'empty.jsonl'} is empty"),
        ([f"dataset.path={data / 'cols.jsonl'}", "dataset.prompt_column=prompt", "dataset.answer_column=solution"],
         "dataset.batch_size=2 exceeds the 1 usable rows of the 'train' split"),
        (["reward.fn=no_such_module.rewards:score"], "reward.fn='no_such_module.rewards:score': cannot import"),
        ([f"reward.fn={tmp / 'reward.py'}:two_args"], "two_args(completion) cannot be called as fn(completion, "
                                                      "reference)"),
        ([f"reward.fn={tmp / 'reward.py'}:absent"], "has no 'absent' (it defines: two_args)"),
        ([f"reward.fn={tmp / 'syntax.py'}:score"], f"raised SyntaxError: expected ':' ({tmp / 'syntax.py'}, line 1)"),
        ([f"rollout.workflow={tmp / 'workflow.py'}:NoEpisode"], "NoEpisode has no `async def arun_episode"),
        (["reward.fn=[math_verify,exact_match]", "reward.weights=[1.0]"], "reward.weights=[1.0] gives 1 weights for 2"),
        (["reward.fn=reasoning_gym"], "reward.fn=reasoning_gym scores reasoning-gym tasks only"),
        ([f"config={tmp / 'bad.yaml'}"], "not valid YAML at line 3, column 2"),
        ([f"run_dir={tmp / 'a_file' / 'run'}"], f"the run directory {tmp / 'a_file' / 'run'} cannot be created"),
        ([f"model.path={tmp / 'model'}"], "has no tokenizer files"),
        ([f"model.path={tmp}"], "has no config.json"),
    ]


def test_the_users_bad_files_exit_2_with_one_line_quickly(tmp_path):
    cases = _bad_inputs(tmp_path)
    started = time.monotonic()
    procs = []
    for i, (words, _) in enumerate(cases):
        config = [] if any(w.startswith("config=") for w in words) else ["config=smoke"]
        # `run_dir` last where the case sets none, so a case that started anything would show.
        run_dir = [] if any(w.startswith("run_dir=") for w in words) else [f"run_dir={tmp_path / 'runs' / str(i)}"]
        procs.append(subprocess.Popen(areal_cli("train", *config, *words, *run_dir), stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True, cwd=REPO, env=cli_env()))
    try:
        outputs = [p.communicate(timeout=15 * len(procs)) for p in procs]
    finally:
        for p in procs:
            p.kill()
    for (words, fragment), proc, (out, err) in zip(cases, procs, outputs):
        lines = [line for line in err.splitlines() if line.strip()]
        assert proc.returncode == 2, (words, err[-2000:])
        assert len(lines) == 1 and lines[0].startswith("config error: "), (words, err)
        assert fragment in lines[0], (words, lines[0])
        assert "Traceback" not in out + err
    assert not (tmp_path / "runs").exists()  # nothing was started
    # Started together on a 2-core machine, the budget is shared: 15 s each.
    assert time.monotonic() - started < 15 * len(procs)


def test_own_columns_pass_with_the_two_overrides_that_name_them(tmp_path):
    rows = [{"prompt": f"{i} + {i}?", "solution": f"{2 * i}"} for i in range(4)]
    (tmp_path / "mine.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = run("config", "show", "config=smoke", f"dataset.path={tmp_path / 'mine.jsonl'}",
                 "dataset.prompt_column=prompt", "dataset.answer_column=solution")
    assert result.returncode == 0, result.stderr
    assert re.search(r"prompt_column: prompt\s+answer_column: solution", result.stdout)
