"""The ``evaluate`` stage: every MBE3.0-style task for every variant, paired deltas, then the report.

Variants are plain embedders (``embed_fn(items) -> unit-norm rows``), so this module knows nothing about how a
model is loaded. The caller builds the dict in the order the table should show, e.g. ``trained``,
``untrained``, ``reasoning_off`` (or ``reasoning_on_forced``), then whichever ablation checkpoints exist; the
non-learned references of ``eval.references`` are added after them. Optional embedder attributes the stage
uses: ``describe()`` (embedding mode, trace statistics), ``traces(items)`` (qualitative traces), ``path`` (a
saved model folder, for the provenance), ``mode`` (a one-line description), ``close()`` (free memory).
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from moon3.eval.compare import below_references, variant_deltas
from moon3.eval.config import METRICS_KEYS, REFERENCE_NAMES, EvalConfig
from moon3.eval.data import load_eval_data
from moon3.eval.provenance import collect_provenance
from moon3.eval.qualitative import build_examples
from moon3.eval.references import build_references, reference_rows
from moon3.eval.report import flatten_metrics, metrics_json, summarize, synthesis_section, write_report
from moon3.eval.tables import main_table_markdown
from moon3.eval.tasks import EmbedFn, TaskResult, run_tasks
from moon3.eval.variants import BASELINES, collect_variants, model_record

if TYPE_CHECKING:
    from moon3.config import Moon3Config


def variant_role(name: str, against: str) -> str:
    """``trained`` (the model every delta is against), ``baseline``, ``reference`` or ``ablation``."""
    if name == against:
        return "trained"
    if name in BASELINES:
        return "baseline"
    return "reference" if name in REFERENCE_NAMES else "ablation"


def describe_mode(embed_fn: EmbedFn) -> dict[str, Any]:
    """The embedder's mode for the tables: its ``describe()``, else its ``mode`` text, else unknown."""
    describe = getattr(embed_fn, "describe", None)
    if callable(describe):
        return describe()
    return {"label": getattr(embed_fn, "mode", "unknown (not a saved model)")}


