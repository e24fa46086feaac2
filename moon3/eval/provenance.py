"""The provenance block of an evaluation report: which data, which models, which code and configuration."""

from __future__ import annotations

import dataclasses
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from moon3.common.provenance import git_dirty, git_sha, params_hash
from moon3.eval.config import EvalConfig
from moon3.eval.data import EvalData


def dataset_record(data: EvalData, data_dir: str | Path, source: str | None = None) -> dict[str, Any]:
    """Folder, source, counts by split and query type, and what was evaluated (gallery size, queries per type).

    Args:
        data: the loaded eval split.
        data_dir: the dataset folder.
        source: the configured source (``data.source``), used when the folder has no ``stats.json`` naming it.
    """
    stats_file = Path(data_dir) / "stats.json"
    stats = json.loads(stats_file.read_text()) if stats_file.is_file() else {}
    if stats.get("source"):
        source, source_from = stats["source"], "stats.json"
    else:
        source_from = "params data.source" if source else None
    return {
        "data_dir": str(data_dir),
        "source": source,
        "source_from": source_from,
        **data.counts,
        "gallery_size": len(data.products),
        "evaluated_queries": {qtype: len(frame) for qtype, frame in data.queries.items()},
    }


def collect_provenance(
    data: EvalData,
    data_dir: str | Path,
    models: dict[str, dict[str, Any]],
    cfg: EvalConfig,
    params: dict[str, Any] | None = None,
    source: str | None = None,
) -> dict[str, Any]:
    """Everything the top of the report states about where the numbers come from.

    Args:
        data: the loaded eval split.
        data_dir: the dataset folder.
        models: variant -> :func:`moon3.eval.variants.model_record` (or a description for a reference).
        cfg: the ``eval`` section (hashed when ``params`` is not given).
        params: the whole configuration (``Moon3Config.to_dict()``), hashed for the report.
        source: the configured data source.

    Returns:
        ``dataset``, ``models``, ``code`` (``git_sha``, ``dirty``), ``params`` (``hash``, ``scope``), ``date``.
    """
    hashed = params if params is not None else {"eval": dataclasses.asdict(cfg)}
    return {
        "dataset": dataset_record(data, data_dir, source),
        "models": models,
        "code": {"git_sha": git_sha(), "dirty": git_dirty()},
        "params": {"hash": params_hash(hashed), "scope": "whole config" if params is not None else "eval section"},
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
    }
