"""Replicas on Hugging Face Jobs: one Job per rank, joined in one network group.

    areal launch --backend hf-jobs --replicas 2 --gpu a10g-small \\
        --image ghcr.io/you/areal:latest config=gsm8k_grpo

Networking: `HfApi.run_job` takes `network_group=` and `network_aliases=`. Jobs of one
namespace sharing a group reach each other on every port; a job that claims an alias is
reached at `${HF_NETWORK_GROUP_PREFIX}<alias>`. Every rank joins the group
`areal-<run id>`, rank 0 claims the alias `master`, and each replica's command is wrapped
in `sh -c` so that `MASTER_ADDR` is set from `HF_NETWORK_GROUP_PREFIX` inside the
container (the prefix is known only there). With an SDK that lacks `network_group`,
`supports_inter_replica_network` is False and the ranks are independent.

Limits of the Jobs API, as of huggingface_hub 1.x/2.x: a Job reports a stage
(SCHEDULING, RUNNING, COMPLETED, ERROR, CANCELED, DELETED) and a message, but no exit
code, so a failed replica's `exit_code` is None and its error carries the message and
the tail of its log. The image must already contain areal (HF Jobs runs a Docker image
as given).

huggingface_hub is imported only when an executor is built without an injected client.
"""

from __future__ import annotations

import inspect
import math
import re
import time
from collections.abc import Callable, Iterator
from typing import Any

from launchers.executor import (
    PollingCollect,
    ReplicaHandle,
    ReplicaSpec,
    ReplicaState,
    ReplicaStatus,
    check_n_replicas,
    failure_text,
    rank_env,
    record_sdk_call,
    redact,
    tail_lines,
)

DEFAULT_MASTER_PORT = 29500
MASTER_ALIAS = "master"
# HF Jobs: group names are lowercase alphanumerics and dashes, 46 characters at most.
_GROUP_MAX = 46
# The command every replica runs: set MASTER_ADDR from the group prefix, then exec argv.
_RENDEZVOUS_SH = 'export MASTER_ADDR="${HF_NETWORK_GROUP_PREFIX}' + MASTER_ALIAS + '"; exec "$@"'

_STAGES = {
    "SCHEDULING": ReplicaState.PENDING,
    "RUNNING": ReplicaState.RUNNING,
    "COMPLETED": ReplicaState.SUCCEEDED,
    "ERROR": ReplicaState.FAILED,
    "CANCELED": ReplicaState.CANCELLED,
    "DELETED": ReplicaState.CANCELLED,
}


def valid_flavors() -> list[str]:
    """Hardware flavors known to the installed huggingface_hub (`JobHardware` values)."""
    from huggingface_hub import JobHardware

    return [flavor.value for flavor in JobHardware]


