"""The first PPO ratio of a step, when the trainer and the sampler compute in different
precisions (issue 24, item 7).

    .venv/bin/python benchmarks/first_ratio.py --prompts 1 --samples 2 --max-new-tokens 16   # the run in docs/benchmarks.md

SmolLM2-135M-Instruct (float32 weights), the first `--prompts` GSM8K train prompts x
`--samples` completions of up to `--max-new-tokens` tokens at temperature 1.0, as
`gsm8k_grpo` samples them. Before the first update the policy is the sampler's, so the
ratio pi_train / pi_old of every token should be 1; what the loss sees instead is the
trainer's forward pass (train mode, gradients on, micro-batched as `TrainEngine` does)
against the logprobs the anchor holds:

  fp32 / fp32           trainer in float32 (mixed_precision none) vs the float32 sampler:
                        what batch shapes and the KV cache alone cost
  (a) bf16 / fp32       trainer in bf16 autocast vs the float32 sampler (gsm8k_grpo's
                        `mixed_precision: auto` on bf16 hardware, before this change)
  (b) bf16 / bf16       the sampler decoding under the same bf16 autocast
  (c) recompute         the anchor recomputed by the trainer in bf16 (`compute_logp`,
                        one no-grad forward) before the update
  (d) TIS, C = 2        (c) plus Yao et al.'s truncated importance weight
                        min(pi_trainer_old / pi_sampler, 2) per token (`actor.tis_cap`):
                        the ratio is (c)'s; the weight corrects the remaining mismatch

Per variant: the mean, 99th percentile and largest |log ratio| in nats per token, and the
share of tokens that start outside the clip band [1 - 0.2, 1 + 0.2] (half of them, on
average, on the side where the clipped branch is taken and their gradient is zero). For
(d) the weight's statistics instead. Timings: sampling, and the extra forward of (c)
against one training forward + backward.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

EPS_CLIP, TIS_CAP = 0.2, 2.0


def setup(prompts: int):
    from engines.config import ModelConfig
    from engines.factories import setup_cpu_threads, setup_malloc
    from engines.model import load_model, load_tokenizer, resolve_model_dir
    from workflows.data.dataset import PACKAGED_DATASETS, build_prompt_ids

    setup_cpu_threads()
    setup_malloc()
    model_dir = resolve_model_dir("HuggingFaceTB/SmolLM2-135M-Instruct")
    tokenizer = load_tokenizer(model_dir)
    rows = (PACKAGED_DATASETS["openai/gsm8k"] / "train.jsonl").read_text().splitlines()[:prompts]
    prompt_ids = [build_prompt_ids(tokenizer, json.loads(r)["question"]) for r in rows]
    return load_model(ModelConfig(), model_dir, seed=0), tokenizer, prompt_ids


def sample(model, tokenizer, prompt_ids, samples: int, max_new_tokens: int, seed: int, autocast_dtype=None):
    """Completions of the in-process sampler (optionally decoding under autocast) as a
    right-padded batch with the sampler's logprobs; and the seconds it took."""
    import torch

    from engines.inference import GenerationRequest, LocalInferenceEngine

    engine = LocalInferenceEngine(model, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                                  shares_weights=True, autocast_dtype=autocast_dtype)
    requests = [GenerationRequest(input_ids=p, max_new_tokens=max_new_tokens, temperature=1.0, seed=seed)
                for p in prompt_ids for _ in range(samples)]
    start = time.perf_counter()
    responses = engine.generate(requests)
    seconds = time.perf_counter() - start
    engine.destroy()
    length = max(len(r.input_ids) + len(r.output_ids) for r in responses)
    batch = {k: torch.zeros(len(responses), length, dtype=torch.long) for k in ("input_ids", "attention_mask",
                                                                                 "loss_mask")}
    batch["logprobs"] = torch.zeros(len(responses), length)
    batch["input_ids"].fill_(tokenizer.pad_token_id)
    for i, r in enumerate(responses):
        p, n = len(r.input_ids), len(r.output_ids)
        batch["input_ids"][i, : p + n] = torch.tensor(r.input_ids + r.output_ids)
        batch["attention_mask"][i, : p + n] = 1
        batch["loss_mask"][i, p : p + n] = 1
        batch["logprobs"][i, p : p + n] = torch.tensor(r.output_logprobs)
    return batch, seconds


def trainer(model, mixed_precision: str, max_tokens: int):
    from engines.config import ActorConfig
    from engines.train_engine import TrainEngine

    cfg = ActorConfig(mixed_precision=mixed_precision, gradient_checkpointing=True, max_tokens_per_mb=4096)
    return TrainEngine(cfg, model, total_steps=1, max_sequence_tokens=max_tokens, temperature=1.0)


