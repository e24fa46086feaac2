"""Backbones: the tiny Qwen-VL-family models built from configs in ``moon3/model/tiny/``, and real ones.

A backbone folder is a normal Hugging Face model directory: ``config.json`` + safetensors, the tokenizer
(``tokenizer.json``) and the processor (``processor_config.json``). Nothing is ever downloaded from a hub:
``tiny`` is built here, anything else is a local folder or a ``gs://`` prefix copied into a local cache.

This machine has no torchvision, so the stock Qwen processors (which want a video processor) refuse to
build; :func:`processor_class` makes an image-only subclass, and :func:`load_processor` reloads saved folders
with it (``AutoProcessor`` would silently return only the tokenizer).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForImageTextToText, AutoTokenizer, PreTrainedModel

from moon3.data.io import download_dir, is_gcs
from moon3.model import contract as C
from moon3.model.config import ModelConfig

TINY_DIR = Path(__file__).parent / "tiny"
TINY_ARCHS = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")
TINY_VOCAB_SIZE = 1024
CACHE_ENV = "MOON3_CACHE"


def tiny_config_path(arch: str) -> Path:
    """The JSON config of a tiny architecture kept in the repo."""
    if arch not in TINY_ARCHS:
        raise ValueError(f"model.tiny_arch: unknown architecture {arch!r} (choose from {', '.join(TINY_ARCHS)})")
    return TINY_DIR / f"{arch}.json"


def processor_class(model_type: str) -> type:
    """An image-only subclass of the Qwen processor of ``model_type`` (no video processor needed)."""
    from transformers import Qwen2_5_VLProcessor, Qwen2VLProcessor, Qwen3VLProcessor

    bases = {"qwen2_vl": Qwen2VLProcessor, "qwen2_5_vl": Qwen2_5_VLProcessor, "qwen3_vl": Qwen3VLProcessor}
    if model_type not in bases:
        raise ValueError(f"unsupported backbone model_type {model_type!r} (supported: {', '.join(bases)})")
    base = bases[model_type]

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):  # noqa: N807
        base.__init__(self, image_processor, tokenizer, video_processor=None, chat_template=chat_template, **kwargs)

    def __call__(self, images=None, text=None, **kwargs):  # noqa: N807
        # A batch that mixes items with and without an image (TRL passes one list per prompt, None for none):
        # the images in prompt order, as the <|image_pad|> placeholders in `text` consume them.
        if isinstance(images, list | tuple) and any(i is None or isinstance(i, list | tuple) for i in images):
            flat = [img for entry in images if entry is not None for img in (entry if isinstance(entry, list | tuple)
                                                                             else [entry])]  # fmt: skip
            images = flat or None
        return base.__call__(self, images=images, text=text, **kwargs)

    return type(f"Moon3{base.__name__}", (base,), {"__init__": __init__, "__call__": __call__})


def train_tokenizer(texts: Iterable[str], vocab_size: int = TINY_VOCAB_SIZE):
    """A byte-level BPE tokenizer trained on ``texts`` plus the prompt, with the Qwen and moon3 special tokens.

    Byte-level, so any text (accents, emoji) round-trips exactly even if it never appeared in training.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from moon3.data.mini import attribute_values, category_names

    # The prompt and the mbe3-mini vocabulary are always in the corpus so that the template costs few tokens.
    corpus = [C.SYSTEM_PROMPT, C.INSTRUCTION]
    corpus += [name for names in category_names().values() for name in names]
    corpus += [f"{k}: {v}" for k, values in attribute_values().items() for v in values]
    corpus += [t for t in texts if t]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[*C.QWEN_SPECIAL_TOKENS, *C.MOON3_TOKENS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=C.IM_END,
        pad_token=C.PAD_TOKEN,
        padding_side="left",
        chat_template=C.CHAT_TEMPLATE,
    )


def _image_processor(image_size: int, patch_size: int, merge_size: int, temporal_patch_size: int):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    pixels = image_size * image_size
    return Qwen2VLImageProcessorPil(
        size={"shortest_edge": pixels, "longest_edge": pixels},
        patch_size=patch_size,
        merge_size=merge_size,
        temporal_patch_size=temporal_patch_size,
    )


