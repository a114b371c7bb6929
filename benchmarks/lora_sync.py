"""Weight-sync cost of LoRA against full-parameter training, on SmolLM2-135M-Instruct.

    python benchmarks/lora_sync.py                    # rank 16, all linear layers, 5 repeats
    python benchmarks/lora_sync.py --rank 32 --repeats 3

Measures, with the adapters' B matrices set to random values (as after training; at
B = 0 the merge is the same work): the in-process sync of `TrainEngine.upload_weights`
into a private sampler copy (full parameters: a state-dict copy; LoRA: merged tensors
made and copied one at a time), and what a server sync writes to disk (`publish_weights`
of the merged model, against `publish_adapter` of the adapters alone). The server's own
load time is not measured here (no vLLM with LoRA support runs in this environment).
Prints one Markdown table (median seconds, and bytes written).

`--decode` (or `--decode-only`) also times sampling one batch (`--batch` sequences of `--new-tokens` tokens,
`stop_token_ids` none, greedy so both decode the same length) through the adapters (what
synchronous RL's in-process sampler does: it decodes from the trained policy itself)
against the merged weights (a private copy).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from engines.config import ActorConfig, LoraConfig, ModelConfig  # noqa: E402
from engines.inference import LocalInferenceEngine  # noqa: E402
from engines.lora import publish_adapter  # noqa: E402
from engines.model import load_model, load_tokenizer, resolve_model_dir  # noqa: E402
from engines.train_engine import TrainEngine  # noqa: E402
from engines.weights import publish_weights  # noqa: E402


def median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def measure(lora: bool, rank: int, repeats: int, model_dir: Path, tokenizer) -> dict:
    """One table row: full-parameter (`lora` False) or LoRA training's sync costs."""
    policy = load_model(ModelConfig(), model_dir, seed=0)
    sampler = LocalInferenceEngine(copy.deepcopy(policy), eos_token_id=tokenizer.eos_token_id,
                                   pad_token_id=tokenizer.pad_token_id)
    cfg = ActorConfig(lora=LoraConfig(enabled=lora, rank=rank, alpha=2.0 * rank))
    engine = TrainEngine(cfg, policy, total_steps=1, max_sequence_tokens=256, temperature=1.0)
    with torch.no_grad():
        for name, param in policy.named_parameters():
            if ".lora_B." in name:
                param.normal_(std=0.01)
    row = {"mode": f"LoRA r={rank} all-linear" if lora else "full parameters",
           "trainable": sum(p.numel() for p in policy.parameters() if p.requires_grad),
           "in_process_s": median_seconds(lambda: engine.upload_weights(sampler, version=1), repeats)}
    with tempfile.TemporaryDirectory() as tmp:
        row["merged_dir_s"] = median_seconds(lambda: publish_weights(policy, Path(tmp) / "full", 1), repeats)
        row["merged_bytes"] = dir_bytes(Path(tmp) / "full")
        if lora:
            row["adapter_dir_s"] = median_seconds(lambda: publish_adapter(engine.lora.peft, Path(tmp) / "ad", 1), repeats)
            row["adapter_bytes"] = dir_bytes(Path(tmp) / "ad")
    sampler.destroy()
    return row


def decode(args, model_dir: Path, tokenizer) -> None:
    from engines.inference import GenerationRequest

    policy = load_model(ModelConfig(), model_dir, seed=0)
    merged_copy = copy.deepcopy(policy)
    engine = TrainEngine(ActorConfig(lora=LoraConfig(enabled=True, rank=args.rank, alpha=2.0 * args.rank)), policy,
                         total_steps=1, max_sequence_tokens=256, temperature=1.0)
    through = LocalInferenceEngine(policy, eos_token_id=-1, pad_token_id=tokenizer.pad_token_id, shares_weights=True,
                                   max_batch_size=args.batch)
    merged = LocalInferenceEngine(merged_copy, eos_token_id=-1, pad_token_id=tokenizer.pad_token_id,
                                  max_batch_size=args.batch)
    engine.upload_weights(merged, version=1)
    prompt = tokenizer("What is 17 + 25? Answer with a number.")["input_ids"]
    requests = [GenerationRequest(list(prompt), args.new_tokens, temperature=0.0) for _ in range(args.batch)]
    for name, sampler in (("through the adapters (shared policy)", through), ("merged weights (private copy)", merged)):
        seconds = median_seconds(lambda s=sampler: s.generate_blocking(requests), args.repeats)
        print(f"decode {args.batch} x {args.new_tokens} tokens {name}: {seconds:.2f} s", flush=True)
        sampler.destroy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--decode", action="store_true")
    parser.add_argument("--decode-only", action="store_true")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=32)
    args = parser.parse_args()

    model_dir = resolve_model_dir("HuggingFaceTB/SmolLM2-135M-Instruct")
    tokenizer = load_tokenizer(model_dir)
    if args.decode_only:
        return decode(args, model_dir, tokenizer)
    rows = [measure(lora, args.rank, args.repeats, model_dir, tokenizer) for lora in (False, True)]
    print(f"torch threads: {torch.get_num_threads()}, repeats: {args.repeats} (median)\n")
    if args.decode:
        decode(args, model_dir, tokenizer)
    print("| training | trainable params | in-process sync (s) | publish full weights (s, MB) | publish adapters (s, MB) |")
    print("|---|---|---|---|---|")
    for r in rows:
        adapters = f"{r['adapter_dir_s']:.3f}, {r['adapter_bytes'] / 1e6:.1f}" if "adapter_dir_s" in r else "-"
        print(f"| {r['mode']} | {r['trainable']:,} | {r['in_process_s']:.3f} | {r['merged_dir_s']:.3f}, "
              f"{r['merged_bytes'] / 1e6:.0f} | {adapters} |")


if __name__ == "__main__":
    main()
