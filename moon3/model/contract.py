"""The embedding contract (method.md section 1): the one place that owns how an input becomes an embedding.

Training, evaluation and serving all build their model inputs through this module, so an embedding computed
at training time and one served later agree. Everything here is versioned: the :class:`EmbeddingContract`
is saved as ``moon3_config.json`` beside the weights and checked when a model is loaded.

The sequence the backbone reads (Qwen chat format; ``[...]`` parts are optional)::

    <|im_start|>system\\n{SYSTEM_PROMPT}<|im_end|>\\n<|im_start|>user\\n
    [<|vision_start|><|image_pad|>*N<|vision_end|>][{text}]\\n{INSTRUCTION}<|im_end|>\\n<|im_start|>assistant\\n
    <think>{trace}</think><emb>

With reasoning on, the model writes ``{trace}`` (at most ``max_trace_tokens``) after ``<think>``; with
reasoning off the trace is empty (``<think></think><emb>``), the form a trained model also sees for a trace it
closed at once. The embedding is read from the last-layer state at ``<emb>`` (the last position, as batches
are left-padded), combined with the image and text states by the fusion head, projected to ``embed_dim`` and
L2-normalised in float32.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CONTRACT_VERSION = "1.0"
CONTRACT_FILE = "moon3_config.json"

THINK_START = "<think>"
THINK_END = "</think>"
EMB_TOKEN = "<emb>"
MOON3_TOKENS = (THINK_START, THINK_END, EMB_TOKEN)

# The Qwen-VL special tokens the processor and the model config refer to, in Qwen's own order.
PAD_TOKEN = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
VISION_START = "<|vision_start|>"
VISION_END = "<|vision_end|>"
IMAGE_PAD = "<|image_pad|>"
VIDEO_PAD = "<|video_pad|>"
QWEN_SPECIAL_TOKENS = (
    PAD_TOKEN,
    IM_START,
    IM_END,
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    VISION_START,
    VISION_END,
    "<|vision_pad|>",
    IMAGE_PAD,
    VIDEO_PAD,
)

SYSTEM_PROMPT = "You turn a product or a search query into a search embedding."
INSTRUCTION = "List its category and attributes, then embed it."
READOUT = "last_layer_at_emb+fusion+linear"
NORMALISATION = "l2"

# Minimal Qwen-style chat template for the tiny tokenizer, so that tools that call `apply_chat_template`
# (TRL's GRPO trainer) render the same user turn as `prompt_segments`.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Segment kinds returned by `prompt_segments`: template text, the image placeholder, the raw input text.
TEMPLATE, IMAGE, TEXT = "template", "image", "text"


class ContractError(ValueError):
    """A saved model's contract does not match what this code or the caller expects."""


