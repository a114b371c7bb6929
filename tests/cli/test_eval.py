"""Evaluation through the real CLI: the trainer evaluates before its first step and every
`trainer.eval_freq_steps`, and `areal eval` scores a saved checkpoint, both on held-out
prompts only, with a JSON report that keeps every prompt's result."""

import json
import subprocess

from tests.cli.test_resume import train
from tests.conftest import REPO, areal_cli, cli_env
from workflows.metrics.stats import read_stats


def test_trainer_and_areal_eval_report_held_out_accuracy(tmp_path, gsm8k_dir):
    train(tmp_path, gsm8k_dir, "trainer.total_steps=2", "trainer.eval_freq_steps=1", "eval.n_samples=2",
          "dataset.max_eval_samples=3")
    records = read_stats(tmp_path / "stats.jsonl")
    assert [r["step"] for r in records] == [0, 1, 2]  # the baseline before any training
    for r in records:
        assert r["eval_num_prompts"] == 3 and 0 <= r["eval_accuracy"] <= 1 and "eval_pass@1" in r
    reports = sorted(p.name for p in (tmp_path / "eval").glob("step_*.json"))
    assert reports == ["step_0.json", "step_1.json", "step_2.json"]

    result = subprocess.run(
        areal_cli("eval", "config=smoke", f"dataset.path={gsm8k_dir}", f"run_dir={tmp_path}",
                  f"model.path={tmp_path / 'checkpoints' / 'step_2'}", "eval.n_samples=4", "dataset.max_eval_samples=5"),
        capture_output=True, text=True, cwd=REPO, env=cli_env(), timeout=300,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "greedy pass@1, 5 prompts" in result.stdout and "pass@4" in result.stdout
    report = json.loads((tmp_path / "eval" / "step_2-test.json").read_text())
    assert report["num_prompts"] == len(report["prompts"]) == 5
    assert {"pass@1", "pass@4", "accuracy_se"} <= report.keys()
    for prompt in report["prompts"]:
        assert prompt["num_samples"] == 4 and 0 <= prompt["num_correct"] <= 4
        assert isinstance(prompt["greedy_completion"], str)
    ids = [p["id"] for p in report["prompts"]]
    assert ids == sorted(ids)
