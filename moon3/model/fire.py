"""FIRE: fine-grained residual enhancement (method.md section 3), as forward hooks on an unmodified HF model.

Fine features ``F`` are the patch states after an intermediate vision-tower block (default: the middle one),
grouped into the same 2x2 merge units the vision merger makes, so there is one row per image token, and
projected to the LLM width by a small MLP. After each chosen decoder layer ``l``, at image-token positions
only::

    h_l <- h_l + tanh(alpha_l) * MLP_l(LN(F))

Initialisation (method.md section 3, amended after measuring): the last linear layer of each ``MLP_l`` is
zero and ``alpha_l`` starts at 1, so with FIRE attached a pretrained backbone still computes exactly what it
did before, yet both the MLP (through ``tanh(1)``) and the gate (through the MLP's output, once it moves)
receive gradient. With ``alpha_l = 0`` and a random MLP the gate never opened: tanh(alpha) was -0.0004 after
150 steps. :meth:`FIRE.gate_values` reports ``tanh(alpha_l)`` for training logs.

Hooks, not a fork: a pre-hook on the inner model notes where the image tokens are in this call, a hook on
the vision block captures ``F``, and hooks on the decoder layers add the residual. During cached generation
the decode steps have no image tokens, so nothing is added there (the image positions were enhanced in the
prefill and live on in the KV cache). Off switch: :meth:`FIRE.detach` (or never attaching) removes all hooks.

The hooks keep the latest call's image mask and features on the module: run one forward per backward when
gradient checkpointing recomputes layers (embed queries and products in one batch), and do not share one
model between threads.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn


def vision_width(visual: nn.Module) -> int:
    """Width of the vision tower's blocks, read from the weights (config names differ across Qwen-VL versions)."""
    norm = visual.blocks[0].norm1
    return int(norm.weight.shape[0])


