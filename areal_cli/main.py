"""The `areal` command line.

    areal train config=gsm8k_grpo trainer.total_steps=3  # GSM8K from the hub, or the shipped copy
    areal train config=smoke                      # tiny model, 2 steps, CPU, < 1 minute
    areal config show config=gsm8k_grpo actor.optimizer.lr=1e-5
    areal config show --doc config=smoke          # every key=value with its help and choices
    areal plot runs/gsm8k-grpo/trial0 [more runs...]  # curves.png of the runs' stats

`config=NAME` picks `areal_cli/configs/NAME.yaml`; every other argument is a Hydra override
(`a.b=c` sets, `+a.b=c` adds, `~a.b` deletes). A mistake in the config, or a hub id that
cannot be reached with no offline copy, exits with status 2 and one line that names the key.
"""

from __future__ import annotations

from pathlib import Path
from typing import List

import typer
from rich.console import Console
from rich.syntax import Syntax

from areal_cli.console import err, fail, resolve_or_exit
from areal_cli.launch import launch_app
from workflows.config import to_yaml

app = typer.Typer(
    help="areal: asynchronous RL (GRPO) for language models, from a laptop CPU to many GPUs.",
    rich_markup_mode="rich",
    no_args_is_help=True,
    add_completion=False,
)
config_app = typer.Typer(help="Inspect configs.", no_args_is_help=True)
app.add_typer(config_app, name="config")
app.add_typer(launch_app, name="launch")

ARGS_HELP = "config=NAME followed by Hydra overrides such as trainer.total_steps=3"
# Typer would treat "config=..." as an option value otherwise; these settings hand every
# remaining word to the command.
PASSTHROUGH = {"allow_extra_args": True, "ignore_unknown_options": True}


@app.command(context_settings=PASSTHROUGH)
def train(args: List[str] = typer.Argument(None, help=ARGS_HELP, show_default=False)) -> None:
    """Run GRPO training in this process (see `areal launch` for several replicas)."""
    from workflows.training.shutdown import RunInterrupted, stop_on_signals  # stdlib only

    words = args or []
    try:
        with stop_on_signals():  # Ctrl-C / SIGTERM from here on: an orderly stop, exit 130 / 143
            cfg = resolve_or_exit(words)
            from engines.hub import HubError
            from workflows.controller.failures import RolloutFailureError
            from workflows.data.sources import DatasetError
            from workflows.rollout.reward import RewardFunctionError
            from workflows.training.checkpoint_files import CheckpointWriteError
            from workflows.training.recover import CorruptCheckpointError
            from workflows.training.trainer import run_training  # heavy imports only when training
            from workflows.user_code import UserCodeError

            launcher = None
            if cfg.deployment_mode == "disaggregated":
                from areal_cli.workers import ExecutorWorkerLauncher

                launcher = ExecutorWorkerLauncher(cfg.resolved_run_dir())
            try:
                run_training(cfg, launcher)
            # Rollouts kept failing, a checkpoint could not be written (disk full), or the
            # one to resume from is damaged: one line naming the cause; nothing is lost.
            # A reward function raised during an evaluation (in training it fails rollouts).
            except (RolloutFailureError, CheckpointWriteError, CorruptCheckpointError, RewardFunctionError) as exc:
                err.print(f"error: {exc}", markup=False, highlight=False)
                raise typer.Exit(code=1) from None
            # A hub id not served or unreachable with no offline copy; a dataset or user code
            # the config-time checks could not see (a hub dataset): exit 2.
            except (HubError, DatasetError, UserCodeError) as exc:
                fail(str(exc))
    except RunInterrupted as exc:  # one line: where the run can be resumed from
        err.print(exc.resume_hint(["areal", "train", *words]), markup=False, highlight=False)
        raise typer.Exit(code=exc.exit_code) from None


@app.command(name="eval", context_settings=PASSTHROUGH)
def eval_command(args: List[str] = typer.Argument(None, help=ARGS_HELP, show_default=False)) -> None:
    """Held-out accuracy of `model.path` (greedy pass@1, and pass@k with eval.n_samples):
    areal eval config=gsm8k_grpo model.path=RUN/checkpoints/step_N"""
    from workflows.training.shutdown import RunInterrupted, stop_on_signals

    try:
        with stop_on_signals():
            cfg = resolve_or_exit(args or [])
            from engines.hub import HubError
            from workflows.data.sources import DatasetError
            from workflows.rollout.reward import RewardFunctionError
            from workflows.training.evaluation import evaluate_model
            from workflows.user_code import UserCodeError

            try:
                report, path = evaluate_model(cfg)
            except (HubError, DatasetError, UserCodeError) as exc:
                fail(str(exc))
            except RewardFunctionError as exc:
                err.print(f"error: {exc}", markup=False, highlight=False)
                raise typer.Exit(code=1) from None
    except RunInterrupted as exc:
        raise typer.Exit(code=exc.exit_code) from None
    line = f"accuracy {report['accuracy']:.3f} +- {report['accuracy_se']:.3f} (greedy pass@1, {report['num_prompts']} prompts)"
    for key in sorted(k for k in report if k.startswith("pass@")):
        line += f", {key} {report[key]:.3f}"
    Console().print(line)
    Console().print(f"report: {path}")


@app.command()
def plot(
    runs: List[Path] = typer.Argument(..., help="run directories (each with a stats.jsonl)"),
    out: Path = typer.Option(None, "--out", "-o", help="PNG to write (default: <first run>/curves.png)"),
    title: str = typer.Option(None, help="figure title"),
) -> None:
    """Draw reward, accuracy, held-out accuracy, loss, response length, staleness and step
    time against step, the runs overlaid, into one PNG."""
    from workflows.metrics.plots import plot_runs

    try:
        written = plot_runs(runs, out or runs[0] / "curves.png", title=title)
    except FileNotFoundError as exc:
        err.print(f"error: {exc}", markup=False, highlight=False)
        raise typer.Exit(code=2) from None
    Console().print(f"wrote {written}")


@config_app.command("show", context_settings=PASSTHROUGH)
def config_show(
    args: List[str] = typer.Argument(None, help=ARGS_HELP, show_default=False),
    doc: bool = typer.Option(False, "--doc", help="every key with its value, help text and choices"),
) -> None:
    """Print the resolved config as YAML (--doc: each key=value with its help)."""
    cfg = resolve_or_exit(args or [])
    if doc:
        from areal_cli.config_doc import doc_lines

        typer.echo("\n".join(doc_lines(cfg)))
        return
    Console().print(Syntax(to_yaml(cfg), "yaml", background_color="default"))


if __name__ == "__main__":
    app()
