"""RemoteSGLangEngine against SGLang's native API, without SGLang: its request bodies are
checked against the field names recorded from SGLang's source, the recorded answers are
parsed, and the whole client runs against a local HTTP server that replays them
(fixtures/sglang/*.json; each names its source under "_source")."""

from __future__ import annotations

import asyncio
import copy
import json
import threading
import time
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from engines.inference import GenerationRequest
from engines.remote import RemoteGenerationError, ServerResponseError, post_json
from engines.remote_sglang import RemoteSGLangEngine

FIXTURES = Path(__file__).parent / "fixtures" / "sglang"


def load(name: str) -> dict:
    return json.loads((FIXTURES / f"{name}.json").read_text())


SCHEMAS = load("request_schemas")
GENERATE = load("generate_request")
PROMPT = GENERATE["body"]["input_ids"]
# The request generate_request.json records the body of.
REQUEST = GenerationRequest(input_ids=PROMPT, max_new_tokens=8, stop_token_ids=[2])
RESPONSES = ["generate_response_length", "generate_response_stop", "generate_response_abort",
             "generate_response_abort_waiting"]
# What each recorded answer must parse to: output ids and finish reason.
EXPECTED = {
    "generate_response_length": ([34, 31, 35, 436, 216, 37, 30, 1073], "length"),
    "generate_response_stop": ([436, 216, 37, 30, 2], "stop"),
    "generate_response_abort": ([34, 31, 35], "abort"),
    "generate_response_abort_waiting": ([], "abort"),
}


def fields(struct: str) -> set[str]:
    return set(SCHEMAS[struct]["fields"])


def make_engine(address: str = "127.0.0.1:9", **kw) -> RemoteSGLangEngine:
    kw = {"weights_dir": Path("/tmp"), "max_retries": 3, "retry_backoff": 0.01, "request_timeout": 10.0, **kw}
    return RemoteSGLangEngine([address], **kw)


# -- schema drift -------------------------------------------------------------------------


def assert_recorded_fields(body: dict, struct: str) -> None:
    unknown = set(body) - fields(struct)
    assert not unknown, f"fields SGLang's {struct} does not have: {sorted(unknown)}"


@pytest.mark.parametrize("request_", [REQUEST, GenerationRequest(PROMPT, 4, temperature=0.7, top_p=0.9, top_k=20, seed=7)])
def test_request_bodies_use_only_recorded_sglang_fields(request_):
    engine = make_engine()
    route, body = engine.completion_request(request_, request_.input_ids, request_.max_new_tokens)
    assert_recorded_fields(body, "GenerateReqInput")
    assert_recorded_fields(body["sampling_params"], "SamplingParams")
    [(reload_route, reload_body)] = engine.reload_requests(Path("/weights/v3"), 3)
    assert_recorded_fields(reload_body, "UpdateWeightFromDiskReqInput")
    abort_route, abort_body = engine.abort_request()
    assert_recorded_fields(abort_body, "AbortReq")
    for call_route in (route, reload_route, abort_route):  # routes SGLang serves, and by POST
        assert "POST" in SCHEMAS["routes"].get(call_route, []), call_route


def test_generate_request_matches_recording():
    route, body = make_engine().completion_request(REQUEST, PROMPT, REQUEST.max_new_tokens)
    assert route == GENERATE["route"]
    assert set(body) == set(GENERATE["body"])
    assert set(body["sampling_params"]) == set(GENERATE["body"]["sampling_params"])
    assert body == GENERATE["body"]


def test_sampling_params_follow_the_request():
    engine = make_engine()
    seeded = GenerationRequest(PROMPT, 4, temperature=0.7, top_p=0.9, top_k=20, seed=7)
    sampling = engine.completion_request(seeded, PROMPT + [34], 3)[1]["sampling_params"]
    assert sampling == {"max_new_tokens": 3, "temperature": 0.7, "top_p": 0.9, "top_k": 20, "min_p": 0.0,
                        "repetition_penalty": 1.0, "sampling_seed": 7}
    unseeded = engine.completion_request(GenerationRequest(PROMPT, 4), PROMPT, 4)[1]
    assert "sampling_seed" not in unseeded["sampling_params"] and "stop_token_ids" not in unseeded["sampling_params"]
    assert unseeded["input_ids"] == PROMPT and unseeded["sampling_params"]["top_k"] == -1


def test_reload_and_abort_match_recordings():
    engine = make_engine()
    recorded = load("update_weights_from_disk_request")
    [(route, body)] = engine.reload_requests(Path(recorded["body"]["model_path"]), 3)
    assert (route, body) == (recorded["route"], recorded["body"])
    abort = load("abort_request")
    assert engine.abort_request() == (abort["route"], abort["body"])


