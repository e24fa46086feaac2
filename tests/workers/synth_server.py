"""A scripted OpenAI chat-completions server on 127.0.0.1 for the synthesis client tests.

Plain asyncio HTTP/1.1 (keep-alive, Content-Length bodies) in a background thread, so a test can drop a
connection or send broken JSON, which a framework would not let it do. What the server does with the n-th
request for an item (recognised by the item's text in the user message) is scripted per text; the last action
repeats. Answers are a pure function of the request's user content, so two runs agree trace for trace.

Actions: ``ok``, ``think`` (ok, wrapped in <think>...</think>), ``500``, ``429:<seconds>`` (Retry-After),
``slow`` (answers after ``slow_s``), ``drop`` (closes the connection without answering), ``badjson``,
``nochoices``, ``400``, ``401``.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import threading
import time
from dataclasses import dataclass, field
from typing import Any

_REASONS = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 429: "Too Many Requests", 500: "Server Error"}


@dataclass
class Seen:
    """One request as the server saw it."""

    text: str
    arrived: float
    authorization: str | None
    body: dict[str, Any]


def trace_for(user_content: Any) -> str:
    """The deterministic answer for a user message."""
    digest = hashlib.sha256(json.dumps(user_content, sort_keys=True).encode()).hexdigest()[:12]
    text = _item_text(user_content)
    return f"category: shop > {text}\nsignature: {digest}"


def _item_text(user_content: Any) -> str:
    parts = user_content if isinstance(user_content, list) else [{"type": "text", "text": user_content}]
    for part in parts:
        if part.get("type") == "text":
            match = re.search(r"(?:Product title|Query): (.*)", part["text"])
            if match:
                return match.group(1).strip()
    return ""


@dataclass
class ScriptedServer:
    """The server; ``with ScriptedServer(...) as s: s.base_url``.

    Args:
        script: item text -> actions for its 1st, 2nd, ... request (the last repeats); absent texts get ``ok``.
        latency_s: time every answer takes.
        slow_s: time a ``slow`` answer takes.
    """

    script: dict[str, list[str]] = field(default_factory=dict)
    latency_s: float = 0.0
    slow_s: float = 2.0
    seen: list[Seen] = field(default_factory=list)
    max_in_flight: int = 0
    _in_flight: int = 0

    def __enter__(self) -> ScriptedServer:
        self._loop = asyncio.new_event_loop()
        ready = threading.Event()
        self._thread = threading.Thread(target=self._serve, args=(ready,), daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("scripted server did not start")
        return self

    def __exit__(self, *exc: object) -> None:
        self._loop.call_soon_threadsafe(self._stop_event.set)
        self._thread.join(10)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def texts(self) -> list[str]:
        """Item texts of every request so far, in arrival order."""
        return [s.text for s in list(self.seen)]

    def _serve(self, ready: threading.Event) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self._main(ready))
        self._loop.close()

    async def _main(self, ready: threading.Event) -> None:
        self._stop_event = asyncio.Event()
        server = await asyncio.start_server(self._connection, "127.0.0.1", 0)
        self.port = server.sockets[0].getsockname()[1]
        ready.set()
        async with server:
            await self._stop_event.wait()
            server.close()
            handlers = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in handlers:
                task.cancel()
            await asyncio.gather(*handlers, return_exceptions=True)
            await asyncio.sleep(0.01)  # the closed transports' callbacks run before the loop closes

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:  # one request per turn until the client closes (keep-alive)
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")[1:]
                headers = {k.lower(): v for k, _, v in (line.partition(": ") for line in lines) if v}
                body = json.loads(await reader.readexactly(int(headers.get("content-length", "0"))))
                if not await self._answer(body, headers, writer):
                    break
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    async def _answer(self, body: dict[str, Any], headers: dict[str, str], writer: asyncio.StreamWriter) -> bool:
        user = body["messages"][-1]["content"]
        text = _item_text(user)
        n = sum(s.text == text for s in self.seen)
        self.seen.append(Seen(text, time.monotonic(), headers.get("authorization"), body))
        actions = self.script.get(text, ["ok"])
        action = actions[min(n, len(actions) - 1)]
        self._in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self._in_flight)
        try:
            await asyncio.sleep(self.slow_s if action == "slow" else self.latency_s)
        finally:
            self._in_flight -= 1
        if action == "drop":
            return False
        extra = ""
        status, payload = 200, {"choices": [{"message": {"role": "assistant", "content": trace_for(user)}}]}
        if action == "think":
            payload["choices"][0]["message"]["content"] = f"<think>\n{trace_for(user)}\n</think>"
        elif action in ("500", "400", "401"):
            status, payload = int(action), {"error": {"message": f"scripted {action}", "code": f"scripted_{action}"}}
        elif action.startswith("429"):
            status, payload = 429, {"error": {"message": "slow down"}}
            extra = f"Retry-After: {action.split(':')[1]}\r\n"
        elif action == "nochoices":
            payload = {"id": "x", "object": "chat.completion"}
        data = b'{"choices": [' if action == "badjson" else json.dumps(payload).encode()
        head = f"HTTP/1.1 {status} {_REASONS[status]}\r\nContent-Type: application/json\r\n"
        writer.write(f"{head}Content-Length: {len(data)}\r\n{extra}\r\n".encode() + data)
        await writer.drain()
        return True
