"""The evaluation report: provenance, the reference check, reference rows, paired deltas, examples."""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

import numpy as np
import pytest

from moon3.common.provenance import git_dirty, git_sha, params_hash
from moon3.config import Moon3Config, load_config
from moon3.data.config import DataConfig
from moon3.data.mini import make_sample
from moon3.data.schema import PRODUCTS, read_dataset, table_path, write_table
from moon3.eval.config import EvalConfig
from moon3.eval.evaluate import evaluate
from moon3.eval.render import render_html, render_markdown
from moon3.eval.report import synthesis_section
from moon3.synthesis.synthesize import synthesize


def test_params_hash_and_git_sha():
    expected = hashlib.sha256(b'{"a":[1,2],"b":{"c":"x"}}').hexdigest()[:12]
    assert params_hash({"b": {"c": "x"}, "a": [1, 2]}) == params_hash({"a": [1, 2], "b": {"c": "x"}}) == expected
    assert params_hash({"a": 1}) != params_hash({"a": 2})
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    if head.returncode == 0:  # a source checkout (an installed package has no .git)
        assert git_sha() == head.stdout.strip() and isinstance(git_dirty(), bool)


def test_git_helpers_outside_a_checkout(tmp_path):
    assert git_sha(tmp_path) is None and git_dirty(tmp_path) is None


def hashed(salt: str):
    """A deterministic random embedder: each distinct input its own direction, nothing learned."""

    def embed(items: list[dict]) -> np.ndarray:
        rows = []
        for item in items:
            key = salt.encode() + (item["text"] or "").encode()
            key += item["image"].tobytes() if item["image"] is not None else b""
            v = np.random.default_rng(int.from_bytes(hashlib.sha256(key).digest()[:8], "little")).standard_normal(16)
            rows.append(v / np.linalg.norm(v))
        return np.stack(rows).astype(np.float32)

    return embed


def collapsed(items: list[dict]) -> np.ndarray:
    return np.tile(np.full(16, 0.25, dtype=np.float32), (len(items), 1))


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> tuple[dict, Path]:
    root = tmp_path_factory.mktemp("report-mini")
    make_sample(DataConfig(n_products=60, n_queries=60, eval_fraction=0.5, image_size=32, seed=4), root, progress=False)
    products, _ = read_dataset(root)
    products["category_path"] = [[*p, "All"] for p in products["category_path"]]  # a level with one value
    write_table(products, table_path(root, PRODUCTS), PRODUCTS)
    variants = {"trained": hashed("t"), "untrained": collapsed, "no_fusion": hashed("f")}
    params = Moon3Config().to_dict()
    synthesis = load_config(None, ["synthesis.teacher=attributes", f"synthesis.cache_path={root / 'cache.sqlite'}"])
    synthesize(synthesis, root, root / "traces", root / "synthesis", progress=False)
    report = str(root / "traces" / "synthesis_report.json")
    out = evaluate(
        EvalConfig(embed_chunk=32, bootstrap_samples=200, example_queries=2, synthesis_report=report),
        variants,
        root,
        root / "report",
        progress=False,
        missing={"no_fire": "no saved model at 'models/no_fire'"},
        params=params,
        source="mbe3-mini",
    )
    return out, root


def test_report_states_its_provenance(report):
    out, root = report
    prov = out["provenance"]
    assert prov["params"] == {"hash": params_hash(Moon3Config().to_dict()), "scope": "whole config"}
    assert prov["dataset"]["source"] == "mbe3-mini" and prov["dataset"]["products_by_split"]["total"] == 60
    assert prov["dataset"]["gallery_size"] == prov["dataset"]["products_by_split"]["eval"]
    md = Path(out["paths"]["markdown"]).read_text()
    head = md.split("## Comparison")[0]
    assert f"- Dataset: {root} (source: mbe3-mini, from params data.source)" in head
    assert "run.json beside this report" in head and "Code: git " not in head
    assert "Eval queries by type: total" in head
    # What changes from run to run (commit, whole-config hash, date, timings) is in run.json, not the DVC outputs.
    run = json.loads(Path(out["paths"]["run"]).read_text())
    assert run["params"]["hash"] == prov["params"]["hash"] and run["code"] == prov["code"]
    assert run["date"] == prov["date"] and set(run["seconds"]) == set(out["seconds"])
    results = json.loads(Path(out["paths"]["results"]).read_text())
    assert not {"code", "params", "date"} & set(results["provenance"]) and "seconds" not in results


def test_report_warns_when_below_the_references(report):
    out, _ = report
    below = out["below_references"]
    tasks = {(e["task"], e["metric"]) for e in below["entries"]}
    # A random embedder cannot beat TF-IDF on text->mm nor raw pixels on image->mm.
    assert {("text_to_mm", "recall_at_10"), ("image_to_mm", "recall_at_10")} <= tasks
    md = Path(out["paths"]["markdown"]).read_text()
    assert md.index("## ⚠ Below the non-learned references") < md.index("## Comparison")
    assert "- text→mm R@10: trained " in md and "vs ref_tfidf" in md
    html = Path(out["paths"]["html"]).read_text()
    assert "<div class='warn'><h2>⚠ Below the non-learned references</h2>" in html
    assert out["metrics"]["below_references"] == len(below["entries"])


