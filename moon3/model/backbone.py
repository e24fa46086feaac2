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
from collections import Counter
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
# Bytes + special tokens + learned merges; the character tokens of a non-Latin catalog come on top.
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


# Learned merges are kept only for pairs seen at least this often: a small catalog gets a small vocabulary rather
# than one token per word it saw once.
MIN_MERGE_FREQUENCY = 2
# At most this many non-ASCII characters get their own token (the most frequent first); rarer ones fall back to
# byte tokens, which still round-trip exactly. 8000 covers the characters of everyday Chinese several times.
MAX_CHAR_TOKENS = 8000
# The pre-tokenizer split of ``pre_tokenizers.ByteLevel(use_regex=True)`` (GPT-2's pattern), on raw characters.
_WORD_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# Scripts written without spaces: each character is its own word for the learned merges (see train_tokenizer).
_UNSPACED_CHAR = r"[\p{Han}\p{Hiragana}\p{Katakana}]"


def _byte_symbols() -> dict[int, str]:
    """Byte -> the printable character the byte-level BPE stands it for (GPT-2's table, as ``tokenizers`` uses)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    extra = (b for b in range(256) if b not in table)
    for n, b in enumerate(extra):
        table[b] = chr(256 + n)
    return table


def _char_tokens(corpus: list[str], limit: int) -> list[str]:
    """The corpus's non-ASCII characters that get a token: most frequent first, at most ``limit``."""
    counts = Counter(c for text in corpus for c in text if ord(c) > 127)
    return [c for c, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:limit]]


