"""Server lifecycle with real child processes: readiness, start-up failures carrying the
log's tail, and stopping a server's whole process group."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from engines.servers import (
    ServerProcess,
    ServerStartError,
    find_server_python,
    free_port,
    server_command,
    server_env,
    start_servers,
)

# A stand-in "server": answers /health after `delay` seconds and forks a child that
# sleeps, like vLLM's engine-core process.
SERVER = """
import http.server, subprocess, sys, time
port, delay = int(sys.argv[1]), float(sys.argv[2])
subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
print("booting", flush=True)
time.sleep(delay)
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if self.path == "/health" else 404); self.end_headers()
http.server.HTTPServer(("127.0.0.1", port), H).serve_forever()
"""


def launch(tmp_path, *args: str) -> ServerProcess:
    port = free_port()
    log = tmp_path / "server.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-c", SERVER, str(port), *args], stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    return ServerProcess("vllm", f"127.0.0.1:{port}", proc, log)


def group_members(pgid: int) -> list[psutil.Process]:
    members = []
    for p in psutil.process_iter():
        try:
            if p.status() != psutil.STATUS_ZOMBIE and os.getpgid(p.pid) == pgid:
                members.append(p)
        except (psutil.NoSuchProcess, ProcessLookupError):
            continue
    return members


def test_ready_server_is_stopped_with_its_children(tmp_path):
    server = launch(tmp_path, "0.5")
    server.wait_healthy(timeout=20)
    deadline = time.monotonic() + 10
    while len(group_members(server.process.pid)) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(group_members(server.process.pid)) == 2  # the server and its child
    server.stop(grace=2)
    assert group_members(server.process.pid) == []


def test_a_server_that_never_gets_ready_times_out_with_its_log(tmp_path):
    server = launch(tmp_path, "60")
    with pytest.raises(ServerStartError, match=r"did not answer /health within 1 s(.|\n)*booting"):
        server.wait_healthy(timeout=1)
    server.stop(grace=1)
    assert group_members(server.process.pid) == []


def test_a_server_that_exits_is_reported_at_once(tmp_path):
    python = tmp_path / "python"
    python.write_text("#!/bin/sh\necho 'ImportError: no module named vllm' >&2\nexit 3\n")
    python.chmod(0o755)
    started = time.monotonic()
    with pytest.raises(ServerStartError, match=r"exited with status 3(.|\n)*no module named vllm"):
        start_servers("vllm", 2, tmp_path, tmp_path, tmp_path / "logs", python=str(python), max_model_len=64,
                      startup_timeout=60)
    assert time.monotonic() - started < 30
    assert (tmp_path / "logs" / "vllm_0.log").exists()


def test_commands_and_environment(tmp_path, monkeypatch):
    cmd = server_command("vllm", "py", tmp_path / "w", tmp_path / "tok", 8000, max_model_len=640, dtype="float32",
                         extra_args=["--enforce-eager"])
    assert cmd[:3] == ["py", "-m", "vllm.entrypoints.openai.api_server"]
    assert cmd[cmd.index("--logprobs-mode") + 1] == "processed_logprobs"
    assert cmd[cmd.index("--host") + 1] == "127.0.0.1" and cmd[-1] == "--enforce-eager"
    with pytest.raises(ValueError, match="rollout.backend"):
        server_command("tgi", "py", tmp_path, tmp_path, 1, max_model_len=1, dtype="float32")
    monkeypatch.setenv("WANDB_API_KEY", "secret-value")
    env = server_env("vllm")
    assert env["VLLM_SERVER_DEV_MODE"] == "1" and "WANDB_API_KEY" not in env
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="rollout.backend=sglang needs sglang installed"):
        find_server_python("sglang")
    with pytest.raises(FileNotFoundError, match="rollout.server_python"):
        find_server_python("vllm", str(tmp_path / "nope"))


def test_servers_die_with_a_killed_trainer(tmp_path):
    """SIGKILL of the process that started the servers (no cleanup runs): PR_SET_PDEATHSIG
    sends each server SIGTERM, and the server's own shutdown ends its children (vLLM's API
    server stops its engine core; this stand-in ends its process group)."""
    server = tmp_path / "server.py"
    server.write_text(
        "import os, signal, subprocess, sys\n"
        "port = sys.argv[sys.argv.index('--port') + 1]\n"
        "signal.signal(signal.SIGTERM, lambda *a: os.killpg(0, signal.SIGKILL))\n"
        f"subprocess.run([sys.executable, '-c', {SERVER!r}, port, '0'])\n"
    )
    python = tmp_path / "python"
    python.write_text(f"#!/bin/sh\nexec {sys.executable} {server} \"$@\"\n")
    python.chmod(0o755)
    trainer = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time; from engines.servers import start_servers; "
         f"g = start_servers('vllm', 1, sys.argv[1], sys.argv[1], sys.argv[1], python={str(python)!r}, max_model_len=8); "
         "print(g.servers[0].process.pid, flush=True); time.sleep(600)", str(tmp_path)],
        stdout=subprocess.PIPE, text=True, cwd=str(__import__("tests.conftest", fromlist=["REPO"]).REPO),
    )
    pgid = int(trainer.stdout.readline())
    try:
        assert len(group_members(pgid)) >= 2
        trainer.kill()
        trainer.wait()
        deadline = time.monotonic() + 15
        while group_members(pgid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert group_members(pgid) == []
    finally:  # a failing run must not leave its stand-in behind
        trainer.kill()
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass
