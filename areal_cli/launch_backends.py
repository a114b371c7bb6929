"""`areal launch`'s backends: which executor each `--backend` builds, from which flags.

Local processes, Modal and HF Jobs place `--replicas` replicas; torchrun, Slurm and Ray
place `--nnodes` x `--nproc-per-node` ranks (world size), and `--replicas`, when given,
must equal that product.
"""

from __future__ import annotations

import enum
from pathlib import Path
from typing import Any

import typer

from areal_cli.console import err


class Backend(str, enum.Enum):
    local = "local"
    modal = "modal"
    hf_jobs = "hf-jobs"
    torchrun = "torchrun"
    slurm = "slurm"
    ray = "ray"


# Backends whose world size is nnodes x nproc_per_node.
NODE_BACKENDS = {Backend.torchrun, Backend.slurm}
# Backends whose replicas run `sys.executable` of this machine (its files are theirs).
LOCAL_PYTHON = {Backend.local, Backend.torchrun, Backend.ray}
# The pip extra that brings each backend's SDK.
_EXTRAS = {"modal": "cloud", "hf-jobs": "cloud", "ray": "ray"}


def world_size(backend: Backend, replicas: int | None, nnodes: int, nproc_per_node: int) -> int:
    """The number of ranks; raises ValueError when --replicas contradicts the node flags."""
    if backend in NODE_BACKENDS:
        size = nnodes * nproc_per_node
        if replicas is not None and replicas != size:
            raise ValueError(f"--replicas {replicas} != --nnodes {nnodes} x --nproc-per-node {nproc_per_node}; "
                             "drop --replicas or make them agree")
        return size
    if nnodes != 1:
        raise ValueError(f"--nnodes is for the torchrun and slurm backends, not {backend.value} (use --replicas)")
    return replicas or 1


def make_executor(backend: str, *, run_dir: Path, options: dict[str, Any]) -> Any:
    """The executor for `backend`; exits 1 with an install hint when its SDK is missing,
    2 when an option is out of range."""
    fail_fast = options.get("fail_fast", True)
    try:
        if backend == "local":
            from launchers.local import LocalProcessExecutor

            return LocalProcessExecutor(run_dir, grace_period=options.get("grace_period", 5.0), fail_fast=fail_fast)
        if backend == "modal":
            from launchers.modal_backend import ModalExecutor

            return ModalExecutor(clustered=bool(options.get("clustered")), fail_fast=fail_fast)
        if backend == "hf-jobs":
            from launchers.hf_jobs import HFJobsExecutor

            return HFJobsExecutor(namespace=options.get("namespace"), fail_fast=fail_fast)
        if backend == "torchrun":
            from launchers.local import LOCAL_MASTER_ADDR, find_free_port
            from launchers.torchrun import TorchrunExecutor

            endpoint = options.get("rdzv_endpoint")
            if not endpoint:
                if options.get("nnodes", 1) > 1:
                    _fail("--backend torchrun with --nnodes > 1 needs --rdzv-endpoint HOST:PORT (node 0's)")
                endpoint = f"{LOCAL_MASTER_ADDR}:{find_free_port()}"
            return TorchrunExecutor(
                run_dir, nnodes=options.get("nnodes", 1), node_rank=options.get("node_rank", 0), rdzv_endpoint=endpoint,
                nproc_per_node=options.get("nproc_per_node", 1), max_restarts=options.get("max_restarts", 0),
                rdzv_timeout=options.get("rdzv_timeout", 600.0), rdzv_id=options.get("rdzv_id") or "areal",
                grace_period=options.get("grace_period", 5.0), fail_fast=fail_fast,
            )
        if backend == "slurm":
            from launchers.slurm import SlurmExecutor

            return SlurmExecutor(
                run_dir, nnodes=options.get("nnodes", 1), nproc_per_node=options.get("nproc_per_node", 1),
                gpus_per_node=options.get("gpus_per_node", 0), partition=options.get("partition"),
                account=options.get("account"), rdzv_endpoint=options.get("rdzv_endpoint"), max_restarts=options.get("max_restarts", 0),
                rdzv_timeout=options.get("rdzv_timeout", 600.0), fail_fast=fail_fast,
            )
        if backend == "ray":
            from launchers.ray_backend import RayExecutor

            return RayExecutor(run_dir, address=options.get("ray_address"), gpus_per_replica=options.get(
                "gpus_per_replica", 0.0), grace_period=options.get("grace_period", 5.0), fail_fast=fail_fast)
    except ImportError as exc:
        extra = _EXTRAS.get(backend, "cloud")
        err.print(f"[bold red]error:[/] the {backend} backend needs {exc.name}: pip install 'areal[{extra}]'")
        raise typer.Exit(code=1) from None
    except ValueError as exc:
        _fail(str(exc))
    _fail(f"unknown backend {backend!r} ({', '.join(b.value for b in Backend)})")


def _fail(message: str) -> None:
    err.print("[bold red]error:[/]", end=" ")
    err.print(message, markup=False, highlight=False)
    raise typer.Exit(code=2)
