"""The ``openai`` teacher: any OpenAI-compatible chat-completions endpoint (OpenAI, vLLM, SGLang, TGI, ...).

The teacher sees what the embedding model will see, the image and the text, and never the catalog's
attribute data: a trace must come from reading the product itself (the ``attributes`` teacher is the one that
uses structured data). The API key is read from an environment variable at call time and goes only into the
``Authorization`` header: it is not part of ``decoding``, of the cache key, of errors or of logs.

The HTTP client is aiohttp, not httpx: on the 2-core machine httpx's connection pool cost 1.7-2.7 ms of CPU
per request at 32 connections and 9-10 ms at 64 (its pool scans every connection for every queued request),
which capped a 160 traces/s teacher at ~100/s; aiohttp costs ~0.2 ms (BENCHMARKS.md, synthesis client).
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
from typing import Any

import aiohttp

from moon3.common.retry import retry_after_s
from moon3.data.io import load_image
from moon3.synthesis.teacher import TRACE_INSTRUCTION, SynthesisItem, TeacherError, prompt_hash_of

SYSTEM_PROMPT = (
    "You are a product-search annotator. You describe only what the given product or query shows: its image "
    "and its text. You never guess facts that are not visible or written."
)


def strip_think(text: str) -> str:
    """Drop a leading ``<think>`` and a trailing ``</think>`` (some teachers wrap their answer in them)."""
    text = text.strip()
    if text.startswith("<think>"):
        text = text[len("<think>") :]
    if text.endswith("</think>"):
        text = text[: -len("</think>")]
    return text.strip()


def png_data_url(image: str, root: str) -> str:
    """The item's image, decoded and re-encoded as PNG, as a ``data:image/png;base64,...`` URL."""
    buf = io.BytesIO()
    load_image(image, root).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


class OpenAITeacher:
    """Trace teacher over an OpenAI-compatible ``/chat/completions`` endpoint.

    Args:
        base_url: the API root, e.g. ``http://127.0.0.1:8000/v1``.
        model: the model name sent with each request.
        api_key_env: name of the environment variable holding the API key (unset or empty: no header).
        temperature: sampling temperature.
        max_tokens: answer length limit.
        seed: sampling seed, if the server supports one.
        request_timeout_s: the HTTP session's own limit, a backstop; ``run_teacher`` applies the per-call timeout.
    """

    name = "openai"

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key_env: str = "OPENAI_API_KEY",
        temperature: float = 0.0,
        max_tokens: int = 256,
        seed: int | None = None,
        request_timeout_s: float = 600.0,
    ):
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model = model
        self.api_key_env = api_key_env
        self.decoding: dict[str, Any] = {"temperature": temperature, "max_tokens": max_tokens, "seed": seed}
        self.request_timeout_s = request_timeout_s
        self._session: aiohttp.ClientSession | None = None

    def prompt_hash(self) -> str:
        """Hash of the system prompt and the trace instruction."""
        return prompt_hash_of(SYSTEM_PROMPT, TRACE_INSTRUCTION)

    def messages(self, item: SynthesisItem, image_url: str | None = None) -> list[dict[str, Any]]:
        """The chat messages for ``item``: instruction, the text, the image (no attribute data)."""
        label = "Product title" if item.kind == "product" else "Query"
        text = TRACE_INSTRUCTION.format(kind=item.kind)
        if item.text:
            text += f"\n\n{label}: {item.text}"
        content: list[dict[str, Any]] = [{"type": "text", "text": text}]
        if image_url is not None:
            content.append({"type": "image_url", "image_url": {"url": image_url}})
        return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": content}]

    def _http(self) -> aiohttp.ClientSession:
        # Created lazily inside the running loop (a session is bound to the loop that creates it); connections
        # are bounded by run_teacher's semaphore, so the connector itself is not (limit=0).
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0),
                timeout=aiohttp.ClientTimeout(total=self.request_timeout_s),
            )
        return self._session

    async def complete(self, item: SynthesisItem) -> str:
        """The trace body for ``item``.

        Raises:
            TeacherError: retryable for 429, 5xx, transport errors and malformed answers; not for other 4xx.
        """
        image_url = await asyncio.to_thread(png_data_url, item.image, item.root) if item.image else None
        body: dict[str, Any] = {"model": self.model, "messages": self.messages(item, image_url)}
        body.update({k: v for k, v in self.decoding.items() if v is not None})
        headers = {}
        if key := os.environ.get(self.api_key_env):
            headers["Authorization"] = f"Bearer {key}"
        try:
            async with self._http().post(self.url, json=body, headers=headers) as resp:
                status, reason, retry_after = resp.status, resp.reason, resp.headers.get("Retry-After")
                data = await resp.read()
        # Connect/read errors, dropped connections, the session's own timeout. The exception's text is left out:
        # one line of ours is enough, and nothing of the request (its headers included) can reach it.
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise TeacherError(f"{type(exc).__name__} calling {self.url}", retryable=True) from None
        if status == 429 or status >= 500:
            raise TeacherError(f"HTTP {status} from {self.url}", True, retry_after_s(retry_after))
        if status >= 400:
            raise TeacherError(f"HTTP {status} {reason} from {self.url}{_error_code(data)}")
        try:
            content = json.loads(data)["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            raise TeacherError(f"malformed answer from {self.url} (no choices[0].message.content)", True) from None
        if not isinstance(content, str) or not strip_think(content):
            raise TeacherError(f"empty answer from {self.url}", retryable=True)
        return strip_think(content)

    async def aclose(self) -> None:
        """Close the HTTP session; the next call opens a new one (possibly on another event loop)."""
        if self._session is not None:
            session, self._session = self._session, None
            await session.close()


def _error_code(data: bytes) -> str:
    """`` (code: ...)`` from an OpenAI-style error body; its free-text message is left out (it may echo the key)."""
    try:
        error = json.loads(data).get("error") or {}
        code = error.get("code") or error.get("type")
    except (ValueError, AttributeError):
        return ""
    return f" (code: {str(code)[:60]})" if code else ""
