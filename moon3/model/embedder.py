"""``Moon3Embedder``: a Qwen-VL-family backbone that thinks, then embeds (method.md sections 1-3).

One code path for training, evaluation and serving: :meth:`Moon3Embedder.prepare_batch` builds the model
inputs from items (and teacher-forced traces), :meth:`Moon3Embedder.forward` reads the embedding at ``<emb>``.
:meth:`Moon3Embedder.embed` is inference: with reasoning on it first writes the traces with
:meth:`generate_traces` (batched, KV cache), then runs the same ``prepare_batch`` + ``forward``; so a served
embedding is exactly the embedding training computes for that trace.

Saved folder layout (self-contained)::

    moon3_config.json          the embedding contract + the model config (checked on load)
    moon3_heads.safetensors    fusion head, FIRE and the projection
    backbone/                  HF model folder: config, model.safetensors, tokenizer, processor
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from moon3.model import contract as C
from moon3.model.backbone import (
    ensure_moon3_tokens,
    fetch_dir,
    is_config_backbone,
    load_backbone,
    make_backbone_from_config,
    quiet_hf,
    read_backbone_config,
    tiny_config_path,
)
from moon3.model.config import ModelConfig
from moon3.model.contract import ContractError, EmbeddingContract
from moon3.model.fire import FIRE
from moon3.model.fusion import ModalityFusion
from moon3.model.items import Item, check_items

HEADS_FILE = "moon3_heads.safetensors"
# Written by training beside a saved model: the in-memory trained model's embeddings of a few inputs, for the
# saved-vs-trained check (moon3.train.contrastive.save_probe). Any new save removes a stale one.
PROBE_FILE = "training_probe.safetensors"
BACKBONE_DIR = "backbone"
IGNORE = -100


@dataclass
class Moon3Output:
    """What :meth:`Moon3Embedder.forward` returns.

    Attributes:
        embeddings: (B, embed_dim) L2-normalised float32, with gradients in training.
        lm_loss: mean next-token loss on the teacher-forced trace tokens; None without traces.
        token_logps: (B, L) log-probability of each labelled token at its position (0 elsewhere); None without
            traces. RL sums it over the trace for the policy log-likelihood.
        label_mask: (B, L) bool, where ``token_logps`` is defined; None without traces.
    """

    embeddings: torch.Tensor
    lm_loss: torch.Tensor | None = None
    token_logps: torch.Tensor | None = None
    label_mask: torch.Tensor | None = None


@dataclass
class TraceStats:
    """Running counts over generated traces: how many closed themselves with ``</think>``, their length, time.

    Attributes:
        n: traces generated.
        closed: traces that ended with ``</think>`` inside the budget (the rest were cut by it).
        tokens: trace tokens in total (``</think>`` not counted).
        seconds: wall time spent generating.
        examples: the first few traces as token id lists (decode with the model's tokenizer).
    """

    n: int = 0
    closed: int = 0
    tokens: int = 0
    seconds: float = 0.0
    examples: list[list[int]] = field(default_factory=list)

    def add(self, traces: list[list[int]], end_id: int, seconds: float, keep: int = 8) -> None:
        """Count a batch of traces as :meth:`Moon3Embedder.generate_traces` returns them with ``return_ids``."""
        for ids in traces:
            self.n += 1
            closed = bool(ids) and ids[-1] == end_id
            self.closed += int(closed)
            self.tokens += len(ids) - int(closed)
            if len(self.examples) < keep:
                self.examples.append(list(ids))
        self.seconds += seconds

    def summary(self) -> dict[str, float]:
        """``closure_rate``, ``mean_trace_tokens``, ``ms_per_trace`` and ``n`` (empty without traces)."""
        if not self.n:
            return {}
        return {
            "n": self.n,
            "closure_rate": self.closed / self.n,
            "mean_trace_tokens": self.tokens / self.n,
            "ms_per_trace": 1000 * self.seconds / self.n,
        }


def safetensors_error() -> type[Exception]:
    """The exception safetensors raises on a corrupt or truncated file."""
    from safetensors import SafetensorError

    return SafetensorError


def _one_line(err: BaseException, limit: int = 300) -> str:
    text = " ".join(str(err).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _model_config(path: Path, payload: dict[str, Any]) -> ModelConfig:
    """The saved ``model`` section, type-checked like ``params.yaml`` (a wrong type is an error, not a surprise)."""
    from moon3.config import ConfigError, _build

    try:
        return _build(ModelConfig, payload.get("model"), "model")
    except ConfigError as err:
        raise ContractError(f"{path / C.CONTRACT_FILE}: bad 'model' section ({err})") from None


def _asks_for_remote_code(path: Path, cfg: ModelConfig) -> str:
    """Why a saved folder would run its own Python ('' if it would not)."""
    reasons = []
    if cfg.trust_remote_code:
        reasons.append(f"trust_remote_code in {C.CONTRACT_FILE}")
    config_file = path / BACKBONE_DIR / "config.json"
    try:
        backbone_config = json.loads(config_file.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ContractError(f"{config_file}: not a readable backbone config ({_one_line(err)})") from None
    if not isinstance(backbone_config, dict):
        raise ContractError(f"{config_file}: not a backbone config (expected a JSON object)")
    if backbone_config.get("auto_map"):
        reasons.append(f"auto_map in {BACKBONE_DIR}/config.json")
    if any(path.joinpath(BACKBONE_DIR).glob("*.py")):
        reasons.append(f"Python files in {BACKBONE_DIR}/")
    return ", ".join(reasons)


class Moon3Embedder(nn.Module):
    """Backbone + FIRE hooks + fusion head + projection, under one :class:`EmbeddingContract`.

    Args:
        backbone: an HF Qwen2-VL / Qwen2.5-VL / Qwen3-VL ``*ForConditionalGeneration`` model.
        processor: its (image-only) processor; must know ``<think>``, ``</think>``, ``<emb>``.
        cfg: model config (switches, sizes, seed for the heads).
        contract: defaults to the one ``cfg`` asks for.
    """

    def __init__(
        self, backbone: nn.Module, processor: Any, cfg: ModelConfig, contract: EmbeddingContract | None = None
    ):
        super().__init__()
        self.cfg = cfg
        self.contract = contract or EmbeddingContract.from_model_config(cfg)
        self.backbone = backbone
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.image_processor = processor.image_processor
        vocab = self.tokenizer.get_vocab()
        missing = [t for t in (*C.MOON3_TOKENS, C.IMAGE_PAD, C.PAD_TOKEN) if t not in vocab]
        if missing:
            raise ContractError(f"tokenizer lacks the contract's special token(s) {missing}")
        self.token_ids = {t: vocab[t] for t in (*C.MOON3_TOKENS, C.IMAGE_PAD, C.PAD_TOKEN, C.IM_END)}
        if backbone.config.image_token_id != self.token_ids[C.IMAGE_PAD]:
            raise ContractError("backbone config image_token_id does not match the tokenizer's <|image_pad|>")
        hidden = backbone.config.text_config.hidden_size
        # One seed per head, so switching one module off (an ablation) leaves the others' initial weights as
        # they are in the full model.
        with torch.random.fork_rng():
            torch.manual_seed(cfg.seed)
            self.fusion = ModalityFusion(hidden, cfg.fusion_heads) if cfg.fusion else None
            torch.manual_seed(cfg.seed + 1)
            self.fire = FIRE.for_backbone(backbone, cfg.fire_every, cfg.fire_vision_layer) if cfg.fire else None
            torch.manual_seed(cfg.seed + 2)
            self.proj = nn.Linear(hidden, self.contract.embed_dim)
        if self.fire is not None:
            self.fire.attach(backbone)
        self._segment_cache: dict[str, list[int]] = {}
        self.truncated_texts = 0  # inputs whose text was cut to contract.max_text_tokens (see prepare_batch)
        # Generation must not write template or image tokens into a trace; it may only close it.
        self._suppress = sorted(
            i for t, i in self.tokenizer.get_added_vocab().items() if t != C.THINK_END and i < len(self.tokenizer)
        )

    # --- construction, save, load --------------------------------------------------------------------------

    @classmethod
    def from_config(
        cls,
        cfg: ModelConfig,
        catalog_texts: Iterable[str] | None = None,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> Moon3Embedder:
        """Fresh model: ``tiny`` or a config JSON builds a random-init backbone (tokenizer trained on
        ``catalog_texts``); else loads a model folder (path or ``gs://``).

        The preset is resolved against the backbone's config first (:func:`moon3.model.presets.resolve`); the
        model keeps, and saves, the resolved config. Fusion, FIRE and the projection are new, drawn with
        ``cfg.seed``.

        Args:
            cfg: ``params.yaml``'s ``model`` section.
            catalog_texts: the tokenizer's corpus (built backbones only).
            device: where a built backbone's weights are created (default the CPU); the heads follow.
            dtype: parameter dtype of the backbone: float32 for a built one unless given; a loaded one keeps its
                checkpoint's dtype unless given.
        """
        from moon3.model.presets import resolve

        if cfg.backbone == "tiny" or is_config_backbone(cfg.backbone):
            # Built in memory: a save/load round trip would give the same weights but costs seconds.
            path = tiny_config_path(cfg.tiny_arch) if cfg.backbone == "tiny" else Path(cfg.backbone)
            cfg = resolve(cfg, read_backbone_config(path))
            backbone, processor = make_backbone_from_config(
                path, cfg, catalog_texts or [], device=device, dtype=dtype or torch.float32
            )
        else:
            backbone, processor = load_backbone(cfg.backbone, trust_remote_code=cfg.trust_remote_code, dtype=dtype)
            cfg = resolve(cfg, backbone.config)
            ensure_moon3_tokens(backbone, processor.tokenizer)
        model = cls(backbone, processor, cfg)
        return model.to(next(backbone.parameters()).device)

    def heads_state_dict(self) -> dict[str, torch.Tensor]:
        """Weights of the moon3 heads (everything but the backbone)."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("backbone.")}

    def save_pretrained(
        self,
        out_dir: str | Path,
        training: dict[str, Any] | None = None,
        state_dict: dict[str, torch.Tensor] | None = None,
    ) -> Path:
        """Write a self-contained folder: contract, heads, and the backbone with its processor.

        Args:
            out_dir: the folder.
            training: what produced the weights (stage, steps, data, switches), kept in ``moon3_config.json``
                under ``training`` for reports and lineage.
            state_dict: this module's full state dict when the module's own parameters are not the whole
                weights (ZeRO-3 shards: pass the consolidated one, e.g.
                :func:`moon3.train.contrastive.consolidated_state_dict`); default: the module's own.
        """
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / PROBE_FILE).unlink(missing_ok=True)  # it described the weights being replaced
        backbone_state = None
        if state_dict is not None:
            backbone_state = {k[len("backbone.") :]: v for k, v in state_dict.items() if k.startswith("backbone.")}
        with quiet_hf():
            self.backbone.save_pretrained(out_dir / BACKBONE_DIR, state_dict=backbone_state)
            self.processor.save_pretrained(out_dir / BACKBONE_DIR)
        if state_dict is None:
            state_dict = self.heads_state_dict()
        heads = {k: v.detach().contiguous().cpu() for k, v in state_dict.items() if not k.startswith("backbone.")}
        save_file(heads, out_dir / HEADS_FILE, metadata={"contract_version": self.contract.version})
        extra = {"model": dataclasses.asdict(self.cfg), "backbone_type": self.backbone.config.model_type}
        if training is not None:
            extra["training"] = training
        C.save_contract(out_dir, self.contract, extra)
        return out_dir

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        expected: EmbeddingContract | None = None,
        trust_remote_code: bool = False,
        dtype: torch.dtype | None = None,
    ) -> Moon3Embedder:
        """Load a folder written by :meth:`save_pretrained` (local or ``gs://``).

        The saved ``model`` section is taken literally (its preset was resolved when the model was built).

        Args:
            path: the folder or ``gs://`` prefix.
            expected: a contract the caller requires (e.g. serving's); any difference is an error.
            dtype: the backbone's parameter dtype; None = as saved (a bf16 save loads bf16). Training passes
                float32 (fp32 master weights). The heads are always float32 here.
            trust_remote_code: the user's own explicit choice (``model.trust_remote_code`` in their params, or a
                CLI flag). A saved folder never grants it: one that asks for its own code to run
                (``trust_remote_code`` in ``moon3_config.json`` or an ``auto_map`` in ``backbone/config.json``)
                is refused unless the caller allows it.

        Raises:
            ContractError: the saved contract does not match this code or ``expected``; the folder asks to run
                its own code without the caller's consent; a file is missing, truncated or not what it should
                be (config, heads); the heads do not fit the model the contract describes.
        """
        path = fetch_dir(path)
        contract, payload = C.load_contract(path, expected)
        cfg = _model_config(path, payload)
        asks = _asks_for_remote_code(path, cfg)
        if asks and not trust_remote_code:
            raise ContractError(
                f"{path}: the folder asks to run its own code ({asks}); refused. Load it only if you trust its "
                "source, with your own model.trust_remote_code=true"
            )
        try:
            backbone, processor = load_backbone(path / BACKBONE_DIR, trust_remote_code=trust_remote_code, dtype=dtype)
        except (OSError, ValueError, KeyError, safetensors_error()) as err:
            raise ContractError(f"{path / BACKBONE_DIR}: not a loadable backbone folder ({_one_line(err)})") from None
        model = cls(backbone, processor, cfg, contract)
        try:
            heads = load_file(path / HEADS_FILE)
        except (OSError, safetensors_error()) as err:
            raise ContractError(f"{path / HEADS_FILE}: not a readable safetensors file ({_one_line(err)})") from None
        try:
            missing, unexpected = model.load_state_dict(heads, strict=False)
        except RuntimeError as err:
            raise ContractError(f"{path / HEADS_FILE}: heads do not fit the saved contract/config: {err}") from None
        missing = [k for k in missing if not k.startswith("backbone.")]
        if missing or unexpected:
            raise ContractError(f"{path / HEADS_FILE}: missing {missing}, unexpected {list(unexpected)}")
        model.eval()
        return model

    # --- inputs --------------------------------------------------------------------------------------------

    def _segment_ids(self, text: str) -> list[int]:
        if text not in self._segment_cache:
            self._segment_cache[text] = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return self._segment_cache[text]

    def _raw_ids(self, texts: list[str]) -> list[list[int]]:
        # User text and traces never turn into control tokens, whatever they contain.
        if not texts:
            return []
        return self.tokenizer(texts, add_special_tokens=False, split_special_tokens=True)["input_ids"]

    def _trace_ids(self, traces: list[str | list[int] | None]) -> list[list[int]]:
        """Token ids of trace bodies: strings are tokenized, id lists (from generation) are taken as they are."""
        end = self.token_ids[C.THINK_END]
        texts = [C.split_trace(t)[0] if isinstance(t, str) else "" for t in traces]
        encoded = iter(self._raw_ids([t for t, raw in zip(texts, traces, strict=True) if isinstance(raw, str)]))
        out = []
        for raw in traces:
            if isinstance(raw, str):
                out.append(next(encoded))
            elif raw is None:
                out.append([])
            else:
                ids = [int(i) for i in raw]
                out.append(ids[: ids.index(end)] if end in ids else ids)
        return out

    def _images(self, items: list[Item]) -> tuple[dict, list[int]]:
        images = [C.fit_image(it["image"], self.contract) for it in items if it.get("image") is not None]
        if not images:
            return {}, []
        out = self.image_processor(images=images, return_tensors="pt", **C.image_size_kwargs(self.contract))
        merge = self.image_processor.merge_size**2
        counts = (out["image_grid_thw"].prod(-1) // merge).tolist()
        return {"pixel_values": out["pixel_values"], "image_grid_thw": out["image_grid_thw"]}, counts

    def prepare_batch(
        self,
        items: list[Item],
        traces: list[str | list[int] | None] | None = None,
        open_trace: bool = False,
        max_trace_tokens: int | None = None,
    ) -> dict[str, Any]:
        """Model inputs for ``items`` (left-padded), with teacher-forced ``traces`` where given.

        Args:
            items: ``{"image": PIL.Image | None, "text": str | None}`` each, at least one of them present.
            traces: one per item: a string, the token ids :meth:`generate_traces` returned with
                ``return_ids=True``, or None (empty trace). The trace tokens and ``</think>`` get labels.
            open_trace: end after ``<think>`` (the generation prompt) instead of ``...</think><emb>``.
            max_trace_tokens: truncate traces to this many tokens (default: the contract's budget).

        Returns:
            ``input_ids``, ``attention_mask``, ``mm_token_type_ids``, ``image_mask``, ``text_mask``, ``labels``
            (None without traces) and, if any item has an image, ``pixel_values`` and ``image_grid_thw``.

        Raises:
            ValueError: an item has neither image nor text (message names its index), or ``traces`` has the
                wrong length.
        """
        if not items:
            raise ValueError("prepare_batch: no items")
        check_items(items)
        if traces is not None and len(traces) != len(items):
            raise ValueError(f"traces: got {len(traces)} for {len(items)} items")
        budget = self.contract.max_trace_tokens if max_trace_tokens is None else max_trace_tokens
        vision, counts = self._images(items)
        texts = [it.get("text") or "" for it in items]
        limit = self.contract.max_text_tokens
        # Characters first (tokenizing a 10 MB string costs more than the cut saves), then tokens; both counted.
        clipped = [t[: 16 * limit] for t in texts]
        text_ids = self._raw_ids(clipped)
        for i, ids in enumerate(text_ids):
            if len(ids) > limit or len(clipped[i]) < len(texts[i]):
                self.truncated_texts += int(not open_trace)  # once per embedded input, not again for its trace
                text_ids[i] = ids[:limit]
        trace_ids = [ids[:budget] for ids in self._trace_ids(traces or [None] * len(items))]
        tid = self.token_ids
        rows, kinds, labels = [], [], []
        image_iter = iter(counts)
        for i, item in enumerate(items):
            ids: list[int] = []
            kind: list[int] = []  # 0 template, 1 image, 2 raw text, 3 trace
            for seg_kind, seg in C.prompt_segments(self.contract, item.get("image") is not None, texts[i]):
                if seg_kind == C.IMAGE:
                    n = next(image_iter)
                    ids += [tid[C.IMAGE_PAD]] * n
                    kind += [1] * n
                elif seg_kind == C.TEXT:
                    ids += text_ids[i]
                    kind += [2] * len(text_ids[i])
                else:
                    seg_ids = self._segment_ids(seg)
                    ids += seg_ids
                    kind += [0] * len(seg_ids)
            ids.append(tid[C.THINK_START])
            kind.append(0)
            lab = [IGNORE] * len(ids)
            if not open_trace:
                body = trace_ids[i]
                ids += [*body, tid[C.THINK_END], tid[C.EMB_TOKEN]]
                kind += [3] * len(body) + [0, 0]
                learn = traces is not None and traces[i] is not None
                lab += [*body, tid[C.THINK_END]] if learn else [IGNORE] * (len(body) + 1)
                lab.append(IGNORE)
            rows.append(ids)
            kinds.append(kind)
            labels.append(lab)
        width = max(len(r) for r in rows)
        pad = lambda seq, value: [value] * (width - len(seq)) + seq  # noqa: E731
        input_ids = torch.tensor([pad(r, tid[C.PAD_TOKEN]) for r in rows])
        kind_t = torch.tensor([pad(k, -1) for k in kinds])
        batch: dict[str, Any] = {
            "input_ids": input_ids,
            "attention_mask": (kind_t >= 0).long(),
            "mm_token_type_ids": (kind_t == 1).int(),
            "image_mask": kind_t == 1,
            "text_mask": kind_t == 2,
            "labels": torch.tensor([pad(lab, IGNORE) for lab in labels]) if traces is not None else None,
            **vision,
        }
        return batch

    # --- forward -------------------------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        """Device the model's weights are on."""
        return self.proj.weight.device

    def _to_device(self, batch: dict[str, Any]) -> dict[str, Any]:
        return {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}

    def forward(self, batch: dict[str, Any]) -> Moon3Output:
        """Embeddings (and the trace loss if ``batch`` has labels) for a batch from :meth:`prepare_batch`."""
        b = self._to_device(batch)
        if not bool((b["input_ids"][:, -1] == self.token_ids[C.EMB_TOKEN]).all()):
            raise ValueError("forward: every row must end with <emb>; build the batch with prepare_batch")
        inner = self.backbone.model
        grid = b.get("image_grid_thw")
        # Explicit 3D (mRoPE) positions: correct under left padding and for text-only batches alike.
        position_ids, _ = inner.get_rope_index(
            b["input_ids"],
            mm_token_type_ids=b["mm_token_type_ids"],
            image_grid_thw=grid,
            attention_mask=b["attention_mask"],
        )
        out = inner(
            input_ids=b["input_ids"],
            attention_mask=b["attention_mask"],
            position_ids=position_ids,
            pixel_values=b.get("pixel_values"),
            image_grid_thw=grid,
            mm_token_type_ids=b["mm_token_type_ids"],
            use_cache=False,
        )
        states = out.last_hidden_state
        # The heads compute in their own dtype: float32 (fp32 weights, autocast or not), or bfloat16 when
        # DeepSpeed's bf16 mode has cast the whole module. The embedding is normalised in float32 either way.
        head_dtype = self.proj.weight.dtype
        h = states[:, -1].to(head_dtype)
        f = h
        if self.fusion is not None:
            f = self.fusion(h, states.to(head_dtype), b["image_mask"], b["text_mask"])
        embeddings = F.normalize(self.proj(f).float(), dim=-1)
        labels = b.get("labels")
        if labels is None or not bool((labels != IGNORE).any()):
            return Moon3Output(embeddings=embeddings)
        # Next-token loss on the trace only: position t predicts label t+1; the lm head runs on those rows.
        target = labels[:, 1:]
        mask = target != IGNORE
        logits = self.backbone.lm_head(states[:, :-1][mask]).float()
        logp = torch.log_softmax(logits, dim=-1).gather(-1, target[mask][:, None])[:, 0]
        token_logps = torch.zeros_like(labels, dtype=logp.dtype)
        label_mask = torch.zeros_like(labels, dtype=torch.bool)
        label_mask[:, 1:] = mask
        token_logps[label_mask] = logp
        return Moon3Output(embeddings, lm_loss=-logp.mean(), token_logps=token_logps, label_mask=label_mask)

    # --- inference -----------------------------------------------------------------------------------------

    @torch.no_grad()
    def generate_traces(
        self,
        items: list[Item],
        do_sample: bool = False,
        temperature: float = 1.0,
        num_return_sequences: int = 1,
        max_new_tokens: int | None = None,
        return_ids: bool = False,
    ) -> list[str] | list[list[int]]:
        """Write a ``<think>`` trace for each item (batched generation with the KV cache).

        Args:
            items: see :meth:`prepare_batch`.
            do_sample: sample (RL) instead of greedy decoding (serving, evaluation).
            temperature: sampling temperature.
            num_return_sequences: traces per item.
            max_new_tokens: budget, ``</think>`` included (default: the contract's ``max_trace_tokens``).
            return_ids: return token ids instead of text. Text is re-tokenized by :meth:`prepare_batch` and may
                not give back the same ids (byte-level fragments); RL needs the exact sampled tokens.

        Returns:
            ``len(items) * num_return_sequences`` traces (item-major); each is the trace body followed by
            ``</think>`` when the model closed it within the budget. Feed them to :meth:`prepare_batch`.
        """
        was_training = self.training
        self.eval()
        batch = self._to_device(self.prepare_batch(items, open_trace=True))
        budget = max_new_tokens or self.contract.max_trace_tokens
        end = self.token_ids[C.THINK_END]
        sampling = {"do_sample": True, "temperature": temperature} if do_sample else {"do_sample": False}
        kwargs = {k: batch[k] for k in ("input_ids", "attention_mask", "mm_token_type_ids")}
        if "pixel_values" in batch:
            kwargs.update(pixel_values=batch["pixel_values"], image_grid_thw=batch["image_grid_thw"])
        try:
            out = self.backbone.generate(
                **kwargs,
                max_new_tokens=budget,
                min_new_tokens=0,
                num_return_sequences=num_return_sequences,
                eos_token_id=end,
                pad_token_id=self.token_ids[C.PAD_TOKEN],
                suppress_tokens=self._suppress,
                use_cache=True,
                **sampling,
            )
        finally:
            self.train(was_training)
        pad = self.token_ids[C.PAD_TOKEN]
        traces = []
        for row in out[:, batch["input_ids"].shape[1] :].tolist():
            closed = end in row
            body = row[: row.index(end)] if closed else [i for i in row if i != pad]
            if return_ids:
                traces.append(body + ([end] if closed else []))
            else:
                text = self.tokenizer.decode(body, skip_special_tokens=True)
                traces.append(text + (C.THINK_END if closed else ""))
        return traces

    @torch.no_grad()
    def embed(
        self,
        items: list[Item],
        reasoning: bool | None = None,
        batch_size: int = 32,
        progress: bool = False,
        trace_stats: TraceStats | None = None,
    ) -> torch.Tensor:
        """Embeddings of ``items`` for inference: (N, embed_dim) float32, L2-normalised, on the CPU.

        Args:
            items: see :meth:`prepare_batch`.
            reasoning: write a trace first (default: the contract's ``reasoning``); off = direct embedding.
            batch_size: items per forward.
            progress: show a progress bar.
            trace_stats: with reasoning on, accumulates closure, length and time of the generated traces.
        """
        reasoning = self.contract.reasoning if reasoning is None else reasoning
        check_items(items)
        was_training = self.training
        self.eval()
        chunks = []
        try:
            for start in tqdm(range(0, len(items), batch_size), disable=not progress, desc="embed", unit="batch"):
                chunk = items[start : start + batch_size]
                # The generated ids themselves, not their re-tokenized text: exactly what the model wrote.
                traces = None
                if reasoning:
                    started = time.perf_counter()
                    traces = self.generate_traces(chunk, return_ids=True)
                    if trace_stats is not None:
                        trace_stats.add(traces, self.token_ids[C.THINK_END], time.perf_counter() - started)
                # Generated traces are inputs here, not targets: no labels, no trace loss.
                batch = self.prepare_batch(chunk, traces)
                batch["labels"] = None
                chunks.append(self.forward(batch).embeddings.cpu())
        finally:
            self.train(was_training)
        if not chunks:
            return torch.empty(0, self.contract.embed_dim)
        return torch.cat(chunks)
