"""The ``hf`` trace teacher (issue 11) on a real tiny Qwen2.5-VL folder: batching, left padding, cache, config.

The folder is built offline like every tiny backbone (random weights, tokenizer trained on an mbe3-mini sample)
and saved as a plain HF image-text-to-text folder. An untrained model writes gibberish and may write nothing:
the tests check the mechanics (every item ends answered or failed, batches really form, a padded batch answers
like a lone item, the cache spares the model), not the quality of the traces.
"""

from __future__ import annotations

import dataclasses
from collections import Counter

import pytest

from moon3.config import load_config
from moon3.model.backbone import make_tiny_backbone, quiet_hf
from moon3.model.config import ModelConfig
from moon3.model.contract import EmbeddingContract, save_contract
from moon3.model.items import catalog_texts
from moon3.synthesis.cache import TraceCache
from moon3.synthesis.client import FAILED, OK, run_teacher_sync
from moon3.synthesis.hf_teacher import HFTeacher, model_label
from moon3.synthesis.synthesize import build_items, make_teacher
from moon3.synthesis.teacher import PRODUCT, QUERY

CFG = ModelConfig()
MAX_NEW = 12
FAST = dict(timeout_s=60.0, max_retries=0, progress=False)


@pytest.fixture(scope="module")
def tiny_folder(mini_dataset, tmp_path_factory):
    """A tiny Qwen2.5-VL folder with the moon3 contract file that gives its image side."""
    folder = tmp_path_factory.mktemp("hf-teacher") / "tiny-qwen2_5_vl"
    model, processor = make_tiny_backbone(CFG, catalog_texts(mini_dataset))
    with quiet_hf():
        model.save_pretrained(folder)
        processor.save_pretrained(folder)
    save_contract(folder, EmbeddingContract(image_size=CFG.image_size))
    return folder


@pytest.fixture(scope="module")
def items(mini_dataset):
    """Products (image + text), text queries, image queries, multimodal queries, and an item whose image is gone:
    prompts of very different lengths, so a batch of them is left-padded."""
    by_kind: dict[tuple, list] = {}
    for item in build_items(mini_dataset):
        by_kind.setdefault((item.kind, item.image is not None, item.text is not None), []).append(item)
    picked = [
        *by_kind[(PRODUCT, True, True)][:3],
        *by_kind[(QUERY, False, True)][:2],
        *by_kind[(QUERY, True, False)][:2],
        *by_kind[(QUERY, True, True)][:1],
    ]
    broken = dataclasses.replace(picked[0], item_id="broken", image="images/products/missing.png")
    return [*picked[:4], broken, *picked[4:]]


def counting(teacher: HFTeacher, monkeypatch) -> list[list[int]]:
    """Load the teacher's model and record each ``generate`` call's per-row prompt lengths (pads excluded)."""
    model, _ = teacher.load()
    calls: list[list[int]] = []
    real = model.generate

    def generate(*args, **kwargs):
        calls.append(kwargs["attention_mask"].sum(1).tolist())
        return real(*args, **kwargs)

    monkeypatch.setattr(model, "generate", generate)
    return calls


@pytest.fixture(scope="module")
def batched(tiny_folder, items, tmp_path_factory):
    """One run over ``items`` at concurrency 4, batch size 4, into a fresh cache; its outcomes and generate calls."""
    teacher = HFTeacher(str(tiny_folder), batch_size=4, device="cpu", max_new_tokens=MAX_NEW)
    with pytest.MonkeyPatch.context() as mp:
        calls = counting(teacher, mp)
        cache = TraceCache(tmp_path_factory.mktemp("hf-cache") / "cache.sqlite")
        outcomes = run_teacher_sync(items, teacher, cache=cache, concurrency=4, **FAST)
    return teacher, cache, outcomes, calls