def test_every_fixture_names_its_source():
    for path in FIXTURES.glob("*.json"):
        assert json.loads(path.read_text()).get("_source"), path.name


@pytest.mark.parametrize("name", RESPONSES)
def test_recorded_answers_parse(name):
    body = load(name)["body"]
    completion = make_engine().parse_completion(body)
    ids, reason = EXPECTED[name]
    assert (completion.output_ids, completion.finish_reason) == (ids, reason)
    assert completion.output_logprobs == [entry[0] for entry in body["meta_info"]["output_token_logprobs"]]
    assert all(lp <= 0 for lp in completion.output_logprobs)


@pytest.mark.parametrize("path", [("output_ids",), ("meta_info",), ("meta_info", "finish_reason"),
                                  ("meta_info", "finish_reason", "type"), ("meta_info", "output_token_logprobs")])
def test_a_renamed_answer_key_is_an_error(path):
    body = copy.deepcopy(load("generate_response_length")["body"])
    parent = body
    for key in path[:-1]:
        parent = parent[key]
    parent[path[-1] + "_renamed"] = parent.pop(path[-1])
    with pytest.raises(ServerResponseError, match=path[-1]):
        make_engine().parse_completion(body)


def test_malformed_answers_are_errors():
    engine = make_engine()
    good = load("generate_response_length")["body"]

    def broken(change):
        body = copy.deepcopy(good)
        change(body)
        return body

    cases = {
        r"output_token_logprobs\[2\] is for token 99 but output_ids\[2\] is 35":
            broken(lambda b: b["meta_info"]["output_token_logprobs"][2].__setitem__(1, 99)),
        "answered 8 output_ids with 7 output_token_logprobs": broken(lambda b: b["meta_info"]["output_token_logprobs"].pop()),
        r"output_token_logprobs\[0\] is \[None, 34, None\]":
            broken(lambda b: b["meta_info"]["output_token_logprobs"][0].__setitem__(0, None)),
        r"output_ids\[1\] is '31'": broken(lambda b: b["output_ids"].__setitem__(1, "31")),
        "'stop_str', not one of": broken(lambda b: b["meta_info"]["finish_reason"].__setitem__("type", "stop_str")),
        "meta_info is missing": [good],
    }
    for message, body in cases.items():
        with pytest.raises(ServerResponseError, match=message):
            engine.parse_completion(body)


# -- end to end, against a server replaying the recordings ------------------------------


class ReplayServer:
    """SGLang's routes on 127.0.0.1 (a free port), in a thread of its own: each answers
    from its script of recorded (status, body) pairs, then with its default, and every
    request is recorded as (path, JSON body)."""

    def __init__(self):
        def answer(name):
            recorded = load(name)
            return recorded["status"], recorded.get("body", recorded.get("text"))

        self.defaults = {
            "/generate": answer("generate_response_length"),
            "/update_weights_from_disk": answer("update_weights_from_disk_response_success"),
            "/abort_request": answer("abort_response"),
            "/flush_cache": answer("flush_cache_response"),
        }
        self.scripts: dict[str, list] = {}
        self.received: list[tuple[str, object]] = []
        self.hold_generate = False  # the first /generate waits for /abort_request
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self.address = self._run(self._start())

    def _run(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout=10)

    async def _start(self) -> str:
        self._aborted = asyncio.Event()
        app = web.Application()
        for route in self.defaults:
            app.router.add_route("*", route, self._handle)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        host, port = self._runner.addresses[0][:2]
        return f"{host}:{port}"

    async def _handle(self, request: web.Request) -> web.Response:
        text = await request.text()
        self.received.append((request.path, json.loads(text) if text else None))
        if request.path == "/abort_request":
            self._aborted.set()
        elif request.path == "/generate" and self.hold_generate:
            self.hold_generate = False
            await self._aborted.wait()
        script = self.scripts.get(request.path)
        status, body = script.pop(0) if script else self.defaults[request.path]
        if isinstance(body, str):
            return web.Response(status=status, text=body)
        return web.json_response(body, status=status)

    def routes(self) -> list[str]:
        return [path for path, _ in self.received]

    def close(self):
        self._run(self._runner.cleanup())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()


@pytest.fixture
def server():
    s = ReplayServer()
    yield s
    s.close()


def generate(engine: RemoteSGLangEngine, request: GenerationRequest):
    """`engine.agenerate` on an event loop of its own, closing the HTTP session the engine
    opened on it (the base class leaves it to the loop's end)."""

    async def run():
        try:
            return await engine.agenerate(request)
        finally:
            if engine._session is not None:
                await engine._session.close()

    return asyncio.run(run())


def body_of(name: str):
    return load(name)["body"]


