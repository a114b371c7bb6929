import math
import os
import random

import numpy as np
import pytest
import torch

from engines.config import ActorConfig, OptimizerConfig
from engines.factories import (
    build_ac_config,
    create_lr_scheduler,
    create_optimizer,
    lr_multiplier,
    setup_deterministic_mode,
    validate_and_force_pad_to_maximum,
)


def params():
    return [torch.nn.Parameter(torch.ones(3))]


def test_adamw_and_sgd_get_their_settings():
    cfg = OptimizerConfig(type="adamw", lr=0.1, beta1=0.8, beta2=0.9, eps=1e-5, weight_decay=0.3)
    opt = create_optimizer(params(), cfg)
    assert isinstance(opt, torch.optim.AdamW)
    group = opt.param_groups[0]
    assert group["betas"] == (0.8, 0.9) and group["eps"] == 1e-5 and group["weight_decay"] == 0.3
    assert isinstance(create_optimizer(params(), OptimizerConfig(type="SGD", lr=0.1)), torch.optim.SGD)


def test_unknown_optimizer_names_valid_types():
    with pytest.raises(ValueError, match="adamw, sgd"):
        create_optimizer(params(), OptimizerConfig(type="lion"))


def lrs(kind, total=10, warmup=0.0, floor=0.0):
    cfg = OptimizerConfig(lr=1.0, lr_scheduler_type=kind, warmup_steps_proportion=warmup, min_lr_ratio=floor)
    opt = create_optimizer(params(), cfg)
    sched = create_lr_scheduler(opt, cfg, total_steps=total)
    out = []
    for _ in range(total):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_constant_with_warmup():
    assert lrs("constant", total=10, warmup=0.2) == pytest.approx([0.5, 1.0] + [1.0] * 8)


def test_linear_decays_to_floor():
    values = lrs("linear", total=10, floor=0.1)
    assert values[0] == pytest.approx(1.0)
    # step 5 of 10: halfway, 0.1 + 0.9 * 0.5
    assert values[5] == pytest.approx(0.55)
    assert lr_multiplier(10, total_steps=10, warmup_steps=0, kind="linear", min_lr_ratio=0.1) == pytest.approx(0.1)


def test_cosine_shape_and_floor():
    values = lrs("cosine", total=8, warmup=0.25, floor=0.2)
    assert values[:2] == pytest.approx([0.5, 1.0])
    # after warm-up (2 steps), 6 decay steps: step 5 is halfway -> 0.2 + 0.8 * 0.5
    assert values[5] == pytest.approx(0.6)
    assert all(a >= b for a, b in zip(values[1:], values[2:]))
    end = lr_multiplier(8, total_steps=8, warmup_steps=2, kind="cosine", min_lr_ratio=0.2)
    assert end == pytest.approx(0.2)
    assert values[3] == pytest.approx(0.2 + 0.8 * 0.5 * (1 + math.cos(math.pi / 6)))


def test_unknown_scheduler_and_bad_floor():
    opt = create_optimizer(params(), OptimizerConfig())
    with pytest.raises(ValueError, match="constant, linear, cosine"):
        create_lr_scheduler(opt, OptimizerConfig(lr_scheduler_type="step"), total_steps=5)
    with pytest.raises(ValueError, match="min_lr_ratio"):
        create_lr_scheduler(opt, OptimizerConfig(min_lr_ratio=1.5), total_steps=5)


def test_activation_checkpointing_covers_decoder_layers_and_keeps_gradients(tiny_model):
    import copy

    plain = copy.deepcopy(tiny_model)
    assert build_ac_config(plain, enabled=False) == []
    layers = build_ac_config(tiny_model, enabled=True)
    assert len(layers) == tiny_model.config.num_hidden_layers
    assert all(layer.gradient_checkpointing for layer in layers)
    ids = torch.randint(0, 1000, (2, 12))
    grads = []
    for model in (plain, tiny_model):
        model.train()
        model(input_ids=ids, labels=ids).loss.backward()
        grads.append(model.model.layers[0].mlp.up_proj.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1])


def test_deterministic_mode_seeds_everything_and_sets_flags():
    was = torch.are_deterministic_algorithms_enabled()
    try:
        setup_deterministic_mode(123, enabled=True)
        first = (random.random(), np.random.rand(), torch.rand(1).item())
        setup_deterministic_mode(123, enabled=True)
        assert (random.random(), np.random.rand(), torch.rand(1).item()) == first
        assert torch.are_deterministic_algorithms_enabled()
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"]
    finally:
        torch.use_deterministic_algorithms(was)


def test_pad_to_maximum_validation():
    cfg = ActorConfig(max_tokens_per_mb=100)
    with pytest.raises(ValueError, match="max_tokens_per_mb=100"):
        validate_and_force_pad_to_maximum(cfg, max_sequence_tokens=200)
    assert validate_and_force_pad_to_maximum(cfg, max_sequence_tokens=80) == 0
    det = ActorConfig(max_tokens_per_mb=100, deterministic=True)
    assert validate_and_force_pad_to_maximum(det, max_sequence_tokens=80) == 80
    assert det.pad_to_maximum


def test_cpu_threads_are_shared_among_local_replicas(monkeypatch):
    from engines.factories import setup_cpu_threads

    before = torch.get_num_threads()
    cpus = len(os.sched_getaffinity(0))
    try:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
        assert setup_cpu_threads() == cpus
        monkeypatch.setenv("LOCAL_WORLD_SIZE", str(cpus * 2))  # more replicas than cores
        assert setup_cpu_threads() == 1
        torch.set_num_threads(cpus)
        monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the user's explicit choice is kept
        assert setup_cpu_threads() == cpus
    finally:
        torch.set_num_threads(before)


def test_setup_malloc_applies_on_glibc():
    import platform

    from engines.factories import setup_malloc

    # Restating glibc's default thresholds would be the same call; only success matters.
    expected = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
    assert setup_malloc() is expected


def test_mixed_precision_modes(monkeypatch):
    import engines.factories as factories

    assert factories.resolve_mixed_precision("none") is None
    assert factories.resolve_mixed_precision("bf16") is torch.bfloat16
    monkeypatch.setattr(factories, "native_bf16", lambda: False)
    assert factories.resolve_mixed_precision("auto") is None
    monkeypatch.setattr(factories, "native_bf16", lambda: True)
    assert factories.resolve_mixed_precision("auto") is torch.bfloat16
    with pytest.raises(ValueError, match="actor.mixed_precision='fp8'"):
        factories.resolve_mixed_precision("fp8")


def test_native_bf16_follows_the_cpu_flags(monkeypatch):
    import engines.factories as factories

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    assert not factories.native_bf16()
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    assert factories.native_bf16()
