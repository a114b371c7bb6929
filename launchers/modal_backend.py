"""Replicas on Modal: one App with one Function, spawned once per rank (or once as a cluster).

    areal launch --backend modal --replicas 1 --gpu H100 config=gsm8k_grpo
    areal launch --backend modal --replicas 2 --gpu H100:8 --modal-clustered config=gsm8k_grpo

Two placements, because Modal offers two:

* per-rank spawns (default): `Function.spawn` once per rank, each in its own container,
  with `RANK`/`WORLD_SIZE` in its environment. Those containers cannot find each other,
  so `supports_inter_replica_network` is False: right for one replica or for independent
  replicas, not for torch.distributed across them.
* clustered (`clustered=True`): the Function is decorated with `modal.clustered(size=N)`
  and spawned once; Modal starts N colocated, networked containers and broadcasts the
  input to all. Each container reads its rank and rank 0's address from
  `modal.experimental.get_cluster_info()` and sets `RANK`, `MASTER_ADDR`, ... itself.
  Modal requires a GPU request that fills each host (e.g. `"H100:8"`) and returns only
  rank 0's output, so every rank's handle shares one function call id and one status.

The App runs detached (`App.run(detach=True)`), so replicas keep going after the
launcher exits; `areal launch status/logs/cancel RUN` re-attach with
`FunctionCall.from_id`. Logs come from `FunctionCall.logs` (stream and tail); in clustered
mode they hold every container's output, not one rank's.

The modal SDK is imported only when an executor is built without an injected `sdk`.
"""

from __future__ import annotations

import math
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
)

PYTHON_VERSION = "3.11"
# Packages of this repository copied into the image with their package data (the config
# tree areal_cli/configs/, the shipped GSM8K in workflows/data/), as `pip install` would:
# Modal copies only `.py` files unless told otherwise, so only caches are left out.
PROJECT_PACKAGES = ("areal_cli", "engines", "workflows", "launchers")
PACKAGE_IGNORE = ("**/__pycache__", "**/*.pyc")
REMOTE_ROOT = "/root"
DEFAULT_MASTER_PORT = 29500
# Shown for the dependencies when the installed distribution's metadata is unavailable.
_FALLBACK_REQUIREMENTS = ("torch==2.13.0", "transformers>=5.0,<6", "hydra-core>=1.3", "typer>=0.12", "rich>=13")


def project_requirements() -> list[str]:
    """The core requirements of the installed `areal` distribution (no extras)."""
    from importlib import metadata

    try:
        requires = metadata.requires("areal") or []
    except metadata.PackageNotFoundError:
        return list(_FALLBACK_REQUIREMENTS)
    return [r for r in requires if "extra ==" not in r]


def make_replica_function() -> Callable[[list[str], dict[str, str], bool], dict[str, Any]]:
    """The body that runs in each Modal container.

    Defined inside a function so that Modal (with `serialized=True`) pickles it by value:
    the container needs only the image, not this module at the same path.
    """

    def areal_replica(argv: list[str], env: dict[str, str], clustered: bool) -> dict[str, Any]:
        import collections
        import os
        import subprocess
        import sys

        env = dict(env)
        if clustered:
            import modal.experimental

            info = modal.experimental.get_cluster_info()
            addresses = list(info.container_ipv4_ips) or list(info.container_ips)
            env.update(
                RANK=str(info.rank),
                WORLD_SIZE=str(len(info.container_ips)),
                LOCAL_RANK="0",
                LOCAL_WORLD_SIZE="1",
                MASTER_ADDR=addresses[0],
            )
        tail: collections.deque[str] = collections.deque(maxlen=20)
        proc = subprocess.Popen(
            argv, env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace"
        )
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                # Echo so that Modal's log capture sees it; keep the tail for the result.
                sys.stdout.write(line)
                sys.stdout.flush()
                tail.append(line.rstrip("\n"))
            code = proc.wait()
        except BaseException:
            # Cancellation arrives as an exception here; do not leave the trainer behind.
            proc.kill()
            raise
        return {"exit_code": code, "log_tail": "\n".join(tail)}

    return areal_replica


