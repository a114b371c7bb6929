"""Per-rank memory of the training state under each `actor.parallelism`, on 2 CPU ranks.

    nice -n 19 python benchmarks/memory_parallelism.py                  # SmolLM2-360M shape
    python benchmarks/memory_parallelism.py --layers 4 --modes ddp fsdp2  # a quick look

Each mode runs in 2 fresh processes (a real gloo group on 127.0.0.1), which build a
randomly initialised model of SmolLM2-360M's architecture (hidden 960, 32 layers,
intermediate 2560, 15 heads, 5 KV heads, SmolLM2's 49152-token vocabulary: 362M
parameters) through `TrainEngine` with that mode, and take one GRPO optimizer step on a
synthetic batch (2 rows of `--seq` tokens per rank). Per rank it measures:

* state: bytes of the rank's own parameters, gradients (read just before the optimizer
  step, the moment they peak) and AdamW state (after the step); a DTensor counts its
  local shard only;
* peak RSS over the whole process (`VmHWM`: model build included) and over the step alone
  (the high-water mark is reset through `/proc/self/clear_refs` before it).

The table is Markdown, for docs/benchmarks.md. The LoRA row trains rank-32 adapters on
every linear layer (`arith_grpo_lora`'s setting) over DDP replicas: the frozen base
weights count as parameters, only the adapters have gradients and AdamW state.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SMOLLM2_360M = dict(hidden_size=960, intermediate_size=2560, num_hidden_layers=32, num_attention_heads=15,
                    num_key_value_heads=5, head_dim=64)
# mode: (actor.parallelism, actor.cpu_offload, LoRA rank or None)
MODES = {"ddp": ("ddp", False, None), "fsdp2": ("fsdp2", False, None), "fsdp2_offload": ("fsdp2", True, None),
         "lora": ("ddp", False, 32)}
LABELS = {"ddp": "DDP", "fsdp2": "FSDP2", "fsdp2_offload": "FSDP2 + CPU offload",
          "lora": "LoRA r=32 all-linear (DDP)"}
WORLD_SIZE = 2
GB = 1e9


def _vm(field: str) -> int:
    """A `/proc/self/status` memory field in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def _local_bytes(tensor) -> int:
    from torch.distributed.tensor import DTensor

    local = tensor.to_local() if isinstance(tensor, DTensor) else tensor
    return local.numel() * local.element_size()


