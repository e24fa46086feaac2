"""Task definitions on a hand-built catalog with known answers: views, skipped levels, references, chance."""

from __future__ import annotations

import hashlib
import string
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from moon3.data.schema import PRODUCTS, QUERIES, read_dataset, table_path, write_table
from moon3.eval.config import EvalConfig
from moon3.eval.data import load_eval_data
from moon3.eval.references import build_references, reference_rows
from moon3.eval.report import summarize
from moon3.eval.tasks import run_tasks
from moon3.model.items import attribute_text, product_text

# Eval products: level 1 is Home x4, Toys x2 (the catalog also has Garden, in train); level 2 is "All" everywhere.
EVAL_LEVEL1 = ["Home", "Home", "Home", "Home", "Toys", "Toys"]
EVAL_COLORS = ["red", "red", "blue", "red", "green", "blue"]


def _word(rng: np.random.Generator) -> str:
    return "".join(rng.choice(list(string.ascii_lowercase), size=8))


@pytest.fixture(scope="module")
def catalog(tmp_path_factory) -> Path:
    """6 eval + 6 train products with random-noise images and random-letter titles; queries that copy them."""
    root = tmp_path_factory.mktemp("catalog")
    (root / "images").mkdir()
    rng = np.random.default_rng(0)
    rows = []
    for i in range(12):
        split = "eval" if i < 6 else "train"
        pixels = rng.integers(0, 256, size=(24, 24, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / "images" / f"p{i}.png")
        level1 = EVAL_LEVEL1[i] if split == "eval" else ["Garden", "Home", "Toys"][i % 3]
        color = EVAL_COLORS[i] if split == "eval" else ["red", "blue", "green"][i % 3]
        rows.append(
            {
                "product_id": f"p{i}",
                "title": " ".join(_word(rng) for _ in range(3)),
                "image": f"images/p{i}.png",
                "category_path": [level1, "All"],
                "attributes": {"color": color},
                "price": None,
                "shop_id": None,
                "split": split,
            }  # fmt: skip
        )
    products = pd.DataFrame(rows)
    queries = []
    for i in range(6):
        title, image = products["title"][i], products["image"][i]
        for qtype, text, img in (("text", title, None), ("image", None, image), ("multimodal", title, image)):
            queries.append({"query_id": f"q{qtype}{i}", "query_text": text, "query_image": img,
                            "positive_product_id": f"p{i}", "split": "eval", "query_type": qtype})  # fmt: skip
    # A category query: training signal only, never a retrieval task.
    queries.append({"query_id": "qcat", "query_text": "Home", "query_image": None, "positive_product_id": "p0",
                    "split": "eval", "query_type": "category"})  # fmt: skip
    write_table(products, table_path(root, PRODUCTS), PRODUCTS)
    write_table(pd.DataFrame(queries), table_path(root, QUERIES), QUERIES)
    return root


def constant(items: list[dict]) -> np.ndarray:
    """Every item the same vector: with one class, every prediction is right (the single-value-level trap)."""
    return np.tile(np.eye(4, dtype=np.float32)[0], (len(items), 1))


def test_category_queries_are_left_out_and_unknown_types_still_raise(catalog, tmp_path):
    data = load_eval_data(catalog, EvalConfig())
    assert {t: len(q) for t, q in data.queries.items()} == {"text": 6, "image": 6, "multimodal": 6}
    assert data.counts["eval_queries_by_type"] == {"total": 19, "category": 1, "image": 6, "multimodal": 6, "text": 6}
    assert len(data.train_texts) == 6

    bad = tmp_path / "bad"
    bad.mkdir()
    products, queries = read_dataset(catalog)
    write_table(products, table_path(bad, PRODUCTS), PRODUCTS)
    queries.loc[0, "query_type"] = "sketch"
    write_table(queries, table_path(bad, QUERIES), QUERIES)
    with pytest.raises(ValueError, match=r"query_type \['sketch'\] is not one of"):
        load_eval_data(bad, EvalConfig())


def test_single_value_level_is_skipped_never_scored_nor_averaged(catalog):
    cfg = EvalConfig()
    data = load_eval_data(catalog, cfg)
    results = run_tasks(data, constant, cfg)
    by_key = {r.key: r for r in results}
    for kind in ("classification", "classification_image"):
        level_2 = by_key[f"{kind}/level_2"]
        assert level_2.metrics is None and "single value in the catalog ('All')" in level_2.skipped
        # Ties go to class 0 (Garden): no eval product is Garden.
        assert by_key[f"{kind}/level_1"].metrics["accuracy"] == 0.0
    summary = summarize({"constant": results}, main_k=10, reference_rows=reference_rows(data, cfg))
    block = summary["metrics"]["constant"]
    assert "level_2" not in block["classification"] and "level_2" not in block["classification_image"]
    assert block["summary"]["classification_mean_accuracy"] == 0.0  # level 1 only, not (0 + 1) / 2
    assert "level_2" not in summary["reference_rows"]["chance"]["classification"]


def test_chance_and_majority_rows(catalog):
    cfg = EvalConfig(ks=[1, 5, 10])
    rows = reference_rows(load_eval_data(catalog, cfg), cfg)
    rows = {name: {r.key: r.metrics for r in tasks} for name, tasks in rows.items()}
    chance, majority = rows["chance"], rows["majority"]
    # Gallery of 6: Recall@K = min(K, 6) / 6; MRR = mean of 1/r over r = 1..6.
    assert chance["retrieval/text_to_mm"]["recall_at_1"] == pytest.approx(1 / 6)
    assert chance["retrieval/text_to_mm"]["recall_at_5"] == pytest.approx(5 / 6)
    assert chance["retrieval/text_to_mm"]["recall_at_10"] == 1.0
    assert chance["retrieval/image_to_text"]["mrr"] == pytest.approx(sum(1 / r for r in range(1, 7)) / 6)
    # Level 1: 3 names in the catalog; Home is 4 of the 6 eval products.
    for kind in ("classification", "classification_image"):
        assert chance[f"{kind}/level_1"]["accuracy"] == pytest.approx(1 / 3)
        assert majority[f"{kind}/level_1"]["accuracy"] == pytest.approx(4 / 6)
    assert majority["attributes/color"]["accuracy"] == pytest.approx(3 / 6)  # red x3
    assert majority["attributes/color"]["macro_f1"] == pytest.approx((2 * 3 / (2 * 3 + 3)) / 3)
    assert not any(key.startswith("retrieval/") for key in majority)


def test_attribute_task_never_shows_the_attribute_string(catalog):
    cfg = EvalConfig()
    data = load_eval_data(catalog, cfg)
    seen: list[dict] = []

    def string_matcher(items: list[dict]) -> np.ndarray:
        """Cheats by reading "color: red" off the input; hashes everything else."""
        seen.extend(items)
        rows = []
        for item in items:
            text = item["text"] or ""
            label = next((c for c in ("red", "blue", "green") if attribute_text("color", c) in text), None)
            key = f"label:{label}" if label else text + str(item["image"] is not None)
            seed = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little")
            v = np.random.default_rng(seed).standard_normal(16)
            rows.append(v / np.linalg.norm(v))
        return np.stack(rows).astype(np.float32)

    by_key = {r.key: r for r in run_tasks(data, string_matcher, cfg)}
    records = data.products.to_dict("records")
    titles, full_texts = {r["title"] for r in records}, {product_text(r) for r in records}
    with_image = [item["text"] for item in seen if item["image"] is not None]
    # The gallery shows title + attributes; the attribute view shows the title alone; the image view no text.
    assert set(with_image) == titles | full_texts | {None}
    # Title + image: the attribute view of every product, and the multimodal queries (which copy it here).
    assert sum(text in titles for text in with_image) == len(records) + len(data.queries["multimodal"])
    # No item shown with its image, other than the gallery's full products, carries an attribute line.
    views = [t for t in with_image if t is not None and t not in full_texts]
    assert views and not any(attribute_text("color", c) in t for t in views for c in ("red", "blue", "green"))
    # Had the product input contained "color: red", the string matcher would score 1.0.
    assert by_key["attributes/color"].metrics["accuracy"] < 1.0
    assert by_key["attributes_image/color"].metrics["n"] == 6


def test_references_find_copies_at_rank_1_and_skip_what_they_cannot_see(catalog):
    cfg = EvalConfig()
    data = load_eval_data(catalog, cfg)
    references, missing = build_references(["ref_tfidf", "ref_pixels", "ref_tfidf_pixels"], data)
    assert missing == {} and list(references) == ["ref_tfidf", "ref_pixels", "ref_tfidf_pixels"]
    got = {name: {r.key: r for r in run_tasks(data, fn, cfg, variant=name)} for name, fn in references.items()}
    # A text query equal to a title finds that product by TF-IDF; an identical image by raw pixels.
    assert got["ref_tfidf"]["retrieval/text_to_mm"].metrics["recall_at_1"] == 1.0
    assert got["ref_pixels"]["retrieval/image_to_mm"].metrics["recall_at_1"] == 1.0
    for task in ("text_to_mm", "image_to_mm", "mm_to_mm"):
        assert got["ref_tfidf_pixels"][f"retrieval/{task}"].metrics["recall_at_1"] == 1.0
    # No side to compare: skipped with the reason, never scored as a miss.
    for name, key in (("ref_tfidf", "retrieval/image_to_mm"), ("ref_pixels", "retrieval/text_to_mm"),
                      ("ref_tfidf_pixels", "retrieval/text_to_image"), ("ref_pixels", "attributes/color"),
                      ("ref_tfidf", "classification_image/level_1")):  # fmt: skip
        assert got[name][key].metrics is None and "compares like with like" in got[name][key].skipped
    assert got["ref_tfidf"]["attributes/color"].metrics["n"] == 6  # title vs "color: red": text on both sides
    with pytest.raises(ValueError, match="unknown reference"):
        build_references(["ref_bm25"], data)
