"""Crash recovery pieces: the data position, the resumed loader, atomic checkpoints,
rolling back stats and dumps, RNG and optimizer state."""

import copy
import json
import random

import numpy as np
import pytest
import torch

from workflows.data.dataset import PromptDataset, PromptLoader, TrainedPrompts
from workflows.training.checkpoint_files import atomic_directory, remove_stale_temporaries
from workflows.training.recover import (
    RecoverInfo,
    capture_rng_state,
    drop_trajectory_dumps,
    find_recover_checkpoint,
    load_recover_checkpoint,
    read_recover_info,
    restore_rng_state,
    save_recover_checkpoint,
    truncate_records,
)


def dataset(n=10):
    # ids deliberately differ from row indices, as when malformed rows are skipped.
    return PromptDataset(rows=[{"id": 100 + 3 * i} for i in range(n)])


def flat(loader_epoch):
    return [(row["epoch"], row["id"]) for batch in loader_epoch for row in batch]


# -- TrainedPrompts ---------------------------------------------------------------------------


def test_trained_prompts_close_complete_epochs_and_refuse_duplicates():
    t = TrainedPrompts(epoch_size=3)
    assert t.update([(0, 1), (0, 2)]) == []
    assert t.update([(0, 2)]) == [(0, 2)]  # trained twice: reported, not counted
    assert t.open_epochs == {0: frozenset({1, 2})} and t.next_epoch == 1
    t.add(0, 3)
    assert t.open_epochs == {} and t.is_trained(0, 99)  # complete: every prompt trained
    assert not t.add(0, 5)
    t.add(2, 7)  # epoch 1 was skipped over: it stays open, with nothing trained
    assert t.open_epochs == {1: frozenset(), 2: frozenset({7})} and t.next_epoch == 3
    assert t.is_trained(2, 7) and not t.is_trained(2, 8) and not t.is_trained(3, 7)
    with pytest.raises(ValueError):
        t.add(-1, 0)


def test_trained_prompts_state_round_trips_through_json():
    t = TrainedPrompts(epoch_size=4)
    t.update([(0, 5), (0, 9), (1, 2)])
    state = json.loads(json.dumps(t.state_dict()))
    back = TrainedPrompts.from_state_dict(state)
    assert back.open_epochs == t.open_epochs and back.next_epoch == 2 and back.epoch_size == 4
    with pytest.raises(ValueError, match="malformed"):
        TrainedPrompts.from_state_dict({"open": {}})
    with pytest.raises(ValueError, match="outside"):
        TrainedPrompts.from_state_dict({"epoch_size": 4, "next_epoch": 1, "open": {"3": []}})


# -- the resumed loader --------------------------------------------------------------------------


def test_loader_tags_rows_with_their_epoch():
    loader = PromptLoader(dataset(), batch_size=3, shuffle=True, seed=5)
    first, second = flat(loader), flat(loader)
    assert {e for e, _ in first} == {0} and {e for e, _ in second} == {1}
    assert len(first) == loader.epoch_size == 9  # drop_last: 3 batches of 3
    assert [i for _, i in first] == [loader.dataset.rows[j]["id"] for j in loader.epoch_order(0)]


def test_resumed_loader_skips_exactly_the_trained_prompts_in_the_same_order():
    data = dataset(10)
    reference = PromptLoader(data, batch_size=3, shuffle=True, seed=5)
    epoch0, epoch1, epoch2 = flat(reference), flat(reference), flat(reference)
    # Asynchronous training: trained out of order, with in-flight prompts at the checkpoint.
    trained = TrainedPrompts(reference.epoch_size)
    trained.update([epoch0[0], epoch0[2], epoch0[3], epoch0[5]])
    resumed = PromptLoader(data, batch_size=3, shuffle=True, seed=5)
    resumed.resume(trained)
    batches = list(resumed)
    assert [len(b) for b in batches] == [3, 2]  # the resumed epoch's last batch is short
    assert flat(batches) == [epoch0[i] for i in (1, 4, 6, 7, 8)]  # untrained, original order
    assert flat(resumed) == epoch1 and flat(resumed) == epoch2  # later epochs untouched


def test_resume_across_an_epoch_boundary():
    data = dataset(6)
    reference = PromptLoader(data, batch_size=2, shuffle=True, seed=1)
    epoch0, epoch1, epoch2 = flat(reference), flat(reference), flat(reference)
    trained = TrainedPrompts(reference.epoch_size)
    # A batch straddled the boundary: the end of epoch 0 was still in flight while the
    # first prompts of epoch 1 were trained.
    trained.update(epoch0[:4] + epoch1[:1] + epoch1[2:3])
    resumed = PromptLoader(data, batch_size=2, shuffle=True, seed=1)
    resumed.resume(trained)
    assert flat(resumed) == epoch0[4:]
    assert flat(resumed) == [epoch1[1]] + epoch1[3:]
    assert flat(resumed) == epoch2
    # Together with the trained ones, every prompt of every epoch exactly once.
    trained.update(epoch0[4:] + [epoch1[1]] + epoch1[3:])
    assert trained.open_epochs == {} and trained.next_epoch == 2