def _rank(rank: int, world_size: int, port: int, mode: str, overrides: dict, seq: int, out: str) -> None:
    import torch
    import torch.distributed as dist

    from engines.config import ActorConfig, LoraConfig, ModelConfig, OptimizerConfig
    from engines.distributed import DistributedContext
    from engines.model import load_model, resolve_model_dir
    from engines.train_engine import TrainEngine

    torch.set_num_threads(1)
    timeout = datetime.timedelta(seconds=1800)
    store = dist.TCPStore("127.0.0.1", port, None, False, timeout=timeout)
    dist.init_process_group("gloo", store=dist.PrefixStore("pg", store), rank=rank, world_size=world_size,
                            timeout=timeout)
    try:
        model_dir = resolve_model_dir("HuggingFaceTB/SmolLM2-135M-Instruct")
        model = load_model(ModelConfig(init_from_scratch=True, config_overrides=overrides), model_dir, seed=0)
        params = sum(p.numel() for p in model.parameters())
        parallelism, offload, lora_rank = MODES[mode]
        lora = LoraConfig()
        if lora_rank:
            lora = LoraConfig(enabled=True, rank=lora_rank, alpha=float(lora_rank), target_modules=["all-linear"])
        cfg = ActorConfig(optimizer=OptimizerConfig(lr=1e-5), parallelism=parallelism, cpu_offload=offload,
                          max_tokens_per_mb=4 * seq, lora=lora)
        engine = TrainEngine(cfg, model, total_steps=1, max_sequence_tokens=seq, temperature=1.0,
                             dist_ctx=DistributedContext(rank=rank, world_size=world_size, store=store))
        grads = []
        engine.optimizer.register_step_pre_hook(
            lambda opt, args, kwargs: grads.append(
                sum(_local_bytes(p.grad) for g in opt.param_groups for p in g["params"] if p.grad is not None)))
        g = torch.Generator().manual_seed(rank)
        ids = torch.randint(3, 49152, (2, seq), generator=g)
        mask = torch.ones_like(ids)
        loss_mask = mask.clone()
        loss_mask[:, : seq // 2] = 0
        batch = {"input_ids": ids, "attention_mask": mask, "loss_mask": loss_mask, "logprobs": torch.zeros(2, seq),
                 "advantages": torch.tensor([[1.0], [-1.0]]) * loss_mask.float()}
        before_step = _vm("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM: the step's own peak below
        engine.train_batch(batch)
        step_peak = _vm("VmHWM")
        optim = sum(_local_bytes(t) for s in engine.optimizer.state.values() for t in s.values()
                    if isinstance(t, torch.Tensor))
        record = {
            "params_total": params,
            "param_bytes": sum(_local_bytes(p) for p in model.parameters()),
            "grad_bytes": grads[-1],
            "optim_bytes": optim,
            "rss_before_step": before_step,
            "step_peak_rss": step_peak,
            "peak_rss": int(_peak_ever()),
        }
        Path(out, f"{mode}-rank{rank}.json").write_text(json.dumps(record))
    finally:
        dist.destroy_process_group()


def _peak_ever() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def measure(mode: str, overrides: dict, seq: int, out: Path) -> list[dict]:
    import torch.distributed as dist
    import torch.multiprocessing as mp

    store = dist.TCPStore("127.0.0.1", 0, None, True, timeout=datetime.timedelta(seconds=1800),
                          wait_for_workers=False)
    mp.spawn(_rank, args=(WORLD_SIZE, store.port, mode, overrides, seq, str(out)), nprocs=WORLD_SIZE, join=True)
    return [json.loads((out / f"{mode}-rank{r}.json").read_text()) for r in range(WORLD_SIZE)]


def table(results: dict[str, list[dict]]) -> str:
    base = max(_state(r) for r in results["ddp"]) if "ddp" in results else None
    params = next(iter(results.values()))[0]["params_total"]
    lines = [
        f"{params / 1e6:.0f}M parameters (float32), AdamW, {WORLD_SIZE} CPU ranks (gloo); per rank, the larger of the two:",
        "",
        "| parallelism | params GB | grads GB | AdamW state GB | state GB | vs DDP | peak RSS GB (step) | peak RSS GB (process) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for mode, ranks in results.items():
        worst = max(ranks, key=_state)
        ratio = f"{_state(worst) / base:.2f}x" if base else "-"
        lines.append(
            f"| {LABELS[mode]} | {worst['param_bytes'] / GB:.2f} | {worst['grad_bytes'] / GB:.2f} | "
            f"{worst['optim_bytes'] / GB:.2f} | {_state(worst) / GB:.2f} | {ratio} | "
            f"{max(r['step_peak_rss'] for r in ranks) / GB:.2f} | {max(r['peak_rss'] for r in ranks) / GB:.2f} |")
    return "\n".join(lines)


def _state(record: dict) -> int:
    return record["param_bytes"] + record["grad_bytes"] + record["optim_bytes"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    parser.add_argument("--layers", type=int, default=SMOLLM2_360M["num_hidden_layers"])
    parser.add_argument("--seq", type=int, default=64, help="tokens per row")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    overrides = {**SMOLLM2_360M, "num_hidden_layers": args.layers}
    with tempfile.TemporaryDirectory() as out:
        results = {mode: measure(mode, overrides, args.seq, Path(out)) for mode in args.modes}
    print(table(results))


if __name__ == "__main__":
    main()
