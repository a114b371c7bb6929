"""Replicas on a Ray cluster: one placement-group bundle and one Ray actor per rank.

    areal launch --backend ray --replicas 2 config=smoke         # a new Ray on 127.0.0.1
    areal launch --backend ray --ray-address HEAD:6379 --replicas 16 --gpus-per-node 8 config=...

Each rank's actor is pinned to its own bundle (`{"CPU": cpus_per_replica, "GPU":
gpus_per_replica}`, strategy PACK, so ranks fill a node before spilling to the next) and
runs the entrypoint argv as a subprocess with `RANK`, `WORLD_SIZE`, `LOCAL_RANK`,
`MASTER_ADDR` and `MASTER_PORT` set as the other backends set them: the master is rank 0's
node address and a port free there, and the ranks meet through torch.distributed's own
rendezvous (engines/distributed.py), not through Ray. The subprocess dies with its actor
(`PR_SET_PDEATHSIG`), so a killed Ray worker leaves nothing behind; it is reported as that
rank's failure, and with `fail_fast` the other ranks are cancelled, as locally. Output goes
to `<run_dir>/rank<R>.log` on the node of the rank.

Without an address, Ray is started here on loopback only (node IP 127.0.0.1, no
dashboard, usage statistics off), and shut down after `collect`. Handles name Ray actors
of this driver's session: `areal launch status` from another process cannot re-attach.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from launchers.executor import (
    PollingCollect,
    ReplicaHandle,
    ReplicaResult,
    ReplicaSpec,
    ReplicaState,
    ReplicaStatus,
    check_n_replicas,
    failure_text,
    rank_env,
    redact,
    tail_lines,
    write_results,
)
from launchers.logs import follow_log

LOOPBACK = "127.0.0.1"


class _Runner:
    """The body of each rank's Ray actor: runs one subprocess and can stop it."""

    def __init__(self) -> None:
        self.proc = None

    def where(self) -> tuple[str, int]:
        """(the Ray node id this actor runs on, this worker's pid)."""
        import ray

        return ray.get_runtime_context().get_node_id(), os.getpid()

    def free_port(self, host: str) -> int:
        """A TCP port free on `host` (this node's address) a moment ago."""
        import socket

        with socket.socket() as sock:
            sock.bind((host, 0))
            return sock.getsockname()[1]

    def run(self, argv: list[str], env: dict[str, str], log_path: str, cwd: str | None) -> int:
        import ctypes
        import signal
        import subprocess

        def die_with_actor() -> None:
            # PR_SET_PDEATHSIG: SIGTERM when this actor's process dies, however it dies.
            ctypes.CDLL("libc.so.6").prctl(1, signal.SIGTERM)

        Path(log_path).parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "wb") as log:
            self.proc = subprocess.Popen(argv, env={**os.environ, **env}, stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT, cwd=cwd if cwd and os.path.isdir(cwd) else None,
                                         start_new_session=True, preexec_fn=die_with_actor)
        return self.proc.wait()

    def stop(self, grace_period: float) -> None:
        import signal

        if self.proc is None or self.proc.poll() is not None:
            return
        for sig, wait in ((signal.SIGTERM, grace_period), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                return
            deadline = time.monotonic() + wait
            while self.proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.05)


