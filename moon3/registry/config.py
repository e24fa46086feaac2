"""Configuration of the model registry and the promotion gate (``params.yaml`` section ``promotion``)."""

from __future__ import annotations

from dataclasses import dataclass, field


def _default_min_values() -> dict[str, float]:
    return {"trained/retrieval/text_to_mm/recall_at_10": 0.3, "trained/summary/retrieval_mean_recall_at_10": 0.2}


def _default_max_regression() -> dict[str, float]:
    return {
        "trained/retrieval/text_to_mm/recall_at_10": 0.02,
        "trained/retrieval/mm_to_mm/recall_at_10": 0.02,
        "trained/summary/retrieval_mean_recall_at_10": 0.02,
    }


def _default_reasoning_metrics() -> list[str]:
    return ["retrieval/text_to_mm/recall_at_10", "retrieval/mm_to_mm/recall_at_10"]


@dataclass
class PromotionConfig:
    """Register evaluated models in the MLflow Model Registry and gate the ``champion`` alias."""

    model_name: str = field(default="moon3", metadata={"help": "Registered model name in the MLflow Model Registry."})
    tracking_uri: str = field(
        default="",
        metadata={"help": "MLflow tracking/registry URI; '' = MLFLOW_TRACKING_URI or MLflow's default."},
    )
    experiment: str = field(default="moon3-registry", metadata={"help": "Experiment of the registration runs."})
    metrics_file: str = field(
        default="reports/eval/metrics.json",
        metadata={"help": "Evaluation metrics registered with the model (`moon3 evaluate` writes it)."},
    )
    min_values: dict[str, float] = field(
        default_factory=_default_min_values,
        metadata={"help": "Metric key (path in metrics.json, '/'-joined) -> lowest absolute value allowed."},
    )
    max_regression: dict[str, float] = field(
        default_factory=_default_max_regression,
        metadata={
            "help": "Metric key -> largest drop vs the champion allowed; a drop fails only when its whole 95% "
            "interval lies below -limit."
        },
    )
    reasoning_metrics: list[str] = field(
        default_factory=_default_reasoning_metrics,
        metadata={"help": "kind/task/metric keys on which the full model must not lose to its reasoning_off mode."},
    )
    reasoning_margin: float = field(
        default=0.02,
        metadata={"help": "Largest win of reasoning_off over the full model allowed (its interval must exceed it)."},
    )
    lock_timeout_s: float = field(
        default=900.0, metadata={"help": "A promotion lock older than this is stale and may be broken (seconds)."}
    )
    canary_traffic_percent: int = field(
        default=10,
        metadata={
            "help": "Traffic share (0-100) of a newly promoted champion's revision in the InferenceService rendered "
            "on promotion; a first champion gets 100 (no earlier revision to split with)."
        },
    )
    render_dir: str = field(
        default="reports/promotion",
        metadata={"help": "Where a promotion writes the new champion's manifests.yaml and promotion.json."},
    )
