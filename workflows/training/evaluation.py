"""Held-out evaluation: greedy pass@1 and sampled pass@k, through the rollout controller.

    areal eval config=gsm8k_grpo model.path=runs/gsm8k-grpo/trial0/checkpoints/step_100 eval.n_samples=8

Every prompt of the held-out split (`dataset.eval_split`, at most
`dataset.max_eval_samples`, never a prompt whose question is also in the training split)
gets one greedy completion and `eval.n_samples` sampled ones (at `gconfig.temperature`),
scored by the run's reward function. Generation goes through the inference engine the run
uses (in-process or servers), on the rollout controller's event loop
(`WorkflowExecutor.run_outside_bound`), but outside its staleness accounting: evaluation
never trains.

Report (`<run_dir>/eval/step_<N>.json` from the trainer, `<run_dir>/eval/<model
directory name>-<split>.json` from `areal eval`): `accuracy` (greedy pass@1) with its standard
error `sqrt(p (1 - p) / N)`, `pass@k` for each k of `eval.pass_k` not above
`eval.n_samples` (the unbiased estimator of Chen et al. 2021, arXiv 2107.03374,
averaged over prompts), and per prompt: id, reference answer, greedy completion and its
score, and how many of the samples were correct.

Multi-turn (`rollout.workflow=multi_turn`): each completion is a whole episode of the
workflow (`MultiTurnWorkflow.aevaluate`): greedy means every turn decoded greedily, and
the feedback or tool results being deterministic, so is the episode; correct means
solved within `multi_turn.max_turns` turns (`accuracy`), and `accuracy_turn_1` is the
share solved at the first turn.
"""

from __future__ import annotations

import asyncio
import json
import math
from dataclasses import replace
from pathlib import Path
from typing import Callable, Optional

from engines.inference import GenerationRequest
from workflows.build import sampling_seed


def pass_at_k(n: int, c: int, k: int) -> float:
    """Probability that at least one of k samples drawn without replacement from n
    completions, c of them correct, is correct: `1 - C(n - c, k) / C(n, k)`, computed as
    a product to stay exact for large n (Chen et al. 2021, arXiv 2107.03374).

    Raises:
        ValueError: unless 0 <= c <= n and 1 <= k <= n.
    """
    if not (0 <= c <= n and 1 <= k <= n):
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


async def _evaluate_episodes(engine, workflow, row: dict, gconfig, n_samples: int) -> dict:
    """A multi-turn workflow's own episodes (`aevaluate`): greedy at every turn, then
    `n_samples` sampled ones; correct means solved within its turns."""
    results = await asyncio.gather(workflow.aevaluate(engine, row, temperature=0.0),
                                   *(workflow.aevaluate(engine, row, temperature=gconfig.temperature)
                                     for _ in range(n_samples)))
    text, solved, turn = results[0]
    return {
        "id": int(row["id"]), "answer": row["answer"], "greedy_completion": text, "greedy_correct": bool(solved),
        "greedy_solved_turn": int(turn), "num_samples": n_samples, "num_correct": sum(bool(r[1]) for r in results[1:]),
    }


async def _evaluate_prompt(engine, scorer, tokenizer, row: dict, gconfig, n_samples: int, seed: Optional[int]) -> dict:
    greedy = GenerationRequest.from_gconfig(row["prompt_ids"], replace(gconfig, temperature=0.0))
    sampled = GenerationRequest.from_gconfig(row["prompt_ids"], gconfig, seed=seed)
    responses = await asyncio.gather(engine.agenerate(greedy), *(engine.agenerate(sampled) for _ in range(n_samples)))
    texts = [tokenizer.decode(r.output_ids, skip_special_tokens=True) for r in responses]
    scores = await asyncio.gather(
        *(scorer.ascore(text, row["answer"], prompt=row.get("prompt"), row=row.get("columns")) for text in texts)
    )
    return {
        "id": int(row["id"]), "answer": row["answer"], "greedy_completion": texts[0], "greedy_correct": scores[0] >= 1.0,
        "num_samples": n_samples, "num_correct": sum(s >= 1.0 for s in scores[1:]),
    }


async def evaluate_rows(engine, scorer, tokenizer, rows: list[dict], gconfig, *, n_samples: int, pass_k: list[int],
                        concurrency: int, seed: Optional[int] = None,
                        on_prompt: Optional[Callable[[], None]] = None, workflow=None) -> dict:
    """Evaluate `rows` with `engine`'s `agenerate`, at most `concurrency` prompts at once;
    returns the report described in the module docstring. A `workflow` with
    `aevaluate(engine, row, temperature=...) -> (text, correct, solved_turn)` (the
    multi-turn one) evaluates its own episodes instead of single completions."""
    limit = asyncio.Semaphore(max(1, concurrency))
    episodes = workflow is not None and callable(getattr(workflow, "aevaluate", None))

    async def one(row: dict) -> dict:
        async with limit:
            prompt_seed = None if seed is None else hash((seed, "eval", row["id"])) % (2**31)
            if episodes:
                result = await _evaluate_episodes(engine, workflow, row, gconfig, n_samples)
            else:
                result = await _evaluate_prompt(engine, scorer, tokenizer, row, gconfig, n_samples, prompt_seed)
        if on_prompt is not None:
            on_prompt()
        return result

    prompts = list(await asyncio.gather(*(one(row) for row in rows)))
    return summarize(prompts, n_samples=n_samples, pass_k=pass_k)


