"""Crash recovery through the real CLI: a run killed mid-way and started again with the
same run_dir finishes as if it had never stopped, training no prompt twice and dropping none."""

import re
import shutil
import signal
import subprocess
import time

import pytest
import torch
from safetensors.torch import load_file

from tests.cli.test_train_smoke import SIGNAL
from tests.conftest import REPO, areal_cli, cli_env
from workflows.metrics.stats import read_stats
from workflows.training.recover import read_recover_info


def command(run_dir, gsm8k_dir, *overrides):
    return areal_cli("train", "config=smoke", f"dataset.path={gsm8k_dir}", f"run_dir={run_dir}", *overrides)


def train(run_dir, gsm8k_dir, *overrides, env=None, expect_rc=0):
    result = subprocess.run(
        command(run_dir, gsm8k_dir, *overrides), capture_output=True, text=True, cwd=REPO, env=env or cli_env(), timeout=300
    )
    assert result.returncode == expect_rc, result.stdout[-2000:] + result.stderr[-4000:]
    return result


def num_records(path):
    try:
        return sum(1 for line in path.read_text().splitlines() if line.strip())
    except FileNotFoundError:
        return 0


def kill_after_records(run_dir, gsm8k_dir, *overrides, records: int):
    """Start a run and SIGKILL it as soon as its stats.jsonl holds `records` records."""
    proc = subprocess.Popen(
        command(run_dir, gsm8k_dir, *overrides), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=REPO, env=cli_env()
    )
    deadline = time.monotonic() + 240
    try:
        while num_records(run_dir / "stats.jsonl") < records:
            assert proc.poll() is None, f"the run ended (rc={proc.returncode}) before being killed: {proc.stderr.read()[-3000:]}"
            assert time.monotonic() < deadline, "the run made no progress"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    return proc.returncode


def model_state(path):
    return {k: v for f in sorted(path.glob("*.safetensors")) for k, v in load_file(f).items()}


def resumed_from(stdout: str) -> int:
    match = re.search(r"resuming from step (\d+) \(checkpoints/recover\)", stdout)
    assert match, stdout[-2000:]
    return int(match.group(1))


def test_sigkilled_run_resumes_to_the_same_result(tmp_path, gsm8k_dir):
    common = ["trainer.total_steps=4", "trainer.save_freq_steps=1", "actor.deterministic=true", *SIGNAL]
    whole, crashed = tmp_path / "whole", tmp_path / "crashed"
    assert kill_after_records(crashed, gsm8k_dir, *common, records=2) == -signal.SIGKILL
    killed_at = num_records(crashed / "stats.jsonl")
    assert killed_at < 4

    # The reference: an uninterrupted run, from a copy of the crashed run_dir with
    # trainer.resume=false, which must ignore its checkpoint and stats and start over.
    shutil.copytree(crashed, whole)
    result = train(whole, gsm8k_dir, *common, "trainer.resume=false")
    assert "trainer.resume=false: ignoring the recover checkpoint at step" in result.stdout
    assert "resuming from" not in result.stdout
    assert "removed the superseded recover checkpoint" in result.stdout
    assert f"dropped {killed_at} stats record(s) written by an earlier run" in result.stdout

    result = train(crashed, gsm8k_dir, *common)
    # The recover checkpoint of step 1 was written before step 2 was logged; the kill may
    # have hit before, during or after the checkpoint of the last logged step.
    step = resumed_from(result.stdout)
    assert 1 <= step <= killed_at

    expected, got = read_stats(whole / "stats.jsonl"), read_stats(crashed / "stats.jsonl")
    assert [r["step"] for r in expected] == [r["step"] for r in got] == [1, 2, 3, 4]  # each step once
    assert all(r["loss"] != 0 for r in expected)
    for key in ("loss", "grad_norm", "lr", "prompt_ids", "reward_mean"):
        assert [r[key] for r in got] == [r[key] for r in expected], key

    a, b = model_state(whole / "checkpoints" / "step_4"), model_state(crashed / "checkpoints" / "step_4")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    opt_a, opt_b = (torch.load(r / "checkpoints" / "recover" / "optimizer.pt", weights_only=True) for r in (whole, crashed))
    assert opt_a["lr_scheduler"] == opt_b["lr_scheduler"]
    state_a, state_b = opt_a["optimizer"]["state"], opt_b["optimizer"]["state"]
    assert state_a.keys() == state_b.keys()
    assert all(torch.equal(state_a[p][k], state_b[p][k]) for p in state_a for k in state_a[p])


