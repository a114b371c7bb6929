"""What each change to the sampler and the trainer contributes, measured one at a time.

    .venv/bin/python benchmarks/step_components.py        # ~18 minutes on a 2-core CPU

The work of `benchmarks/peer_trl.py`: SmolLM2-135M-Instruct in float32, the first 8 GSM8K
train prompts x 4 samples, 128 new tokens, temperature 1.0. Each variant runs in a fresh
subprocess (so its peak RSS is its own) and twice; the faster run is reported.

Generation (32 sequences, tokens/s of generated tokens):
  G0  transformers `generate(output_logits=True)`, logits stacked to [B, T, V] and
      log-softmaxed afterwards (areal before issue 8)
  G1  logprobs recorded while sampling (`SampledTokenLogprobs`), growing KV cache
  G2  + preallocated KV cache with each prompt prefilled once (`LocalInferenceEngine`)

Training (one PPO step on those 32 sequences, every row with a non-zero advantage,
prompt + completion tokens per second):
  T0  full [B, L, V] logits and log-softmax, multi-tensor AdamW (before issue 8)
  T1  selective log-softmax over completion positions, fused AdamW
  T2  + gradient checkpointing (the gsm8k_grpo default)
  T3  + bf16 autocast (`actor.mixed_precision=bf16`; gsm8k_grpo's `auto` turns it on
      on CPUs with AVX512-BF16 or AMX); the LM head that scores tokens stays float32

Skipping rows without advantage (`TrainEngine._rows_with_gradient`) is exact and
removes the forward and backward of every GRPO group whose samples all scored the same;
its gain is the share of such rows, printed by `peer_trl.py`'s runs per step.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

PROMPTS, GROUP, NEW_TOKENS = 8, 4, 128
VARIANTS = {
    "G0": "HF generate + stacked logits",
    "G1": "+ logprobs while sampling",
    "G2": "+ static cache, shared prefill",
    "T0": "full logits, foreach AdamW",
    "T1": "+ selective log-softmax, fused",
    "T2": "+ gradient checkpointing",
    "T3": "+ bf16 autocast",
}


def _setup():
    import torch

    from engines.config import ModelConfig
    from engines.factories import setup_cpu_threads, setup_malloc
    from engines.model import load_model, load_tokenizer, resolve_model_dir
    from workflows.data.dataset import PACKAGED_DATASETS, build_prompt_ids

    setup_cpu_threads()
    setup_malloc()
    model_dir = resolve_model_dir("HuggingFaceTB/SmolLM2-135M-Instruct")
    tokenizer = load_tokenizer(model_dir)
    rows = (PACKAGED_DATASETS["openai/gsm8k"] / "train.jsonl").read_text().splitlines()[:PROMPTS]
    prompts = [build_prompt_ids(tokenizer, json.loads(r)["question"]) for r in rows]
    torch.manual_seed(0)
    return load_model(ModelConfig(), model_dir, seed=0), tokenizer, prompts


def run_generation(variant: str) -> dict:
    import torch

    from engines.inference import GenerationRequest, LocalInferenceEngine

    model, tokenizer, prompts = _setup()
    engine = LocalInferenceEngine(model, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    requests = [GenerationRequest(input_ids=p, max_new_tokens=NEW_TOKENS) for p in prompts for _ in range(GROUP)]
    if variant == "G0":
        engine._generate = lambda ids, mask, first, stop_ids, recorder: _stacked_logits_generate(model, ids, mask, stop_ids, recorder)
    elif variant == "G1":
        engine._prompt_cache = lambda *args: None  # transformers' default growing cache
    start = time.perf_counter()
    with torch.no_grad():
        responses = engine.generate(requests)
    seconds = time.perf_counter() - start
    engine.destroy()
    tokens = sum(len(r.output_ids) for r in responses)
    return dict(seconds=seconds, tokens=tokens, tokens_per_s=tokens / seconds)


def _stacked_logits_generate(model, input_ids, attention_mask, stop_ids, recorder):
    """The sampler before issue 8: every step's logits kept, then one [B, T, V] log-softmax."""
    import torch

    out = model.generate(
        input_ids=input_ids, attention_mask=attention_mask, do_sample=True, temperature=1.0, top_k=0,
        max_new_tokens=NEW_TOKENS, eos_token_id=stop_ids, pad_token_id=stop_ids[0],
        return_dict_in_generate=True, output_logits=True,
    )
    new_tokens = out.sequences[:, input_ids.shape[1] :]
    logits = torch.stack(out.logits, dim=1).float()
    logp = torch.log_softmax(logits, dim=-1).gather(-1, new_tokens.unsqueeze(-1)).squeeze(-1)
    recorder._values = list(logp.unbind(1))  # hand the values back through the recorder's API
    return out.sequences


