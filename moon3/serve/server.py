"""``moon3 serve``: the KServe ModelServer with the moon3 and moon3-search models, metrics and the demo page.

The server starts listening at once and loads the model and index in the background: liveness
(``/v2/health/live``) is true from the start, readiness (``/v2/health/ready``, ``/v2/models/NAME/ready``,
``/v1/models/NAME``) only once everything is loaded. A load that fails (missing folder, contract or fingerprint
mismatch, a folder asking for remote code) stops the server with exit code 1 and one log line saying why.

Differences from ``kserve.ModelServer.start``: the REST server binds ``serve.host`` (KServe 0.21 hard-codes
0.0.0.0), gRPC is optional (``serve.enable_grpc``), server readiness covers every model, and models are
registered before they are ready.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from typing import Any

from moon3.common.redact import redact_text
from moon3.serve.config import ServeConfig
from moon3.serve.engine import Moon3Engine
from moon3.serve.kserve_compat import FASTAPI_APP_IMPORT_STRING, DataPlane, RESTServer, kserve
from moon3.serve.metrics import ServeMiddleware
from moon3.serve.predictor import Moon3Model

log = logging.getLogger("moon3.serve")


class Moon3DataPlane(DataPlane):
    """KServe's data plane with a server readiness that means something (every registered model is ready) and
    a 400 instead of a 500 for a v2 binary request KServe cannot decode."""

    async def ready(self) -> bool:
        """True when there is at least one model and all of them are ready."""
        models = list(self.model_registry.get_models().values())
        return bool(models) and all([await m.healthy() for m in models])

    def decode_inference_request(self, body: Any, headers: dict, model_name: str) -> Any:
        """KServe's decoding; its errors on a malformed binary-extension body become 400s that say why."""
        try:
            return super().decode_inference_request(body, headers, model_name)
        except kserve.errors.InferenceError as err:
            raise kserve.errors.InvalidInput(
                f"cannot decode the binary request ({' '.join(str(err).split())[:200]}); BYTES rows must be UTF-8 "
                "text: send images base64-encoded"
            ) from None
        except (KeyError, TypeError, ValueError) as err:
            raise kserve.errors.InvalidInput(f"malformed binary request: {type(err).__name__}: {err}") from None


def build_models(engine: Moon3Engine) -> list[Moon3Model]:
    """The served models: ``moon3`` always, ``moon3-search`` when the engine has an index to load."""
    models = [Moon3Model(engine.cfg.model_name, engine)]
    if engine.index_uri:
        models.append(Moon3Model(engine.cfg.search_name, engine, search=True))
    return models


class Moon3Server(kserve.ModelServer):
    """A ``kserve.ModelServer`` bound to ``cfg.host`` that loads its engine after it starts listening."""

    def __init__(self, cfg: ServeConfig):
        super().__init__(http_port=cfg.http_port, grpc_port=cfg.grpc_port, workers=1, enable_grpc=cfg.enable_grpc,
                         enable_latency_logging=False)  # fmt: skip
        self.cfg = cfg
        self.dataplane = Moon3DataPlane(model_registry=self.registered_models)
        self.load_error: str | None = None
        # KServe's per-request timing lines (two per request) repeat what moon3_request_seconds measures.
        logging.getLogger("kserve.trace").setLevel(logging.WARNING)
        moon3_log = logging.getLogger("moon3")
        if not moon3_log.handlers:  # log like KServe does (its handler, its format)
            moon3_log.handlers = list(logging.getLogger("kserve").handlers)
            moon3_log.setLevel(logging.INFO)
            moon3_log.propagate = False

    def start(self, models: list[Any], engine: Moon3Engine | None = None) -> None:  # type: ignore[override]
        """Register ``models`` (not ready yet), serve, and load ``engine`` in the background; blocks until the
        server stops."""
        app = kserve.model_server.app
        for model in models:
            self.register_model(model)
        app.add_middleware(ServeMiddleware, models=[m.name for m in models],
                           max_request_bytes=self.cfg.max_request_bytes)  # fmt: skip
        if engine is not None and self.cfg.demo and engine.index_uri:
            from moon3.serve.demo import add_demo_routes

            add_demo_routes(app, engine)
        rest = RESTServer(FASTAPI_APP_IMPORT_STRING, self.dataplane, self.model_repository_extension, self.http_port,
                          grace_period=self.grace_period, event_loop=self.event_loop,
                          timeout_keep_alive=self.timeout_keep_alive)  # fmt: skip
        rest.config.host = self.cfg.host
        self._rest_server = rest
        self.servers = [rest.start()]
        if self.enable_grpc:
            from kserve.protocol.grpc.server import GRPCServer

            kwargs = vars(kserve.model_server.args)
            self._grpc_server = GRPCServer(self.grpc_port, self.dataplane, self.model_repository_extension,
                                           kwargs=kwargs, grace_period=self.grace_period)  # fmt: skip
            self.servers.append(self._grpc_server.start(self.max_threads))
        if engine is not None:
            self.servers.append(self._load(engine))
        asyncio.run(self._serve())

    async def _load(self, engine: Moon3Engine) -> None:
        try:
            await asyncio.get_running_loop().run_in_executor(None, engine.load)
        except Exception as err:  # any failure: say why in one line and stop (exit code 1)
            self.load_error = redact_text(f"{type(err).__name__}: {' '.join(str(err).split())}")
            log.error("loading failed, stopping: %s", self.load_error)
            self._rest_server._server.should_exit = True
            if self._grpc_server is not None:
                await self._grpc_server.stop(signal.SIGTERM)


# The forward thread releases the GIL around every torch op and must win it back from the event loop; with
# Python's default 5 ms switch interval a busy event loop can make each re-acquisition wait up to 5 ms. With
# 0.5 ms the tiny CPU model served ~9 % more requests/s at concurrency 32 (4 interleaved runs each on a busy
# 2-core machine: within its noise, but never worse on average).
SWITCH_INTERVAL_S = 0.0005


def serve(cfg: ServeConfig, model_uri: str, index_uri: str | None, trust_remote_code: bool = False) -> int:
    """Run the server until it is stopped (SIGINT/SIGTERM); returns the exit code (1 when loading failed).

    Args:
        cfg: the ``serve`` section.
        model_uri: model folder, ``gs://`` prefix or MLflow URI.
        index_uri: index folder or ``gs://`` prefix; '' or None = no search model and no demo page.
        trust_remote_code: the user's own ``model.trust_remote_code``.
    """
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    engine = Moon3Engine(cfg, model_uri, index_uri, trust_remote_code=trust_remote_code)
    server = Moon3Server(cfg)
    try:
        server.start(build_models(engine), engine)
    finally:
        engine.close()
    return 1 if server.load_error else 0
