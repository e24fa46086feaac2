"""The ``synthesize`` stage: a trace for every training product and query, through the trace gate.

Reads a validated dataset, asks the configured teacher (``synthesis.teacher``) for each training item's trace
through the cached, retrying client, checks every answer with the grounding filter and writes:

    <out_dir>/traces.parquet                  accepted traces (method.md section 5 columns), pretraining reads it
    <report_dir>/rejected.parquet             rejected traces with their reason, and failed items with the error
    <report_dir>/synthesis_report.json        counts by outcome (in = accepted + rejected + failed), claim
                                              accuracy, grounded-score histogram, examples
    <report_dir>/synthesis_report.html        the same for people

Only the ``train`` split is synthesized: no evaluation product or query reaches training through a trace.
"""

from __future__ import annotations

import html
import json
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from moon3.data.schema import TRACE_SCHEMA, TRACES, read_dataset, table_path, write_table
from moon3.synthesis.grounding import gate_traces
from moon3.synthesis.teacher import PRODUCT, QUERY, SynthesisItem

EXAMPLES = 8


def build_items(data_dir: str | Path, products: bool = True, queries: bool = True) -> list[SynthesisItem]:
    """The training products and queries of a dataset folder as teacher items (a query carries its
    positive's category path and attributes: the truth its trace is scored against)."""
    root = str(data_dir)
    product_df, query_df = read_dataset(data_dir)
    train = product_df[product_df["split"] == "train"]
    items: list[SynthesisItem] = []
    by_id = {}
    for row in train.to_dict("records"):
        attrs = tuple(sorted((str(k), str(v)) for k, v in (row["attributes"] or {}).items()))
        path = tuple(row["category_path"] or ())
        by_id[row["product_id"]] = (path, attrs)
        if products:
            items.append(SynthesisItem(row["product_id"], PRODUCT, _text(row.get("title")), _text(row.get("image")),
                                       root, path, attrs, extra={"product_id": row["product_id"]}))  # fmt: skip
    if queries:
        for row in query_df[query_df["split"] == "train"].to_dict("records"):
            if row["positive_product_id"] not in by_id:
                continue  # a query whose positive did not pass the gate has no training use
            path, attrs = by_id[row["positive_product_id"]]
            items.append(
                SynthesisItem(
                    row["query_id"],
                    QUERY,
                    _text(row.get("query_text")),
                    _text(row.get("query_image")),
                    root,
                    path,
                    attrs,
                    row.get("query_type"),
                    extra={"product_id": row["positive_product_id"]},
                )  # fmt: skip
            )
    return items


def _text(value: Any) -> str | None:
    return value.strip() if isinstance(value, str) and value.strip() else None


def make_teacher(cfg: Any) -> Any:
    """The teacher ``synthesis.teacher`` names (``cfg`` is the whole config).

    Raises:
        ValueError: an unknown teacher, or a model teacher without its model setting.
    """
    sc = cfg.synthesis
    if sc.teacher == "attributes":
        from moon3.synthesis.attributes import AttributesTeacher

        synonyms = None
        if cfg.data.source == "mbe3-mini":  # the generator knows the words its shoppers use for each value
            from moon3.data.mini import SYNONYMS as synonyms
        return AttributesTeacher(sc.seed, synonyms, sc.vary_order)
    if sc.teacher == "openai":
        if not sc.openai_model:
            raise ValueError("synthesis.openai_model: set the model name the endpoint serves")
        from moon3.synthesis.openai_teacher import OpenAITeacher

        return OpenAITeacher(sc.openai_base_url, sc.openai_model, sc.openai_token_env, sc.temperature, sc.max_tokens)
    raise ValueError(f"synthesis.teacher: {sc.teacher!r} is not one of attributes, openai, none")


