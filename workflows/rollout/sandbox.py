"""A sandbox for model-written Python: a separate process under resource limits.

`run_python(code, limits)` runs `code` as the `__main__` of a fresh interpreter
(`python -I`: no user site, no PYTHON* variables) in a new session, with

- `resource` rlimits set in the child before the code runs: RLIMIT_CPU (CPU seconds;
  SIGXCPU kills the process), RLIMIT_AS (bytes of address space; allocation raises
  MemoryError), RLIMIT_FSIZE (bytes per written file, output included), RLIMIT_NPROC
  (processes of this user: the count already running plus `max_processes`; the kernel
  does not apply it to root, so forks are also counted across the process tree and
  refused beyond `max_processes`), RLIMIT_CORE 0;
- a wall-clock timeout after which the whole process group is killed (SIGKILL), as it is
  after every run, so forked children never outlive the call;
- a fresh temporary directory as working directory and `HOME`, removed afterwards;
- an environment of `PATH`, `HOME`, `LANG` and `TMPDIR` only: no inherited secrets;
- no network where the OS allows an unprivileged network namespace (`unshare -rn`: a
  namespace with only a loopback interface, which is down), and in every case a Python
  audit hook (PEP 578) that refuses socket connections, writes, renames and deletions
  outside the directory, running other programs, and loading `ctypes`.

What it does NOT protect against (docs/multi_turn.md): the audit hook is not a security
boundary against native code (a C extension already installed can bypass it); without
`unshare` the network is reachable by native code; reading files the user can read is
allowed; RLIMIT_NPROC counts the user's processes machine-wide; the kernel, /proc and
side channels are shared. For untrusted models at scale use a container or VM sandbox.
"""

from __future__ import annotations

import asyncio
import functools
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

# The child's prologue: limits, then the audit hook, then the user's code. Kept as a
# string so the child runs nothing of this package (nothing it could import from us).
_PROLOGUE = r"""
import mmap, os, resource, runpy, struct, sys
cpu, mem, fsize, nproc, root, budget = (int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]),
                                        sys.argv[5], int(sys.argv[6]))
# One fork counter shared by the whole process tree (an anonymous shared mapping): the
# budget holds where RLIMIT_NPROC does not (root, whom the kernel exempts).
forks = mmap.mmap(-1, 8)
resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
resource.setrlimit(resource.RLIMIT_NPROC, (nproc, nproc))
resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
root = os.path.realpath(root)
def inside(path):
    try:
        p = os.path.realpath(os.fsdecode(path) if not isinstance(path, int) else "")
    except Exception:
        return False
    return p == root or p.startswith(root + os.sep)
WRITE_EVENTS = {"os.remove", "os.rename", "os.rmdir", "os.mkdir", "os.chmod", "os.chown", "os.link",
                "os.symlink", "os.truncate", "os.utime", "shutil.rmtree", "shutil.copyfile", "shutil.move"}
REFUSED = {"socket.connect", "socket.sendto", "socket.bind", "subprocess.Popen", "os.system", "os.exec",
           "os.posix_spawn", "os.spawn", "ctypes.dlopen", "ctypes.dlsym", "os.startfile", "pty.spawn"}
def hook(event, args):
    if event in ("os.fork", "os.forkpty"):
        n = struct.unpack_from("q", forks)[0]
        if n >= budget:
            raise PermissionError(f"sandbox: more than {budget} processes are not allowed")
        struct.pack_into("q", forks, 0, n + 1)
    elif event in REFUSED:
        raise PermissionError(f"sandbox: {event} is not allowed")
    if event == "import" and args and str(args[0]).split(".")[0] in ("ctypes", "_ctypes"):
        raise PermissionError("sandbox: ctypes is not allowed")
    if event == "open" and args and not isinstance(args[0], int):
        mode, flags = args[1], args[2]
        writes = (mode is not None and any(c in str(mode) for c in "wax+")) or (flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))
        if writes and not inside(args[0]):
            raise PermissionError(f"sandbox: writing outside the working directory is not allowed: {args[0]}")
    elif event in WRITE_EVENTS:
        paths = [a for a in args[:2] if isinstance(a, (str, bytes, os.PathLike))]
        if not all(inside(p) for p in paths):
            raise PermissionError(f"sandbox: {event} outside the working directory is not allowed")
sys.addaudithook(hook)
del hook
sys.argv = ["main.py"]
runpy.run_path("main.py", run_name="__main__")
"""

MAX_READ_BYTES = 1 << 20


