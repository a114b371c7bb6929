"""The ServerlessExecutor contract, checked on all three backends.

Local runs real subprocesses; Modal and HF Jobs run through fakes at the SDK boundary
(tests/launchers/fakes.py) that also execute the replica for real.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time

import pytest

from launchers import (
    ReplicaHandle,
    ReplicaSpec,
    ReplicaState,
    ServerlessExecutor,
    redact,
)
from tests.launchers.conftest import process_alive

SECRET = "hf_abcdefghijklmnopqrstuvwxyz0123"
SECRET_SHA = hashlib.sha256(SECRET.encode()).hexdigest()


def py(code: str) -> list[str]:
    return [sys.executable, "-c", "import os, sys, time\n" + code]


def test_is_a_serverless_executor(backend):
    assert isinstance(backend.executor, ServerlessExecutor)
    assert backend.executor.backend_name == backend.name


def test_ranks_in_order_with_their_environment(backend):
    spec = ReplicaSpec(
        entrypoint=py('print(f"rank={os.environ[\'RANK\']} world={os.environ[\'WORLD_SIZE\']} '
                      'local={os.environ[\'LOCAL_RANK\']}")'),
        env={"AREAL_TEST": "1"},
        **backend.spec_kwargs(),
    )
    handles = backend.executor.launch_replicas(spec, 3)
    assert [h.rank for h in handles] == [0, 1, 2]
    results = backend.executor.collect(handles, timeout=30)
    assert [r.rank for r in results] == [0, 1, 2]
    assert [r.state for r in results] == [ReplicaState.SUCCEEDED] * 3
    assert [r.exit_code for r in results] == [0, 0, 0]
    for handle in handles:
        logs = "\n".join(backend.executor.stream_logs(handle))
        # All local replicas share one machine; cloud backends give each its own node.
        local_rank = handle.rank if backend.name == "local" else 0
        assert f"rank={handle.rank} world=3 local={local_rank}" in logs


def test_failure_reports_exit_code_and_log_tail(backend):
    spec = ReplicaSpec(
        entrypoint=py(
            "rank = int(os.environ['RANK'])\n"
            "if rank == 1:\n"
            "    time.sleep(0.3); print('something broke on rank one', flush=True); sys.exit(3)\n"
        ),
        **backend.spec_kwargs(),
    )
    handles = backend.executor.launch_replicas(spec, 2)
    results = backend.executor.collect(handles, timeout=30)
    assert results[0].state is ReplicaState.SUCCEEDED
    assert results[1].state is ReplicaState.FAILED
    assert results[1].exit_code == (3 if backend.reports_exit_codes else None)
    assert "something broke on rank one" in results[1].error


def test_fail_fast_cancels_the_others(backend):
    spec = ReplicaSpec(
        entrypoint=py("if os.environ['RANK'] == '1': sys.exit(5)\ntime.sleep(60)"),
        **backend.spec_kwargs(),
    )
    handles = backend.executor.launch_replicas(spec, 2)
    start = time.monotonic()
    results = backend.executor.collect(handles, timeout=30)
    assert time.monotonic() - start < 10
    assert [r.state for r in results] == [ReplicaState.CANCELLED, ReplicaState.FAILED]


def test_cancel(backend):
    spec = ReplicaSpec(entrypoint=py("time.sleep(60)"), **backend.spec_kwargs())
    handles = backend.executor.launch_replicas(spec, 2)
    backend.executor.cancel(handles[0])
    assert backend.executor.poll(handles[0]).state is ReplicaState.CANCELLED
    assert backend.executor.poll(handles[1]).state in (ReplicaState.PENDING, ReplicaState.RUNNING)
    backend.executor.cancel(handles[1])
    results = backend.executor.collect(handles, timeout=10)
    assert [r.state for r in results] == [ReplicaState.CANCELLED] * 2
    assert not any(process_alive(pid) for pid in backend.pids(handles))


def test_handles_round_trip_and_reattach(backend):
    spec = ReplicaSpec(entrypoint=py("time.sleep(60)"), **backend.spec_kwargs())
    handles = backend.executor.launch_replicas(spec, 2)
    text = json.dumps([h.to_dict() for h in handles])
    restored = [ReplicaHandle.from_dict(d) for d in json.loads(text)]
    assert restored == handles
    # A fresh executor, as `areal launch status/cancel RUN` builds one in another process.
    other = backend.make()
    assert [other.poll(h).state for h in restored] == [ReplicaState.RUNNING] * 2
    for h in restored:
        other.cancel(h)
    deadline = time.monotonic() + 5
    while any(process_alive(pid) for pid in backend.pids(handles)) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not any(process_alive(pid) for pid in backend.pids(handles))
    assert [other.poll(h) for h in restored] and all(other.poll(h).state.terminal for h in restored)


def test_secrets_reach_the_replica_but_are_never_shown(backend):
    spec = ReplicaSpec(
        entrypoint=py(
            # Compare digests: the secret itself must not appear in the argv.
            "import hashlib\n"
            f"ok = hashlib.sha256(os.environ.get('HF_TOKEN', '').encode()).hexdigest() == {SECRET_SHA!r}\n"
            "print('token is', os.environ.get('HF_TOKEN'), flush=True)\n"
            "if os.environ['RANK'] != '0': time.sleep(0.5)  # after rank 0 is done, so no fail-fast\n"
            "sys.exit(0 if ok and os.environ['RANK'] == '0' else 4)"
        ),
        secrets={"HF_TOKEN": SECRET},
        **backend.spec_kwargs(),
    )
    assert SECRET not in repr(spec)
    assert SECRET not in json.dumps(spec.public_dict())
    plan = backend.executor.plan(spec, 2)
    assert SECRET not in json.dumps(redact(plan), default=str)
    handles = backend.executor.launch_replicas(spec, 2)
    assert SECRET not in json.dumps([h.to_dict() for h in handles])
    results = backend.executor.collect(handles, timeout=30)
    # Rank 0 exits 0 only if it saw the secret, so delivery is proven.
    assert results[0].state is ReplicaState.SUCCEEDED
    assert results[1].state is ReplicaState.FAILED
    assert "token is" in results[1].error
    assert SECRET not in results[1].error
    logs = "\n".join(backend.executor.stream_logs(handles[0]))
    assert "token is ***" in logs and SECRET not in logs


def test_redact_covers_env_names_and_token_formats():
    data = {
        "env": {"WANDB_API_KEY": "abc123456", "MODAL_TOKEN_SECRET": "as-xyz", "PLAIN": "visible"},
        "argv": ["python", "HF_TOKEN=zzz", "model.tokenizer_path=/tmp/tok"],
        "note": "token hf_ABCDEFGHIJKLMNOPQRSTUVWX and ak-0123456789abcdef0123 leaked",
    }
    out = redact(data, ["visible-secret-value"])
    assert out["env"] == {"WANDB_API_KEY": "***", "MODAL_TOKEN_SECRET": "***", "PLAIN": "visible"}
    assert out["argv"] == ["python", "HF_TOKEN=***", "model.tokenizer_path=/tmp/tok"]
    assert out["note"] == "token *** and *** leaked"
    assert redact("the visible-secret-value here", ["visible-secret-value"]) == "the *** here"


@pytest.mark.parametrize("n", [0, -1])
def test_bad_replica_count_is_refused(backend, n):
    spec = ReplicaSpec(entrypoint=py("pass"), **backend.spec_kwargs())
    with pytest.raises(ValueError, match="--replicas"):
        backend.executor.launch_replicas(spec, n)
