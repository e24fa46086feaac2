"""Prometheus metrics of the moon3 server (served by KServe at ``/metrics`` beside its own) and the ASGI middleware
that counts requests and enforces the request size limit.

- ``moon3_requests_total{model, protocol, status}``: inference requests by HTTP status (4xx included);
- ``moon3_request_seconds{model, protocol}``: end-to-end latency of inference requests;
- ``moon3_batch_size``: items per forward (dynamic batching); ``moon3_forward_seconds``: time per forward.
"""

from __future__ import annotations

import re
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import orjson
from prometheus_client import Counter, Histogram

REQUESTS = Counter("moon3_requests_total", "Inference requests by model, protocol and HTTP status.",
                   ["model", "protocol", "status"])  # fmt: skip
LATENCY = Histogram(
    "moon3_request_seconds",
    "End-to-end latency of inference requests.",
    ["model", "protocol"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
)
BATCH_SIZE = Histogram("moon3_batch_size", "Items per forward.", buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))
FORWARD_SECONDS = Histogram(
    "moon3_forward_seconds", "Seconds per batched forward.",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
)  # fmt: skip

_V1 = re.compile(r"^/v1/models/([^/:]+):(?:predict|explain)$")
_V2 = re.compile(r"^/v2/models/([^/]+)(?:/versions/[^/]+)?/infer$")

ASGIApp = Callable[[dict, Callable, Callable], Awaitable[None]]


def observe_batch(items: int, seconds: float) -> None:
    """Record one forward (the batcher's ``on_batch``)."""
    BATCH_SIZE.observe(items)
    FORWARD_SECONDS.observe(seconds)


def route(path: str) -> tuple[str, str] | None:
    """``(model name, protocol)`` of an inference path, None for any other path."""
    if m := _V1.match(path):
        return m.group(1), "v1"
    if m := _V2.match(path):
        return m.group(1), "v2"
    return None


class _TooLarge(Exception):
    pass


class ServeMiddleware:
    """Counts and times inference requests by status, and answers 413 to a body over ``max_request_bytes``.

    Args:
        app: the ASGI app.
        models: the served model names (any other name is counted as ``unknown``: bounded label values).
        max_request_bytes: largest accepted request body.
    """

    def __init__(self, app: ASGIApp, models: Iterable[str] = (), max_request_bytes: int = 32 * 1024 * 1024):
        self.app = app
        self.models = set(models)
        self.max_request_bytes = max_request_bytes

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        target = route(scope.get("path", ""))
        status: dict[str, Any] = {"code": 500, "sent": False}

        async def send_wrapper(message: dict) -> None:
            if message["type"] == "http.response.start":
                status["code"], status["sent"] = message["status"], True
            await send(message)

        limit = self.max_request_bytes
        length = dict(scope.get("headers") or []).get(b"content-length")
        try:
            if length is not None and length.isdigit() and int(length) > limit:
                raise _TooLarge
            seen = 0

            async def receive_wrapper() -> dict:
                nonlocal seen
                message = await receive()
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise _TooLarge
                return message

            await self.app(scope, receive_wrapper, send_wrapper)
        except _TooLarge:
            if not status["sent"]:
                body = orjson.dumps({"error": f"request body larger than the limit of {limit} bytes"})
                await send_wrapper({"type": "http.response.start", "status": 413,
                                    "headers": [(b"content-type", b"application/json")]})  # fmt: skip
                await send({"type": "http.response.body", "body": body})
        finally:
            if target is not None:
                name, protocol = target
                model = name if name in self.models else "unknown"
                REQUESTS.labels(model, protocol, str(status["code"])).inc()
                LATENCY.labels(model, protocol).observe(time.perf_counter() - started)