@dataclass(frozen=True)
class EmbeddingContract:
    """Everything that must agree between the code that trained a model and the code that serves it."""

    version: str = CONTRACT_VERSION
    system_prompt: str = SYSTEM_PROMPT
    instruction: str = INSTRUCTION
    think_start: str = THINK_START
    think_end: str = THINK_END
    emb_token: str = EMB_TOKEN
    max_trace_tokens: int = 48
    # Raw input text (title + attribute lines, or query text) longer than this is cut at embedding time, and
    # counted (Moon3Embedder.truncated_texts): a 10 MB title must not take the process down.
    max_text_tokens: int = 512
    reasoning: bool = True
    # Honest reasoning flag (method.md section 1): whether any training stage taught the model to write traces
    # (SFT on synthesized traces and/or RL). A model saved without them embeds with reasoning off by default.
    trained_with_traces: bool = False
    readout: str = READOUT
    embed_dim: int = 256
    normalisation: str = NORMALISATION
    # Images: squashed to an image_size square when image_max_pixels is 0 (the tiny preset); else resized with the
    # aspect ratio kept to between image_min_pixels and image_max_pixels (Qwen's smart_resize, sides rounded to
    # the backbone's patch x merge), image_size then being the nominal side of a square image (see fit_image).
    image_size: int = 64
    image_min_pixels: int = 0
    image_max_pixels: int = 0
    dtype: str = "float32"

    @classmethod
    def from_model_config(cls, cfg: Any) -> EmbeddingContract:
        """The contract a :class:`~moon3.model.config.ModelConfig` asks for."""
        return cls(
            max_trace_tokens=cfg.max_trace_tokens,
            reasoning=cfg.reasoning,
            embed_dim=cfg.embed_dim,
            image_size=cfg.image_size,
            image_min_pixels=cfg.image_min_pixels,
            image_max_pixels=cfg.image_max_pixels,
        )

    @property
    def keeps_aspect(self) -> bool:
        """Whether images keep their aspect ratio (real preset) rather than being squashed to a square."""
        return self.image_max_pixels > 0

    def with_training(self, trained_with_traces: bool, reasoning: bool = True) -> EmbeddingContract:
        """The contract a trained model is saved under: reasoning on by default only if asked for (``reasoning``,
        the config's ``model.reasoning``) and taught (``trained_with_traces``); a model never taught to write
        traces embeds directly (forcing it on stays possible and is labelled as forced in reports)."""
        return dataclasses.replace(
            self, trained_with_traces=trained_with_traces, reasoning=reasoning and trained_with_traces
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (JSON-ready)."""
        return dataclasses.asdict(self)

    def diff(self, other: EmbeddingContract) -> dict[str, tuple[Any, Any]]:
        """Fields whose values differ: name -> (self's value, other's value)."""
        a, b = self.to_dict(), other.to_dict()
        return {k: (a[k], b[k]) for k in a if a[k] != b[k]}


# Fields fixed by this code version: a saved model that differs in any of them was built for other code.
CODE_OWNED_FIELDS = (
    "version",
    "system_prompt",
    "instruction",
    "think_start",
    "think_end",
    "emb_token",
    "readout",
    "normalisation",
    "dtype",
)


def prompt_segments(contract: EmbeddingContract, has_image: bool, text: str | None) -> list[tuple[str, str]]:
    """The user prompt as ``(kind, string)`` segments, ending with the assistant turn's opening.

    The embedder tokenizes each segment on its own so that it knows exactly which positions hold the image
    and the raw text (the fusion head attends to those). ``IMAGE`` segments are expanded to one
    ``<|image_pad|>`` per merged image patch by the embedder.
    """
    segments = [(TEMPLATE, f"{IM_START}system\n{contract.system_prompt}{IM_END}\n{IM_START}user\n")]
    if has_image:
        segments += [(TEMPLATE, VISION_START), (IMAGE, IMAGE_PAD), (TEMPLATE, VISION_END)]
    if text:
        segments.append((TEXT, text))
    segments.append((TEMPLATE, f"\n{contract.instruction}{IM_END}\n{IM_START}assistant\n"))
    return segments


def fit_image(image: Any, contract: EmbeddingContract) -> Any:
    """An input image as the backbone's processor must receive it under ``contract`` (RGB).

    Square mode (``image_max_pixels`` 0, the tiny preset): resized to an ``image_size`` square (bicubic), as
    moon3 always did. Aspect mode: returned as it is; the processor's smart_resize keeps the aspect ratio within
    the contract's pixel bounds (:meth:`Moon3Embedder._images` passes them on each call). Anything that feeds the
    processor (training, serving, RL's dataset) goes through here, so they all see the same pixels.
    """
    from PIL import Image

    rgb = image.convert("RGB")
    if contract.keeps_aspect:
        return rgb
    return rgb.resize((contract.image_size, contract.image_size), Image.BICUBIC)


def image_size_kwargs(contract: EmbeddingContract) -> dict[str, Any]:
    """Keyword arguments for a Qwen image processor call: the contract's pixel bounds in aspect mode, else none
    (a tiny backbone's processor was built for its square)."""
    if not contract.keeps_aspect:
        return {}
    return {"size": {"shortest_edge": contract.image_min_pixels, "longest_edge": contract.image_max_pixels}}


def image_tokens(height: int, width: int, contract: EmbeddingContract, patch_size: int, merge_size: int) -> int:
    """Image tokens (``<|image_pad|>`` positions) an image of ``height`` x ``width`` pixels becomes."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

    factor = patch_size * merge_size
    if contract.keeps_aspect:
        h, w = smart_resize(height, width, factor, contract.image_min_pixels, contract.image_max_pixels)
    else:  # the square, through the processor a tiny backbone is built with (both bounds = side^2)
        side = contract.image_size
        h, w = smart_resize(side, side, factor, side * side, side * side)
    return (h // factor) * (w // factor)


def reasoning_label(reasoning: bool, trained_with_traces: bool) -> str:
    """How a report names an embedding mode: ``reasoning off``, ``reasoning on (generated)``, or ``reasoning on
    (forced: model trained without traces)`` when the traces come from a model that was never taught to write
    them."""
    if not reasoning:
        return "reasoning off"
    return "reasoning on (generated)" if trained_with_traces else "reasoning on (forced: model trained without traces)"


def split_trace(trace: str) -> tuple[str, bool]:
    """``(body, closed)``: the trace text without a leading ``<think>`` and trailing ``</think>``.

    ``closed`` says whether the writer ended the trace itself with ``</think>`` (the RL format reward).
    """
    body = trace.strip()
    if body.startswith(THINK_START):
        body = body[len(THINK_START) :]
    closed = body.rstrip().endswith(THINK_END)
    if closed:
        body = body.rstrip()[: -len(THINK_END)]
    return body, closed


def save_contract(path: str | Path, contract: EmbeddingContract, extra: dict[str, Any] | None = None) -> Path:
    """Write ``moon3_config.json`` into folder ``path``: the contract plus ``extra`` (the model config)."""
    target = Path(path) / CONTRACT_FILE
    payload = {"contract": contract.to_dict(), **(extra or {})}
    target.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
    return target


def load_contract(path: str | Path, expected: EmbeddingContract | None = None) -> tuple[EmbeddingContract, dict]:
    """Read and check ``moon3_config.json`` in folder ``path``.

    Args:
        path: a saved model folder.
        expected: if given, every field must match it (e.g. the serving config's contract).

    Returns:
        The saved contract and the whole JSON payload.

    Raises:
        ContractError: the file is missing or unreadable, has unknown fields, was written under another
            contract version or template, or differs from ``expected``; the message names the fields.
    """
    file = Path(path) / CONTRACT_FILE
    if not file.exists():
        raise ContractError(f"{file}: not found; is {path} a folder written by Moon3Embedder.save_pretrained?")
    try:
        payload = json.loads(file.read_text())
        raw = payload["contract"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise ContractError(f"{file}: not a moon3 contract file ({err})") from None
    known = {f.name for f in dataclasses.fields(EmbeddingContract)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ContractError(f"{file}: unknown contract field(s) {unknown}")
    saved = EmbeddingContract(**raw)
    code = EmbeddingContract()
    bad = {k: v for k, v in saved.diff(code).items() if k in CODE_OWNED_FIELDS}
    if bad:
        detail = "; ".join(f"{k}: saved {v[0]!r}, this code {v[1]!r}" for k, v in bad.items())
        raise ContractError(f"{file}: contract mismatch with this code version ({detail})")
    if expected is not None and (bad := saved.diff(expected)):
        detail = "; ".join(f"{k}: saved {v[0]!r}, expected {v[1]!r}" for k, v in bad.items())
        raise ContractError(f"{file}: contract mismatch ({detail})")
    return saved, payload