def test_main_table_has_reference_rows_and_skips_the_single_value_level(report):
    out, _ = report
    table = out["table"]
    header, chance, majority = table.splitlines()[0], None, None
    for line in table.splitlines():
        chance = line if line.startswith("| chance |") else chance
        majority = line if line.startswith("| majority |") else majority
    assert "category L4" not in header and "category L1 (image only) acc" in header
    assert "attribute acc (image only, mean)" in header
    assert chance.startswith("| chance | reference row | ") and majority.startswith("| majority | reference row | — |")
    assert "| ref_tfidf | non-learned: char n-gram TF-IDF of the text |" in table
    metrics = out["metrics"]
    assert "level_4" not in metrics["trained"]["classification"]
    assert metrics["chance"]["classification"]["level_1"]["accuracy"] == pytest.approx(1 / 3)
    gallery = out["provenance"]["dataset"]["gallery_size"]
    assert metrics["chance"]["retrieval"]["text_to_mm"]["recall_at_10"] == pytest.approx(10 / gallery)
    md = Path(out["paths"]["markdown"]).read_text()
    assert "- all variants: classification/level_4: level 4 has a single value in the catalog ('All')" in md
    assert "- no_fire: not evaluated: no saved model at 'models/no_fire'" in md


def test_deltas_with_intervals_in_tables_and_metrics(report):
    out, _ = report
    md = Path(out["paths"]["markdown"]).read_text()
    ablations = md.split("## Ablations vs trained")[1].split("\n## ")[0]
    plain = "unknown (not a saved model)"  # the mode of an embedder that is neither a model nor a reference
    assert f"| no_fusion | {plain} | text→mm | R@10 |" in ablations
    assert f"| no_fusion | {plain} | category L1 | acc |" in ablations
    row = next(line for line in ablations.splitlines() if line.startswith(f"| no_fusion | {plain} | text→mm | R@10 |"))
    delta, interval, verdict = [c.strip() for c in row.strip("|").split("|")][6:9]
    lo, hi = (float(x) for x in interval.strip("[]").split(","))
    assert lo <= float(delta) <= hi and verdict in ("better", "worse", "within noise")
    assert f"| untrained | {plain} | text→mm | R@10 |" in md.split("## Baselines vs trained")[1]
    references = md.split("## Non-learned references vs trained")[1]
    assert "| ref_pixels | non-learned: raw 32x32 pixels | image→mm | R@10 |" in references
    entry = out["metrics"]["deltas"]["no_fusion"]["retrieval/text_to_mm"]["recall_at_10"]
    assert entry["lo"] <= entry["delta"] <= entry["hi"]
    assert out["flat"]["deltas/no_fusion/retrieval/text_to_mm/recall_at_10/delta"] == entry["delta"]

    def numbers_only(node) -> bool:
        if isinstance(node, dict):
            return all(numbers_only(v) for v in node.values())
        return isinstance(node, int | float) and not isinstance(node, bool)

    metrics = json.loads(Path(out["paths"]["metrics"]).read_text())
    # Numbers only, beside the reasons for what was not measured (and notes on derived queries, none here).
    assert "derived" not in metrics and metrics.pop("skipped")["trained"]["classification/level_4"]
    assert numbers_only(metrics)


def test_examples_show_thumbnails_in_html_only(report):
    out, _ = report
    html = Path(out["paths"]["html"]).read_text()
    section = html.split("top-5</h2>")[1].split("<h2>")[0]
    assert section.count("<h4>") == 6  # 2 queries x 3 query types
    assert section.count("<img src='data:image/png;base64,") >= 6 * 5  # every product has an image
    results = json.loads(Path(out["paths"]["results"]).read_text())
    examples = results["examples"]
    assert len(examples) == 6 and all(e["query_thumb"] is None for e in examples)
    for e in examples:
        assert len(e["top"]) == 5 and e["trace"] is None  # the trained embedder here does not reason
        marked = [p["product_id"] for p in e["top"] if p["positive"]]
        assert marked == ([e["positive_id"]] if e["rank"] <= 5 else [])
        assert f"positive {e['positive_id']} at rank {e['rank']}" in section


def test_report_has_a_synthesis_section(report):
    out, root = report
    syn = json.loads((root / "traces" / "synthesis_report.json").read_text())
    md = Path(out["paths"]["markdown"]).read_text()
    section = md.split("## Trace synthesis")[1].split("\n## ")[0]
    assert f"- Teacher attributes: {syn['in']} in, {syn['accepted']} accepted, 0 rejected, 0 failed; " in section
    assert f"claim accuracy 100.0%, mean trace tokens {syn['mean_tokens']:.1f}" in section
    assert f"- Full report: {root / 'synthesis' / 'synthesis_report.html'} (counts from " in section
    assert md.index("## Provenance") < md.index("## Trace synthesis") < md.index("## Comparison")
    html = Path(out["paths"]["html"]).read_text()
    assert "<h2>Trace synthesis</h2>" in html and f"<a href='{root / 'synthesis' / 'synthesis_report.html'}'>" in html
    assert "synthesis" not in out["metrics"]  # a section of the report, not a metric


def test_report_notes_a_missing_synthesis_report(report, tmp_path):
    out, root = report
    summary = json.loads(Path(out["paths"]["results"]).read_text())
    summary["synthesis"] = synthesis_section(str(tmp_path / "none.json"))
    note = f"Synthesis report {tmp_path / 'none.json'}: missing (no file there)"
    assert note in render_markdown(summary, [], root, "t") and note in render_html(summary, [], "t")
    summary["synthesis"] = synthesis_section("")  # '' = no section
    assert "Trace synthesis" not in render_markdown(summary, [], root, "t") + render_html(summary, [], "t")
