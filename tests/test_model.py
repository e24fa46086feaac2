"""The moon3 model (issue 4): contract, fusion, FIRE, save/load, reasoning and direct embedding.

One tiny Qwen2.5-VL model per module (fixture); the other architectures run the same checks in
``test_same_code_path_on_every_architecture``. All real components: tiny random-weight backbones built from the
configs in ``moon3/model/tiny/``, a tokenizer trained on an mbe3-mini sample.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math

import pytest
import torch
from PIL import Image

from moon3.data.config import DataConfig
from moon3.data.mini import make_sample
from moon3.data.schema import read_dataset
from moon3.model import contract as C
from moon3.model.config import ModelConfig
from moon3.model.contract import ContractError, EmbeddingContract
from moon3.model.embedder import Moon3Embedder
from moon3.model.fire import FIRE
from moon3.model.items import catalog_texts, product_item, query_item

TRACE_BUDGET = 8
CFG = ModelConfig(max_trace_tokens=TRACE_BUDGET, embed_dim=64)


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    root = tmp_path_factory.mktemp("mini")
    make_sample(DataConfig(n_products=60, n_queries=60, seed=0), root, progress=False)
    return root


@pytest.fixture(scope="module")
def texts(sample):
    return catalog_texts(sample)


@pytest.fixture(scope="module")
def model(texts):
    torch.manual_seed(0)
    return Moon3Embedder.from_config(CFG, texts).eval()


@pytest.fixture(scope="module")
def items(sample):
    """Mixed modalities: product (image + text), text query, image query, image only, text only."""
    products, queries = read_dataset(sample)
    by_type = {t: queries[queries["query_type"] == t].iloc[0].to_dict() for t in ("text", "image", "multimodal")}
    product = products.iloc[0].to_dict()
    both = product_item(product, sample)
    return [
        both,
        query_item(by_type["text"], sample),
        query_item(by_type["image"], sample),
        query_item(by_type["multimodal"], sample),
        {"image": both["image"], "text": None},
        {"image": None, "text": both["text"]},
    ]


def _cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(a, b, dim=-1)


def test_output_shape_unit_norm_and_mixed_modalities(model, items):
    batch = model.prepare_batch(items)
    n_image_tokens = batch["image_mask"].sum(1).tolist()
    has_image = [it["image"] is not None for it in items]
    # 64 px, patch 8, 2x2 merge: 16 image tokens per image, none for text-only items.
    assert n_image_tokens == [16 if h else 0 for h in has_image]
    assert [bool(t) for t in batch["text_mask"].any(1).tolist()] == [it["text"] is not None for it in items]
    assert (batch["input_ids"][:, -1] == model.token_ids[C.EMB_TOKEN]).all()
    with torch.no_grad():
        out = model(batch)
    emb = out.embeddings
    assert emb.shape == (len(items), 64) and emb.dtype == torch.float32
    assert torch.allclose(emb.norm(dim=-1), torch.ones(len(items)), atol=1e-5)
    assert out.lm_loss is None
    gates = model.fusion.last_gates
    # A missing modality's gate is exactly 0; the gates are a distribution.
    assert torch.allclose(gates.sum(-1), torch.ones(len(items)))
    for g, it in zip(gates.tolist(), items, strict=True):
        assert (g[1] == 0.0) == (it["image"] is None)
        assert (g[2] == 0.0) == (it["text"] is None)
    # Padding does not leak: an item embedded alone equals the same item inside the mixed batch.
    for i in (1, 4):
        with torch.no_grad():
            alone = model(model.prepare_batch([items[i]])).embeddings[0]
        assert _cos(alone, emb[i]) > 0.9999


def test_item_without_image_or_text_is_rejected(model, items):
    with pytest.raises(ValueError, match="item 1: has neither an image nor a text"):
        model.prepare_batch([items[0], {"image": None, "text": "  "}])
    with pytest.raises(ValueError, match="product 'p9'"):
        product_item({"product_id": "p9", "title": None, "image": None, "attributes": {}}, None)


def test_control_tokens_in_user_text_stay_text(model):
    tricky = {"image": None, "text": f"red {C.EMB_TOKEN} {C.IMAGE_PAD} {C.THINK_END} shirt"}
    batch = model.prepare_batch([tricky])
    ids = batch["input_ids"][0]
    assert int((ids == model.token_ids[C.EMB_TOKEN]).sum()) == 1  # only the contract's own <emb>
    assert int(batch["image_mask"].sum()) == 0
    assert model.tokenizer.decode(ids[batch["text_mask"][0]]) == tricky["text"]


def test_gradients_reach_fusion_fire_and_projection(model, items):
    model.train()
    model.zero_grad()
    traces = ["category: plate; color: red", None, "color: blue</think>", "x", None, "pattern: dotted"]
    out = model(model.prepare_batch(items, traces))
    assert out.lm_loss is not None and 0 < out.lm_loss.item() < 20
    sim = out.embeddings @ out.embeddings.T / 0.05
    loss = torch.nn.functional.cross_entropy(sim, torch.arange(len(items))) + 0.1 * out.lm_loss
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if not n.startswith("backbone.")}
    for prefix in ("fusion.attn_v", "fusion.attn_t", "fusion.gate", "proj", "fire.mlps.0.2"):
        assert any(g is not None and g.abs().sum() > 0 for n, g in grads.items() if n.startswith(prefix)), prefix
    # At init (last MLP layer zero, alpha = 1) the last MLP layer learns at once (tanh(1) != 0); as soon as it
    # has moved, the gate and everything before it learn too. (alpha = 0 with a random MLP never opened.)
    assert grads["fire.alpha"].abs().sum() == 0
    with open_fire(model.fire):
        model.zero_grad()
        model(model.prepare_batch(items)).embeddings.sum().backward()
        for prefix in ("fire.project", "fire.mlps", "fire.norms", "fire.alpha"):
            assert any(g is not None and g.abs().sum() > 0 for n, g in _head_grads(model) if n.startswith(prefix))
    model.zero_grad()
    model.eval()


@contextlib.contextmanager
def open_fire(fire: FIRE, scale: float = 0.5):
    """Give FIRE's zero-initialised last MLP layers random weights for the duration (as training would)."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for mlp in fire.mlps:
            mlp[-1].weight.copy_(scale * torch.randn(mlp[-1].weight.shape, generator=generator))
    try:
        yield fire
    finally:
        with torch.no_grad():
            for mlp in fire.mlps:
                mlp[-1].weight.zero_()


