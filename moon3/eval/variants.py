"""Model variants for the comparison table: which saved models exist, each as a lazily loaded embedder.

The variants, in table order: ``trained`` (``eval.model_dir``), ``untrained`` (``eval.baseline_dir``, the
model before any moon3 training), ``reasoning_off`` (the trained model with an empty trace), then every
``eval.ablation_dirs`` entry (``no_fusion``, ``no_fire``, ``no_rl``, ``no_reasoning``, ...). A folder that does
not exist is reported as not evaluated rather than failing the stage, except the trained model itself.
"""

from __future__ import annotations

import gc
from pathlib import Path
from typing import Any

from moon3.data.io import is_gcs
from moon3.eval.config import EvalConfig
from moon3.model.contract import CONTRACT_FILE, load_contract


class ModelEmbedFn:
    """``embed_fn`` over a saved :class:`~moon3.model.embedder.Moon3Embedder`, loaded on first call.

    Loading lazily and releasing in :meth:`close` (which :func:`moon3.eval.evaluate.evaluate` calls after each
    variant) keeps one model in memory at a time, whatever the number of variants.

    Args:
        path: saved model folder or ``gs://`` prefix.
        reasoning: force reasoning on/off; ``None`` follows the model's contract.
        batch_size: items per forward.
    """

    def __init__(self, path: str, reasoning: bool | None = None, batch_size: int = 32):
        self.path = path
        self.reasoning = reasoning
        self.batch_size = batch_size
        self._model: Any = None

    def __call__(self, items: list[dict[str, Any]]) -> Any:
        if self._model is None:
            from moon3.model.embedder import Moon3Embedder

            self._model = Moon3Embedder.from_pretrained(self.path)
        return self._model.embed(items, reasoning=self.reasoning, batch_size=self.batch_size)

    def close(self) -> None:
        """Drop the model (it is reloaded if called again)."""
        self._model = None
        gc.collect()

    def __repr__(self) -> str:
        return f"ModelEmbedFn({self.path!r}, reasoning={self.reasoning})"


def _saved(path: str) -> bool:
    return bool(path) and (is_gcs(path) or (Path(path) / CONTRACT_FILE).exists())


def collect_variants(cfg: EvalConfig) -> tuple[dict[str, ModelEmbedFn], dict[str, str]]:
    """The variants whose models exist, and why each other one is left out.

    Returns:
        ``(variants, missing)``: name -> embedder in table order; name -> reason for the ones not evaluated.

    Raises:
        FileNotFoundError: ``eval.model_dir`` holds no saved model (train first).
    """
    if not _saved(cfg.model_dir):
        raise FileNotFoundError(
            f"eval.model_dir={cfg.model_dir!r}: no saved model ({CONTRACT_FILE} missing); run training first"
        )
    variants = {"trained": ModelEmbedFn(cfg.model_dir, batch_size=cfg.batch_size)}
    missing: dict[str, str] = {}
    if cfg.baseline_dir and _saved(cfg.baseline_dir):
        variants["untrained"] = ModelEmbedFn(cfg.baseline_dir, batch_size=cfg.batch_size)
    else:
        missing["untrained"] = f"no saved model at eval.baseline_dir={cfg.baseline_dir!r}"
    if cfg.reasoning_off:
        reasoning = True if is_gcs(cfg.model_dir) else load_contract(cfg.model_dir)[0].reasoning
        if reasoning:
            variants["reasoning_off"] = ModelEmbedFn(cfg.model_dir, reasoning=False, batch_size=cfg.batch_size)
        else:
            missing["reasoning_off"] = "the trained model already embeds without reasoning"
    for name, path in cfg.ablation_dirs.items():
        if name in variants:
            raise ValueError(f"eval.ablation_dirs: {name!r} clashes with a built-in variant name")
        if _saved(path):
            variants[name] = ModelEmbedFn(path, batch_size=cfg.batch_size)
        else:
            missing[name] = f"no saved model at {path!r}"
    return variants, missing
