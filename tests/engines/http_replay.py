"""A real HTTP server on 127.0.0.1 (aiohttp.web, its own thread and event loop) that
answers inference-server routes from recorded responses, for the remote-engine tests.

Each route maps to a handler `async (body: dict | None) -> (status, json)`; every request
is appended to `calls` as (route, body). `stop()` closes the listening socket and every
open connection, as a killed server would; `start()` again serves on the same port.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
from pathlib import Path
from typing import Any, Awaitable, Callable, Optional

from aiohttp import web

FIXTURES = Path(__file__).parent / "fixtures"

Handler = Callable[[Optional[dict]], Awaitable[tuple[int, Any]]]


def fixture(backend: str, name: str) -> dict:
    return json.loads((FIXTURES / backend / f"{name}.json").read_text())


def replay(response: Any, status: int = 200) -> Handler:
    async def handler(body: Optional[dict]) -> tuple[int, Any]:
        return status, response

    return handler


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ReplayServer:
    def __init__(self, routes: dict[str, Handler], port: Optional[int] = None):
        self.routes = dict(routes)
        self.calls: list[tuple[str, Optional[dict]]] = []
        self.port = port or _free_port()
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        self._runner: Optional[web.AppRunner] = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _run(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=30)

    async def _dispatch(self, request: web.Request) -> web.Response:
        text = await request.text()
        body = json.loads(text) if text.strip() else None
        self.calls.append((request.path, body))
        handler = self.routes.get(request.path)
        if handler is None:
            return web.json_response({"error": f"no route {request.path}"}, status=404)
        status, payload = await handler(body)
        return web.json_response(payload, status=status)

    async def _start(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._dispatch)
        self._runner = web.AppRunner(app, shutdown_timeout=0.1)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port, reuse_address=True).start()

    def start(self) -> "ReplayServer":
        self._run(self._start())
        return self

    def stop(self) -> None:
        if self._runner is not None:
            self._run(self._runner.cleanup())
            self._runner = None

    def close(self) -> None:
        self.stop()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=5)
