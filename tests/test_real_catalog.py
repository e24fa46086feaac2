"""A catalog unlike mbe3-mini, end to end (issue 13): Chinese titles and attribute keys (颜色, 材质, 风格), five
category levels with a single-value level 1, JPEG images and one text+image query per product; and the same
catalog with no query at all (products only).

What it shows: the tokenizer is built from this catalog alone and never splits one of its characters into byte
pieces; evaluation measures every retrieval task (text and image views derived from the multimodal queries, and
said so); no metrics file holds a NaN; a products-only catalog passes the gate with a warning, trains on
intra-product pairs and evaluates what it can; stats and plots show every level and any script.
"""

from __future__ import annotations

import hashlib
import json
import re
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from moon3.config import load_config
from moon3.data.schema import (
    PRODUCTS,
    QUERIES,
    ProductRecord,
    QueryRecord,
    read_dataset,
    records_to_frame,
    table_path,
    write_table,
)
from moon3.data.stats import dataset_stats
from moon3.eval.config import EvalConfig
from moon3.eval.data import load_eval_data, queries_by_type
from moon3.eval.evaluate import evaluate
from moon3.eval.plots import BASE_FONT, cjk_fonts, font_settings, plot_confusion
from moon3.eval.tasks import RETRIEVAL_TASKS
from moon3.model.backbone import TINY_VOCAB_SIZE, _byte_symbols, train_tokenizer
from moon3.model.items import attribute_text, catalog_texts
from moon3.validation.config import ValidationConfig
from moon3.validation.gate import validate

REPO = Path(__file__).resolve().parents[1]
COLORS = {"红色": (220, 30, 30), "蓝色": (30, 60, 220), "绿色": (30, 160, 60), "黑色": (20, 20, 20)}
MATERIALS = ("棉质", "丝绸", "羊毛")
STYLES = ("简约", "复古", "运动")
KEYS = ["颜色", "材质", "风格"]
# Level 1 has a single value; levels 2..5 below it.
PATHS = [
    ["服饰", "男装", "上衣", "T恤", "圆领"],
    ["服饰", "男装", "裤子", "牛仔裤", "直筒"],
    ["服饰", "女装", "裙子", "连衣裙", "长款"],
    ["服饰", "女装", "外套", "风衣", "双排扣"],
]
N_PRODUCTS = 32  # every 4th product is in the eval split


