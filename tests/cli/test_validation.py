"""Config values are checked when the config is resolved, before anything heavy starts."""

import os
import subprocess
import time

import pytest

from areal_cli.config import ConfigError, load_config
from tests.conftest import REPO, areal_cli, cli_env, schema_leaves

# (override, text the one-line refusal must contain). The key and the bad value are
# always named; the rest says what to change.
BAD_VALUES = [
    ("stats_logger.backends=[console,mlflow]", "must list distinct backends among console, jsonl, tensorboard, wandb"),
    ("stats_logger.wandb_mode=cloud", "must be one of offline, online, disabled"),
    ("deployment_mode=colocated", "must be one of local_colocated, dataflow_colocated, disaggregated"),
    ("metadata_store=redis", "must be one of noop, memory, sqlite"),
    ("rollout.workers=0", "must be >= 1 (rollout worker processes)"),
    ("rollout.max_failure_rate=0", "must be in (0, 1]"),
    ("rollout.failure_rate_window=0", "must be >= 1"),
    ("actor.optimizer.type=adamax", "adamw, sgd"),
    ("actor.optimizer.lr_scheduler_type=warmup", "constant, linear, cosine"),
    ("actor.kl_estimator=k4", "k1, k2, k3"),
    ("model.dtype=float8", "float32"),
    ("model.attn_implementation=fast", "sdpa"),
    ("model.device=tpu", "must be one of auto, cpu, cuda"),
    ("rollout.max_head_offpolicyness=-1", ">= 0"),
    ("rollout.consumer_batch_size=0", ">= 1"),
    ("rollout.max_concurrent_rollouts=0", ">= 1"),
    ("rollout.reward_timeout=0", "> 0"),
    ("gconfig.n_samples=-4", ">= 1"),
    ("gconfig.temperature=-1", ">= 0"),
    ("gconfig.top_p=1.5", "(0, 1]"),
    ("gconfig.top_p=nan", "(0, 1]"),
    ("gconfig.max_new_tokens=0", ">= 1"),
    ("actor.optimizer.lr=inf", "> 0"),
    ("actor.optimizer.beta2=1", "[0, 1)"),
    ("actor.optimizer.warmup_steps_proportion=2", "[0, 1]"),
    ("actor.behav_imp_weight_cap=0.5", "> 1"),
    ("actor.tis_cap=0.5", ">= 1 (Yao et al. use 2)"),
    ("actor.tis_mode=clip", "must be one of truncate, mask"),
    ("actor.adv_estimator=ppo", "must be one of grpo, rloo, reinforce_plus_plus"),
    ("actor.importance_level=segment", "must be one of token, sequence"),
    ("actor.gae_lambda=1.5", "must be in [0, 1]"),
    ("critic.optimizer.lr=0", "must be > 0"),
    ("critic.value_eps_clip=0", "must be > 0, or null"),
    ("actor.lora.rank=0", "must be an integer >= 1"),
    ("actor.lora.alpha=0", "must be > 0"),
    ("actor.lora.dropout=1", "must be in [0, 1)"),
    ("actor.lora.target_modules=[]", "must list module names"),
    ("actor.lora.sync=weights", "must be one of merged, adapters"),
    ("trainer.total_steps=0", ">= 1"),
    ("dataset.batch_size=0", ">= 1"),
    ("stats_logger.file_name=a/b.jsonl", "without '/'"),
]


def _key(override: str) -> str:
    return override.split("=", 1)[0]


