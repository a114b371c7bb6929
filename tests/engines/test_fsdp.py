"""FSDP2 (`actor.parallelism=fsdp2`) with real torch.distributed: two gloo ranks on the CPU,
spawned as in test_distributed_lock.py, against the one-process engine."""

from __future__ import annotations

import datetime
import json
import math
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from engines.config import ActorConfig, ModelConfig, OptimizerConfig
from engines.distributed import DistributedContext
from engines.model import load_model
from engines.parallel import full_tensors
from engines.train_engine import TrainEngine
from tests.conftest import TINY_OVERRIDES
from tests.engines.test_train_engine import synthetic_batch
from workflows.training.recover import RecoverInfo, load_recover_checkpoint, save_recover_checkpoint

HOST = "127.0.0.1"
STEPS = 3


def make_engine(model_dir: str, parallelism: str, dist_ctx=None, device: str = "cpu", **actor) -> TrainEngine:
    torch.use_deterministic_algorithms(device == "cpu")
    model_cfg = ModelConfig(init_from_scratch=True, config_overrides=dict(TINY_OVERRIDES), device=device)
    model = load_model(model_cfg, Path(model_dir), seed=0)
    cfg = ActorConfig(optimizer=OptimizerConfig(lr=1e-2, weight_decay=0.0), parallelism=parallelism,
                      deterministic=device == "cpu", **actor)
    return TrainEngine(cfg, model, total_steps=STEPS, max_sequence_tokens=12, temperature=1.0, dist_ctx=dist_ctx)


def join(rank: int, world_size: int, port: int, backend: str = "gloo") -> DistributedContext:
    timeout = datetime.timedelta(seconds=60)
    store = dist.TCPStore(HOST, port, None, False, timeout=timeout)
    dist.init_process_group(backend, store=dist.PrefixStore("pg", store), rank=rank, world_size=world_size,
                            timeout=timeout)
    return DistributedContext(rank=rank, world_size=world_size, store=store)


def shard(batch: dict, rank: int, world_size: int) -> dict:
    return {k: v[rank::world_size] for k, v in batch.items()}


