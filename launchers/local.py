"""Replicas as local subprocesses: the laptop (or one big machine) end of `areal launch`.

    areal launch --backend local --replicas 2 config=smoke

Each rank is a real subprocess of the entrypoint argv in its own session (process group),
so cancelling it takes down everything it started. Its stdout and stderr go to
`<run_dir>/rank<R>.log`; handles go to `<run_dir>/handles.json`, from which another
process can re-attach by pid (`areal launch status RUN`).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
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
    read_results,
    redact,
    save_handles,
    tail_lines,
    write_results,
)
from launchers.logs import follow_log

LOCAL_MASTER_ADDR = "127.0.0.1"


def find_free_port(host: str = LOCAL_MASTER_ADDR) -> int:
    """A TCP port that was free a moment ago (the OS picks it when binding port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


class LocalProcessExecutor(PollingCollect):
    """Runs each replica as a local subprocess.

    Args:
        run_dir: where logs (`rank<R>.log`) and `handles.json` are written.
        grace_period: seconds between SIGTERM and SIGKILL when cancelling.
        fail_fast: when one replica fails, `collect` cancels the others.
        poll_interval: seconds between polls in `collect` (at most 0.1).
    """

    backend_name = "local"
    supports_inter_replica_network = True

    def __init__(
        self,
        run_dir: str | os.PathLike,
        *,
        grace_period: float = 5.0,
        fail_fast: bool = True,
        poll_interval: float = 0.05,
    ) -> None:
        if grace_period < 0:
            raise ValueError(f"grace_period must be >= 0 seconds, got {grace_period}")
        self.run_dir = Path(run_dir)
        self.grace_period = grace_period
        self.fail_fast = fail_fast
        self.poll_interval = min(poll_interval, 0.1)
        self._procs: dict[int, subprocess.Popen] = {}  # pid -> process we started
        self._cancelled: set[int] = set()  # pids we stopped on purpose
        self._timed_out: dict[int, float] = {}  # pid -> timeout that stopped it, seconds
        self._secret_values: list[str] = []

    # -- planning -----------------------------------------------------------------------

    def plan(self, spec: ReplicaSpec, n_replicas: int, *, master_port: int | None = None) -> list[dict[str, Any]]:
        """Per rank, exactly what `launch_replicas` starts: argv, added env, log file."""
        check_n_replicas(n_replicas)
        port = master_port if master_port is not None else find_free_port()
        return [
            {
                "argv": list(spec.entrypoint),
                "env": {
                    **spec.env,
                    **rank_env(
                        rank=r,
                        world_size=n_replicas,
                        master_addr=LOCAL_MASTER_ADDR,
                        master_port=port,
                        replicas_per_node=n_replicas,
                    ),
                },
                "secrets": sorted(spec.secrets),
                "log_path": str(self.run_dir / f"rank{r}.log"),
                "timeout_s": spec.timeout,
            }
            for r in range(n_replicas)
        ]

    # -- protocol -----------------------------------------------------------------------

    def launch_replicas(self, spec: ReplicaSpec, n_replicas: int) -> list[ReplicaHandle]:
        """Start the replicas; returns handles in rank order.

        Raises:
            ValueError: `n_replicas` < 1.
            OSError: the entrypoint cannot be executed (replicas already started are
                cancelled first).
        """
        plans = self.plan(spec, n_replicas)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._secret_values.extend(spec.secrets.values())
        handles: list[ReplicaHandle] = []
        try:
            for index, plan in enumerate(plans):
                rank = plan.get("rank", index)  # a torchrun node's one plan carries its node rank
                env = {**os.environ, **plan["env"], **spec.secrets}
                with open(plan["log_path"], "wb") as log:
                    proc = subprocess.Popen(
                        plan["argv"],
                        env=env,
                        stdin=subprocess.DEVNULL,
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        # Its own session, so killpg reaches every process the replica
                        # starts (dataloader workers, reward pools) and a Ctrl-C in the
                        # launcher's terminal is handled by the launcher, not the replicas.
                        start_new_session=True,
                    )
                self._procs[proc.pid] = proc
                handles.append(
                    ReplicaHandle(
                        backend=self.backend_name,
                        rank=rank,
                        remote_id=str(proc.pid),
                        extras={
                            "pid": proc.pid,
                            "pgid": proc.pid,  # session leader: its pid is the group id
                            "log_path": plan["log_path"],
                            "started_at": time.time(),
                            "timeout_s": spec.timeout,
                            "argv0": os.path.basename(plan["argv"][0]),
                        },
                    )
                )
        except BaseException:
            for handle in handles:
                self.cancel(handle)
            raise
        save_handles(self.run_dir, handles, backend=self.backend_name, world_size=n_replicas)
        return handles

    def poll(self, handle: ReplicaHandle) -> ReplicaStatus:
        """State of the replica; stops (and reports failed) a replica past its timeout."""
        pid = int(handle.extras["pid"])
        proc = self._procs.get(pid)
        if proc is None:
            return self._poll_reattached(handle)
        code = proc.poll()
        if code is None:
            timeout = float(handle.extras["timeout_s"])
            if time.time() - float(handle.extras["started_at"]) <= timeout:
                return ReplicaStatus(ReplicaState.RUNNING)
            self._timed_out[pid] = timeout
            self._stop(handle)
            code = proc.poll()
        # The replica's leader is gone; make sure nothing it started outlives it.
        _killpg(int(handle.extras["pgid"]), signal.SIGKILL)
        if pid in self._timed_out:
            return ReplicaStatus(
                ReplicaState.FAILED, code, f"timed out after {self._timed_out[pid]:g} s (ReplicaSpec.timeout)"
            )
        if pid in self._cancelled:
            return ReplicaStatus(ReplicaState.CANCELLED, code, "cancelled")
        if code == 0:
            return ReplicaStatus(ReplicaState.SUCCEEDED, 0)
        return ReplicaStatus(ReplicaState.FAILED, code, _describe_exit(code))

    def stream_logs(self, handle: ReplicaHandle) -> Iterator[str]:
        """Lines of the replica's log file, following it until the replica ends."""
        finished = lambda: self.poll(handle).state.terminal  # noqa: E731
        for line in follow_log(Path(handle.extras["log_path"]), finished, self.poll_interval):
            yield redact(line, self._secret_values)

    def cancel(self, handle: ReplicaHandle) -> None:
        """SIGTERM to the replica's process group, SIGKILL after `grace_period` seconds."""
        pid = int(handle.extras["pid"])
        if self._is_alive(handle):
            self._cancelled.add(pid)
            self._stop(handle)
        else:
            _killpg(int(handle.extras["pgid"]), signal.SIGKILL)

    def collect(
        self,
        handles: list[ReplicaHandle],
        timeout: float,
        *,
        on_update: Callable[[list[ReplicaHandle], list[ReplicaStatus]], None] | None = None,
    ) -> list[ReplicaResult]:
        """Wait up to `timeout` seconds for every replica; results in rank order.

        With `fail_fast`, the first failed replica cancels the others. Replicas still
        running at the timeout are cancelled and reported failed. Results are also
        written to `<run_dir>/results.json`.
        """
        results = super().collect(handles, timeout, on_update=on_update)
        write_results(self.run_dir, results)
        return results

    # -- internals ----------------------------------------------------------------------

    def _failure_detail(self, handle: ReplicaHandle, status: ReplicaStatus) -> str:
        reason = f"rank {handle.rank}: {status.message or 'failed'}"
        return redact(failure_text(reason, self.log_tail(handle)), self._secret_values)

    def log_tail(self, handle: ReplicaHandle, n: int = 20) -> str:
        path = Path(handle.extras["log_path"])
        if not path.exists():
            return ""
        with open(path, "rb") as f:
            # Reading the last 64 KiB is plenty for 20 lines and keeps huge logs cheap.
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 65536))
            return tail_lines(f.read().decode(errors="replace"), n)

    def _is_alive(self, handle: ReplicaHandle) -> bool:
        pid = int(handle.extras["pid"])
        proc = self._procs.get(pid)
        if proc is not None:
            return proc.poll() is None
        return _pid_matches(pid, handle.extras.get("argv0"))

    def _stop(self, handle: ReplicaHandle) -> None:
        pgid = int(handle.extras["pgid"])
        _killpg(pgid, signal.SIGTERM)
        deadline = time.monotonic() + self.grace_period
        while self._is_alive(handle) and time.monotonic() < deadline:
            time.sleep(0.02)
        _killpg(pgid, signal.SIGKILL)
        proc = self._procs.get(int(handle.extras["pid"]))
        if proc is not None:
            proc.wait()

    def _poll_reattached(self, handle: ReplicaHandle) -> ReplicaStatus:
        # Another process started this replica: only the pid is known, and the exit code
        # only if that launcher lived to write results.json.
        if self._is_alive(handle):
            return ReplicaStatus(ReplicaState.RUNNING)
        recorded = read_results(self.run_dir).get(handle.rank)
        if recorded is not None:
            return ReplicaStatus(recorded.state, recorded.exit_code, recorded.error)
        return ReplicaStatus(
            ReplicaState.FAILED, None, "process is gone and its launcher recorded no result (exit code unknown)"
        )


def _killpg(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass  # already gone (or the pid was reused by someone else's process)


def _pid_matches(pid: int, argv0: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return False  # alive but not ours: the pid was reused
    cmdline = Path(f"/proc/{pid}/cmdline")
    if argv0 and cmdline.exists():
        # Guard against pid reuse after the replica exited.
        try:
            words = cmdline.read_bytes().split(b"\0")[:2]
        except OSError:
            return False
        names = {os.path.basename(w.decode(errors="replace")) for w in words if w}
        # Two words, because a script with a shebang runs as `interpreter script`; no
        # words at all while the kernel is still setting up the exec.
        if names and argv0 not in names:
            return False
        stat = Path(f"/proc/{pid}/stat").read_text(errors="replace")
        if stat.rsplit(")", 1)[-1].split()[0] == "Z":
            return False  # a zombie has exited
    return True


def _describe_exit(code: int | None) -> str:
    if code is None:
        return "exit code unknown"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"exit code {code} (killed by {name})"
    return f"exit code {code}"
