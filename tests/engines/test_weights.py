"""Publishing weights for inference servers in buckets (engines/weights.py) and copying
them into the in-process sampler one tensor at a time."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from engines import weights
from engines.inference import LocalInferenceEngine
from engines.parallel import full_tensors


def test_a_model_larger_than_a_bucket_is_published_in_several_files(tmp_path, tiny_model, monkeypatch):
    total = sum(t.numel() * t.element_size() for t in tiny_model.state_dict().values())
    monkeypatch.setattr(weights, "BUCKET_BYTES", total // 4)
    path = weights.publish_weights(tiny_model, tmp_path, version=3)
    files = sorted(p.name for p in path.glob("*.safetensors"))
    assert len(files) >= 2 and not (path / "model.safetensors").exists()
    index = json.loads((path / weights.INDEX_FILE).read_text())
    assert sorted(set(index["weight_map"].values())) == files

    published = weights.load_published(path)
    own = tiny_model.state_dict()
    assert published.keys() == own.keys() | {"lm_head.weight"}
    assert all(torch.equal(published[k], v) for k, v in own.items())
    # The untied head is the embedding, and transformers reads the sharded layout.
    assert torch.equal(published["lm_head.weight"], own["model.embed_tokens.weight"])
    loaded = AutoModelForCausalLM.from_pretrained(path)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in published.items())


def test_a_small_model_is_one_file(tmp_path, tiny_model):
    path = weights.publish_weights(tiny_model, tmp_path, version=0)
    assert [p.name for p in path.glob("*.safetensors")] == ["model.safetensors"]
    assert not (path / weights.INDEX_FILE).exists()


def test_sampler_takes_weights_one_tensor_at_a_time(tiny_model, tokenizer):
    trained = copy.deepcopy(tiny_model)
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(0.01)
    engine = LocalInferenceEngine(tiny_model, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    try:
        engine.update_weights(full_tensors(trained))
        assert all(torch.equal(a, b) for a, b in zip(tiny_model.state_dict().values(), trained.state_dict().values()))
        with pytest.raises(RuntimeError, match="does not match the sampler's model"):
            engine.update_weights(iter([("no.such.weight", torch.zeros(1))]))
        pairs = list(full_tensors(trained))[1:]
        with pytest.raises(RuntimeError, match="weights missing from the update"):
            engine.update_weights(iter(pairs))
    finally:
        engine.destroy()
