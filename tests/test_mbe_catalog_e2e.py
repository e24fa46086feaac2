"""Issue 13's first must-show: a catalog unlike mbe3-mini, in the MBE parquet layout, through the repo's own
`dvc repro` with default params.

The catalog differs from mbe3-mini in every way the issue names: Chinese titles, Chinese attribute keys
(颜色, 材质, 风格, in MBE's ``"k:v,,k:v"`` text form), five category levels (``doc_industry_name`` and
``doc_cate1_name`` .. ``doc_cate4_name``) whose level 1 has a single value, JPEG and PNG images stored as bytes in
the parquet (Hugging Face Image structs), and exactly one text+image query per product (no query ids: the
importer names them). The images carry a learnable signal: the fill colour is the 颜色 attribute and the shape
is the leaf category.

The scratch DVC project is the repo's pipeline: `dvc.yaml` and `params.yaml` copied unchanged except for the
source (`data.source: mbe`, `data.source_path`) and the size knobs that keep it fast (`train.steps`,
`train.batch_size`, `eval.bootstrap_samples`); the `moon3` package is copied in so the stages' code deps resolve.
`dvc repro evaluate` must pass the gate, train, and measure every retrieval task; editing one title in the
source parquet must re-run `prepare`.
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image, ImageDraw

from moon3.data.schema import PRODUCTS, read_table, table_path
from moon3.eval.tasks import RETRIEVAL_TASKS

REPO = Path(__file__).resolve().parents[1]
N_PRODUCTS = 200
COLORS = {"红色": (210, 35, 35), "蓝色": (35, 70, 215), "绿色": (35, 165, 70), "黄色": (230, 200, 30),
          "黑色": (25, 25, 25)}  # fmt: skip
MATERIALS = ("棉质", "丝绸", "羊毛", "亚麻")
STYLES = ("简约", "复古", "运动")
KEYS = ("颜色", "材质", "风格")
INDUSTRY = "服饰时尚"  # level 1: one value for the whole catalog
# Levels 2..5 (doc_cate1_name .. doc_cate4_name); the leaf decides the shape drawn.
PATHS = [
    ("男装", "上衣", "T恤", "圆领"),
    ("男装", "裤子", "牛仔裤", "直筒"),
    ("女装", "裙子", "连衣裙", "长款"),
    ("女装", "外套", "风衣", "双排扣"),
    ("童装", "套装", "运动套装", "两件套"),
]
SHAPES = ("ellipse", "rectangle", "triangle", "cross", "diamond")
HF_IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])


def draw(color: tuple[int, int, int], shape: str, size: int, offset: int, fmt: str) -> bytes:
    """A coloured shape on a light background, encoded as ``fmt``."""
    image = Image.new("RGB", (size, size), (235, 235, 228))
    d = ImageDraw.Draw(image)
    a, b = 8 + offset, size - 8 - (4 - offset)
    mid = (a + b) // 2
    if shape == "ellipse":
        d.ellipse((a, a, b, b), fill=color)
    elif shape == "rectangle":
        d.rectangle((a, a + 6, b, b - 6), fill=color)
    elif shape == "triangle":
        d.polygon([(mid, a), (a, b), (b, b)], fill=color)
    elif shape == "cross":
        d.rectangle((mid - 6, a, mid + 6, b), fill=color)
        d.rectangle((a, mid - 6, b, mid + 6), fill=color)
    else:
        d.polygon([(mid, a), (b, mid), (mid, b), (a, mid)], fill=color)
    buf = io.BytesIO()
    image.save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


def catalog_rows(n: int) -> list[dict]:
    rows = []
    names = list(COLORS)
    for i in range(n):
        color, material, style = names[i % len(names)], MATERIALS[i % 4], STYLES[(i // 7) % 3]
        leaf = (i // len(names) + i) % len(PATHS)
        path, shape = PATHS[leaf], SHAPES[leaf]
        rows.append({
            "doc_id": f"商品{i:04d}",
            "doc_title": f"{color}{material}{path[2]} {style}风 {path[3]} 第{i}款",
            "doc_image": {"bytes": draw(COLORS[color], shape, 64, i % 5, "JPEG"), "path": f"{i}.jpg"},
            "doc_industry_name": INDUSTRY,
            **{f"doc_cate{k + 1}_name": name for k, name in enumerate(path)},
            "doc_attributes": ",,".join(f"{k}:{v}" for k, v in zip(KEYS, (color, material, style), strict=True)),
            "doc_price": 59.0 + i,
            "doc_shop_id": f"店铺{i % 7}",
            "query": f"{color}的{path[2]} {style}",
            "query_image": {"bytes": draw(COLORS[color], shape, 56, (i + 2) % 5, "PNG"), "path": None},
        })  # fmt: skip
    return rows


def write_catalog(folder: Path, rows: list[dict]) -> None:
    """Two parquet parts, as a downloaded release comes (the importer searches the folder)."""
    folder.mkdir(parents=True, exist_ok=True)
    half = len(rows) // 2
    for part, chunk in enumerate((rows[:half], rows[half:])):
        columns = {name: [r[name] for r in chunk] for name in chunk[0]}
        table = pa.table({
            name: pa.array(values, type=HF_IMAGE) if name in ("doc_image", "query_image") else values
            for name, values in columns.items()
        })  # fmt: skip
        pq.write_table(table, folder / f"part-{part}.parquet")


def project_params(catalog: Path) -> str:
    """The repo's params.yaml with only the source and the size knobs changed (each key must exist)."""
    params = yaml.safe_load((REPO / "params.yaml").read_text(encoding="utf-8"))
    edits = {
        ("data", "source"): "mbe",
        ("data", "source_path"): str(catalog),
        ("train", "steps"): 30,
        ("train", "batch_size"): 8,
        ("eval", "bootstrap_samples"): 100,
    }  # rl is left alone: a model trained without traces (model.reasoning: false, the default) skips it
    for (section, key), value in edits.items():
        assert key in params[section], f"params.yaml has no {section}.{key}"
        params[section][key] = value
    return yaml.safe_dump(params, allow_unicode=True, sort_keys=False)