def build_catalog(root: Path, with_queries: bool) -> Path:
    """The catalog in moon3's own format, written with moon3.data.schema."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    products, queries = [], []
    for i in range(N_PRODUCTS):
        color, material, style = list(COLORS)[i % 4], MATERIALS[i % 3], STYLES[(i // 3) % 3]
        path = PATHS[(i // 4 + i) % 4]
        image = Image.new("RGB", (32, 32), COLORS[color])
        image.paste((255, 255, 255) if i % 2 else (128, 128, 128), (4 + i % 8, 4, 14 + i % 8, 14))
        image.save(root / f"images/p{i}.jpg", format="JPEG")
        split = "eval" if i % 4 == 3 else "train"
        products.append(ProductRecord(f"p{i}", f"{color}{material}{path[3]} {style}风 第{i}款", f"images/p{i}.jpg",
                                      path, dict(zip(KEYS, (color, material, style), strict=True)),
                                      price=99.0 + i, shop_id=f"店{i % 3}", split=split))  # fmt: skip
        if with_queries:  # the natural MBE layout: one text+image query per product
            image.rotate(90).save(root / f"images/q{i}.jpg", format="JPEG")
            queries.append(QueryRecord(f"q{i}", f"{color}的{path[3]}", f"images/q{i}.jpg", f"p{i}", split,
                                       "multimodal"))  # fmt: skip
    write_table(records_to_frame(products, PRODUCTS), table_path(root, PRODUCTS), PRODUCTS)
    write_table(records_to_frame(queries, QUERIES), table_path(root, QUERIES), QUERIES)
    return root


@pytest.fixture(scope="module")
def catalog(tmp_path_factory) -> Path:
    return build_catalog(tmp_path_factory.mktemp("zh-catalog"), with_queries=True)


@pytest.fixture(scope="module")
def products_only(tmp_path_factory) -> Path:
    return build_catalog(tmp_path_factory.mktemp("zh-products-only"), with_queries=False)


def hashed(items: list[dict]) -> np.ndarray:
    """A deterministic random embedder (each distinct input its own direction)."""
    rows = []
    for item in items:
        key = (item["text"] or "").encode() + (item["image"].tobytes() if item["image"] is not None else b"")
        v = np.random.default_rng(int.from_bytes(hashlib.sha256(key).digest()[:8], "little")).standard_normal(16)
        rows.append(v / np.linalg.norm(v))
    return np.stack(rows).astype(np.float32)


def _cjk(text: str) -> set[str]:
    return {c for c in text if "\u4e00" <= c <= "\u9fff"}


# --- part 1: the tokenizer ------------------------------------------------------------------------------------


@pytest.mark.parametrize("vocab_size", [TINY_VOCAB_SIZE, 300])
def test_tokenizer_never_splits_a_catalog_character_into_bytes(catalog, vocab_size):
    products, queries = read_dataset(catalog)
    tok = train_tokenizer(catalog_texts(catalog), vocab_size=vocab_size)
    to_byte = {symbol: b for b, symbol in _byte_symbols().items()}
    names = sorted({n for p in products["category_path"] for n in p})
    texts = [*products["title"], *names, *queries["query_text"]]
    texts += [attribute_text(k, v) for a in products["attributes"] for k, v in a.items()]
    chars = set().union(*(_cjk(t) for t in texts))
    assert len(chars) >= 40 and {"颜", "色", "材", "质", "风", "格", "恤"} <= chars
    for text in texts:
        ids = tok(text, add_special_tokens=False).input_ids
        for token in tok.convert_ids_to_tokens(ids):
            # A whole character or several: the token's bytes are valid UTF-8 on their own, never a fragment.
            bytes([to_byte[s] for s in token]).decode("utf-8")
        assert tok.decode(ids) == text
    for name in names:  # every category name round-trips exactly, from its own tokens
        ids = tok(name, add_special_tokens=False).input_ids
        assert tok.decode(ids) == name and "".join(tok.decode([i]) for i in ids) == name


def test_tokenizer_corpus_is_the_catalog_alone(catalog):
    texts = catalog_texts(catalog)
    products, _ = read_dataset(catalog)
    train = products[products["split"] == "train"]
    assert train["title"].iloc[0] in texts[0]
    assert "category: 服饰 > 男装 > 上衣 > T恤 > 圆领" in texts  # the category path as a trace writes it
    assert {n for p in products["category_path"] for n in p} <= set(texts)  # the zero-shot class prompts
    assert "颜色: 红色" in texts  # the zero-shot attribute prompt
    eval_title = products.loc[products["split"] == "eval", "title"].iloc[0]
    assert not any(eval_title in t for t in texts)  # nothing of an eval item's own text
    for source in (REPO / "moon3" / "model").glob("*.py"):  # no vocabulary of the generated sample
        assert "moon3.data.mini" not in source.read_text(), source
    vocab = train_tokenizer(texts).get_vocab()
    assert not any(word in token for token in vocab for word in ("cushion", "plate", "stripes"))


# --- parts 2 and 3: evaluation with derived views, no NaN --------------------------------------------------------


def test_native_queries_of_a_type_are_never_mixed_with_derived_ones(catalog):
    _, queries = read_dataset(catalog)
    by_type, derived = queries_by_type(queries)
    assert set(derived) == {"text", "image"} and "derived from multimodal queries" in derived["text"]
    assert by_type["text"]["query_image"].isna().all() and by_type["text"]["query_text"].notna().all()
    assert by_type["image"]["query_text"].isna().all() and by_type["image"]["query_image"].notna().all()
    native = pd.DataFrame([{"query_id": "t1", "query_text": "红色T恤", "query_image": None,
                            "positive_product_id": "p0", "split": "train", "query_type": "text"}])  # fmt: skip
    by_type, derived = queries_by_type(pd.concat([queries, native], ignore_index=True))
    assert set(derived) == {"image"} and by_type["text"]["query_id"].tolist() == ["t1"]


@pytest.fixture(scope="module")
def tiny_model(catalog):
    from moon3.model.embedder import Moon3Embedder

    torch.manual_seed(0)
    return Moon3Embedder.from_config(load_config(None).model, catalog_texts(catalog))


def test_evaluation_measures_every_retrieval_task_and_writes_no_nan(catalog, tiny_model, tmp_path):
    data = load_eval_data(catalog, EvalConfig())
    assert set(data.derived) == {"text", "image"} and len(data.queries["text"]) == N_PRODUCTS // 4

    def untrained(items: list[dict]) -> torch.Tensor:
        return tiny_model.embed(items, reasoning=False, batch_size=16)

    out = evaluate(EvalConfig(bootstrap_samples=50, example_queries=1), {"trained": untrained, "untrained": hashed},
                   catalog, tmp_path / "eval", progress=False)  # fmt: skip
    for variant in ("trained", "untrained"):
        assert set(out["metrics"][variant]["retrieval"]) == set(RETRIEVAL_TASKS), out["skipped"]
    derived = out["metrics"]["derived"]
    assert set(derived) == {"retrieval/text_to_mm", "retrieval/image_to_mm"}
    assert all("derived from multimodal queries" in note for note in derived.values())
    md = Path(out["paths"]["markdown"]).read_text()
    assert "- text→mm: derived from multimodal queries" in md and "- image→mm: derived from multimodal queries" in md
    assert "derived from multimodal queries" in Path(out["paths"]["html"]).read_text()
    # Level 1 has one value: skipped with its reason, listed in metrics.json; level 2 keeps the confusion matrix.
    assert "level_1" not in out["metrics"]["trained"]["classification"]
    assert "single value" in out["metrics"]["skipped"]["trained"]["classification/level_1"]
    assert (tmp_path / "eval" / "plots" / "confusion_level_2_trained.png").exists()
    for name in ("metrics.json", "results.json"):
        text = (tmp_path / "eval" / name).read_text()
        assert "NaN" not in text and "Infinity" not in text, name


def test_heldout_check_uses_text_views_and_never_writes_nan(catalog, products_only, tiny_model):
    from moon3.train.heldout import heldout_text_recall, record_heldout

    result = heldout_text_recall(tiny_model, catalog, max_queries=50)
    assert result.value is not None and 0 <= result.value <= 1 and result.n == N_PRODUCTS // 4
    assert "derived from multimodal queries" in result.note
    skipped = heldout_text_recall(tiny_model, products_only)
    assert skipped.value is None and "no eval text queries" in skipped.skipped
    summary = {"steps": 3}
    record_heldout(summary, "heldout_text_recall_at_10", skipped)
    assert set(summary) == {"steps", "skipped"} and "NaN" not in json.dumps(summary)
    assert summary["skipped"]["heldout_text_recall_at_10"] == skipped.skipped


# --- part 4: products only --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def validated_products_only(products_only, tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("po-gate")
    cfg = ValidationConfig(allowed_attribute_keys=list(KEYS))
    result = validate(cfg, products_only, work / "validated", work / "quarantine", work / "reports", progress=False)
    assert result.passed, [f.to_dict() for f in result.blocking]
    warning = [f for f in result.failures if f.table == QUERIES and f.check == "empty_table"]
    assert len(warning) == 1 and not warning[0].blocking and "products-only" in warning[0].message
    assert "products-only" in (work / "reports" / "validation_report.html").read_text()
    return work / "validated"


def test_products_only_pairs_are_title_against_own_image(validated_products_only):
    from moon3.train.contrastive import BatchBuilder
    from moon3.train.data import HardNegativeSampler, PairData

    data = PairData(validated_products_only, "train")
    n_train = N_PRODUCTS - N_PRODUCTS // 4
    assert len(data) == n_train and "intra-product pairs" in data.notice
    assert (data.queries["positive_product_id"] == data.products["product_id"]).all()
    batch = HardNegativeSampler(data, batch_size=4, hard_negatives=1, seed=0).batch(0)
    built = BatchBuilder(data, lambda items, traces: items)(batch)
    queries, products = built["inputs"][: built["n_queries"]], built["inputs"][built["n_queries"] :]
    assert all(q["image"] is None and "\n颜色: " in q["text"] for q in queries)  # title + attributes
    assert all(p["text"] is None and p["image"] is not None for p in products)  # the image alone


def test_products_only_catalog_trains_and_evaluates(validated_products_only, tmp_path, capsys):
    from moon3.train.contrastive import train_contrastive

    sets = ["train.steps=3", "train.batch_size=4", "train.warmup_steps=1", "train.save_every=3",
            "train.heldout_queries=20", "train.traces_dir=", "train.mlflow_experiment=",
            "train.num_workers=0"]  # fmt: skip
    summary = train_contrastive(load_config(None, sets), validated_products_only, tmp_path / "model",
                                tmp_path / "reports", progress=False)  # fmt: skip
    assert "notice: no train queries" in capsys.readouterr().out
    assert summary["steps"] == 3 and np.isfinite(summary["final_infonce"])
    text = (tmp_path / "reports" / "train_metrics.json").read_text()
    metrics = json.loads(text)
    assert "NaN" not in text and "heldout_text_recall_at_10" not in metrics
    assert set(metrics["skipped"]) == {"heldout_text_recall_at_10", "heldout_text_recall_at_10_init"}
    # Evaluation: the intra-product tasks are measured, the query-based ones skipped with the reason.
    out = evaluate(EvalConfig(bootstrap_samples=20, example_queries=1, references=[]), {"trained": hashed},
                   validated_products_only, tmp_path / "eval", progress=False)  # fmt: skip
    assert set(out["metrics"]["trained"]["retrieval"]) == {"text_to_image", "image_to_text"}
    reasons = out["metrics"]["skipped"]["trained"]
    assert {"retrieval/text_to_mm", "retrieval/image_to_mm", "retrieval/mm_to_mm"} <= set(reasons)
    assert "no multimodal query" in reasons["retrieval/text_to_mm"]
    assert "NaN" not in (tmp_path / "eval" / "metrics.json").read_text()


# --- part 5: stats and plots ------------------------------------------------------------------------------------


def test_stats_show_every_category_level(catalog, products_only):
    from typer.testing import CliRunner

    from moon3.cli import app

    stats = dataset_stats(catalog)
    levels = stats["category_levels"]
    assert list(levels) == ["1", "2", "3", "4", "5"] and levels["1"] == {"服饰": N_PRODUCTS}
    assert levels["5"]["圆领"] == N_PRODUCTS // 4 and stats["category_level1"] == levels["1"]
    result = CliRunner().invoke(app, ["data", "stats", str(catalog)])
    assert result.exit_code == 0, result.output
    for level in range(1, 6):
        assert f"category level {level} (" in result.output
    assert "category level 4 (4 values): " in result.output and "连衣裙=8" in result.output
    empty = CliRunner().invoke(app, ["data", "stats", str(products_only)])
    assert "notice: no queries" in re.sub(r"\s+", " ", empty.output)


def test_plots_draw_cjk_labels(tmp_path):
    settings = font_settings()
    assert settings["font.family"][0] == BASE_FONT
    summary = {"details": {"trained": {"classification/level_2": {"labels": ["男装", "女装"],
                                                                  "confusion": [[3, 1], [0, 4]]}}}}  # fmt: skip
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        (png,) = plot_confusion(summary, tmp_path)
    assert png.name == "confusion_level_2_trained.png" and png.stat().st_size > 0
    if cjk_fonts():  # installed (fonts-noto-cjk in the Docker image): every glyph drawn
        assert not [w for w in caught if "missing from font" in str(w.message)], [str(w.message) for w in caught]


def test_plots_render_without_a_cjk_font(tmp_path, monkeypatch):
    import moon3.eval.plots as plots

    monkeypatch.setattr(plots, "cjk_fonts", lambda: ())  # a machine without one: boxes, but a plot all the same
    assert plots.font_settings() == {"font.family": [BASE_FONT]}
    entry = {"labels": ["上衣", "裤子"], "confusion": [[1, 0], [0, 1]]}
    summary = {"details": {"v": {"classification/level_3": entry}}}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        (png,) = plot_confusion(summary, tmp_path)
    assert png.read_bytes()[:4] == b"\x89PNG"
    assert any("missing from font" in str(w.message) for w in caught)  # what the CJK font list prevents
