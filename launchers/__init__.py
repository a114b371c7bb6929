"""How a job is placed: one or many replicas on local processes, Modal or Hugging Face Jobs,
or over several machines: torch elastic (`launchers.torchrun`), Slurm (`launchers.slurm`),
Ray (`launchers.ray_backend`).

Importing this package never imports a cloud SDK or ray; the adapters import theirs when built.
"""

from launchers.executor import (
    ReplicaHandle,
    ReplicaResult,
    ReplicaSpec,
    ReplicaState,
    ReplicaStatus,
    ServerlessExecutor,
    redact,
)
from launchers.hf_jobs import HFJobsExecutor
from launchers.local import LocalProcessExecutor
from launchers.modal_backend import ModalExecutor
from launchers.slurm import SlurmExecutor
from launchers.torchrun import TorchrunExecutor

__all__ = [
    "HFJobsExecutor",
    "LocalProcessExecutor",
    "ModalExecutor",
    "ReplicaHandle",
    "ReplicaResult",
    "ReplicaSpec",
    "ReplicaState",
    "ReplicaStatus",
    "ServerlessExecutor",
    "SlurmExecutor",
    "TorchrunExecutor",
    "redact",
]
