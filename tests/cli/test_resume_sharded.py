"""actor.parallelism=fsdp2 through the real CLI: a run of 2 replicas (`areal launch`) that
crashes resumes in 1 process (`areal train`) from its DCP recover checkpoint, and the
reverse; either way every step is logged once and every prompt trained once, and the
final model is a Hugging Face directory that `from_pretrained` loads."""

from __future__ import annotations

import subprocess

import pytest
import torch
from transformers import AutoModelForCausalLM

from tests.cli.test_resume import model_state, resumed_from
from tests.cli.test_train_smoke import SIGNAL
from tests.conftest import REPO, areal_cli, cli_env
from workflows.metrics.stats import read_stats

STEPS = 4
BATCH = 2  # config=smoke's dataset.batch_size: one prompt per replica at 2 replicas


def overrides(tmp_path, gsm8k_dir) -> list[str]:
    return ["config=smoke", f"dataset.path={gsm8k_dir}", f"run_dir={tmp_path / 'run'}", f"trainer.total_steps={STEPS}",
            "trainer.recover_freq_steps=1", "actor.parallelism=fsdp2", "actor.deterministic=true", *SIGNAL]


def run(tmp_path, gsm8k_dir, replicas: int, *, crash_after: int | None = None) -> subprocess.CompletedProcess:
    env = cli_env()
    if crash_after is not None:
        env["AREAL_FAULT_AFTER_STEP"] = str(crash_after)
    if replicas == 1:
        argv = areal_cli("train", *overrides(tmp_path, gsm8k_dir))
    else:
        argv = areal_cli("launch", "--replicas", str(replicas), "--run-root", str(tmp_path / "launches"),
                         "--run-id", f"r{replicas}-{crash_after}", *overrides(tmp_path, gsm8k_dir))
    result = subprocess.run(argv, capture_output=True, text=True, cwd=REPO, env=env, timeout=900)
    assert (result.returncode != 0) == (crash_after is not None), result.stdout[-2000:] + result.stderr[-3000:]
    return result


def log_of(tmp_path, result, replicas: int, crash_after=None) -> str:
    if replicas == 1:
        return result.stdout
    return (tmp_path / "launches" / f"r{replicas}-{crash_after}" / "rank0.log").read_text()


def check_every_prompt_once(tmp_path) -> None:
    records = read_stats(tmp_path / "run" / "stats.jsonl")
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    trained = [(e, i) for r in records for e, i in zip(r["prompt_epochs"], r["prompt_ids"])]
    assert len(trained) == len(set(trained)) == STEPS * BATCH
    final = tmp_path / "run" / "checkpoints" / f"step_{STEPS}"  # the exported final model
    model = AutoModelForCausalLM.from_pretrained(final)
    exported = model_state(final)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in exported.items())


@pytest.mark.slow  # two real training runs, one of them 2 replicas (minutes; over 10 on a loaded machine)
@pytest.mark.timeout(1800)
@pytest.mark.parametrize("first,then", [(2, 1), (1, 2)])
def test_a_crashed_sharded_run_resumes_at_another_rank_count(tmp_path, gsm8k_dir, first, then):
    crashed = run(tmp_path, gsm8k_dir, first, crash_after=2)
    assert "resuming from" not in log_of(tmp_path, crashed, first, 2)
    dcp = tmp_path / "run" / "checkpoints" / "recover" / "dcp"
    assert len(list(dcp.glob("*.distcp"))) == first  # one file per writing rank
    resumed = run(tmp_path, gsm8k_dir, then)
    assert resumed_from(log_of(tmp_path, resumed, then)) == 1  # step 2 died before its checkpoint
    check_every_prompt_once(tmp_path)
