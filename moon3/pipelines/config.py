"""Configuration of the Kubeflow pipeline (``params.yaml`` section ``pipeline``)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class PipelineConfig:
    """Image, placement and resources of the KFP training pipeline."""

    name: str = field(default="moon3-training", metadata={"help": "Pipeline name in the KFP UI."})
    image: str = field(
        default="ghcr.io/example/moon3:latest", metadata={"help": "Project image for every step."}
    )