@pytest.mark.parametrize("override, fragment", BAD_VALUES)
def test_bad_value_refused_naming_key_and_value(override, fragment):
    with pytest.raises(ConfigError) as info:
        load_config("smoke", [override])
    message = str(info.value)
    assert message.startswith(_key(override) + "="), message
    assert fragment in message
    assert "\n" not in message


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        (["actor.max_tokens_per_mb=100"], "actor.max_tokens_per_mb=100 cannot hold one sequence of up to 528 tokens"),
        (["actor.use_decoupled_loss=true"], "set actor.recompute_logprob=true"),
        (["actor.tis_cap=2"], "actor.tis_cap=2.0 weights tokens by the trainer's over the sampler's logprobs; "
                               "set actor.recompute_logprob=true"),
        (["actor.tis_cap=2", "actor.recompute_logprob=true", "actor.use_decoupled_loss=true"],
         "actor.tis_cap=2.0 with actor.use_decoupled_loss=true would correct the sampler twice"),
        (["gconfig.n_samples=1"], "gconfig.n_samples=1 with actor.group_reward_norm=true"),
        (["gconfig.n_samples=1", "actor.adv_estimator=rloo", "actor.group_reward_norm=false"],
         "gconfig.n_samples=1 leaves actor.adv_estimator=rloo no other sample"),
        (["gconfig.temperature=0", "actor.adv_estimator=rloo", "actor.group_reward_norm=false"], "gconfig.temperature=0"),
        (["gconfig.temperature=0"], "gconfig.temperature=0"),
        (["trainer.total_steps=null", "rollout.consumer_batch_size=3"], "rollout.consumer_batch_size=3 differs"),
        (["deployment_mode=disaggregated", "metadata_store=memory"], "needs metadata_store=sqlite"),
        (["deployment_mode=disaggregated", "rollout.workers=3"], "rollout.workers=3 does not divide"),
        (["deployment_mode=disaggregated", "trainer.eval_freq_steps=1"], "set trainer.eval_freq_steps=0"),
        (["actor.lora.enabled=true", "actor.adv_estimator=gae"], "the critic would copy the adapted policy"),
        (["actor.lora.enabled=true", "actor.lora.target_modules=[all-linear,q_proj]"], "give [all-linear] alone"),
        (["actor.lora.enabled=true", "actor.parallelism=fsdp2"], "adapters are trained on whole (ddp) replicas only"),
        (["actor.lora.enabled=true", "actor.lora.sync=adapters"], "actor.lora.sync=adapters needs rollout.backend=vllm"),
        (["actor.lora.enabled=true", "actor.lora.sync=adapters", "rollout.backend=vllm", "actor.lora.rank=1024"],
         "exceeds vLLM's largest --max-lora-rank (512)"),
    ],
)
def test_cross_field_rules(overrides, fragment):
    with pytest.raises(ConfigError, match=None) as info:
        load_config("smoke", overrides)
    assert fragment in str(info.value)


def test_cross_field_rules_allow_the_consistent_variants():
    assert load_config("smoke", ["actor.use_decoupled_loss=true", "actor.recompute_logprob=true"]).actor.use_decoupled_loss
    assert load_config("smoke", ["gconfig.n_samples=1", "actor.group_reward_norm=false"]).gconfig.n_samples == 1
    assert load_config("smoke", ["actor.tis_cap=2", "actor.recompute_logprob=true", "actor.tis_mode=mask"]).actor.tis_cap == 2
    # PPO with a critic needs no group.
    assert load_config("smoke", ["gconfig.n_samples=1", "actor.adv_estimator=gae"]).actor.adv_estimator == "gae"
    # REINFORCE++ without a group baseline normalises over the batch, so a group of one is fine.
    assert load_config("smoke", ["gconfig.n_samples=1", "actor.group_reward_norm=false",
                                 "actor.adv_estimator=reinforce_plus_plus"]).gconfig.n_samples == 1
    assert load_config("smoke", ["actor.lora.enabled=true", "actor.lora.target_modules=[q_proj,v_proj]"]).actor.lora.enabled
    # The rules of a switched-off LoRA section are those of its values only.
    assert load_config("smoke", ["actor.lora.sync=adapters"]).actor.lora.sync == "adapters"
    # A consumer batch that differs from the dataset batch is fine when the run length is in steps.
    assert load_config("smoke", ["rollout.consumer_batch_size=3"]).rollout.consumer_batch_size == 3
    assert load_config("smoke", ["trainer.total_steps=null", "rollout.consumer_batch_size=2"]).trainer.total_steps is None


def test_critic_trains_in_one_process():
    with pytest.raises(ConfigError, match="actor.adv_estimator=gae trains its critic in one process, not over 2"):
        load_config("smoke", ["actor.adv_estimator=gae"], world_size=2)