def summarize(prompts: list[dict], *, n_samples: int, pass_k: list[int]) -> dict:
    """Accuracy, its standard error and pass@k over per-prompt results."""
    n = len(prompts)
    accuracy = sum(p["greedy_correct"] for p in prompts) / n if n else float("nan")
    report = {
        "num_prompts": n,
        "accuracy": accuracy,
        "accuracy_se": math.sqrt(accuracy * (1 - accuracy) / n) if n else float("nan"),
        "n_samples": n_samples,
    }
    if n and "greedy_solved_turn" in prompts[0]:
        # Multi-turn: `accuracy` is within the episode's turns; this is at the first.
        report["accuracy_turn_1"] = sum(p["greedy_solved_turn"] == 1 for p in prompts) / n
    for k in sorted(set(pass_k)):
        if 1 <= k <= n_samples and n:
            report[f"pass@{k}"] = sum(pass_at_k(n_samples, p["num_correct"], k) for p in prompts) / n
    report["prompts"] = sorted(prompts, key=lambda p: p["id"])
    return report


def stats_of(report: dict) -> dict:
    """The report's figures as stats-record keys (`eval_accuracy`, `eval_pass@4`, ...)."""
    return {f"eval_{k}": v for k, v in report.items() if k not in ("prompts", "n_samples")}


def write_report(report: dict, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=1))
    tmp.replace(path)
    return path


def run_evaluation(executor, inference, scorer, tokenizer, rows: list[dict], cfg, *, progress=None,
                   workflow=None) -> dict:
    """Evaluate `rows` on `executor`'s event loop (see the module docstring); `progress` is
    a rich `Progress` to draw a bar on, or None; `workflow` as in `evaluate_rows`."""
    e = cfg.eval
    task = progress.add_task("evaluating", total=len(rows)) if progress is not None else None

    def advance() -> None:
        if progress is not None:
            progress.advance(task)

    coroutine = evaluate_rows(
        inference, scorer, tokenizer, rows, cfg.gconfig, n_samples=e.n_samples, pass_k=list(e.pass_k),
        # Evaluation has no staleness bound: as many prompts at once as a generate batch holds.
        concurrency=max(cfg.rollout.max_concurrent_rollouts, cfg.gconfig.max_batch_size),
        seed=sampling_seed(cfg),
        on_prompt=advance,
        workflow=workflow,
    )
    try:
        return executor.run_outside_bound(coroutine)
    finally:
        if progress is not None:
            progress.remove_task(task)


def evaluate_model(cfg) -> tuple[dict, Path]:
    """`areal eval`: evaluate `model.path` on the held-out split with the run's inference
    backend; returns the report and the path it was written to (`eval.report`, default
    `<run_dir>/eval/<model directory name>.json`)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from engines.distributed import DistributedContext
    from engines.model import load_model
    from workflows.build import (
        build_executor,
        build_inference,
        build_scorer,
        build_workflow,
        close_inference,
        prepare_process,
    )
    from workflows.data.dataset import load_eval_rows

    run_dir = cfg.resolved_run_dir()
    model_dir, tokenizer = prepare_process(cfg)
    rows, _ = load_eval_rows(cfg.dataset, tokenizer)
    policy = load_model(cfg.model, model_dir, seed=cfg.seed)
    inference, servers = build_inference(cfg, policy, tokenizer, model_dir, run_dir, DistributedContext(),
                                         trains_policy=False)
    scorer = executor = None
    try:
        scorer = build_scorer(cfg)
        executor = build_executor(cfg, inference, consumer_batch_size=1)
        executor.initialize()
        workflow = build_workflow(cfg, tokenizer, scorer)
        progress = Progress(TextColumn("[bold]evaluating"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                            transient=True)
        with progress:
            report = run_evaluation(executor, inference, scorer, tokenizer, rows, cfg, progress=progress,
                                    workflow=workflow)
    finally:
        try:
            if executor is not None:
                executor.destroy()
        finally:
            try:
                if scorer is not None:
                    scorer.close()
            finally:
                close_inference(inference, servers)
    report = {"model": str(cfg.model.path), "split": cfg.dataset.eval_split, **report}
    default = run_dir / "eval" / f"{Path(cfg.model.path).name}-{cfg.dataset.eval_split}.json"
    path = Path(cfg.eval.report) if cfg.eval.report else default
    return report, write_report(report, path)
