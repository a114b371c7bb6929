"""`areal launch`: one training job as several replicas: locally, on Modal or HF Jobs, or
over several machines with torchrun, Slurm or Ray.

    areal launch --replicas 2 config=smoke                              # 2 local processes
    areal launch --backend modal --gpu H100 config=gsm8k_grpo --dry-run
    areal launch --backend modal --replicas 2 --gpu H100:8 --modal-clustered config=gsm8k_grpo
    areal launch --backend hf-jobs --replicas 2 --gpu a10g-small --image IMAGE config=gsm8k_grpo
    areal launch --backend torchrun --nnodes 2 --node-rank 0 --rdzv-endpoint HOST:PORT config=...   # per node
    areal launch --backend slurm --nnodes 2 --gpus-per-node 8 --partition P --dry-run config=...
    areal launch --backend ray --replicas 2 config=smoke
    areal launch status RUN · areal launch logs RUN --rank 1 · areal launch cancel RUN

Launch options come first, then `config=NAME` and Hydra overrides, which are checked here
(a typo exits 2 before anything starts) and passed unchanged to every replica's
`python -m areal_cli.main train ...`. Each replica learns its rank from `RANK`,
`WORLD_SIZE`, `MASTER_ADDR`, `MASTER_PORT`. Secrets are named with `--secret NAME` and
read from this shell's environment, never from the command line; every printed text is
redacted. Handles are kept in `<run-root>/<RUN>/handles.json` for status/logs/cancel.
"""

from __future__ import annotations

import json
import os
import re
import secrets as secrets_lib
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import click
import typer
from rich.console import Console
from rich.live import Live
from rich.table import Table
from typer.core import TyperGroup

from areal_cli.console import err, resolve_or_exit
from areal_cli.launch_backends import LOCAL_PYTHON, NODE_BACKENDS, Backend, make_executor, world_size
from launchers.executor import (
    ReplicaHandle,
    ReplicaSpec,
    ReplicaState,
    ReplicaStatus,
    load_handles,
    redact,
    save_handles,
    write_results,
)

DEFAULT_RUN_ROOT = "runs/launches"
DEFAULT_TIMEOUT_S = 6 * 3600.0
# How long `collect` may wait beyond the replicas' own timeout before giving up on them
# (cloud backends add queueing and image pulls to the replicas' running time).
COLLECT_SLACK_S = 600.0
PASSTHROUGH_KEY = "areal.launch.words"
_CREDENTIAL_NAME = re.compile(r"(^|_)(TOKEN|SECRET|KEY|APIKEY|PASSWORD|PASSWD|CREDENTIALS?)S?(_|$)", re.IGNORECASE)



class _LaunchGroup(TyperGroup):
    """A group whose callback also takes free words (`config=...`).

    Click treats the first free word after the group's options as a subcommand name; a
    word that names no subcommand is handed to the callback instead.
    """

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        rest = super().parse_args(ctx, args)
        protected = list(getattr(ctx, "_protected_args", []))
        if protected and protected[0] not in self.commands:
            ctx.meta[PASSTHROUGH_KEY] = protected + list(ctx.args)
            ctx._protected_args = []
            ctx.args = []
            return []
        return rest


launch_app = typer.Typer(
    cls=_LaunchGroup,
    invoke_without_command=True,
    add_completion=False,
    rich_markup_mode="rich",
    help=(
        "Run `areal train` as several replicas: local processes, Modal or Hugging Face Jobs.\n\n"
        "  areal launch [OPTIONS] config=NAME [OVERRIDES...]   (options before config words)\n\n"
        "  areal launch --replicas 2 config=smoke\n\n"
        "  areal launch --backend modal --gpu H100 --dry-run config=gsm8k_grpo\n\n"
        "  areal launch status|logs|cancel RUN"
    ),
)


