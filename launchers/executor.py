"""One job as many replicas: the `ServerlessExecutor` protocol and what it passes around.

    spec = ReplicaSpec(entrypoint=["python", "-m", "areal_cli.main", "train", "config=smoke"])
    executor = LocalProcessExecutor(run_dir="runs/launches/demo")
    handles = executor.launch_replicas(spec, 2)        # rank order
    results = executor.collect(handles, timeout=600)  # rank order, one ReplicaResult each

Every backend (local processes, Modal, Hugging Face Jobs) starts the same argv once per
rank and tells each replica who it is through the environment: `RANK`, `WORLD_SIZE`,
`LOCAL_RANK`, `MASTER_ADDR`, `MASTER_PORT` (what `torch.distributed` reads with
`init_method="env://"`). Handles serialise to JSON so that a later
`areal launch status RUN` can re-attach from another process.

Secrets travel separately from the environment (`ReplicaSpec.secrets`) and every text
shown to a person goes through `redact` first.
"""

from __future__ import annotations

import enum
import json
import re
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import (
    Any,
    Protocol,
    runtime_checkable,
)

# Environment names whose values are treated as secrets wherever they are shown.
SECRET_NAME_PATTERN = re.compile(r"TOKEN|SECRET|KEY|PASSWORD|PASSWD|CREDENTIAL", re.IGNORECASE)
# Token formats worth catching even when they arrive under an innocent name:
# Hugging Face user tokens (hf_...), Modal token ids/secrets (ak-/as-...).
_TOKEN_VALUE_PATTERN = re.compile(r"\b(hf_[A-Za-z0-9]{20,}|a[ks]-[A-Za-z0-9]{16,})\b")
REDACTED = "***"
# Values this short are too likely to occur by chance in ordinary text to redact by value.
_MIN_SECRET_LENGTH = 4
LOG_TAIL_LINES = 20


class ReplicaState(str, enum.Enum):
    PENDING = "pending"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in (ReplicaState.SUCCEEDED, ReplicaState.FAILED, ReplicaState.CANCELLED)


@dataclass(kw_only=True)
class ReplicaSpec:
    """What every replica runs; the same for all ranks except the rank variables.

    Attributes:
        entrypoint: argv of the replica, e.g. `["python", "-m", "areal_cli.main", "train",
            "config=smoke"]`; run directly, never through a shell.
        env: plain environment variables (shown in dry runs, names matching
            *TOKEN*/*SECRET*/*KEY* are redacted there all the same).
        secrets: name -> value, reaching the replica only as environment variables
            through the backend's secret mechanism; never printed or persisted.
        gpu: accelerator request in the backend's own words: a Modal GPU string
            (`"H100"`, `"A100-80GB:8"`) or a Hugging Face Jobs flavor (`"a10g-small"`).
            None means CPU (for HF Jobs: the `cpu-basic` flavor).
        image: container image (Modal: a registry tag, default a Debian slim Python image
            with the project installed; HF Jobs: required, a Docker image with areal
            installed). Ignored by the local backend.
        timeout: wall-clock limit of each replica, in seconds; a replica past it is
            stopped and reported failed.
        cpu: CPU cores requested per replica (Modal only).
        memory_mb: memory requested per replica, in MiB (Modal only).
        name: a short label used for remote job/app names.
    """

    entrypoint: list[str]
    env: dict[str, str] = field(default_factory=dict)
    secrets: dict[str, str] = field(default_factory=dict, repr=False)
    gpu: str | None = None
    image: str | None = None
    timeout: float = 3600.0
    cpu: float | None = None
    memory_mb: int | None = None
    name: str = "areal"

    def __post_init__(self) -> None:
        if not self.entrypoint:
            raise ValueError("ReplicaSpec.entrypoint is empty: give the argv each replica runs")
        if self.timeout <= 0:
            raise ValueError(f"ReplicaSpec.timeout must be positive seconds, got {self.timeout}")

    def public_dict(self) -> dict[str, Any]:
        """The spec as a dict fit to print: secret values replaced by `***`."""
        out = asdict(self)
        out["secrets"] = {name: REDACTED for name in self.secrets}
        return redact(out, self.secrets.values())


@dataclass
class ReplicaHandle:
    """A reference to one running replica, enough to poll, cancel or read it later.

    `extras` holds backend details (local: pid, log path; HF: namespace, url), all
    JSON-serialisable and free of secrets.
    """

    backend: str
    rank: int
    remote_id: str
    extras: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"backend": self.backend, "rank": self.rank, "remote_id": self.remote_id, "extras": dict(self.extras)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ReplicaHandle:
        return cls(
            backend=str(data["backend"]),
            rank=int(data["rank"]),
            remote_id=str(data["remote_id"]),
            extras=dict(data.get("extras") or {}),
        )


@dataclass
class ReplicaStatus:
    """What `poll` saw. `exit_code` is None while running or when the backend cannot tell."""

    state: ReplicaState
    exit_code: int | None = None
    message: str = ""


@dataclass
class ReplicaResult:
    """The outcome of one replica. For failures `error` ends with the tail of its log."""

    rank: int
    state: ReplicaState
    exit_code: int | None = None
    error: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"rank": self.rank, "state": self.state.value, "exit_code": self.exit_code, "error": self.error}