def test_parallelism_is_one_checked_key():
    with pytest.raises(ConfigError, match="actor.parallelism='zero3' is invalid"):
        load_config("smoke", ["actor.parallelism=zero3"])
    with pytest.raises(ConfigError, match="actor.cpu_offload=true offloads FSDP2's shards"):
        load_config("smoke", ["actor.cpu_offload=true"])
    with pytest.raises(ConfigError, match="actor.parallelism=fsdp2 shards the policy but not the critic"):
        load_config("smoke", ["actor.parallelism=fsdp2", "actor.adv_estimator=gae"])
    cfg = load_config("smoke", ["actor.parallelism=fsdp2", "actor.cpu_offload=true"], world_size=2)
    assert (cfg.actor.parallelism, cfg.actor.cpu_offload) == ("fsdp2", True)


def test_batch_must_split_over_replicas():
    with pytest.raises(ConfigError, match="dataset.batch_size=2 does not split over 3 replicas"):
        load_config("smoke", [], world_size=3)
    assert load_config("smoke", [], world_size=2).dataset.batch_size == 2


def test_world_size_from_environment(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(ConfigError, match="over 3 replicas"):
        load_config("smoke")
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(ConfigError, match="WORLD_SIZE='two'"):
        load_config("smoke")


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("model.path=/no/such/model", "model.path='/no/such/model' does not exist"),
        ("model.path=./missing-model", "model.path='./missing-model' does not exist"),
        ("model.path=gguf:no_such_package/x.gguf", "names no installed GGUF"),
        ("dataset.path=/no/such/data", "dataset.path='/no/such/data' does not exist"),
        ("dataset.path=../no/such/data", "does not exist"),
    ],
)
def test_missing_local_paths(override, fragment):
    with pytest.raises(ConfigError, match=None) as info:
        load_config("smoke", [override])
    assert fragment in str(info.value)


def test_existing_paths_and_hub_ids_pass(tmp_path, gsm8k_dir):
    (tmp_path / "file.txt").write_text("x")
    assert load_config("smoke", [f"dataset.path={gsm8k_dir}"]).dataset.path == str(gsm8k_dir)
    assert load_config("smoke", ["model.path=someone/some-model"]).model.path == "someone/some-model"
    with pytest.raises(ConfigError, match="is a file"):
        load_config("smoke", [f"model.path={tmp_path / 'file.txt'}"])
    # The paths of a job that runs elsewhere are not this machine's to check.
    assert load_config("smoke", ["dataset.path=/data/only/on/the/cluster"], check_paths=False)


def test_cuda_without_a_gpu_is_refused_here_but_not_for_another_machine():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(ConfigError, match=r"^model.device='cuda' but this machine sees no CUDA device"):
        load_config("smoke", ["model.device=cuda"])
    # A cloud launch resolves the config here for a machine that has the GPU.
    assert load_config("smoke", ["model.device=cuda"], check_paths=False).model.device == "cuda"


@pytest.mark.parametrize(
    "word, fragment",
    [
        ("===", "cannot read the override '==='"),
        ("a.b.c", "cannot read the override 'a.b.c' (missing EQUAL"),
        ("trainer.total_steps=[1", "cannot read the override"),
        ("foo bar=1", "cannot read the override"),
        ("=3", "names no key"),
    ],
)
def test_malformed_override_quotes_word_and_expected_form(word, fragment):
    with pytest.raises(ConfigError) as info:
        load_config("smoke", [word])
    assert fragment in str(info.value)
    assert "key=value, +key=value or ~key" in str(info.value)
    assert "\n" not in str(info.value)


def test_unknown_group_option_lists_the_valid_ones():
    with pytest.raises(ConfigError, match="model=nope names no model config; use one of smollm2_135m, tiny_random"):
        load_config("smoke", ["model=nope"])
    assert load_config("gsm8k_grpo", ["model=tiny_random"]).model.init_from_scratch


