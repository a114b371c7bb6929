"""reward.fn=llm_judge against a real HTTP server on 127.0.0.1 answering in the OpenAI
chat-completions schema: a grade, a server that never answers in time, one that answers
garbage, and a planted API key that must appear in no log, saved config or error."""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from workflows.config import ExperimentConfig, JudgeConfig, to_yaml
from workflows.rollout.judge import JudgeError, LLMJudge, rubric_fields
from workflows.rollout.reward import RewardFunctionError, RewardScorer
from workflows.rollout.reward_fns import resolve_reward, resolve_rewards

KEY_ENV = "AREAL_TEST_JUDGE_KEY"
PLANTED_KEY = "sk-PlantedJudgeKey0123456789abcdefXYZ"


class OpenAIStub(BaseHTTPRequestHandler):
    """/v1/models and /v1/chat/completions; what it answers is the server's `mode`."""

    def log_message(self, *args) -> None:  # keep the test output clean
        pass

    def _send(self, status: int, body: bytes, content_type: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        if self.path.rstrip("/") == "/v1/models":
            self._send(200, json.dumps({"object": "list", "data": [
                {"id": "judge-model", "object": "model", "created": 0, "owned_by": "test"}]}).encode())
        else:
            self._send(404, b'{"error": {"message": "no route"}}')

    def do_POST(self) -> None:
        server = self.server
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        server.requests.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
        mode = server.mode
        if mode == "slow":
            time.sleep(3)
            return self._send(200, b"{}")
        if mode == "garbage":
            return self._send(200, b"<html>a proxy's error page, not JSON</html>", "text/html")
        if mode == "echo_key":  # a server that quotes the key it was sent back in its error
            return self._send(401, json.dumps({"error": {"message": f"Incorrect API key: {self.headers.get('Authorization')}"}}).encode())
        content = server.reply
        self._send(200, json.dumps({
            "id": "chatcmpl-1", "object": "chat.completion", "created": 0, "model": body["model"],
            "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": content}}],
        }).encode())


@pytest.fixture
def judge_server():
    server = ThreadingHTTPServer(("127.0.0.1", 0), OpenAIStub)
    server.daemon_threads = True
    server.mode, server.reply, server.requests = "grade", "The response is right but terse.\nGrade: 7", []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    server.url = f"http://127.0.0.1:{server.server_address[1]}/v1"
    yield server
    server.shutdown()
    server.server_close()


def scorer_for(settings: JudgeConfig) -> RewardScorer:
    return RewardScorer(num_workers=1, timeout=1.0, reward_fn=[resolve_reward("llm_judge", judge=settings)])


def test_a_grade_is_scaled_to_the_reward(judge_server, monkeypatch):
    monkeypatch.setenv(KEY_ENV, PLANTED_KEY)
    scorer = scorer_for(JudgeConfig(base_url=judge_server.url, api_key_env=KEY_ENV))
    try:
        value = scorer.score("So the total is \\boxed{42}.", "42", prompt="What is 6 * 7?", row={"question": "?"})
    finally:
        scorer.close()
    assert value == pytest.approx(0.7)
    assert scorer.stats.num_scored == 1 and scorer.stats.num_failed == 0
    (request,) = judge_server.requests
    assert request["path"] == "/v1/chat/completions"
    assert request["auth"] == f"Bearer {PLANTED_KEY}"  # read from the named variable in the worker
    assert request["body"]["model"] == "judge-model"  # model null: the first one /models lists
    (message,) = request["body"]["messages"]
    assert "What is 6 * 7?" in message["content"] and "\\boxed{42}" in message["content"]
    assert "Reference answer:\n42" in message["content"]