def make_tiny_backbone(cfg: ModelConfig, texts: Iterable[str]) -> tuple[PreTrainedModel, Any]:
    """A tiny Qwen-VL-family model (``cfg.tiny_arch``) and its processor, in memory.

    The tokenizer is trained on ``texts``; weights are random, drawn with ``cfg.seed``: the same config and
    texts give the same model.

    Returns:
        ``(model, processor)``, the model in eval mode.
    """
    tokenizer = train_tokenizer(texts)
    raw = json.loads(tiny_config_path(cfg.tiny_arch).read_text())
    model_type = raw.pop("model_type")
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in C.QWEN_SPECIAL_TOKENS}
    raw["text_config"].update(
        vocab_size=len(tokenizer),
        bos_token_id=ids[C.PAD_TOKEN],
        eos_token_id=ids[C.IM_END],
        pad_token_id=ids[C.PAD_TOKEN],
    )
    config = AutoConfig.for_model(
        model_type,
        image_token_id=ids[C.IMAGE_PAD],
        video_token_id=ids[C.VIDEO_PAD],
        vision_start_token_id=ids[C.VISION_START],
        vision_end_token_id=ids[C.VISION_END],
        **raw,
    )
    with torch.random.fork_rng():
        torch.manual_seed(cfg.seed)
        model = AutoModelForImageTextToText.from_config(config)
    model.generation_config.eos_token_id = ids[C.IM_END]
    model.generation_config.pad_token_id = ids[C.PAD_TOKEN]
    vc = raw["vision_config"]
    image_processor = _image_processor(
        cfg.image_size, vc["patch_size"], vc["spatial_merge_size"], vc["temporal_patch_size"]
    )
    processor = processor_class(model_type)(
        image_processor=image_processor, tokenizer=tokenizer, chat_template=C.CHAT_TEMPLATE
    )
    return model.eval(), processor


def build_tiny_backbone(cfg: ModelConfig, texts: Iterable[str], out_dir: str | Path) -> Path:
    """Build a tiny backbone (:func:`make_tiny_backbone`) and save it as an HF model folder.

    Args:
        cfg: model config (``tiny_arch``, ``image_size``, ``seed``).
        texts: catalog texts (titles, attributes, query texts) for the tokenizer.
        out_dir: where the HF model folder is written.

    Returns:
        ``out_dir``.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model, processor = make_tiny_backbone(cfg, texts)
    with quiet_hf():
        model.save_pretrained(out_dir)
        processor.save_pretrained(out_dir)
    return out_dir


@contextmanager
def quiet_hf():
    """Silence transformers' per-call progress bars (loading/writing shards) for the duration."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


def fetch_dir(path_or_uri: str | Path) -> Path:
    """A local folder for ``path_or_uri``: local paths as they are, ``gs://`` prefixes copied once into
    ``$MOON3_CACHE/remote/<hash>`` (default ``~/.cache/moon3``); a download that did not finish is redone."""
    uri = str(path_or_uri)
    if not is_gcs(uri):
        return Path(uri)
    root = Path(os.environ.get(CACHE_ENV, Path.home() / ".cache" / "moon3")) / "remote"
    local = root / hashlib.sha256(uri.rstrip("/").encode()).hexdigest()[:16]
    done = local / ".complete"
    if not done.exists():
        download_dir(uri, local)
        done.write_text(uri + "\n")
    return local


def resolve_model_dir(path_or_uri: str | Path) -> Path:
    """Local HF model folder for a path or ``gs://`` prefix.

    Raises:
        FileNotFoundError: the folder has no ``config.json``.
    """
    local = fetch_dir(path_or_uri)
    if not (local / "config.json").exists():
        raise FileNotFoundError(f"{path_or_uri}: no config.json; expected an HF image-text-to-text model folder")
    return local


def load_processor(path: str | Path, model_type: str | None = None) -> Any:
    """The image-only processor of a saved backbone folder."""
    path = Path(path)
    if model_type is None:
        model_type = json.loads((path / "config.json").read_text())["model_type"]
    return processor_class(model_type).from_pretrained(path)


def load_backbone(path_or_gs_uri: str | Path, trust_remote_code: bool = False) -> tuple[PreTrainedModel, Any]:
    """Load an HF image-text-to-text model and its processor from a folder or ``gs://`` prefix.

    Returns:
        ``(model, processor)``; the model is in eval mode, float32 on CPU unless the folder says otherwise.
    """
    local = resolve_model_dir(path_or_gs_uri)
    with quiet_hf():
        model = AutoModelForImageTextToText.from_pretrained(local, trust_remote_code=trust_remote_code)
    model.eval()
    try:
        processor = load_processor(local, model.config.model_type)
    except (OSError, ValueError):
        # A folder without a processor file still has a tokenizer; the image processor gets the defaults.
        tokenizer = AutoTokenizer.from_pretrained(local, trust_remote_code=trust_remote_code)
        vc = model.config.vision_config
        image_processor = _image_processor(448, vc.patch_size, vc.spatial_merge_size, vc.temporal_patch_size)
        processor = processor_class(model.config.model_type)(image_processor=image_processor, tokenizer=tokenizer)
    return model, processor


def ensure_moon3_tokens(model: PreTrainedModel, tokenizer: Any) -> list[str]:
    """Add ``<think>``, ``</think>``, ``<emb>`` to a real backbone's tokenizer if missing; resize embeddings.

    Returns:
        The tokens that were added (empty for tiny backbones, which have them built in).
    """
    vocab = tokenizer.get_vocab()
    missing = [t for t in C.MOON3_TOKENS if t not in vocab]
    if missing:
        tokenizer.add_tokens(missing, special_tokens=True)
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer))
    return missing
