"""KServe manifests rendered from the ``serve`` section with KServe's own Python models.

- a ``ServingRuntime`` (``serving.kserve.io/v1alpha1``) for the project image: ``moon3 serve`` on port 8080,
  model format ``moon3`` (version = the contract's major version), protocols v1 and v2, readiness on
  ``/v2/health/ready`` (true once the model and index are loaded), liveness on ``/v2/health/live``;
- an ``InferenceService`` (``serving.kserve.io/v1beta1``) that uses it: ``storage_uri`` (copied to /mnt/models by
  KServe's storage initializer), the index URI the server fetches itself, replicas, resources, and for the GPU
  variant the GPU image, GPU limit, node selector and tolerations; ``canaryTrafficPercent`` when below 100.

The serving settings (batching, limits, names) travel as ``--set serve.KEY=VALUE`` arguments, which KServe
appends to the runtime's own arguments, so the deployed server runs with this ``params.yaml``'s values.
No CRD schema ships with the package: :func:`to_dict` serialises through the models, and :func:`round_trip`
parses a manifest back into them, the offline check the tests use.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import yaml

from moon3.model.contract import CONTRACT_VERSION
from moon3.serve.config import ServeConfig
from moon3.serve.kserve_compat import kserve

MODEL_FORMAT = "moon3"
MODEL_MOUNT = "/mnt/models"
HTTP_PORT = 8080
GROUP = "serving.kserve.io"
# The serve keys a deployed server takes from params.yaml (as --set arguments).
SERVING_KEYS = ("model_name", "search_name", "demo", "batching", "max_batch_size", "max_wait_ms",
                "max_items_per_request", "max_request_bytes", "max_image_bytes", "max_image_pixels",
                "max_text_chars", "default_top_k", "max_top_k", "torch_threads")  # fmt: skip
VARIANTS = ("cpu", "gpu")
REGISTRY_MODEL, REGISTRY_VERSION, REGISTRY_RUN_ID = (
    "moon3.io/registry-model",
    "moon3.io/registry-version",
    "moon3.io/registry-run-id",
)
_LABEL_VALUE = re.compile(r"^([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?$")


@dataclass(frozen=True)
class RegistryRef:
    """The MLflow registry version an InferenceService serves: registered model name, version, run id."""

    model: str
    version: str
    run_id: str = ""

    def annotations(self) -> dict[str, str]:
        """The ``moon3.io/registry-*`` annotations (empty values left out)."""
        values = {REGISTRY_MODEL: self.model, REGISTRY_VERSION: str(self.version), REGISTRY_RUN_ID: self.run_id}
        return {k: v for k, v in values.items() if v}

    def labels(self) -> dict[str, str]:
        """The same keys as labels, where the value is a valid label value (<= 63 characters, [-_.A-Za-z0-9])."""
        return {k: v for k, v in self.annotations().items() if _LABEL_VALUE.match(v)}

    @classmethod
    def from_metadata(cls, metadata: dict[str, Any] | None) -> RegistryRef | None:
        """Read the reference back from an object's ``metadata`` (annotations first, then labels); None if absent."""
        metadata = metadata or {}
        found = {**(metadata.get("labels") or {}), **(metadata.get("annotations") or {})}
        model, version = found.get(REGISTRY_MODEL), found.get(REGISTRY_VERSION)
        if not model or not version:
            return None
        return cls(str(model), str(version), str(found.get(REGISTRY_RUN_ID, "")))


def format_version() -> str:
    """The model format version: the contract's major version (a server only loads models of its contract)."""
    return CONTRACT_VERSION.split(".")[0]


def _labels(cfg: ServeConfig, variant: str | None = None) -> dict[str, str]:
    labels = {"app.kubernetes.io/name": "moon3", "app.kubernetes.io/component": "predictor",
              "moon3.io/contract-version": CONTRACT_VERSION}  # fmt: skip
    if variant:
        labels["moon3.io/variant"] = variant
    return labels


