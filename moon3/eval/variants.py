"""Model variants for the comparison table: which saved models exist, each as a lazily loaded embedder.

The variants, in table order: ``trained`` (``eval.model_dir``, in its contract's default reasoning mode),
``untrained`` (``eval.baseline_dir``, the model before any moon3 training), the trained model in its other
reasoning mode (``eval.other_reasoning_mode``: ``reasoning_off`` for a model that reasons by default, else
``reasoning_on`` or, for a model never trained on traces, ``reasoning_on_forced``), then every
``eval.ablation_dirs`` entry (``no_fusion``, ``no_fire``, ``no_rl``, ``no_reasoning``, ...). A folder that does
not exist is reported as not evaluated rather than failing the stage, except the trained model itself.
"""

from __future__ import annotations

import filecmp
import gc
import tempfile
from pathlib import Path
from typing import Any

from moon3.data.io import is_gcs, read_bytes
from moon3.eval.config import METRICS_KEYS, REFERENCE_NAMES, EvalConfig
from moon3.model.contract import CONTRACT_FILE, EmbeddingContract, load_contract, reasoning_label
from moon3.model.embedder import BACKBONE_DIR, HEADS_FILE

EXAMPLE_TRACES = 3  # decoded traces shown per reasoning-on variant
# The built-in comparison rows beside ``trained``; any other model variant is an ablation.
BASELINES = ("untrained", "reasoning_off", "reasoning_on", "reasoning_on_forced")


def read_contract(path: str) -> tuple[EmbeddingContract, dict[str, Any]]:
    """The checked contract and whole ``moon3_config.json`` payload of a saved model (local or ``gs://``),
    without loading its weights."""
    if not is_gcs(path):
        return load_contract(path)
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / CONTRACT_FILE).write_bytes(read_bytes(f"{path.rstrip('/')}/{CONTRACT_FILE}"))
        return load_contract(tmp)


def model_record(path: str) -> dict[str, Any]:
    """What a report says about a saved model: its folder, training record and embedding contract.

    ``training`` is what training wrote (stage, steps, traces, seed, data_dir, ablation, switches); empty for a
    model saved before training records existed.
    """
    contract, payload = read_contract(path)
    model = payload.get("model", {})
    return {
        "path": str(path),
        "training": payload.get("training", {}),
        "switches": {k: model[k] for k in ("fusion", "fire", "reasoning") if k in model},
        "backbone": model.get("backbone"),
        "contract": {
            "reasoning": contract.reasoning,
            "trained_with_traces": contract.trained_with_traces,
            "embed_dim": contract.embed_dim,
            "max_trace_tokens": contract.max_trace_tokens,
        },
    }


class ModelEmbedFn:
    """``embed_fn`` over a saved :class:`~moon3.model.embedder.Moon3Embedder`, loaded on first call.

    Loading lazily and releasing in :meth:`close` (which :func:`moon3.eval.evaluate.evaluate` calls after each
    variant) keeps one model in memory at a time, whatever the number of variants. With reasoning on, the
    generated traces are counted (closure, length, time) for :meth:`describe`.

    Args:
        path: saved model folder or ``gs://`` prefix.
        reasoning: force reasoning on/off; ``None`` follows the model's contract.
        batch_size: items per forward.
        trust_remote_code: the user's own ``model.trust_remote_code`` (a saved folder never grants it).
    """

    def __init__(self, path: str, reasoning: bool | None = None, batch_size: int = 32, trust_remote_code: bool = False):
        self.path = path
        self.trust_remote_code = trust_remote_code
        self.reasoning = reasoning
        self.batch_size = batch_size
        self._model: Any = None
        self._stats: Any = None

    def _load(self) -> Any:
        if self._model is None:
            from moon3.model.embedder import Moon3Embedder, TraceStats

            self._model = Moon3Embedder.from_pretrained(self.path, trust_remote_code=self.trust_remote_code)
            self._stats = self._stats or TraceStats()
        return self._model

    def __call__(self, items: list[dict[str, Any]]) -> Any:
        model = self._load()
        return model.embed(items, reasoning=self.reasoning, batch_size=self.batch_size, trace_stats=self._stats)

    def traces(self, items: list[dict[str, Any]]) -> list[str]:
        """The traces the model writes for ``items`` (greedy, as when embedding; ``</think>`` ends a closed one)."""
        return self._load().generate_traces(items)

    def describe(self) -> dict[str, Any]:
        """The embedding mode: ``reasoning``, its report ``label``, and for reasoning on the ``trace_stats``
        (closure_rate, mean_trace_tokens, ms_per_trace, n) and a few decoded ``example_traces`` (the first
        items embedded; decoding needs the model, so call this before :meth:`close`)."""
        contract = self._model.contract if self._model is not None else read_contract(self.path)[0]
        reasoning = contract.reasoning if self.reasoning is None else self.reasoning
        out: dict[str, Any] = {
            "reasoning": reasoning,
            "trained_with_traces": contract.trained_with_traces,
            "label": reasoning_label(reasoning, contract.trained_with_traces),
        }
        if reasoning and self._stats is not None and self._stats.n:
            out["trace_stats"] = self._stats.summary()
            if self._model is not None:
                decode = self._model.tokenizer.decode
                out["example_traces"] = [decode(ids) for ids in self._stats.examples[:EXAMPLE_TRACES]]
        return out

    def close(self) -> None:
        """Drop the model (it is reloaded if called again; the trace counts are kept)."""
        self._model = None
        gc.collect()

    def __repr__(self) -> str:
        return f"ModelEmbedFn({self.path!r}, reasoning={self.reasoning})"


