"""LoRA through peft (engines/lora.py) in the training engine, on a tiny random model of
SmolLM2's architecture: what trains, the KL reference, merged weight sync, checkpoints and
the export."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

from engines.config import ActorConfig, LoraConfig, OptimizerConfig
from engines.inference import LocalInferenceEngine
from engines.logprobs import token_logprobs
from engines.lora import ADAPTER_WEIGHTS, is_adapter_dir
from engines.lora_merge import base_name, merged_state_dict
from engines.train_engine import TrainEngine
from engines.weights import load_published, publish_weights
from tests.engines.test_train_engine import synthetic_batch


def lora_engine(model, *, kl_ctl=0.0, **lora) -> TrainEngine:
    cfg = ActorConfig(optimizer=OptimizerConfig(lr=1e-2, weight_decay=0.0), kl_ctl=kl_ctl,
                      lora=LoraConfig(enabled=True, rank=4, alpha=8.0, **lora))
    return TrainEngine(cfg, model, total_steps=4, max_sequence_tokens=12, temperature=1.0)


def trained(model, steps=1, **lora) -> TrainEngine:
    """An engine whose adapters have moved away from B = 0 (the base model)."""
    engine = lora_engine(model, **lora)
    batch = synthetic_batch()
    for _ in range(steps):
        engine.train_batch(dict(batch, logprobs=engine.compute_logp(batch)))
    return engine


def lora_names(model) -> set[str]:
    return {n for n, _ in model.named_parameters() if ".lora_A." in n or ".lora_B." in n}


def test_only_adapters_train_and_are_in_the_optimizer(tiny_model):
    base = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    engine = trained(tiny_model, steps=2)
    trainable = {n for n, p in tiny_model.named_parameters() if p.requires_grad}
    assert trainable and trainable == lora_names(tiny_model)
    in_optimizer = {id(p) for group in engine.optimizer.param_groups for p in group["params"]}
    assert in_optimizer == {id(p) for n, p in tiny_model.named_parameters() if n in trainable}
    # Every base tensor is bit-identical after two optimizer steps; the B matrices moved.
    frozen = {base_name(k): v for k, v in tiny_model.state_dict().items() if ".lora_" not in k}
    assert set(frozen) == set(base) and all(torch.equal(frozen[k], v) for k, v in base.items())
    moved = [n for n, p in tiny_model.named_parameters() if ".lora_B." in n and p.abs().sum() > 0]
    assert len(moved) == len([n for n in trainable if ".lora_B." in n])


def test_target_modules_choose_the_adapted_layers(tiny_model):
    lora_engine(tiny_model, target_modules=["q_proj", "v_proj"])
    adapted = {n.split(".lora_A.")[0].rsplit(".", 1)[1] for n in lora_names(tiny_model) if ".lora_A." in n}
    assert adapted == {"q_proj", "v_proj"}


def test_unknown_target_modules_are_refused(tiny_model):
    with pytest.raises(ValueError, match="not_a_layer"):
        lora_engine(tiny_model, target_modules=["not_a_layer"])


def test_the_kl_reference_is_the_base_model(tiny_model):
    base = copy.deepcopy(tiny_model).eval()
    engine = trained(tiny_model, steps=2)
    batch = synthetic_batch()
    reference = engine.compute_ref_logp(batch)
    with torch.no_grad():
        expected = token_logprobs(base, batch["input_ids"], batch["attention_mask"], 1.0, batch["loss_mask"])
    torch.testing.assert_close(reference, expected, atol=1e-6, rtol=0)
    # ... and the adapters are back on afterwards: the policy differs from the base.
    assert (engine.compute_logp(batch) - reference).abs().max() > 1e-4


def test_the_kl_term_needs_no_copy_of_the_model(tiny_model):
    engine = lora_engine(tiny_model, kl_ctl=0.1)
    assert engine.ref_model is None
    batch = synthetic_batch()
    batch["logprobs"] = engine.compute_logp(batch)
    batch["ref_logp"] = engine.compute_ref_logp(batch)
    first = engine.train_batch(batch)
    assert first.kl == pytest.approx(0.0, abs=1e-9)  # B = 0: policy and reference agree
    batch["ref_logp"] = engine.compute_ref_logp(batch)
    assert engine.train_batch(batch).kl > 0


def test_the_sampler_receives_peft_merged_weights(tiny_model):
    sampler = LocalInferenceEngine(copy.deepcopy(tiny_model), eos_token_id=2, pad_token_id=2)
    try:
        engine = trained(tiny_model, steps=2)
        with torch.no_grad():
            lora_param = next(p for n, p in tiny_model.named_parameters() if ".lora_A." in n)
            snapshot = {k: v.clone() for k, v in tiny_model.state_dict().items()}
        engine.upload_weights(sampler, version=1)
        expected = copy.deepcopy(engine.lora.peft).merge_and_unload().state_dict()
        got = sampler.model.state_dict()
        assert set(got) == set(expected)
        for key in expected:
            assert torch.equal(got[key], expected[key]), key
        # The trained model is untouched by the merge: still unmerged, same tensors.
        assert all(torch.equal(v, snapshot[k]) for k, v in tiny_model.state_dict().items())
        assert lora_param.requires_grad
    finally:
        sampler.destroy()


def test_servers_get_merged_weights_under_the_base_names(tiny_model, tmp_path):
    names = set(tiny_model.state_dict())
    engine = trained(tiny_model)
    published = load_published(publish_weights(engine.model, tmp_path, version=1))
    merged = merged_state_dict(tiny_model)
    assert set(published) == names | {"lm_head.weight"}
    assert all(torch.equal(published[k], merged[k]) for k in merged)


def test_the_recover_checkpoint_holds_only_the_adapters_and_restores_them(tiny_model, model_dir, tmp_path):
    from engines.config import ModelConfig
    from engines.model import load_model
    from tests.conftest import TINY_OVERRIDES

    engine = trained(tiny_model, steps=2)
    engine.save(tmp_path / "model", adapters_only=True)
    assert is_adapter_dir(tmp_path / "model")
    adapter_bytes = (tmp_path / "model" / ADAPTER_WEIGHTS).stat().st_size
    full_bytes = sum(p.numel() * 4 for p in tiny_model.parameters() if not p.requires_grad)
    assert adapter_bytes < full_bytes / 4
    fresh = load_model(ModelConfig(init_from_scratch=True, config_overrides=dict(TINY_OVERRIDES)), model_dir, seed=0)
    resumed = lora_engine(fresh)
    resumed.load(tmp_path / "model")
    ours, theirs = dict(tiny_model.named_parameters()), dict(fresh.named_parameters())
    assert all(torch.equal(ours[n], theirs[n]) for n in lora_names(tiny_model))
    batch = synthetic_batch()
    torch.testing.assert_close(resumed.compute_logp(batch), engine.compute_logp(batch), atol=0, rtol=0)


def test_a_full_weight_checkpoint_is_refused_by_a_lora_run(tiny_model, tmp_path):
    copy.deepcopy(tiny_model).save_pretrained(tmp_path / "full")
    engine = lora_engine(tiny_model)
    with pytest.raises(ValueError, match="not LoRA adapters"):
        engine.load(tmp_path / "full")


def test_the_export_is_a_plain_model_with_the_merged_logits(tiny_model, tmp_path):
    engine = trained(tiny_model, steps=2)
    engine.save(tmp_path / "export")
    assert not is_adapter_dir(tmp_path / "export")
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "export").eval()
    merged = copy.deepcopy(engine.lora.peft).merge_and_unload().eval()
    ids = synthetic_batch()["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(exported(ids).logits, merged(ids).logits, atol=1e-6, rtol=0)
    assert not any("lora" in n for n in exported.state_dict())


def test_vllm_loads_the_adapters_and_then_samples_from_them(tiny_model, tmp_path):
    from engines.inference import GenerationRequest
    from engines.remote_vllm import LORA_ADAPTER_NAME, SERVED_MODEL_NAME, RemoteVLLMEngine
    from tests.engines.http_replay import ReplayServer, fixture, replay

    server = ReplayServer({
        "/v1/load_lora_adapter": replay(f"Success: LoRA adapter '{LORA_ADAPTER_NAME}' added successfully."),
        "/reset_prefix_cache": replay(None),
        "/v1/completions": replay(fixture("vllm", "completion_length")["response"]),
    }).start()
    client = RemoteVLLMEngine([server.address], weights_dir=tmp_path / "weights", retry_backoff=0.01)
    try:
        engine = trained(tiny_model, sync="adapters")
        prompt = [1, 9690, 198]
        client.generate_blocking([GenerationRequest(prompt, 4)])
        engine.upload_weights(client, version=1)
        client.generate_blocking([GenerationRequest(prompt, 4)])
    finally:
        client.destroy()
        server.close()
    models = [body["model"] for route, body in server.calls if route == "/v1/completions"]
    assert models == [SERVED_MODEL_NAME, LORA_ADAPTER_NAME]  # the base model until the adapters arrive
    load = [body for route, body in server.calls if route == "/v1/load_lora_adapter"]
    assert load == [{"lora_name": LORA_ADAPTER_NAME, "lora_path": load[0]["lora_path"], "load_inplace": True}]
    published = tmp_path / "weights" / "v000001"
    assert load[0]["lora_path"] == str(published) and is_adapter_dir(published)
    assert not (published / "model.safetensors").exists() and client.get_version() == 1


def test_vllm_servers_start_with_room_for_the_adapter_rank():
    from engines.servers import vllm_lora_args

    assert vllm_lora_args(16)[-2:] == ["--max-lora-rank", "16"]
    assert vllm_lora_args(20)[-2:] == ["--max-lora-rank", "32"] and "--enable-lora" in vllm_lora_args(20)
    with pytest.raises(ValueError, match="exceeds"):
        vllm_lora_args(1000)
