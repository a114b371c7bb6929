"""The smoke config through the real CLI, in subprocesses."""

import subprocess

import torch
import yaml

from tests.conftest import REPO, areal_cli, cli_env
from workflows.metrics.stats import read_stats

# REINFORCE with a constant baseline gives every token a non-zero advantage even when a
# random model never answers correctly, so the update (and its numerics) is non-trivial;
# two minibatches make the second one's PPO ratio depend on the first update.
SIGNAL = ["actor.group_reward_norm=false", "actor.reward_bias=-0.5", "actor.ppo_n_minibatches=2"]


def train(run_dir, gsm8k_dir, *overrides):
    cmd = areal_cli("train", "config=smoke", f"dataset.path={gsm8k_dir}", f"run_dir={run_dir}", *overrides)
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=cli_env(), timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result


def test_smoke_writes_stats_config_and_loadable_checkpoint(tmp_path, gsm8k_dir):
    from transformers import AutoModelForCausalLM

    result = train(tmp_path, gsm8k_dir)
    records = read_stats(tmp_path / "stats.jsonl")
    assert [r["step"] for r in records] == [1, 2]
    keys = ("reward_mean", "accuracy", "response_length_mean", "loss", "grad_norm", "lr", "gen_tokens_per_s",
            "train_tokens_per_s", "train_time_s", "step_time_s", "peak_rss_gb", "signal_share")
    for key in keys:
        assert all(isinstance(r[key], (int, float)) for r in records), key
    # The process's peak RSS: at least the torch runtime, never decreasing.
    assert 0.2 < records[0]["peak_rss_gb"] <= records[1]["peak_rss_gb"] < 8
    assert all(r["train_tokens"] >= r["gen_tokens"] > 0 for r in records)
    assert all(r["num_sequences"] == 4 for r in records)  # 2 prompts x 2 samples
    assert "step 2/2" in result.stdout and "reward" in result.stdout and "signal" in result.stdout
    # A random model's 2 samples rarely agree, but the entropy exists only when some group trained.
    assert all(0 <= r["signal_share"] <= 1 for r in records)
    assert all(r["entropy"] is None if r["signal_share"] == 0 else r["entropy"] > 0 for r in records)
    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert saved["trainer"]["total_steps"] == 2 and saved["model"]["init_from_scratch"] is True
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "checkpoints" / "step_2")
    assert model.config.num_hidden_layers == 2


def test_policy_changes_and_deterministic_runs_match(tmp_path, gsm8k_dir, model_dir):
    from transformers import AutoModelForCausalLM

    from areal_cli.config import load_config
    from engines.model import load_model

    runs = [tmp_path / "a", tmp_path / "b"]
    for run in runs:
        train(run, gsm8k_dir, "actor.deterministic=true", *SIGNAL)
    first, second = (read_stats(r / "stats.jsonl") for r in runs)
    assert all(r["loss"] != 0 and r["entropy"] > 0 for r in first)
    # Every curve is the same, not only the loss: all but wall-clock times and memory.
    timing = lambda key: key.endswith("_s") or key == "peak_rss_gb"  # noqa: E731
    curves = [[{k: v for k, v in r.items() if not timing(k)} for r in run] for run in (first, second)]
    assert len(curves[0][0]) > 20 and curves[0] == curves[1]

    # The trained weights differ from the seeded initial weights.
    cfg = load_config("smoke")
    initial = load_model(cfg.model, model_dir, seed=cfg.seed).state_dict()
    trained = AutoModelForCausalLM.from_pretrained(runs[0] / "checkpoints" / "step_2").state_dict()
    changed = [k for k in initial if not torch.equal(initial[k], trained[k])]
    assert len(changed) >= len(initial) - 1


def test_gspo_with_truncated_importance_sampling_trains(tmp_path, gsm8k_dir):
    """GSPO's sequence ratio and truncated importance sampling through the CLI: the
    trainer recomputes its own logprobs, keeps the sampler's beside them, and the
    weights reach the loss (reported as importance weights, within the cap)."""
    train(tmp_path, gsm8k_dir, *SIGNAL, "actor.importance_level=sequence", "actor.recompute_logprob=true",
          "actor.tis_cap=2", "actor.adv_estimator=grpo")
    records = read_stats(tmp_path / "stats.jsonl")
    assert [r["step"] for r in records] == [1, 2]
    assert all(r["loss"] != 0 and 0 < r["importance_weight_mean"] <= r["importance_weight_max"] <= 2.0 for r in records)
    assert all(r["logprob_abs_diff_mean"] < 1e-3 for r in records)


def test_ppo_with_a_critic_trains_and_resumes(tmp_path, gsm8k_dir):
    """actor.adv_estimator=gae: the critic's statistics are in every record, its state is
    in the recover checkpoint, and a longer run continues from it."""
    common = ["actor.adv_estimator=gae", "actor.reward_bias=-0.5", "gconfig.n_samples=1", "dataset.batch_size=2"]
    train(tmp_path, gsm8k_dir, *common, "trainer.total_steps=2", "trainer.recover_freq_steps=1")
    assert (tmp_path / "checkpoints" / "recover" / "critic" / "value_model.safetensors").is_file()
    result = train(tmp_path, gsm8k_dir, *common, "trainer.total_steps=3")
    assert "resuming from step 2" in result.stdout + result.stderr
    records = read_stats(tmp_path / "stats.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3]
    assert all(r["value_loss"] > 0 and r["loss"] != 0 and "explained_variance" in r for r in records)