def train_tokenizer(texts: Iterable[str], vocab_size: int = TINY_VOCAB_SIZE, max_char_tokens: int = MAX_CHAR_TOKENS):
    """A byte-level BPE tokenizer trained on ``texts`` plus the prompt, with the Qwen and moon3 special tokens.

    Byte-level, so any text (accents, emoji, any script) round-trips exactly even if it never appeared in
    training. The corpus is ``texts`` and the contract's prompt only (:func:`moon3.model.items.catalog_texts`
    builds it from a catalog); nothing else is assumed about the catalog's language.

    Two kinds of merges, in this order of priority:

    1. *character merges*: every non-ASCII character of the corpus (up to ``max_char_tokens``, the most frequent
       first) is assembled from its UTF-8 bytes into one token before anything else applies, so a character the
       catalog contains is never split into byte fragments, however rare it is (a Chinese title's characters,
       every category name);
    2. *learned merges*: BPE trained on whole characters (not bytes), pairs seen at least
       :data:`MIN_MERGE_FREQUENCY` times, up to ``vocab_size`` tokens counting the 256 bytes and the special
       tokens; multi-character tokens (words, subwords) come from here. Han and kana characters are not merged
       with each other: a script without spaces would otherwise turn whole title fragments seen a few times
       into single tokens that an unseen title never reuses, so for them the character is the unit.

    Args:
        texts: the corpus.
        vocab_size: bytes + special tokens + learned merges; the character tokens come on top (a Latin-script
            catalog has almost none).
        max_char_tokens: most non-ASCII characters given their own token.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    # The prompt often enough that its words are merged: the template then costs few tokens.
    corpus = [*[C.SYSTEM_PROMPT, C.INSTRUCTION] * MIN_MERGE_FREQUENCY, *(t for t in texts if t)]
    special = [*C.QWEN_SPECIAL_TOKENS, *C.MOON3_TOKENS]
    to_symbol = _byte_symbols()
    byte_level = lambda text: "".join(to_symbol[b] for b in text.encode("utf-8"))  # noqa: E731

    vocab: dict[str, int] = {}
    for token in [*special, *sorted(to_symbol.values())]:
        vocab.setdefault(token, len(vocab))
    merges: list[tuple[str, str]] = []
    seen: set[tuple[str, str]] = set()

    def merge(left: str, right: str) -> None:
        if (left, right) not in seen:
            seen.add((left, right))
            merges.append((left, right))
            vocab.setdefault(left + right, len(vocab))

    # 1. Character merges, left to right over each character's bytes. Their pairs never straddle two characters
    # (a UTF-8 lead byte never continues a character), so they assemble every listed character first.
    chars = _char_tokens(corpus, max_char_tokens)
    for char in chars:
        symbols = [to_symbol[b] for b in char.encode("utf-8")]
        for i in range(1, len(symbols)):
            merge("".join(symbols[:i]), symbols[i])

    # 2. BPE over characters with the byte-level pre-tokenizer's word split; its merges map to byte-level symbols.
    budget = max(0, vocab_size - len(special) - len(to_symbol))
    alphabet = sorted({c for text in corpus for c in text if ord(c) <= 127} | set(chars))
    learner = Tokenizer(models.BPE())
    learner.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_UNSPACED_CHAR), behavior="isolated"),
            pre_tokenizers.Split(Regex(_WORD_PATTERN), behavior="isolated"),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=len(alphabet) + budget,
        min_frequency=MIN_MERGE_FREQUENCY,
        initial_alphabet=alphabet,
        limit_alphabet=len(alphabet),
        show_progress=False,
    )
    learner.train_from_iterator(corpus, trainer=trainer)
    known = set(alphabet)
    for pair in json.loads(learner.to_str())["model"]["merges"]:
        left, right = pair if isinstance(pair, list) else pair.split(" ", 1)
        if set(left + right) <= known:  # a character left out of the alphabet stays bytes: no merge across it
            merge(byte_level(left), byte_level(right))

    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(special)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=C.IM_END,
        pad_token=C.PAD_TOKEN,
        padding_side="left",
        chat_template=C.CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
    )


def _image_processor(min_pixels: int, max_pixels: int, patch_size: int, merge_size: int, temporal_patch_size: int):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil(
        size={"shortest_edge": min_pixels, "longest_edge": max_pixels},
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
    return make_backbone_from_config(tiny_config_path(cfg.tiny_arch), cfg, texts)


def is_config_backbone(backbone: str) -> bool:
    """Whether ``model.backbone`` names a config JSON (random weights) rather than a model folder."""
    return str(backbone).endswith(".json")


def read_backbone_config(path: str | Path) -> dict[str, Any]:
    """The raw JSON of a backbone config (``moon3/model/tiny/*.json``, ``moon3/model/real/*.json`` or any HF
    Qwen-VL ``config.json``, flat or with a ``text_config``)."""
    return json.loads(Path(path).read_text())


def backbone_config_of(cfg: ModelConfig) -> dict[str, Any] | Any:
    """The config of the backbone ``cfg`` names, without building or loading weights (for presets, plans)."""
    if cfg.backbone == "tiny":
        return read_backbone_config(tiny_config_path(cfg.tiny_arch))
    if is_config_backbone(cfg.backbone):
        return read_backbone_config(cfg.backbone)
    return read_backbone_config(resolve_model_dir(cfg.backbone) / "config.json")


def hf_config(raw: dict[str, Any], **overrides: Any):
    """An HF config object from a raw config dict (``model_type`` inside it); ``overrides`` go to the decoder's
    settings (top level for flat configs, ``text_config`` for nested ones), except the token ids, which are
    always top level."""
    raw = json.loads(json.dumps(raw))  # a deep copy
    model_type = raw.pop("model_type")
    for key in ("torch_dtype", "dtype", "transformers_version", "_name_or_path"):
        raw.pop(key, None)
    multimodal = [k for k in overrides if k.endswith("_token_id") and not k.startswith(("bos", "eos", "pad"))]
    top = {k: overrides.pop(k) for k in multimodal}
    if "text_config" in raw:
        raw["text_config"].update(overrides)
    else:
        raw.update(overrides)
    raw.update(top)
    return AutoConfig.for_model(model_type, **raw)


def make_backbone_from_config(
    config_path: str | Path,
    cfg: ModelConfig,
    texts: Iterable[str],
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[PreTrainedModel, Any]:
    """A random-init Qwen-VL-family model built from a config JSON, with a tokenizer trained on ``texts``.

    The tiny backbones (``moon3/model/tiny/*.json``) and the real architectures (``moon3/model/real/*.json``,
    e.g. Qwen2.5-VL-3B for ``moon3 model plan`` and ``bench/gpu.sh``) are both built here. The config's vocabulary
    is kept when it is larger than the tokenizer (a real layout: rows past the tokenizer stay unused), else it is
    the tokenizer's; the special-token ids are the tokenizer's.

    Args:
        config_path: the JSON.
        cfg: the (preset-resolved) model config: ``seed``, and the image pixel bounds of the processor.
        texts: the tokenizer's corpus.
        device: where the weights are created (a GPU for a real size; default the CPU).
        dtype: parameter dtype.

    Returns:
        ``(model, processor)``, the model in eval mode.
    """
    tokenizer = train_tokenizer(texts)
    raw = read_backbone_config(config_path)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in C.QWEN_SPECIAL_TOKENS}
    text = raw.get("text_config", raw)
    vocab = max(len(tokenizer), int(text.get("vocab_size") or 0))
    config = hf_config(
        raw,
        vocab_size=vocab,
        bos_token_id=ids[C.PAD_TOKEN],
        eos_token_id=ids[C.IM_END],
        pad_token_id=ids[C.PAD_TOKEN],
        image_token_id=ids[C.IMAGE_PAD],
        video_token_id=ids[C.VIDEO_PAD],
        vision_start_token_id=ids[C.VISION_START],
        vision_end_token_id=ids[C.VISION_END],
    )
    if "vision_token_id" in raw:
        config.vision_token_id = ids["<|vision_pad|>"]
    with torch.random.fork_rng(devices=[]), torch.device(device or "cpu"):
        torch.manual_seed(cfg.seed)
        model = AutoModelForImageTextToText.from_config(config, dtype=dtype)
    model.generation_config.eos_token_id = ids[C.IM_END]
    model.generation_config.pad_token_id = ids[C.PAD_TOKEN]
    vc = raw["vision_config"]
    if cfg.image_max_pixels:
        low, high = cfg.image_min_pixels, cfg.image_max_pixels
    else:
        low = high = cfg.image_size * cfg.image_size
    image_processor = _image_processor(low, high, vc["patch_size"], vc["spatial_merge_size"], vc["temporal_patch_size"])
    processor = processor_class(config.model_type)(
        image_processor=image_processor, tokenizer=tokenizer, chat_template=C.CHAT_TEMPLATE
    )
    return model.eval(), processor


def build_tiny_backbone(cfg: ModelConfig, texts: Iterable[str], out_dir: str | Path) -> Path:
    """Build a tiny backbone (:func:`make_tiny_backbone`) and save it as an HF model folder.

    Args:
        cfg: model config (``tiny_arch``, ``image_size``, ``seed``).
        texts: the tokenizer's corpus (:func:`moon3.model.items.catalog_texts`: titles, attributes, category
            names and paths, query texts, traces).
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


def load_backbone(
    path_or_gs_uri: str | Path, trust_remote_code: bool = False, dtype: torch.dtype | None = None
) -> tuple[PreTrainedModel, Any]:
    """Load an HF image-text-to-text model and its processor from a folder or ``gs://`` prefix.

    Args:
        path_or_gs_uri: the folder.
        trust_remote_code: the caller's consent to run code from the folder.
        dtype: parameter dtype; None = the folder's own (transformers' ``dtype="auto"``: bf16 for a released
            Qwen-VL checkpoint, fp32 for a tiny one). Training without DeepSpeed passes float32: the optimizer
            then updates fp32 master weights and bf16 happens only inside autocast.

    Returns:
        ``(model, processor)``; the model is in eval mode.
    """
    local = resolve_model_dir(path_or_gs_uri)
    kwargs = {"dtype": dtype} if dtype is not None else {}
    with quiet_hf():
        model = AutoModelForImageTextToText.from_pretrained(local, trust_remote_code=trust_remote_code, **kwargs)
    model.eval()
    try:
        processor = load_processor(local, model.config.model_type)
    except (OSError, ValueError):
        # A folder without a processor file still has a tokenizer; the image processor gets the defaults.
        tokenizer = AutoTokenizer.from_pretrained(local, trust_remote_code=trust_remote_code)
        vc = model.config.vision_config
        pixels = 448 * 448  # the embedder passes its contract's bounds on every call anyway
        image_processor = _image_processor(pixels, pixels, vc.patch_size, vc.spatial_merge_size, vc.temporal_patch_size)
        processor = processor_class(model.config.model_type)(image_processor=image_processor, tokenizer=tokenizer)
    return model, processor


def ensure_moon3_tokens(model: PreTrainedModel, tokenizer: Any) -> list[str]:
    """Add ``<think>``, ``</think>``, ``<emb>`` to a real backbone's tokenizer if missing, with sensible rows.

    A released Qwen-VL checkpoint has more embedding rows than tokens (151,936 rows for 151,665 tokens on
    Qwen2.5-VL), so the new tokens land on padded rows that were never trained; where the rows run out the matrix
    is resized. Either way each new token's input row, and its output (LM head) row when the head is not tied,
    is set to the mean of the rows of the tokens that existed before: a neutral start that the training moves.

    Returns:
        The tokens that were added (empty for tiny backbones, which have them built in).
    """
    vocab = tokenizer.get_vocab()
    missing = [t for t in C.MOON3_TOKENS if t not in vocab]
    if not missing:
        return []
    known = len(tokenizer)
    tokenizer.add_tokens(missing, special_tokens=True)
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    new_ids = torch.as_tensor(tokenizer.convert_tokens_to_ids(missing))
    matrices = [model.get_input_embeddings().weight]
    head = model.get_output_embeddings()
    if head is not None and head.weight is not matrices[0]:
        matrices.append(head.weight)
    with torch.no_grad():
        for weight in matrices:
            mean = weight[:known].float().mean(dim=0)
            weight[new_ids] = mean.to(weight.dtype)
    return missing
