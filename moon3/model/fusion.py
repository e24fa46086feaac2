"""Multi-head modality fusion (method.md section 2).

``h`` is the last-layer state at ``<emb>``; ``H_v`` the states at image-token positions, ``H_t`` those at the
raw text tokens. With K heads::

    z_v = MHA(q=h, kv=H_v)      z_t = MHA(q=h, kv=H_t)
    [a_h, a_v, a_t] = softmax(W_g [h; z_v; z_t])      f = a_h*h + a_v*z_v + a_t*z_t

A missing modality (a text-only query has no image) gets its gate masked to exactly 0 and its ``z`` set to
0. Off switch: ``enabled=False`` returns ``h`` unchanged.
"""

from __future__ import annotations

import torch
from torch import nn


class ModalityFusion(nn.Module):
    """Gated fusion of the ``<emb>`` state with attention read-outs of the image and the text states.

    Args:
        hidden: width of the states.
        heads: attention heads (must divide ``hidden``).
        enabled: off switch; when False the module has no effect (its parameters stay, unused).
    """

    def __init__(self, hidden: int, heads: int = 4, enabled: bool = True):
        super().__init__()
        if hidden % heads:
            raise ValueError(f"model.fusion_heads={heads} must divide the backbone width {hidden}")
        self.enabled = enabled
        self.attn_v = nn.MultiheadAttention(hidden, heads, batch_first=True)
        self.attn_t = nn.MultiheadAttention(hidden, heads, batch_first=True)
        self.gate = nn.Linear(3 * hidden, 3)
        self.last_gates: torch.Tensor | None = None  # (B, 3) gates of the last call, for inspection and tests

    @staticmethod
    def _attend(attn: nn.MultiheadAttention, h: torch.Tensor, states: torch.Tensor, mask: torch.Tensor):
        present = mask.any(dim=1)
        # A row with no key would give NaN; let it attend everywhere and zero the result instead.
        key_padding = ~(mask | ~present[:, None])
        z, _ = attn(h[:, None, :], states, states, key_padding_mask=key_padding, need_weights=False)
        return z[:, 0] * present[:, None].to(z.dtype), present

    def forward(
        self, h: torch.Tensor, states: torch.Tensor, image_mask: torch.Tensor, text_mask: torch.Tensor
    ) -> torch.Tensor:
        """Fuse.

        Args:
            h: (B, D) states at ``<emb>``.
            states: (B, L, D) last-layer states of the whole sequence.
            image_mask: (B, L) bool, True at image-token positions.
            text_mask: (B, L) bool, True at raw-text positions.

        Returns:
            (B, D) fused vector ``f``.
        """
        if not self.enabled:
            self.last_gates = None
            return h
        z_v, has_v = self._attend(self.attn_v, h, states, image_mask)
        z_t, has_t = self._attend(self.attn_t, h, states, text_mask)
        logits = self.gate(torch.cat([h, z_v, z_t], dim=-1))
        present = torch.stack([torch.ones_like(has_v), has_v, has_t], dim=-1)
        gates = torch.softmax(logits.masked_fill(~present, float("-inf")), dim=-1)
        self.last_gates = gates.detach()
        return gates[:, :1] * h + gates[:, 1:2] * z_v + gates[:, 2:] * z_t