def _saved(path: str) -> bool:
    return bool(path) and (is_gcs(path) or (Path(path) / CONTRACT_FILE).exists())


def other_mode_variant(contract: EmbeddingContract) -> tuple[str, bool]:
    """Name and ``reasoning`` value of the trained model's other embedding mode."""
    if contract.reasoning:
        return "reasoning_off", False
    return ("reasoning_on" if contract.trained_with_traces else "reasoning_on_forced"), True


def collect_variants(
    cfg: EvalConfig, trust_remote_code: bool = False
) -> tuple[dict[str, ModelEmbedFn], dict[str, str]]:
    """The model variants whose folders exist, and why each other one is left out (``trust_remote_code``: the
    user's own ``model.trust_remote_code``, passed to every model load).

    Returns:
        ``(variants, missing)``: name -> embedder in table order; name -> reason for the ones not evaluated.

    Raises:
        FileNotFoundError: ``eval.model_dir`` holds no saved model (train first).
        ValueError: an ablation name that clashes with a built-in variant name.
    """
    if not _saved(cfg.model_dir):
        raise FileNotFoundError(
            f"eval.model_dir={cfg.model_dir!r}: no saved model ({CONTRACT_FILE} missing); run training first"
        )
    variants = {"trained": ModelEmbedFn(cfg.model_dir, batch_size=cfg.batch_size, trust_remote_code=trust_remote_code)}
    missing: dict[str, str] = {}
    if cfg.baseline_dir and _saved(cfg.baseline_dir):
        variants["untrained"] = ModelEmbedFn(
            cfg.baseline_dir, batch_size=cfg.batch_size, trust_remote_code=trust_remote_code
        )
    else:
        missing["untrained"] = f"no saved model at eval.baseline_dir={cfg.baseline_dir!r}"
    if cfg.other_reasoning_mode:
        name, reasoning = other_mode_variant(read_contract(cfg.model_dir)[0])
        variants[name] = ModelEmbedFn(
            cfg.model_dir, reasoning=reasoning, batch_size=cfg.batch_size, trust_remote_code=trust_remote_code
        )
    reserved = {"trained", *BASELINES, *REFERENCE_NAMES, *METRICS_KEYS}
    for name, path in cfg.ablation_dirs.items():
        if name in reserved:
            raise ValueError(f"eval.ablation_dirs: {name!r} clashes with a built-in variant name")
        if not _saved(path):
            missing[name] = f"no saved model at {path!r}"
        elif _same_weights(path, cfg.model_dir):
            # E.g. no_rl when the rl stage was skipped and copied the pretrained model: the delta is 0 by
            # construction, so the report says why instead of spending an evaluation on it.
            stage = (read_contract(cfg.model_dir)[1].get("training") or {}).get("stage", "?")
            missing[name] = f"same weights as the trained model (its training stage: {stage}); delta 0 by construction"
        else:
            variants[name] = ModelEmbedFn(path, batch_size=cfg.batch_size, trust_remote_code=trust_remote_code)
    return variants, missing


def _same_weights(a: str, b: str) -> bool:
    """Two local model folders with byte-identical heads and backbone weights (gs:// folders: never assumed)."""
    if is_gcs(a) or is_gcs(b):
        return False
    files = [HEADS_FILE, f"{BACKBONE_DIR}/model.safetensors"]
    # filecmp compares sizes first, then streams: a multi-GB backbone is never read into memory at once.
    return all(
        (Path(a) / f).is_file() and (Path(b) / f).is_file() and filecmp.cmp(Path(a) / f, Path(b) / f, shallow=False)
        for f in files
    )
