"""``moon3 model plan``: what a backbone costs before any weight exists (parameters, memory, image tokens, FLOPs).

The model is built on PyTorch's ``meta`` device from a config JSON (``moon3/model/real/qwen2_5_vl_3b.json``,
``qwen2_5_vl_7b.json``, a tiny one, or any HF Qwen-VL ``config.json``): every shape is real, no memory is used.
The moon3 heads (fusion, FIRE at the preset's layers, projection, temperature) are built the same way.

**Memory per GPU** (bf16 mixed precision with AdamW under DeepSpeed; Psi = all parameters, Psi_t = trainable ones,
N = GPUs; the ZeRO paper's accounting, Rajbhandari et al. 2020, with K = 12)::

    weights    ZeRO-2: 2 Psi           ZeRO-3: 2 Psi / N       (bf16 copies the forward uses)
    gradients  ZeRO-2: 2 Psi_t / N     ZeRO-3: 2 Psi_t / N     (bf16, reduce-scattered to their owner)
    Adam       12 Psi_t / N (both)                              (fp32 master weights + m + v)
    buffers    ZeRO-2: 2 (reduce_bucket_size + allgather_bucket_size)   ZeRO-3: 2 (largest module +
               stage3_prefetch_bucket_size), from infra/deepspeed/zero{2,3}.json
    activations (the same under both stages; bf16, flash/SDPA attention, so no sequence^2 term):
        per decoder layer and token: 6h + 2kv + 4I values (norm inputs/outputs, q/k/v, attention output,
        the SwiGLU's gate, up, activation and product), kv = key/value width, I = MLP width;
        per vision block and patch: 8w + 4I_v (SwiGLU tower; 8w + 2I_v with a GELU MLP);
        gradient checkpointing keeps each layer's input (h per token per layer, w per patch per block) and
        one layer's full set plus its gradient during recomputation; without it every layer's full set;
        with traces, the LM head's logits at the trace tokens: 10 V bytes per token (bf16 logits, fp32
        log-softmax and its gradient).

Not counted: CUDA context and allocator fragmentation (~1-3 GiB), the optimizer step's transient fp32 gradient
partition (4 Psi_t / N), FIRE's and the fusion head's own activations (under 1% here). Read the totals as
+-25% estimates; ``bench/gpu.sh`` measures the real peak.

**Training FLOPs** (for MFU, the PaLM convention: model FLOPs, gradient-checkpointing recomputation not
counted): 6 x matmul parameters x the tokens they apply to (decoder layers per text token, vision blocks per
patch, the merger per image token, fusion's key/value projections per token, FIRE per image token and FIRE
layer, the LM head per trace token) + attention 12 h S per token per layer (decoder, S = sequence length;
vision: S = the image's patches in full-attention blocks, the window's patches in windowed ones).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from moon3.model import contract as C
from moon3.model.config import ModelConfig

REPO = Path(__file__).resolve().parents[2]
REAL_DIR = Path(__file__).parent / "real"
# The bucket sizes of infra/deepspeed/zero{2,3}.json, used when the file is not at hand (an installed package).
DS_BUCKETS = {2: {"reduce_bucket_size": 5e7, "allgather_bucket_size": 5e7}, 3: {"stage3_prefetch_bucket_size": 5e7}}
GIB = 2**30
# bf16 dense peak TFLOP/s per GPU, for MFU (vendor datasheets; sparse numbers are twice these).
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "L40": 181.0, "L4": 121.0,
                    "A10": 125.0}  # fmt: skip


@dataclass(frozen=True)
class Dims:
    """Shapes of a backbone that the memory and FLOP formulas need (read from the built model)."""

    layers: int
    hidden: int
    kv: int
    intermediate: int
    vocab: int
    tied: bool
    vision_depth: int
    vision_width: int
    vision_intermediate: int
    vision_swiglu: bool
    patch: int
    merge: int
    window_patches: int  # patches per attention window in windowed blocks (0: every block attends to all)
    full_blocks: int  # vision blocks with full attention
    decoder_matmul: int  # 2-D weights of the decoder layers (no embeddings, no LM head)
    vision_block_matmul: int  # 2-D weights of the vision blocks
    merger_matmul: int
    patch_embed: int

    @property
    def factor(self) -> int:
        """Pixels per image-token side."""
        return self.patch * self.merge


@dataclass
class Plan:
    """Everything ``moon3 model plan`` prints (see :func:`render`)."""

    config: str
    model_type: str
    cfg: ModelConfig  # preset-resolved
    requested_preset: str
    dims: Dims
    parts: dict[str, int]
    heads: dict[str, int]
    fire_layers: list[int]
    fire_vision_layer: int
    trainable: int
    total: int
    image_tokens: list[tuple[str, int, int, int, int]]  # (label, h, w, tokens, resized side product)
    workload: dict[str, Any]
    memory: dict[int, dict[str, float]] = field(default_factory=dict)
    flops_per_pair: float = 0.0


def _matmul_params(module: nn.Module | None) -> int:
    if module is None:
        return 0
    return sum(p.numel() for p in module.parameters() if p.ndim >= 2)


def _count(module: nn.Module | None) -> int:
    return 0 if module is None else sum(p.numel() for p in module.parameters())


def build_meta(config_path: str | Path, cfg: ModelConfig):
    """The backbone and the moon3 heads on the meta device, with the preset resolved against the config.

    Returns:
        ``(backbone, heads, resolved cfg, raw config)``; ``heads`` maps ``fusion``, ``fire``, ``projection``,
        ``temperature`` to modules (None when switched off).
    """
    from transformers import AutoModelForImageTextToText

    from moon3.model.backbone import TINY_VOCAB_SIZE, hf_config, read_backbone_config
    from moon3.model.fire import FIRE
    from moon3.model.fusion import ModalityFusion
    from moon3.model.presets import resolve
    from moon3.train.loss import LearnableTemperature

    raw = read_backbone_config(config_path)
    cfg = resolve(dataclasses.replace(cfg, backbone=str(config_path)), raw)
    # A config without a vocabulary (the tiny ones) gets the tiny tokenizer's base size; a real one keeps its own.
    vocab = {} if raw.get("text_config", raw).get("vocab_size") else {"vocab_size": TINY_VOCAB_SIZE}
    with torch.device("meta"):
        backbone = AutoModelForImageTextToText.from_config(hf_config(raw, **vocab))
        hidden = backbone.config.text_config.hidden_size
        heads = {
            "fusion": ModalityFusion(hidden, cfg.fusion_heads) if cfg.fusion else None,
            "fire": FIRE.for_backbone(backbone, cfg.fire_every, cfg.fire_vision_layer) if cfg.fire else None,
            "projection": nn.Linear(hidden, cfg.embed_dim),
            "temperature": LearnableTemperature(),
        }
    return backbone, heads, cfg, raw


def dims_of(backbone: nn.Module) -> Dims:
    """:class:`Dims` of a built (meta or real) Qwen-VL backbone."""
    from moon3.model.fire import vision_width

    config = backbone.config
    text = config.text_config
    inner = backbone.model
    visual, layers = inner.visual, inner.language_model.layers
    attn = layers[0].self_attn
    block = visual.blocks[0]
    linears = [m for m in block.mlp.modules() if isinstance(m, nn.Linear)]
    width = vision_width(visual)
    window = getattr(visual, "window_size", 0) or 0
    full = list(getattr(visual, "fullatt_block_indexes", []) or [])
    patch = config.vision_config.patch_size
    head = backbone.get_output_embeddings()
    return Dims(
        layers=len(layers),
        hidden=text.hidden_size,
        kv=attn.k_proj.weight.shape[0],
        intermediate=layers[0].mlp.gate_proj.weight.shape[0],
        vocab=backbone.get_input_embeddings().weight.shape[0],
        tied=head is not None and head.weight is backbone.get_input_embeddings().weight,
        vision_depth=len(visual.blocks),
        vision_width=width,
        vision_intermediate=max(m.out_features for m in linears if m.in_features == width),
        vision_swiglu=hasattr(block.mlp, "gate_proj"),
        patch=patch,
        merge=visual.spatial_merge_size,
        window_patches=(window // patch) ** 2 if window else 0,
        full_blocks=len(full) if window else len(visual.blocks),
        decoder_matmul=_matmul_params(layers),
        vision_block_matmul=_matmul_params(visual.blocks),
        merger_matmul=_matmul_params(visual.merger) + _matmul_params(getattr(visual, "deepstack_merger_list", None)),
        patch_embed=_count(visual.patch_embed),
    )


def train_flops(
    dims: Dims,
    seq_lens: list[int],
    image_patches: list[int],
    trace_tokens: int = 0,
    fire_layers: int = 0,
    fusion: bool = True,
) -> float:
    """Model FLOPs of one training step (forward + backward) over sequences and images (module docstring).

    Args:
        dims: the backbone.
        seq_lens: tokens of each sequence (image tokens included).
        image_patches: vision patches of each image (4 per image token on Qwen-VL).
        trace_tokens: tokens the LM head scores (trace SFT).
        fire_layers: decoder layers with FIRE.
        fusion: whether the fusion head runs.
    """
    h, w = dims.hidden, dims.vision_width
    tokens = sum(seq_lens)
    flops = 6 * dims.decoder_matmul * tokens + sum(12 * dims.layers * h * s * s for s in seq_lens)
    patches = sum(image_patches)
    image_tokens = patches // (dims.merge**2)
    flops += 6 * dims.vision_block_matmul * patches
    flops += 6 * dims.patch_embed * patches + 6 * dims.merger_matmul * image_tokens
    windowed = dims.vision_depth - dims.full_blocks
    for p in image_patches:
        flops += 12 * w * p * (p * dims.full_blocks + min(p, dims.window_patches or p) * windowed)
    if fusion:
        flops += 6 * 2 * (2 * h * h) * tokens  # two attention read-outs: key and value projections per token
    if fire_layers:
        flops += 6 * image_tokens * (fire_layers * 2 * h * h + dims.merge**2 * w * h + h * h)
    flops += 6 * h * dims.vocab * trace_tokens
    return float(flops)


def activation_bytes(
    dims: Dims, tokens: int, patches: int, checkpointing: bool = True, trace_tokens: int = 0
) -> dict[str, float]:
    """Activation memory of one micro-step on one GPU (module docstring): ``decoder``, ``vision``, ``logits``."""
    h, w = dims.hidden, dims.vision_width
    dec_layer = 2 * tokens * (6 * h + 2 * dims.kv + 4 * dims.intermediate)
    vis_per_patch = 8 * w + (4 if dims.vision_swiglu else 2) * dims.vision_intermediate
    vis_layer = 2 * patches * vis_per_patch
    if checkpointing:
        decoder = dims.layers * 2 * tokens * h + 2 * dec_layer
        vision = dims.vision_depth * 2 * patches * w + 2 * vis_layer
    else:
        decoder = dims.layers * dec_layer
        vision = dims.vision_depth * vis_layer
    return {"decoder": float(decoder), "vision": float(vision), "logits": float(10 * dims.vocab * trace_tokens)}


def memory_per_gpu(
    total: int, trainable: int, largest_module: int, gpus: int, stage: int, activations: float
) -> dict[str, float]:
    """Bytes per GPU under ZeRO ``stage`` (2 or 3) for bf16 + AdamW (module docstring)."""
    ds = dict(DS_BUCKETS[stage])
    for folder in (Path.cwd(), REPO):  # the repo's (or $MOON3_HOME's) config when there is one
        path = folder / "infra" / "deepspeed" / f"zero{stage}.json"
        if path.exists():
            ds = json.loads(path.read_text())["zero_optimization"]
            break
    if stage == 2:
        weights = 2 * total
        buffers = 2 * (ds.get("reduce_bucket_size", 5e8) + ds.get("allgather_bucket_size", 5e8))
    else:
        weights = 2 * total / gpus
        buffers = 2 * (largest_module + ds.get("stage3_prefetch_bucket_size", 5e7))
    out = {
        "weights": float(weights),
        "gradients": 2 * trainable / gpus,
        "adam": 12 * trainable / gpus,
        "buffers": float(buffers),
        "activations": float(activations),
    }
    out["total"] = sum(out.values())
    return out


def plan(
    config_path: str | Path,
    cfg: ModelConfig | None = None,
    batch: int = 16,
    hard_negatives: int = 1,
    seq_len: int = 0,
    gpus: int = 4,
    reasoning: bool | None = None,
    checkpointing: bool = True,
) -> Plan:
    """Build on the meta device and work out parameters, image tokens, memory per GPU and FLOPs.

    Args:
        config_path: backbone config JSON.
        cfg: the ``model`` section (preset, switches); default: the dataclass defaults with ``preset: auto``.
        batch: query/product pairs per GPU per micro-step (``train.batch_size``); each pair brings
            ``2 + hard_negatives`` sequences (query, positive, hard negatives), all assumed to carry an image.
        hard_negatives: ``train.hard_negatives_per_query``.
        seq_len: tokens per sequence; 0 = image tokens of a square photo + 128 (template, title, attributes)
            + the trace budget when reasoning.
        gpus: data-parallel GPUs (ZeRO partitions over them).
        reasoning: trace SFT on (the LM head trains and scores the trace tokens); default ``cfg.reasoning``.
        checkpointing: gradient checkpointing for the activation estimate.
    """
    cfg = cfg or ModelConfig()
    requested = cfg.preset
    backbone, heads, resolved, raw = build_meta(config_path, cfg)
    dims = dims_of(backbone)
    reasoning = resolved.reasoning if reasoning is None else reasoning
    inner = backbone.model
    parts = {
        "vision": _count(inner.visual),
        "decoder": _count(inner.language_model),
        "embeddings": _count(backbone.get_input_embeddings()),
        "lm_head": 0 if dims.tied else _count(backbone.get_output_embeddings()),
    }
    head_counts = {name: _count(module) for name, module in heads.items()}
    total = parts["vision"] + parts["decoder"] + parts["lm_head"] + sum(head_counts.values())
    # Without traces an untied LM head gets no gradient and is frozen (moon3.train.contrastive).
    trainable = total - (parts["lm_head"] if not reasoning else 0)
    contract = C.EmbeddingContract.from_model_config(resolved)
    tokens = lambda h, w: C.image_tokens(h, w, contract, dims.patch, dims.merge)  # noqa: E731
    images = []
    for label, h, w in (("square photo, 1000x1000", 1000, 1000), ("4:3 photo, 600x800", 600, 800),
                        ("thumbnail, 96x96", 96, 96)):  # fmt: skip
        n = tokens(h, w)
        images.append((label, h, w, n, n * dims.factor**2))
    square_tokens = images[0][3]
    budget = resolved.max_trace_tokens if reasoning else 0
    seq = seq_len or square_tokens + 128 + budget
    sequences = batch * (2 + hard_negatives)
    patches = sequences * square_tokens * dims.merge**2
    # Trace SFT: trace_dropout (0.5) of the items carry a trace; count them all for an upper bound.
    trace_tokens = sequences * budget
    acts = activation_bytes(dims, sequences * seq, patches, checkpointing, trace_tokens)
    largest = max(
        sum(p.numel() for p in m.parameters(recurse=False)) for m in [backbone, *filter(None, heads.values())]
        for m in m.modules()
    )  # fmt: skip
    memory = {stage: memory_per_gpu(total, trainable, largest, gpus, stage, sum(acts.values())) for stage in (2, 3)}
    fire = heads["fire"]
    per_sequence = train_flops(
        dims, [seq], [square_tokens * dims.merge**2], budget, len(fire.layers) if fire else 0, resolved.fusion
    )
    workload = {
        "gpus": gpus,
        "batch": batch,
        "hard_negatives": hard_negatives,
        "sequences": sequences,
        "seq_len": seq,
        "image_tokens": square_tokens,
        "patches": patches,
        "trace_tokens": trace_tokens,
        "reasoning": reasoning,
        "checkpointing": checkpointing,
        "activations": acts,
    }
    shown = Path(config_path).resolve()
    return Plan(
        config=str(shown.relative_to(REPO)) if shown.is_relative_to(REPO) else str(config_path),
        model_type=raw["model_type"],
        cfg=resolved,
        requested_preset=requested,
        dims=dims,
        parts=parts,
        heads=head_counts,
        fire_layers=list(fire.layers) if fire else [],
        fire_vision_layer=fire.vision_layer if fire else -1,
        trainable=trainable,
        total=total,
        image_tokens=images,
        workload=workload,
        memory=memory,
        flops_per_pair=per_sequence * (2 + hard_negatives),
    )


def _layers(layers: list[int]) -> str:
    if len(layers) <= 4:
        return ", ".join(map(str, layers))
    return f"{layers[0]}, {layers[1]}, ..., {layers[-1]}"


def render(p: Plan) -> str:
    """The plan as the text ``moon3 model plan`` prints."""
    from moon3.model.presets import PRESETS, learning_rates
    from moon3.train.config import TrainConfig

    d, cfg, w = p.dims, p.cfg, p.workload
    gib = lambda n: f"{n / GIB:8.2f}"  # noqa: E731
    row = lambda label, n, size=True: f"  {label:50}{n:>15,}" + (f"  {gib(2 * n)}" if size else "")  # noqa: E731
    how = p.requested_preset + (f" -> {cfg.preset}" if p.requested_preset != cfg.preset else "")
    lines = [f"moon3 model plan: {p.config} ({p.model_type}), preset {how}", ""]
    lines.append(f"{'parameters':52}{'count':>15}  {'bf16 GiB':>8}")
    lines.append(row(f"vision tower ({d.vision_depth} blocks, width {d.vision_width})", p.parts["vision"]))
    lines.append(row(f"decoder ({d.layers} layers, width {d.hidden})", p.parts["decoder"]))
    lines.append(row(f"  of which input embeddings ({d.vocab:,} rows)", p.parts["embeddings"]))
    lines.append(row("lm head" + (" (tied: shares the input embeddings)" if d.tied else ""), p.parts["lm_head"]))
    lines.append(row("moon3 heads", sum(p.heads.values())))
    fire = f"FIRE ({len(p.fire_layers)} layers: {_layers(p.fire_layers)}; vision block {p.fire_vision_layer})"
    labels = {"fusion": f"fusion ({cfg.fusion_heads} heads)", "fire": fire,
              "projection": f"projection ({d.hidden} -> {cfg.embed_dim})", "temperature": "temperature"}  # fmt: skip
    lines += [row("  " + label, p.heads[name], size=False) for name, label in labels.items() if p.heads.get(name)]
    lines.append(row("total", p.total))
    lines.append(row("trainable", p.trainable, size=False))
    lrs = learning_rates(TrainConfig(), cfg.preset)
    preset = PRESETS.get(cfg.preset)
    if cfg.image_max_pixels:
        images = f"aspect ratio kept, {cfg.image_min_pixels:,}..{cfg.image_max_pixels:,} px"
        if preset and preset.min_image_tokens:
            images += f" ({preset.min_image_tokens}..{preset.max_image_tokens} image tokens)"
    else:
        images = f"{cfg.image_size} px squares"
    fire_at = "every decoder layer" if cfg.fire_every == 1 else f"every {cfg.fire_every}th decoder layer"
    lines += [
        "",
        f"preset {cfg.preset}: images {images}; trace budget {cfg.max_trace_tokens} tokens;",
        f"  FIRE at {fire_at}; lr backbone {lrs['backbone']:g}, heads {lrs['heads']:g}, "
        f"temperature {lrs['temperature']:g};",
        "  bf16 compute on GPU (autocast, or DeepSpeed's bf16), fp32 master weights",
        "",
        f"image tokens per product (patch {d.patch} x merge {d.merge} = {d.factor} px per token side):",
    ]
    lines += [f"  {label:30}{n:6d} tokens  ({px:,} px after resizing)" for label, _, _, n, px in p.image_tokens]
    lines += [
        "",
        f"memory per GPU: {w['gpus']} GPUs, {w['batch']} pairs/GPU x {2 + w['hard_negatives']} sequences = "
        f"{w['sequences']} sequences of {w['seq_len']} tokens",
        f"  ({w['image_tokens']} image tokens each), reasoning {'on' if w['reasoning'] else 'off'}, bf16 + AdamW, "
        f"gradient checkpointing {'on' if w['checkpointing'] else 'off'}",
        f"  {'GiB':50}{'ZeRO-2':>8}  {'ZeRO-3':>8}",
    ]
    names = {
        "weights": "weights (bf16)",
        "gradients": "gradients (bf16, partitioned)",
        "adam": "Adam: fp32 master + m + v (partitioned)",
        "buffers": "communication buffers",
        "activations": "activations (estimate)",
        "total": "total",
    }
    lines += [f"  {label:50}{gib(p.memory[2][key])}  {gib(p.memory[3][key])}" for key, label in names.items()]
    acts = w["activations"]
    lines.append(
        f"  activations: decoder {acts['decoder'] / GIB:.2f}, vision {acts['vision'] / GIB:.2f}, "
        f"trace logits {acts['logits'] / GIB:.2f} GiB"
    )
    lines += ["", f"training FLOPs per query/product pair (model FLOPs, for MFU): {p.flops_per_pair / 1e12:.1f} TFLOP"]
    return "\n".join(lines)


def real_config(name: str) -> Path:
    """A shipped real config by short name (``qwen2_5_vl_3b``), a config JSON, or an HF model folder's
    ``config.json``."""
    candidate = REAL_DIR / f"{name}.json"
    if candidate.exists():
        return candidate
    path = Path(name)
    return path / "config.json" if path.is_dir() else path