def test_generate_end_to_end(server):
    engine = make_engine(server.address)
    engine.set_version(2)
    response = generate(engine, REQUEST)
    recorded = body_of("generate_response_length")
    assert response.output_ids == recorded["output_ids"]
    assert response.output_logprobs == [e[0] for e in recorded["meta_info"]["output_token_logprobs"]]
    assert response.output_versions == [2] * 8 and response.stop_reason == "length"
    assert response.input_ids == PROMPT
    assert server.received == [("/generate", GENERATE["body"])]


def test_an_aborted_request_is_finished_by_a_second_one(server):
    server.scripts["/generate"] = [(200, body_of("generate_response_abort")), (200, body_of("generate_response_stop"))]
    response = generate(make_engine(server.address), REQUEST)
    partial = body_of("generate_response_abort")["output_ids"]
    assert response.output_ids == partial + body_of("generate_response_stop")["output_ids"]
    assert response.stop_reason == "stop" and len(response.output_logprobs) == 8
    (_, first), (_, second) = server.received
    assert first == GENERATE["body"]
    assert second["input_ids"] == PROMPT + partial and second["sampling_params"]["max_new_tokens"] == 8 - len(partial)


def test_pause_aborts_in_flight_requests_and_resume_finishes_them(server):
    engine = make_engine(server.address, interruptible=True)
    server.hold_generate = True
    server.scripts["/generate"] = [(200, body_of("generate_response_abort")), (200, body_of("generate_response_stop"))]
    result = {}
    worker = threading.Thread(target=lambda: result.setdefault("response", generate(engine, REQUEST)))
    worker.start()
    deadline = time.monotonic() + 10
    while "/generate" not in server.routes() and time.monotonic() < deadline:
        time.sleep(0.01)
    engine.pause()  # POSTs the abort from this thread, on the engine's event loop
    time.sleep(0.2)
    assert server.routes() == ["/generate", "/abort_request"]  # nothing new while paused
    engine.resume()
    worker.join(timeout=10)
    assert server.routes() == ["/generate", "/abort_request", "/generate"]
    assert server.received[1][1] == load("abort_request")["body"]
    assert len(result["response"].output_ids) == 8 and result["response"].stop_reason == "stop"


def test_update_weights_from_disk_end_to_end(server, tmp_path):
    engine = make_engine(server.address)
    engine.update_weights_from_disk(tmp_path / "v3", 3)
    assert engine.get_version() == 3
    recorded = load("update_weights_from_disk_request")
    [(route, body)] = server.received
    assert route == recorded["route"] and set(body) == set(recorded["body"])
    assert body == dict(recorded["body"], model_path=str(tmp_path / "v3"))
    assert generate(engine, REQUEST).output_versions == [3] * 8


def test_a_refused_reload_raises_and_keeps_the_version(server, tmp_path):
    failure = load("update_weights_from_disk_response_failure")
    server.scripts["/update_weights_from_disk"] = [(failure["status"], failure["body"])]
    engine = make_engine(server.address)
    with pytest.raises(ServerResponseError, match="HTTP 400.*Failed to get weights iterator"):
        engine.update_weights_from_disk(tmp_path / "v3", 3)
    assert engine.get_version() == 0


def test_failed_requests_are_retried(server):
    server.scripts["/generate"] = [(500, "Internal Server Error"), (500, "Internal Server Error")]
    engine = make_engine(server.address)
    response = generate(engine, REQUEST)
    assert response.output_ids == body_of("generate_response_length")["output_ids"]
    assert engine.num_retries == 2
    assert server.received == [("/generate", GENERATE["body"])] * 3


def test_a_server_that_always_fails_raises_after_max_retries(server):
    server.scripts["/generate"] = [(500, "Internal Server Error")] * 10
    engine = make_engine(server.address)
    with pytest.raises(RemoteGenerationError, match="sglang request failed 4 times"):
        generate(engine, REQUEST)
    assert server.routes() == ["/generate"] * 4


def test_flush_cache_answers_text_that_post_json_refuses(server):
    """Why reload_requests leaves /flush_cache out: its recorded answer is not JSON."""

    async def flush():
        async with aiohttp.ClientSession() as session:
            return await post_json(session, server.address, "/flush_cache", None, 10.0)

    with pytest.raises(ServerResponseError, match="not JSON: Cache flushed"):
        asyncio.run(flush())


def test_a_refusal_with_status_200_raises(server, tmp_path):
    failure = load("update_weights_from_disk_response_failure")
    server.scripts["/update_weights_from_disk"] = [(200, failure["body"])]
    engine = make_engine(server.address)
    with pytest.raises(ServerResponseError, match="refused"):
        engine.update_weights_from_disk(tmp_path / "v3", 3)
    assert engine.get_version() == 0
