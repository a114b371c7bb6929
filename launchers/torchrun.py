"""One node of a multi-node job under torch elastic (torchrun), c10d rendezvous.

    # on every node, the same command but --node-rank:
    areal launch --backend torchrun --nnodes 2 --node-rank 0 --rdzv-endpoint node0:29400 config=...

Each node runs one torch elastic agent (`python -m torch.distributed.run`) as a local
subprocess of this launcher; the agent starts `nproc_per_node` workers and sets their
`RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `LOCAL_WORLD_SIZE`, `GROUP_RANK` (the node's rank),
`MASTER_ADDR` and `MASTER_PORT`. The c10d rendezvous store lives in the agent of node
rank 0 (`is_host`), at `rdzv_endpoint`, and is shared with the workers
(engines/distributed.py joins it). Which node gets which global ranks is torch elastic's
choice at each rendezvous; `node_rank` decides only who hosts the store.

A node that dies is noticed by the survivors' workers (engines/heartbeat.py, within
`trainer.heartbeat_timeout_s`), which print one `areal: lost rank R ...` line and exit 75;
their agent then stops its other workers and exits, and this executor reports that line.
With `max_restarts > 0` the agent restarts its workers first, which rejoin a new
rendezvous (at most `rdzv_timeout` seconds) and resume from the last recover checkpoint.
Handles: one per node, its `rank` the node rank.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path
from typing import Any

from engines.heartbeat import JOINED_PREFIX, LOST_LINE_PREFIX
from launchers.executor import ReplicaHandle, ReplicaSpec, ReplicaStatus, redact
from launchers.local import LocalProcessExecutor

_ENDPOINT = re.compile(r"^(\[[0-9a-fA-F:]+\]|[A-Za-z0-9_.-]+):(\d{1,5})$")


def parse_endpoint(endpoint: str) -> tuple[str, int]:
    """`HOST:PORT` (IPv6 as `[::1]:PORT`) as (host, port).

    Raises:
        ValueError: not HOST:PORT, or a port outside 1..65535.
    """
    match = _ENDPOINT.match(endpoint or "")
    if not match or not 0 < int(match.group(2)) < 65536:
        raise ValueError(f"rendezvous endpoint {endpoint!r} is not HOST:PORT (e.g. 10.0.0.1:29400 or node0:29400)")
    return match.group(1), int(match.group(2))


def torchrun_args(
    *,
    nnodes: int,
    nproc_per_node: int,
    rdzv_endpoint: str,
    rdzv_id: str,
    max_restarts: int = 0,
    rdzv_timeout: float = 600.0,
    is_host: bool | None = None,
    node_rank: int | None = None,
) -> list[str]:
    """The `torch.distributed.run` options for one node (everything before the command).

    `is_host` None lets torch elastic decide by matching the endpoint to this host's
    names (Slurm, where every node runs the same line).

    Raises:
        ValueError: a count below 1 (restarts below 0), or a bad endpoint.
    """
    if nnodes < 1 or nproc_per_node < 1 or max_restarts < 0 or rdzv_timeout <= 0:
        raise ValueError(
            f"need nnodes >= 1, nproc_per_node >= 1, max_restarts >= 0 and rdzv_timeout > 0; got {nnodes}, "
            f"{nproc_per_node}, {max_restarts}, {rdzv_timeout}"
        )
    if not rdzv_endpoint.startswith("$"):  # a shell variable in a Slurm script
        parse_endpoint(rdzv_endpoint)
    conf = [f"join_timeout={rdzv_timeout:g}"]
    if is_host is not None:
        conf.append(f"is_host={str(is_host).lower()}")
    args = [
        "--nnodes", str(nnodes), "--nproc-per-node", str(nproc_per_node),
        "--rdzv-backend", "c10d", "--rdzv-endpoint", rdzv_endpoint, "--rdzv-id", rdzv_id,
        "--rdzv-conf", ",".join(conf), "--max-restarts", str(max_restarts),
        # How often the agent looks at its workers, seconds: a failure is acted on sooner.
        "--monitor-interval", "0.5",
    ]
    if node_rank is not None:
        args[4:4] = ["--node-rank", str(node_rank)]
    return args


class TorchrunExecutor(LocalProcessExecutor):
    """This node's part of a torch elastic job (the other nodes run the same command).

    Args:
        run_dir: where `node<R>.log` (the agent's and its workers' output) and
            `handles.json` go.
        nnodes: number of nodes; node_rank: this node's, 0..nnodes-1 (node 0 hosts the
            rendezvous store).
        rdzv_endpoint: `HOST:PORT` of node 0, reachable from every node.
        nproc_per_node: workers (ranks) on this node, usually its GPU count.
        max_restarts: torch elastic's worker-group restarts before the node gives up.
        rdzv_timeout: seconds a rendezvous waits for all nodes to join.
        rdzv_id: the job's name at the rendezvous, the same on every node.
        grace_period, fail_fast, poll_interval: as `LocalProcessExecutor`.
    Raises:
        ValueError: a count out of range or a bad endpoint.
    """

    backend_name = "torchrun"
    supports_inter_replica_network = True

    def __init__(
        self,
        run_dir: str | os.PathLike,
        *,
        nnodes: int,
        node_rank: int,
        rdzv_endpoint: str,
        nproc_per_node: int = 1,
        max_restarts: int = 0,
        rdzv_timeout: float = 600.0,
        rdzv_id: str = "areal",
        grace_period: float = 5.0,
        fail_fast: bool = True,
        poll_interval: float = 0.05,
    ) -> None:
        super().__init__(run_dir, grace_period=grace_period, fail_fast=fail_fast, poll_interval=poll_interval)
        if not 0 <= node_rank < nnodes:
            raise ValueError(f"node rank {node_rank} is not in 0..{nnodes - 1} (--node-rank, --nnodes)")
        self.nnodes, self.node_rank, self.nproc_per_node = nnodes, node_rank, nproc_per_node
        self.rdzv_endpoint = rdzv_endpoint
        self._args = torchrun_args(
            nnodes=nnodes, nproc_per_node=nproc_per_node, rdzv_endpoint=rdzv_endpoint, rdzv_id=rdzv_id,
            max_restarts=max_restarts, rdzv_timeout=rdzv_timeout, is_host=node_rank == 0, node_rank=node_rank,
        )

    @property
    def world_size(self) -> int:
        return self.nnodes * self.nproc_per_node

    def plan(self, spec: ReplicaSpec, n_replicas: int, **_: Any) -> list[dict[str, Any]]:
        """This node's one process: the agent's argv, its added env and log file.

        Raises:
            ValueError: `n_replicas` is not nnodes x nproc_per_node.
        """
        if n_replicas != self.world_size:
            raise ValueError(
                f"{n_replicas} replicas != {self.nnodes} node(s) x {self.nproc_per_node} per node "
                "(--replicas is the world size: --nnodes x --nproc-per-node)"
            )
        return [{
            "rank": self.node_rank,
            # --no-python: the entrypoint is a whole command (`python -m areal_cli.main train ...`).
            "argv": [sys.executable, "-m", "torch.distributed.run", *self._args, "--no-python", *spec.entrypoint],
            "env": dict(spec.env),
            "secrets": sorted(spec.secrets),
            "log_path": str(self.run_dir / f"node{self.node_rank}.log"),
            "timeout_s": spec.timeout,
        }]

    def _failure_detail(self, handle: ReplicaHandle, status: ReplicaStatus) -> str:
        lost = lost_rank_line(Path(handle.extras["log_path"]))
        if lost is None:
            lost = self._lost_with_rendezvous(Path(handle.extras["log_path"]))
        if lost is not None:
            return redact(lost, self._secret_values)
        return super()._failure_detail(handle, status).replace(f"rank {handle.rank}:", f"node {handle.rank}:", 1)


    def _lost_with_rendezvous(self, log_path: Path) -> str | None:
        # The agent itself died because the rendezvous store (node rank 0's agent) went
        # away, and it stopped this node's workers before their watchers could speak.
        text = log_path.read_text(errors="replace") if log_path.exists() else ""
        if "RendezvousConnectionError" not in text:
            return None
        ours = {int(r) for r in re.findall(rf"{JOINED_PREFIX} (\d+) of", text)}
        others = ", ".join(str(r) for r in range(self.world_size) if r not in ours) or "?"
        return (f"{LOST_LINE_PREFIX} {others} (node rank 0, host of the rendezvous at {self.rdzv_endpoint}): "
                f"its store stopped answering; seen by node {self.node_rank}")


def lost_rank_line(log_path: Path) -> str | None:
    """The first `areal: lost rank ...` line a worker of this node printed, if any."""
    if not log_path.exists():
        return None
    with open(log_path, errors="replace") as f:
        for line in f:
            # torchrun may prefix worker lines with `[rank]:` tags.
            at = line.find(LOST_LINE_PREFIX)
            if at >= 0:
                return line[at:].rstrip("\n")
    return None
