"""Joining a data-parallel job: one process per replica, rendezvous over `env://`.

A launcher (`areal launch`, torchrun, Slurm, Ray, Modal, HF Jobs) sets `RANK`,
`WORLD_SIZE`, `MASTER_ADDR` and `MASTER_PORT`; with `WORLD_SIZE` unset or 1 this is a
no-op and the job runs in one process. Under torch elastic (torchrun) the agent on the
first node already serves a TCPStore on `MASTER_PORT` (`TORCHELASTIC_USE_AGENT_STORE`),
and every rank, rank 0 included, joins it as a client.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Optional

import torch
import torch.distributed as dist

from engines.heartbeat import Heartbeat


@dataclass
class DistributedContext:
    rank: int = 0
    world_size: int = 1
    store: Optional[dist.Store] = None  # the job's key-value store (locks live here)
    heartbeat: Optional[Heartbeat] = None  # watches the other ranks (engines/heartbeat.py)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(timeout: float = 600.0, heartbeat_timeout: float = 0.0) -> DistributedContext:
    """Join the process group described by the environment (gloo on CPU, NCCL on GPU).

    Args:
        timeout: seconds to wait for every rank at the rendezvous and collectives.
        heartbeat_timeout: seconds of silence after which another rank is declared lost
            and this process exits with code 75 after one line naming it
            (engines/heartbeat.py); 0 disables the watch.
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
    host, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == str(True)
    store = dist.TCPStore(host, port, world_size, is_master=rank == 0 and not agent_store,
                          timeout=timedelta(seconds=timeout))
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=timedelta(seconds=timeout))
    heartbeat = None
    if heartbeat_timeout > 0:
        # A client of its own with a short timeout: a store call of the watcher never
        # waits longer than the heartbeat timeout, and never shares a socket with the
        # main thread's calls.
        watch_store = dist.TCPStore(host, port, world_size, is_master=False,
                                    timeout=timedelta(seconds=heartbeat_timeout), wait_for_workers=False)
        heartbeat = Heartbeat(watch_store, rank=rank, world_size=world_size, timeout=heartbeat_timeout).start()
    return DistributedContext(rank=rank, world_size=world_size, store=store, heartbeat=heartbeat)


def shutdown_distributed(ctx: Optional[DistributedContext] = None) -> None:
    if ctx is not None and ctx.heartbeat is not None:
        ctx.heartbeat.stop()
    if dist.is_initialized():
        dist.destroy_process_group()
