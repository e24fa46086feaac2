"""The two KServe models: ``moon3`` (embeddings) and ``moon3-search`` (top-k products), both over one engine.

``moon3``, v1 response::

    {"predictions": [{"embedding": [...]}, ...], "model": "moon3", "reasoning": false}

(each prediction also has ``"trace"`` with ``"return_trace": true`` and reasoning on). v2 response: output
``embedding`` FP32 ``[N, embed_dim]`` (and ``trace`` BYTES ``[N]``).

``moon3-search``, v1 response::

    {"predictions": [{"results": [{"product_id": "p1", "score": 0.83, "title": "..."}, ...]}, ...]}

v2: outputs ``product_id`` BYTES ``[N, k]`` and ``score`` FP32 ``[N, k]``. Parameters: ``top_k`` (default
``serve.default_top_k``, at most ``serve.max_top_k``), ``reasoning``, ``return_trace``.

A malformed request raises KServe's ``InvalidInput``: the server answers 400 with ``{"error": message}``.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import numpy as np

from moon3.serve.engine import Moon3Engine
from moon3.serve.inputs import Limits, ParsedRequest, RequestError, parse_v1, parse_v2
from moon3.serve.kserve_compat import kserve

InferRequest = kserve.InferRequest
InferResponse = kserve.InferResponse
InferOutput = kserve.InferOutput
InvalidInput = kserve.errors.InvalidInput


class Moon3Model(kserve.Model):
    """The embedding model (``search=False``) or the search model (``search=True``) of an engine.

    Readiness is the engine's: False until the model (and, for search, the index) is loaded.
    """

    def __init__(self, name: str, engine: Moon3Engine, search: bool = False):
        super().__init__(name)
        self.engine = engine
        self.search = search
        self.limits = Limits.from_config(engine.cfg)

    def start(self) -> None:
        """Nothing to start: the server loads the engine in the background (readiness follows it)."""

    def load(self) -> bool:
        """Load the engine now (blocking) unless it is loaded; returns readiness."""
        if not self.engine.ready:
            self.engine.load()
        self.ready = self.engine.ready and (not self.search or self.engine.index is not None)
        return self.ready

    async def healthy(self) -> bool:
        """Ready to serve: the engine is loaded (and has an index, for search)."""
        self.ready = self.engine.ready and (not self.search or self.engine.index is not None)
        return self.ready

    def _parse(self, payload: Any) -> ParsedRequest:
        if isinstance(payload, InferRequest):
            return parse_v2(payload, self.limits, self.search)
        return parse_v1(payload, self.limits, self.search)

    @staticmethod
    def _has_images(payload: Any) -> bool:
        """Whether the request carries image fields (decoded off the event loop; text is parsed in place)."""
        if isinstance(payload, InferRequest):
            return any(inp.name == "image" for inp in payload.inputs or [])
        instances = payload.get("instances") if isinstance(payload, dict) else None
        return not isinstance(instances, list) or any(isinstance(i, dict) and i.get("image") for i in instances)

    async def predict(self, payload: Any, headers: dict[str, str] | None = None) -> Any:
        """Embed (or search for) the request's items; a v2 request gets a v2 response, a v1 request a v1 one."""
        loop = asyncio.get_running_loop()
        try:
            # Base64 and image decoding off the event loop: a large image must not stall other requests.
            if self._has_images(payload):
                request = await loop.run_in_executor(None, self._parse, payload)
            else:
                request = self._parse(payload)
            reasoning = self.engine.reasoning_for(request.parameters.get("reasoning"), self.search)
            top_k = request.parameters.get("top_k", self.engine.cfg.default_top_k)
            if self.search and not 1 <= top_k <= self.limits.max_top_k:
                raise RequestError(f"'top_k' must be between 1 and {self.limits.max_top_k}, got {top_k}")
        except RequestError as err:
            raise InvalidInput(str(err)) from None
        if request.outputs and "trace" in request.outputs and not reasoning:
            raise InvalidInput("output 'trace' requested, but this request embeds with reasoning off (no trace)")
        embeddings, traces = await self.engine.embed(request.items, reasoning)
        if not (request.parameters.get("return_trace") and traces is not None):
            traces = None
        v2 = isinstance(payload, InferRequest)
        if self.search:
            # FAISS releases the GIL; off the event loop a large gallery does not stall other requests.
            scores, ids = await loop.run_in_executor(None, self.engine.search, embeddings, top_k)
            return self._search_v2(request, scores, ids, traces) if v2 else self._search_v1(scores, ids, traces)
        if v2:
            return self._embed_v2(request, embeddings, traces)
        predictions = [{"embedding": row.tolist()} for row in embeddings]
        for p, trace in zip(predictions, traces or [], strict=False):
            p["trace"] = trace
        return {"predictions": predictions, "model": self.name, "reasoning": reasoning}

    def _response(self, request: ParsedRequest, outputs: list) -> Any:
        if request.outputs:  # only the outputs the request names, in its order
            by_name = {o.name: o for o in outputs}
            outputs = [by_name[name] for name in request.outputs]
        # Always an id: KServe 0.21 drops the connection on a v2 response without one.
        return InferResponse(response_id=request.request_id or uuid.uuid4().hex, model_name=self.name,
                             infer_outputs=outputs)  # fmt: skip

    def _embed_v2(self, request: ParsedRequest, embeddings: np.ndarray, traces: list[str] | None) -> Any:
        out = InferOutput(name="embedding", shape=list(embeddings.shape), datatype="FP32")
        out.set_data_from_numpy(np.ascontiguousarray(embeddings, dtype=np.float32), binary_data=False)
        outputs = [out]
        if traces is not None:
            outputs.append(InferOutput(name="trace", shape=[len(traces)], datatype="BYTES", data=list(traces)))
        return self._response(request, outputs)

    def _search_v1(self, scores: np.ndarray, ids: list[list[str]], traces: list[str] | None) -> dict:
        products = self.engine.index.products if self.engine.index is not None else None
        predictions = []
        for i, row in enumerate(ids):
            results = []
            for pid, score in zip(row, scores[i].tolist(), strict=True):
                hit = {"product_id": pid, "score": score}
                if products is not None:
                    title = products.loc[pid, "title"]
                    hit["title"] = title if isinstance(title, str) else ""
                results.append(hit)
            prediction: dict[str, Any] = {"results": results}
            if traces is not None:
                prediction["trace"] = traces[i]
            predictions.append(prediction)
        return {"predictions": predictions, "model": self.name}

    def _search_v2(
        self, request: ParsedRequest, scores: np.ndarray, ids: list[list[str]], traces: list[str] | None
    ) -> Any:
        n, k = scores.shape
        id_out = InferOutput(name="product_id", shape=[n, k], datatype="BYTES", data=[p for row in ids for p in row])
        score_out = InferOutput(name="score", shape=[n, k], datatype="FP32")
        score_out.set_data_from_numpy(np.ascontiguousarray(scores, dtype=np.float32), binary_data=False)
        outputs = [id_out, score_out]
        if traces is not None:
            outputs.append(InferOutput(name="trace", shape=[n], datatype="BYTES", data=list(traces)))
        return self._response(request, outputs)

    def get_input_types(self) -> list[dict]:
        """v2 metadata: the inputs ``text`` and ``image``."""
        return [{"name": name, "datatype": "BYTES", "shape": [-1]} for name in ("text", "image")]

    def get_output_types(self) -> list[dict]:
        """v2 metadata: the outputs."""
        if self.search:
            return [{"name": "product_id", "datatype": "BYTES", "shape": [-1, -1]},
                    {"name": "score", "datatype": "FP32", "shape": [-1, -1]}]  # fmt: skip
        dim = self.engine.model.contract.embed_dim if self.engine.model is not None else -1
        return [{"name": "embedding", "datatype": "FP32", "shape": [-1, dim]}]
