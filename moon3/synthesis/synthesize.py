"""The ``synthesize`` stage: a trace for every training product and query, through the trace gate.

Reads a validated dataset, asks the configured teacher (``synthesis.teacher``) for each training item's trace
through the cached, retrying client, checks every answer with the grounding filter and writes:

    <out_dir>/traces.parquet                  accepted traces (method.md section 5 columns), pretraining reads it
    <out_dir>/synthesis_report.json           the report below without ``cached``: the evaluation report's
                                              synthesis section reads it (it travels with the traces)
    <report_dir>/rejected.parquet             rejected traces with their reason and ``source`` (teacher or
                                              imported), and failed items with the error
    <report_dir>/synthesis_report.json        counts by outcome and kind (in = accepted + rejected + failed),
                                              claim accuracy, grounded-score histogram, examples; ``imported``:
                                              the same for the traces that came with the dataset
    <report_dir>/synthesis_report.html        the same for people (the validation report's look)
    <report_dir>/run.json                     ``cached``: answers the teacher cache held (state outside the
                                              stage's inputs, so in none of the files above, DVC outputs that a
                                              repeated run reproduces exactly); the returned report has it too

Traces that came with the dataset (``<data_dir>/traces.parquet``, ``TRACE_SCHEMA``; the validation gate has
already dropped those of unknown, quarantined or evaluation items) pass the same gate: same rules, budget and
token counter (``unknown_item`` where a trace names no training item of ``data_dir``). The teacher is not asked
for an item that has an accepted imported trace; with ``synthesis.teacher: none`` only the imported traces are
gated. The token counter of the tiny backbone is trained on the run's traces, so the imported traces are checked
once to choose what the teacher is asked and again with the final counter; one that tips over the budget then is
rejected (its item has no trace). Accepted rows are written in item order (the validated tables' order).

Only the ``train`` split is synthesized: no evaluation product or query reaches training through a trace.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from moon3.common.provenance import RUN_FILE
from moon3.data.schema import TRACE_SCHEMA, TRACES, read_dataset, read_table, table_path, write_table
from moon3.synthesis.grounding import gate_traces
from moon3.synthesis.teacher import PRODUCT, QUERY, SynthesisItem, catalog_truth
from moon3.validation.report import esc, html_table, page, short, write_json

EXAMPLES = 8
TRACE_CHARS = 400  # an example trace in the HTML report is cut here


def build_items(data_dir: str | Path, products: bool = True, queries: bool = True) -> list[SynthesisItem]:
    """The training products and queries of a dataset folder as teacher items (a query carries its
    positive's category path and attributes: the truth its trace is scored against)."""
    root = str(data_dir)
    product_df, query_df = read_dataset(data_dir)
    train = product_df[product_df["split"] == "train"]
    items: list[SynthesisItem] = []
    by_id = {}
    for row in train.to_dict("records"):
        path, attrs = catalog_truth(row["category_path"], row["attributes"])
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
    if sc.teacher == "hf":
        if not sc.hf_model:
            raise ValueError("synthesis.hf_model: set the local folder or gs:// URI of the teacher model")
        import logging

        from moon3.synthesis.hf_teacher import HFTeacher

        if sc.concurrency < sc.hf_batch_size:
            logging.getLogger(__name__).warning(
                "synthesis.concurrency (%d) < synthesis.hf_batch_size (%d): batches cannot fill",
                sc.concurrency,
                sc.hf_batch_size,
            )
        return HFTeacher(
            sc.hf_model,
            batch_size=sc.hf_batch_size,
            device=sc.hf_device,
            temperature=sc.temperature,
            max_new_tokens=sc.max_tokens,
            seed=sc.seed,
            trust_remote_code=sc.hf_trust_remote_code,
        )
    raise ValueError(f"synthesis.teacher: {sc.teacher!r} is not one of attributes, openai, hf, none")


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


def read_imported(data_dir: str | Path) -> pd.DataFrame | None:
    """The traces that arrived with the dataset (``<data_dir>/traces.parquet``), or None when it has none.

    Raises:
        SchemaError: the table does not match ``TRACE_SCHEMA``; the one-line message names the file and column.
    """
    path = table_path(data_dir, TRACES)
    return read_table(path, TRACES) if path.exists() else None


def match_imported(imported: pd.DataFrame, items: list[SynthesisItem]) -> list[SynthesisItem | None]:
    """The training item of each imported trace (None: ``unknown_item``): the query ``query_id`` names (its
    positive must be ``product_id``), or for a product trace (``query_id`` null) the product ``product_id``."""
    by_key = {(i.kind, i.item_id): i for i in items}
    matched: list[SynthesisItem | None] = []
    for product_id, query_id in zip(imported["product_id"], imported["query_id"], strict=True):
        if pd.notna(query_id):
            item = by_key.get((QUERY, query_id))
            matched.append(item if item is not None and item.extra["product_id"] == product_id else None)
        else:
            matched.append(by_key.get((PRODUCT, product_id)))
    return matched


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
        SchemaError: ``<data_dir>/traces.parquet`` does not match ``TRACE_SCHEMA`` (the message names the column).
    """
    from moon3.synthesis.cache import TraceCache
    from moon3.synthesis.client import run_teacher_sync

    sc = cfg.synthesis
    budget, min_score = _trace_budget(cfg), sc.min_grounded_score
    out = Path(out_dir or sc.out_dir)
    reports = Path(report_dir or sc.report_dir)
    out.mkdir(parents=True, exist_ok=True)
    reports.mkdir(parents=True, exist_ok=True)
    imported = read_imported(data_dir)
    known = build_items(data_dir) if sc.teacher != "none" or imported is not None else []
    wanted = {PRODUCT: sc.products, QUERY: sc.queries}
    items = [i for i in known if wanted[i.kind]] if sc.teacher != "none" else []

    # Imported traces first: an item whose imported trace passes the gate is not asked to the teacher.
    imp_items = match_imported(imported, known) if imported is not None else []
    imp_traces = [t if isinstance(t, str) else "" for t in imported["trace"]] if imported is not None else []
    count = token_counter(cfg, data_dir, [t for t in imp_traces if t]) if imp_traces else len
    imp_results, imp_counts = gate_traces(imp_items, imp_traces, count, budget, min_score)
    covered = {(i.kind, i.item_id) for i, r in zip(imp_items, imp_results, strict=True) if r.reason is None}
    asked = [i for i in items if (i.kind, i.item_id) not in covered]
    covered_n, items = len(items) - len(asked), asked

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
    # One counter for every trace of the run. The tiny backbone's tokenizer is trained on the run's traces, so
    # once the teacher has answered it is rebuilt and the imported traces are checked again with it (one that
    # tips over the budget now is rejected); a real backbone's tokenizer does not depend on them.
    if items and (not imp_traces or cfg.model.backbone == "tiny"):
        count = token_counter(cfg, data_dir, [t for t in [*imp_traces, *traces] if t])
        if imp_traces:
            imp_results, imp_counts = gate_traces(imp_items, imp_traces, count, budget, min_score)
    results, counts = gate_traces(items, traces, count, budget, min_score)

    position = {(i.kind, i.item_id): n for n, i in enumerate(known)}
    accepted: list[tuple[int, int, str, dict[str, Any]]] = []  # (item position, input row, source, trace row)
    rejected = []
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
            accepted.append((position[(item.kind, item.item_id)], 0, "teacher", row))
        else:
            reason = "failed: " + str(outcome.error) if result is None else result.reason
            rejected.append({**row, "item_id": item.item_id, "kind": item.kind, "reason": reason, "source": "teacher"})
    imp_records = imported.to_dict("records") if imported is not None else []
    imp_ids = [_imported_id(r) for r in imp_records]
    for n, (record, item, result) in enumerate(zip(imp_records, imp_items, imp_results, strict=True)):
        row = {**{k: record[k] for k in TRACE_SCHEMA.names}, "grounded_score": result.grounded_score}
        if result.reason is None:
            accepted.append((position[(item.kind, item.item_id)], n, "imported", row))
        else:
            rejected.append({**row, **dict(zip(("kind", "item_id"), imp_ids[n], strict=True)), "reason": result.reason,
                             "source": "imported"})  # fmt: skip
    for source, n_in in (("teacher", len(items)), ("imported", len(imp_records))):
        n_out = sum(a[2] == source for a in accepted) + sum(r["source"] == source for r in rejected)
        if n_in != n_out:
            raise RuntimeError(f"synthesis lost {source} traces: {n_in} in, {n_out} accepted or rejected")
    # Item order (the validated tables' order), imported rows of one item in file order: deterministic.
    rows = [a[3] for a in sorted(accepted, key=lambda a: a[:2])]
    # The columns name the schema even when nothing was accepted (an empty, well-typed table).
    write_table(pd.DataFrame(rows, columns=TRACE_SCHEMA.names), table_path(out, TRACES), TRACES)
    columns = [*TRACE_SCHEMA.names, "item_id", "kind", "reason", "source"]
    pd.DataFrame(rejected, columns=columns).to_parquet(reports / "rejected.parquet")

    teacher_rows = [(i.item_id, i.kind, i.text) for i in items]
    imp_rows = [(i, k, it.text if it else None) for (k, i), it in zip(imp_ids, imp_items, strict=True)]
    report = {
        "teacher": sc.teacher,
        **_summary(teacher_rows, traces, results, counts),
        "cached": sum(bool(getattr(o, "cached", False)) for o in outcomes),
        "not_asked": skipped,  # items the teacher has no facts for (image-only queries for `attributes`)
        "covered_by_imported": covered_n,  # items with an accepted imported trace: the teacher was not asked
        "imported": {
            "file": str(table_path(data_dir, TRACES)) if imported is not None else None,
            **_summary(imp_rows, imp_traces, imp_results, imp_counts),
        },
        "budget": budget,
        "min_grounded_score": min_score,
        "report_html": str(reports / "synthesis_report.html"),
    }
    for part in (report, report["imported"]):
        if part["in"] != part["accepted"] + sum(part["rejected"].values()) + part["failed"]:
            raise RuntimeError(f"synthesis counts do not reconcile: {part['in']} in, {part}")
    # `cached` changes between runs that write the same traces: run.json only.
    stable = {k: v for k, v in report.items() if k != "cached"}
    write_json(reports / "synthesis_report.json", stable)
    write_json(reports / RUN_FILE, {"cached": report["cached"]})
    # A copy beside the traces (the stage's DVC output and KFP artifact) for the evaluation report.
    write_json(out / "synthesis_report.json", stable)
    (reports / "synthesis_report.html").write_text(_html(report))
    return report


def _imported_id(record: dict[str, Any]) -> tuple[str, str]:
    """``(kind, item id)`` an imported trace row claims to be about."""
    query_id = record["query_id"]
    return (QUERY, str(query_id)) if pd.notna(query_id) else (PRODUCT, str(record["product_id"]))


def _summary(rows: list[tuple[str, str, str | None]], traces: list[str | None], results: list, counts: Counter):
    """Counts by outcome and by kind, claim accuracy, tokens, grounded-score histogram and examples of one
    source of traces; ``rows`` are ``(item id, kind, item text)`` in the order of ``traces`` and ``results``."""
    scored = [r for r in results if r is not None and r.claims]
    claims = sum(r.claims for r in scored)
    correct = sum(r.correct for r in scored)
    scores = np.array([r.grounded_score for r in scored]) if scored else np.zeros(0)
    hist, edges = np.histogram(scores, bins=10, range=(0.0, 1.0))
    by_kind: dict[str, dict[str, int]] = {}
    rejected_examples: dict[str, dict[str, Any]] = {}
    examples = []
    for (item_id, kind, text), trace, result in zip(rows, traces, results, strict=True):
        outcome = "failed" if result is None else "accepted" if result.reason is None else "rejected"
        kind_counts = by_kind.setdefault(kind, {"in": 0, "accepted": 0, "rejected": 0, "failed": 0})
        kind_counts["in"] += 1
        kind_counts[outcome] += 1
        if outcome == "accepted" and len(examples) < EXAMPLES:
            examples.append({"item_id": item_id, "kind": kind, "text": text, "trace": trace})
        elif outcome != "accepted":
            example = rejected_examples.setdefault(outcome if result is None else result.reason,
                                                   {"item_ids": [], "trace": trace})  # fmt: skip
            if len(example["item_ids"]) < EXAMPLES:
                example["item_ids"].append(item_id)
    return {
        "in": len(rows),
        "by_kind": by_kind,
        "accepted": counts.get("accepted", 0),
        "rejected": {k: v for k, v in counts.items() if k not in ("accepted", "failed")},
        "failed": counts.get("failed", 0),
        "claim_accuracy": correct / claims if claims else None,
        "mean_claims": claims / len(scored) if scored else None,
        "mean_tokens": float(np.mean([r.tokens for r in scored])) if scored else None,
        "max_tokens": int(max((r.tokens for r in scored), default=0)),
        "grounded_score_histogram": {"edges": edges.round(2).tolist(), "counts": hist.tolist()},
        "rejected_examples": rejected_examples,
        "examples": examples,
    }


def _html(report: dict[str, Any]) -> str:
    """The report for people, built from the validation report's blocks (same look as the data gate's)."""
    sources = [("teacher", report)] + ([("imported", report["imported"])] if report["imported"]["file"] else [])
    total_in = sum(part["in"] for _, part in sources)
    total_accepted = sum(part["accepted"] for _, part in sources)
    lost = total_in - total_accepted
    css = "fail" if total_in and not total_accepted else "warning" if lost else "pass"
    share = f" ({total_accepted / total_in:.1%})" if total_in else ""
    parts = [f"<h2 class='{css}'>{total_accepted} of {total_in} traces accepted{share}, {lost} rejected or failed</h2>"]
    imported = report["imported"]["file"]
    parts.append(
        f"<p>teacher <code>{esc(report['teacher'])}</code>; imported traces: "
        + (f"<code>{esc(imported)}</code>" if imported else "none")
        + f"; trace budget {report['budget']} tokens, minimum grounded score {report['min_grounded_score']}; "
        f"{report['not_asked']} training items not asked (the teacher has no facts for them), "
        f"{report['covered_by_imported']} not asked because an imported trace of theirs was accepted. "
        "Every source reconciles: in = accepted + rejected + failed.</p>"
    )
    rows = []
    for source, part in sources:
        for kind, c in sorted(part["by_kind"].items()):
            rows.append([source, kind, c["in"], c["accepted"], c["rejected"], c["failed"]])
        rows.append([source, "all", part["in"], part["accepted"], sum(part["rejected"].values()), part["failed"]])
    parts.append("<h2>Counts</h2>" + html_table(["source", "kind", "in", "accepted", "rejected", "failed"], rows))
    rows = [
        [source, reason, part["rejected"].get(reason, part["failed"]), ", ".join(ex["item_ids"]),
         _pre(ex["trace"])]
        for source, part in sources for reason, ex in part["rejected_examples"].items()
    ]  # fmt: skip
    parts.append("<h2>Rejected by reason</h2>")
    header = ["source", "reason", "count", "example item ids", "example trace"]
    parts.append(html_table(header, rows, raw={4}) if rows else "<p>none</p>")
    rows = [[source, _number(part["claim_accuracy"], ".2%"), _number(part["mean_claims"], ".2f"),
             _number(part["mean_tokens"], ".1f"), part["max_tokens"]] for source, part in sources]  # fmt: skip
    parts.append("<h2>Claims</h2>" + html_table(["source", "claim accuracy", "mean claims", "mean tokens",
                                                 "max tokens"], rows))  # fmt: skip
    edges = report["grounded_score_histogram"]["edges"]
    counts = [part["grounded_score_histogram"]["counts"] for _, part in sources]
    top = max((n for c in counts for n in c), default=0) or 1
    bar = "<span style='display:inline-block;height:10px;background:#4a7fd4;width:{}px'></span> {}"
    rows = [[f"{lo:.1f}-{hi:.1f}", *[bar.format(round(160 * c[b] / top), c[b]) for c in counts]]
            for b, (lo, hi) in enumerate(zip(edges[:-1], edges[1:], strict=True))]  # fmt: skip
    parts.append("<h2>Grounded score of the scored traces</h2>")
    parts.append(html_table(["score", *[s for s, _ in sources]], rows, raw=range(1, len(sources) + 1)))
    rows = [[source, e["kind"], e["item_id"], e["text"] or "(image)", _pre(e["trace"])]
            for source, part in sources for e in part["examples"]]  # fmt: skip
    parts.append("<h2>Accepted traces (examples)</h2>")
    parts.append(html_table(["source", "kind", "item", "text", "trace"], rows, raw={4}) if rows else "<p>none</p>")
    return page(f"moon3 trace synthesis ({report['teacher']})", parts) + "\n"


def _pre(trace: str | None) -> str:
    return "(no trace)" if trace is None else f"<pre>{esc(short(trace, TRACE_CHARS))}</pre>"


def _number(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def _trace_budget(cfg: Any) -> int:
    """The trace budget the model will have: ``model.max_trace_tokens`` after the backbone preset is applied
    (48 on the tiny backbone, 128 on a real one unless set explicitly)."""
    from moon3.model.backbone import backbone_config_of
    from moon3.model.presets import resolve

    return resolve(cfg.model, backbone_config_of(cfg.model)).max_trace_tokens
