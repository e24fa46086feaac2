"""MBE3.0-style evaluation: exact search, ranks with ties, metrics with known answers, tasks and the report."""

from __future__ import annotations

import csv
import hashlib
import json
import math
import re
from pathlib import Path

import faiss
import numpy as np
import pytest
import torch
from sklearn.metrics import f1_score

from moon3.data.config import DataConfig
from moon3.data.io import load_image
from moon3.data.mini import make_sample
from moon3.data.schema import PRODUCTS, QUERIES, read_dataset, table_path, write_table
from moon3.eval.config import EvalConfig
from moon3.eval.data import load_eval_data
from moon3.eval.evaluate import evaluate
from moon3.eval.metrics import (
    accuracy,
    classification_metrics,
    confusion_matrix,
    macro_f1,
    mean_reciprocal_rank,
    recall_curve,
    retrieval_metrics,
    retrieval_recall_at_k,
    zero_shot_predict,
)
from moon3.eval.search import exact_search, positive_ranks, rank_of_positive
from moon3.eval.tasks import check_embeddings, run_tasks
from moon3.eval.variants import collect_variants
from moon3.model.contract import EmbeddingContract, save_contract
from moon3.model.items import product_text


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


# --- ranks and retrieval metrics --------------------------------------------------------------------------


def test_rank_ties_count_against_the_query_numpy_and_torch():
    scores = np.array(
        [
            [0.9, 0.5, 0.1],  # positive 0 strictly best -> 1
            [0.9, 0.5, 0.9],  # positive 0 tied with item 2 -> 2
            [0.3, 0.3, 0.3],  # all equal (collapsed model) -> worst rank 3
            [0.2, 0.7, 0.4],  # positive 0 below both -> 3
        ],
        dtype=np.float32,
    )
    positives = np.array([0, 0, 1, 0])
    assert rank_of_positive(scores, positives).tolist() == [1, 2, 3, 3]
    torch_ranks = rank_of_positive(torch.from_numpy(scores), torch.from_numpy(positives))
    assert isinstance(torch_ranks, torch.Tensor) and torch_ranks.tolist() == [1, 2, 3, 3]
    with pytest.raises(ValueError, match=r"out of range \[0, 3\) for query row\(s\) \[1\]"):
        rank_of_positive(scores, np.array([0, 3, 0, 0]))
    with pytest.raises(ValueError, match="NaN"):
        rank_of_positive(np.array([[np.nan, 1.0]]), np.array([0]))


def test_recall_and_mrr_known_answers():
    ranks = np.array([1, 2, 5, 11])
    assert retrieval_recall_at_k(ranks, 1) == 0.25
    assert retrieval_recall_at_k(ranks, 5) == 0.75
    assert retrieval_recall_at_k(ranks, 10) == 0.75
    assert retrieval_recall_at_k(ranks, 11) == 1.0
    assert mean_reciprocal_rank(ranks) == pytest.approx((1 + 1 / 2 + 1 / 5 + 1 / 11) / 4)
    assert recall_curve(ranks, [1, 2, 20]) == {1: 0.25, 2: 0.5, 20: 1.0}
    assert retrieval_metrics(ranks, [1, 5, 10]) == {
        "recall_at_1": 0.25,
        "recall_at_5": 0.75,
        "recall_at_10": 0.75,
        "mrr": pytest.approx(0.4477272727),
        "n": 4,
    }
    with pytest.raises(ValueError, match="1-based"):
        mean_reciprocal_rank(np.array([0, 1]))


def test_empty_modality_gives_none_not_nan():
    empty = np.zeros(0, dtype=np.int64)
    assert retrieval_recall_at_k(empty, 10) is None
    assert mean_reciprocal_rank(empty) is None
    assert recall_curve(empty, [1, 10]) == {}
    assert retrieval_metrics(empty, [1, 10]) is None
    assert accuracy(empty, empty) is None and macro_f1(empty, empty) is None
    assert classification_metrics(np.zeros((0, 4)), np.eye(4), empty) is None