@pytest.mark.parametrize("world_size", [2, 4])
def test_resumed_ranks_split_the_untrained_prompts_without_overlap(world_size):
    data = dataset(12)
    epoch0 = flat(PromptLoader(data, batch_size=4, shuffle=True, seed=3))
    trained = TrainedPrompts(12)
    trained.update(epoch0[:3] + epoch0[5:6])
    seen = []
    for rank in range(world_size):
        loader = PromptLoader(data, batch_size=4, shuffle=True, seed=3, rank=rank, world_size=world_size)
        loader.resume(trained)
        seen.append(flat(loader))
    union = [p for rank_rows in seen for p in rank_rows]
    assert sorted(union) == sorted(p for p in epoch0 if not trained.is_trained(*p))
    assert len(set(union)) == len(union)


# -- atomic checkpoints ------------------------------------------------------------------------


def test_atomic_directory_replaces_only_on_success(tmp_path):
    final = tmp_path / "recover"
    with atomic_directory(final) as tmp:
        (tmp / "a").write_text("1")
    assert (final / "a").read_text() == "1"
    with pytest.raises(RuntimeError):
        with atomic_directory(final) as tmp:
            (tmp / "a").write_text("2")
            raise RuntimeError("crash while writing")
    assert (final / "a").read_text() == "1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["recover"]  # no temporary left
    with atomic_directory(final) as tmp:
        (tmp / "b").write_text("3")
    assert sorted(p.name for p in final.iterdir()) == ["b"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["recover"]


def fake_checkpoint(path, step):
    (path / "model").mkdir(parents=True)
    (path / "model" / "model.safetensors").write_bytes(b"x")
    (path / "optimizer.pt").write_bytes(b"x")
    (path / "rng.pt").write_bytes(b"x")
    info = RecoverInfo(step=step, total_steps=9, stats_records=step, data_position={}, num_prompts=1)
    from dataclasses import asdict

    (path / "meta.json").write_text(json.dumps(asdict(info)))


def test_find_recover_checkpoint_never_takes_a_half_written_one(tmp_path):
    assert find_recover_checkpoint(tmp_path) is None
    fake_checkpoint(tmp_path / "recover.old", 3)
    # A crash between atomic_directory's two renames: only recover.old is left.
    assert find_recover_checkpoint(tmp_path) == tmp_path / "recover.old"
    (tmp_path / "recover").mkdir()
    (tmp_path / "recover" / "meta.json").write_text("{trunc")
    assert find_recover_checkpoint(tmp_path) == tmp_path / "recover.old"
    (tmp_path / "recover" / "meta.json").unlink()
    (tmp_path / "recover").rmdir()
    fake_checkpoint(tmp_path / "recover", 4)
    assert read_recover_info(find_recover_checkpoint(tmp_path)).step == 4
    (tmp_path / ".recover.tmp-123").mkdir()
    remove_stale_temporaries(tmp_path)
    assert not (tmp_path / ".recover.tmp-123").exists()


def test_truncate_records_and_drop_dumps(tmp_path):
    stats = tmp_path / "stats.jsonl"
    stats.write_text("".join(json.dumps({"step": s}) + "\n" for s in (1, 2, 3)) + '{"step": 4, "lo')
    assert truncate_records(stats, 2) == 2
    assert [json.loads(line)["step"] for line in stats.read_text().splitlines()] == [1, 2]
    assert truncate_records(stats, 2) == 0
    with pytest.raises(ValueError, match="has 2 records"):
        truncate_records(stats, 5)
    assert truncate_records(tmp_path / "missing.jsonl", 0) == 0
    dumps = tmp_path / "trajectories"
    dumps.mkdir()
    for v in (0, 1, 2, 10):
        (dumps / f"{v}.jsonl").write_text("{}\n")
    assert drop_trajectory_dumps(dumps, from_version=2) == 2
    assert sorted(p.name for p in dumps.iterdir()) == ["0.jsonl", "1.jsonl"]


def test_rng_state_round_trip(tmp_path):
    state = capture_rng_state()
    torch.save(state, tmp_path / "rng.pt")
    expected = (random.random(), np.random.rand(), torch.rand(3))
    random.seed(99), np.random.seed(99), torch.manual_seed(99)
    restore_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    got = (random.random(), np.random.rand(), torch.rand(3))
    assert got[:2] == expected[:2] and torch.equal(got[2], expected[2])


# -- a whole checkpoint through the engine -----------------------------------------------------


def test_recover_checkpoint_restores_weights_optimizer_and_versions(tmp_path, tiny_model):
    from engines.inference import LocalInferenceEngine
    from tests.engines.test_train_engine import make_engine, synthetic_batch

    twin = copy.deepcopy(tiny_model)
    engine = make_engine(tiny_model)
    batch = synthetic_batch()
    batch["logprobs"] = engine.compute_logp(batch)
    engine.train_batch(batch)
    engine.set_version(1)
    info = RecoverInfo(step=1, total_steps=4, stats_records=1, data_position={}, num_prompts=1)
    path = save_recover_checkpoint(tmp_path, engine, info)
    expected = engine.train_batch(batch)  # the step an uninterrupted run takes next

    restored = make_engine(twin)
    inference = LocalInferenceEngine(copy.deepcopy(twin), eos_token_id=0, pad_token_id=0)
    try:
        assert load_recover_checkpoint(path, restored, inference).step == 1
        assert restored.get_version() == inference.get_version() == 1
        for k, v in inference.model.state_dict().items():
            assert torch.equal(v, twin.state_dict()[k]), k
        got = restored.train_batch(batch)
    finally:
        inference.destroy()
    assert (got.loss, got.grad_norm, got.lr) == (expected.loss, expected.grad_norm, expected.lr)
    for k, v in tiny_model.state_dict().items():
        assert torch.equal(v, twin.state_dict()[k]), k