def test_grades_parse_scale_and_refuse_out_of_range():
    judge = LLMJudge(JudgeConfig(min_grade=1, max_grade=5))
    assert judge.grade("Grade: 2\n... on reflection, Grade: 5") == 1.0  # the last grade counts
    assert judge.grade("grade = 3") == pytest.approx(0.5)
    with pytest.raises(JudgeError, match="outside"):
        judge.grade("Grade: 7")
    with pytest.raises(JudgeError, match="no grade matching"):
        judge.grade("I would rather not say.")
    assert LLMJudge(JudgeConfig(grade_pattern=r"\[\[(\d+)\]\]", max_grade=10)).grade("Rating: [[8]]") == 0.8
    assert rubric_fields(JudgeConfig().rubric) == {"question", "completion", "reference"}


def test_a_server_that_times_out_is_retried_then_counted(judge_server):
    judge_server.mode = "slow"
    settings = JudgeConfig(base_url=judge_server.url, model="m", timeout=0.5, max_retries=2, backoff=0.1)
    scorer = scorer_for(settings)
    try:
        start = time.monotonic()
        with pytest.raises(RewardFunctionError, match=r"timed out after 0.5s on all 3 attempts"):
            scorer.score("\\boxed{1}", "1", prompt="q")
        elapsed = time.monotonic() - start
    finally:
        scorer.close()
    assert len(judge_server.requests) == 3  # the first try and max_retries=2 retries
    assert 1.5 + 0.1 + 0.2 <= elapsed < 15  # three timeouts and both backoffs, then no more
    assert scorer.stats.num_failed == 1 and scorer.stats.num_errors == 1
    assert 2.0 < LLMJudge(settings).deadline < 10  # the pool lets every retry run


@pytest.mark.parametrize("reply, message", [
    (None, r"answered no chat completion"),  # not JSON at all
    ("I cannot grade this.", r"no grade matching reward.judge.grade_pattern: 'I cannot grade this.'"),
])
def test_a_garbage_answer_is_counted_with_a_clear_message(judge_server, reply, message):
    judge_server.mode = "garbage" if reply is None else "grade"
    judge_server.reply = reply
    scorer = scorer_for(JudgeConfig(base_url=judge_server.url, model="m", max_retries=3, backoff=0.1))
    try:
        with pytest.raises(RewardFunctionError, match=message) as raised:
            scorer.score("\\boxed{1}", "1", prompt="q")
    finally:
        scorer.close()
    assert str(raised.value).startswith("reward.fn 'llm_judge' raised JudgeError: the judge at http://127.0.0.1:")
    assert "\n" not in str(raised.value)
    assert len(judge_server.requests) == 1  # an answer that is no grade is not retried
    assert scorer.stats.num_failed == 1 and scorer.stats.num_errors == 1


def test_the_api_key_is_in_no_log_saved_config_or_error(judge_server, monkeypatch, caplog, capfd, tmp_path):
    monkeypatch.setenv(KEY_ENV, PLANTED_KEY)
    judge_server.mode = "echo_key"
    cfg = ExperimentConfig()
    cfg.reward = dataclasses.replace(cfg.reward, fn="llm_judge", judge=JudgeConfig(
        base_url=judge_server.url, model="m", api_key_env=KEY_ENV))
    saved = tmp_path / "config.yaml"
    saved.write_text(to_yaml(cfg))
    caplog.set_level(logging.DEBUG)
    scorer = RewardScorer(num_workers=1, timeout=1.0, reward_fn=resolve_rewards(cfg))
    try:
        with pytest.raises(RewardFunctionError, match="refused the request") as raised:
            scorer.score("\\boxed{1}", "1", prompt="q")
    finally:
        scorer.close()
    assert judge_server.requests[0]["auth"] == f"Bearer {PLANTED_KEY}"  # the key did reach the server
    assert "<api key>" in str(raised.value)  # which quoted it back
    assert KEY_ENV in saved.read_text()
    out, err = capfd.readouterr()
    for text in (str(raised.value), saved.read_text(), caplog.text, out, err, repr(scorer.terms)):
        assert PLANTED_KEY not in text