def test_async_crash_trains_every_prompt_once(tmp_path, gsm8k_dir):
    """Asynchronous mode: at the checkpoint the rollout controller holds prompts it pulled
    but the trainer has not trained; they must be regenerated, and nothing trained twice."""
    total, batch, offpolicy = 8, 2, 2
    common = [
        f"trainer.total_steps={total}", "trainer.save_freq_steps=1", f"rollout.max_head_offpolicyness={offpolicy}",
        "rollout.dump_trajectories=true",
    ]
    # Dies after logging step 3, before that step's checkpoint: resume is from step 2 and
    # the record of step 3 (and its trajectory dump) must be rolled back.
    env = {**cli_env(), "AREAL_FAULT_AFTER_STEP": "3"}
    first = train(tmp_path, gsm8k_dir, *common, env=env, expect_rc=1)
    crashed = read_stats(tmp_path / "stats.jsonl")
    assert [r["step"] for r in crashed] == [1, 2, 3]
    assert (tmp_path / "trajectories" / "2.jsonl").exists()

    result = train(tmp_path, gsm8k_dir, *common)
    assert resumed_from(result.stdout) == 2
    records = read_stats(tmp_path / "stats.jsonl")
    assert [r["step"] for r in records] == list(range(1, total + 1))
    assert records[:2] == crashed[:2]
    assert all(r["rollouts_rejected"] == 0 for r in records + crashed)  # nothing legitimately dropped
    assert max(r["staleness_max"] for r in records) >= 1  # it really ran ahead

    # No prompt trained twice; exactly batch prompts per step.
    trained = [(e, i) for r in records for e, i in zip(r["prompt_epochs"], r["prompt_ids"])]
    assert len(trained) == len(set(trained)) == total * batch
    assert {e for e, _ in trained} == {0}

    # No prompt dropped. The epoch order is the loader's (seed 1, epoch 0, no row skipped).
    n = int(re.search(r"train: (\d+) prompts; skipped 0 malformed rows and 0 over", first.stdout).group(1))
    order = torch.randperm(n, generator=torch.Generator().manual_seed(1)).tolist()
    position = {prompt: p for p, prompt in enumerate(order)}
    trained_ids = {i for _, i in trained}
    # Prompts pulled before the checkpoint but not trained by it (in flight) must have
    # been regenerated and trained after the resume.
    at_checkpoint = {i for r in records[:2] for i in r["prompt_ids"]}
    in_flight = {order[p] for p in range(max(position[i] for i in at_checkpoint))} - at_checkpoint
    assert in_flight <= trained_ids
    # Only the final in-flight window, at most (max_head_offpolicyness + 1) batches pulled
    # last, may be untrained below the furthest trained prompt.
    furthest = max(position[i] for i in trained_ids)
    holes = [p for p in range(furthest) if order[p] not in trained_ids]
    assert all(p > furthest - (offpolicy + 1) * batch for p in holes), (holes, furthest)

    # Trajectory dumps: one file per trained version, each written once.
    dumps = sorted(int(p.stem) for p in (tmp_path / "trajectories").glob("*.jsonl"))
    assert dumps == list(range(total))
    for v in dumps:
        assert num_records(tmp_path / "trajectories" / f"{v}.jsonl") == batch * 2, v  # 2 samples per prompt


@pytest.mark.slow  # three smoke runs (47 s); tests/workflows/test_checkpoint_faults.py covers each file fast
def test_a_damaged_recover_checkpoint_stops_the_restart_with_one_line(tmp_path, gsm8k_dir):
    run_dir = tmp_path / "run"
    train(run_dir, gsm8k_dir, "trainer.total_steps=2", "trainer.recover_freq_steps=1")
    weights = next((run_dir / "checkpoints" / "recover" / "model").glob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte inside the weights: same size
    weights.write_bytes(bytes(data))
    result = train(run_dir, gsm8k_dir, "trainer.total_steps=3", expect_rc=1)
    [line] = [x for x in result.stderr.splitlines() if x.startswith("error:")]
    assert "model/model.safetensors does not match its SHA-256" in line, result.stderr[-2000:]
    assert len(read_stats(run_dir / "stats.jsonl")) == 2  # nothing was rolled back or retrained
    # The user's way out: start afresh on purpose.
    train(run_dir, gsm8k_dir, "trainer.total_steps=1", "trainer.resume=false")
    assert len(read_stats(run_dir / "stats.jsonl")) == 1
    assert read_recover_info(run_dir / "checkpoints" / "recover").step == 1
