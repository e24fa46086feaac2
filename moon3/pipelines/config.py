"""Configuration of the Kubeflow pipeline (``params.yaml`` section ``pipeline``).

Everything here is fixed when the pipeline is compiled (image, placement, resources, volumes, trainer mode);
the stage parameters (``data``, ``validation``, ``model``, ``train``, ``eval``) become the run-time ``params``
argument of the compiled pipeline, with ``params.yaml`` as its default.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal


@dataclass
class PipelineConfig:
    """Image, placement and resources of the KFP training pipeline."""

    name: str = field(default="moon3-training", metadata={"help": "Pipeline name in the KFP UI."})
    image: str = field(
        default="ghcr.io/example/moon3",
        metadata={"help": "CPU image repository of the CPU steps (tag: image_tag), or a full reference."},
    )
    gpu_image: str = field(
        default="ghcr.io/example/moon3-cuda",
        metadata={
            "help": "CUDA image repository (infra/docker/Dockerfile.cuda) of the steps placed on the GPU node pool "
            "(tag: image_tag), or a full reference."
        },
    )
    image_tag: str = field(
        default="",
        metadata={"help": "Tag of both images; '' = src-<source hash>, the tag `make image` gives this tree's image."},
    )
    image_pull_policy: str = field(
        default="IfNotPresent",
        metadata={"help": "Always | IfNotPresent | Never; a moving tag (latest, main, ...) needs Always."},
    )
    pipeline_root: str = field(
        default="",
        metadata={
            "help": "Where KFP stores artifacts ('' = the cluster's default). gs://: images are read in place; "
            "any other root (minio://, s3://): the validated dataset carries its images."
        },
    )
    service_account: str = field(
        default="",
        metadata={
            "help": "Kubernetes service account of the run's pods and TrainJobs (Workload Identity); '' = the "
            "namespace default (default-editor in a Kubeflow profile)."
        },
    )
    retries: int = field(default=2, metadata={"help": "Retries of a failed step (preemption, eviction); 0 = none."})
    retry_backoff: str = field(default="60s", metadata={"help": "Wait before the first retry (doubles each time)."})
    cpu_request: str = field(default="2", metadata={"help": "CPU request of every CPU step ('' = none)."})
    cpu_limit: str = field(default="8", metadata={"help": "CPU limit of every CPU step ('' = none)."})
    memory_request: str = field(default="8G", metadata={"help": "Memory request of every CPU step ('' = none)."})
    memory_limit: str = field(default="32G", metadata={"help": "Memory limit of every CPU step ('' = none)."})
    shm_size: str = field(
        default="16Gi",
        metadata={"help": "Size of /dev/shm (memory-backed) of the GPU steps: data loader workers, NCCL ('' = none)."},
    )
    eval_accelerator_limit: int = field(
        default=1, metadata={"help": "GPUs of the evaluation step (0 = a CPU step on the CPU image)."}
    )
    deploy: Literal["apply", "render", "off"] = field(
        default="apply",
        metadata={
            "help": "After a passing promotion gate: apply the InferenceService (canary per serve.*) | render "
            "the manifests only | no deploy step."
        },
    )
    ablations: list[str] = field(
        default_factory=list,
        metadata={
            "help": "Ablation variants trained and evaluated in parallel (dsl.ParallelFor): no_fusion, no_fire, "
            "no_reasoning; [] = none."
        },
    )
    prepare: bool = field(
        default=True,
        metadata={
            "help": "Run prepare first (data.source decides: generate or import); false: the pipeline takes a "
            "dataset_uri argument (a moon3-format dataset folder, e.g. gs://...) and imports it as is."
        },
    )
    cache_data: bool = field(default=True, metadata={"help": "KFP caching of prepare and validate."})
    cache_train: bool = field(default=False, metadata={"help": "KFP caching of pretraining."})
    cache_eval: bool = field(default=False, metadata={"help": "KFP caching of evaluation."})
    trainer: Literal["accelerate", "trainjob"] = field(
        default="accelerate",
        metadata={
            "help": "accelerate: train inside the pipeline pod (accelerate launch + DeepSpeed when "
            "num_processes > 1) | trainjob: submit a multi-node Kubeflow Trainer TrainJob and wait."
        },
    )
    num_processes: int = field(
        default=4, metadata={"help": "Training processes per node (one per GPU; 1 = plain in-process training)."}
    )
    num_nodes: int = field(default=2, metadata={"help": "trainjob: training nodes."})
    deepspeed_config: str = field(
        default="infra/deepspeed/zero2.json",
        metadata={"help": "DeepSpeed JSON for multi-process training (relative: to $MOON3_HOME in the image)."},
    )
    accelerate_config: str = field(
        default="infra/accelerate/deepspeed_zero2.yaml",
        metadata={"help": "accelerate launch --config_file for multi-process training (relative: $MOON3_HOME)."},
    )
    train_node_selector: dict[str, str] = field(
        default_factory=lambda: {"cloud.google.com/gke-accelerator": "nvidia-l4"},
        metadata={"help": "Node labels of the GPU node pool the training pod must run on."},
    )
    train_tolerations: list[dict[str, Any]] = field(
        default_factory=lambda: [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        metadata={"help": "Tolerations of the training pod (keys: key, operator, value, effect, toleration_seconds)."},
    )
    train_accelerator_type: str = field(
        default="nvidia.com/gpu", metadata={"help": "Accelerator resource of the training pod ('' = CPU only)."}
    )
    train_accelerator_limit: int = field(default=4, metadata={"help": "Accelerators per training pod / node."})
    train_cpu_request: str = field(default="16", metadata={"help": "CPU request of the training pod ('' = none)."})
    train_cpu_limit: str = field(default="32", metadata={"help": "CPU limit of the training pod ('' = none)."})
    train_memory_request: str = field(default="64G", metadata={"help": "Memory request of the training pod."})
    train_memory_limit: str = field(default="128G", metadata={"help": "Memory limit of the training pod."})
    pvc_name: str = field(
        default="moon3-scratch",
        metadata={
            "help": "Volume for checkpoints and large data on the training pod ('' = none): the name of an "
            "existing claim, or with pvc_create the suffix of a claim made for each run."
        },
    )
    pvc_create: bool = field(
        default=True, metadata={"help": "Create the claim for each run (pvc_size, pvc_storage_class) and delete it."}
    )
    pvc_size: str = field(default="200Gi", metadata={"help": "Size of a created claim."})
    pvc_storage_class: str = field(default="", metadata={"help": "Storage class of a created claim ('' = default)."})
    pvc_access_mode: str = field(
        default="ReadWriteOnce", metadata={"help": "Access mode of a created claim (trainjob needs ReadWriteMany)."}
    )
    pvc_mount_path: str = field(default="/mnt/moon3", metadata={"help": "Mount path of the volume in the pod."})
    trainjob_runtime: str = field(
        default="torch-distributed", metadata={"help": "trainjob: ClusterTrainingRuntime the TrainJob refers to."}
    )
    trainjob_namespace: str = field(
        default="", metadata={"help": "trainjob: namespace of the TrainJob ('' = the pipeline pod's namespace)."}
    )
    trainjob_timeout_s: int = field(default=86400, metadata={"help": "trainjob: give up waiting after this long."})
    mlflow_tracking_uri: str = field(
        default="http://mlflow.kubeflow.svc.cluster.local:5000",
        metadata={
            "help": "MLFLOW_TRACKING_URI of every step (training logs, the registry of register and the gate); "
            "required: a sqlite file in a pod is lost with it."
        },
    )
