"""What a teacher is asked and what it answers: the interface every trace teacher implements.

A :class:`SynthesisItem` is one training product or training query, described by the structured data and the
files a teacher may use. A teacher turns it into a trace *body* (the text between ``<think>`` and
``</think>``, method.md section 1). Teachers: ``attributes`` (offline, from the catalog's structured data),
``openai`` (any OpenAI-compatible chat-completions endpoint) and ``hf`` (a local Qwen-VL model).

Every teacher call goes through :func:`moon3.synthesis.client.run_teacher`, which adds bounded concurrency,
timeouts, retries and the content-addressed cache; a teacher only knows how to answer one item.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Protocol

PRODUCT, QUERY = "product", "query"

# The instruction every model teacher gets: the same attribute-deconstruction format the model learns.
TRACE_INSTRUCTION = (
    "Deconstruct this {kind} for product search. Answer with one line per fact, 'key: value', first the "
    "category path ('category: level1 > level2 > ...'), then each attribute you can see or read. "
    "Only facts that the image or the text supports; no other words."
)


def catalog_truth(category_path: Any, attributes: Any) -> tuple[tuple[str, ...], tuple[tuple[str, str], ...]]:
    """A product row's ``category_path`` and ``attributes`` (either may be None) as :class:`SynthesisItem` holds
    them: the facts a trace's claims are checked against."""
    path = tuple(category_path) if category_path is not None else ()
    return path, tuple(sorted((str(k), str(v)) for k, v in (attributes or {}).items()))


@dataclass(frozen=True)
class SynthesisItem:
    """One training product or query, as a teacher sees it.

    Attributes:
        item_id: ``product_id`` or ``query_id``.
        kind: ``product`` or ``query``.
        text: the product title or the query text (None when absent).
        image: image path relative to ``root``, or a URI (None when absent).
        root: the dataset folder that relative image paths start from.
        category_path: the product's (for a query: its positive product's) category path.
        attributes: the product's (for a query: its positive's) attributes, key -> value.
        query_type: the query's type (``text``, ``image``, ``multimodal``, ``category``); None for products.
    """

    item_id: str
    kind: str
    text: str | None
    image: str | None
    root: str
    category_path: tuple[str, ...] = ()
    attributes: tuple[tuple[str, str], ...] = ()
    query_type: str | None = None
    extra: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    def content_hash(self) -> str:
        """sha256 of everything a teacher may read (not the id): two items with the same content share it."""
        payload = {
            "kind": self.kind,
            "text": self.text,
            "image": self.image,
            "category_path": list(self.category_path),
            "attributes": sorted(self.attributes),
            "query_type": self.query_type,
        }
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


class Teacher(Protocol):
    """A source of traces.

    Attributes:
        name: ``attributes`` | ``openai`` | ``hf``.
        model: the teacher model's name (``attributes`` for the offline teacher).
        decoding: decoding parameters (temperature, max_tokens, seed, ...); part of the cache key.
    """

    name: str
    model: str
    decoding: dict[str, Any]

    def prompt_hash(self) -> str:
        """Hash of the prompt template this teacher uses (part of the cache key and of each trace's metadata)."""
        ...

    async def complete(self, item: SynthesisItem) -> str:
        """The trace body for ``item``. Raises :class:`TeacherError` (retryable or not) on failure."""
        ...


class TeacherError(RuntimeError):
    """A teacher call failed.

    Args:
        message: what happened (no secrets).
        retryable: a 429, 5xx, timeout or dropped connection: the client may try again.
        retry_after: seconds the server asked to wait (``Retry-After``), if it said.
    """

    def __init__(self, message: str, retryable: bool = False, retry_after: float | None = None):
        super().__init__(message)
        self.retryable = retryable
        self.retry_after = retry_after


def prompt_hash_of(*parts: str) -> str:
    """Short sha256 of a prompt template's parts."""
    return hashlib.sha256("\x1f".join(parts).encode()).hexdigest()[:16]
