"""Trace synthesis with the offline attributes teacher: what each item may claim, the grounding gate, the stage
(counts reconcile, cache on re-run), and pretraining on the traces (the contract's reasoning flag)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from moon3.config import load_config
from moon3.data.mini import SYNONYMS
from moon3.data.schema import PRODUCTS, TRACES, SchemaError, read_table, table_path, write_table
from moon3.model.contract import load_contract
from moon3.synthesis import synthesize as stage
from moon3.synthesis.attributes import AttributesTeacher
from moon3.synthesis.grounding import (
    CONTRADICTS,
    DUPLICATE,
    OVER_BUDGET,
    UNKNOWN_ITEM,
    UNPARSEABLE,
    gate_traces,
    parse_claims,
)
from moon3.synthesis.synthesize import build_items, synthesize
from moon3.synthesis.teacher import PRODUCT, QUERY, SynthesisItem
from moon3.validation.config import ValidationConfig
from moon3.validation.gate import validate

PATH = ("Clothing", "Tops", "t-shirt")
ATTRS = (("brand", "Olmo"), ("color", "red"), ("logo", "A"), ("material", "silk"), ("size", "small"))


def _item(kind=PRODUCT, text="Olmo red t-shirt", image="a.png", query_type=None, item_id="x"):
    return SynthesisItem(item_id, kind, text, image, "/data", PATH, ATTRS, query_type)


def test_attributes_teacher_claims_only_what_the_item_supports():
    teacher = AttributesTeacher(seed=0, synonyms={"red": ("crimson",)})
    product = teacher.facts(_item())
    assert product[0] == ("category", "Clothing > Tops > t-shirt") and dict(product[1:]) == dict(ATTRS)
    # A text query names its colour by a synonym and the leaf: category + colour, nothing it does not say.
    text = dict(teacher.facts(_item(QUERY, "crimson tee t-shirt", None, "text")))
    assert text == {"category": "Clothing > Tops > t-shirt", "color": "red"}
    # An image-only query: this teacher cannot see it, so it is not asked (its positive's data is the answer).
    assert not teacher.answers(_item(QUERY, None, "q.png", "image")) and teacher.answers(_item(QUERY, "red", None))
    # A category query: the path down to the named level.
    assert teacher.facts(_item(QUERY, "Tops", None, "category")) == [("category", "Clothing > Tops")]
    # Same content, same trace; attribute lines in key order, or varied per item with vary_order.
    assert teacher.trace(_item()) == teacher.trace(_item(item_id="y"))
    assert [k for k, _ in product[1:]] == sorted(k for k, _ in ATTRS)
    varied = AttributesTeacher(seed=0, vary_order=True)
    orders = {tuple(k for k, _ in varied.facts(_item(text=f"Olmo tee {i}"))) for i in range(8)}
    assert len(orders) > 1


def test_grounding_gate_rejects_with_reasons_and_reconciles():
    items = [_item(item_id=str(i)) for i in range(6)] + [_item(item_id="0")]
    traces = [
        "category: Clothing > Tops\ncolor: red",  # right (a prefix of the path is right)
        "category: Home > Kitchen\ncolor: red",  # wrong category
        "color: blue",  # contradicts the colour
        "a red shirt, I think",  # not key: value
        "color: red\n" * 30,  # over the budget
        None,  # the teacher failed
        "category: Clothing > Tops\ncolor: red",  # item 0 again with the same trace
    ]
    items.append(None)  # an imported trace whose item the dataset does not have
    traces.append("category: Clothing > Tops")
    results, counts = gate_traces(items, traces, lambda t: len(t.split()), budget=20, min_grounded_score=1.0)
    reasons = [r.reason if r is not None else "failed" for r in results]
    assert reasons == [None, CONTRADICTS, CONTRADICTS, UNPARSEABLE, OVER_BUDGET, "failed", DUPLICATE, UNKNOWN_ITEM]
    assert sum(counts.values()) == len(items) and counts["accepted"] == 1
    assert results[0].grounded_score == 1.0 and results[1].grounded_score == 0.5
    assert parse_claims("key: value\n\nother: x") == [("key", "value"), ("other", "x")]


def test_stage_writes_gated_traces_and_reuses_the_cache(mini_dataset, tmp_path):
    cfg = load_config(None, [f"synthesis.cache_path={tmp_path / 'cache.sqlite'}"])
    report = synthesize(cfg, mini_dataset, tmp_path / "traces", tmp_path / "reports", progress=False)
    items = build_items(mini_dataset)
    assert report["in"] + report["not_asked"] == len(items)
    assert report["in"] == report["accepted"] + sum(report["rejected"].values()) + report["failed"]
    assert report["not_asked"] == sum(i.kind == QUERY and not i.text for i in items) > 0
    assert report["accepted"] == report["in"] and report["claim_accuracy"] == 1.0  # its own facts are grounded
    assert report["max_tokens"] <= cfg.model.max_trace_tokens
    traces = read_table(table_path(tmp_path / "traces", TRACES), TRACES)
    assert traces["query_id"].notna().sum() == sum(i.kind == QUERY and bool(i.text) for i in items)
    assert set(traces["teacher"]) == {"attributes"} and (traces["grounded_score"] == 1.0).all()
    again = synthesize(cfg, mini_dataset, tmp_path / "traces2", tmp_path / "reports2", progress=False)
    assert again["cached"] == again["in"]
    assert pd.read_parquet(table_path(tmp_path / "traces2", TRACES)).equals(
        pd.read_parquet(table_path(tmp_path / "traces", TRACES))
    )


class CountingTeacher:
    """The real attributes teacher, recording the items it is asked about."""

    def __init__(self, inner: AttributesTeacher):
        self.inner, self.asked = inner, []
        self.name, self.model, self.decoding = inner.name, inner.model, inner.decoding

    def answers(self, item: SynthesisItem) -> bool:
        return self.inner.answers(item)

    def prompt_hash(self) -> str:
        return self.inner.prompt_hash()

    async def complete(self, item: SynthesisItem) -> str:
        self.asked.append(item.item_id)
        return await self.inner.complete(item)


def _trace_row(item: SynthesisItem, trace: str, product_id: str | None = None) -> dict:
    query_id = item.item_id if item.kind == QUERY else None
    return {"product_id": product_id or item.extra["product_id"], "query_id": query_id, "trace": trace,
            "teacher": "imported-teacher", "prompt_hash": "h0", "decoding": "{}", "grounded_score": None}  # fmt: skip


@pytest.fixture
def imported(mini_dataset, tmp_path):
    """The sample with a traces.parquet: 3 good product traces and 1 good query trace, then one trace each that
    contradicts an attribute, names an unknown product, an eval-split product, is over budget, is a duplicate."""
    data = tmp_path / "prepared"
    shutil.copytree(mini_dataset, data)
    teacher = AttributesTeacher(0, SYNONYMS)
    items = build_items(data)
    products = [i for i in items if i.kind == PRODUCT]
    query = next(i for i in items if i.kind == QUERY and i.text)
    good, contradict, over = [*products[:3], query], products[3], products[4]
    frame = read_table(table_path(data, PRODUCTS), PRODUCTS)
    eval_id = frame.loc[frame["split"] == "eval", "product_id"].iloc[0]
    key, value = contradict.attributes[0]
    rows = [_trace_row(i, teacher.trace(i)) for i in good]
    rows += [
        _trace_row(contradict, f"{key}: not-{value}"),
        _trace_row(products[0], "category: Clothing", product_id="p_nope"),
        _trace_row(products[0], teacher.trace(products[0]), product_id=eval_id),
        _trace_row(over, "\n".join([teacher.trace(over)] * 8)),
        _trace_row(good[0], teacher.trace(good[0])),
    ]
    write_table(pd.DataFrame(rows), table_path(data, TRACES), TRACES)
    return {"data": data, "good": good, "contradict": contradict, "over": over, "eval_id": eval_id, "items": items}


def test_imported_traces_pass_the_data_gate_and_the_trace_gate(imported, tmp_path, monkeypatch):
    validated, quarantine = tmp_path / "validated", tmp_path / "quarantine"
    gate = validate(ValidationConfig(), imported["data"], validated, quarantine, tmp_path / "vr", progress=False)
    assert gate.passed, [f.to_dict() for f in gate.blocking]
    counts = gate.metrics[TRACES]
    assert counts["rows_in"] == 9 == counts["rows_accepted"] + counts["rows_quarantined"]
    assert counts["reasons"] == {"unknown_item": 1, "not_train_split": 1}
    dropped = read_table(table_path(quarantine, TRACES), TRACES, check=False)
    assert dict(zip(dropped["product_id"], dropped["reasons"].map(list), strict=True)) == {
        "p_nope": ["unknown_item"],
        imported["eval_id"]: ["not_train_split"],
    }
    assert len(read_table(table_path(validated, TRACES), TRACES)) == 7

    teacher = CountingTeacher(AttributesTeacher(0, SYNONYMS))
    monkeypatch.setattr(stage, "make_teacher", lambda cfg: teacher)
    cfg = load_config(None, [f"synthesis.cache_path={tmp_path / 'cache.sqlite'}"])
    report = synthesize(cfg, validated, tmp_path / "traces", tmp_path / "reports", progress=False)

    imp = report["imported"]
    assert imp["in"] == 7 and imp["accepted"] == 4 and imp["failed"] == 0
    assert imp["rejected"] == {CONTRADICTS: 1, OVER_BUDGET: 1, DUPLICATE: 1}
    assert imp["by_kind"] == {PRODUCT: {"in": 6, "accepted": 3, "rejected": 3, "failed": 0},
                              QUERY: {"in": 1, "accepted": 1, "rejected": 0, "failed": 0}}  # fmt: skip
    assert report["in"] == report["accepted"] + sum(report["rejected"].values()) + report["failed"]
    items = imported["items"]
    answerable = [i for i in items if teacher.answers(i)]
    assert report["covered_by_imported"] == 4 and report["not_asked"] == len(items) - len(answerable)
    assert report["in"] == len(answerable) - 4 == report["accepted"]
    # The teacher was not asked for the items with an accepted imported trace, and was for the rejected ones.
    assert not {i.item_id for i in imported["good"]} & set(teacher.asked)
    assert {imported["contradict"].item_id, imported["over"].item_id} <= set(teacher.asked)

    traces = read_table(table_path(tmp_path / "traces", TRACES), TRACES)
    assert len(traces) == report["accepted"] + imp["accepted"]
    mine = traces[traces["teacher"] == "imported-teacher"]
    assert sorted(zip(mine["product_id"], mine["query_id"].fillna(""), strict=True)) == sorted(
        (i.extra["product_id"], i.item_id if i.kind == QUERY else "") for i in imported["good"]
    )
    assert (mine["grounded_score"] == 1.0).all()  # the gate's score, not the file's (null there)
    position = {(i.kind, i.item_id): n for n, i in enumerate(items)}
    pairs = zip(traces["product_id"], traces["query_id"], strict=True)
    keys = [(QUERY, q) if isinstance(q, str) else (PRODUCT, p) for p, q in pairs]
    assert [position[k] for k in keys] == sorted(position[k] for k in keys)  # item order, whatever the source

    rejected = pd.read_parquet(tmp_path / "reports" / "rejected.parquet")
    assert sorted(rejected.loc[rejected["source"] == "imported", "reason"]) == [CONTRADICTS, DUPLICATE, OVER_BUDGET]
    saved = json.loads((tmp_path / "reports" / "synthesis_report.json").read_text())
    beside = json.loads((tmp_path / "traces" / "synthesis_report.json").read_text())
    assert beside == {k: v for k, v in saved.items() if k != "cached"}
    assert saved["imported"]["rejected_examples"][CONTRADICTS]["item_ids"] == [imported["contradict"].item_id]

    html = (tmp_path / "reports" / "synthesis_report.html").read_text()
    total = report["in"] + imp["in"]
    assert f"{report['accepted'] + 4} of {total} traces accepted" in html
    counts_row = "<td>imported</td><td>all</td><td>7</td><td>4</td><td>3</td><td>0</td>"
    for text in (CONTRADICTS, OVER_BUDGET, DUPLICATE, "Rejected by reason", "Grounded score", "Claims",
                 imported["contradict"].item_id, counts_row):  # fmt: skip
        assert text in html, text


def test_imported_traces_without_a_teacher_and_unknown_items(imported, tmp_path):
    """``teacher: none`` still gates imported traces; on an unvalidated folder the trace gate itself finds the
    unknown and evaluation-split items (neither is a training item)."""
    cfg = load_config(None, ["synthesis.teacher=none"])
    report = synthesize(cfg, imported["data"], tmp_path / "traces", tmp_path / "reports", progress=False)
    assert report["in"] == 0 and report["covered_by_imported"] == 0
    imp = report["imported"]
    assert imp["in"] == 9 == imp["accepted"] + sum(imp["rejected"].values())
    assert imp["rejected"] == {UNKNOWN_ITEM: 2, CONTRADICTS: 1, OVER_BUDGET: 1, DUPLICATE: 1}
    assert len(read_table(table_path(tmp_path / "traces", TRACES), TRACES)) == imp["accepted"] == 4
    assert "unknown_item" in (tmp_path / "reports" / "synthesis_report.html").read_text()


def test_imported_trace_table_of_the_wrong_type_names_file_and_column(imported, tmp_path):
    path = table_path(imported["data"], TRACES)
    arrow = pq.read_table(path)
    at = arrow.schema.get_field_index("grounded_score")
    pq.write_table(arrow.set_column(at, "grounded_score", pa.array(["high"] * arrow.num_rows)), path)
    with pytest.raises(SchemaError) as err:
        synthesize(load_config(None, ["synthesis.teacher=none"]), imported["data"], tmp_path / "t", tmp_path / "r")
    assert str(err.value) == f"{path}: column 'grounded_score' has type string, expected double"


@pytest.mark.slow
def test_training_on_traces_saves_a_reasoning_model(mini_dataset, tmp_path, monkeypatch):
    from moon3.train.contrastive import train_contrastive

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlruns.db")
    sets = [f"synthesis.cache_path={tmp_path / 'cache.sqlite'}", f"train.traces_dir={tmp_path / 'traces'}",
            "train.steps=3", "train.batch_size=4", "train.heldout_queries=0", "train.num_workers=0",
            f"train.out_dir={tmp_path / 'model'}", f"train.report_dir={tmp_path / 'r'}"]  # fmt: skip
    cfg = load_config(None, sets)
    synthesize(cfg, mini_dataset, tmp_path / "traces", tmp_path / "reports", progress=False)
    summary = train_contrastive(cfg, mini_dataset, progress=False)
    assert summary["trained_with_traces"] is True
    contract, payload = load_contract(tmp_path / "model" / "final")
    assert contract.reasoning and contract.trained_with_traces and payload["training"]["traces"] is True


def test_trace_gate_budget_follows_the_backbone_preset():
    """The gate rejects traces over the budget the model will have: 48 tokens on the tiny backbone, 128 on a real
    one (the preset), an explicit model.max_trace_tokens in either case."""
    from moon3.config import load_config
    from moon3.synthesis.synthesize import _trace_budget

    real = "model.backbone=" + str(Path(__file__).resolve().parents[1] / "moon3/model/real/qwen2_5_vl_3b.json")
    assert _trace_budget(load_config(None)) == 48
    assert _trace_budget(load_config(None, [real])) == 128
    assert _trace_budget(load_config(None, [real, "model.max_trace_tokens=64"])) == 64
