"""Real-size backbones, checked without a GPU (issue 15): presets, mixed precision, ZeRO-2/3 save and reload,
new token rows, ``moon3 model plan`` against a hand count, and the Python part of ``bench/gpu.sh``."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import subprocess_env
from PIL import Image

from moon3.model import contract as C
from moon3.model.backbone import make_backbone_from_config, read_backbone_config, tiny_config_path, train_tokenizer
from moon3.model.config import ModelConfig
from moon3.model.embedder import Moon3Embedder
from moon3.model.items import catalog_texts, product_item
from moon3.model.presets import learning_rates, resolve
from moon3.train.config import TrainConfig

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
REAL = REPO / "moon3" / "model" / "real"


def _env(tmp_path: Path) -> dict[str, str]:
    return subprocess_env(tmp_path)


# --- moon3 model plan: the 3B numbers by hand ---------------------------------------------------------------------


def _hand_count_3b() -> dict[str, int]:
    """Qwen2.5-VL-3B from its public architecture numbers, one weight matrix at a time."""
    h, inter, layers, vocab, kv = 2048, 11008, 36, 151936, 2 * 128  # 2 key/value heads of width 128
    attn = (h * h + h) + 2 * (h * kv + kv) + h * h  # q (bias), k, v (bias), o (no bias)
    layer = attn + 3 * h * inter + 2 * h  # SwiGLU MLP, two RMSNorms
    decoder = vocab * h + layers * layer + h  # embeddings, layers, final norm; the LM head is tied
    w, vi, depth = 1280, 3420, 32
    block = 2 * w + (w * 3 * w + 3 * w) + (w * w + w) + 2 * (w * vi + vi) + (vi * w + w)
    merger = w + (4 * w * 4 * w + 4 * w) + (4 * w * h + h)  # RMSNorm, Linear(5120, 5120), Linear(5120, 2048)
    vision = 3 * 2 * 14 * 14 * w + depth * block + merger  # Conv3d patch embedding without bias
    mha = 3 * h * h + 3 * h + h * h + h
    fusion = 2 * mha + (3 * h * 3 + 3)
    fire_layers = 9  # every 4th of 36 (real preset)
    fire = (2 * 4 * w + 4 * w * h + h + h * h + h) + fire_layers * (2 * h + 2 * (h * h + h)) + fire_layers
    projection = h * 256 + 256
    return {"decoder": decoder, "vision": vision, "fusion": fusion, "fire": fire, "projection": projection}


def test_plan_3b_matches_hand_count():
    from moon3.model.plan import GIB, plan, render

    hand = _hand_count_3b()
    assert hand["decoder"] + hand["vision"] == 3_754_622_976  # the published "3.75B"
    p = plan(REAL / "qwen2_5_vl_3b.json", ModelConfig(reasoning=False), batch=16, hard_negatives=1, gpus=4)
    assert p.cfg.preset == "real" and p.requested_preset == "auto"
    assert p.parts["decoder"] == hand["decoder"] and p.parts["vision"] == hand["vision"]
    assert p.parts["lm_head"] == 0 and p.dims.tied
    assert p.heads == {"fusion": hand["fusion"], "fire": hand["fire"], "projection": hand["projection"],
                       "temperature": 1}  # fmt: skip
    assert p.fire_layers == list(range(3, 36, 4)) and p.fire_vision_layer == 15
    total = sum(hand.values()) + 1
    assert p.total == p.trainable == total
    # Image tokens (28 px each side): 448x448 px at most (16x16 = 256), 224x224 px at least (8x8 = 64), aspect kept
    # (600x800 is over the budget: scaled by sqrt(480000 / 200704), floored to 364x504 px = 13x18 = 234 tokens).
    assert [(n, px) for _, _, _, n, px in p.image_tokens] == [(256, 448 * 448), (234, 364 * 504), (64, 224 * 224)]
    # Memory per GPU, by the documented formulas: bf16 weights 2 bytes/param (ZeRO-3: / 4 GPUs), grads 2/4,
    # Adam 12/4; activations the same under both stages.
    m2, m3 = p.memory[2], p.memory[3]
    assert m2["weights"] == 2 * total and m3["weights"] == 2 * total / 4
    assert m2["gradients"] == m3["gradients"] == 2 * total / 4
    assert m2["adam"] == m3["adam"] == 12 * total / 4
    assert m2["activations"] == m3["activations"] > 0
    # Checkpointed activations of 48 sequences of 384 tokens: the decoder's layer inputs alone are 36*2*T*h bytes.
    tokens_per_step = 48 * (256 + 128)
    assert p.workload["seq_len"] == 384 and p.workload["sequences"] == 48
    assert p.workload["activations"]["decoder"] > 36 * 2 * tokens_per_step * 2048
    assert 25 * GIB < m3["total"] < m2["total"] < 45 * GIB
    text = render(p)
    assert "3,754,622,976" not in text  # the backbone alone is not a line; the total with the heads is
    assert f"{total:,}" in text and "tied" in text and "3, 7, ..., 35" in text


def test_plan_7b_and_readme_block():
    from moon3.model.plan import plan, render

    p7 = plan(REAL / "qwen2_5_vl_7b.json", ModelConfig(reasoning=False))
    assert p7.parts["vision"] + p7.parts["decoder"] + p7.parts["lm_head"] == 8_292_166_656  # published "8.29B"
    assert not p7.dims.tied and p7.fire_layers == list(range(3, 28, 4))
    # The README shows `moon3 model plan` for the 3B config with params.yaml's settings: it must be current.
    from moon3.config import load_config

    cfg = load_config(REPO / "params.yaml")
    p3 = plan(REAL / "qwen2_5_vl_3b.json", cfg.model, batch=cfg.train.batch_size,
              hard_negatives=cfg.train.hard_negatives_per_query)  # fmt: skip
    shown = render(p3).replace(str(REAL / "qwen2_5_vl_3b.json"), "moon3/model/real/qwen2_5_vl_3b.json")
    assert shown in (REPO / "README.md").read_text(), "README's `moon3 model plan` block is stale"


def test_plan_cli(tmp_path):
    cmd = [str(BIN / "moon3"), "model", "plan", "qwen2_5_vl_3b", "--params", str(REPO / "params.yaml"), "--gpus", "8",
           "--batch", "4", "--json"]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    payload = json.loads(result.stdout)
    assert payload["workload"]["gpus"] == 8 and payload["workload"]["sequences"] == 12
    assert payload["cfg"]["preset"] == "real" and payload["cfg"]["max_trace_tokens"] == 128
    bad = subprocess.run([str(BIN / "moon3"), "model", "plan", "no_such_model"], capture_output=True, text=True,
                         timeout=120)  # fmt: skip
    assert bad.returncode == 1 and "no such shipped config" in bad.stderr


# --- presets --------------------------------------------------------------------------------------------------


def _midsize_config(tmp_path: Path) -> Path:
    """The Qwen2.5-VL-3B layout (36 decoder layers, 32 vision blocks, windowed attention with full blocks 7, 15,
    23, 31, patch 14, 2x2 merge, tied embeddings) at small widths."""
    raw = read_backbone_config(REAL / "qwen2_5_vl_3b.json")
    raw.update(hidden_size=128, intermediate_size=256, num_attention_heads=2, num_key_value_heads=2, vocab_size=4096)
    raw["rope_scaling"] = {"type": "mrope", "mrope_section": [8, 12, 12]}  # sums to head_dim / 2 = 32
    raw["vision_config"].update(hidden_size=64, intermediate_size=128, num_heads=4, out_hidden_size=128)
    path = tmp_path / "qwen2_5_vl_midsize.json"
    path.write_text(json.dumps(raw))
    return path


def test_tiny_preset_keeps_todays_settings(mini_dataset):
    tiny = read_backbone_config(tiny_config_path("qwen2_5_vl"))
    cfg = resolve(ModelConfig(), tiny)
    assert cfg == dataclasses.replace(ModelConfig(), preset="tiny")  # nothing else moves
    assert learning_rates(TrainConfig(), "tiny") == {"backbone": 1e-3, "heads": 1e-3, "temperature": 1e-2}
    model = Moon3Embedder.from_config(ModelConfig(), catalog_texts(mini_dataset))
    assert model.cfg.preset == "tiny" and model.contract.image_size == 64 and not model.contract.keeps_aspect
    assert model.fire.layers == [0, 1] and model.contract.max_trace_tokens == 48
    wide = Image.new("RGB", (300, 100), "red")
    assert model.prepare_batch([{"image": wide}])["image_mask"].sum() == 16  # a 64 px square: 4x4 tokens


def test_midsize_model_gets_the_real_preset(mini_dataset, tmp_path):
    config = _midsize_config(tmp_path)
    model = Moon3Embedder.from_config(ModelConfig(backbone=str(config)), catalog_texts(mini_dataset))
    assert model.cfg.preset == "real"
    assert model.contract.max_trace_tokens == 128
    assert model.fire.layers == [3, 7, 11, 15, 19, 23, 27, 31, 35] and model.fire.vision_layer == 15
    assert (model.contract.image_min_pixels, model.contract.image_max_pixels) == (64 * 28 * 28, 256 * 28 * 28)
    assert learning_rates(TrainConfig(), model.cfg.preset)["backbone"] == 1e-5
    # Image tokens per product, aspect kept: a big square photo 256, a 600x800 one 13x18 = 234, a thumbnail 64.
    images = [Image.new("RGB", (1000, 1000), "red"), Image.new("RGB", (800, 600), "blue"),
              Image.new("RGB", (96, 96), "green")]  # fmt: skip
    for image, expected in zip(images, (256, 234, 64), strict=True):
        batch = model.prepare_batch([{"image": image, "text": "a red cup"}])
        assert int(batch["image_mask"].sum()) == expected
        grid = batch["image_grid_thw"][0]
        assert int(grid.prod()) // 4 == expected
        assert C.image_tokens(image.height, image.width, model.contract, 14, 2) == expected
    # A real forward through the real layer layout (window attention, FIRE at 9 layers), saved and reloaded.
    items = [{"image": images[1], "text": "a blue plate"}, {"text": "blue plate"}]
    embeddings = model.embed(items, reasoning=False)
    assert embeddings.dtype == torch.float32 and torch.allclose(embeddings.norm(dim=-1), torch.ones(2), atol=1e-5)
    model.save_pretrained(tmp_path / "saved")
    back = Moon3Embedder.from_pretrained(tmp_path / "saved")
    assert back.cfg == model.cfg and back.contract == model.contract and back.fire.layers == model.fire.layers
    assert torch.allclose(back.embed(items, reasoning=False), embeddings, atol=1e-5)
    # A key set by hand wins over the preset; `custom` takes every key as written.
    mine = resolve(ModelConfig(fire_every=2, max_trace_tokens=96), read_backbone_config(config))
    assert (mine.preset, mine.fire_every, mine.max_trace_tokens) == ("real", 2, 96)
    custom = resolve(ModelConfig(preset="custom"), read_backbone_config(config))
    assert (custom.fire_every, custom.max_trace_tokens, custom.image_max_pixels) == (1, 48, 0)
    forced = resolve(ModelConfig(preset="real"), read_backbone_config(tiny_config_path("qwen2_5_vl")))
    assert forced.max_trace_tokens == 128 and forced.image_max_pixels == 256 * 16 * 16  # tiny: 16 px per token


# --- mixed precision --------------------------------------------------------------------------------------------


def test_bf16_heads_and_autocast_give_float32_embeddings(mini_dataset):
    """DeepSpeed bf16 casts the whole module (heads included); autocast keeps fp32 weights. Both must run and
    return L2-normalised float32 embeddings close to the fp32 ones."""
    from moon3.data.schema import read_dataset

    model = Moon3Embedder.from_config(ModelConfig(), catalog_texts(mini_dataset))
    products, _ = read_dataset(mini_dataset)
    items = [product_item(r, mini_dataset) for _, r in products.head(4).iterrows()]
    reference = model.embed(items, reasoning=False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = model.embed(items, reasoning=False)
    assert next(model.parameters()).dtype == torch.float32
    model.to(torch.bfloat16)  # what DeepSpeed's bf16 mode does to the module
    cast = model.embed(items, reasoning=False)
    for out in (auto, cast):
        assert out.dtype == torch.float32
        assert torch.allclose(out.norm(dim=-1), torch.ones(4), atol=1e-5)
        assert (out * reference).sum(-1).min() > 0.99


def test_training_loads_fp32_master_weights_from_a_bf16_save(mini_dataset, tmp_path):
    model = Moon3Embedder.from_config(ModelConfig(), catalog_texts(mini_dataset))
    model.backbone.to(torch.bfloat16)
    model.save_pretrained(tmp_path / "bf16")
    assert Moon3Embedder.from_pretrained(tmp_path / "bf16").backbone.dtype == torch.bfloat16  # as saved
    train = Moon3Embedder.from_pretrained(tmp_path / "bf16", dtype=torch.float32)
    assert {p.dtype for p in train.parameters()} == {torch.float32}
    # A training probe describes the weights it was written with: a later save into the folder removes it.
    from moon3.train.contrastive import load_probe, save_probe

    save_probe(tmp_path / "bf16", torch.ones(2, 4), ["a", "b"])
    assert load_probe(tmp_path / "bf16")[1] == ["a", "b"]
    train.save_pretrained(tmp_path / "bf16")
    assert not (tmp_path / "bf16" / "training_probe.safetensors").exists()


# --- new token rows -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("padded_rows", [8, 0])
def test_new_token_rows_start_at_the_mean(mini_dataset, monkeypatch, padded_rows):
    """A real checkpoint's tokenizer lacks <think>, </think>, <emb>: they land on padded rows (or new ones) and
    start at the mean of the existing rows, input and (untied) output."""
    from moon3.model import backbone as B

    monkeypatch.setattr(B.C, "MOON3_TOKENS", ())
    tokenizer = train_tokenizer(catalog_texts(mini_dataset))
    monkeypatch.undo()
    assert C.EMB_TOKEN not in tokenizer.get_vocab()
    known = len(tokenizer)
    raw = read_backbone_config(tiny_config_path("qwen2_5_vl"))
    raw["text_config"]["vocab_size"] = known + padded_rows
    path = mini_dataset.parent / f"padded{padded_rows}.json"
    path.write_text(json.dumps(raw))
    model, _ = make_backbone_from_config(path, resolve(ModelConfig(), raw), [])
    with torch.no_grad():  # make the padded rows garbage, as in an untrained checkpoint region
        model.get_input_embeddings().weight[known:] = 100.0
        model.get_output_embeddings().weight[known:] = -100.0
    expected_in = model.get_input_embeddings().weight[:known].mean(0).clone()
    expected_out = model.get_output_embeddings().weight[:known].mean(0).clone()
    added = B.ensure_moon3_tokens(model, tokenizer)
    assert added == list(C.MOON3_TOKENS)
    ids = tokenizer.convert_tokens_to_ids(added)
    assert model.get_input_embeddings().weight.shape[0] == max(known + padded_rows, len(tokenizer))
    for i in ids:
        assert torch.allclose(model.get_input_embeddings().weight[i], expected_in, atol=1e-6)
        assert torch.allclose(model.get_output_embeddings().weight[i], expected_out, atol=1e-6)
    assert B.ensure_moon3_tokens(model, tokenizer) == []


# --- DeepSpeed ZeRO-2 / ZeRO-3 with bf16 on 2 CPU ranks -------------------------------------------------------------


@pytest.fixture(scope="module")
def ds_init_model(mini_dataset, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ds-init") / "init"
    torch.manual_seed(0)
    Moon3Embedder.from_config(ModelConfig(), catalog_texts(mini_dataset)).save_pretrained(path)
    return path


def _ds_config(stage: int, tmp_path: Path) -> Path:
    raw = json.loads((REPO / "infra" / "deepspeed" / f"zero{stage}.json").read_text())
    if stage == 3:
        # Partition every parameter, however small (the default keeps those under 100k whole on every rank, which
        # on a tiny model would hide code that reads a weight outside its module's forward).
        raw["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    path = tmp_path / f"zero{stage}.json"
    path.write_text(json.dumps(raw))
    return path


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_bf16_two_ranks_train_save_reload(mini_dataset, ds_init_model, tmp_path, stage):
    """bf16 on, 2 gloo ranks: train a few steps, run the held-out check (all ranks under ZeRO-3, without hanging),
    save one consolidated model, reload it: its embeddings match the trained model's (cosine >= 0.999)."""
    import shutil

    from moon3.data.schema import read_dataset
    from moon3.train.contrastive import load_probe

    out = tmp_path / f"zero{stage}"
    shutil.copytree(ds_init_model, out / "init")
    port = str(29541 + stage)
    cmd = [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", port, "-m", "moon3.cli", "train",
           "contrastive", "--params", str(REPO / "params.yaml"), "--data-dir", str(mini_dataset),
           "--out-dir", str(out), "--report-dir", str(out / "reports")]  # fmt: skip
    for item in ("train.traces_dir=", "train.heldout_queries=8", "train.batch_size=4", "train.steps=3",
                 "train.save_every=100", "train.num_workers=0", "train.precision=bf16", "train.mlflow_experiment=",
                 f"train.deepspeed_config={_ds_config(stage, tmp_path)}"):  # fmt: skip
        cmd += ["--set", item]
    result = subprocess.run(cmd, env=_env(tmp_path), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    summary = json.loads((out / "reports" / "train_metrics.json").read_text())
    assert summary["world_size"] == 2
    assert "heldout_text_recall_at_10" in summary and "heldout_text_recall_at_10_init" in summary
    assert summary["final_fire_gate_abs_mean"] > 0.1  # FIRE's gates gathered for logging under ZeRO-3 too

    trained, ids = load_probe(out / "final")
    model = Moon3Embedder.from_pretrained(out / "final")
    init = Moon3Embedder.from_pretrained(out / "init")
    assert model.backbone.dtype == torch.bfloat16  # the consolidated 16-bit weights
    products, _ = read_dataset(mini_dataset)
    rows = products.set_index("product_id").loc[ids].reset_index()
    reloaded = model.embed([product_item(r, mini_dataset) for _, r in rows.iterrows()], reasoning=False)
    cosine = (reloaded * trained).sum(-1)
    assert cosine.min() >= 0.999, cosine
    # Real weights, not ZeRO-3 placeholders, and trained: every tensor has its full shape, and they moved.
    a, b = init.state_dict(), model.state_dict()
    assert all(a[k].shape == b[k].shape for k in a)
    assert any(not torch.equal(a[k].to(b[k].dtype), b[k]) for k in a if k.startswith("backbone."))
    assert not torch.equal(a["proj.weight"], b["proj.weight"])


# --- bench/gpu.sh's Python part on the CPU -----------------------------------------------------------------------


@pytest.mark.slow
def test_gpu_bench_python_part_runs_on_cpu_with_a_tiny_config(mini_dataset, tmp_path):
    tiny = str(tiny_config_path("qwen2_5_vl"))
    env = _env(tmp_path)
    train = subprocess.run(
        [str(BIN / "python"), "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1", "-m",
         "bench.bench_gpu", "train", "--config", tiny, "--data", str(mini_dataset), "--batch", "2", "--steps", "2",
         "--warmup", "1", "--workers", "0", "--out", str(tmp_path / "run" / "train.json")],
        env=env, cwd=REPO, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert train.returncode == 0, train.stderr[-4000:]
    result = json.loads((tmp_path / "run" / "train.json").read_text())
    assert result["bf16"] and result["gradient_checkpointing"] and result["zero"] == 2 and result["preset"] == "tiny"
    assert result["pairs_per_second"] > 0 and result["model_tflops_per_pair"] > 0 and result["mfu"] is None
    embed = subprocess.run(
        [str(BIN / "python"), "-m", "bench.bench_gpu", "embed", "--config", tiny, "--data", str(mini_dataset),
         "--items", "4", "--batch", "4", "--out", str(tmp_path / "run" / "embed.json")],
        env=env, cwd=REPO, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert embed.returncode == 0, embed.stderr[-4000:]
    result = json.loads((tmp_path / "run" / "embed.json").read_text())
    assert result["reasoning_off"]["embeddings_per_second"] > 0
    assert result["reasoning_on"]["mean_trace_tokens"] <= 48
    report = subprocess.run([str(BIN / "python"), "-m", "bench.bench_gpu", "report", str(tmp_path / "run")],
                            cwd=REPO, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert report.returncode == 0 and "| qwen2_5_vl (cpu) | 1 | 2 |" in report.stdout