def test_hand_made_embeddings_search_and_ranks():
    # Gallery: the 4 axes of R^4 plus an exact copy of axis 2 (row 4).
    gallery = np.vstack([np.eye(4), np.eye(4)[2:3]]).astype(np.float32)
    queries = _unit(
        np.array(
            [
                [1.0, 0.2, 0.0, 0.0],  # nearest 0, then 1 -> positive 0: rank 1
                [1.0, 0.2, 0.0, 0.0],  # positive 1: rank 2
                [0.0, 0.0, 1.0, 0.1],  # positive 2 ties with its copy (row 4): rank 2
                [0.0, 0.0, 1.0, 0.1],  # positive 4 ties with row 2: rank 2 as well
                [0.1, 0.0, 0.0, 1.0],  # positive 1 scores 0, below 3 and 0, tied with 2 and 4: rank 5
            ]
        )
    )
    positives = np.array([0, 1, 2, 4, 1])
    scores, indices = exact_search(queries, gallery, k=2)
    assert indices[0].tolist() == [0, 1] and indices[4].tolist() == [3, 0]
    assert indices[2].tolist() == [2, 4]  # equal scores: lower gallery index first
    assert scores[0, 0] == pytest.approx(1 / math.sqrt(1.04))
    for k in (1, 2, 5):  # k=1,2 force the counting pass for some queries; k=5 settles all in the top-k
        result = positive_ranks(queries, gallery, positives, k=k, batch_size=2, chunk_size=2)
        assert result.ranks.tolist() == [1, 2, 2, 2, 5], k
    assert retrieval_recall_at_k(result.ranks, 1) == 0.2
    assert mean_reciprocal_rank(result.ranks) == pytest.approx((1 + 0.5 + 0.5 + 0.5 + 0.2) / 5)


def test_search_matches_brute_force_numpy():
    rng = np.random.default_rng(0)
    gallery = _unit(rng.standard_normal((3000, 32)))
    queries = _unit(rng.standard_normal((257, 32)))
    scores, indices = exact_search(queries, gallery, k=10, batch_size=64)
    full = queries @ gallery.T
    expected = np.argsort(-full, axis=1, kind="stable")[:, :10]
    np.testing.assert_array_equal(indices, expected)
    np.testing.assert_allclose(scores, np.take_along_axis(full, expected, axis=1), rtol=0, atol=1e-5)
    index = faiss.IndexFlatIP(32)
    index.add(gallery)
    np.testing.assert_array_equal(exact_search(queries, index, k=10, batch_size=100)[1], expected)
    # k above the gallery size is capped, not padded with -1.
    assert exact_search(queries[:3], gallery[:4], k=10)[1].shape == (3, 4)
    with pytest.raises(ValueError, match="dim"):
        exact_search(queries[:, :8], gallery, k=1)


def test_positive_ranks_match_full_matrix_with_duplicates():
    rng = np.random.default_rng(1)
    gallery = _unit(rng.standard_normal((1500, 24)))
    gallery[700:710] = gallery[5]  # ten exact copies of a positive: exact ties
    positives = rng.integers(0, len(gallery), 300)
    positives[:20] = 5
    noise = rng.standard_normal((300, 24)) * rng.choice([0.05, 0.5, 3.0], size=(300, 1))
    queries = _unit(gallery[positives] + noise)
    expected = rank_of_positive(queries @ gallery.T, positives)
    assert (expected[:20] >= 11).all()  # the copies rank ahead of the positive
    assert (expected == 1).any() and (expected > 10).any()  # both passes are exercised
    for k, chunk in ((10, 256), (3, 1000), (50, 4096)):
        got = positive_ranks(queries, gallery, positives, k=k, batch_size=128, chunk_size=chunk)
        np.testing.assert_array_equal(got.ranks, expected)


# --- classification metrics -------------------------------------------------------------------------------


def test_accuracy_macro_f1_confusion_known_answers():
    y_true = np.array([0, 0, 1, 1, 2, 2])
    y_pred = np.array([0, 1, 1, 1, 0, 2])
    assert accuracy(y_true, y_pred) == pytest.approx(4 / 6)
    # F1: class 0 = 2*1/(2+1+1) = 0.5, class 1 = 2*2/(4+1+0) = 0.8, class 2 = 2*1/(2+0+1) = 2/3.
    assert macro_f1(y_true, y_pred) == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)
    assert confusion_matrix(y_true, y_pred, 4).tolist() == [[1, 1, 0, 0], [0, 2, 0, 0], [1, 0, 1, 0], [0, 0, 0, 0]]
    rng = np.random.default_rng(2)
    a, b = rng.integers(0, 5, 200), rng.integers(0, 6, 200)
    assert macro_f1(a, b) == pytest.approx(f1_score(a, b, average="macro"))