def _head_grads(model):
    return [(n, p.grad) for n, p in model.named_parameters() if not n.startswith("backbone.")]


def _backbone_states(model, batch):
    inner = model.backbone.model
    pos, _ = inner.get_rope_index(
        batch["input_ids"],
        mm_token_type_ids=batch["mm_token_type_ids"],
        image_grid_thw=batch.get("image_grid_thw"),
        attention_mask=batch["attention_mask"],
    )
    with torch.no_grad():
        return inner(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            position_ids=pos,
            pixel_values=batch.get("pixel_values"),
            image_grid_thw=batch.get("image_grid_thw"),
            mm_token_type_ids=batch["mm_token_type_ids"],
        ).last_hidden_state


def check_fire(model: Moon3Embedder, items) -> None:
    """FIRE at zero init is exactly the plain backbone; opened, it changes states only from the image on."""
    batch = model.prepare_batch(items[:1])
    fire = model.fire
    with_hooks = _backbone_states(model, batch)
    fire.detach()
    plain = _backbone_states(model, batch)
    assert torch.equal(with_hooks, plain)
    fire.attach(model.backbone)
    assert fire.gate_values() == pytest.approx([math.tanh(1.0)] * len(fire.layers))
    with open_fire(fire):
        opened = _backbone_states(model, batch)
    first_image = int(batch["image_mask"][0].nonzero()[0])
    assert torch.equal(opened[0, :first_image], plain[0, :first_image])  # causal: nothing before the image moves
    assert not torch.allclose(opened[0, first_image:], plain[0, first_image:])
    # The fine features come back in image-token order (Qwen2.5-VL computes in window order): the tower's own
    # merger applied to FIRE's rows of the last block reproduces the tower's output.
    visual = model.backbone.model.visual
    probe = FIRE.for_backbone(model.backbone, vision_layer=len(visual.blocks) - 1).attach(model.backbone)
    try:
        with torch.no_grad():
            ref = visual(batch["pixel_values"], grid_thw=batch["image_grid_thw"]).pooler_output
            merged = visual.merger(probe._fine.reshape(-1, probe._fine.shape[-1] // probe.merge_unit))
    finally:
        probe.detach()
    assert torch.allclose(merged, ref, atol=1e-5)


def test_fire_zero_init_equals_plain_backbone(model, items):
    check_fire(model, items)
    assert model.fire.attached


def test_deepcopy_is_an_independent_model(model, items):
    """RL keeps a frozen reference with copy.deepcopy: its FIRE hooks must drive the copy's own weights."""
    ref = copy.deepcopy(model)
    assert ref.fire._visual is ref.backbone.model.visual
    with torch.no_grad():
        for mlp in ref.fire.mlps:
            mlp[-1].weight.fill_(0.1)
    try:
        moved, kept = ref.embed(items[:1], reasoning=False), model.embed(items[:1], reasoning=False)
        with torch.no_grad():
            plain = model(model.prepare_batch(items[:1])).embeddings
    finally:
        ref.fire.detach()
    assert torch.equal(kept, plain) and _cos(moved, kept).item() < 0.9999
    assert model.fire.attached


def test_save_load_embed_roundtrip_and_contract_check(model, items, tmp_path):
    saved = model.save_pretrained(tmp_path / "m")
    assert {p.name for p in saved.iterdir()} >= {"moon3_config.json", "moon3_heads.safetensors", "backbone"}
    assert (saved / "backbone" / "model.safetensors").exists() and (saved / "backbone" / "tokenizer.json").exists()
    loaded = Moon3Embedder.from_pretrained(saved)
    assert loaded.contract == model.contract
    for reasoning in (False, True):
        a = model.embed(items, reasoning=reasoning)
        b = loaded.embed(items, reasoning=reasoning)
        assert _cos(a, b).min() >= 0.999
    # The caller's expected contract is enforced field by field.
    other = dataclasses.replace(model.contract, embed_dim=128)
    with pytest.raises(ContractError, match="embed_dim: saved 64, expected 128"):
        Moon3Embedder.from_pretrained(saved, expected=other)
    # A file written under another template is refused, naming the field.
    cfg_file = saved / C.CONTRACT_FILE
    payload = json.loads(cfg_file.read_text())
    payload["contract"]["instruction"] = "Describe it."
    cfg_file.write_text(json.dumps(payload))
    with pytest.raises(ContractError, match="instruction"):
        Moon3Embedder.from_pretrained(saved)
    cfg_file.unlink()
    with pytest.raises(ContractError, match="not found"):
        Moon3Embedder.from_pretrained(saved)


def test_reasoning_embedding_is_the_teacher_forced_embedding(model, items):
    traces = model.generate_traces(items, return_ids=True)
    end = model.token_ids[C.THINK_END]
    assert len(traces) == len(items)
    assert all(len(t) <= TRACE_BUDGET for t in traces)
    special = set(model.tokenizer.get_added_vocab().values()) - {end}
    assert not any(set(t) & special for t in traces)  # generation never writes template/image tokens
    with torch.no_grad():
        forced = model(model.prepare_batch(items, traces)).embeddings
    served = model.embed(items, reasoning=True, batch_size=4)
    assert _cos(forced, served).min() > 0.9999
    direct = model.embed(items, reasoning=False)
    assert _cos(direct, served).max() < 0.9999  # the trace changes the embedding
    text_only = [items[1], items[5]]  # no image in the whole batch: text positions only
    with torch.no_grad():
        forced = model(model.prepare_batch(text_only, model.generate_traces(text_only, return_ids=True))).embeddings
    assert _cos(forced, model.embed(text_only, reasoning=True)).min() > 0.9999
    text = model.generate_traces(items[:2])
    assert all(isinstance(t, str) and C.IMAGE_PAD not in t for t in text)


def test_sampled_traces_for_rl(model, items):
    torch.manual_seed(1)
    traces = model.generate_traces(items[:2], do_sample=True, temperature=1.5, num_return_sequences=3)
    assert len(traces) == 6
    assert len(set(traces)) > 1  # sampling explores
    bodies = [C.split_trace(t) for t in traces]
    assert all(isinstance(b, str) and isinstance(closed, bool) for b, closed in bodies)


def test_determinism_for_a_seed(model, texts, items):
    again = Moon3Embedder.from_config(CFG, texts)
    assert torch.equal(model.embed(items, reasoning=False), again.embed(items, reasoning=False))
    other = Moon3Embedder.from_config(dataclasses.replace(CFG, seed=1), texts)
    assert _cos(model.embed(items, reasoning=False), other.embed(items, reasoning=False)).max() < 0.99


def test_off_switches(texts, items):
    cfg = dataclasses.replace(CFG, fusion=False, fire=False, reasoning=False)
    bare = Moon3Embedder.from_config(cfg, texts)
    assert bare.fusion is None and bare.fire is None
    assert not any(layer._forward_hooks for layer in bare.backbone.model.language_model.layers)
    assert not any(k.startswith(("fusion.", "fire.")) for k in bare.heads_state_dict())
    emb = bare.embed(items)  # contract default: reasoning off
    assert emb.shape == (len(items), 64)
    # Off = h_emb straight into the projection.
    batch = bare.prepare_batch(items)
    h = _backbone_states(bare, batch)[:, -1]
    expected = torch.nn.functional.normalize(bare.proj(h), dim=-1)
    assert torch.allclose(emb, expected.detach(), atol=1e-5)


@pytest.mark.parametrize("arch", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_same_code_path_on_every_architecture(arch, texts, items):
    m = Moon3Embedder.from_config(dataclasses.replace(CFG, tiny_arch=arch, max_trace_tokens=4), texts).eval()
    assert m.backbone.config.model_type == arch
    for reasoning in (False, True):
        emb = m.embed(items, reasoning=reasoning, batch_size=4)
        assert emb.shape == (len(items), 64)
        assert torch.allclose(emb.norm(dim=-1), torch.ones(len(items)), atol=1e-5)
    check_fire(m, items)


def test_contract_helpers():
    assert C.split_trace("<think>color: red</think>") == ("color: red", True)
    assert C.split_trace("color: re") == ("color: re", False)
    contract = EmbeddingContract.from_model_config(ModelConfig(embed_dim=32, max_trace_tokens=5))
    assert (contract.embed_dim, contract.max_trace_tokens) == (32, 5)
    kinds = [k for k, _ in C.prompt_segments(contract, has_image=True, text="red shirt")]
    assert kinds == [C.TEMPLATE, C.TEMPLATE, C.IMAGE, C.TEMPLATE, C.TEXT, C.TEMPLATE]
    assert [k for k, _ in C.prompt_segments(contract, has_image=False, text="x")] == [C.TEMPLATE, C.TEXT, C.TEMPLATE]


def test_images_of_any_size_and_mode(model):
    small = Image.new("L", (20, 31), 128)
    big = Image.new("RGBA", (300, 120), (10, 200, 30, 255))
    emb = model.embed([{"image": small, "text": None}, {"image": big, "text": "green"}], reasoning=False)
    assert emb.shape == (2, 64) and torch.isfinite(emb).all()
