"""Configuration of the model and of the embedding contract (``params.yaml`` section ``model``)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class ModelConfig:
    """Backbone choice and the three MOON3 modules, each with an off switch."""

    backbone: str = field(
        default="tiny",
        metadata={"help": "'tiny' (built from a config in the repo) or a local path / gs:// URI of an HF model."},
    )
    tiny_arch: str = field(
        default="qwen2_5_vl",
        metadata={"help": "Architecture of the tiny backbone: qwen2_vl | qwen2_5_vl | qwen3_vl."},
    )
    embed_dim: int = field(default=256, metadata={"help": "Output embedding size."})
    reasoning: bool = field(default=True, metadata={"help": "Write a <think> trace before <emb> (off: direct)."})
    max_trace_tokens: int = field(default=48, metadata={"help": "Trace budget in tokens (128 on real backbones)."})
    fusion: bool = field(default=True, metadata={"help": "Multi-head modality fusion head (off: f = h_emb)."})
    fusion_heads: int = field(default=4, metadata={"help": "Attention heads of the fusion head."})
    fire: bool = field(default=True, metadata={"help": "FIRE fine-grained residual injection (off: no hooks)."})
    fire_every: int = field(default=1, metadata={"help": "FIRE at every k-th decoder layer (4 on real backbones)."})
    fire_vision_layer: int = field(
        default=-1, metadata={"help": "Vision block whose patch states FIRE injects (-1: the middle one)."}
    )
    image_size: int = field(default=64, metadata={"help": "Images are resized to this side before the processor."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow model code from the checkpoint."})
    seed: int = field(default=0, metadata={"help": "Seed for building the tiny backbone and the heads."})