def test_every_item_answered_or_failed_in_real_batches(batched, items):
    teacher, _, outcomes, calls = batched
    assert teacher.image_size == CFG.image_size  # from the folder's moon3_config.json
    assert [o.item_id for o in outcomes] == [it.item_id for it in items]
    counts = Counter(o.status for o in outcomes)
    assert counts[OK] + counts[FAILED] == len(items)
    for o in outcomes:
        if o.status == OK:
            assert isinstance(o.trace, str) and o.trace == o.trace.strip() and o.trace
            assert (o.teacher, o.model, o.attempts, o.cached) == ("hf", "tiny-qwen2_5_vl", 1, False)
        elif o.item_id == "broken":
            assert o.error.startswith("image 'images/products/missing.png'"), o.error
        else:
            assert o.error == "empty answer", o.error
    assert dict(zip([o.item_id for o in outcomes], [o.status for o in outcomes], strict=True))["broken"] == FAILED
    assert counts[OK] >= 1
    # Batching happened: fewer generate calls than items, a full batch of 4, every readable item generated once.
    assert len(calls) < len(items)
    assert max(len(c) for c in calls) == 4
    assert sum(len(c) for c in calls) == len(items) - 1
    # ... and batches mixed prompt lengths, so rows were left-padded.
    assert any(len(set(c)) > 1 for c in calls)


def test_greedy_answers_do_not_depend_on_the_batch(batched, tiny_folder, items, monkeypatch):
    """Each item alone (batch size 1, no padding) answers exactly as inside the left-padded batches."""
    _, _, together, _ = batched
    teacher = HFTeacher(str(tiny_folder), batch_size=1, device="cpu", max_new_tokens=MAX_NEW)
    calls = counting(teacher, monkeypatch)
    alone = run_teacher_sync(items, teacher, concurrency=4, **FAST)
    assert len(calls) == len(items) - 1 and all(len(c) == 1 for c in calls)
    assert [(o.status, o.trace, o.error) for o in alone] == [(o.status, o.trace, o.error) for o in together]


def test_seeded_sampling_repeats_and_decoding_is_in_the_key(tiny_folder, items):
    greedy = HFTeacher(str(tiny_folder), device="cpu", max_new_tokens=MAX_NEW)
    sampled = HFTeacher(str(tiny_folder), device="cpu", temperature=1.0, max_new_tokens=MAX_NEW, seed=3)
    assert sampled.decoding == {"temperature": 1.0, "max_new_tokens": MAX_NEW, "seed": 3}
    assert TraceCache.key_for(items[0], greedy) != TraceCache.key_for(items[0], sampled)
    batch = [it for it in items if it.item_id != "broken"][:4]
    assert sampled.generate(batch) == sampled.generate(batch)


def test_cache_hit_makes_no_generate_call(batched, tiny_folder, items, monkeypatch):
    teacher, cache, first, _ = batched
    answered = [it for it, o in zip(items, first, strict=True) if o.status == OK]
    calls = counting(teacher, monkeypatch)
    again = run_teacher_sync(answered, teacher, cache=cache, concurrency=4, **FAST)
    assert calls == []
    assert all(o.cached and o.attempts == 0 for o in again)
    assert [o.trace for o in again] == [o.trace for o in first if o.status == OK]
    # A fresh teacher on the same folder finds everything cached and never loads the weights.
    fresh = HFTeacher(str(tiny_folder), batch_size=4, device="cpu", max_new_tokens=MAX_NEW)
    assert all(o.cached for o in run_teacher_sync(answered, fresh, cache=cache, concurrency=4, **FAST))
    assert fresh.backbone is None


def test_make_teacher_hf(tiny_folder):
    with pytest.raises(ValueError, match=r"synthesis\.hf_model"):
        make_teacher(load_config(None, ["synthesis.teacher=hf"]))
    sets = ["synthesis.teacher=hf", f"synthesis.hf_model={tiny_folder}", "synthesis.hf_batch_size=2"]
    teacher = make_teacher(load_config(None, [*sets, "synthesis.temperature=0", "synthesis.max_tokens=9"]))
    assert isinstance(teacher, HFTeacher) and teacher.name == "hf" and teacher.batch_size == 2
    assert teacher.decoding == {"temperature": 0.0, "max_new_tokens": 9, "seed": 0}
    assert teacher.trust_remote_code is False and teacher.backbone is None  # nothing loaded until needed


def test_model_label_keeps_no_credentials():
    assert model_label("gs://bucket/models/qwen?X-Goog-Signature=abc#frag") == "gs://bucket/models/qwen"
    assert model_label("https://user:secret@host.example/m/") == "https://host.example/m"
    assert model_label("/models/Qwen2.5-VL-7B-Instruct/") == "Qwen2.5-VL-7B-Instruct"