def test_zero_shot_classification_hand_made():
    classes = np.eye(3, dtype=np.float32)  # "class texts" on the axes
    items = _unit(np.array([[0.9, 0.1, 0], [0.1, 0.9, 0], [0, 0.2, 0.8], [0.6, 0.4, 0], [0.5, 0.5, 0]]))
    # Last item: exact tie between classes 0 and 1 -> lowest index.
    assert zero_shot_predict(items, classes).tolist() == [0, 1, 2, 0, 0]
    out = classification_metrics(items, classes, np.array([0, 1, 2, 1, 1]), with_confusion=True)
    assert out["accuracy"] == pytest.approx(3 / 5) and out["n"] == 5
    assert out["confusion"] == [[1, 0, 0], [2, 1, 0], [0, 0, 1]]
    # class 0: tp1 fp2 fn0 -> 0.5; class 1: tp1 fp0 fn2 -> 0.5; class 2: 1.0
    assert out["macro_f1"] == pytest.approx(2 / 3)


def test_check_embeddings_rejects_bad_rows():
    assert check_embeddings(torch.eye(3), 3, "x").dtype == np.float32
    with pytest.raises(ValueError, match=r"unit-norm rows; row\(s\) \[1\]"):
        check_embeddings(np.array([[1.0, 0], [2.0, 0]]), 2, "titles")
    with pytest.raises(ValueError, match="shape"):
        check_embeddings(np.eye(3), 4, "titles")
    with pytest.raises(ValueError, match="non-finite"):
        check_embeddings(np.array([[np.nan, 1.0]]), 1, "titles")


# --- tasks and report on a real (tiny) mbe3-mini dataset ---------------------------------------------------


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("eval-mini")
    make_sample(DataConfig(n_products=60, n_queries=60, eval_fraction=0.5, image_size=32, seed=3), root, progress=False)
    products, queries = read_dataset(root)
    # Unique titles, so that the oracle below can tell products apart by title alone.
    products["title"] = [f"{t} #{i}" for i, t in enumerate(products["title"])]
    write_table(products, table_path(root, PRODUCTS), PRODUCTS)
    return root


def _hash_vector(key: bytes, dim: int) -> np.ndarray:
    seed = int.from_bytes(hashlib.sha256(key).digest()[:8], "little")
    return _unit(np.random.default_rng(seed).standard_normal(dim))


class OracleEmbedder:
    """Model-free embedder with known answers on the intra-product and level-1 tasks.

    A product's text alone and its image alone both map to the product's own axis (so text->image and
    image->text are perfect); image + text maps to the axis of the product's level-1 category, and so does
    that category's name (level-1 accuracy 1.0); anything else maps to a fixed random vector.
    """

    def __init__(self, root: Path):
        products, _ = read_dataset(root)
        eval_products = products[products["split"] == "eval"].reset_index(drop=True)
        level1 = sorted({p[0] for p in products["category_path"]})
        self.dim = 8 + len(eval_products)
        self.level1 = {name: i for i, name in enumerate(level1)}
        texts = [product_text(r) for r in eval_products.to_dict("records")]
        self.title = {t: 8 + i for i, t in enumerate(texts)}
        assert len(self.title) == len(eval_products), "fixture: two eval products share a text"
        self.image = {load_image(p, root).tobytes(): 8 + i for i, p in enumerate(eval_products["image"])}
        assert len(self.image) == len(eval_products), "fixture: two eval products share an image"
        level1_of = [p[0] for p in eval_products["category_path"]]
        self.level1_of_title = dict(zip(texts, level1_of, strict=True))

    def _axis(self, i: int) -> np.ndarray:
        v = np.zeros(self.dim, dtype=np.float32)
        v[i] = 1.0
        return v

    def __call__(self, items: list[dict]) -> np.ndarray:
        rows = []
        for item in items:
            image, text = item["image"], item["text"]
            if image is not None and text in self.level1_of_title:
                rows.append(self._axis(self.level1[self.level1_of_title[text]]))
            elif image is None and text in self.level1:
                rows.append(self._axis(self.level1[text]))
            elif image is None and text in self.title:
                rows.append(self._axis(self.title[text]))
            elif text is None and image.tobytes() in self.image:
                rows.append(self._axis(self.image[image.tobytes()]))
            else:
                key = (text or "").encode() + (image.tobytes() if image is not None else b"")
                rows.append(_hash_vector(key, self.dim))
        return np.stack(rows)


