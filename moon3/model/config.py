"""Configuration of the model and of the embedding contract (``params.yaml`` section ``model``)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class ModelConfig:
    """Backbone choice and the three MOON3 modules, each with an off switch."""

    backbone: str = field(
        default="tiny",
        metadata={
            "help": "'tiny' (built from a config in the repo), a local path / gs:// URI of an HF model, or a config "
            "JSON (e.g. moon3/model/real/qwen2_5_vl_3b.json: random weights, tokenizer trained on the catalog)."
        },
    )
    preset: str = field(
        default="auto",
        metadata={
            "help": "Backbone-size defaults (moon3/model/presets.py): auto (from the backbone config: tiny below 8 "
            "decoder layers and width 1024, else real) | tiny | real | custom (every key as written). Keys left at "
            "their defaults follow it: trace budget, FIRE layers, image size, learning rates."
        },
    )
    tiny_arch: str = field(
        default="qwen2_5_vl",
        metadata={"help": "Architecture of the tiny backbone: qwen2_vl | qwen2_5_vl | qwen3_vl."},
    )
    embed_dim: int = field(default=256, metadata={"help": "Output embedding size."})
    reasoning: bool = field(default=True, metadata={"help": "Write a <think> trace before <emb> (off: direct)."})
    max_trace_tokens: int = field(
        default=48, metadata={"help": "Trace budget in tokens; left at 48 it follows model.preset (128 on real)."}
    )
    fusion: bool = field(default=True, metadata={"help": "Multi-head modality fusion head (off: f = h_emb)."})
    fusion_heads: int = field(default=4, metadata={"help": "Attention heads of the fusion head."})
    fire: bool = field(default=True, metadata={"help": "FIRE fine-grained residual injection (off: no hooks)."})
    fire_every: int = field(
        default=1, metadata={"help": "FIRE at every k-th decoder layer; left at 1 it follows model.preset (4 on real)."}
    )
    fire_vision_layer: int = field(
        default=-1, metadata={"help": "Vision block whose patch states FIRE injects (-1: the middle one)."}
    )
    image_size: int = field(
        default=64,
        metadata={
            "help": "Square side images are resized to when image_max_pixels is 0 (the tiny preset); left at 64 "
            "it follows model.preset (real: aspect ratio kept, 448 = the nominal side)."
        },
    )
    image_min_pixels: int = field(
        default=0,
        metadata={
            "help": "Aspect-kept images are scaled up to at least this many pixels (0: model.preset's; real: 64 "
            "image tokens, 224x224 on Qwen2.5-VL)."
        },
    )
    image_max_pixels: int = field(
        default=0,
        metadata={
            "help": "Aspect-kept images are scaled down to at most this many pixels (0: model.preset's; real: 256 "
            "image tokens, 448x448 on Qwen2.5-VL; tiny: 0 = squares of image_size)."
        },
    )
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow model code from the checkpoint."})
    seed: int = field(default=0, metadata={"help": "Seed for building the tiny backbone and the heads."})
