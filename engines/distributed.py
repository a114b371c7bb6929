"""Joining a data-parallel job: one process per replica, rendezvous over `env://`.

A launcher (`areal launch`, torchrun, Modal, HF Jobs) sets `RANK`, `WORLD_SIZE`,
`MASTER_ADDR` and `MASTER_PORT`; with `WORLD_SIZE` unset or 1 this is a no-op and the
job runs in one process.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Optional

import torch
import torch.distributed as dist


@dataclass
class DistributedContext:
    rank: int = 0
    world_size: int = 1
    store: Optional[dist.Store] = None  # the job's key-value store (locks live here)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(timeout: float = 600.0) -> DistributedContext:
    """Join the process group described by the environment (gloo on CPU, NCCL on GPU).

    Args:
        timeout: seconds to wait for every rank at the rendezvous and collectives.
    Raises:
        ValueError: `WORLD_SIZE > 1` without `RANK`, `MASTER_ADDR` or `MASTER_PORT`.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistributedContext()
    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if not os.environ.get(k)]
    if missing:
        raise ValueError(f"WORLD_SIZE={world_size} but {', '.join(missing)} not set; start replicas with `areal launch`")
    rank = int(os.environ["RANK"])
    # Our own TCPStore (rather than init_method="env://") so the same store can carry
    # DistributedLock keys through a public API.
    store = dist.TCPStore(
        os.environ["MASTER_ADDR"],
        int(os.environ["MASTER_PORT"]),
        world_size,
        is_master=rank == 0,
        timeout=timedelta(seconds=timeout),
    )
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=timedelta(seconds=timeout))
    return DistributedContext(rank=rank, world_size=world_size, store=store)


def shutdown_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