@launch_app.callback()
def launch(
    ctx: typer.Context,
    backend: Backend = typer.Option(Backend.local, "--backend", "-b", help="Where the replicas run."),
    replicas: int | None = typer.Option(
        None, "--replicas", "-n", min=1, help="Number of replicas (world size); default 1, or nnodes x nproc-per-node."
    ),
    nnodes: int = typer.Option(1, "--nnodes", min=1, help="torchrun/slurm: number of nodes."),
    node_rank: int = typer.Option(0, "--node-rank", min=0, help="torchrun: this node's rank (0 hosts the rendezvous)."),
    nproc_per_node: int | None = typer.Option(
        None, "--nproc-per-node", min=1, help="torchrun/slurm: ranks per node; default --gpus-per-node, else 1."
    ),
    gpus_per_node: int = typer.Option(0, "--gpus-per-node", min=0, help="slurm/ray: GPUs per node (ray: shared by its ranks)."),
    rdzv_endpoint: str | None = typer.Option(
        None, "--rdzv-endpoint", help="torchrun: HOST:PORT of node 0's rendezvous store (default 127.0.0.1:free port, 1 node)."
    ),
    max_restarts: int = typer.Option(0, "--max-restarts", min=0, help="torchrun/slurm: torch elastic restarts per node."),
    rdzv_timeout: float = typer.Option(600.0, "--rdzv-timeout", min=1, help="torchrun/slurm: seconds to wait for all nodes."),
    partition: str | None = typer.Option(None, help="slurm: partition."),
    account: str | None = typer.Option(None, help="slurm: account."),
    ray_address: str | None = typer.Option(
        None, "--ray-address", help="ray: an existing cluster's address; default a new local one on 127.0.0.1."
    ),
    gpu: str | None = typer.Option(
        None, "--gpu", "--flavor", help="Modal GPU ('H100', 'A100-80GB:8') or HF Jobs flavor ('a10g-small')."
    ),
    image: str | None = typer.Option(None, help="Container image (required for hf-jobs)."),
    timeout: float = typer.Option(DEFAULT_TIMEOUT_S, help="Per-replica wall-clock limit, seconds."),
    secret: list[str] = typer.Option([], "--secret", help="Env var NAME forwarded as a secret (repeatable)."),
    env: list[str] = typer.Option([], "--env", help="KEY=VALUE set in every replica (repeatable)."),
    cpu: float | None = typer.Option(None, help="CPU cores per replica (modal)."),
    memory: int | None = typer.Option(None, help="Memory per replica in MiB (modal)."),
    modal_clustered: bool = typer.Option(
        False, "--modal-clustered", help="One clustered Modal call of N networked containers (needs a full-host --gpu)."
    ),
    namespace: str | None = typer.Option(None, help="HF user or org that owns the Jobs."),
    run_root: Path = typer.Option(Path(DEFAULT_RUN_ROOT), help="Where launch records (handles, logs) are kept."),
    run_id: str | None = typer.Option(None, help="Name of this launch; default a timestamp."),
    grace_period: float = typer.Option(5.0, help="local: seconds between SIGTERM and SIGKILL on cancel."),
    fail_fast: bool = typer.Option(True, help="Cancel the other replicas when one fails."),
    detach: bool = typer.Option(False, help="Submit and return; follow with `areal launch status RUN`."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print what would be submitted, secrets redacted; start nothing."),
    entrypoint: str | None = typer.Option(
        None, hidden=True, help="Replace `python -m areal_cli.main train` (tests); config words are still appended."
    ),
) -> None:
    """Launch `areal train <config words>` as --replicas replicas on --backend."""
    if ctx.invoked_subcommand is not None:
        return
    words: list[str] = ctx.meta.get(PASSTHROUGH_KEY, [])
    if not words:
        err.print(ctx.get_help())
        raise typer.Exit(code=2)
    late = [w for w in words if w.startswith("-")]
    if late:
        _fail(f"launch options go before the config words: move {' '.join(late)} before config=...")
    nproc_per_node = nproc_per_node or gpus_per_node or 1
    try:
        replicas = world_size(backend, replicas, nnodes, nproc_per_node)
    except ValueError as exc:
        _fail(str(exc))
    # A config mistake exits 2 before any replica starts. Local paths are only checked
    # where the replicas will see this machine's files.
    resolve_or_exit(words, world_size=replicas, check_paths=backend in LOCAL_PYTHON)

    env_vars = _parse_env(env)
    secret_values = {}
    for name in secret:
        if name not in os.environ:
            _fail(f"--secret {name}: {name} is not set in this shell's environment")
        secret_values[name] = os.environ[name]
    if backend in LOCAL_PYTHON:
        base = [sys.executable, "-m", "areal_cli.main", "train"]
    else:
        base = ["python", "-m", "areal_cli.main", "train"]
    argv = (shlex.split(entrypoint) if entrypoint else base) + words
    try:
        spec = ReplicaSpec(
            entrypoint=argv, env=env_vars, secrets=secret_values, gpu=gpu, image=image, timeout=timeout,
            cpu=cpu, memory_mb=memory, name="areal",
        )
    except ValueError as exc:
        _fail(str(exc))
    run_id = run_id or time.strftime("%Y%m%d-%H%M%S-") + secrets_lib.token_hex(2)
    run_dir = run_root / run_id
    options = {"clustered": modal_clustered, "namespace": namespace, "grace_period": grace_period,
               "fail_fast": fail_fast, "nnodes": nnodes, "node_rank": node_rank, "nproc_per_node": nproc_per_node,
               "gpus_per_node": gpus_per_node, "rdzv_endpoint": rdzv_endpoint, "rdzv_id": "areal",  # the same on every node (run ids may differ); the endpoint names the job
               "max_restarts": max_restarts, "rdzv_timeout": rdzv_timeout, "partition": partition,
               "account": account, "ray_address": ray_address,
               "gpus_per_replica": gpus_per_node / max(1, replicas) if backend is Backend.ray else 0.0}
    executor = make_executor(backend.value, run_dir=run_dir, options=options)
    takes_run_id = backend not in LOCAL_PYTHON

    if dry_run:
        try:
            plan = executor.plan(spec, replicas, run_id=run_id) if takes_run_id else executor.plan(spec, replicas)
        except ValueError as exc:
            _fail(str(exc))
        if backend is Backend.slurm:
            typer.echo(plan["script"], nl=False)  # the script itself, ready for sbatch
            return
        payload = {
            "backend": backend.value,
            "replicas": replicas,
            "run_id": run_id,
            "image": spec.image,
            "gpu": spec.gpu,
            "timeout_s": spec.timeout,
            "supports_inter_replica_network": executor.supports_inter_replica_network,
            "secrets": {name: "***" for name in sorted(secret_values)},
            "submission": plan,
        }
        typer.echo(json.dumps(redact(payload, secret_values.values()), indent=2, default=str))
        return

    if replicas > 1 and not executor.supports_inter_replica_network:
        err.print(
            f"[yellow]warning:[/] {backend.value} replicas cannot reach each other in this mode; they run "
            "independently (no torch.distributed rendezvous). For Modal, use --modal-clustered."
        )
    try:
        if takes_run_id:
            handles = executor.launch_replicas(spec, replicas, run_id=run_id)
        else:
            handles = executor.launch_replicas(spec, replicas)
    except ValueError as exc:
        _fail(str(exc))
    except (RuntimeError, FileNotFoundError) as exc:  # sbatch missing or refusing, Ray not starting
        err.print(redact(f"error: {exc}", secret_values.values()), markup=False, highlight=False)
        raise typer.Exit(code=1) from None
    save_handles(run_dir, handles, backend=backend.value, run_id=run_id, world_size=replicas, options=options,
                 spec=spec.public_dict())
    where = {Backend.torchrun: f" (node {node_rank} of {nnodes})",
             Backend.slurm: f" as Slurm job {handles[0].remote_id}"}.get(backend, "")
    err.print(f"launched [bold]{run_id}[/]: {replicas} replica(s) on {backend.value}{where}; records in {run_dir}")
    if detach:
        err.print(f"follow with: areal launch status {run_id} · logs {run_id} · cancel {run_id}")
        return

    try:
        results = _collect_live(executor, handles, timeout=spec.timeout + COLLECT_SLACK_S)
    except KeyboardInterrupt:
        err.print("[yellow]interrupted: cancelling all replicas[/]")
        for handle in handles:
            executor.cancel(handle)
        raise typer.Exit(code=130) from None
    write_results(run_dir, results)
    unit = "node" if backend in NODE_BACKENDS else "rank"
    for result in results:
        if result.state is not ReplicaState.SUCCEEDED:
            err.print(f"[red]{unit} {result.rank} {result.state.value}[/]", end=" ")
            err.print(redact(result.error, secret_values.values()), markup=False, highlight=False)
    failed = [r for r in results if r.state is not ReplicaState.SUCCEEDED]
    if failed:
        raise typer.Exit(code=1)
    err.print(f"[green]all {replicas} replica(s) succeeded[/]")


@launch_app.command("status")
def status(
    run: str = typer.Argument(..., help="Run id (under --run-root) or a launch directory."),
    run_root: Path = typer.Option(Path(DEFAULT_RUN_ROOT)),
) -> None:
    """Show each replica's state."""
    executor, handles, _ = _reattach(run, run_root)
    table = _table(handles, [executor.poll(h) for h in handles])
    Console().print(table)


@launch_app.command("logs")
def logs(
    run: str = typer.Argument(..., help="Run id (under --run-root) or a launch directory."),
    rank: int = typer.Option(0, help="Which replica."),
    run_root: Path = typer.Option(Path(DEFAULT_RUN_ROOT)),
) -> None:
    """Print a replica's log, following it while the replica runs."""
    executor, handles, _ = _reattach(run, run_root)
    match = [h for h in handles if h.rank == rank]
    if not match:
        _fail(f"no rank {rank} in {run} (ranks 0..{len(handles) - 1}); set --rank")
    for line in executor.stream_logs(match[0]):
        typer.echo(line)


@launch_app.command("cancel")
def cancel(
    run: str = typer.Argument(..., help="Run id (under --run-root) or a launch directory."),
    run_root: Path = typer.Option(Path(DEFAULT_RUN_ROOT)),
) -> None:
    """Cancel every replica of a launch."""
    executor, handles, _ = _reattach(run, run_root)
    for handle in handles:
        executor.cancel(handle)
    Console().print(_table(handles, [executor.poll(h) for h in handles]))


# ---------------------------------------------------------------------------------------


def _parse_env(pairs: list[str]) -> dict[str, str]:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            _fail(f"--env {pair!r}: expected KEY=VALUE")
        if _CREDENTIAL_NAME.search(key):
            # Plain env is stored in clear text by some backends (HF Jobs shows it on
            # the job page). A whole word, so TOKENIZERS_PARALLELISM still passes.
            _fail(f"--env {key}=...: {key} looks like a secret; export it and pass --secret {key} instead")
        out[key] = value
    return out


def _fail(message: str) -> None:
    err.print("[bold red]error:[/]", end=" ")
    err.print(message, markup=False, highlight=False)
    raise typer.Exit(code=2)


def _table(handles: list[ReplicaHandle], statuses: list[ReplicaStatus]) -> Table:
    table = Table(title=None, show_edge=False)
    for column in ("rank", "backend", "remote id", "state", "exit", "detail"):
        table.add_column(column)
    colours = {"succeeded": "green", "failed": "red", "cancelled": "yellow", "running": "cyan", "pending": "dim"}
    for handle, st in zip(handles, statuses):
        state = st.state.value
        detail = (st.message or "").splitlines()[0] if st.message else ""
        table.add_row(str(handle.rank), handle.backend, handle.remote_id, f"[{colours[state]}]{state}[/]",
                      "" if st.exit_code is None else str(st.exit_code), redact(detail))
    return table


def _collect_live(executor: Any, handles: list[ReplicaHandle], timeout: float) -> list:
    with Live(_table(handles, [ReplicaStatus(ReplicaState.PENDING)] * len(handles)), console=err,
              refresh_per_second=4, transient=False) as live:
        results = executor.collect(handles, timeout=timeout,
                                   on_update=lambda hs, sts: live.update(_table(hs, sts)))
    if not err.is_terminal:
        err.print()  # end the table's last line, so each verdict below is a line of its own
    return results


def _reattach(run: str, run_root: Path) -> tuple[Any, list[ReplicaHandle], dict[str, Any]]:
    run_dir = Path(run) if Path(run).is_dir() else run_root / run
    try:
        handles, meta = load_handles(run_dir)
    except FileNotFoundError as exc:
        _fail(str(exc))
    executor = make_executor(meta["backend"], run_dir=run_dir, options=meta.get("options") or {})
    return executor, handles, meta
