"""Model variants on a real (tiny) saved model: honest reasoning modes, trace statistics, training records."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from moon3.data.config import DataConfig
from moon3.data.mini import make_sample
from moon3.eval.config import EvalConfig
from moon3.eval.evaluate import evaluate
from moon3.eval.variants import ModelEmbedFn, collect_variants, model_record
from moon3.model.config import ModelConfig
from moon3.model.contract import CONTRACT_FILE
from moon3.model.embedder import Moon3Embedder
from moon3.model.items import catalog_texts

TRAINING = {"stage": "pretrain", "steps": 12, "traces": False, "seed": 0, "data_dir": "data/validated",
            "ablation": None, "switches": {"fusion": True, "fire": True, "reasoning": False}}  # fmt: skip


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    """A dataset and a tiny model saved with reasoning off (never trained on traces), with a training record."""
    root = tmp_path_factory.mktemp("variants")
    make_sample(DataConfig(n_products=40, n_queries=40, eval_fraction=0.5, image_size=32, seed=5), root, progress=False)
    cfg = ModelConfig(embed_dim=32, max_trace_tokens=4, reasoning=False)
    Moon3Embedder.from_config(cfg, catalog_texts(root)).save_pretrained(root / "model")
    contract_file = root / "model" / CONTRACT_FILE
    payload = json.loads(contract_file.read_text())
    contract_file.write_text(json.dumps({**payload, "training": TRAINING}))  # what training writes
    return root


def test_model_trained_without_traces_embeds_with_reasoning_off_and_says_so(saved):
    variants, missing = collect_variants(EvalConfig(model_dir=str(saved / "model"), baseline_dir="", ablation_dirs={}))
    assert list(variants) == ["trained", "reasoning_on_forced"] and set(missing) == {"untrained"}
    cfg = EvalConfig(embed_chunk=64, references=[], bootstrap_samples=100, example_queries=1)
    out = evaluate(cfg, variants, saved, saved / "report", progress=False, missing=missing)

    trained, forced = out["modes"]["trained"], out["modes"]["reasoning_on_forced"]
    assert trained["label"] == "reasoning off" and "trace_stats" not in trained
    assert forced["label"] == "reasoning on (forced: model trained without traces)"
    stats = forced["trace_stats"]
    assert stats["n"] > 0 and 0.0 <= stats["closure_rate"] <= 1.0 and 0.0 <= stats["mean_trace_tokens"] <= 4
    assert stats["ms_per_trace"] > 0 and len(forced["example_traces"]) == 3
    assert out["metrics"]["reasoning_on_forced"]["reasoning"]["n"] == stats["n"]
    assert "| trained | reasoning off |" in out["table"]
    assert "| reasoning_on_forced | reasoning on (forced: model trained without traces) |" in out["table"]
    assert any(d["variant"] == "reasoning_on_forced" for d in out["deltas"])

    record = out["provenance"]["models"]["trained"]
    assert record["training"] == TRAINING and record["contract"]["trained_with_traces"] is False
    md = Path(out["paths"]["markdown"]).read_text()
    assert (
        f"- Model trained, reasoning_on_forced: {saved / 'model'}: stage pretrain, 12 steps, traces no, seed 0, "
        "ablation none; switches fusion on, fire on, reasoning off; contract reasoning off, trained with traces no"
    ) in md
    assert "- reasoning_on_forced trace: `" in md
    assert "No ablation model was evaluated" in md.split("## Ablations vs trained")[1]
    assert all(e["trace"] is None for e in json.loads(Path(out["paths"]["results"]).read_text())["examples"])


def test_examples_carry_the_trace_when_the_evaluated_model_reasons(saved):
    variants = {"trained": ModelEmbedFn(str(saved / "model"), reasoning=True)}
    cfg = EvalConfig(references=[], max_products=8, max_queries_per_task=2, example_queries=1, bootstrap_samples=50)
    out = evaluate(cfg, variants, saved, saved / "report-on", progress=False)
    assert out["modes"]["trained"]["label"] == "reasoning on (forced: model trained without traces)"
    examples = json.loads(Path(out["paths"]["results"]).read_text())["examples"]
    assert examples and all(isinstance(e["trace"], str) for e in examples)
    assert "<pre>trace: " in Path(out["paths"]["html"]).read_text()


def test_model_record_tolerates_a_model_without_training_record(tmp_path, saved):
    folder = tmp_path / "old"
    folder.mkdir()
    payload = json.loads((saved / "model" / CONTRACT_FILE).read_text())
    payload.pop("training")
    (folder / CONTRACT_FILE).write_text(json.dumps(payload))
    record = model_record(str(folder))
    assert record["training"] == {} and record["switches"] == {"fusion": True, "fire": True, "reasoning": False}