def nan_free(path: Path) -> None:
    text = path.read_text(encoding="utf-8")
    assert not re.search(r"\bNaN\b|\bInfinity\b", text), f"{path} holds a NaN/Infinity"
    json.loads(text)


def walk_numbers(value):
    if isinstance(value, dict):
        for v in value.values():
            yield from walk_numbers(v)
    elif isinstance(value, list):
        for v in value:
            yield from walk_numbers(v)
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        yield value


@pytest.mark.slow
def test_mbe_layout_chinese_catalog_dvc_repro_with_default_params(tmp_path):
    work = tmp_path / "proj"
    work.mkdir()
    catalog = tmp_path / "raw" / "mbe"  # outside the project, as a user's download would be
    rows = catalog_rows(N_PRODUCTS)
    write_catalog(catalog, rows)
    shutil.copytree(REPO / "moon3", work / "moon3", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "dvc.yaml", work / "dvc.yaml")
    (work / "params.yaml").write_text(project_params(catalog), encoding="utf-8")

    env_bin = str(Path(sys.executable).parent)
    env = {
        "PATH": f"{env_bin}:/usr/bin:/bin",
        "HOME": str(tmp_path),
        "DVC_NO_ANALYTICS": "1",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
        "MPLCONFIGDIR": str(tmp_path / "mpl"),
    }

    def dvc(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([f"{env_bin}/dvc", *args], cwd=work, env=env, capture_output=True, text=True)

    assert dvc("init", "--no-scm", "-q").returncode == 0
    first = dvc("repro", "evaluate")
    log = first.stdout + first.stderr
    assert first.returncode == 0, log[-6000:]
    for stage in ("source", "prepare", "validate", "synthesize", "pretrain", "rl", "evaluate"):
        assert f"Running stage '{stage}'" in first.stdout, stage

    # Import: every row became a product and its query; five levels, one value at level 1.
    report = json.loads((work / "data/prepared/import_report.json").read_text(encoding="utf-8"))
    assert report["skipped"] == {} and report["partial"] == {}
    assert (report["products_written"], report["queries_written"]) == (N_PRODUCTS, N_PRODUCTS)
    stats = json.loads((work / "data/prepared/stats.json").read_text(encoding="utf-8"))
    assert list(stats["category_levels"]) == ["1", "2", "3", "4", "5"]
    assert stats["category_levels"]["1"] == {INDUSTRY: N_PRODUCTS}
    assert stats["query_types"] == {"multimodal": N_PRODUCTS}  # one text+image query per product

    # The gate passed on default params, learned the Chinese keys and values from the train split, and
    # quarantined nothing (no unknown_attribute_key: the keys are not the generated sample's).
    vm = json.loads((work / "reports/validation/validation_metrics.json").read_text(encoding="utf-8"))
    assert vm["passed"] is True and vm["blocking_failures"] == 0
    assert vm["products"]["rows_quarantined"] == 0 and vm["queries"]["rows_quarantined"] == 0
    assert "unknown_attribute_key" not in json.dumps(vm)
    assert vm["attribute_vocabulary"]["allowed_attribute_keys"] is None
    assert vm["attribute_vocabulary"]["values_per_key"] == {"颜色": 5, "材质": 4, "风格": 3}
    vocabulary = json.loads((work / "data/validated/attribute_vocabulary.json").read_text(encoding="utf-8"))
    assert set(vocabulary["keys"]) == set(KEYS) and set(vocabulary["keys"]["颜色"]["values"]) == set(COLORS)

    # Training ran (30 steps; the held-out check measured on the queries' text views, a number, not NaN).
    train = json.loads((work / "reports/pretrain/train_metrics.json").read_text(encoding="utf-8"))
    assert train["steps"] == 30 and 0 <= train["heldout_text_recall_at_10"] <= 1
    assert "derived from multimodal queries" in train["notes"]["heldout_text_recall_at_10"]
    rl = json.loads((work / "reports/rl/rl_metrics.json").read_text(encoding="utf-8"))
    assert rl["skipped"] is True  # model.reasoning is off by default: the pretrained model is copied
    assert (work / "models/rl/final/moon3_config.json").exists()

    # Every retrieval task is measured for the trained variant; text->mm and image->mm from the multimodal
    # queries' views, and the report says so.
    metrics = json.loads((work / "reports/eval/metrics.json").read_text(encoding="utf-8"))
    _check_every_task_measured(metrics, stats["queries"]["eval"])
    report_md = (work / "reports/eval/report.md").read_text(encoding="utf-8")
    assert "derived from multimodal queries" in report_md
    for path in [*(work / "reports").rglob("*metrics*.json"), work / "reports/eval/results.json"]:
        nan_free(path)
    assert all(math.isfinite(v) for v in walk_numbers(metrics))

    # Editing one title in the source parquet (same path, same params) re-runs prepare and the chain after it.
    rows[3]["doc_title"] = rows[3]["doc_title"] + " 新款"
    write_catalog(catalog, rows)
    second = dvc("repro", "evaluate")
    assert second.returncode == 0, (second.stdout + second.stderr)[-6000:]
    assert "Running stage 'prepare'" in second.stdout and "Running stage 'pretrain'" in second.stdout
    products = read_table(table_path(work / "data/prepared", PRODUCTS), PRODUCTS)
    assert products.loc[products["product_id"] == "商品0003", "title"].item().endswith(" 新款")


def _check_every_task_measured(metrics: dict, n_eval: int) -> None:
    """Every retrieval task measured on every eval query (the trained and the untrained model), none skipped;
    text->mm and image->mm named as derived from the multimodal queries."""
    for variant in ("trained", "untrained"):
        retrieval = metrics[variant]["retrieval"]
        assert set(retrieval) == set(RETRIEVAL_TASKS), (variant, metrics.get("skipped"))
        for task in RETRIEVAL_TASKS:
            assert retrieval[task]["n"] == n_eval and 0 <= retrieval[task]["recall_at_10"] <= 1, (task, retrieval)
        assert not [k for k in metrics.get("skipped", {}).get(variant, {}) if k.startswith("retrieval/")]
    derived = metrics["derived"]
    assert set(derived) == {f"retrieval/{task}" for task in ("text_to_mm", "image_to_mm")}
    assert all("derived from multimodal queries" in note for note in derived.values())