def train_forward(engine, batch, backward: bool = False):
    """The logprobs the loss computes (train mode, gradients on, the engine's autocast and
    micro-batches), and the seconds of that forward (plus its backward with `backward`)."""
    import torch

    from engines.factories import autocast
    from engines.logprobs import token_logprobs

    engine.model.train()
    B, L = batch["input_ids"].shape
    out = torch.zeros(B, L)
    start = time.perf_counter()
    for idx, mb in engine._micro_batches({k: batch[k] for k in ("input_ids", "attention_mask", "loss_mask")}):
        with autocast(engine.autocast_dtype, engine.device):
            logp = token_logprobs(engine.model, mb["input_ids"], mb["attention_mask"], 1.0, mb["loss_mask"])
        if backward:
            logp.sum().backward()
        width = min(L, logp.shape[1])
        out[idx, :width] = logp.detach()[:, :width]
    seconds = time.perf_counter() - start
    engine.model.zero_grad(set_to_none=True)
    return out, seconds


def ratio_row(name: str, log_ratio, mask) -> dict:
    import torch

    values = log_ratio[mask.bool()].abs().double()
    band = (values > math.log(1 + EPS_CLIP)) | (log_ratio[mask.bool()] < math.log(1 - EPS_CLIP))
    return dict(variant=name, tokens=values.numel(), mean=float(values.mean()),
                p99=float(torch.quantile(values, 0.99)), max=float(values.max()),
                outside=float(band.double().mean()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args()

    import torch

    model, tokenizer, prompt_ids = setup(args.prompts)
    max_tokens = max(map(len, prompt_ids)) + args.max_new_tokens + 1
    fp32_batch, fp32_sample_s = sample(model, tokenizer, prompt_ids, args.samples, args.max_new_tokens, args.seed)
    bf16_batch, bf16_sample_s = sample(model, tokenizer, prompt_ids, args.samples, args.max_new_tokens, args.seed,
                                       autocast_dtype=torch.bfloat16)
    fp32_engine, bf16_engine = trainer(model, "none", max_tokens), trainer(model, "bf16", max_tokens)

    rows = []
    train32, _ = train_forward(fp32_engine, fp32_batch)
    rows.append(ratio_row("fp32 trainer / fp32 sampler", train32 - fp32_batch["logprobs"], fp32_batch["loss_mask"]))
    train16, train_s = train_forward(bf16_engine, fp32_batch, backward=True)
    rows.append(ratio_row("(a) bf16 trainer / fp32 sampler", train16 - fp32_batch["logprobs"], fp32_batch["loss_mask"]))
    train16_b, _ = train_forward(bf16_engine, bf16_batch)
    rows.append(ratio_row("(b) bf16 trainer / bf16 sampler", train16_b - bf16_batch["logprobs"],
                          bf16_batch["loss_mask"]))
    start = time.perf_counter()
    recomputed = bf16_engine.compute_logp(fp32_batch)
    recompute_s = time.perf_counter() - start
    rows.append(ratio_row("(c) bf16 trainer / bf16 recompute", train16 - recomputed, fp32_batch["loss_mask"]))
    mask = fp32_batch["loss_mask"].bool()
    log_rho = (recomputed - fp32_batch["logprobs"])[mask]
    rho = log_rho.exp()
    tis = dict(variant=f"(d) TIS weight min(rho, {TIS_CAP:g}), ratio as (c)", tokens=int(mask.sum()),
               mean=float(log_rho.abs().mean()), p99=float(torch.quantile(log_rho.abs().double(), 0.99)),
               max=float(log_rho.abs().max()), outside=float((rho > TIS_CAP).double().mean()))
    rows.append(tis)

    print(f"SmolLM2-135M-Instruct, {args.prompts} GSM8K prompts x {args.samples} samples, <= {args.max_new_tokens} "
          f"new tokens, temperature 1.0, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'variant':<44} {'tokens':>6} {'mean|lr|':>9} {'p99|lr|':>8} {'max|lr|':>8} {'outside':>8}")
    for r in rows:
        print(f"{r['variant']:<44} {r['tokens']:>6} {r['mean']:>9.4f} {r['p99']:>8.4f} {r['max']:>8.4f} "
              f"{r['outside']:>8.2%}")
    print("(lr: log ratio in nats per token; outside: share of tokens outside [0.8, 1.2]; for (d) the columns are "
          f"|log rho| and the share with rho > {TIS_CAP:g})")
    fp32_tokens, bf16_tokens = int(fp32_batch["loss_mask"].sum()), int(bf16_batch["loss_mask"].sum())
    print(f"sampling: fp32 {fp32_tokens / fp32_sample_s:.1f} tokens/s, under bf16 autocast "
          f"{bf16_tokens / bf16_sample_s:.1f} tokens/s")
    print(f"(c)'s recompute: {recompute_s:.1f} s, against {train_s:.1f} s for the bf16 training forward + backward "
          f"of the same batch ({recompute_s / train_s:.0%})")
    if args.json:
        args.json.write_text(json.dumps(dict(rows=rows, fp32_sample_s=fp32_sample_s, bf16_sample_s=bf16_sample_s,
                                             recompute_s=recompute_s, train_s=train_s), indent=1))


if __name__ == "__main__":
    main()
