"""How a job is placed: one or many replicas on local processes, Modal or Hugging Face Jobs.

Importing this package never imports a cloud SDK; the adapters import theirs when built.
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
    "redact",
]
