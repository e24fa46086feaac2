"""The validation gate on mbe3-mini corrupted on purpose, one kind of damage per test.

Each test copies the session sample, breaks it in one way, runs the real gate (Great Expectations included)
and checks where the damage lands: the quarantine with the right reason, or a failed gate with the right
message; and that every row is accounted for (rows in = accepted + quarantined).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from moon3.data.io import load_image
from moon3.data.schema import PRODUCTS, QUERIES, TRACES, read_table, table_path, write_table
from moon3.validation.config import ValidationConfig
from moon3.validation.gate import ValidationResult, _rebase_uri, validate


def _copy(src: Path, dest: Path, products=None, queries=None) -> Path:
    """Copy the sample (images included: tests write into them) and apply edits to the tables."""
    shutil.copytree(src, dest)
    for table, edit in ((PRODUCTS, products), (QUERIES, queries)):
        if edit is not None:
            df = read_table(table_path(dest, table), table)
            edit(df, dest)
            write_table(df, table_path(dest, table), table)
    return dest


def _run(tmp_path: Path, data: Path, **overrides) -> ValidationResult:
    cfg = ValidationConfig(**overrides)
    return validate(cfg, data, tmp_path / "validated", tmp_path / "quarantine", tmp_path / "reports", progress=False)


def _rows(path: Path) -> int:
    return pq.read_metadata(path).num_rows if path.exists() else 0


def _reconciles(result: ValidationResult, data: Path) -> None:
    """Rows in = accepted + quarantined, in the metrics and in the files actually written."""
    for table in (PRODUCTS, QUERIES):
        m = result.metrics[table]
        rows_in = _rows(table_path(data, table))
        assert m["rows_in"] == rows_in == m["rows_accepted"] + m["rows_quarantined"]
        assert _rows(table_path(result.quarantine_dir, table)) == m["rows_quarantined"]
        if result.passed:
            assert _rows(table_path(result.out_dir, table)) == m["rows_accepted"]
        else:
            assert not table_path(result.out_dir, table).exists()


def _quarantined(result: ValidationResult, table: str) -> dict[str, list[str]]:
    df = read_table(table_path(result.quarantine_dir, table), table, check=False)
    key = "product_id" if table == PRODUCTS else "query_id"
    return {row[key]: list(row["reasons"]) for _, row in df.iterrows()}


def _failure(result: ValidationResult, check: str):
    found = [f for f in result.failures if f.check == check]
    assert found, f"no failure {check!r} in {[f.check for f in result.failures]}"
    return found[0]


def _set(df, row: int, column: str, value) -> None:
    df.at[df.index[row], column] = value


def test_clean_sample_passes_and_accepted_data_resolves(mini_dataset, tmp_path):
    result = _run(tmp_path, mini_dataset)
    assert result.passed, [f.to_dict() for f in result.blocking]
    assert [f.check for f in result.failures] == []
    _reconciles(result, mini_dataset)
    assert result.metrics[PRODUCTS]["rows_quarantined"] == result.metrics[QUERIES]["rows_quarantined"] == 0

    products = read_table(table_path(result.out_dir, PRODUCTS), PRODUCTS)
    source = read_table(table_path(mini_dataset, PRODUCTS), PRODUCTS)
    assert products["product_id"].tolist() == source["product_id"].tolist()
    assert products["attributes"].tolist() == source["attributes"].tolist()
    # Images are not copied: paths are rebased so they resolve from the accepted folder.
    assert not (result.out_dir / "images").exists()
    assert products["image"].iloc[0].startswith("../")
    assert (
        load_image(products["image"].iloc[0], result.out_dir).size
        == load_image(source["image"].iloc[0], mini_dataset).size
    )
    queries = read_table(table_path(result.out_dir, QUERIES), QUERIES)
    image_query = queries["query_image"].dropna().iloc[0]
    assert load_image(image_query, result.out_dir).size[0] > 0

    # Each distinct image was checked once: 200 product images + one per image/multimodal query.
    n_query_images = int(queries["query_image"].notna().sum())
    assert result.metrics["images"] == {"distinct": 200 + n_query_images, "ok": 200 + n_query_images}

    gx = json.loads(result.paths["gx_results"].read_text())
    suites = gx[PRODUCTS]
    assert all(s["success"] for s in suites)
    types = {r["expectation_config"]["type"] for s in suites for r in s["results"]}
    assert {"expect_column_values_to_be_unique", "expect_column_values_to_be_between"} <= types
    metrics = json.loads(result.paths["metrics"].read_text())
    assert metrics["passed"] is True and metrics["products"]["rows_in"] == 200
    html = result.paths["html_report"].read_text()
    assert "PASSED" in html and "expect_column_values_to_be_unique" in html


def test_image_paths_are_rebased_not_copied(tmp_path):
    src, dest = tmp_path / "data/prepared", tmp_path / "data/validated"
    assert _rebase_uri("images/p/1.png", src, dest, "") == "../prepared/images/p/1.png"
    assert (
        _rebase_uri("images/p/1.png", src, dest, "gs://bucket/run/prepared/")
        == "gs://bucket/run/prepared/images/p/1.png"
    )
    assert _rebase_uri("gs://b/x.png", src, dest, "") == "gs://b/x.png"
    assert _rebase_uri("/abs/x.png", src, dest, "/elsewhere") == "/abs/x.png"
    assert _rebase_uri(None, src, dest, "") is None


def _missing_title(df, root):
    _set(df, 5, "title", "   ")
    _set(df, 6, "title", None)


def _bad_image(df, root):
    (root / "images/products/garbage.png").write_bytes(b"this is not a png")
    png = (root / df["image"].iloc[4]).read_bytes()
    (root / "images/products/truncated.png").write_bytes(png[:60])
    _set(df, 3, "image", "images/products/garbage.png")
    _set(df, 4, "image", "images/products/truncated.png")


def _missing_image(df, root):
    (root / df["image"].iloc[7]).unlink()
    _set(df, 8, "image", None)


def _bad_attributes(df, root):
    _set(df, 2, "attributes", {**df["attributes"].iloc[2], "fabric": "wool"})
    _set(df, 4, "attributes", {**df["attributes"].iloc[4], "color": " "})


def _bad_price(df, root):
    for row, price in ((1, -3.0), (9, 0.0), (10, float("inf"))):
        _set(df, row, "price", price)
    _set(df, 11, "price", None)  # absent is allowed


def _twin(df, root):
    """Product 21 becomes a near-duplicate of 20: same image file, same title up to case and punctuation."""
    _set(df, 21, "image", df["image"].iloc[20])
    _set(df, 21, "title", "  " + df["title"].iloc[20].upper().replace(" ", " ,  ") + "!")


def _bad_category(df, root):
    _set(df, 12, "category_path", [])
    _set(df, 13, "category_path", ["a", "b", "c", "d", "e", "f"])


ROW_CASES = {
    "missing_title": (_missing_title, {5: ["missing_title"], 6: ["missing_title"]}),
    "undecodable_image": (_bad_image, {3: ["image_undecodable"], 4: ["image_undecodable"]}),
    "missing_image": (_missing_image, {7: ["image_missing"], 8: ["image_missing"]}),
    "unknown_attribute": (_bad_attributes, {2: ["unknown_attribute_key"], 4: ["empty_attribute_value"]}),
    "bad_price": (_bad_price, {1: ["bad_price"], 9: ["bad_price"], 10: ["bad_price"]}),
    "category_depth": (_bad_category, {12: ["category_depth"], 13: ["category_depth"]}),
    "near_duplicate": (_twin, {21: ["near_duplicate"]}),
}
MINI_KEYS = ["color", "pattern", "size", "logo", "material", "brand"]
# unknown_attribute_key exists only with the override; without it the vocabulary is learned (tests below).
CASE_CONFIG = {
    "near_duplicate": {"near_duplicates": "quarantine"},
    "unknown_attribute": {"allowed_attribute_keys": MINI_KEYS},
}


@pytest.mark.parametrize("case", list(ROW_CASES))
def test_bad_product_rows_are_quarantined_with_reason(mini_dataset, tmp_path, case):
    edit, expected = ROW_CASES[case]
    data = _copy(mini_dataset, tmp_path / "data", products=edit)
    ids = read_table(table_path(data, PRODUCTS), PRODUCTS)["product_id"].tolist()
    # A bad product also quarantines every query that points at it, category-name queries included: up to ~4 %
    # of the 240 queries here, so the gate's reject threshold is 5 % for these cases.
    result = _run(tmp_path, data, **{"max_reject_fraction": 0.05, **CASE_CONFIG.get(case, {})})

    assert result.passed, [f.to_dict() for f in result.blocking]  # 1-3 of 200 products, a few more queries
    _reconciles(result, data)
    assert _quarantined(result, PRODUCTS) == {ids[row]: reasons for row, reasons in expected.items()}
    reason = next(iter(expected.values()))[0]
    failure = _failure(result, reason)
    assert failure.level == "row" and not failure.blocking
    assert failure.count == result.metrics[PRODUCTS]["reasons"][reason] == sum(reason in r for r in expected.values())
    assert set(failure.examples) <= {ids[row] for row in expected}

    # A query whose positive product was quarantined is quarantined too: nothing dangles downstream.
    queries = read_table(table_path(data, QUERIES), QUERIES)
    bad_ids = {ids[row] for row in expected}
    orphaned = set(queries.loc[queries["positive_product_id"].isin(bad_ids), "query_id"])
    assert _quarantined(result, QUERIES) == {q: ["positive_product_quarantined"] for q in orphaned}
    accepted = read_table(table_path(result.out_dir, QUERIES), QUERIES)
    accepted_products = set(read_table(table_path(result.out_dir, PRODUCTS), PRODUCTS)["product_id"])
    assert set(accepted["positive_product_id"]) <= accepted_products


CHINESE_KEYS = {"color": "颜色", "pattern": "图案", "size": "尺码", "logo": "标志", "material": "材质", "brand": "品牌"}


def _rows_of(df, split: str) -> list[int]:
    return np.flatnonzero(df["split"].to_numpy() == split).tolist()


def test_attribute_vocabulary_is_learned_from_the_training_split(mini_dataset, tmp_path):
    """Other keys than mbe3-mini's (Chinese ones here) pass with default settings; eval products with a key or a
    value never seen in training are flagged by name, not quarantined; the vocabulary is written out."""
    marks = {}

    def chinese(df, root):
        df["attributes"] = [{CHINESE_KEYS[k]: v for k, v in a.items()} for a in df["attributes"]]
        train, eval_ = _rows_of(df, "train"), _rows_of(df, "eval")
        marks.update(train=df["product_id"].iloc[train[0]], key=df["product_id"].iloc[eval_[0]],
                     value=df["product_id"].iloc[eval_[1]])  # fmt: skip
        _set(df, train[0], "attributes", {**df["attributes"].iloc[train[0]], "产地": "杭州"})  # learned
        _set(df, eval_[0], "attributes", {**df["attributes"].iloc[eval_[0]], "风格": "简约"})  # key unseen
        _set(df, eval_[1], "attributes", {**df["attributes"].iloc[eval_[1]], "颜色": "藏青"})  # value unseen

    data = _copy(mini_dataset, tmp_path / "data", products=chinese)
    result = _run(tmp_path, data)
    assert result.passed, [f.to_dict() for f in result.blocking]
    _reconciles(result, data)
    assert result.metrics[PRODUCTS]["rows_quarantined"] == result.metrics[QUERIES]["rows_quarantined"] == 0
    key, value = _failure(result, "unseen_attribute_key"), _failure(result, "unseen_attribute_value")
    assert (key.level, key.count, key.examples, key.values) == ("info", 1, [marks["key"]], ["风格"])
    assert (value.level, value.count, value.examples, value.values) == ("info", 1, [marks["value"]], ["颜色=藏青"])
    assert "风格 (1 row)" in key.message and "颜色=藏青 (1 row)" in value.message
    assert {f.check for f in result.failures} == {"unseen_attribute_key", "unseen_attribute_value"}
    assert result.metrics[PRODUCTS]["flagged"] == {"near_duplicate": 0, "unseen_attribute_key": 1,
                                                   "unseen_attribute_value": 1}  # fmt: skip

    vocabulary = json.loads((result.out_dir / "attribute_vocabulary.json").read_text())
    assert set(vocabulary["keys"]) == {*CHINESE_KEYS.values(), "产地"} and vocabulary["allowed_attribute_keys"] is None
    assert vocabulary["keys"]["产地"] == {"products": 1, "values": {"杭州": 1}}
    assert "藏青" not in vocabulary["keys"]["颜色"]["values"] and "风格" not in vocabulary["keys"]
    metrics = json.loads(result.paths["metrics"].read_text())["attribute_vocabulary"]
    assert metrics["keys"] == 7 and metrics["values_per_key"]["产地"] == 1
    assert metrics["eval_unseen_keys"] == {"风格": 1} and metrics["eval_products_with_unseen_values"] == 1
    assert metrics["train_products"] == sum(v["products"] for v in vocabulary["keys"].values()) // 6
    html = result.paths["html_report"].read_text()
    assert "风格" in html and "颜色=藏青" in html


def test_allowed_attribute_keys_override_quarantines_and_names_other_keys(mini_dataset, tmp_path):
    def extra(df, root):
        for row, key in ((_rows_of(df, "train")[0], "fabric"), (_rows_of(df, "eval")[0], "fabric"),
                         (_rows_of(df, "train")[1], "颜色")):  # fmt: skip
            _set(df, row, "attributes", {**df["attributes"].iloc[row], key: "x"})

    data = _copy(mini_dataset, tmp_path / "data", products=extra)
    result = _run(tmp_path, data, allowed_attribute_keys=MINI_KEYS, max_reject_fraction=0.05)
    assert result.passed, [f.to_dict() for f in result.blocking]
    failure = _failure(result, "unknown_attribute_key")
    assert failure.count == 3 and sorted(failure.values) == ["fabric", "fabric", "颜色"]
    assert "fabric (2 rows), 颜色 (1 row)" in failure.message
    assert not [f for f in result.failures if f.check.startswith("unseen_")]  # unknown keys are not also unseen
    vocabulary = json.loads((result.out_dir / "attribute_vocabulary.json").read_text())
    assert set(vocabulary["keys"]) == set(MINI_KEYS) and vocabulary["allowed_attribute_keys"] == MINI_KEYS


def test_dangling_positive_id_quarantines_the_query(mini_dataset, tmp_path):
    data = _copy(mini_dataset, tmp_path / "data", queries=lambda df, root: _set(df, 0, "positive_product_id", "p_nope"))
    result = _run(tmp_path, data)
    assert result.passed
    _reconciles(result, data)
    qid = read_table(table_path(data, QUERIES), QUERIES)["query_id"].iloc[0]
    assert _quarantined(result, QUERIES) == {qid: ["positive_product_missing"]}
    assert _failure(result, "positive_product_missing").examples == [qid]


def test_duplicate_product_id_fails_the_gate(mini_dataset, tmp_path):
    def dup(df, root):
        _set(df, 12, "product_id", df["product_id"].iloc[13])

    data = _copy(mini_dataset, tmp_path / "data", products=dup)
    dup_id = read_table(table_path(data, PRODUCTS), PRODUCTS)["product_id"].iloc[13]
    result = _run(tmp_path, data)
    assert not result.passed
    _reconciles(result, data)
    failure = _failure(result, "duplicate_product_id")
    assert failure.blocking and failure.count == 2 and failure.examples == [dup_id, dup_id]
    assert "product_id is unique" in failure.message
    assert "FAILED" in result.paths["html_report"].read_text()


def test_eval_product_in_training_query_fails_as_leakage(mini_dataset, tmp_path):
    products = read_table(table_path(mini_dataset, PRODUCTS), PRODUCTS)
    eval_id = products.loc[products["split"] == "eval", "product_id"].iloc[0]

    def leak(df, root):
        row = int(np.flatnonzero(df["split"].to_numpy() == "train")[0])
        _set(df, row, "positive_product_id", eval_id)

    data = _copy(mini_dataset, tmp_path / "data", queries=leak)
    queries = read_table(table_path(data, QUERIES), QUERIES)
    leaked = queries.loc[queries["positive_product_id"].eq(eval_id) & queries["split"].eq("train"), "query_id"]
    result = _run(tmp_path, data)
    assert not result.passed
    _reconciles(result, data)
    failure = _failure(result, "split_leakage")
    assert failure.blocking and failure.count == 1 and failure.examples == leaked.tolist()
    assert result.metrics[QUERIES]["split_leakage"] == {"train_query_eval_product": 1, "eval_query_train_product": 0}


def test_reject_fraction_above_threshold_fails_but_keeps_the_quarantine(mini_dataset, tmp_path):
    def blank(df, root):
        df.loc[df.index[:10], "title"] = ""

    data = _copy(mini_dataset, tmp_path / "data", products=blank)
    result = _run(tmp_path, data)
    assert not result.passed
    _reconciles(result, data)
    failure = _failure(result, "reject_fraction")
    assert failure.blocking and failure.count == 10 and "10 of 200 rows quarantined (5.00%)" in failure.message
    assert len(_quarantined(result, PRODUCTS)) == 10


def test_schema_errors_name_file_and_column(mini_dataset, tmp_path):
    data = _copy(mini_dataset, tmp_path / "data")
    path = table_path(data, PRODUCTS)
    arrow = pq.read_table(path)
    as_text = pa.array([str(v) for v in arrow.column("price").to_pylist()])
    arrow = arrow.set_column(arrow.schema.get_field_index("price"), "price", as_text).drop_columns(["title"])
    pq.write_table(arrow, path)

    result = _run(tmp_path, data)
    assert not result.passed
    messages = [f.message for f in result.failures if f.check == "schema"]
    assert messages == [
        f"{path}: missing column 'title' (string)",
        f"{path}: column 'price' has type string, expected double",
    ]
    assert json.loads(result.paths["metrics"].read_text())["schema_errors"] == messages

    missing = _run(tmp_path / "again", tmp_path / "nowhere")  # never raises, even without input
    assert not missing.passed and "file not found" in missing.failures[0].message


def test_near_duplicates_are_flagged_by_default(mini_dataset, tmp_path):
    data = _copy(mini_dataset, tmp_path / "data", products=_twin)
    ids = read_table(table_path(data, PRODUCTS), PRODUCTS)["product_id"].tolist()
    result = _run(tmp_path, data)
    assert result.passed and result.metrics[PRODUCTS]["rows_quarantined"] == 0
    assert result.metrics[PRODUCTS]["flagged"] == {"near_duplicate": 1, "unseen_attribute_key": 0,
                                                   "unseen_attribute_value": 0}  # fmt: skip
    failure = _failure(result, "near_duplicate")
    assert failure.level == "info" and failure.examples == [ids[21]] and failure.values == [ids[20]]


def test_cli_exits_1_with_a_readable_message(mini_dataset, tmp_path, monkeypatch):
    from moon3.cli import app

    def dup(df, root):
        _set(df, 3, "product_id", df["product_id"].iloc[4])

    data = _copy(mini_dataset, tmp_path / "corrupt", products=dup)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "none.yaml").write_text("{}\n")  # built-in defaults (a missing --params file is an error)
    args = ["validate", "--params", str(tmp_path / "none.yaml"), "--set", f"validation.in_dir={data}"]
    result = CliRunner().invoke(app, args, terminal_width=200)
    assert result.exit_code == 1, result.output
    assert "duplicate_product_id" in result.output
    assert "validation gate FAILED" in result.output
    dup_id = read_table(table_path(data, PRODUCTS), PRODUCTS)["product_id"].iloc[4]
    assert (
        f"products: duplicate_product_id: product_id is unique: 2 rows break the rule (e.g. {dup_id}" in result.output
    )
    assert (tmp_path / "reports/validation/validation_report.html").exists()

    ok = CliRunner().invoke(app, ["validate", "--params", str(tmp_path / "none.yaml"), "--set",
                                  f"validation.in_dir={mini_dataset}"])  # fmt: skip
    assert ok.exit_code == 0, ok.output
    assert (tmp_path / "data/validated/products.parquet").exists()


def _trace(product_id: str, query_id: str | None = None) -> dict:
    return {"product_id": product_id, "query_id": query_id, "trace": "color: red", "teacher": "t", "prompt_hash": "h",
            "decoding": "{}", "grounded_score": None}  # fmt: skip


def test_imported_traces_are_carried_through_with_reasons(mini_dataset, tmp_path):
    data = _copy(mini_dataset, tmp_path / "data", products=lambda df, root: _set(df, 5, "title", " "))
    products = read_table(table_path(data, PRODUCTS), PRODUCTS)
    queries = read_table(table_path(data, QUERIES), QUERIES)
    train = products.loc[products["split"] == "train", "product_id"].tolist()
    eval_product = products.loc[products["split"] == "eval", "product_id"].iloc[0]
    quarantined = products["product_id"].iloc[5]
    ok_query = queries[(queries["split"] == "train") & (queries["positive_product_id"] != quarantined)].iloc[0]
    eval_query = queries[queries["split"] == "eval"].iloc[0]
    rows = [
        _trace(train[0]),  # accepted
        _trace(ok_query["positive_product_id"], ok_query["query_id"]),  # accepted
        _trace(quarantined),  # its product was quarantined: unknown_item
        _trace("p_nope"),  # unknown_item
        _trace(train[1], ok_query["query_id"]),  # not the query's positive: unknown_item
        _trace(eval_product),  # not_train_split
        _trace(eval_query["positive_product_id"], eval_query["query_id"]),  # not_train_split
    ]
    write_table(pd.DataFrame(rows), table_path(data, TRACES), TRACES)
    result = _run(tmp_path, data, max_reject_fraction=0.05)
    assert result.passed, [f.to_dict() for f in result.blocking]
    _reconciles(result, data)
    m = result.metrics[TRACES]
    assert m["rows_in"] == 7 == m["rows_accepted"] + m["rows_quarantined"] and m["rows_accepted"] == 2
    assert m["reasons"] == {"unknown_item": 3, "not_train_split": 2}
    dropped = read_table(table_path(result.quarantine_dir, TRACES), TRACES, check=False)
    assert [list(r) for r in dropped["reasons"]] == [["unknown_item"]] * 3 + [["not_train_split"]] * 2
    accepted = read_table(table_path(result.out_dir, TRACES), TRACES)
    assert accepted[["product_id", "query_id"]].fillna("").values.tolist() == [
        [train[0], ""], [ok_query["positive_product_id"], ok_query["query_id"]]
    ]  # fmt: skip
    failure = _failure(result, "unknown_item")
    assert failure.table == TRACES and not failure.blocking and failure.examples == [quarantined, "p_nope",
                                                                                     ok_query["query_id"]]  # fmt: skip
    assert json.loads(result.paths["metrics"].read_text())[TRACES]["rows_quarantined"] == 5
    html = result.paths["html_report"].read_text()
    assert "<td>traces</td><td>7</td><td>2</td><td>5</td>" in html and "not_train_split" in html

    again = _run(tmp_path, mini_dataset)  # a dataset without traces: none written, no stale ones left behind
    assert again.passed and TRACES not in again.metrics
    assert not table_path(again.out_dir, TRACES).exists() and not table_path(again.quarantine_dir, TRACES).exists()


def test_trace_table_of_the_wrong_type_fails_the_gate_naming_file_and_column(mini_dataset, tmp_path):
    data = _copy(mini_dataset, tmp_path / "data")
    path = table_path(data, TRACES)
    table = pa.table({**{k: pa.array([v]) for k, v in _trace("p000").items() if k != "grounded_score"},
                      "grounded_score": pa.array(["1.0"])})  # fmt: skip
    pq.write_table(table, path)
    result = _run(tmp_path, data)
    assert not result.passed
    assert [f.message for f in result.blocking] == [f"{path}: column 'grounded_score' has type string, expected double"]