class RayExecutor(PollingCollect):
    """Runs each replica as a Ray actor's subprocess.

    Args:
        run_dir: where `rank<R>.log` and `results.json` go.
        address: an existing Ray cluster (`HOST:PORT`, `auto`); None starts one here on
            127.0.0.1.
        cpus_per_replica, gpus_per_replica: each bundle's resources.
        grace_period: seconds between SIGTERM and SIGKILL when cancelling.
        fail_fast, poll_interval: as `LocalProcessExecutor`.
        ready_timeout: seconds to wait for the placement group (all bundles placed).
    Raises:
        ImportError: ray is not installed (`pip install 'areal[ray]'`).
    """

    backend_name = "ray"
    supports_inter_replica_network = True

    def __init__(
        self,
        run_dir: str | os.PathLike,
        *,
        address: str | None = None,
        cpus_per_replica: float = 1.0,
        gpus_per_replica: float = 0.0,
        grace_period: float = 5.0,
        fail_fast: bool = True,
        poll_interval: float = 0.2,
        ready_timeout: float = 300.0,
    ) -> None:
        if address is None:
            # Ray otherwise swaps 127.0.0.1 for this machine's outward address (and its
            # servers listen there); off, every Ray process listens on 127.0.0.1 only.
            os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        # Ray reports usage to its makers unless told not to: nothing leaves this machine.
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        import ray  # (fail at construction, with the install hint, not mid-launch)

        if address is None and sys.modules.get("ray._private.ray_constants") is not None:
            # ray was imported before the variable above was set (it reads it at import).
            ray._private.ray_constants.ENABLE_RAY_CLUSTER = False

        self.run_dir = Path(run_dir)
        self.address, self.cpus, self.gpus = address, cpus_per_replica, gpus_per_replica
        self.grace_period, self.fail_fast, self.poll_interval = grace_period, fail_fast, poll_interval
        self.ready_timeout = ready_timeout
        self._actors: dict[int, Any] = {}
        self._runs: dict[int, Any] = {}
        self._started_at: dict[int, float] = {}
        self._cancelled: set[int] = set()
        self._placement = None
        self._started_ray = False
        self._secret_values: list[str] = []

    def plan(self, spec: ReplicaSpec, n_replicas: int) -> dict[str, Any]:
        check_n_replicas(n_replicas)
        return {
            "address": self.address or f"new local Ray on {LOOPBACK}",
            "bundles": [self._bundle()] * n_replicas, "strategy": "PACK", "argv": list(spec.entrypoint),
            "env": dict(spec.env), "secrets": sorted(spec.secrets), "log_dir": str(self.run_dir),
        }

    def launch_replicas(self, spec: ReplicaSpec, n_replicas: int) -> list[ReplicaHandle]:
        """Place the bundles, start one actor per rank, start every rank's subprocess.

        Raises:
            ValueError: `n_replicas` < 1. TimeoutError: the cluster cannot place the
            bundles within `ready_timeout` seconds (too few CPUs/GPUs).
        """
        import ray
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        check_n_replicas(n_replicas)
        self._init_ray(n_replicas)
        self._secret_values.extend(spec.secrets.values())
        self._placement = placement_group([self._bundle()] * n_replicas, strategy="PACK")
        ready, _ = ray.wait([self._placement.ready()], timeout=self.ready_timeout)
        if not ready:
            raise TimeoutError(f"Ray could not place {n_replicas} bundle(s) of {self._bundle()} within "
                               f"{self.ready_timeout:g} s: {ray.available_resources()} available")
        runner = ray.remote(_Runner)
        # num_cpus=0: the bundle's CPUs are the replica subprocess's, not the actor's.
        actors = [runner.options(max_concurrency=4, num_cpus=0, scheduling_strategy=PlacementGroupSchedulingStrategy(
            placement_group=self._placement, placement_group_bundle_index=rank)).remote() for rank in range(n_replicas)]
        # The address Ray itself uses for each node (127.0.0.1 for a Ray started here),
        # rather than whatever interface the node's routing table prefers.
        addresses = {node["NodeID"]: node["NodeManagerAddress"] for node in ray.nodes()}
        places = [(addresses[node_id], pid) for node_id, pid in ray.get([a.where.remote() for a in actors])]
        master_addr = places[0][0]
        master_port = ray.get(actors[0].free_port.remote(master_addr))
        per_node = {host: sum(1 for h, _ in places if h == host) for host, _ in places}
        handles = []
        for rank, (actor, (host, pid)) in enumerate(zip(actors, places)):
            env = {**spec.env, **spec.secrets, **rank_env(rank=rank, world_size=n_replicas, master_addr=master_addr,
                                                          master_port=master_port, replicas_per_node=per_node[host])}
            env["LOCAL_RANK"] = str(sum(1 for h, _ in places[:rank] if h == host))
            log_path = str((self.run_dir / f"rank{rank}.log").resolve())
            self._actors[rank], self._started_at[rank] = actor, time.time()
            self._runs[rank] = actor.run.remote(list(spec.entrypoint), env, log_path, os.getcwd())
            handles.append(ReplicaHandle(self.backend_name, rank, f"{host}:{pid}", {
                "node": host, "worker_pid": pid, "log_path": log_path, "timeout_s": spec.timeout}))
        return handles

    def poll(self, handle: ReplicaHandle) -> ReplicaStatus:
        import ray

        rank = handle.rank
        if rank not in self._runs:
            return ReplicaStatus(ReplicaState.FAILED, None, "not started by this process (Ray handles cannot re-attach)")
        ready, _ = ray.wait([self._runs[rank]], timeout=0)
        if not ready:
            if time.time() - self._started_at[rank] > float(handle.extras["timeout_s"]):
                self.cancel(handle)
                return ReplicaStatus(ReplicaState.FAILED, None, f"timed out after {handle.extras['timeout_s']:g} s")
            return ReplicaStatus(ReplicaState.RUNNING)
        try:
            code = ray.get(self._runs[rank])
        except ray.exceptions.RayError as exc:  # the actor's worker process died
            if rank in self._cancelled:
                return ReplicaStatus(ReplicaState.CANCELLED, None, "cancelled")
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            return ReplicaStatus(ReplicaState.FAILED, None,
                                 f"the Ray worker of rank {rank} (pid {handle.extras['worker_pid']} on "
                                 f"{handle.extras['node']}) died: {type(exc).__name__}: {first}")
        if rank in self._cancelled:
            return ReplicaStatus(ReplicaState.CANCELLED, code, "cancelled")
        if code == 0:
            return ReplicaStatus(ReplicaState.SUCCEEDED, 0)
        return ReplicaStatus(ReplicaState.FAILED, code, f"exit code {code}")

    def stream_logs(self, handle: ReplicaHandle) -> Iterator[str]:
        finished = lambda: self.poll(handle).state.terminal  # noqa: E731
        for line in follow_log(Path(handle.extras["log_path"]), finished, self.poll_interval):
            yield redact(line, self._secret_values)

    def cancel(self, handle: ReplicaHandle) -> None:
        """Stop the rank's subprocess (SIGTERM, SIGKILL after `grace_period`), then its actor."""
        import ray

        actor = self._actors.get(handle.rank)
        if actor is None:
            return
        self._cancelled.add(handle.rank)
        try:
            ray.get(actor.stop.remote(self.grace_period), timeout=self.grace_period + 10)
        except ray.exceptions.RayError:
            pass  # the actor is already gone, and its subprocess with it (PDEATHSIG)
        ray.kill(actor)

    def collect(self, handles: list[ReplicaHandle], timeout: float, **kwargs: Any) -> list[ReplicaResult]:
        """As `LocalProcessExecutor.collect`; afterwards the placement group is removed
        and a Ray started by this executor is shut down."""
        try:
            results = super().collect(handles, timeout, **kwargs)
        finally:
            self.close()
        write_results(self.run_dir, results)
        return results

    def close(self) -> None:
        import ray
        from ray.util.placement_group import remove_placement_group

        for actor in self._actors.values():
            ray.kill(actor)
        if self._placement is not None:
            remove_placement_group(self._placement)
            self._placement = None
        if self._started_ray:
            ray.shutdown()
            self._started_ray = False

    def _failure_detail(self, handle: ReplicaHandle, status: ReplicaStatus) -> str:
        path = Path(handle.extras["log_path"])
        tail = tail_lines(path.read_text(errors="replace")) if path.exists() else ""
        return redact(failure_text(f"rank {handle.rank}: {status.message or 'failed'}", tail), self._secret_values)

    def _bundle(self) -> dict[str, float]:
        return {"CPU": self.cpus, **({"GPU": self.gpus} if self.gpus else {})}

    def _init_ray(self, n_replicas: int) -> None:
        import ray

        if ray.is_initialized():
            return
        if self.address:
            ray.init(address=self.address, log_to_driver=False)
        else:
            # The actors import this module: a Ray started here sees this checkout first,
            # whatever copy of areal its Python has installed.
            root = str(Path(__file__).resolve().parents[1])
            paths = os.environ.get("PYTHONPATH", "").split(os.pathsep)
            if root not in paths:
                os.environ["PYTHONPATH"] = os.pathsep.join([root, *filter(None, paths)])
            # Ray gives its raylet 30 s to register, too little on a busy small machine.
            os.environ.setdefault("RAY_raylet_start_wait_time_s", "180")
            ray.init(_node_ip_address=LOOPBACK, include_dashboard=False, log_to_driver=False,
                     num_cpus=max(os.cpu_count() or 1, int(n_replicas * self.cpus + 0.999)),
                     num_gpus=int(n_replicas * self.gpus + 0.999) if self.gpus else None)
        self._started_ray = True
