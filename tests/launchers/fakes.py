"""Offline stand-ins for the Modal and Hugging Face Jobs SDK boundaries.

Both run the submitted work for real on this machine, so the contract tests exercise
exit codes, environments, logs and cancellation end to end:

* `FakeModal` mimics the `modal` module's attributes that `ModalExecutor` uses. A spawned
  call runs the adapter's own container body in a forked child in a fresh session (a
  "container"); `FunctionCall.get(timeout=0)` raises the builtin TimeoutError while it
  runs, as the real SDK does; `cancel()` kills the container's process group.
* `FakeHfApi` has `HfApi`'s Jobs methods with their real keyword-only signatures and
  returns real `huggingface_hub.JobInfo` objects; a Job is a local subprocess.
"""

from __future__ import annotations

import itertools
import os
import pickle
import signal
import subprocess
import sys
import time
import types
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_ids = itertools.count()


# ---------------------------------------------------------------------------------------
# Modal


class _ModalError(Exception):
    pass


class _ModalTimeoutError(_ModalError):  # modal.exception.TimeoutError is not the builtin one
    pass


class _OutputExpiredError(_ModalTimeoutError):
    pass


class _FunctionTimeoutError(_ModalTimeoutError):
    pass


class _RemoteError(_ModalError):
    pass


class _InputCancellation(BaseException):
    pass


@dataclass
class FakeLogEntry:  # the attributes of modal.types.LogEntry that adapters read
    message: str
    source: str = "stdout"


@dataclass
class _ClusterContext:  # modal._cluster.ClusterContext
    rank: int
    cluster_id: str
    container_ips: list
    container_ipv4_ips: list
    fabric_ids: list


class FakeImage:
    def __init__(self, steps: list):
        self.steps = steps

    @classmethod
    def debian_slim(cls, python_version: str | None = None, force_build: bool = False) -> FakeImage:
        return cls([("debian_slim", python_version)])

    @classmethod
    def from_registry(cls, tag: str, secret: Any = None, *, add_python: str | None = None, **kwargs: Any):
        return cls([("from_registry", tag, add_python)])

    def uv_pip_install(self, *packages: str, **kwargs: Any) -> FakeImage:
        return FakeImage([*self.steps, ("uv_pip_install", packages)])

    def add_local_python_source(self, *modules: str, **kwargs: Any) -> FakeImage:
        return FakeImage([*self.steps, ("add_local_python_source", modules)])

    def add_local_dir(self, local_path: str, remote_path: str, **kwargs: Any) -> FakeImage:
        return FakeImage([*self.steps, ("add_local_dir", local_path, remote_path)])


class FakeSecret:
    def __init__(self, env_dict: dict):
        self.env_dict = dict(env_dict)

    @classmethod
    def from_dict(cls, env_dict: dict | None = None) -> FakeSecret:
        return cls(env_dict or {})


class FakeFunctionCall:
    def __init__(self, sdk: FakeModal, object_id: str, containers: list[tuple[int, Path, Path]]):
        self._sdk = sdk
        self.object_id = object_id
        self._containers = containers  # (pid, log path, result path), rank 0 first
        self._exited: set[int] = set()
        self._cancelled = False

    @classmethod
    def _bind(cls, sdk: FakeModal) -> Any:
        class Bound(cls):  # so `sdk.FunctionCall.from_id` finds this sdk's calls
            @classmethod
            def from_id(kls, function_call_id: str, client: Any = None) -> FakeFunctionCall:
                return sdk.calls[function_call_id]

        return Bound

    def _running(self) -> bool:
        for pid, _, _ in self._containers:
            if pid in self._exited:
                continue
            done, _ = os.waitpid(pid, os.WNOHANG)
            if done:
                self._exited.add(pid)
        return len(self._exited) < len(self._containers)

    def get(self, timeout: float | None = None, *, index: int = 0) -> Any:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self._running():
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError()
            time.sleep(0.02)
        if self._cancelled:
            raise _InputCancellation("cancelled")
        result_path = self._containers[0][2]  # clustered: only rank 0's output comes back
        if not result_path.exists():
            raise _RemoteError("container exited without a result")
        payload = pickle.loads(result_path.read_bytes())
        if "error" in payload:
            raise _RemoteError(payload["error"])
        return payload["value"]

    def cancel(self, terminate_containers: bool = False) -> None:
        self._cancelled = True
        for pid, _, _ in self._containers:
            # The pid too: a container killed before its setsid() has no group yet.
            for kill in (os.killpg, os.kill):
                try:
                    kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        while self._running():
            time.sleep(0.01)

    @property
    def logs(self) -> Any:
        call = self

        class Logs:
            def stream(self, timeout: float | None = None) -> Iterator[FakeLogEntry]:
                while call._running():
                    time.sleep(0.02)
                for _, log_path, _ in call._containers:
                    if log_path.exists():
                        yield FakeLogEntry(log_path.read_text(errors="replace"))

            def tail(self, entries: int = 100, *, source: Any = None) -> Iterator[FakeLogEntry]:
                yield from self.stream()

        return Logs()

    def pids(self) -> list[int]:
        return [pid for pid, _, _ in self._containers]