def test_user_yaml_outside_the_repository(tmp_path):
    # A file with no defaults list of its own lands on the schema's defaults...
    bare = tmp_path / "bare_exp.yaml"
    bare.write_text("trainer:\n  total_steps: 6\ngconfig:\n  n_samples: 3\n")
    cfg = load_config(str(bare), ["actor.optimizer.lr=2e-5"])
    assert (cfg.trainer.total_steps, cfg.gconfig.n_samples, cfg.actor.optimizer.lr) == (6, 3, 2e-5)
    assert cfg.model.path == "HuggingFaceTB/SmolLM2-135M-Instruct"
    # ...and one that extends a shipped config takes the shipped values it does not change.
    derived = tmp_path / "my_exp.yaml"
    derived.write_text("defaults:\n  - smoke\n  - _self_\nexperiment_name: mine\ndataset:\n  batch_size: 4\n")
    cfg = load_config(str(derived))
    assert (cfg.experiment_name, cfg.dataset.batch_size, cfg.trainer.total_steps) == ("mine", 4, 2)
    assert cfg.model.init_from_scratch
    # The same checks apply to a user's file.
    (tmp_path / "typo.yaml").write_text("trainer:\n  totl_steps: 3\n")
    with pytest.raises(ConfigError, match="did you mean 'total_steps'"):
        load_config(str(tmp_path / "typo.yaml"))
    (tmp_path / "bad.yaml").write_text("gconfig:\n  n_samples: 0\n")
    with pytest.raises(ConfigError, match="gconfig.n_samples=0"):
        load_config(str(tmp_path / "bad.yaml"))
    with pytest.raises(ConfigError, match="no such file"):
        load_config(str(tmp_path / "absent.yaml"))


# The cases a user hit on a fresh clone (issue 7), through the real CLI in subprocesses,
# all started at once: each must exit 2 within 15 s with one line naming the key.
NAMED_CASES = [
    ["actor.optimizer.type=adamax"],
    ["actor.optimizer.lr_scheduler_type=warmup"],
    ["rollout.max_head_offpolicyness=-1"],
    ["rollout.consumer_batch_size=0"],
    ["model.path=/no/such/model"],
    ["dataset.path=/no/such/data"],
    ["==="],
    ["a.b.c"],
    ["gconfig.n_samples=-4"],
    ["gconfig.temperature=-1"],
]


def _expected_word(overrides: list[str]) -> str:
    word = overrides[0]
    return f"'{word}'" if "=" not in word or word.startswith("=") else _key(word)


