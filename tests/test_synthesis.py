"""Trace synthesis with the offline attributes teacher: what each item may claim, the grounding gate, the stage
(counts reconcile, cache on re-run), and pretraining on the traces (the contract's reasoning flag)."""

from __future__ import annotations

import pandas as pd
import pytest

from moon3.config import load_config
from moon3.data.schema import TRACES, read_table, table_path
from moon3.model.contract import load_contract
from moon3.synthesis.attributes import AttributesTeacher
from moon3.synthesis.grounding import CONTRADICTS, DUPLICATE, OVER_BUDGET, UNPARSEABLE, gate_traces, parse_claims
from moon3.synthesis.synthesize import build_items, synthesize
from moon3.synthesis.teacher import PRODUCT, QUERY, SynthesisItem

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
    results, counts = gate_traces(items, traces, lambda t: len(t.split()), budget=20, min_grounded_score=1.0)
    reasons = [r.reason if r is not None else "failed" for r in results]
    assert reasons == [None, CONTRADICTS, CONTRADICTS, UNPARSEABLE, OVER_BUDGET, "failed", DUPLICATE]
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