class FakeFunction:
    def __init__(self, sdk: FakeModal, body: Any, options: dict, cluster_size: int | None):
        self._sdk, self._body, self.options, self.cluster_size = sdk, body, options, cluster_size

    def spawn(self, *args: Any, **kwargs: Any) -> FakeFunctionCall:
        if not self._sdk.app_running:
            raise RuntimeError("spawn outside App.run()")
        call_id = f"fc-{next(_ids):06d}"
        size = self.cluster_size or 1
        containers = [self._fork_container(call_id, rank, size, args, kwargs) for rank in range(size)]
        call = self._sdk.FunctionCall(self._sdk, call_id, containers)
        self._sdk.calls[call_id] = call
        return call

    def _fork_container(self, call_id: str, rank: int, size: int, args: tuple, kwargs: dict) -> tuple:
        log_path = self._sdk.workdir / f"{call_id}-{rank}.log"
        result_path = self._sdk.workdir / f"{call_id}-{rank}.result"
        secrets = {k: v for s in self.options.get("secrets") or [] for k, v in s.env_dict.items()}
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # the "container"
            try:
                os.setsid()
                fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
                os.dup2(fd, 1)
                os.dup2(fd, 2)
                # pytest may have swapped sys.stdout for a capture object; a container's
                # stdout is fd 1.
                sys.stdout = os.fdopen(1, "w", buffering=1, closefd=False)
                sys.stderr = os.fdopen(2, "w", buffering=1, closefd=False)
                os.environ.update(secrets)
                if self.cluster_size:
                    info = _ClusterContext(rank, "cu-fake", [f"fd00::{i}" for i in range(size)],
                                           [f"10.0.0.{i + 1}" for i in range(size)], [])
                    experimental = types.ModuleType("modal.experimental")
                    experimental.get_cluster_info = lambda: info
                    modal_mod = types.ModuleType("modal")
                    modal_mod.experimental = experimental
                    sys.modules["modal"] = modal_mod
                    sys.modules["modal.experimental"] = experimental
                try:
                    payload = {"value": self._body(*args, **kwargs)}
                except BaseException as exc:
                    payload = {"error": f"{type(exc).__name__}: {exc}"}
                tmp = result_path.with_suffix(".tmp")
                tmp.write_bytes(pickle.dumps(payload))
                tmp.rename(result_path)
            finally:
                os._exit(0)
        return pid, log_path, result_path


class FakeApp:
    def __init__(self, sdk: FakeModal, name: str | None = None, **kwargs: Any):
        self._sdk, self.name = sdk, name

    def function(self, **options: Any) -> Any:
        def decorate(body: Any) -> FakeFunction:
            cluster_size = getattr(body, "_fake_cluster_size", None)
            body = getattr(body, "_fake_wrapped", body)
            return FakeFunction(self._sdk, body, options, cluster_size)

        return decorate

    def run(self, *, detach: bool = False, **kwargs: Any) -> Any:
        sdk = self._sdk

        class Running:
            def __enter__(self_inner) -> FakeApp:
                sdk.app_running = True
                return self

            def __exit__(self_inner, *exc: object) -> None:
                sdk.app_running = False

        return Running()


class FakeModal:
    """A stand-in for the `modal` module, with the same attribute names."""

    def __init__(self, workdir: Path):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.app_running = False
        self.calls: dict[str, FakeFunctionCall] = {}
        self.Image = FakeImage
        self.Secret = FakeSecret
        self.FunctionCall = FakeFunctionCall._bind(self)
        self.exception = types.SimpleNamespace(
            Error=_ModalError,
            TimeoutError=_ModalTimeoutError,
            OutputExpiredError=_OutputExpiredError,
            FunctionTimeoutError=_FunctionTimeoutError,
            RemoteError=_RemoteError,
            InputCancellation=_InputCancellation,
        )

    def App(self, name: str | None = None, **kwargs: Any) -> FakeApp:
        return FakeApp(self, name, **kwargs)

    def clustered(self, *, size: int, rdma: bool = False) -> Any:
        def decorate(body: Any) -> Any:
            def marked(*args: Any, **kwargs: Any) -> Any:
                return body(*args, **kwargs)

            marked._fake_cluster_size = size
            marked._fake_wrapped = body
            return marked

        return decorate

    def all_pids(self) -> list[int]:
        return [pid for call in self.calls.values() for pid in call.pids()]


# ---------------------------------------------------------------------------------------
# Hugging Face Jobs


class FakeHfApi:
    """`HfApi`'s Jobs methods, same keyword-only signatures, Jobs run as local processes."""

    def __init__(self, workdir: Path, owner: str = "areal-tester"):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.owner = owner
        self.jobs: dict[str, dict[str, Any]] = {}

    def run_job(
        self,
        *,
        image: str,
        command: list[str],
        env: dict | None = None,
        secrets: dict | None = None,
        flavor: Any = None,
        timeout: Any = None,
        attempts: int | None = None,
        name: str | None = None,
        labels: dict | None = None,
        volumes: Any = None,
        expose: Any = None,
        expose_public: Any = None,
        ssh: bool = False,
        network_group: str | None = None,
        network_aliases: list | None = None,
        resource_group_id: str | None = None,
        namespace: str | None = None,
        token: Any = None,
    ):
        job_id = f"{next(_ids):024x}"
        log_path = self.workdir / f"{job_id}.log"
        container_env = {**os.environ, **(env or {}), **(secrets or {})}
        if network_group:
            container_env["HF_NETWORK_GROUP_PREFIX"] = f"{network_group}-"
            container_env["HF_NETWORK_GROUP_HOSTNAME"] = network_group
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(command, env=container_env, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        self.jobs[job_id] = {
            "proc": proc, "log": log_path, "cancelled": False, "image": image, "command": command,
            "env": dict(env or {}), "flavor": flavor, "namespace": namespace or self.owner,
            "labels": {**(labels or {}), **({"name": name} if name else {})},
            "network": {"group": network_group, "aliases": network_aliases or []} if network_group else None,
        }
        return self._info(job_id)

    def inspect_job(self, *, job_id: str, namespace: str | None = None, token: Any = None):
        return self._info(job_id)

    def fetch_job_logs(self, *, job_id: str, namespace: str | None = None, follow: bool = False,
                       tail: int | None = None, token: Any = None) -> Iterator[str]:
        job = self.jobs[job_id]
        if follow:
            job["proc"].wait()
        lines = job["log"].read_text(errors="replace").splitlines()
        yield from (lines[-tail:] if tail else lines)

    def cancel_job(self, *, job_id: str, namespace: str | None = None, token: Any = None) -> None:
        job = self.jobs[job_id]
        job["cancelled"] = True
        try:
            os.killpg(job["proc"].pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        job["proc"].wait()

    def _info(self, job_id: str):
        from huggingface_hub import JobInfo

        job = self.jobs[job_id]
        code = job["proc"].poll()
        if job["cancelled"]:
            stage = "CANCELED"
        elif code is None:
            stage = "RUNNING"
        else:
            stage = "COMPLETED" if code == 0 else "ERROR"
        return JobInfo(
            id=job_id,
            createdAt="2026-01-01T00:00:00.000Z",
            dockerImage=job["image"],
            command=job["command"],
            environment=job["env"],
            flavor=job["flavor"],
            labels=job["labels"],
            owner={"id": "0" * 24, "name": job["namespace"], "type": "user"},
            status={"stage": stage, "message": None},
            network=job["network"],
            endpoint="https://huggingface.co",
        )

    def all_pids(self) -> list[int]:
        return [job["proc"].pid for job in self.jobs.values()]