@dataclass(frozen=True)
class SandboxLimits:
    """The sandbox's limits: `cpu_seconds` (CPU time, s), `memory_mb` (address space,
    MiB), `file_size_mb` (largest file written, stdout included, MiB), `max_processes`
    (processes the code may add), `wall_seconds` (wall clock, s), `output_chars`
    (characters of output returned), `block_network` (use a network namespace when the
    OS allows it)."""

    cpu_seconds: int = 5
    memory_mb: int = 512
    file_size_mb: int = 8
    max_processes: int = 16
    wall_seconds: float = 10.0
    output_chars: int = 2000
    block_network: bool = True


@dataclass(frozen=True)
class SandboxResult:
    """What a run did: `status` is "ok" (exit 0), "error" (a non-zero exit, e.g. an
    exception's traceback), "killed" (a signal, e.g. SIGXCPU at the CPU limit) or
    "timeout" (the wall clock); `output` is stdout and stderr interleaved, cut to
    `output_chars` (its middle dropped, `truncate_middle`); `seconds` the wall time."""

    status: str
    output: str
    returncode: int
    seconds: float
    truncated: bool

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def message(self) -> str:
        """The text the model is shown."""
        if self.status == "ok":
            return self.output
        head = {"error": f"error (exit status {self.returncode})",
                "killed": f"killed by {_signal_name(-self.returncode)} (a resource limit)",
                "timeout": "timed out (wall-clock limit)"}[self.status]
        return f"{head}\n{self.output}".rstrip()


def truncate_middle(text: str, limit: int) -> str:
    """`text` cut to `limit` characters by dropping its middle: the head shows what ran,
    the tail holds an exception's last lines, both of which the model needs."""
    if len(text) <= limit:
        return text
    head = limit // 2
    return f"{text[:head]}\n[... {len(text) - limit} characters cut ...]\n{text[len(text) - (limit - head):]}"


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


@functools.lru_cache(maxsize=1)
def network_namespace_available() -> bool:
    """Whether `unshare -rn` (an unprivileged user + network namespace) works here."""
    unshare = shutil.which("unshare")
    if unshare is None:
        return False
    try:
        return subprocess.run([unshare, "-rn", "true"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def _user_processes() -> int:
    uid, count = os.getuid(), 0
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                count += os.stat(f"/proc/{entry}").st_uid == uid
            except OSError:
                pass
    return count


def run_python(code: str, limits: SandboxLimits = SandboxLimits()) -> SandboxResult:
    """Run `code` in the sandbox described in the module docstring; never raises for
    anything the code does (errors, limits, timeouts are the result's `status`).

    Raises:
        OSError: the interpreter could not be started at all.
    """
    workdir = tempfile.mkdtemp(prefix="areal-sandbox-")
    try:
        with open(os.path.join(workdir, "main.py"), "w") as f:
            f.write(code)
        argv = [sys.executable, "-I", "-c", _PROLOGUE, str(limits.cpu_seconds), str(limits.memory_mb << 20),
                str(limits.file_size_mb << 20), str(_user_processes() + limits.max_processes), workdir, str(limits.max_processes)]
        if limits.block_network and network_namespace_available():
            argv = [shutil.which("unshare"), "-rn", "--", *argv]
        env = {"PATH": "/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8"}
        out_path = os.path.join(workdir, ".output")
        start = time.monotonic()
        with open(out_path, "wb") as out:
            proc = subprocess.Popen(argv, cwd=workdir, env=env, stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=subprocess.STDOUT, start_new_session=True)
            try:
                returncode = proc.wait(timeout=limits.wall_seconds)
                status = "ok" if returncode == 0 else ("killed" if returncode < 0 else "error")
            except subprocess.TimeoutExpired:
                status = "timeout"
            finally:
                # The whole session: a fork bomb's children are in it too.
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
                returncode = proc.wait()
        seconds = time.monotonic() - start
        with open(out_path, "rb") as f:
            raw = f.read(MAX_READ_BYTES)
        text = raw.decode("utf-8", errors="replace")
        truncated = len(text) > limits.output_chars
        if truncated:
            text = truncate_middle(text, limits.output_chars)
        return SandboxResult(status=status, output=text, returncode=returncode, seconds=seconds, truncated=truncated)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


async def arun_python(code: str, limits: SandboxLimits = SandboxLimits()) -> SandboxResult:
    """`run_python` on a worker thread, so the event loop (other episodes) goes on."""
    return await asyncio.to_thread(run_python, code, limits)