def _value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def serving_runtime(cfg: ServeConfig) -> Any:
    """The ``ServingRuntime`` for the project image (``V1alpha1ServingRuntime``)."""
    from kubernetes import client as k8s

    probe = lambda path, delay: k8s.V1Probe(  # noqa: E731
        http_get=k8s.V1HTTPGetAction(path=path, port=HTTP_PORT), initial_delay_seconds=delay, period_seconds=10
    )
    container = k8s.V1Container(
        name="kserve-container",
        image=cfg.image,
        command=["moon3", "serve"],
        args=["--model", MODEL_MOUNT, "--set", "serve.host=0.0.0.0", "--set", f"serve.http_port={HTTP_PORT}"],
        ports=[k8s.V1ContainerPort(container_port=HTTP_PORT, name="http1", protocol="TCP")],
        env=[k8s.V1EnvVar(name="MOON3_CACHE", value="/tmp/moon3-cache")],
        readiness_probe=probe("/v2/health/ready", 5),
        liveness_probe=probe("/v2/health/live", 30),
        resources=k8s.V1ResourceRequirements(requests={"cpu": "1", "memory": "2Gi"}),
        security_context=k8s.V1SecurityContext(run_as_non_root=True, allow_privilege_escalation=False),
    )
    spec = kserve.V1alpha1ServingRuntimeSpec(
        supported_model_formats=[
            kserve.V1alpha1SupportedModelFormat(name=MODEL_FORMAT, version=format_version(), auto_select=True)
        ],  # fmt: skip
        protocol_versions=["v1", "v2"],
        containers=[container],
        annotations={"prometheus.kserve.io/port": str(HTTP_PORT), "prometheus.kserve.io/path": "/metrics"},
    )
    meta = k8s.V1ObjectMeta(name=cfg.runtime_name, namespace=cfg.namespace, labels=_labels(cfg))
    return kserve.V1alpha1ServingRuntime(api_version=f"{GROUP}/v1alpha1", kind="ServingRuntime", metadata=meta,
                                         spec=spec)  # fmt: skip


def serving_args(cfg: ServeConfig) -> list[str]:
    """The ``moon3 serve`` arguments an InferenceService adds to the runtime's: index and serving settings."""
    args = ["--index", cfg.index_uri] if cfg.index_uri else ["--no-index"]
    for key in SERVING_KEYS:
        args += ["--set", f"serve.{key}={_value(getattr(cfg, key))}"]
    return args


def inference_service(cfg: ServeConfig, variant: str | None = None, registry: RegistryRef | None = None) -> Any:
    """The ``InferenceService`` of ``variant`` (default ``cfg.variant``) as a ``V1beta1InferenceService``.

    ``registry``: the registry version being served; its name, version and run id become annotations and labels
    of the InferenceService and of its predictor (the revision).

    Raises:
        ValueError: an unknown variant, no storage URI, or min_replicas above max_replicas.
    """
    from kubernetes import client as k8s

    variant = variant or cfg.variant
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {list(VARIANTS)}, got {variant!r}")
    if not cfg.storage_uri:
        raise ValueError("serve.storage_uri is empty: where should KServe copy the model from?")
    if cfg.min_replicas > cfg.max_replicas:
        raise ValueError(f"serve.min_replicas ({cfg.min_replicas}) > serve.max_replicas ({cfg.max_replicas})")
    gpu = variant == "gpu"
    requests = {"cpu": cfg.cpu_request, "memory": cfg.memory_request}
    limits = {"cpu": cfg.cpu_limit, "memory": cfg.memory_limit}
    if gpu:
        requests[cfg.gpu_resource] = limits[cfg.gpu_resource] = str(cfg.gpu_count)
    model = kserve.V1beta1ModelSpec(
        name="kserve-container",
        model_format=kserve.V1beta1ModelFormat(name=MODEL_FORMAT, version=format_version()),
        runtime=cfg.runtime_name,
        storage_uri=cfg.storage_uri,
        args=[*serving_args(cfg), "--set", f"serve.device={'cuda' if gpu else 'cpu'}"],
        resources=k8s.V1ResourceRequirements(requests=requests, limits=limits),
        image=cfg.gpu_image if gpu else None,
    )
    tolerations = None
    if gpu and cfg.gpu_tolerations:
        tolerations = [k8s.V1Toleration(**t) for t in cfg.gpu_tolerations]
    lineage_annotations = registry.annotations() if registry else {}
    lineage_labels = registry.labels() if registry else {}
    predictor = kserve.V1beta1PredictorSpec(
        model=model,
        annotations=lineage_annotations or None,
        labels=lineage_labels or None,
        min_replicas=cfg.min_replicas,
        max_replicas=cfg.max_replicas,
        canary_traffic_percent=cfg.canary_traffic_percent if cfg.canary_traffic_percent < 100 else None,
        service_account_name=cfg.service_account or None,
        node_selector=dict(cfg.gpu_node_selector) if gpu and cfg.gpu_node_selector else None,
        tolerations=tolerations,
    )
    meta = k8s.V1ObjectMeta(name=cfg.isvc_name, namespace=cfg.namespace,
                            labels={**_labels(cfg, variant), **lineage_labels},
                            annotations=lineage_annotations or None)  # fmt: skip
    return kserve.V1beta1InferenceService(api_version=f"{GROUP}/v1beta1", kind="InferenceService", metadata=meta,
                                          spec=kserve.V1beta1InferenceServiceSpec(predictor=predictor))  # fmt: skip