def collapsed(items: list[dict]) -> torch.Tensor:
    """Every item gets the same vector: ties everywhere, so every positive ranks last."""
    return torch.nn.functional.normalize(torch.ones(len(items), 16), dim=1)


class ClosableCollapsed:
    """``collapsed`` with a ``close()`` that evaluate() must call once the variant is done."""

    def __init__(self):
        self.closed = 0

    def __call__(self, items: list[dict]) -> torch.Tensor:
        return collapsed(items)

    def close(self) -> None:
        self.closed += 1


def test_tasks_known_answers_and_collapsed_model(tiny_dataset):
    cfg = EvalConfig(embed_chunk=16)
    data = load_eval_data(tiny_dataset, cfg)
    n_eval = len(data.products)
    oracle = {r.key: r for r in run_tasks(data, OracleEmbedder(tiny_dataset), cfg)}
    for key in ("retrieval/text_to_image", "retrieval/image_to_text"):
        assert oracle[key].metrics["recall_at_1"] == 1.0 and oracle[key].metrics["mrr"] == 1.0
        assert oracle[key].metrics["n"] == n_eval
    assert oracle["classification/level_1"].metrics["accuracy"] == 1.0
    assert oracle["classification/level_1"].metrics["macro_f1"] == 1.0
    assert oracle["classification/level_1"].details["labels"] == ["Accessories", "Clothing", "Home"]
    confusion = np.array(oracle["classification/level_1"].details["confusion"])
    assert confusion.trace() == n_eval and (confusion == np.diag(np.diag(confusion))).all()
    assert {"classification/level_2", "classification/level_3", "attributes/color", "attributes/brand"} <= set(oracle)
    n_by_type = {t: len(q) for t, q in data.queries.items()}
    for qtype, task in (("text", "text_to_mm"), ("image", "image_to_mm"), ("multimodal", "mm_to_mm")):
        assert oracle[f"retrieval/{task}"].metrics["n"] == n_by_type[qtype] > 0

    flat = {r.key: r for r in run_tasks(data, collapsed, cfg)}
    for key in ("retrieval/text_to_mm", "retrieval/text_to_image"):
        assert flat[key].metrics["recall_at_10"] == 0.0  # a tie counts against the query
        assert flat[key].metrics["mrr"] == pytest.approx(1 / n_eval)