class HFJobsExecutor(PollingCollect):
    """Runs each replica as a Hugging Face Job.

    Args:
        client: an `huggingface_hub.HfApi` or an object with its Jobs methods (tests pass
            a fake); a new `HfApi()` (the locally saved token) when None.
        namespace: user or organisation that owns the Jobs; default the token's user.
        flavors: allowed hardware flavors; default the SDK's `JobHardware` values.
        poll_interval: seconds between status checks in `collect`.
        fail_fast: when one replica fails, `collect` cancels the others.
        master_port: rendezvous port rank 0 listens on.
    """

    backend_name = "hf-jobs"

    def __init__(
        self,
        client: Any = None,
        *,
        namespace: str | None = None,
        flavors: list[str] | None = None,
        poll_interval: float = 10.0,
        fail_fast: bool = True,
        master_port: int = DEFAULT_MASTER_PORT,
    ) -> None:
        if client is None:
            from huggingface_hub import (
                HfApi,  # lazy: `import launchers` must not need it
            )

            client = HfApi()
        self.client = client
        self.namespace = namespace
        self.flavors = list(flavors) if flavors is not None else valid_flavors()
        self.poll_interval = poll_interval
        self.fail_fast = fail_fast
        self.master_port = master_port
        self.supports_inter_replica_network = _accepts(client.run_job, "network_group")
        self.sdk_calls: list[tuple[str, dict[str, Any]]] = []
        self._secret_values: list[str] = []

    # -- planning -----------------------------------------------------------------------

    def plan(self, spec: ReplicaSpec, n_replicas: int, *, run_id: str = "RUN") -> list[dict[str, Any]]:
        """Per rank, the exact keyword arguments `launch_replicas` passes to `run_job`.

        Raises:
            ValueError: no image, an unknown flavor (the message lists the valid ones), or
                `n_replicas` < 1.
        """
        check_n_replicas(n_replicas)
        if not spec.image:
            raise ValueError(
                "HF Jobs runs a Docker image as given: set --image to an image with areal installed"
            )
        flavor = spec.gpu or "cpu-basic"
        if flavor not in self.flavors:
            raise ValueError(f"unknown HF Jobs flavor {flavor!r} (set --gpu); valid flavors: {', '.join(self.flavors)}")
        networked = n_replicas > 1 and self.supports_inter_replica_network
        group = _group_name(spec.name, run_id)
        out = []
        for rank in range(n_replicas):
            env = {**spec.env, **rank_env(rank=rank, world_size=n_replicas, master_addr="127.0.0.1", master_port=self.master_port)}
            if networked:
                env.pop("MASTER_ADDR")  # set inside the container by the wrapper
                command = ["sh", "-c", _RENDEZVOUS_SH, "areal-replica", *spec.entrypoint]
            else:
                command = list(spec.entrypoint)
            kwargs: dict[str, Any] = {
                "image": spec.image,
                "command": command,
                "env": env,
                "secrets": dict(spec.secrets) or None,
                "flavor": flavor,
                "timeout": math.ceil(spec.timeout),
                "name": f"{group}-rank{rank}",
                "labels": {"areal-run": run_id, "areal-rank": str(rank)},
            }
            if networked:
                kwargs["network_group"] = group
                kwargs["network_aliases"] = [MASTER_ALIAS] if rank == 0 else None
            if self.namespace:
                kwargs["namespace"] = self.namespace
            out.append(kwargs)
        return out

    # -- protocol -----------------------------------------------------------------------

    def launch_replicas(self, spec: ReplicaSpec, n_replicas: int, *, run_id: str | None = None) -> list[ReplicaHandle]:
        """`run_job` once per rank; handles in rank order.

        Raises:
            ValueError: see `plan`.
            huggingface_hub.errors.HfHubHTTPError: the Hub refused a Job (jobs already
                started are cancelled first).
        """
        run_id = run_id or time.strftime("%Y%m%d-%H%M%S")
        plans = self.plan(spec, n_replicas, run_id=run_id)
        self._secret_values.extend(spec.secrets.values())
        handles: list[ReplicaHandle] = []
        try:
            for rank, kwargs in enumerate(plans):
                job = record_sdk_call(self.sdk_calls, "huggingface_hub.HfApi.run_job", self.client.run_job, **kwargs)
                handles.append(
                    ReplicaHandle(
                        backend=self.backend_name,
                        rank=rank,
                        remote_id=job.id,
                        extras={"namespace": job.owner.name, "url": job.url, "flavor": kwargs["flavor"]},
                    )
                )
        except BaseException:
            for handle in handles:
                self.cancel(handle)
            raise
        return handles

    def poll(self, handle: ReplicaHandle) -> ReplicaStatus:
        """`inspect_job`: SCHEDULING is pending, ERROR failed (exit code unknown), CANCELED/DELETED cancelled."""
        job = record_sdk_call(
            self.sdk_calls, "huggingface_hub.HfApi.inspect_job", self.client.inspect_job, **self._ids(handle)
        )
        stage = str(getattr(job.status.stage, "value", job.status.stage))
        state = _STAGES.get(stage)
        if state is None:
            return ReplicaStatus(ReplicaState.RUNNING, None, f"unrecognised HF Jobs stage {stage!r}")
        message = redact(job.status.message or "", self._secret_values)
        if state is ReplicaState.SUCCEEDED:
            return ReplicaStatus(state, 0, message)
        if state is ReplicaState.FAILED:
            return ReplicaStatus(state, None, f"HF Job {job.id} ended in {stage}" + (f": {message}" if message else ""))
        return ReplicaStatus(state, None, message)

    def stream_logs(self, handle: ReplicaHandle) -> Iterator[str]:
        """`fetch_job_logs(follow=True)`: blocks, yielding lines until the Job ends."""
        for line in record_sdk_call(
            self.sdk_calls,
            "huggingface_hub.HfApi.fetch_job_logs",
            self.client.fetch_job_logs,
            follow=True,
            **self._ids(handle),
        ):
            yield redact(line, self._secret_values)

    def cancel(self, handle: ReplicaHandle) -> None:
        """`cancel_job`; a no-op for a Job that already ended."""
        if self.poll(handle).state.terminal:
            return
        record_sdk_call(self.sdk_calls, "huggingface_hub.HfApi.cancel_job", self.client.cancel_job, **self._ids(handle))

    def log_tail(self, handle: ReplicaHandle, n: int = 20) -> str:
        try:
            lines = record_sdk_call(
                self.sdk_calls,
                "huggingface_hub.HfApi.fetch_job_logs",
                self.client.fetch_job_logs,
                follow=False,
                tail=n,
                **self._ids(handle),
            )
            return tail_lines("\n".join(lines), n)
        except Exception as exc:  # the failure itself matters more than its log
            return f"(could not fetch logs: {type(exc).__name__}: {exc})"

    def _failure_detail(self, handle: ReplicaHandle, status: ReplicaStatus) -> str:
        reason = f"rank {handle.rank}: {status.message or 'failed'}"
        return redact(failure_text(reason, self.log_tail(handle)), self._secret_values)

    def _ids(self, handle: ReplicaHandle) -> dict[str, Any]:
        ids: dict[str, Any] = {"job_id": handle.remote_id}
        namespace = handle.extras.get("namespace") or self.namespace
        if namespace:
            ids["namespace"] = namespace
        return ids


def _group_name(name: str, run_id: str) -> str:
    text = re.sub(r"[^a-z0-9-]+", "-", f"{name}-{run_id}".lower()).strip("-")
    return text[:_GROUP_MAX].rstrip("-")


def _accepts(fn: Callable, keyword: str) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return keyword in params or any(p.kind is p.VAR_KEYWORD for p in params.values())