class FIRE(nn.Module):
    """Gated residual injection of intermediate vision features into chosen decoder layers.

    Args:
        vision_dim: width of the vision blocks.
        merge_unit: patches per image token (``spatial_merge_size ** 2``).
        hidden: LLM width.
        layers: indices of the decoder layers that get the residual.
        vision_layer: index of the vision block whose output is ``F``.
    """

    def __init__(self, vision_dim: int, merge_unit: int, hidden: int, layers: list[int], vision_layer: int):
        super().__init__()
        self.layers = list(layers)
        self.vision_layer = vision_layer
        self.merge_unit = merge_unit
        in_dim = vision_dim * merge_unit
        self.project = nn.Sequential(
            nn.LayerNorm(in_dim), nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, hidden)
        )
        self.norms = nn.ModuleList(nn.LayerNorm(hidden) for _ in self.layers)
        self.mlps = nn.ModuleList(
            nn.Sequential(nn.Linear(hidden, hidden), nn.GELU(), nn.Linear(hidden, hidden)) for _ in self.layers
        )
        for mlp in self.mlps:
            nn.init.zeros_(mlp[-1].weight)
            nn.init.zeros_(mlp[-1].bias)
        self.alpha = nn.Parameter(torch.ones(len(self.layers)))
        self._handles: list = []
        self._image_mask: torch.Tensor | None = None
        self._fine: torch.Tensor | None = None
        self._grid: torch.Tensor | None = None
        self._window = False

    @classmethod
    def for_backbone(cls, backbone: nn.Module, every: int = 1, vision_layer: int = -1) -> FIRE:
        """Size a FIRE module for an HF Qwen-VL model: every ``every``-th decoder layer, middle vision block."""
        inner = backbone.model
        visual, layers = inner.visual, inner.language_model.layers
        if every < 1:
            raise ValueError(f"model.fire_every must be >= 1, got {every}")
        depth = len(visual.blocks)
        if vision_layer < 0:
            vision_layer = (depth - 1) // 2
        if vision_layer >= depth:
            raise ValueError(f"FIRE vision layer {vision_layer} out of range (vision tower has {depth} blocks)")
        chosen = list(range(every - 1, len(layers), every)) or [len(layers) - 1]
        hidden = backbone.config.text_config.hidden_size
        return cls(vision_width(visual), visual.spatial_merge_size**2, hidden, chosen, vision_layer)

    def forward(self, slot: int, fine: torch.Tensor) -> torch.Tensor:
        """The residual of FIRE layer ``slot`` for fine features ``fine`` (one row per image token).

        The hooks call the module itself rather than reading its weights: under ZeRO-3 a module's own parameters
        (``alpha`` here) are gathered only while that module runs.
        """
        projected = self.project(fine.to(self.alpha.dtype))
        return torch.tanh(self.alpha[slot]) * self.mlps[slot](self.norms[slot](projected))

    def gate_values(self) -> list[float]:
        """``tanh(alpha_l)`` per FIRE layer: how open each injection gate is."""
        return torch.tanh(self.alpha.detach().float()).tolist()

    @property
    def attached(self) -> bool:
        """Whether the hooks are installed."""
        return bool(self._handles)

    def attach(self, backbone: nn.Module) -> FIRE:
        """Install the hooks on ``backbone`` (an HF ``*ForConditionalGeneration`` Qwen-VL model)."""
        if self.attached:
            return self
        inner = backbone.model
        visual = inner.visual
        self._image_token_id = backbone.config.image_token_id
        # Qwen2.5-VL runs its vision blocks in window order; FIRE needs raster (image-token) order back.
        self._window = hasattr(visual, "window_size") and hasattr(visual, "fullatt_block_indexes")
        self.__dict__["_visual"] = visual  # a plain reference: not a submodule, not in the state dict
        self._handles = [
            inner.register_forward_pre_hook(self._on_model_call, with_kwargs=True),
            visual.register_forward_pre_hook(self._on_vision_call, with_kwargs=True),
            visual.blocks[self.vision_layer].register_forward_hook(self._on_vision_block),
        ]
        layers = inner.language_model.layers
        for slot, idx in enumerate(self.layers):
            # A partial of a bound method, not a closure: copy.deepcopy (RL's frozen reference) rebinds it to the copy.
            self._handles.append(layers[idx].register_forward_hook(partial(self._on_layer, slot)))
        return self

    def detach(self) -> None:
        """Remove every hook; the backbone is back to its plain behaviour."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._fine = self._image_mask = self._grid = None

    # --- hooks ---------------------------------------------------------------------------------------------

    def _on_model_call(self, module, args, kwargs):
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        self._image_mask = None if input_ids is None else input_ids == self._image_token_id
        self._fine = self._grid = None

    def _on_vision_call(self, module, args, kwargs):
        self._grid = kwargs.get("grid_thw", args[1] if len(args) > 1 else None)

    def _on_vision_block(self, module, args, output):
        states = output[0] if isinstance(output, tuple) else output
        units = states.reshape(-1, self.merge_unit * states.shape[-1])
        if self._window and self._grid is not None:
            from transformers.vision_utils import get_vision_window_index

            v = self._visual
            window_index, _ = get_vision_window_index(
                self._grid, spatial_merge_size=v.spatial_merge_size, window_size=v.window_size, patch_size=v.patch_size
            )
            units = units[torch.argsort(window_index.to(units.device))]
        self._fine = units

    def _on_layer(self, slot: int, module, args, output):
        mask = self._image_mask
        if mask is None or self._fine is None or not bool(mask.any()):
            return None
        hidden = output[0] if isinstance(output, tuple) else output
        if mask.shape != hidden.shape[:2] or int(mask.sum()) != self._fine.shape[0]:
            raise RuntimeError(
                f"FIRE: {int(mask.sum())} image tokens but {self._fine.shape[0]} fine-feature rows; "
                "the prompt and the images of this batch disagree"
            )
        delta = self(slot, self._fine)
        hidden = hidden.clone()
        hidden[mask] = hidden[mask] + delta.to(hidden.dtype)
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden
