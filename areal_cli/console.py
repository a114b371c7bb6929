"""What every `areal` command shares: the error console and turning config words into a
typed config or a clean exit with status 2."""

from __future__ import annotations

from typing import NoReturn, Optional

import typer
from rich.console import Console

from areal_cli.config import ConfigError, load_config, split_cli_args
from workflows.config import ExperimentConfig

err = Console(stderr=True, soft_wrap=True)


def resolve_or_exit(words: list[str], *, world_size: Optional[int] = None, check_paths: bool = True) -> ExperimentConfig:
    """`config=NAME` plus overrides -> a checked ExperimentConfig (`load_config`'s keyword
    arguments pass through); on a ConfigError print it and exit with status 2 (typer.Exit)."""
    try:
        name, overrides = split_cli_args(words)
        return load_config(name, overrides, world_size=world_size, check_paths=check_paths)
    except ConfigError as exc:
        fail(str(exc))


def fail(message: str, code: int = 2) -> NoReturn:
    """Print `config error: <message>` on stderr as one plain line and exit with `code`
    (typer.Exit): the ending of every refused input, from a bad key to an unreachable
    hub id."""
    err.print(f"config error: {message}", markup=False, highlight=False)
    raise typer.Exit(code=code) from None