def token_counter(cfg: Any, data_dir: str | Path, traces: list[str]):
    """Counts trace tokens with the tokenizer the model will have: for the tiny backbone the one pretraining
    trains on this catalog and these traces; else the backbone's own."""
    from moon3.model.backbone import load_processor, resolve_model_dir, train_tokenizer
    from moon3.model.items import catalog_texts

    if cfg.model.backbone == "tiny":
        tokenizer = train_tokenizer([*catalog_texts(data_dir), *traces])
    else:
        tokenizer = load_processor(resolve_model_dir(cfg.model.backbone)).tokenizer

    def count(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"])

    return count


def synthesize(
    cfg: Any,
    data_dir: str | Path,
    out_dir: str | Path | None = None,
    report_dir: str | Path | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Run the stage; see the module docstring. Returns the report's counts and metrics.

    Raises:
        RuntimeError: the counts do not reconcile (a bug, never silent).
    """
    from moon3.synthesis.cache import TraceCache
    from moon3.synthesis.client import run_teacher_sync

    sc = cfg.synthesis
    out = Path(out_dir or sc.out_dir)
    reports = Path(report_dir or sc.report_dir)
    out.mkdir(parents=True, exist_ok=True)
    reports.mkdir(parents=True, exist_ok=True)
    items = build_items(data_dir, sc.products, sc.queries) if sc.teacher != "none" else []
    outcomes, skipped = [], 0
    if items:
        teacher = make_teacher(cfg)
        answerable = [i for i in items if getattr(teacher, "answers", lambda _: True)(i)]
        skipped, items = len(items) - len(answerable), answerable
        Path(sc.cache_path).parent.mkdir(parents=True, exist_ok=True)
        with TraceCache(sc.cache_path) as cache:
            outcomes = run_teacher_sync(
                items, teacher, cache=cache, concurrency=sc.concurrency, timeout_s=sc.timeout_s,
                max_retries=sc.max_retries, backoff_base_s=sc.backoff_base_s, backoff_max_s=sc.backoff_max_s,
                progress=progress,
            )  # fmt: skip
    traces = [o.trace if o.status == "ok" else None for o in outcomes]
    count = token_counter(cfg, data_dir, [t for t in traces if t]) if items else len
    results, counts = gate_traces(items, traces, count, cfg.model.max_trace_tokens, sc.min_grounded_score)
    accepted, rejected = [], []
    for item, outcome, result in zip(items, outcomes, results, strict=True):
        row = {
            "product_id": item.extra["product_id"],
            "query_id": item.item_id if item.kind == QUERY else None,
            "trace": outcome.trace,
            "teacher": outcome.teacher,
            "prompt_hash": outcome.prompt_hash,
            "decoding": outcome.decoding,
            "grounded_score": None if result is None else result.grounded_score,
        }
        if result is not None and result.reason is None:
            accepted.append(row)
        else:
            reason = "failed: " + str(outcome.error) if result is None else result.reason
            rejected.append({**row, "item_id": item.item_id, "kind": item.kind, "reason": reason})
    if len(items) != len(accepted) + len(rejected):
        raise RuntimeError(f"synthesis lost items: {len(items)} in, {len(accepted)} accepted, {len(rejected)} other")
    # The columns name the schema even when nothing was accepted (an empty, well-typed table).
    write_table(pd.DataFrame(accepted, columns=TRACE_SCHEMA.names), table_path(out, TRACES), TRACES)
    pd.DataFrame(rejected).to_parquet(reports / "rejected.parquet")
    report = _report(items, outcomes, results, counts, sc.teacher)
    report["not_asked"] = skipped  # items the teacher has no facts for (image-only queries for `attributes`)
    (reports / "synthesis_report.json").write_text(json.dumps(report, indent=2) + "\n")
    (reports / "synthesis_report.html").write_text(_html(report))
    return report


def _report(items, outcomes, results, counts: Counter, teacher: str) -> dict[str, Any]:
    scored = [r for r in results if r is not None and r.claims]
    claims = sum(r.claims for r in scored)
    correct = sum(r.correct for r in scored)
    scores = np.array([r.grounded_score for r in scored]) if scored else np.zeros(0)
    hist, edges = np.histogram(scores, bins=10, range=(0.0, 1.0))
    accepted = [(i, o) for i, o, r in zip(items, outcomes, results, strict=True) if r is not None and r.reason is None]
    by_kind = Counter(i.kind for i in items)
    return {
        "teacher": teacher,
        "in": len(items),
        "by_kind": dict(by_kind),
        "accepted": counts.get("accepted", 0),
        "rejected": {k: v for k, v in counts.items() if k not in ("accepted", "failed")},
        "failed": counts.get("failed", 0),
        "cached": sum(bool(getattr(o, "cached", False)) for o in outcomes),
        "claim_accuracy": correct / claims if claims else None,
        "mean_claims": claims / len(scored) if scored else None,
        "mean_tokens": float(np.mean([r.tokens for r in scored])) if scored else None,
        "max_tokens": int(max((r.tokens for r in scored), default=0)),
        "grounded_score_histogram": {"edges": edges.round(2).tolist(), "counts": hist.tolist()},
        "examples": [
            {"item_id": i.item_id, "kind": i.kind, "text": i.text, "trace": o.trace} for i, o in accepted[:EXAMPLES]
        ],
    }


def _html(report: dict[str, Any]) -> str:
    rows = "".join(f"<tr><td>{html.escape(str(k))}</td><td>{v}</td></tr>" for k, v in
                   [("in", report["in"]), ("accepted", report["accepted"]), ("failed", report["failed"]),
                    *[(f"rejected: {k}", v) for k, v in report["rejected"].items()],
                    ("claim accuracy", report["claim_accuracy"]), ("mean tokens", report["mean_tokens"])])  # fmt: skip
    hist = report["grounded_score_histogram"]
    bars = "".join(
        f"<tr><td>{lo:.1f}-{hi:.1f}</td><td>{n}</td></tr>"
        for lo, hi, n in zip(hist["edges"][:-1], hist["edges"][1:], hist["counts"], strict=True)
    )
    examples = "".join(
        f"<li><b>{html.escape(e['kind'])} {html.escape(e['item_id'])}</b> {html.escape(e['text'] or '(image)')}"
        f"<pre>{html.escape(e['trace'] or '')}</pre></li>"
        for e in report["examples"]
    )
    return (
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>moon3 trace synthesis</title></head><body>"
        f"<h1>Trace synthesis ({html.escape(report['teacher'])})</h1><table>{rows}</table>"
        f"<h2>Grounded score</h2><table>{bars}</table><h2>Examples</h2><ul>{examples}</ul></body></html>\n"
    )