def evaluate(
    cfg: EvalConfig,
    variants: dict[str, EmbedFn],
    data_dir: str | Path,
    out_dir: str | Path | None = None,
    progress: bool = True,
    missing: dict[str, str] | None = None,
    params: dict[str, Any] | None = None,
    source: str | None = None,
) -> dict[str, Any]:
    """Run all tasks for each variant and each reference on the eval split of ``data_dir``; write the report.

    Args:
        cfg: the ``eval`` section of ``params.yaml``.
        variants: name -> embedder, in table order (``trained``, then
            :data:`~moon3.eval.variants.BASELINES`, then ablations); deltas are against ``trained`` (else the
            first variant), whose top-5 results are the qualitative examples.
        data_dir: a dataset folder (``products.parquet``, ``queries.parquet``, images).
        out_dir: where the outputs go; default ``cfg.out_dir``.
        progress: progress bars while embedding.
        missing: variants that could not be evaluated, name -> reason (listed in the report).
        params: the whole configuration, hashed into the provenance (default: the ``eval`` section).
        source: the configured data source, for the provenance when the folder has no ``stats.json`` naming it.

    Returns:
        ``metrics`` (as in ``metrics.json``), ``flat`` (``variant/kind/task/metric`` -> value, for MLflow /
        KFP), ``skipped`` (variant -> task -> reason), ``missing`` (variant -> reason), ``deltas`` (rows vs
        ``trained`` with 95% intervals), ``below_references`` (``entries``, ``compared``), ``modes`` (variant
        -> reasoning label and trace statistics), ``provenance``, ``table`` (the comparison table in
        Markdown), ``paths`` (the files written) and ``seconds`` per variant.

    Raises:
        ValueError: no variant given, a reserved variant name, an unknown reference name, or the dataset
            cannot be evaluated (see :func:`moon3.eval.data.load_eval_data`).
    """
    if not variants:
        raise ValueError("evaluate: no model variant to evaluate")
    clashes = sorted(set(variants) & {*REFERENCE_NAMES, *METRICS_KEYS})
    if clashes:
        raise ValueError(f"evaluate: variant name(s) {clashes} are reserved for references or metrics.json keys")
    data = load_eval_data(data_dir, cfg)
    references, unbuilt = build_references(cfg.references, data)
    saved = {name: fn.path for name, fn in variants.items() if isinstance(getattr(fn, "path", None), str)}
    records = {path: model_record(path) for path in dict.fromkeys(saved.values())}  # one read per folder
    models = {name: records[path] for name, path in saved.items()}
    against = "trained" if "trained" in variants else next(iter(variants))
    results: dict[str, list[TaskResult]] = {}
    seconds: dict[str, float] = {}
    modes: dict[str, dict[str, Any]] = {}
    examples: list[dict[str, Any]] = []
    for name, embed_fn in {**variants, **references}.items():
        start = time.perf_counter()
        try:
            results[name] = run_tasks(data, embed_fn, cfg, progress=progress, variant=name)
            modes[name] = describe_mode(embed_fn)
            if name == against:
                reasoning = modes[name].get("reasoning") is True
                examples = build_examples(data, results[name], embed_fn, cfg, with_traces=reasoning)
        finally:
            close = getattr(embed_fn, "close", None)
            if callable(close):  # e.g. ModelEmbedFn: free this variant's model before loading the next
                close()
        seconds[name] = round(time.perf_counter() - start, 2)
    main_k = max(cfg.ks)
    deltas = variant_deltas(results, against, main_k, n_boot=cfg.bootstrap_samples, seed=cfg.seed)
    summary = summarize(results, main_k, reference_rows=reference_rows(data, cfg))
    summary.update(
        missing={**(missing or {}), **unbuilt},
        against=against,
        roles={name: variant_role(name, against) for name in results},
        modes=modes,
        seconds=seconds,
        deltas=deltas,
        below_references=below_references(deltas, list(references)),
        examples=examples,
        provenance=collect_provenance(data, data_dir, models, cfg, params=params, source=source),
        synthesis=synthesis_section(cfg.synthesis_report),
    )
    metrics = metrics_json(summary)
    paths = write_report(summary, out_dir or cfg.out_dir, metrics=metrics)
    return {
        "metrics": metrics,
        "flat": flatten_metrics(metrics),
        "skipped": summary["skipped"],
        "missing": summary["missing"],
        "deltas": deltas,
        "below_references": summary["below_references"],
        "modes": modes,
        "provenance": summary["provenance"],
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
        prov = result.get("provenance", {})
        tags = {"git_sha": prov.get("code", {}).get("git_sha"), "params_hash": prov.get("params", {}).get("hash")}
        mlflow.set_tags({k: v for k, v in tags.items() if v})
        paths = result["paths"]
        for key in ("html", "markdown", "metrics", "results", "run"):
            mlflow.log_artifact(paths[key], artifact_path="eval")
        mlflow.log_artifacts(paths["plots"], artifact_path="eval/plots")
        return run.info.run_id


def run_evaluation(
    cfg: Moon3Config, data_dir: str | Path | None = None, out_dir: str | Path | None = None, progress: bool = True
) -> dict[str, Any]:
    """The stage as the CLI / DVC / KFP run it: every saved variant on the validated data, report, MLflow.

    Args:
        cfg: the whole config; uses ``eval`` (and ``validation.out_dir`` as the default data folder); the whole
            config is hashed into the report's provenance.
        data_dir: dataset folder; default ``cfg.validation.out_dir``.
        out_dir: report folder; default ``cfg.eval.out_dir``.
        progress: progress bars.

    Returns:
        :func:`evaluate`'s result, plus ``mlflow_run_id`` when ``eval.mlflow_experiment`` is set.
    """
    variants, missing = collect_variants(cfg.eval, cfg.model.trust_remote_code)
    data_dir = data_dir or cfg.validation.out_dir
    result = evaluate(
        cfg.eval,
        variants,
        data_dir,
        out_dir,
        progress=progress,
        missing=missing,
        params=cfg.to_dict(),
        source=cfg.data.source,
    )
    if cfg.eval.mlflow_experiment:
        result["mlflow_run_id"] = log_to_mlflow(result, cfg.eval.mlflow_experiment)
    return result
