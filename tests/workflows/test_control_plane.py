"""The one mapping from deployment mode to (store, acknowledgement policy), and the
colocated control plane's record / acknowledge / restore cycle."""

import pytest
import torch

from workflows.control_plane.metadata import InMemoryMetadataStore, NoOpMetadataStore
from workflows.control_plane.modes import resolve_control_plane, sample_ref
from workflows.control_plane.sqlite_store import SQLiteMetadataStore


def trajectory(prompt_id, versions, epoch=0):
    n = 2
    v = torch.full((n, 6), -1)
    v[:, 3:] = torch.tensor(versions)
    return {"prompt_id": torch.full((n,), prompt_id), "epoch": torch.full((n,), epoch), "versions": v}


@pytest.mark.parametrize(
    "mode, store, acks",
    [("local_colocated", NoOpMetadataStore, False), ("dataflow_colocated", SQLiteMetadataStore, True),
     ("disaggregated", SQLiteMetadataStore, True)],
)
def test_each_mode_resolves_to_its_store_and_ack_policy(tmp_path, mode, store, acks):
    control = resolve_control_plane(mode, tmp_path)
    assert type(control.store) is store and control.ack_at_optimizer_step is acks
    assert control.disaggregated is (mode == "disaggregated")
    control.close()


def test_unknown_mode_and_store_are_refused_with_the_valid_ones(tmp_path):
    with pytest.raises(ValueError, match="local_colocated, dataflow_colocated, disaggregated"):
        resolve_control_plane("colocated", tmp_path)
    with pytest.raises(ValueError, match="noop, memory, sqlite"):
        resolve_control_plane("dataflow_colocated", tmp_path, "redis")
    with pytest.raises(ValueError, match="use sqlite"):
        resolve_control_plane("disaggregated", tmp_path, "memory")
    assert type(resolve_control_plane("dataflow_colocated", tmp_path, "memory").store) is InMemoryMetadataStore


def test_sample_ref_takes_the_oldest_generated_version():
    ref = sample_ref(trajectory(7, [4, 3, 5], epoch=2), worker=1)
    assert (ref.sample_id, ref.version, ref.epoch, ref.prompt_id, ref.worker) == ("e2-p7", 3, 2, 7, 1)


def test_colocated_record_acknowledge_restore(tmp_path):
    control = resolve_control_plane("dataflow_colocated", tmp_path)
    for step in (1, 2, 3):
        control.record([trajectory(10 * step, [step - 1]), trajectory(10 * step + 1, [step - 1])])
        assert control.store.status().leased == 2
        control.acknowledge(step)
    assert control.cursor() == 6
    assert sorted(control.store.acked_steps().values()) == [1, 1, 2, 2, 3, 3]
    # Resume from the checkpoint of step 1: steps 2 and 3 are undone and, colocated,
    # their samples dropped (their tensors died with the process; they are generated again).
    assert control.restore(1) == 4
    assert control.store.status().committed == 2
    assert control.cursor() == 2
    control.reset()  # a fresh start forgets everything
    assert control.cursor() == 0 and not (tmp_path / "samples").exists()
    control.close()


def test_local_colocated_records_nothing(tmp_path):
    control = resolve_control_plane("local_colocated", tmp_path)
    control.record([trajectory(1, [0])])
    control.acknowledge(1)
    assert control.cursor() is None and not (tmp_path / "control").exists()