@runtime_checkable
class ServerlessExecutor(Protocol):
    """Places one job as `n_replicas` processes somewhere and watches them.

    Implementations: `LocalProcessExecutor`, `ModalExecutor`, `HFJobsExecutor`, and for
    clusters `TorchrunExecutor` (one node of a torch elastic job), `SlurmExecutor`
    (one sbatch job) and `RayExecutor` (one actor per rank).
    `supports_inter_replica_network` says whether the replicas can reach each other
    (needed for torch.distributed rendezvous when there is more than one).
    """

    backend_name: str
    supports_inter_replica_network: bool

    def launch_replicas(self, spec: ReplicaSpec, n_replicas: int) -> list[ReplicaHandle]:
        """Start `n_replicas` copies of `spec`; returns handles in rank order."""
        ...

    def poll(self, handle: ReplicaHandle) -> ReplicaStatus:
        """The replica's current state, without blocking for long."""
        ...

    def stream_logs(self, handle: ReplicaHandle) -> Iterator[str]:
        """Lines of the replica's output, following it until it ends."""
        ...

    def cancel(self, handle: ReplicaHandle) -> None:
        """Stop the replica; a no-op for one that already ended."""
        ...

    def collect(self, handles: list[ReplicaHandle], timeout: float) -> list[ReplicaResult]:
        """Wait up to `timeout` seconds for all replicas; results in rank order."""
        ...


# ---------------------------------------------------------------------------------------
# Secrets


def is_secret_name(name: str) -> bool:
    """True for environment names like HF_TOKEN, MODAL_TOKEN_SECRET, WANDB_API_KEY."""
    return bool(SECRET_NAME_PATTERN.search(name))


def redact(obj: Any, secret_values: Iterable[str] = ()) -> Any:
    """A copy of `obj` (text, or nested dicts/lists of text) with secrets replaced by `***`.

    Replaced: every occurrence of a value in `secret_values`, the value of any dict key
    that looks like a secret name (`*TOKEN*`, `*SECRET*`, `*KEY*`, ...), upper-case
    `NAME=value` words whose NAME looks like one, and Hugging Face / Modal token formats.
    """
    values = sorted({v for v in secret_values if v and len(v) >= _MIN_SECRET_LENGTH}, key=len, reverse=True)
    return _redact(obj, values)


def _redact(obj: Any, values: list[str]) -> Any:
    if isinstance(obj, str):
        for value in values:
            obj = obj.replace(value, REDACTED)
        obj = _TOKEN_VALUE_PATTERN.sub(REDACTED, obj)
        # Only environment-style words (`HF_TOKEN=...`); a config override such as
        # `model.tokenizer_path=...` is not a secret and must print as given.
        return re.sub(
            r"(?<![\w.])([A-Z_][A-Z0-9_]*)=(\S+)",
            lambda m: f"{m.group(1)}={REDACTED}" if is_secret_name(m.group(1)) else m.group(0),
            obj,
        )
    if isinstance(obj, Mapping):
        return {
            k: (REDACTED if isinstance(k, str) and is_secret_name(k) and isinstance(v, str) else _redact(v, values))
            for k, v in obj.items()
        }
    if isinstance(obj, (list, tuple)):
        return type(obj)(_redact(v, values) for v in obj)
    return obj


# ---------------------------------------------------------------------------------------
# Helpers shared by the backends


def rank_env(
    *, rank: int, world_size: int, master_addr: str, master_port: int, replicas_per_node: int = 1
) -> dict[str, str]:
    """The variables torch.distributed's `env://` rendezvous reads. Cloud backends run
    one replica per node; the local backend runs all of them on this machine, where
    `LOCAL_WORLD_SIZE` also tells each how many cores it may use."""
    return {
        "RANK": str(rank),
        "WORLD_SIZE": str(world_size),
        "LOCAL_RANK": str(rank % replicas_per_node),
        "LOCAL_WORLD_SIZE": str(replicas_per_node),
        "MASTER_ADDR": master_addr,
        "MASTER_PORT": str(master_port),
    }


def check_n_replicas(n_replicas: int) -> None:
    if not isinstance(n_replicas, int) or n_replicas < 1:
        raise ValueError(f"n_replicas must be a positive integer, got {n_replicas!r} (set --replicas)")


def tail_lines(text: str, n: int = LOG_TAIL_LINES) -> str:
    return "\n".join(text.rstrip("\n").splitlines()[-n:])


def failure_text(reason: str, log_tail: str) -> str:
    """`reason` followed by the last lines of the replica's log, if any."""
    if not log_tail.strip():
        return reason
    return f"{reason}\n--- last {LOG_TAIL_LINES} log lines ---\n{log_tail}"


def record_sdk_call(calls: list[tuple[str, dict[str, Any]]], name: str, fn: Callable, /, *args: Any, **kwargs: Any) -> Any:
    """Call `fn(*args, **kwargs)` and note `(name, kwargs)` in `calls`.

    Adapters route every SDK call through here, with `name` the SDK's own qualified name
    (`"huggingface_hub.HfApi.run_job"`); the signature-drift test checks each recorded
    keyword against the installed SDK's real signature.
    """
    calls.append((name, dict(kwargs)))
    return fn(*args, **kwargs)