def test_named_bad_inputs_exit_2_quickly_through_the_cli(tmp_path):
    started = time.monotonic()
    procs = [
        subprocess.Popen(
            areal_cli("train", "config=gsm8k_grpo", f"run_dir={tmp_path / str(i)}", *case),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO, env=cli_env(),
        )
        for i, case in enumerate(NAMED_CASES)
    ]
    try:
        # Started together on a 2-core machine, so the budget is shared: 15 s each.
        outputs = [p.communicate(timeout=15 * len(procs)) for p in procs]
    finally:
        for p in procs:
            p.kill()
    elapsed = time.monotonic() - started
    for case, proc, (out, err) in zip(NAMED_CASES, procs, outputs):
        assert proc.returncode == 2, (case, out[-500:], err[-2000:])
        lines = [line for line in err.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("config error: "), (case, err)
        assert _expected_word(case) in lines[0], (case, lines[0])
        assert "Traceback" not in out + err
        assert not (tmp_path / str(NAMED_CASES.index(case))).exists()  # nothing was started
    assert elapsed < 15 * len(procs)


def test_config_show_and_launch_dry_run_refuse_the_same_input(tmp_path):
    for command in (["config", "show"], ["launch", "--dry-run", "--run-root", str(tmp_path)]):
        result = subprocess.run(
            areal_cli(*command, "config=smoke", "gconfig.temperature=-1"),
            capture_output=True, text=True, cwd=REPO, env=cli_env(), timeout=60,
        )
        assert result.returncode == 2, (command, result.stderr)
        assert result.stderr.strip() == "config error: gconfig.temperature=-1.0 is invalid; it must be >= 0 (0 samples greedily)"


def test_launch_checks_batch_against_replicas(tmp_path):
    result = subprocess.run(
        areal_cli("launch", "--replicas", "3", "--dry-run", "--run-root", str(tmp_path), "config=smoke"),
        capture_output=True, text=True, cwd=REPO, env={**cli_env(), "WORLD_SIZE": "1"}, timeout=60,
    )
    assert result.returncode == 2
    assert "dataset.batch_size=2 does not split over 3 replicas" in result.stderr
    assert os.listdir(tmp_path) == []


def test_every_constrained_key_has_a_rule():
    """A new schema key gets a row in rules.RULES (written, or derived from its choices) unless
    any value of its type is fine."""
    from areal_cli.rules import RULES

    unconstrained = {"seed", "run_dir", "cache_dir", "model.path", "model.config_overrides", "dataset.path", "dataset.name"}
    needs_rule = {key for key, annotation in schema_leaves() if annotation is not bool and key not in unconstrained}
    assert needs_rule - {rule.key for rule in RULES} == set()


def test_inference_server_settings(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no .venv-vllm here
    with pytest.raises(ConfigError, match=r"rollout.backend=vllm needs vllm installed: run `make install-vllm`"):
        load_config("smoke", ["rollout.backend=vllm"])
    with pytest.raises(ConfigError, match=r"rollout.servers='x' is invalid"):
        load_config("smoke", ["rollout.servers=x"])
    with pytest.raises(ConfigError, match=r"rollout.servers=\[.*'nohost'\] is invalid"):
        load_config("smoke", ["rollout.servers=[nohost]"])
    with pytest.raises(ConfigError, match="cannot sample deterministically"):
        load_config("smoke", ["rollout.backend=vllm", "rollout.servers=[127.0.0.1:8000]", "actor.deterministic=true"])
    # Attaching to running servers needs no local install.
    attached = load_config("smoke", ["rollout.backend=vllm", "rollout.servers=[127.0.0.1:8000,127.0.0.1:8001]"])
    assert list(attached.rollout.servers) == ["127.0.0.1:8000", "127.0.0.1:8001"]
    python = tmp_path / "py"
    python.write_text("")
    assert load_config("smoke", ["rollout.backend=vllm", f"rollout.server_python={python}"]).rollout.backend == "vllm"


@pytest.mark.parametrize("override, fragment", [
    ("reward.judge.base_url=127.0.0.1:8000", "must be an http:// or https:// URL"),
    ("reward.judge.rubric='Grade {answer}'", "must contain {completion}"),
    ("reward.judge.rubric='{completion} {response}'", "no placeholders but {question}, {completion}, {reference}"),
    ("reward.judge.rubric='{completion} {'", "must contain {completion}"),
    ("reward.judge.grade_pattern='Grade: \\d+'", "whose first group captures the grade"),
    ("reward.judge.grade_pattern='Grade: (\\d+'", "whose first group captures the grade"),
    ("reward.judge.timeout=0", "must be > 0 (seconds per request)"),
    ("reward.judge.max_retries=-1", "must be >= 0"),
    ("reward.judge.max_tokens=0", "must be >= 1"),
    ("reward.judge.backoff=-1", "must be >= 0"),
])
def test_judge_settings_are_checked(override, fragment):
    with pytest.raises(ConfigError) as info:
        load_config("smoke", ["reward.fn=llm_judge", override])
    assert str(info.value).startswith(_key(override) + "=") and fragment in str(info.value)


def test_judge_grade_range_and_api_key_variable(monkeypatch):
    with pytest.raises(ConfigError, match=r"reward.judge.max_grade=1.0 must exceed reward.judge.min_grade=1.0"):
        load_config("smoke", ["reward.fn=llm_judge", "reward.judge.min_grade=1", "reward.judge.max_grade=1"])
    # A key pasted where the variable's name belongs is refused without being quoted.
    pasted = "sk-proj-PastedKey0123456789"
    with pytest.raises(ConfigError) as info:
        load_config("smoke", ["reward.fn=llm_judge", f"reward.judge.api_key_env={pasted}-x"])
    assert "never the key itself" in str(info.value) and "PastedKey" not in str(info.value)
    monkeypatch.delenv("AREAL_TEST_UNSET_KEY", raising=False)
    with pytest.raises(ConfigError, match="reward.judge.api_key_env=AREAL_TEST_UNSET_KEY names an environment variable "
                                          "that is not set"):
        load_config("smoke", ["reward.fn=llm_judge", "reward.judge.api_key_env=AREAL_TEST_UNSET_KEY"])
    monkeypatch.setenv("AREAL_TEST_UNSET_KEY", "k")
    cfg = load_config("smoke", ["reward.fn=[math_verify,llm_judge]", "reward.weights=[1,0.5]",
                                "reward.judge.api_key_env=AREAL_TEST_UNSET_KEY", "reward.judge.model=qwen"])
    assert cfg.reward.judge.model == "qwen"
