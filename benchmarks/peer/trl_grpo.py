"""TRL's GRPOTrainer on CPU: the peer half of the side-by-side GRPO benchmark.

Runs in the separate TRL venv that `benchmarks/peer_trl.py` creates, never in the
project's `.venv`, and imports nothing from this project:

    .venv-trl/bin/python benchmarks/peer/trl_grpo.py \\
        --model-dir ~/.cache/areal/models/SmolLM2-135M-Instruct.Q4_1 \\
        --prompts prompts.jsonl --num-prompts 8 --group-size 4 \\
        --max-new-tokens 128 --steps 3 --output trl.json

`--prompts` is JSONL, one object a line: {"messages": [{"role": "user", "content": ...}],
"answer": "<reference number>"}; prompts are consumed in file order.

Setup: float32 on CPU, TRL's GRPOConfig defaults except what the benchmark fixes: beta=0
(no reference model), num_generations=group size, shuffle_dataset=False, bf16=False
(TRL turns bf16 autocast on by default), no eval/save/report. Batching is set so that one
optimizer step consumes exactly one generation round of num_prompts x group_size
completions, generated at that step by the current policy:

    per_device_train_batch_size = micro-batch (TRL default 8, in completions)
    gradient_accumulation_steps = num_prompts * group_size / micro-batch
    steps_per_generation        = gradient_accumulation_steps (TRL's default)
    => generation_batch_size    = num_prompts * group_size

Reward: 1.0 when math_verify finds the completion's answer equal to the reference.

Output JSON (`--output`), per optimizer step: step_time_s (wall time from the trainer's
on_step_begin to on_step_end, seconds), gen_time_s (time in GRPOTrainer's
`_generate_single_turn`, i.e. padding + model.generate, seconds), train_time_s
(step - gen: tokenization, reward, forward/backward, optimizer), gen_tokens (completion
tokens generated, EOS included), train_tokens (prompt + completion tokens without padding),
num_completions, gen_calls (1: one generation round), reward_mean, rss_gb (psutil RSS at
step end, GB = 10^9 bytes); then peak_rss_gb (ru_maxrss of the whole process, GB, the true peak),
max_step_end_rss_gb, trl_version, torch_version, transformers_version, config.

Cost: the default settings (8 x 4 completions, 128 new tokens, 3 steps) took ~9 minutes
and peaked at ~6.9 GB RSS on 2 shared CPU cores; training, not generation, dominates.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
warnings.filterwarnings("ignore")

import datasets  # noqa: E402
import psutil  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
import trl  # noqa: E402
from math_verify import parse, verify  # noqa: E402
from transformers import TrainerCallback  # noqa: E402
from transformers.trainer_callback import PrinterCallback  # noqa: E402
from trl import GRPOConfig, GRPOTrainer  # noqa: E402

GB = 1e9  # the unit of areal's peak_rss_gb


def math_verify_reward(completions, answer, **_) -> list[float]:
    """1.0 where the completion's answer verifies equal to the reference, else 0.0."""
    rewards = []
    for completion, reference in zip(completions, answer, strict=True):
        text = completion[-1]["content"] if isinstance(completion, list) else completion
        gold = parse(reference, parsing_timeout=None)
        pred = parse(text, parsing_timeout=None)
        ok = gold and pred and verify(gold, pred, timeout_seconds=None)
        rewards.append(1.0 if ok else 0.0)
    return rewards


class TimedGRPOTrainer(GRPOTrainer):
    """GRPOTrainer that times generation and counts tokens for the step in progress."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.step_stats: dict = {}

    def _generate_single_turn(self, prompt_ids, *args, **kwargs):
        start = time.perf_counter()
        completion_ids, logprobs = super()._generate_single_turn(prompt_ids, *args, **kwargs)
        gen_tokens = sum(len(c) for c in completion_ids)
        stats = self.step_stats
        stats["gen_time_s"] = stats.get("gen_time_s", 0.0) + time.perf_counter() - start
        stats["gen_calls"] = stats.get("gen_calls", 0) + 1
        stats["num_completions"] = stats.get("num_completions", 0) + len(completion_ids)
        stats["gen_tokens"] = stats.get("gen_tokens", 0) + gen_tokens
        stats["train_tokens"] = stats.get("train_tokens", 0) + gen_tokens + sum(len(p) for p in prompt_ids)
        return completion_ids, logprobs


class StepTimer(TrainerCallback):
    """Collects one record per optimizer step from the trainer's step hooks."""

    def __init__(self, trainer: TimedGRPOTrainer):
        self.trainer = trainer
        self.steps: list[dict] = []
        self.rss_max = 0

    def on_step_begin(self, args, state, control, **kwargs):
        self.trainer.step_stats = {}
        self.start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        step_time = time.perf_counter() - self.start
        stats = self.trainer.step_stats
        rss = psutil.Process().memory_info().rss
        self.rss_max = max(self.rss_max, rss)
        rewards = self.trainer._metrics["train"].get("reward", [])
        self.steps.append(
            {
                "step": state.global_step,
                "step_time_s": round(step_time, 3),
                "gen_time_s": round(stats.get("gen_time_s", 0.0), 3),
                "train_time_s": round(step_time - stats.get("gen_time_s", 0.0), 3),
                "gen_tokens": stats.get("gen_tokens", 0),
                "train_tokens": stats.get("train_tokens", 0),
                "num_completions": stats.get("num_completions", 0),
                "gen_calls": stats.get("gen_calls", 0),
                "reward_mean": round(rewards[-1], 4) if rewards else None,
                "rss_gb": round(rss / GB, 3),
            }
        )