def to_dict(obj: Any) -> dict[str, Any]:
    """A model object as the plain dict Kubernetes accepts (camelCase keys, no nulls)."""
    from kubernetes.client import ApiClient

    return ApiClient().sanitize_for_serialization(obj)


_PRIMITIVES = {"str": str, "int": int, "float": (int, float), "bool": bool}


def _model_class(name: str) -> type:
    from kubernetes.client import models as k8s_models

    cls = getattr(kserve.models, name, None) or getattr(k8s_models, name, None)
    if cls is None:
        raise ValueError(f"no KServe or Kubernetes model named {name}")
    return cls


def parse(data: Any, klass: str, where: str = "") -> Any:
    """Build KServe / Kubernetes model objects from a manifest dict, strictly.

    Unlike the generated clients' lenient deserialiser, an unknown field or a value of the wrong type is an
    error naming its path (``spec.predictor.model.resourcez``), so a typo cannot vanish silently.

    Raises:
        ValueError: an unknown field, a wrong type, or a required field missing (the model's own check).
    """
    where = where or klass
    if data is None:
        return None
    if klass.startswith("list["):
        if not isinstance(data, list):
            raise ValueError(f"{where}: expected a list, got {type(data).__name__}")
        return [parse(x, klass[5:-1], f"{where}[{i}]") for i, x in enumerate(data)]
    if klass.startswith("dict("):
        if not isinstance(data, dict):
            raise ValueError(f"{where}: expected a mapping, got {type(data).__name__}")
        value_type = klass[5:-1].split(", ", 1)[1]
        return {k: parse(v, value_type, f"{where}.{k}") for k, v in data.items()}
    if klass == "object":
        return data
    if klass in _PRIMITIVES:
        if isinstance(data, bool) and klass != "bool" or not isinstance(data, _PRIMITIVES[klass]):
            raise ValueError(f"{where}: expected {klass}, got {type(data).__name__} {data!r}")
        return data
    cls = _model_class(klass)
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected a {klass} mapping, got {type(data).__name__}")
    by_json = {json_key: attr for attr, json_key in cls.attribute_map.items()}
    unknown = sorted(set(data) - set(by_json))
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {unknown} for {klass}")
    kwargs = {by_json[k]: parse(v, cls.openapi_types[by_json[k]], f"{where}.{k}") for k, v in data.items()}
    try:
        return cls(**kwargs)
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from None


def round_trip(manifest: dict[str, Any]) -> dict[str, Any]:
    """Parse a manifest into KServe's model of its kind (strictly, :func:`parse`) and serialise it back.

    ``round_trip(m) == m`` is the offline validation of a manifest (no CRD schema ships with the package).

    Raises:
        ValueError: the kind is not ServingRuntime or InferenceService, an unknown field or a wrong type.
    """
    kinds = {"InferenceService": "V1beta1InferenceService", "ServingRuntime": "V1alpha1ServingRuntime"}
    kind = manifest.get("kind")
    if kind not in kinds:
        raise ValueError(f"unknown kind {kind!r} (expected {sorted(kinds)})")
    return to_dict(parse(manifest, kinds[kind], kind))


def render(cfg: ServeConfig, variant: str | None = None, registry: RegistryRef | None = None) -> list[dict[str, Any]]:
    """The ServingRuntime and the InferenceService of ``variant``, as dicts, in the order to apply them.

    ``registry``: the registry version served (annotations and labels, :func:`inference_service`).
    """
    return [to_dict(serving_runtime(cfg)), to_dict(inference_service(cfg, variant, registry))]


def find_inference_service(documents: list[Any]) -> dict[str, Any]:
    """The InferenceService among parsed YAML documents: rendered manifests, or ``kubectl get isvc -o yaml``
    output (a single object, or a ``List`` of them: the first InferenceService is taken).

    Raises:
        ValueError: no InferenceService in ``documents``.
    """
    for doc in documents:
        if not isinstance(doc, dict):
            continue
        if doc.get("kind") == "InferenceService":
            return doc
        if doc.get("kind") == "List" or "items" in doc:
            for item in doc.get("items") or []:
                if isinstance(item, dict) and item.get("kind") == "InferenceService":
                    return item
    raise ValueError("no InferenceService in the given YAML")


def registry_ref(isvc: dict[str, Any]) -> RegistryRef | None:
    """The registry version an InferenceService dict serves (its metadata, else its predictor's); None if absent."""
    predictor = (isvc.get("spec") or {}).get("predictor") or {}
    return RegistryRef.from_metadata(isvc.get("metadata")) or RegistryRef.from_metadata(predictor)


def to_yaml(manifests: list[dict[str, Any]]) -> str:
    """Multi-document YAML."""
    return yaml.safe_dump_all(manifests, sort_keys=False, default_flow_style=False)
