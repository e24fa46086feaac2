"""GPU node-pool placement of the training step, from the ``pipeline`` section of ``params.yaml``.

One description (node selector, tolerations, accelerator, CPU/memory) feeds two targets: the KFP task of the
``accelerate`` trainer (through ``kfp-kubernetes``) and the pods of a Kubeflow Trainer ``TrainJob``.
"""

from __future__ import annotations

from typing import Any

from moon3.pipelines.config import PipelineConfig

TOLERATION_KEYS = {"key", "operator", "value", "effect", "toleration_seconds"}
OPERATORS = {"Equal", "Exists"}
EFFECTS = {"NoSchedule", "PreferNoSchedule", "NoExecute"}


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


def place_training_task(task: Any, pc: PipelineConfig, gpu: bool = True) -> Any:
    """Put a KFP training task on the GPU node pool: selector, tolerations, accelerator, CPU and memory.

    Args:
        task: the ``PipelineTask``.
        pc: the ``pipeline`` config.
        gpu: False for a task that only submits and watches (the TrainJob launcher): no accelerator, no pool.
    """
    from kfp import kubernetes

    if not gpu:
        return task
    if pc.train_cpu_request:
        task.set_cpu_request(pc.train_cpu_request)
    if pc.train_memory_request:
        task.set_memory_request(pc.train_memory_request)
    if pc.train_cpu_limit:
        task.set_cpu_limit(pc.train_cpu_limit)
    if pc.train_memory_limit:
        task.set_memory_limit(pc.train_memory_limit)
    if pc.train_accelerator_type and pc.train_accelerator_limit > 0:
        task.set_accelerator_type(pc.train_accelerator_type)
        task.set_accelerator_limit(pc.train_accelerator_limit)
    for key, value in pc.train_node_selector.items():
        kubernetes.add_node_selector(task, label_key=key, label_value=value)
    for tol in check_tolerations(pc.train_tolerations):
        kubernetes.add_toleration(task, **tol)
    return task