def test_evaluate_writes_report_and_skips_empty_modality(tiny_dataset, tmp_path):
    # Same dataset without image queries nor multimodal ones to derive image views from: image->mm (and mm->mm)
    # must be reported as skipped, not crash.
    data_dir = tmp_path / "no-image-queries"
    data_dir.mkdir()
    (data_dir / "images").symlink_to(tiny_dataset / "images")  # shared, read-only
    products, queries = read_dataset(tiny_dataset)
    write_table(products, table_path(data_dir, PRODUCTS), PRODUCTS)
    write_table(queries[~queries["query_type"].isin(["image", "multimodal"])], table_path(data_dir, QUERIES), QUERIES)

    cfg = EvalConfig(embed_chunk=32, curve_ks=[1, 5, 10, 50], references=[])
    untrained = ClosableCollapsed()
    variants = {"trained": OracleEmbedder(tiny_dataset), "untrained": untrained}
    missing = {"no_fire": "no saved model at 'models/no_fire'"}
    out = evaluate(cfg, variants, data_dir, tmp_path / "report", progress=False, missing=missing)
    assert untrained.closed == 1

    assert out["skipped"]["trained"]["retrieval/image_to_mm"].startswith("no eval queries of type 'image'")
    assert "image_to_mm" not in out["metrics"]["trained"]["retrieval"]
    assert out["flat"]["trained/retrieval/text_to_image/recall_at_1"] == 1.0
    assert out["flat"]["untrained/retrieval/text_to_image/recall_at_1"] == 0.0
    assert set(out["seconds"]) == {"trained", "untrained"}

    metrics = json.loads(Path(out["paths"]["metrics"]).read_text(), parse_constant=lambda c: pytest.fail(c))
    assert metrics["trained"]["classification"]["level_1"]["accuracy"] == 1.0
    assert (
        metrics["trained"]["summary"]["retrieval_mean_recall_at_10"]
        > metrics["untrained"]["summary"]["retrieval_mean_recall_at_10"]
    )
    with open(Path(out["paths"]["plots"]) / "recall_at_k" / "text_to_image.csv") as fh:
        rows = list(csv.reader(fh))
    assert rows[0] == ["k", "trained", "untrained", "chance"] and [r[0] for r in rows[1:]] == ["1", "5", "10", "50"]
    n_eval = len(load_eval_data(data_dir, cfg).products)
    assert rows[1][1:] == ["1.000000", "0.000000", f"{1 / n_eval:.6f}"]
    assert not (Path(out["paths"]["plots"]) / "recall_at_k" / "image_to_mm.csv").exists()

    html = Path(out["paths"]["html"]).read_text()
    header = re.search(r"<h2>Comparison</h2>\s*<table><thead><tr>(.*?)</tr>", html).group(1)
    assert "<th>text→image R@10</th>" in header and "<th>category L1 acc</th>" in header
    trained_row = re.search(r"<tr><td class=\"\">trained</td>(.*?)</tr>", html).group(1)
    assert '<td class="skip">skipped</td>' in trained_row  # image->mm column
    assert html.count("<img class='plot'") == 5  # 3 recall curves + 2 confusion matrices
    md = Path(out["paths"]["markdown"]).read_text()
    assert out["table"] in md and "| untrained |" in md and "retrieval/image_to_mm" in md
    assert "no_fire: not evaluated: no saved model at 'models/no_fire'" in md and "no_fire: not evaluated" in html
    for name in ("recall_at_k_text_to_mm.png", "confusion_level_1_trained.png"):
        assert (Path(out["paths"]["plots"]) / name).read_bytes()[:4] == b"\x89PNG"


def test_caps_sample_products_and_queries(tiny_dataset):
    full = load_eval_data(tiny_dataset, EvalConfig())
    capped = load_eval_data(tiny_dataset, EvalConfig(max_products=10, max_queries_per_task=3, seed=1))
    assert len(capped.products) == 10 and set(capped.products["product_id"]) <= set(full.products["product_id"])
    for qtype, frame in capped.queries.items():
        assert len(frame) <= 3
        assert (capped.products["product_id"].to_numpy()[capped.positives[qtype]] == frame["positive_product_id"]).all()
    assert capped.categories == full.categories  # the label space is the whole catalog's, not the sample's


def test_collect_variants_finds_saved_models_and_lists_missing(tmp_path):
    for name, reasoning in (("final", True), ("init", True), ("no_fusion", True), ("direct", False)):
        (tmp_path / name).mkdir()
        save_contract(tmp_path / name, EmbeddingContract(reasoning=reasoning))
    cfg = EvalConfig(
        model_dir=str(tmp_path / "final"),
        baseline_dir=str(tmp_path / "init"),
        ablation_dirs={"no_fusion": str(tmp_path / "no_fusion"), "no_rl": str(tmp_path / "nope")},
    )
    variants, missing = collect_variants(cfg)
    assert list(variants) == ["trained", "untrained", "reasoning_off", "no_fusion"]
    assert variants["reasoning_off"].reasoning is False and variants["trained"].reasoning is None
    assert missing == {"no_rl": f"no saved model at {str(tmp_path / 'nope')!r}"}
    # A model saved with reasoning off (never trained on traces): its other mode is reasoning forced on.
    variants, missing = collect_variants(
        EvalConfig(model_dir=str(tmp_path / "direct"), baseline_dir="", ablation_dirs={})
    )
    assert list(variants) == ["trained", "reasoning_on_forced"] and set(missing) == {"untrained"}
    assert variants["reasoning_on_forced"].reasoning is True
    cfg = EvalConfig(model_dir=str(tmp_path / "direct"), baseline_dir="", other_reasoning_mode=False, ablation_dirs={})
    assert list(collect_variants(cfg)[0]) == ["trained"]
    with pytest.raises(ValueError, match="clashes"):
        collect_variants(EvalConfig(model_dir=str(tmp_path / "final"), ablation_dirs={"chance": str(tmp_path)}))
    with pytest.raises(FileNotFoundError, match="run training first"):
        collect_variants(EvalConfig(model_dir=str(tmp_path / "nope")))
