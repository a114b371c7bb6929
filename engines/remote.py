"""Inference engines that are clients of inference servers over HTTP (vLLM, SGLang).

`RemoteInferenceEngine` holds what the two clients share: several server addresses,
chosen round-robin with per-prompt affinity (the samples of one GRPO group go to the same
server, whose prefix cache then holds their prompt), request timeouts, bounded retries
with exponential backoff, pause/resume, interruptible generation and weight updates from
disk. A subclass says how one request and one weight reload look on its server's API.

Versions. The client labels every token with the policy version whose weights produced
it. A weight update first waits until no request is in flight (`pause` stops new ones),
so no request spans two versions. With `interruptible=True`, `pause` also aborts the
requests in flight: each returns the tokens it had, and after `resume` the rest of the
completion is requested from the new weights, appended to the same response, with those
tokens labelled with the new version (AReaL's interruptible generation).
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Awaitable, Callable, Optional

import aiohttp

from engines.inference import GenerationRequest, GenerationResponse, inject_generation_fault

logger = logging.getLogger(__name__)

# Prompts whose server is remembered (a GRPO group's samples arrive together).
AFFINITY_ENTRIES = 4096


class RemoteGenerationError(RuntimeError):
    """A request failed on every attempt (`max_retries` + 1); names the server and the
    last error. The rollout controller counts the rollout as rejected."""


class ServerResponseError(RuntimeError):
    """A server answered with an HTTP error status or a malformed body."""


@dataclass
class Completion:
    """One server answer: the tokens it generated, their logprobs, and why it stopped."""

    output_ids: list[int]
    output_logprobs: list[float]
    finish_reason: str  # "stop" | "length" | "abort"


class RemoteInferenceEngine:
    """The `InferenceEngine` protocol over one or more HTTP servers (base class).

    Args:
        addresses: `host:port` of each server.
        weights_dir: where the trainer publishes each version's weights
            (`engines/weights.py`); the servers must be able to read it.
        request_timeout: seconds one HTTP request may take before it is retried.
        max_retries: retries of a failed request before `RemoteGenerationError`.
        retry_backoff: seconds before the first retry; doubled for each further one.
        interruptible: abort in-flight requests on `pause` and finish them after `resume`.
    """

    backend = "remote"
    # Reload routes whose success answer is plain text rather than JSON.
    text_answer_routes: tuple[str, ...] = ()

    def __init__(
        self,
        addresses: list[str],
        *,
        weights_dir: Path,
        request_timeout: float = 600.0,
        max_retries: int = 3,
        retry_backoff: float = 1.0,
        interruptible: bool = False,
    ):
        if not addresses:
            raise ValueError("a remote inference engine needs at least one server address")
        self.addresses = list(addresses)
        self.weights_dir = Path(weights_dir)
        self.request_timeout = request_timeout
        self.max_retries = max_retries
        self.retry_backoff = retry_backoff
        self.interruptible = interruptible
        self.shares_weights = False
        self.num_generated_tokens = 0
        self.num_retries = 0
        self._version = 0
        self._next_server = 0
        self._affinity: OrderedDict[tuple[int, ...], int] = OrderedDict()
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._in_flight = 0
        self._paused = False
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._resumed: Optional[asyncio.Event] = None
        self._session: Optional[aiohttp.ClientSession] = None

    # -- what a subclass says about its server ------------------------------------------

    def completion_request(self, request: GenerationRequest, prompt_ids: list[int], max_new_tokens: int) -> tuple[str, dict]:
        """(path, JSON body) that samples up to `max_new_tokens` after `prompt_ids`."""
        raise NotImplementedError

    def parse_completion(self, body: dict) -> Completion:
        """The server's JSON answer to `completion_request`; raises ServerResponseError."""
        raise NotImplementedError

    def reload_requests(self, path: Path, version: int) -> list[tuple[str, dict]]:
        """(path, JSON body) calls, in order, that load the weights in `path`."""
        raise NotImplementedError

    def abort_request(self) -> tuple[str, dict]:
        """(path, JSON body) that aborts every request in flight on a server."""
        raise NotImplementedError

    def score_request(self, input_ids: list[int], temperature: float) -> Optional[tuple[str, dict]]:
        """(path, JSON body) asking for the logprob of every token of `input_ids` given the
        ones before it, or None when the server cannot (then `score_tokens` is skipped)."""
        return None

    def parse_score(self, body: dict, input_ids: list[int]) -> list[float]:
        """The server's answer to `score_request`: len(input_ids) - 1 logprobs."""
        raise NotImplementedError

    def check_reload_answer(self, route: str, answer: Any) -> None:
        """Raise ServerResponseError when a 2xx answer to a reload call reports failure
        (default: the HTTP status says it all)."""

    # -- versions and control -------------------------------------------------------------

    def get_version(self) -> int:
        return self._version

    def set_version(self, version: int) -> None:
        self._version = version

    def pause(self) -> None:
        """Send no new request until `resume`; with `interruptible`, abort the ones in
        flight (they come back with their partial output and are finished later)."""
        with self._lock:
            self._paused = True
        if self._loop is not None and self._resumed is not None:
            self._loop.call_soon_threadsafe(self._resumed.clear)
        if self.interruptible and self._in_flight:
            route, body = self.abort_request()
            self._call_servers(lambda session, address: post_json(session, address, route, body, 30.0))

    def resume(self) -> None:
        with self._lock:
            self._paused = False
        if self._loop is not None and self._resumed is not None:
            self._loop.call_soon_threadsafe(self._resumed.set)

    def update_weights(self, state_dict) -> None:
        raise TypeError(f"{type(self).__name__} loads weights from disk: use update_weights_from_disk")

    def update_weights_from_disk(self, path: Path, version: int, timeout: float = 600.0) -> None:
        """Load the weights the trainer wrote to `path` on every server, once no request
        is in flight; then label new tokens with `version`.

        Raises:
            TimeoutError: requests were still in flight after `timeout` seconds.
            ServerResponseError: a server refused the reload.
        """
        with self._idle:
            if not self._idle.wait_for(lambda: self._in_flight == 0, timeout=timeout):
                raise TimeoutError(f"{self._in_flight} request(s) still in flight after {timeout:.0f} s; weights not updated")

        async def reload(session: aiohttp.ClientSession, address: str) -> None:
            for route, body in self.reload_requests(Path(path), version):
                answer = await post_json(session, address, route, body, timeout, allow_text=route in self.text_answer_routes)
                self.check_reload_answer(route, answer)

        self._call_servers(reload)
        self._version = version

    def score_tokens(self, input_ids: list[int], temperature: float) -> Optional[list[list[float]]]:
        """Each server's logprobs of `input_ids[1:]` (teacher-forced, at `temperature`) under
        the weights it holds now, one list per server; None when the server API has no
        such call. The trainer compares them with its own after every weight update.

        Raises:
            ServerResponseError, aiohttp.ClientError: a server failed to answer.
        """
        request = self.score_request(list(input_ids), temperature)
        if request is None:
            return None
        route, body = request
        results: dict[str, list[float]] = {}

        async def score(session: aiohttp.ClientSession, address: str) -> None:
            results[address] = self.parse_score(await post_json(session, address, route, body, self.request_timeout), input_ids)

        self._call_servers(score)
        return [results[a] for a in self.addresses]

    async def aclose(self) -> None:
        """Close the HTTP session of the running event loop (before that loop ends)."""
        if self._session is not None and self._loop is asyncio.get_running_loop():
            await self._session.close()
            self._session = None

    def destroy(self) -> None:
        """Close the HTTP session (the servers are stopped by their owner)."""
        session, self._session = self._session, None
        # After the rollout thread's loop has stopped, its session dies with it.
        if session is not None and self._loop is not None and self._loop.is_running() and not _on_loop(self._loop):
            try:
                asyncio.run_coroutine_threadsafe(session.close(), self._loop).result(timeout=5)
            except Exception:  # the loop stopped meanwhile
                pass

    # -- generation -------------------------------------------------------------------------

    async def agenerate(self, request: GenerationRequest) -> GenerationResponse:
        """Sample one completion, retrying failed requests (with backoff, on the next
        server) up to `max_retries` times.

        Raises:
            RemoteGenerationError: every attempt failed.
        """
        self._bind_loop()
        inject_generation_fault(self._version)
        server = self._pick_server(request.input_ids)
        output_ids: list[int] = []
        logprobs: list[float] = []
        versions: list[int] = []
        failures = 0
        while True:
            await self._resumed.wait()
            remaining = request.max_new_tokens - len(output_ids)
            route, body = self.completion_request(request, request.input_ids + output_ids, remaining)
            with self._lock:
                if self._paused:  # paused between the wait and now
                    continue
                self._in_flight += 1
                version = self._version
            try:
                completion = self.parse_completion(await self._post(self.addresses[server], route, body))
            except (aiohttp.ClientError, asyncio.TimeoutError, ServerResponseError, OSError) as exc:
                failures += 1
                if failures > self.max_retries:
                    raise RemoteGenerationError(
                        f"{self.backend} request failed {failures} times; last: {self.addresses[server]}: "
                        f"{type(exc).__name__}: {exc}"
                    ) from exc
                self.num_retries += 1
                server = (server + 1) % len(self.addresses)
                await asyncio.sleep(self.retry_backoff * 2 ** (failures - 1))
                continue
            finally:
                with self._idle:
                    self._in_flight -= 1
                    self._idle.notify_all()
            output_ids += completion.output_ids
            logprobs += completion.output_logprobs
            versions += [version] * len(completion.output_ids)
            self.num_generated_tokens += len(completion.output_ids)
            stopped = completion.finish_reason == "stop"
            if completion.finish_reason == "abort" and not stopped and len(output_ids) < request.max_new_tokens:
                continue  # interrupted by a pause: the rest comes after `resume`
            return GenerationResponse(
                input_ids=list(request.input_ids),
                output_ids=output_ids,
                output_logprobs=logprobs,
                output_versions=versions,
                stop_reason="stop" if stopped else "length",
            )

    # -- plumbing -------------------------------------------------------------------------------

    def _bind_loop(self) -> None:
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            self._loop = loop
            self._resumed = asyncio.Event()
            self._session = None
            with self._lock:
                if not self._paused:
                    self._resumed.set()

    def _pick_server(self, prompt_ids: list[int]) -> int:
        key = tuple(prompt_ids)
        with self._lock:
            if key in self._affinity:
                self._affinity.move_to_end(key)
                return self._affinity[key]
            server = self._next_server
            self._next_server = (server + 1) % len(self.addresses)
            self._affinity[key] = server
            if len(self._affinity) > AFFINITY_ENTRIES:
                self._affinity.popitem(last=False)
            return server

    async def _post(self, address: str, route: str, body: Optional[dict], timeout: Optional[float] = None) -> Any:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession()
        return await post_json(self._session, address, route, body, timeout or self.request_timeout)

    def _call_servers(self, call: Callable[[aiohttp.ClientSession, str], Awaitable[Any]]) -> None:
        """Run `call(session, address)` for every server concurrently and wait. The calls
        get a session of their own (a session belongs to one event loop)."""

        async def all_servers() -> None:
            async with aiohttp.ClientSession() as session:
                await asyncio.gather(*(call(session, address) for address in self.addresses))

        self._run(all_servers())

    def _run(self, coro: Awaitable[Any]) -> Any:
        """Run `coro` to completion from a thread other than the engine's event loop: on
        that loop when it is running (generation shares its HTTP session), else on a loop
        of its own."""
        loop = self._loop
        if loop is not None and loop.is_running() and not _on_loop(loop):
            return asyncio.run_coroutine_threadsafe(coro, loop).result()

        async def then_close_session() -> Any:
            try:
                return await coro
            finally:  # a session opened on this short-lived loop must not outlive it
                await self.aclose()

        return asyncio.run(then_close_session())

    def generate_blocking(self, requests: list[GenerationRequest]) -> list[GenerationResponse]:
        """`agenerate` for each request, concurrently, for callers without an event loop
        (evaluation)."""

        async def all_requests() -> list[GenerationResponse]:
            return list(await asyncio.gather(*(self.agenerate(r) for r in requests)))

        return self._run(all_requests())


def _on_loop(loop: asyncio.AbstractEventLoop) -> bool:
    try:
        return asyncio.get_running_loop() is loop
    except RuntimeError:
        return False


async def post_json(session: aiohttp.ClientSession, address: str, route: str, body: Optional[dict], timeout: float,
                    *, allow_text: bool = False) -> Any:
    """POST `body` as JSON to http://`address``route`; the decoded JSON answer ({} when
    empty; with `allow_text`, {"text": answer} for a 2xx answer that is not JSON).

    Raises:
        ServerResponseError: HTTP status >= 400, or an answer that is not JSON.
        aiohttp.ClientError, asyncio.TimeoutError: the server is unreachable or too slow.
    """
    async with session.post(f"http://{address}{route}", json=body, timeout=aiohttp.ClientTimeout(total=timeout)) as response:
        text = await response.text()
        if response.status >= 400:
            raise ServerResponseError(f"POST {route} -> HTTP {response.status}: {text[:300]}")
        if not text.strip():
            return {}
        try:
            return json.loads(text)
        except ValueError as exc:
            if allow_text:
                return {"text": text}
            raise ServerResponseError(f"POST {route}: not JSON: {text[:300]}") from exc