def run_training(variant: str) -> dict:
    import torch

    import engines.logprobs
    from engines.config import ActorConfig, OptimizerConfig
    from engines.train_engine import TrainEngine

    model, tokenizer, prompts = _setup()
    g = torch.Generator().manual_seed(0)
    rows = [p + torch.randint(3, 40000, (NEW_TOKENS,), generator=g).tolist() for p in prompts for _ in range(GROUP)]
    width = max(map(len, rows))
    batch = {k: torch.zeros(len(rows), width, dtype=torch.long) for k in ("input_ids", "attention_mask", "loss_mask")}
    for i, (row, prompt) in enumerate(zip(rows, (p for p in prompts for _ in range(GROUP)))):
        batch["input_ids"][i, : len(row)] = torch.tensor(row)
        batch["attention_mask"][i, : len(row)] = 1
        batch["loss_mask"][i, len(prompt) : len(row)] = 1
    batch["logprobs"] = torch.full((len(rows), width), -2.0) * batch["loss_mask"]
    batch["advantages"] = torch.linspace(-1, 1, len(rows))[:, None] * batch["loss_mask"]
    cfg = ActorConfig(optimizer=OptimizerConfig(lr=1e-6), gradient_checkpointing=variant in ("T2", "T3"),
                      mixed_precision="bf16" if variant == "T3" else "none", max_tokens_per_mb=4096)
    engine = TrainEngine(cfg, model, total_steps=1, max_sequence_tokens=width, temperature=1.0)
    if variant == "T0":
        engines.logprobs.supports_selective_logprobs = lambda model: False
        engine.optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6, weight_decay=0.01, foreach=True)
        engine.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(engine.optimizer, lambda step: 1.0)
    start = time.perf_counter()
    engine.train_batch(batch)
    seconds = time.perf_counter() - start
    tokens = int(batch["attention_mask"].sum())
    return dict(seconds=seconds, tokens=tokens, tokens_per_s=tokens / seconds)


def child(variant: str) -> None:
    result = (run_generation if variant.startswith("G") else run_training)(variant)
    result["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9
    print(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS),
                        help="a subset; ratios are to the first of each kind measured")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    results: dict[str, dict] = {}
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    for _ in range(args.repeats):
        for variant in args.variants:  # interleaved, so slow spells of a shared machine spread out
            out = subprocess.run([sys.executable, __file__, variant], capture_output=True, text=True, env=env, check=True)
            result = json.loads(out.stdout.strip().splitlines()[-1])
            best = results.get(variant)
            if best is None or result["seconds"] < best["seconds"]:
                results[variant] = result
    print(f"{'variant':<4} {'':<32} {'seconds':>8} {'tokens':>7} {'tokens/s':>9} {'vs first':>9} {'peak GB':>8}")
    for kind in "GT":
        measured = [v for v in VARIANTS if v.startswith(kind) and v in results]
        if not measured:
            continue
        first = results[measured[0]]["tokens_per_s"]  # "vs first": the first variant measured
        for variant, label in VARIANTS.items():
            if variant in measured:
                r = results[variant]
                print(f"{variant:<4} {label:<32} {r['seconds']:8.1f} {r['tokens']:7d} {r['tokens_per_s']:9.1f} "
                      f"{r['tokens_per_s'] / first:8.2f}x {r['peak_rss_gb']:8.2f}")


if __name__ == "__main__":
    if len(sys.argv) == 2 and sys.argv[1] in VARIANTS:
        child(sys.argv[1])
    else:
        main()
