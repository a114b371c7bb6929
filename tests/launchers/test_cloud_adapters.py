"""Modal and HF Jobs specifics: placement options, validation, and SDK signature drift."""

from __future__ import annotations

import inspect
import subprocess
import sys
from pathlib import Path

import pytest

from launchers import HFJobsExecutor, ModalExecutor, ReplicaSpec, ReplicaState
from tests.launchers.fakes import FakeHfApi, FakeModal


def py(code: str) -> list[str]:
    return [sys.executable, "-c", "import os, sys\n" + code]


PRINT_RENDEZVOUS = py("print('ADDR', os.environ.get('RANK'), os.environ.get('WORLD_SIZE'), "
                      "os.environ.get('MASTER_ADDR'), os.environ.get('MASTER_PORT'))")


def test_importing_launchers_imports_no_cloud_sdk():
    code = (
        "import sys, launchers, launchers.modal_backend, launchers.hf_jobs\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('modal', 'huggingface_hub')]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# ---------------------------------------------------------------------------------------
# Modal


def test_modal_builds_one_app_and_function_with_the_spec(tmp_path):
    fake = FakeModal(tmp_path)
    executor = ModalExecutor(fake, requirements=["torch==2.13.0"], poll_interval=0.02)
    spec = ReplicaSpec(entrypoint=py("pass"), gpu="A100", timeout=90.5, cpu=4, memory_mb=8192,
                       secrets={"WANDB_API_KEY": "k" * 12})
    handles = executor.launch_replicas(spec, 2, run_id="r1")
    names = [name for name, _ in executor.sdk_calls]
    assert names[:5] == ["modal.Image.debian_slim", "modal.Image.uv_pip_install", "modal.Image.add_local_python_source",
                         "modal.Secret.from_dict", "modal.App"]
    assert names.count("modal.Function.spawn") == 2
    options = dict(executor.sdk_calls)["modal.App.function"]
    assert options["gpu"] == "A100" and options["timeout"] == 91 and options["cpu"] == 4
    assert options["memory"] == 8192 and options["serialized"] is True
    assert dict(executor.sdk_calls)["modal.App"] == {"name": "areal-r1"}
    assert len({h.remote_id for h in handles}) == 2 and all(h.remote_id.startswith("fc-") for h in handles)
    assert executor.supports_inter_replica_network is False
    executor.collect(handles, timeout=30)


def test_modal_image_carries_the_package_data(tmp_path):
    # The config tree and the shipped GSM8K live inside the packages; Modal's default
    # filter would copy only .py files, so the adapter keeps everything but caches.
    modal = pytest.importorskip("modal")
    executor = ModalExecutor(FakeModal(tmp_path), requirements=[])
    (step,) = [s for s in executor.plan(ReplicaSpec(entrypoint=py("pass")), 1, run_id="r")["image"]
               if s["call"] == "add_local_python_source"]
    ignored = modal.FilePatternMatcher(*step["kwargs"]["ignore"])
    for kept in ("areal_cli/configs/smoke.yaml", "areal_cli/configs/model/tiny_random.yaml",
                 "workflows/data/gsm8k/train.jsonl", "workflows/data/gsm8k/LICENSE", "engines/model.py"):
        assert not ignored(Path(kept)), kept
    assert ignored(Path("engines/__pycache__/model.cpython-311.pyc"))


def test_modal_clustered_spawns_once_and_ranks_find_rank_zero(tmp_path):
    fake = FakeModal(tmp_path)
    executor = ModalExecutor(fake, clustered=True, requirements=[], poll_interval=0.02)
    assert executor.supports_inter_replica_network
    with pytest.raises(ValueError, match="--gpu"):
        executor.launch_replicas(ReplicaSpec(entrypoint=py("pass")), 2)
    handles = executor.launch_replicas(ReplicaSpec(entrypoint=PRINT_RENDEZVOUS, gpu="H100:8"), 2)
    assert [h.rank for h in handles] == [0, 1]
    assert handles[0].remote_id == handles[1].remote_id
    assert [name for name, _ in executor.sdk_calls].count("modal.Function.spawn") == 1
    assert dict(executor.sdk_calls)["modal.clustered"] == {"size": 2}
    results = executor.collect(handles, timeout=30)
    assert [r.state for r in results] == [ReplicaState.SUCCEEDED] * 2
    logs = "\n".join(executor.stream_logs(handles[0]))
    # Each container worked out its own rank and rank 0's IPv4 address.
    assert "ADDR 0 2 10.0.0.1 29500" in logs and "ADDR 1 2 10.0.0.1 29500" in logs


def test_modal_registry_image(tmp_path):
    executor = ModalExecutor(FakeModal(tmp_path), requirements=[], poll_interval=0.02)
    handles = executor.launch_replicas(ReplicaSpec(entrypoint=py("pass"), image="nvcr.io/nvidia/pytorch:25.01-py3"), 1)
    assert dict(executor.sdk_calls)["modal.Image.from_registry"] == {"add_python": "3.11"}
    executor.collect(handles, timeout=30)


# ---------------------------------------------------------------------------------------
# HF Jobs


def test_hf_unknown_flavor_names_the_valid_ones(tmp_path):
    pytest.importorskip("huggingface_hub")
    executor = HFJobsExecutor(FakeHfApi(tmp_path))
    with pytest.raises(ValueError, match=r"unknown HF Jobs flavor 'a100-huge'.*cpu-basic.*a10g-small"):
        executor.plan(ReplicaSpec(entrypoint=["true"], image="python:3.11", gpu="a100-huge"), 1)
    with pytest.raises(ValueError, match="--image"):
        executor.plan(ReplicaSpec(entrypoint=["true"]), 1)


def test_hf_jobs_join_one_network_group_and_rank_zero_is_master(tmp_path):
    pytest.importorskip("huggingface_hub")
    fake = FakeHfApi(tmp_path)
    executor = HFJobsExecutor(fake, poll_interval=0.02)
    assert executor.supports_inter_replica_network  # this huggingface_hub has network_group
    spec = ReplicaSpec(entrypoint=PRINT_RENDEZVOUS, image="python:3.11", gpu="a10g-small", timeout=120, name="smoke")
    handles = executor.launch_replicas(spec, 2, run_id="20260101-000000")
    calls = [kw for name, kw in executor.sdk_calls if name == "huggingface_hub.HfApi.run_job"]
    assert [c["network_group"] for c in calls] == ["smoke-20260101-000000"] * 2
    assert [c["network_aliases"] for c in calls] == [["master"], None]
    assert all(c["flavor"] == "a10g-small" and c["timeout"] == 120 for c in calls)
    assert handles[0].extras["url"].startswith("https://huggingface.co/jobs/areal-tester/")
    results = executor.collect(handles, timeout=30)
    assert [r.state for r in results] == [ReplicaState.SUCCEEDED] * 2
    for rank, handle in enumerate(handles):
        # The wrapper set MASTER_ADDR from the group prefix inside the "container".
        logs = "\n".join(executor.stream_logs(handle))
        assert f"ADDR {rank} 2 smoke-20260101-000000-master 29500" in logs


def test_hf_single_replica_needs_no_network(tmp_path):
    pytest.importorskip("huggingface_hub")
    executor = HFJobsExecutor(FakeHfApi(tmp_path))
    (kwargs,) = executor.plan(ReplicaSpec(entrypoint=["python", "x.py"], image="python:3.11"), 1)
    assert kwargs["command"] == ["python", "x.py"] and "network_group" not in kwargs
    assert kwargs["env"]["MASTER_ADDR"] == "127.0.0.1" and kwargs["flavor"] == "cpu-basic"


# ---------------------------------------------------------------------------------------
# Signature drift: every keyword the adapters pass must exist in the real SDK.


def _real_modal_targets():
    modal = pytest.importorskip("modal")
    return {
        "modal.Image.debian_slim": modal.Image.debian_slim,
        "modal.Image.from_registry": modal.Image.from_registry,
        "modal.Image.uv_pip_install": modal.Image.uv_pip_install,
        "modal.Image.add_local_python_source": modal.Image.add_local_python_source,
        "modal.Secret.from_dict": modal.Secret.from_dict,
        "modal.App": modal.App,
        "modal.App.function": modal.App.function,
        "modal.App.run": modal.App.run,
        "modal.clustered": modal.clustered,
        "modal.Function.spawn": modal.Function.spawn,
        "modal.FunctionCall.from_id": modal.FunctionCall.from_id,
        "modal.FunctionCall.get": modal.FunctionCall.get,
        "modal.FunctionCall.cancel": modal.FunctionCall.cancel,
        "modal.FunctionCall.logs.stream": inspect.signature(modal.FunctionCall.logs.fget).return_annotation.stream,
    }


def _real_hf_targets():
    hf = pytest.importorskip("huggingface_hub")
    return {
        "huggingface_hub.HfApi.run_job": hf.HfApi.run_job,
        "huggingface_hub.HfApi.inspect_job": hf.HfApi.inspect_job,
        "huggingface_hub.HfApi.fetch_job_logs": hf.HfApi.fetch_job_logs,
        "huggingface_hub.HfApi.cancel_job": hf.HfApi.cancel_job,
    }


def _exercise_modal(tmp_path):
    executor = ModalExecutor(FakeModal(tmp_path / "a"), requirements=["x"], poll_interval=0.02)
    spec = ReplicaSpec(entrypoint=py("sys.exit(1)"), gpu="A100", cpu=2, memory_mb=1024, secrets={"K_TOKEN": "abcd1234"})
    handles = executor.launch_replicas(spec, 2)
    executor.collect(handles, timeout=30)
    list(executor.stream_logs(handles[0]))
    clustered = ModalExecutor(FakeModal(tmp_path / "b"), clustered=True, requirements=["x"], poll_interval=0.02)
    handles = clustered.launch_replicas(ReplicaSpec(entrypoint=py("import time; time.sleep(30)"), gpu="H100:8",
                                                    image="python:3.11"), 2)
    clustered.cancel(handles[0])
    return executor.sdk_calls + clustered.sdk_calls


def _exercise_hf(tmp_path):
    executor = HFJobsExecutor(FakeHfApi(tmp_path), namespace="areal-tester", poll_interval=0.02)
    spec = ReplicaSpec(entrypoint=py("import time; time.sleep(30)"), image="python:3.11", secrets={"HF_TOKEN": "hf_x"})
    handles = executor.launch_replicas(spec, 2)
    for handle in handles:
        executor.cancel(handle)
    executor.collect(handles, timeout=30)
    executor.log_tail(handles[0])
    list(executor.stream_logs(handles[1]))
    return executor.sdk_calls


@pytest.mark.sdk
@pytest.mark.parametrize("sdk", ["modal", "huggingface_hub"])
def test_adapters_pass_only_keywords_the_real_sdk_accepts(sdk, tmp_path):
    targets = _real_modal_targets() if sdk == "modal" else _real_hf_targets()
    calls = _exercise_modal(tmp_path) if sdk == "modal" else _exercise_hf(tmp_path)
    assert calls, "the adapter recorded no SDK calls"
    seen = set()
    for name, kwargs in calls:
        assert name in targets, f"{name} is called by the adapter but not checked here; add it"
        seen.add(name)
        params = inspect.signature(targets[name]).parameters
        if any(p.kind is p.VAR_KEYWORD for p in params.values()):
            continue
        unknown = set(kwargs) - set(params)
        assert not unknown, f"{name} has no parameter(s) {sorted(unknown)} in the installed {sdk}"
    assert seen == set(targets), f"never exercised: {sorted(set(targets) - seen)}"
