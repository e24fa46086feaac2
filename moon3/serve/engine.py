"""What the served models share: one loaded embedder, its dynamic batcher, and the search index.

``moon3`` (embeddings) and ``moon3-search`` (top-k products) are two KServe models over one
:class:`Moon3Engine`, so a query and an embedding request batch together and the weights are in memory once.
Every embedding goes through :meth:`Moon3Embedder.embed` (the same call as ``moon3 embed`` and the evaluation).
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import numpy as np
import torch

from moon3.common.redact import redact_text
from moon3.eval.search import exact_search
from moon3.model import contract as C
from moon3.model.contract import EmbeddingContract
from moon3.model.embedder import Moon3Embedder, TraceStats
from moon3.model.items import Item
from moon3.serve.batching import DynamicBatcher
from moon3.serve.config import ServeConfig
from moon3.serve.index import SearchIndex, load_index, model_fingerprint
from moon3.serve.inputs import RequestError
from moon3.serve.metrics import observe_batch
from moon3.serve.resolve import resolve_index_uri, resolve_model_uri

log = logging.getLogger("moon3.serve")


class _KeepTraces(TraceStats):
    """Trace statistics that keep every generated trace (the served response may return them)."""

    def add(self, traces: list[list[int]], end_id: int, seconds: float, keep: int = 8) -> None:
        super().add(traces, end_id, seconds, keep=self.n + len(traces))


def pick_device(name: str) -> torch.device:
    """``auto`` = the first GPU when there is one, else the CPU; otherwise ``name`` as torch reads it."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class Moon3Engine:
    """The model, batcher and index behind the served endpoints.

    Args:
        cfg: the ``serve`` section.
        model_uri: model folder, ``gs://`` prefix or MLflow URI.
        index_uri: index folder or ``gs://`` prefix; '' or None = no search.
        trust_remote_code: the user's own ``model.trust_remote_code`` (a saved folder never grants it).
    """

    def __init__(self, cfg: ServeConfig, model_uri: str, index_uri: str | None = None, trust_remote_code: bool = False):
        self.cfg = cfg
        self.model_uri = model_uri
        self.index_uri = index_uri or None
        self.trust_remote_code = trust_remote_code
        self.model: Moon3Embedder | None = None
        self.index: SearchIndex | None = None
        self.batcher: DynamicBatcher | None = None
        self.fingerprint = ""
        self.ready = False
        self._search_lock = threading.Lock()  # exact_search sets FAISS globals for the duration of a call

    # --- loading ---------------------------------------------------------------------------------------------

    def load(self) -> None:
        """Load the model (and the index, checked against it); then the engine is ready.

        Raises:
            ContractError: the model or index does not fit this code, the caller's trust setting, or each other.
            FileNotFoundError: the model or index is missing.
        """
        if self.cfg.torch_threads > 0:
            torch.set_num_threads(self.cfg.torch_threads)
        log.info("loading model %s", redact_text(self.model_uri))
        local = resolve_model_uri(self.model_uri)
        model = Moon3Embedder.from_pretrained(local, trust_remote_code=self.trust_remote_code)
        self.model = model.to(pick_device(self.cfg.device)).eval()
        self.fingerprint = model_fingerprint(local)
        if self.index_uri:
            log.info("loading index %s", redact_text(self.index_uri))
            self.index = load_index(resolve_index_uri(self.index_uri), self.model.contract, self.fingerprint)
        self.batcher = DynamicBatcher(self._forward, self.cfg.max_batch_size, self.cfg.max_wait_ms,
                                      enabled=self.cfg.batching, on_batch=observe_batch)  # fmt: skip
        self.ready = True
        log.info("ready: %s on %s, index %s", self.contract.readout, self.model.device,
                 f"{len(self.index)} products" if self.index else "none")  # fmt: skip

    @property
    def contract(self) -> EmbeddingContract:
        """The served model's contract."""
        if self.model is None:
            raise RuntimeError("the model is not loaded yet")
        return self.model.contract

    # --- inference -------------------------------------------------------------------------------------------

    def reasoning_for(self, requested: bool | None, search: bool = False) -> bool:
        """The reasoning mode of a request, within what the contract (and, for search, the index) allows.

        Off is always allowed; on only for a model whose contract embeds with a trace by default or that was
        trained to write traces. A search query uses the gallery's mode, so a request for the other is refused.

        Raises:
            RequestError: the requested mode is not allowed.
        """
        contract = self.contract
        if search and self.index is not None:
            if requested is not None and requested != self.index.reasoning:
                raise RequestError(
                    f"'reasoning': the index was embedded with reasoning {'on' if self.index.reasoning else 'off'}; "
                    "queries are embedded in the same mode"
                )
            return self.index.reasoning
        if requested is None:
            return contract.reasoning
        if requested and not (contract.reasoning or contract.trained_with_traces):
            raise RequestError("'reasoning': this model was trained without traces and embeds directly "
                               "(contract trained_with_traces=false); reasoning=true is refused")  # fmt: skip
        return requested

    def _forward(self, items: list[Item], reasoning: bool) -> tuple[np.ndarray, list[str] | None]:
        """One batch through :meth:`Moon3Embedder.embed` (runs in the batcher's thread)."""
        assert self.model is not None
        stats = _KeepTraces() if reasoning else None
        vectors = self.model.embed(items, reasoning=reasoning, batch_size=len(items), trace_stats=stats)
        traces = None
        if stats is not None:
            end = self.model.token_ids[C.THINK_END]
            tok = self.model.tokenizer
            traces = [tok.decode([i for i in ids if i != end], skip_special_tokens=True) for ids in stats.examples]
        return vectors.numpy().astype(np.float32, copy=False), traces

    async def embed(self, items: list[Item], reasoning: bool) -> tuple[np.ndarray, list[str] | None]:
        """Embeddings (and traces, with reasoning on) of ``items``, batched with concurrent requests."""
        if self.batcher is None:
            raise RuntimeError("the model is not loaded yet")
        return await self.batcher.submit(items, reasoning)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, list[list[str]]]:
        """Exact top-``k`` (the evaluation's :func:`~moon3.eval.search.exact_search`): scores and product ids."""
        if self.index is None:
            raise RuntimeError("no search index is loaded")
        with self._search_lock:
            scores, rows = exact_search(queries, self.index.index, k)
        return scores, [[self.index.ids[j] for j in row] for row in rows]

    def info(self) -> dict:
        """What the demo page and logs show about the served model and index."""
        out = {"ready": self.ready, "model": redact_text(self.model_uri), "index": None}
        if self.model is not None:
            c = self.contract
            out.update(embed_dim=c.embed_dim, reasoning=c.reasoning, trained_with_traces=c.trained_with_traces,
                       reasoning_label=C.reasoning_label(c.reasoning, c.trained_with_traces),
                       contract_version=c.version, fingerprint=self.fingerprint[:12])  # fmt: skip
        if self.index is not None:
            meta = self.index.meta
            out["index"] = {"products": len(self.index), "reasoning": self.index.reasoning,
                            "split": meta.get("split"), "dataset": meta.get("dataset")}  # fmt: skip
        return out

    def product_image(self, product_id: str) -> str | None:
        """The gallery image location of a product (None when unknown or without an image)."""
        if self.index is None or product_id not in self.index.products.index:
            return None
        uri = self.index.products.loc[product_id, "image"]
        return uri if isinstance(uri, str) and uri.strip() else None

    def close(self) -> None:
        """Stop the batcher."""
        if self.batcher is not None:
            self.batcher.close()


def local_index_exists(uri: str) -> bool:
    """False only for a local index path that does not exist (gs:// prefixes are checked when loaded)."""
    return uri.startswith("gs://") or Path(uri).exists()
