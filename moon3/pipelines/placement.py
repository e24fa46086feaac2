"""GPU node-pool placement of the training step, from the ``pipeline`` section of ``params.yaml``.

One description (node selector, tolerations, accelerator, CPU/memory) feeds two targets: the KFP task of the
``accelerate`` trainer (through ``kfp-kubernetes``) and the pods of a Kubeflow Trainer ``TrainJob``.
"""

from __future__ import annotations

import re
from typing import Any

from moon3.pipelines.config import PipelineConfig

TOLERATION_KEYS = {"key", "operator", "value", "effect", "toleration_seconds"}
OPERATORS = {"Equal", "Exists"}
EFFECTS = {"NoSchedule", "PreferNoSchedule", "NoExecute"}
PULL_POLICIES = {"Always", "IfNotPresent", "Never"}
# Tags that name a different image over time: with IfNotPresent a node keeps running whatever it pulled first.
MOVING_TAGS = {"latest", "main", "master", "dev", "develop", "stable", "nightly", "edge", "head"}
PIPELINE_ROOT = re.compile(r"^(gs|s3|minio)://[^/\s]+(/\S*)?$")
SHM_VOLUME = "dshm"


def check_tolerations(tolerations: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Validate ``pipeline.train_tolerations`` (snake_case keys, as ``kfp.kubernetes.add_toleration`` takes).

    Raises:
        ValueError: naming the entry and the key that is wrong.
    """
    for i, tol in enumerate(tolerations):
        where = f"pipeline.train_tolerations[{i}]"
        unknown = sorted(set(tol) - TOLERATION_KEYS)
        if unknown:
            raise ValueError(f"{where}: unknown key {unknown[0]!r} (known: {', '.join(sorted(TOLERATION_KEYS))})")
        if tol.get("operator", "Equal") not in OPERATORS:
            raise ValueError(f"{where}.operator: expected one of {sorted(OPERATORS)}, got {tol['operator']!r}")
        if "effect" in tol and tol["effect"] not in EFFECTS:
            raise ValueError(f"{where}.effect: expected one of {sorted(EFFECTS)}, got {tol['effect']!r}")
        if tol.get("operator") == "Exists" and tol.get("value"):
            raise ValueError(f"{where}: operator Exists takes no value")
    return tolerations


def k8s_tolerations(tolerations: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The same tolerations with Kubernetes field names (``tolerationSeconds``)."""
    out = []
    for tol in check_tolerations(tolerations):
        item = {k: v for k, v in tol.items() if k != "toleration_seconds"}
        if "toleration_seconds" in tol:
            item["tolerationSeconds"] = int(tol["toleration_seconds"])
        out.append(item)
    return out


def k8s_resources(pc: PipelineConfig) -> dict[str, dict[str, Any]]:
    """``resources`` of one training pod/node: CPU, memory and accelerators (requests = limits for GPUs)."""
    requests: dict[str, Any] = {}
    limits: dict[str, Any] = {}
    for target, key, value in (
        (requests, "cpu", pc.train_cpu_request),
        (limits, "cpu", pc.train_cpu_limit),
        (requests, "memory", pc.train_memory_request),
        (limits, "memory", pc.train_memory_limit),
    ):
        if value:
            target[key] = value
    if pc.train_accelerator_type and pc.train_accelerator_limit > 0:
        requests[pc.train_accelerator_type] = pc.train_accelerator_limit
        limits[pc.train_accelerator_type] = pc.train_accelerator_limit
    return {k: v for k, v in (("requests", requests), ("limits", limits)) if v}


def image_refs(pc: PipelineConfig) -> tuple[str, str]:
    """``(cpu image, gpu image)`` references: each repository with ``image_tag`` ('' = this tree's source tag)."""
    from moon3.pipelines.version import image_ref, image_tag

    tag = pc.image_tag or image_tag()
    return image_ref(pc.image, tag), image_ref(pc.gpu_image, tag)


def uses_gpus(pc: PipelineConfig) -> bool:
    """Whether the training steps ask for accelerators (and so need the CUDA image)."""
    return bool(pc.train_accelerator_type) and pc.train_accelerator_limit > 0


def _tag(ref: str) -> str:
    if "@" in ref:
        return ref.split("@", 1)[1]
    last = ref.rsplit("/", 1)[-1]
    return last.split(":", 1)[1] if ":" in last else "latest"


def check_images(pc: PipelineConfig) -> None:
    """Reject image settings that would run the wrong code: GPU placement with the CPU image (training on the CPU
    of a GPU node), or a moving tag that ``IfNotPresent`` never re-pulls.

    Raises:
        ValueError: naming the ``pipeline.*`` key.
    """
    if pc.image_pull_policy not in PULL_POLICIES:
        raise ValueError(
            f"pipeline.image_pull_policy: expected one of {sorted(PULL_POLICIES)}, got {pc.image_pull_policy!r}"
        )
    cpu, gpu = image_refs(pc)
    if (uses_gpus(pc) or pc.eval_accelerator_limit > 0) and gpu == cpu:
        raise ValueError(
            f"pipeline.gpu_image is the CPU image {cpu!r}: the GPU steps would train on the CPU of a GPU node; "
            "give the CUDA image (infra/docker/Dockerfile.cuda) or set pipeline.train_accelerator_limit=0 and "
            "pipeline.eval_accelerator_limit=0"
        )
    for key, ref in (("image", cpu), ("gpu_image", gpu)):
        if _tag(ref) in MOVING_TAGS and pc.image_pull_policy != "Always":
            raise ValueError(
                f"pipeline.{key}={ref!r} is a moving tag: with image_pull_policy {pc.image_pull_policy} a node keeps "
                "the copy it pulled first; use an immutable tag (pipeline.image_tag, '' = the source tag) or Always"
            )


def check_pipeline(pc: PipelineConfig) -> None:
    """Every compile-time check: trainer, images, pipeline root, tracking.

    Raises:
        ValueError: naming the ``pipeline.*`` key.
    """
    check_trainer(pc)
    check_images(pc)
    if pc.pipeline_root and not PIPELINE_ROOT.match(pc.pipeline_root):
        raise ValueError(
            f"pipeline.pipeline_root={pc.pipeline_root!r}: expected gs://BUCKET/..., s3://BUCKET/... or "
            "minio://BUCKET/... ('' = the cluster default)"
        )
    if not pc.mlflow_tracking_uri:
        raise ValueError(
            "pipeline.mlflow_tracking_uri is empty: training metrics and the model registry (register, gate) would "
            "live in a sqlite file inside each pod and vanish with it; give the cluster's MLflow server URL"
        )
    if pc.retries < 0:
        raise ValueError(f"pipeline.retries must be >= 0, got {pc.retries}")
    if pc.eval_accelerator_limit < 0:
        raise ValueError(f"pipeline.eval_accelerator_limit must be >= 0, got {pc.eval_accelerator_limit}")


def check_trainer(pc: PipelineConfig) -> None:
    """Reject settings that cannot schedule or cannot train, before anything is compiled.

    Raises:
        ValueError: naming the ``pipeline.*`` key.
    """
    if pc.num_processes < 1:
        raise ValueError(f"pipeline.num_processes must be >= 1, got {pc.num_processes}")
    gpus = pc.train_accelerator_limit if pc.train_accelerator_type else 0
    if gpus and pc.num_processes > gpus:
        raise ValueError(
            f"pipeline.num_processes={pc.num_processes} > pipeline.train_accelerator_limit={gpus}: "
            "one process per accelerator"
        )
    if pc.trainer == "trainjob":
        if pc.num_nodes < 1:
            raise ValueError(f"pipeline.num_nodes must be >= 1, got {pc.num_nodes}")
        if not pc.pvc_name:
            raise ValueError("pipeline.trainer=trainjob needs pipeline.pvc_name: the TrainJob pods share it")
        if pc.pvc_create and pc.pvc_access_mode != "ReadWriteMany":
            raise ValueError(
                "pipeline.trainer=trainjob with pipeline.pvc_create needs pipeline.pvc_access_mode=ReadWriteMany "
                "(the pipeline pod and every TrainJob node mount the claim)"
            )
    check_tolerations(pc.train_tolerations)


def place_cpu_task(task: Any, pc: PipelineConfig) -> Any:
    """CPU and memory requests/limits of a CPU step (``pipeline.cpu_*``, ``pipeline.memory_*``)."""
    for value, setter in (
        (pc.cpu_request, task.set_cpu_request),
        (pc.cpu_limit, task.set_cpu_limit),
        (pc.memory_request, task.set_memory_request),
        (pc.memory_limit, task.set_memory_limit),
    ):
        if value:
            setter(value)
    return task


def place_training_task(task: Any, pc: PipelineConfig, gpu: bool = True, accelerators: int | None = None) -> Any:
    """Put a KFP training task on the GPU node pool: selector, tolerations, accelerator, CPU, memory, /dev/shm.

    Args:
        task: the ``PipelineTask``.
        pc: the ``pipeline`` config.
        gpu: False for a task that only submits and watches (the TrainJob launcher): no accelerator, no pool.
        accelerators: accelerators of this task (default ``pc.train_accelerator_limit``).
    """
    from kfp import kubernetes

    if not gpu:
        return place_cpu_task(task, pc)
    limit = pc.train_accelerator_limit if accelerators is None else accelerators
    if pc.train_cpu_request:
        task.set_cpu_request(pc.train_cpu_request)
    if pc.train_memory_request:
        task.set_memory_request(pc.train_memory_request)
    if pc.train_cpu_limit:
        task.set_cpu_limit(pc.train_cpu_limit)
    if pc.train_memory_limit:
        task.set_memory_limit(pc.train_memory_limit)
    if pc.train_accelerator_type and limit > 0:
        task.set_accelerator_type(pc.train_accelerator_type)
        task.set_accelerator_limit(limit)
    for key, value in pc.train_node_selector.items():
        kubernetes.add_node_selector(task, label_key=key, label_value=value)
    for tol in check_tolerations(pc.train_tolerations):
        kubernetes.add_toleration(task, **tol)
    if pc.shm_size:  # the container default is 64M: data loader workers and NCCL need more
        kubernetes.empty_dir_mount(task, volume_name=SHM_VOLUME, mount_path="/dev/shm", medium="Memory",
                                   size_limit=pc.shm_size)  # fmt: skip
    return task
