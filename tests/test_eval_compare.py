"""Paired bootstrap intervals, deltas vs the trained model, and the "below the references" check."""

from __future__ import annotations

import numpy as np
import pytest

from moon3.eval.compare import below_references, deltas_as_metrics, paired_bootstrap, variant_deltas, verdict
from moon3.eval.tables import below_reference_lines
from moon3.eval.tasks import CLASSIFICATION, RETRIEVAL, TaskResult


def test_bootstrap_of_a_constant_shift_is_that_shift_with_no_spread():
    a = np.random.default_rng(0).random(300)
    delta, lo, hi = paired_bootstrap(a, a + 0.1)
    assert delta == pytest.approx(0.1, abs=1e-12)
    assert lo == pytest.approx(0.1, abs=1e-12) and hi == pytest.approx(0.1, abs=1e-12)
    assert verdict(lo, hi) == "better"
    # Identical outcomes: no difference, and it reads as such.
    delta, lo, hi = paired_bootstrap(a, a)
    assert (delta, lo, hi) == (0.0, 0.0, 0.0) and verdict(lo, hi) == "within noise"


def test_bootstrap_is_deterministic_and_covers_the_true_difference_shrinking_with_n():
    rng = np.random.default_rng(1)
    widths = []
    for n in (200, 5000):
        # Independent per-item outcomes: hit rates 0.5 and 0.7, true difference 0.2.
        a, b = (rng.random(n) < 0.5).astype(float), (rng.random(n) < 0.7).astype(float)
        delta, lo, hi = paired_bootstrap(a, b, n_boot=1000, seed=3)
        assert delta == pytest.approx(b.mean() - a.mean())
        assert lo < 0.2 < hi and lo < delta < hi
        assert paired_bootstrap(a, b, n_boot=1000, seed=3) == (delta, lo, hi)
        widths.append(hi - lo)
    # The width of a mean's interval scales like 1/sqrt(n): 5 times narrower for 25 times the items.
    assert widths[1] == pytest.approx(widths[0] / 5, rel=0.25)


def test_bootstrap_interval_coverage_is_about_95_percent():
    rng = np.random.default_rng(2)
    covered = 0
    for trial in range(100):
        a = rng.normal(0.0, 1.0, 150)
        b = a + rng.normal(0.3, 1.0, 150)  # true mean difference 0.3
        _, lo, hi = paired_bootstrap(a, b, n_boot=500, seed=trial)
        covered += lo <= 0.3 <= hi
    assert 88 <= covered <= 100


def test_bootstrap_rejects_unpaired_input():
    with pytest.raises(ValueError, match="one length"):
        paired_bootstrap(np.zeros(3), np.zeros(4))
    with pytest.raises(ValueError, match="at least one item"):
        paired_bootstrap(np.zeros(0), np.zeros(0))


def _retrieval(name: str, ranks: list[int]) -> TaskResult:
    per_item = {"rank": np.array(ranks), "top": np.zeros((len(ranks), 5), dtype=int)}
    return TaskResult(RETRIEVAL, name, {"n": len(ranks)}, details={"per_item": per_item})


def _classification(name: str, correct: list[bool], rows: list[int]) -> TaskResult:
    per_item = {"correct": np.array(correct), "row": np.array(rows)}
    return TaskResult(CLASSIFICATION, name, {"n": len(correct)}, details={"per_item": per_item})


def test_deltas_pair_the_same_queries_and_items():
    results = {
        "trained": [
            _retrieval("text_to_mm", [1, 2, 20, 4]),
            _classification("level_1", [True, False, True, False], [0, 1, 2, 3]),
            _classification("level_2", [True, True], [0, 1]),
        ],
        "no_fusion": [
            _retrieval("text_to_mm", [1, 30, 20, 40]),
            _classification("level_1", [True, True, True, True], [0, 1, 2, 3]),
            _classification("level_2", [True, True], [0, 2]),  # other items: not comparable, left out
        ],
        "ref_tfidf": [TaskResult(RETRIEVAL, "text_to_mm", None, skipped="reads only text")],
    }
    rows = variant_deltas(results, "trained", main_k=10, n_boot=200)
    got = {(r["variant"], r["task"], r["metric"]): r for r in rows}
    assert set(got) == {
        ("no_fusion", "text_to_mm", "recall_at_10"),
        ("no_fusion", "text_to_mm", "mrr"),
        ("no_fusion", "level_1", "accuracy"),
    }
    recall = got[("no_fusion", "text_to_mm", "recall_at_10")]
    assert (recall["base"], recall["value"], recall["delta"]) == (0.75, 0.25, -0.5)
    mrr = got[("no_fusion", "text_to_mm", "mrr")]
    assert mrr["delta"] == pytest.approx((1 + 1 / 30 + 1 / 20 + 1 / 40) / 4 - (1 + 1 / 2 + 1 / 20 + 1 / 4) / 4)
    assert got[("no_fusion", "level_1", "accuracy")]["delta"] == 0.5
    for r in rows:
        assert r["lo"] <= r["delta"] <= r["hi"] and r["n"] == 4
    nested = deltas_as_metrics(rows)
    assert nested["no_fusion"]["retrieval/text_to_mm"]["recall_at_10"]["delta"] == -0.5


def _row(variant: str, task: str, base: float, value: float) -> dict:
    return {"variant": variant, "kind": RETRIEVAL, "task": task, "metric": "recall_at_10", "base": base,
            "value": value, "delta": value - base, "lo": value - base - 0.1, "hi": value - base + 0.1,
            "n": 100, "verdict": "better"}  # fmt: skip


def test_below_references_lists_where_the_best_reference_is_not_beaten():
    rows = [
        _row("ref_tfidf", "text_to_mm", base=0.067, value=0.337),
        _row("ref_tfidf_pixels", "text_to_mm", base=0.067, value=0.300),
        _row("ref_pixels", "image_to_mm", base=0.547, value=0.815),
        _row("ref_tfidf", "mm_to_mm", base=0.9, value=0.5),
        _row("no_fusion", "mm_to_mm", base=0.9, value=0.95),  # not a reference: never in the check
    ]
    below = below_references(rows, ["ref_tfidf", "ref_pixels", "ref_tfidf_pixels"])
    assert [(e["task"], e["reference"], e["reference_value"]) for e in below["entries"]] == [
        ("text_to_mm", "ref_tfidf", 0.337),
        ("image_to_mm", "ref_pixels", 0.815),
    ]
    assert sorted(below["compared"]) == ["retrieval/image_to_mm/recall_at_10", "retrieval/mm_to_mm/recall_at_10",
                                         "retrieval/text_to_mm/recall_at_10"]  # fmt: skip
    warning, lines = below_reference_lines({"below_references": below})
    assert warning and "2 of 3" in lines[0]
    assert lines[1].startswith("text→mm R@10: trained 0.067 vs ref_tfidf 0.337")

    beaten = below_references(rows[3:], ["ref_tfidf"])
    warning, lines = below_reference_lines({"below_references": beaten})
    assert not warning
    assert lines == ["The trained model beats the best non-learned reference on all 1 columns measured."]