class PollingCollect:
    """`collect` for executors that learn replica states by polling.

    A subclass provides `poll_interval` (seconds), `fail_fast` and, to say more than the
    status message, `_failure_detail(handle, status)`.
    """

    poll_interval: float
    fail_fast: bool

    def _failure_detail(self, handle: ReplicaHandle, status: ReplicaStatus) -> str:
        return f"rank {handle.rank}: {status.message or 'failed'}"

    def collect(
        self,
        handles: list[ReplicaHandle],
        timeout: float,
        *,
        on_update: Callable[[list[ReplicaHandle], list[ReplicaStatus]], None] | None = None,
    ) -> list[ReplicaResult]:
        """Wait up to `timeout` seconds; results in rank order (see `collect_by_polling`)."""
        return collect_by_polling(
            self,  # type: ignore[arg-type]
            handles,
            timeout,
            poll_interval=self.poll_interval,
            fail_fast=self.fail_fast,
            failure_detail=self._failure_detail,
            on_update=on_update,
        )


def collect_by_polling(
    executor: ServerlessExecutor,
    handles: list[ReplicaHandle],
    timeout: float,
    *,
    poll_interval: float,
    fail_fast: bool,
    failure_detail: Callable[[ReplicaHandle, ReplicaStatus], str],
    on_update: Callable[[list[ReplicaHandle], list[ReplicaStatus]], None] | None = None,
) -> list[ReplicaResult]:
    """The waiting loop behind every backend's `collect`.

    Polls all unfinished replicas every `poll_interval` seconds. With `fail_fast`, the
    first failure cancels the rest (they are reported cancelled). Replicas still running
    after `timeout` seconds are cancelled and reported failed with that reason.
    `failure_detail(handle, status)` supplies the error text (reason plus log tail).
    """
    statuses: dict[int, ReplicaStatus] = {}
    deadline = time.monotonic() + timeout
    while True:
        for handle in handles:
            if handle.rank not in statuses or not statuses[handle.rank].state.terminal:
                statuses[handle.rank] = executor.poll(handle)
        if on_update is not None:
            on_update(handles, [statuses[h.rank] for h in handles])
        pending = [h for h in handles if not statuses[h.rank].state.terminal]
        if not pending:
            break
        if fail_fast and any(s.state is ReplicaState.FAILED for s in statuses.values()):
            for handle in pending:
                executor.cancel(handle)
                statuses[handle.rank] = executor.poll(handle)
            continue
        if time.monotonic() >= deadline:
            for handle in pending:
                executor.cancel(handle)
                statuses[handle.rank] = ReplicaStatus(
                    ReplicaState.FAILED, None, f"still running after the collect timeout of {timeout:g} s; cancelled"
                )
            continue
        time.sleep(min(poll_interval, max(0.0, deadline - time.monotonic())))

    results = []
    for handle in sorted(handles, key=lambda h: h.rank):
        status = statuses[handle.rank]
        error = failure_detail(handle, status) if status.state is ReplicaState.FAILED else status.message
        results.append(ReplicaResult(handle.rank, status.state, status.exit_code, error))
    return results


# ---------------------------------------------------------------------------------------
# Persisting handles so that another process can re-attach

HANDLES_FILE = "handles.json"
RESULTS_FILE = "results.json"


def save_handles(run_dir: str | Path, handles: list[ReplicaHandle], **meta: Any) -> Path:
    """Write `<run_dir>/handles.json`: the handles plus JSON-able `meta` (no secrets)."""
    path = Path(run_dir) / HANDLES_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"handles": [h.to_dict() for h in handles], **meta}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=True))
    tmp.replace(path)  # atomic, so a concurrent `areal launch status` never reads half a file
    return path


def load_handles(run_dir: str | Path) -> tuple[list[ReplicaHandle], dict[str, Any]]:
    """Read `<run_dir>/handles.json`; returns (handles in rank order, the other fields)."""
    path = Path(run_dir) / HANDLES_FILE
    if not path.exists():
        raise FileNotFoundError(f"no {HANDLES_FILE} in {run_dir}: is it a launch run directory?")
    payload = json.loads(path.read_text())
    handles = sorted((ReplicaHandle.from_dict(h) for h in payload.pop("handles")), key=lambda h: h.rank)
    return handles, payload


def write_results(run_dir: str | Path, results: list[ReplicaResult]) -> None:
    """Write `<run_dir>/results.json`, read back by `read_results` when re-attaching."""
    path = Path(run_dir) / RESULTS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps([r.to_dict() for r in results], indent=2))


def read_results(run_dir: str | Path) -> dict[int, ReplicaResult]:
    path = Path(run_dir) / RESULTS_FILE
    if not path.exists():
        return {}
    return {
        r["rank"]: ReplicaResult(r["rank"], ReplicaState(r["state"]), r["exit_code"], r["error"])
        for r in json.loads(path.read_text())
    }
