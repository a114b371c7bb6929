"""Device placement (`model.device`) and the training loop's host reads.

On a GPU every read of a tensor's value from Python (`.item()`, `float(t)`, `.tolist()`)
makes the host wait for the device; the trainer reads once per optimizer step, not once
per micro-batch. CI has no GPU: the CUDA test below runs only where one is visible.
"""

import contextlib
import copy
import sys
from pathlib import Path

import pytest
import torch

import engines
from engines.config import ActorConfig, ModelConfig, OptimizerConfig
from engines.factories import resolve_device
from engines.inference import GenerationRequest, LocalInferenceEngine
from engines.model import load_model
from engines.train_engine import TrainEngine
from tests.conftest import TINY_OVERRIDES
from tests.engines.test_train_engine import synthetic_batch


def test_auto_and_cpu_resolve_to_this_machine():
    assert resolve_device("cpu") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible")
def test_cuda_without_a_gpu_names_the_key():
    with pytest.raises(ValueError, match="model.device=cuda"):
        resolve_device("cuda")


def test_unknown_device_is_refused():
    with pytest.raises(ValueError, match="model.device='tpu'"):
        resolve_device("tpu")


ENGINES = str(Path(engines.__file__).parent)


@contextlib.contextmanager
def counting_host_reads():
    """Counts the calls made from areal's engines that copy a tensor's value to Python.
    (transformers' SDPA mask asks `mask.all()` once per forward pass; that is its own.)"""
    counts = {"n": 0}
    names = ("item", "tolist", "__float__", "__int__", "__bool__")
    originals = {name: getattr(torch.Tensor, name) for name in names}

    def wrap(fn):
        def counted(self, *args, **kwargs):
            if sys._getframe(1).f_code.co_filename.startswith(ENGINES):
                counts["n"] += 1
            return fn(self, *args, **kwargs)

        return counted

    for name, fn in originals.items():
        setattr(torch.Tensor, name, wrap(fn))
    try:
        yield counts
    finally:
        for name, fn in originals.items():
            setattr(torch.Tensor, name, fn)


def host_reads_of_one_update(model, max_tokens_per_mb: int) -> int:
    cfg = ActorConfig(optimizer=OptimizerConfig(lr=1e-3, weight_decay=0.0), max_tokens_per_mb=max_tokens_per_mb)
    engine = TrainEngine(cfg, model, total_steps=2, max_sequence_tokens=12, temperature=1.0)
    batch = synthetic_batch()
    batch["logprobs"] = engine.compute_logp(batch)
    engine.train_batch(batch)  # the optimizer's lazy state is created on the first step
    with counting_host_reads() as counts:
        engine.train_batch(batch)
    assert len(engine._micro_batches(batch)) == (1 if max_tokens_per_mb >= 48 else 4)
    return counts["n"]


def test_host_reads_do_not_grow_with_the_number_of_micro_batches(tiny_model):
    one = host_reads_of_one_update(copy.deepcopy(tiny_model), max_tokens_per_mb=64)
    four = host_reads_of_one_update(tiny_model, max_tokens_per_mb=12)
    assert four == one


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_train_and_generate_on_cuda(model_dir):
    model = load_model(ModelConfig(init_from_scratch=True, config_overrides=dict(TINY_OVERRIDES), device="cuda"),
                       model_dir, seed=0)
    assert next(model.parameters()).is_cuda
    engine = TrainEngine(ActorConfig(mixed_precision="auto"), model, total_steps=1, max_sequence_tokens=12,
                         temperature=1.0)
    batch = synthetic_batch()
    batch["logprobs"] = engine.compute_logp(batch)
    assert batch["logprobs"].device.type == "cpu"
    stats = engine.train_batch(batch)
    assert stats.grad_norm > 0 and torch.isfinite(torch.tensor(stats.loss))
    sampler = LocalInferenceEngine(copy.deepcopy(model), eos_token_id=0, pad_token_id=0)
    [response] = sampler.generate([GenerationRequest(input_ids=[5, 6, 7], max_new_tokens=4)])
    assert len(response.output_ids) == len(response.output_logprobs) >= 1
    sampler.destroy()
