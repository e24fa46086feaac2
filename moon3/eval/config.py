"""Configuration of the MBE3.0-style evaluation (``params.yaml`` section ``eval``)."""

from __future__ import annotations

from dataclasses import dataclass, field

REFERENCE_NAMES = ("ref_tfidf", "ref_pixels", "ref_tfidf_pixels")
# Top-level keys of metrics.json beside the variants: no variant may take these names.
METRICS_KEYS = ("chance", "majority", "deltas", "below_references", "skipped", "derived")


@dataclass
class EvalConfig:
    """Which tasks, variants and statistics; where the report goes."""

    out_dir: str = field(default="reports/eval", metadata={"help": "metrics.json, plots and the report."})
    ks: list[int] = field(default_factory=lambda: [1, 5, 10], metadata={"help": "Recall@K cut-offs."})
    batch_size: int = field(default=32, metadata={"help": "Items per embedding batch."})
    search_batch: int = field(default=4096, metadata={"help": "Queries per exact-search batch."})
    curve_ks: list[int] = field(
        default_factory=lambda: [1, 2, 3, 5, 10, 20, 50, 100],
        metadata={"help": "K values of the Recall@K curves (plots)."},
    )
    embed_chunk: int = field(
        default=256, metadata={"help": "Rows loaded and passed to the embedder per call (bounds image memory)."}
    )
    max_queries_per_task: int = field(
        default=0, metadata={"help": "Cap on queries per query type (seeded sample); 0 = all."}
    )
    max_products: int = field(
        default=0,
        metadata={"help": "Cap on eval products (seeded sample; queries of dropped products go too); 0 = all."},
    )
    seed: int = field(default=0, metadata={"help": "Seed of the samples above, the bootstrap and the examples."})
    class_template: str = field(
        default="{name}", metadata={"help": "Text embedded for a category in zero-shot classification."}
    )
    model_dir: str = field(
        default="models/rl/final",
        metadata={"help": "The model under evaluation (variant 'trained'): the RL model, or its pretrained copy."},
    )
    baseline_dir: str = field(
        default="models/pretrain/init", metadata={"help": "Untrained baseline (variant 'untrained'); '' = none."}
    )
    other_reasoning_mode: bool = field(
        default=True,
        metadata={
            "help": "Also evaluate the trained model in the reasoning mode its contract does not default to "
            "('reasoning_off', or 'reasoning_on' / 'reasoning_on_forced' for a model saved with reasoning off)."
        },
    )
    ablation_dirs: dict[str, str] = field(
        default_factory=lambda: {"no_rl": "models/pretrain/final"},
        metadata={
            "help": "Ablation name -> saved model (e.g. no_fusion: models/abl/no_fusion/final); missing ones "
            "are listed as not evaluated."
        },
    )
    references: list[str] = field(
        default_factory=lambda: list(REFERENCE_NAMES),
        metadata={
            "help": "Non-learned reference variants evaluated on the same tasks: ref_tfidf (char n-gram TF-IDF "
            "of text), ref_pixels (raw 32x32 pixels), ref_tfidf_pixels (both); [] = none."
        },
    )
    bootstrap_samples: int = field(
        default=1000, metadata={"help": "Resamples of the paired bootstrap intervals of deltas vs 'trained'."}
    )
    example_queries: int = field(
        default=4, metadata={"help": "Qualitative examples (top-5 thumbnails) per query type in the report."}
    )
    mlflow_experiment: str = field(
        default="moon3", metadata={"help": "MLflow experiment for the metrics and the report; '' = no MLflow."}
    )
    synthesis_report: str = field(
        default="data/traces/synthesis_report.json",
        metadata={
            "help": "The synthesis report written beside the traces the model was trained on (the synthesize "
            "stage's out_dir): its counts are a section of the report; '' = no section; a missing file is noted."
        },
    )