class ModalExecutor(PollingCollect):
    """Runs replicas as Modal function calls.

    Args:
        sdk: the `modal` module, or an object with the same attributes (tests pass a
            fake); imported lazily when None.
        app_name: prefix of the Modal App name; the run id is appended.
        clustered: one clustered call of N networked containers instead of N separate
            calls (see the module docstring).
        poll_interval: seconds between status checks in `collect`.
        fail_fast: when one replica fails, `collect` cancels the others.
        requirements: pip requirements installed in the image; default: this project's.
        master_port: rendezvous port used in clustered mode.
    """

    backend_name = "modal"

    def __init__(
        self,
        sdk: Any = None,
        *,
        app_name: str = "areal",
        clustered: bool = False,
        poll_interval: float = 5.0,
        fail_fast: bool = True,
        requirements: list[str] | None = None,
        master_port: int = DEFAULT_MASTER_PORT,
    ) -> None:
        if sdk is None:
            import modal as sdk  # lazy: `import launchers` must not need the cloud SDK
        self.sdk = sdk
        self.app_name = app_name
        self.clustered = clustered
        self.poll_interval = poll_interval
        self.fail_fast = fail_fast
        self.requirements = list(requirements) if requirements is not None else project_requirements()
        self.master_port = master_port
        self.supports_inter_replica_network = clustered
        # (qualified SDK name, keyword arguments) of every SDK call, for the drift test.
        self.sdk_calls: list[tuple[str, dict[str, Any]]] = []
        self._secret_values: list[str] = []
        self._cancelled: set[str] = set()

    # -- planning -----------------------------------------------------------------------

    def plan(self, spec: ReplicaSpec, n_replicas: int, *, run_id: str = "RUN") -> dict[str, Any]:
        """Exactly what `launch_replicas` submits: image, function options, spawn args."""
        check_n_replicas(n_replicas)
        if self.clustered and not spec.gpu:
            raise ValueError(
                "Modal clustered functions need a GPU request that fills each host: set --gpu, e.g. H100:8"
            )
        function_options: dict[str, Any] = {
            "gpu": spec.gpu,
            "timeout": math.ceil(spec.timeout),
            "serialized": True,
            "name": "replica",
            "include_source": False,
        }
        if spec.cpu is not None:
            function_options["cpu"] = spec.cpu
        if spec.memory_mb is not None:
            function_options["memory"] = spec.memory_mb
        if self.clustered:
            spawns = [{"argv": list(spec.entrypoint), "env": self._env(spec, None, n_replicas), "clustered": True}]
        else:
            spawns = [
                {"argv": list(spec.entrypoint), "env": self._env(spec, r, n_replicas), "clustered": False}
                for r in range(n_replicas)
            ]
        return {
            "app": f"{self.app_name}-{run_id}",
            "image": self._image_steps(spec),
            "function": function_options,
            "clustered_size": n_replicas if self.clustered else None,
            "secrets": sorted(spec.secrets),
            "spawns": spawns,
        }

    def _image_steps(self, spec: ReplicaSpec) -> list[dict[str, Any]]:
        # Built in this order by `launch_replicas`; the first step is a classmethod.
        if spec.image:
            base = {"call": "from_registry", "args": [spec.image], "kwargs": {"add_python": PYTHON_VERSION}}
        else:
            base = {"call": "debian_slim", "args": [], "kwargs": {"python_version": PYTHON_VERSION}}
        return [
            base,
            {"call": "uv_pip_install", "args": list(self.requirements), "kwargs": {}},
            {"call": "add_local_python_source", "args": list(PROJECT_PACKAGES),
             "kwargs": {"ignore": list(PACKAGE_IGNORE)}},
        ]

    def _env(self, spec: ReplicaSpec, rank: int | None, n_replicas: int) -> dict[str, str]:
        if rank is None:  # clustered: each container fills in its own rank and address
            return {**spec.env, "WORLD_SIZE": str(n_replicas), "MASTER_PORT": str(self.master_port)}
        # Separate containers share no network, so there is no rendezvous address to give.
        env = rank_env(rank=rank, world_size=n_replicas, master_addr="", master_port=self.master_port)
        env.pop("MASTER_ADDR")
        env.pop("MASTER_PORT")
        return {**spec.env, **env}

    # -- protocol -----------------------------------------------------------------------

    def launch_replicas(self, spec: ReplicaSpec, n_replicas: int, *, run_id: str | None = None) -> list[ReplicaHandle]:
        """Build the App and Function, run the App detached, spawn; handles in rank order.

        Raises:
            ValueError: clustered without a GPU, or `n_replicas` < 1.
            modal.exception.Error: whatever the SDK raises (auth, image build, quota).
        """
        run_id = run_id or time.strftime("%Y%m%d-%H%M%S")
        plan = self.plan(spec, n_replicas, run_id=run_id)
        sdk, calls = self.sdk, self.sdk_calls
        self._secret_values.extend(spec.secrets.values())

        image: Any = sdk.Image
        for step in plan["image"]:
            method = getattr(image, step["call"])
            image = record_sdk_call(calls, f"modal.Image.{step['call']}", method, *step["args"], **step["kwargs"])
        secrets = []
        if spec.secrets:
            secrets.append(
                record_sdk_call(calls, "modal.Secret.from_dict", sdk.Secret.from_dict, env_dict=dict(spec.secrets))
            )
        app = record_sdk_call(calls, "modal.App", sdk.App, name=plan["app"])
        body: Any = make_replica_function()
        if self.clustered:
            body = record_sdk_call(calls, "modal.clustered", sdk.clustered, size=n_replicas)(body)
        function = record_sdk_call(
            calls, "modal.App.function", app.function, image=image, secrets=secrets, **plan["function"]
        )(body)

        handles: list[ReplicaHandle] = []
        # Detached, so the replicas outlive this process; exiting the block only
        # disconnects the local client.
        with record_sdk_call(calls, "modal.App.run", app.run, detach=True):
            for i, spawn in enumerate(plan["spawns"]):
                call = record_sdk_call(
                    calls, "modal.Function.spawn", function.spawn, spawn["argv"], spawn["env"], spawn["clustered"]
                )
                ranks = range(n_replicas) if self.clustered else [i]
                for rank in ranks:
                    handles.append(
                        ReplicaHandle(
                            backend=self.backend_name,
                            rank=rank,
                            remote_id=call.object_id,
                            extras={"app_name": plan["app"], "clustered": self.clustered},
                        )
                    )
        return handles

    def poll(self, handle: ReplicaHandle) -> ReplicaStatus:
        """Checks the call with `FunctionCall.get(timeout=0)`.

        Modal does not say whether an unfinished call is still queued or already running;
        both are reported RUNNING.
        """
        if handle.remote_id in self._cancelled:
            return ReplicaStatus(ReplicaState.CANCELLED, None, "cancelled")
        exc_mod = self.sdk.exception
        call = self._call(handle)
        try:
            result = record_sdk_call(self.sdk_calls, "modal.FunctionCall.get", call.get, timeout=0)
        except exc_mod.OutputExpiredError:
            return ReplicaStatus(ReplicaState.FAILED, None, "Modal no longer holds this call's result (expired)")
        except exc_mod.FunctionTimeoutError as exc:
            return ReplicaStatus(ReplicaState.FAILED, None, f"timed out (Modal function timeout): {exc}")
        except TimeoutError:
            # Builtin TimeoutError: no output yet within timeout=0.
            return ReplicaStatus(ReplicaState.RUNNING)
        except exc_mod.InputCancellation:
            return ReplicaStatus(ReplicaState.CANCELLED, None, "cancelled")
        except Exception as exc:  # the remote raised, or the SDK failed: either way it failed
            return ReplicaStatus(ReplicaState.FAILED, None, redact(f"{type(exc).__name__}: {exc}", self._secret_values))
        code = int(result["exit_code"])
        if code == 0:
            return ReplicaStatus(ReplicaState.SUCCEEDED, 0)
        detail = failure_text(f"exit code {code}", redact(result.get("log_tail", ""), self._secret_values))
        return ReplicaStatus(ReplicaState.FAILED, code, detail)

    def stream_logs(self, handle: ReplicaHandle) -> Iterator[str]:
        """Lines from `FunctionCall.logs.stream()`, until Modal sees the call finish."""
        logs = self._call(handle).logs
        stream = record_sdk_call(self.sdk_calls, "modal.FunctionCall.logs.stream", logs.stream)
        buffered = ""
        for entry in stream:
            buffered += entry.message
            *lines, buffered = buffered.split("\n")
            for line in lines:
                yield redact(line, self._secret_values)
        if buffered:
            yield redact(buffered, self._secret_values)

    def cancel(self, handle: ReplicaHandle) -> None:
        """`FunctionCall.cancel(terminate_containers=True)`; in clustered mode this stops all ranks."""
        if handle.remote_id in self._cancelled:
            return
        if self.poll(handle).state.terminal:
            return
        call = self._call(handle)
        record_sdk_call(self.sdk_calls, "modal.FunctionCall.cancel", call.cancel, terminate_containers=True)
        self._cancelled.add(handle.remote_id)

    def _call(self, handle: ReplicaHandle) -> Any:
        return record_sdk_call(
            self.sdk_calls, "modal.FunctionCall.from_id", self.sdk.FunctionCall.from_id, function_call_id=handle.remote_id
        )
