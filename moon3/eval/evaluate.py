"""The ``evaluate`` stage: every MBE3.0-style task for every model variant, then the report.

Variants are plain embedders (``embed_fn(items) -> unit-norm rows``), so this module knows nothing about how a
model is loaded. The caller builds the dict in the order the table should show, e.g. ``trained``,
``untrained``, ``reasoning_off``, then whichever ablation checkpoints exist (``no_fusion``, ``no_fire``,
``no_rl``, ``no_reasoning``).
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from moon3.eval.config import EvalConfig
from moon3.eval.report import flatten_metrics, main_table_markdown, summarize, write_report
from moon3.eval.tasks import EmbedFn, TaskResult, load_eval_data, run_tasks
from moon3.eval.variants import collect_variants

if TYPE_CHECKING:
    from moon3.config import Moon3Config

# Display order and meaning of the variant names the model-loading layer is expected to use.
VARIANTS = {
    "trained": "the model under evaluation",
    "untrained": "the backbone before any moon3 training",
    "reasoning_off": "the trained model with reasoning: off (empty trace)",
    "no_fusion": "ablation: trained without the modality fusion head",
    "no_fire": "ablation: trained without FIRE injection",
    "no_rl": "ablation: contrastive stage only, no GRPO",
    "no_reasoning": "ablation: trained without reasoning traces",
}


def evaluate(
    cfg: EvalConfig,
    variants: dict[str, EmbedFn],
    data_dir: str | Path,
    out_dir: str | Path | None = None,
    progress: bool = True,
    missing: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Run all tasks for each variant on the eval split of ``data_dir`` and write the report.

    Args:
        cfg: the ``eval`` section of ``params.yaml``.
        variants: name -> embedder, in table order (see :data:`VARIANTS` for the usual names).
        data_dir: a dataset folder (``products.parquet``, ``queries.parquet``, images).
        out_dir: where the outputs go; default ``cfg.out_dir``.
        progress: progress bars while embedding.
        missing: variants that could not be evaluated, name -> reason (listed in the report).

    Returns:
        ``metrics`` (nested numbers, as in ``metrics.json``), ``flat`` (``variant/kind/task/metric`` ->
        value, for MLflow / KFP), ``skipped`` (variant -> task -> reason), ``missing`` (variant -> reason),
        ``table`` (the comparison table in Markdown), ``paths`` (the files written) and ``seconds`` per variant.

    Raises:
        ValueError: no variant given, or the dataset cannot be evaluated (see :func:`load_eval_data`).
    """
    if not variants:
        raise ValueError("evaluate: no model variant to evaluate")
    data = load_eval_data(data_dir, cfg)
    results: dict[str, list[TaskResult]] = {}
    seconds: dict[str, float] = {}
    for name, embed_fn in variants.items():
        start = time.perf_counter()
        try:
            results[name] = run_tasks(data, embed_fn, cfg, progress=progress, variant=name)
        finally:
            close = getattr(embed_fn, "close", None)
            if callable(close):  # e.g. ModelEmbedFn: free this variant's model before loading the next
                close()
        seconds[name] = round(time.perf_counter() - start, 2)
    summary = summarize(results, main_k=max(cfg.ks))
    summary["missing"] = dict(missing or {})
    paths = write_report(summary, out_dir or cfg.out_dir)
    return {
        "metrics": summary["metrics"],
        "flat": flatten_metrics(summary["metrics"]),
        "skipped": summary["skipped"],
        "missing": summary["missing"],
        "table": main_table_markdown(summary),
        "paths": paths,
        "seconds": seconds,
    }


def log_to_mlflow(result: dict[str, Any], experiment: str, run_name: str = "evaluate") -> str:
    """Log the flat metrics and the report files (HTML, Markdown, JSON, plots) as one MLflow run.

    Uses ``MLFLOW_TRACKING_URI`` when set, else the project's local sqlite store. Returns the run id.
    """
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    import mlflow

    from moon3.train.tracking import DEFAULT_TRACKING_URI

    mlflow.set_tracking_uri(os.environ.get("MLFLOW_TRACKING_URI", DEFAULT_TRACKING_URI))
    mlflow.set_experiment(experiment)
    with mlflow.start_run(run_name=run_name) as run:
        # MLflow metric names allow only [A-Za-z0-9_\-. /].
        mlflow.log_metrics({re.sub(r"[^A-Za-z0-9_\-. /]", "_", k): v for k, v in result["flat"].items()})
        paths = result["paths"]
        for key in ("html", "markdown", "metrics", "results"):
            mlflow.log_artifact(paths[key], artifact_path="eval")
        mlflow.log_artifacts(paths["plots"], artifact_path="eval/plots")
        return run.info.run_id


def run_evaluation(
    cfg: Moon3Config, data_dir: str | Path | None = None, out_dir: str | Path | None = None, progress: bool = True
) -> dict[str, Any]:
    """The stage as the CLI / DVC / KFP run it: every saved variant on the validated data, report, MLflow.

    Args:
        cfg: the whole config; uses ``eval`` (and ``validation.out_dir`` as the default data folder).
        data_dir: dataset folder; default ``cfg.validation.out_dir``.
        out_dir: report folder; default ``cfg.eval.out_dir``.
        progress: progress bars.

    Returns:
        :func:`evaluate`'s result, plus ``mlflow_run_id`` when ``eval.mlflow_experiment`` is set.
    """
    variants, missing = collect_variants(cfg.eval)
    data_dir = data_dir or cfg.validation.out_dir
    result = evaluate(cfg.eval, variants, data_dir, out_dir, progress=progress, missing=missing)
    if cfg.eval.mlflow_experiment:
        result["mlflow_run_id"] = log_to_mlflow(result, cfg.eval.mlflow_experiment)
    return result
