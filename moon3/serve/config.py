"""Configuration of serving and deployment (``params.yaml`` section ``serve``).

Three groups of keys: what ``moon3 serve`` loads and where it listens; the predictor's batching and input limits;
and the KServe deployment (``moon3 deploy`` renders an InferenceService and a ServingRuntime from them).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

MiB = 1024 * 1024


@dataclass
class ServeConfig:
    """The moon3 model server (KServe), its search index, and its deployment."""

    # --- what is served ---------------------------------------------------------------------------------------
    model_dir: str = field(
        default="models/rl/final",
        metadata={
            "help": "Model to serve: a moon3 model folder, a gs:// prefix, or an MLflow model URI "
            "(models:/NAME/VERSION, models:/NAME@ALIAS, runs:/RUN_ID/PATH), downloaded to local files."
        },
    )
    index_dir: str = field(
        default="models/index",
        metadata={
            "help": "Search index written by `moon3 index build` (folder or gs:// prefix), served as the "
            "search model; '' = no search model. Refused if built with another model or contract."
        },
    )
    index_data_dir: str = field(
        default="data/validated", metadata={"help": "`moon3 index build`: dataset whose products form the gallery."}
    )
    index_split: Literal["all", "train", "eval"] = field(
        default="all", metadata={"help": "`moon3 index build`: which products go into the gallery."}
    )
    model_name: str = field(default="moon3", metadata={"help": "Name of the embedding model on the endpoints."})
    search_name: str = field(default="moon3-search", metadata={"help": "Name of the search model."})
    host: str = field(default="0.0.0.0", metadata={"help": "Address the REST server binds (127.0.0.1: local only)."})
    http_port: int = field(default=8080, metadata={"help": "REST port (v1, v2, health, /metrics, /demo)."})
    enable_grpc: bool = field(
        default=False,
        metadata={"help": "Also serve v2 over gRPC on grpc_port (KServe binds it to [::]; not covered by the tests)."},
    )
    grpc_port: int = field(default=8081, metadata={"help": "gRPC port (with enable_grpc)."})
    device: str = field(default="auto", metadata={"help": "auto (cuda when available) | cpu | cuda | cuda:N."})
    torch_threads: int = field(default=0, metadata={"help": "torch intra-op threads for the forward (0 = torch's)."})
    demo: bool = field(default=True, metadata={"help": "Serve the demo page at /demo (needs the search model)."})
    # --- batching and input limits ----------------------------------------------------------------------------
    batching: bool = field(
        default=True,
        metadata={"help": "Merge concurrent requests into one forward (off: one forward per request, in turn)."},
    )
    max_batch_size: int = field(default=32, metadata={"help": "Most items in one forward."})
    max_wait_ms: float = field(
        default=5.0, metadata={"help": "Longest a request waits for others to fill its batch (milliseconds)."}
    )
    max_items_per_request: int = field(default=64, metadata={"help": "Most items (instances / rows) per request."})
    max_request_bytes: int = field(default=32 * MiB, metadata={"help": "Largest request body (413 above it)."})
    max_image_bytes: int = field(default=8 * MiB, metadata={"help": "Largest image after base64 decoding."})
    max_image_pixels: int = field(default=4096 * 4096, metadata={"help": "Largest image width x height."})
    max_text_chars: int = field(default=8192, metadata={"help": "Longest text, in characters (400 above it)."})
    default_top_k: int = field(default=10, metadata={"help": "Search results per query when top_k is not given."})
    max_top_k: int = field(default=100, metadata={"help": "Largest top_k a search request may ask for."})
    # --- KServe deployment (`moon3 deploy`) -------------------------------------------------------------------
    isvc_name: str = field(default="moon3", metadata={"help": "InferenceService name."})
    namespace: str = field(default="moon3", metadata={"help": "Namespace of the InferenceService and runtime."})
    runtime_name: str = field(default="moon3-runtime", metadata={"help": "ServingRuntime name."})
    storage_uri: str = field(
        default="gs://example-bucket/moon3/models/rl/final",
        metadata={"help": "Model folder KServe's storage initializer copies to /mnt/models (gs://, s3://, pvc://)."},
    )
    index_uri: str = field(
        default="gs://example-bucket/moon3/models/index",
        metadata={"help": "Index folder the deployed server fetches itself (gs://); '' = no search model."},
    )
    variant: Literal["cpu", "gpu"] = field(default="cpu", metadata={"help": "Deployment variant: cpu | gpu."})
    image: str = field(default="ghcr.io/example/moon3:latest", metadata={"help": "Project image (CPU variant)."})
    gpu_image: str = field(
        default="ghcr.io/example/moon3:latest-cuda", metadata={"help": "Project image of the GPU variant."}
    )
    min_replicas: int = field(default=1, metadata={"help": "Fewest predictor replicas (0 = scale to zero)."})
    max_replicas: int = field(default=3, metadata={"help": "Most predictor replicas."})
    canary_traffic_percent: int = field(
        default=100,
        metadata={
            "help": "Share of traffic (0-100) the newly applied revision gets; 100 = full rollout (the field is "
            "left out), below 100 = canary, the previous revision keeps the rest."
        },
    )
    service_account: str = field(
        default="", metadata={"help": "Service account of the predictor pod (reads the storage and index URIs)."}
    )
    cpu_request: str = field(default="2", metadata={"help": "CPU request of the predictor container."})
    cpu_limit: str = field(default="4", metadata={"help": "CPU limit of the predictor container."})
    memory_request: str = field(default="4Gi", metadata={"help": "Memory request of the predictor container."})
    memory_limit: str = field(default="8Gi", metadata={"help": "Memory limit of the predictor container."})
    gpu_resource: str = field(default="nvidia.com/gpu", metadata={"help": "GPU variant: extended resource name."})
    gpu_count: int = field(default=1, metadata={"help": "GPU variant: GPUs per replica."})
    gpu_node_selector: dict[str, str] = field(
        default_factory=lambda: {"cloud.google.com/gke-accelerator": "nvidia-l4"},
        metadata={"help": "GPU variant: node labels of the GPU node pool."},
    )
    gpu_tolerations: list[dict[str, Any]] = field(
        default_factory=lambda: [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        metadata={"help": "GPU variant: tolerations (keys: key, operator, value, effect, toleration_seconds)."},
    )


# Numeric ranges beyond the default (finite, >= 0), merged into moon3.config.RANGES: (low, high, low_open).
SERVE_RANGES: dict[str, tuple[float | None, float | None, bool]] = {
    **dict.fromkeys(
        [
            "serve.max_batch_size",
            "serve.max_items_per_request",
            "serve.max_request_bytes",
            "serve.max_image_bytes",
            "serve.max_image_pixels",
            "serve.max_text_chars",
            "serve.default_top_k",
            "serve.max_top_k",
            "serve.max_replicas",
        ],
        (1, None, False),
    ),
    "serve.http_port": (1, 65535, False),
    "serve.grpc_port": (1, 65535, False),
    "serve.canary_traffic_percent": (0, 100, False),
}