def load_prompts(path: Path, count: int) -> datasets.Dataset:
    rows = []
    with open(path) as f:
        for line in f:
            if line.strip():
                row = json.loads(line)
                rows.append({"prompt": row["messages"], "answer": str(row["answer"])})
            if len(rows) == count:
                break
    if len(rows) < count:
        raise SystemExit(f"{path} has {len(rows)} prompts, the run needs {count}")
    return datasets.Dataset.from_list(rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-dir", type=Path, required=True, help="local HF model directory")
    p.add_argument("--prompts", type=Path, required=True, help="JSONL with messages/answer")
    p.add_argument("--num-prompts", type=int, default=8, help="prompts per optimizer step")
    p.add_argument("--group-size", type=int, default=4, help="completions per prompt")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--lr", type=float, default=1e-6)
    p.add_argument("--steps", type=int, default=3, help="optimizer steps")
    p.add_argument(
        "--micro-batch-size",
        type=int,
        default=8,
        help="completions per forward/backward (TRL's per_device_train_batch_size default: 8)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", type=Path, required=True, help="JSON file to write")
    a = p.parse_args()

    torch.set_num_threads(os.cpu_count() or 1)
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    logging.getLogger("math_verify").setLevel(logging.ERROR)  # "timeout is disabled", per call

    rollouts = a.num_prompts * a.group_size
    micro = min(a.micro_batch_size, rollouts)
    if rollouts % micro:
        raise SystemExit(f"num_prompts x group_size ({rollouts}) must be a multiple of --micro-batch-size ({micro})")
    accum = rollouts // micro

    with tempfile.TemporaryDirectory(prefix="peer-trl-") as out_dir:
        config = GRPOConfig(
            output_dir=out_dir,
            use_cpu=True,
            bf16=False,  # TRL's default (None) means bf16 autocast; the benchmark is float32
            model_init_kwargs={"dtype": "float32"},
            learning_rate=a.lr,
            beta=0.0,
            num_generations=a.group_size,
            per_device_train_batch_size=micro,
            gradient_accumulation_steps=accum,
            steps_per_generation=accum,  # = TRL's default; one generation round per optimizer step
            num_iterations=1,
            max_completion_length=a.max_new_tokens,
            temperature=a.temperature,
            max_steps=a.steps,
            shuffle_dataset=False,
            seed=a.seed,
            use_vllm=False,
            eval_strategy="no",
            save_strategy="no",
            report_to="none",
            disable_tqdm=True,
        )
        assert config.generation_batch_size == rollouts, config.generation_batch_size
        trainer = TimedGRPOTrainer(
            model=str(a.model_dir.expanduser()),
            reward_funcs=math_verify_reward,
            args=config,
            train_dataset=load_prompts(a.prompts, a.num_prompts * a.steps),
        )
        trainer.remove_callback(PrinterCallback)  # it prints every log dict
        timer = StepTimer(trainer)
        trainer.add_callback(timer)
        trainer.train()

    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    fields = """
        learning_rate beta num_generations per_device_train_batch_size gradient_accumulation_steps
        steps_per_generation generation_batch_size num_iterations max_completion_length temperature
        top_p top_k loss_type scale_rewards epsilon epsilon_high gradient_checkpointing
        gradient_checkpointing_kwargs bf16 max_grad_norm lr_scheduler_type warmup_steps optim
        weight_decay adam_beta1 adam_beta2 adam_epsilon shuffle_dataset max_steps seed use_vllm
    """.split()
    result = {
        "steps": timer.steps,
        "peak_rss_gb": round(peak_kb * 1024 / GB, 3),
        "max_step_end_rss_gb": round(timer.rss_max / GB, 3),  # psutil; misses in-step peaks
        "trl_version": trl.__version__,
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
        "torch_threads": torch.get_num_threads(),
        "config": {f: _plain(getattr(config, f)) for f in fields},
    }
    a.output.write_text(json.dumps(result, indent=2) + "\n")


def _plain(value):
    """JSON-friendly form of a config value (enums become their value)."""
    value = getattr(value, "value", value)
    return value if isinstance(value, (bool, int, float, str, dict, list, type(None))) else str(value)


if __name__ == "__main__":
    main()