def _train_worker(rank: int, world_size: int, port: int, model_dir: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    ctx = join(rank, world_size, port)
    try:
        engine = make_engine(model_dir, "fsdp2", ctx)
        embedding = engine.model.get_input_embeddings().weight
        assert engine.sharded and embedding.to_local().shape[0] == embedding.shape[0] // world_size
        logp = engine.compute_logp(shard(synthetic_batch(seed=0), rank, world_size))
        losses, norms = [], []
        for step in range(STEPS):
            stats = engine.train_batch(shard(synthetic_batch(seed=step), rank, world_size))
            losses.append(stats.loss)
            norms.append(stats.grad_norm)
            if step == 0:
                engine.set_version(1)
                save_recover_checkpoint(Path(out_dir) / "written-by-2", engine, recover_info(1))
        weights = dict(full_tensors(engine.model))  # every rank takes part in each gather
        torch.save(logp, Path(out_dir) / f"logp{rank}.pt")
        if rank == 0:
            torch.save(weights, Path(out_dir) / "weights.pt")
            (Path(out_dir) / "stats.json").write_text(json.dumps({"losses": losses, "norms": norms}))
    finally:
        dist.destroy_process_group()


def recover_info(step: int) -> RecoverInfo:
    return RecoverInfo(step=step, total_steps=STEPS, stats_records=step, data_position={}, num_prompts=4)


def _resume_worker(rank: int, world_size: int, port: int, model_dir: str, source: str, step: int, out_dir: str) -> None:
    """Resume from `source`'s recover checkpoint, train batch `step` (0-based), and write
    a checkpoint of the result into `<out_dir>/written-by-<world_size>`."""
    torch.set_num_threads(1)
    ctx = join(rank, world_size, port)
    try:
        engine = make_engine(model_dir, "fsdp2", ctx)
        info = load_recover_checkpoint(Path(source) / "recover", engine, None)
        assert info.step == step and engine.get_version() == step
        stats = engine.train_batch(shard(synthetic_batch(seed=step), rank, world_size))
        engine.set_version(step + 1)
        save_recover_checkpoint(Path(out_dir) / f"written-by-{world_size}", engine, recover_info(step + 1))
        if rank == 0:
            Path(out_dir, f"resumed-{world_size}.json").write_text(json.dumps({"loss": stats.loss}))
    finally:
        dist.destroy_process_group()


def spawn(worker, world_size: int, *args) -> None:
    # The test process hosts the store; port 0 lets the OS pick a free port.
    store = dist.TCPStore(HOST, 0, None, True, timeout=datetime.timedelta(seconds=60), wait_for_workers=False)
    mp.spawn(worker, args=(world_size, store.port, *args), nprocs=world_size, join=True)


def test_two_fsdp2_ranks_train_as_one_process(tmp_path, model_dir):
    spawn(_train_worker, 2, str(model_dir), str(tmp_path))
    sharded = json.loads((tmp_path / "stats.json").read_text())

    torch.manual_seed(0)
    reference = make_engine(str(model_dir), "ddp")
    torch.use_deterministic_algorithms(False)
    logp = reference.compute_logp(synthetic_batch(seed=0))
    for rank in range(2):  # the sharded forward pass scores as the whole model does
        torch.testing.assert_close(torch.load(tmp_path / f"logp{rank}.pt"), shard({"x": logp}, rank, 2)["x"])
    losses, norms = [], []
    for step in range(STEPS):
        stats = reference.train_batch(synthetic_batch(seed=step))
        losses.append(stats.loss)
        norms.append(stats.grad_norm)
    assert sharded["losses"] == pytest.approx(losses, abs=1e-5)
    assert sharded["norms"] == pytest.approx(norms, rel=1e-4)
    weights = torch.load(tmp_path / "weights.pt")
    own = reference.model.state_dict()
    assert weights.keys() == own.keys()
    for name, tensor in weights.items():
        # Adam turns float rounding of near-zero gradients into a few 1e-6 against lr 1e-2.
        torch.testing.assert_close(tensor, own[name], atol=2e-5, rtol=1e-5)


@pytest.mark.slow  # three spawns of two processes (about 40 s here)
def test_a_sharded_checkpoint_resumes_at_another_rank_count(tmp_path, model_dir):
    """2 ranks write at step 1, 1 rank resumes and writes at step 2, 2 ranks resume: each
    resumed step's loss is the uninterrupted run's."""
    spawn(_train_worker, 2, str(model_dir), str(tmp_path))
    uninterrupted = json.loads((tmp_path / "stats.json").read_text())["losses"]
    checkpoint = tmp_path / "written-by-2"
    assert {p.name for p in (checkpoint / "recover" / "dcp").iterdir()} == {".metadata", "__0_0.distcp", "__1_0.distcp"}

    spawn(_resume_worker, 1, str(model_dir), str(checkpoint), 1, str(tmp_path))
    assert json.loads((tmp_path / "resumed-1.json").read_text())["loss"] == pytest.approx(uninterrupted[1], abs=1e-5)
    assert {p.name for p in (tmp_path / "written-by-1" / "recover" / "dcp").iterdir()} == {".metadata", "__0_0.distcp"}

    spawn(_resume_worker, 2, str(model_dir), str(tmp_path / "written-by-1"), 2, str(tmp_path))
    assert json.loads((tmp_path / "resumed-2.json").read_text())["loss"] == pytest.approx(uninterrupted[2], abs=1e-5)


def _gpu_worker(rank: int, world_size: int, port: int, model_dir: str, out_dir: str) -> None:
    ctx = join(rank, world_size, port, backend="nccl")
    try:
        engine = make_engine(model_dir, "fsdp2", ctx, device="cuda", mixed_precision="bf16")
        layer = engine.model.model.layers[0]
        seen = []  # the weight's dtype while the layer computes (gathered, cast by FSDP2)
        layer.self_attn.q_proj.register_forward_pre_hook(lambda module, args: seen.append(str(module.weight.dtype)))
        before = {n: t.float().cpu() for n, t in full_tensors(engine.model)}
        losses = [engine.train_batch(synthetic_batch(seed=step)).loss for step in range(STEPS)]
        after = dict(full_tensors(engine.model))
        report = {
            "losses": losses,
            "param_dtype": str(layer.self_attn.q_proj.weight.dtype),
            "compute_dtype": sorted(set(seen)),
            "on_cuda": all(t.is_cuda for t in after.values()),
            "changed": sum(not torch.equal(before[n], t.float().cpu()) for n, t in after.items()),
            "total": len(after),
        }
        Path(out_dir, "gpu.json").write_text(json.dumps(report))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (benchmarks/gpu_check.sh)")
def test_fsdp2_in_bf16_on_one_gpu(tmp_path, model_dir):
    """FSDP2 with NCCL on one GPU: bf16 compute over float32 sharded weights, 3 steps."""
    spawn(_gpu_worker, 1, str(model_dir), str(tmp_path))
    report = json.loads((tmp_path / "gpu.json").read_text())
    assert all(math.isfinite(loss) for loss in report["losses"])
    assert report["param_dtype"] == "torch.float32" and report["compute_dtype"] == ["torch.bfloat16"]
    assert report["on_cuda"] and report["changed"] == report["total"]
