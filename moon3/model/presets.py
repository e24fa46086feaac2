"""Backbone presets: the settings that depend on the size of the backbone (``model.preset``).

Two presets, chosen from the backbone's own config with ``model.preset: auto`` (the default):

====================  ===========================  ================================================
setting               ``tiny``                     ``real``
====================  ===========================  ================================================
images                squashed to a 64 px square   aspect ratio kept, 64..256 image tokens
                      (16 image tokens)            (``image_min/max_pixels`` = tokens x (patch x merge)^2:
                                                   224^2..448^2 px on Qwen2.5-VL; 256 tokens for a
                                                   square photo of 448 px or more)
trace budget          48 tokens                    128 tokens
FIRE layers           every decoder layer          every 4th (layers 3, 7, ..., 35 on a 36-layer model)
learning rates        backbone 1e-3, heads 1e-3,   backbone 1e-5 (pretrained weights), heads 1e-3,
                      temperature 1e-2             temperature 1e-2
precision             bf16 compute on a bf16 GPU (``train.precision: auto``), fp32 on CPU; fp32 master
                      weights (the trainer loads the backbone in fp32, or DeepSpeed keeps them)
====================  ===========================  ================================================

``auto`` picks ``real`` when the decoder has at least :data:`REAL_MIN_LAYERS` layers or is at least
:data:`REAL_MIN_HIDDEN` wide (every released Qwen-VL: 3B has 36 layers at width 2048), else ``tiny`` (the
in-repo test backbones: 2 layers, width 128). ``tiny`` or ``real`` forces one; ``custom`` takes every key as
written.

**Which keys follow the preset.** ``model.max_trace_tokens``, ``model.fire_every``, ``model.image_size``
and ``train.lr`` / ``train.lr_heads`` / ``train.lr_temperature`` follow it while they are left at their
defaults (the tiny preset's values, which ``params.yaml`` lists); a value you set yourself wins.
``model.image_min_pixels`` / ``image_max_pixels`` follow it while 0. The resolved values are what a model is
built with and saved under (``moon3_config.json``: the ``model`` section with ``preset`` set to the resolved
name, and the contract's ``max_trace_tokens``, ``image_size``, ``image_min_pixels``, ``image_max_pixels``), and
loading a saved model takes them literally, never re-resolving.

The tiny preset reproduces exactly what moon3 did before presets existed, so the tiny model's numbers do not
move. The new token rows (``<think>``, ``</think>``, ``<emb>``) of a real backbone train with the backbone's
learning rate: they start at the mean of the existing rows (:func:`moon3.model.backbone.ensure_moon3_tokens`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from moon3.model.config import ModelConfig

PRESET_CHOICES = ("auto", "tiny", "real", "custom")
# `auto` calls a decoder "real" from this depth or this width on.
REAL_MIN_LAYERS = 8
REAL_MIN_HIDDEN = 1024


@dataclass(frozen=True)
class Preset:
    """The backbone-dependent defaults of one preset (see the module docstring for the table).

    Attributes:
        name: ``tiny`` or ``real``.
        image_size: square side images are squashed to (when ``min_image_tokens`` is 0), else the nominal side
            of a square image at the largest size (for tools that need a single side).
        min_image_tokens: 0 = square mode; else the fewest image tokens an image is scaled up to (aspect kept).
        max_image_tokens: the most image tokens an image is scaled down to (aspect kept).
        max_trace_tokens: trace budget.
        fire_every: FIRE at every k-th decoder layer.
        lr_backbone: peak learning rate of the backbone.
        lr_heads: of the moon3 heads (fusion, FIRE, projection).
        lr_temperature: of the InfoNCE log-temperature.
    """

    name: str
    image_size: int
    min_image_tokens: int
    max_image_tokens: int
    max_trace_tokens: int
    fire_every: int
    lr_backbone: float
    lr_heads: float
    lr_temperature: float

    def image_pixels(self, factor: int) -> tuple[int, int]:
        """``(min_pixels, max_pixels)`` for a backbone whose image token covers ``factor`` x ``factor`` pixels;
        ``(0, 0)`` in square mode."""
        if not self.min_image_tokens:
            return 0, 0
        return self.min_image_tokens * factor * factor, self.max_image_tokens * factor * factor


TINY = Preset("tiny", 64, 0, 0, 48, 1, 1e-3, 1e-3, 1e-2)
REAL = Preset("real", 448, 64, 256, 128, 4, 1e-5, 1e-3, 1e-2)
PRESETS = {p.name: p for p in (TINY, REAL)}


def _get(config: Any, key: str, default: Any = None) -> Any:
    return config.get(key, default) if isinstance(config, dict) else getattr(config, key, default)


def text_dims(backbone_config: Any) -> tuple[int, int]:
    """``(decoder layers, decoder width)`` of an HF Qwen-VL config (object or dict, nested or flat)."""
    text = _get(backbone_config, "text_config") or backbone_config
    layers = _get(text, "num_hidden_layers") or _get(backbone_config, "num_hidden_layers")
    hidden = _get(text, "hidden_size") or _get(backbone_config, "hidden_size")
    return int(layers), int(hidden)


def image_factor(backbone_config: Any) -> int:
    """Pixels per image-token side: vision ``patch_size`` x ``spatial_merge_size`` (28 on Qwen2/2.5-VL)."""
    vision = _get(backbone_config, "vision_config")
    return int(_get(vision, "patch_size")) * int(_get(vision, "spatial_merge_size"))


def detect(backbone_config: Any) -> str:
    """``real`` or ``tiny`` for a backbone config, by the rule of the module docstring."""
    layers, hidden = text_dims(backbone_config)
    return "real" if layers >= REAL_MIN_LAYERS or hidden >= REAL_MIN_HIDDEN else "tiny"


def preset_name(choice: str, backbone_config: Any) -> str:
    """The preset ``model.preset = choice`` means for this backbone (``auto`` resolved; ``custom`` as is)."""
    if choice not in PRESET_CHOICES:
        raise ValueError(f"model.preset: unknown preset {choice!r} (choose from {', '.join(PRESET_CHOICES)})")
    return detect(backbone_config) if choice == "auto" else choice


def _default(cls: type, key: str) -> Any:
    return next(f.default for f in dataclasses.fields(cls) if f.name == key)


def resolve(cfg: ModelConfig, backbone_config: Any) -> ModelConfig:
    """The model config with the preset applied: the values a model is built and saved with.

    Args:
        cfg: ``params.yaml``'s ``model`` section (``preset`` may be ``auto``).
        backbone_config: the backbone's HF config (object or dict).

    Returns:
        A copy with ``preset`` set to the resolved name and every key that follows the preset filled in.

    Raises:
        ValueError: unknown preset; ``image_min_pixels`` above ``image_max_pixels``.
    """
    name = preset_name(cfg.preset, backbone_config)
    if name == "custom":
        out = dataclasses.replace(cfg, preset="custom")
    else:
        preset = PRESETS[name]

        def follow(key: str, value: Any) -> Any:
            mine = getattr(cfg, key)
            return value if mine == _default(ModelConfig, key) else mine

        out = dataclasses.replace(
            cfg,
            preset=name,
            max_trace_tokens=follow("max_trace_tokens", preset.max_trace_tokens),
            fire_every=follow("fire_every", preset.fire_every),
            image_size=follow("image_size", preset.image_size),
        )
        own_size = cfg.image_size != _default(ModelConfig, "image_size")
        if not (cfg.image_min_pixels or cfg.image_max_pixels) and not own_size:
            low, high = preset.image_pixels(image_factor(backbone_config))
            out = dataclasses.replace(out, image_min_pixels=low, image_max_pixels=high)
    if out.image_max_pixels and not out.image_min_pixels:
        factor = image_factor(backbone_config)
        out = dataclasses.replace(out, image_min_pixels=factor * factor)
    if out.image_min_pixels and not out.image_max_pixels:
        raise ValueError("model.image_min_pixels is set but model.image_max_pixels is 0; set both (or neither)")
    if out.image_min_pixels > out.image_max_pixels:
        raise ValueError(
            f"model.image_min_pixels ({out.image_min_pixels}) is above model.image_max_pixels ({out.image_max_pixels})"
        )
    return out


def learning_rates(tc: Any, preset: str, backbone_config: Any = None) -> dict[str, float]:
    """Peak learning rate per parameter group (``backbone``, ``heads``, ``temperature``).

    Args:
        tc: the ``train`` (or a compatible) config with ``lr``, ``lr_heads``, ``lr_temperature``.
        preset: the model's resolved preset (``tiny``, ``real``, ``custom``); ``auto`` (a model saved before
            presets existed) is resolved with ``backbone_config``.
        backbone_config: needed only for ``auto``.

    Returns:
        Each group's rate: the preset's while the key is left at its default, else the key's own value.
    """
    from moon3.train.config import TrainConfig

    if preset == "auto":
        preset = detect(backbone_config)
    own = {"backbone": tc.lr, "heads": tc.lr_heads, "temperature": tc.lr_temperature}
    if preset not in PRESETS:
        return own
    p = PRESETS[preset]
    from_preset = {"backbone": p.lr_backbone, "heads": p.lr_heads, "temperature": p.lr_temperature}
    keys = {"backbone": "lr", "heads": "lr_heads", "temperature": "lr_temperature"}
    return {role: from_preset[role] if own[role] == _default(TrainConfig, keys[role]) else own[role] for role in own}
