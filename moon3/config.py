"""One typed configuration for every stage, loaded from ``params.yaml``.

``params.yaml`` is the single source of defaults: the CLI, the DVC stages and the KFP pipeline parameters all
read it through :func:`load_config`. Each stage keeps its own ``@dataclass`` next to the code it configures
(``moon3/data/config.py``, ``moon3/model/config.py``, ...); this module only assembles them and enforces the
rules: an unknown key or a value of the wrong type is an error that names the key.

Overrides use dotted keys, e.g. ``train.lr=3e-4`` or ``model.fusion=false``; values are parsed as YAML.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from moon3.data.config import DataConfig
from moon3.eval.config import EvalConfig
from moon3.model.config import ModelConfig
from moon3.pipelines.config import PipelineConfig
from moon3.registry.config import PromotionConfig
from moon3.rl.grpo_config import RLConfig
from moon3.serve.config import SERVE_RANGES, ServeConfig
from moon3.synthesis.config import SynthesisConfig
from moon3.train.config import TrainConfig
from moon3.validation.config import ValidationConfig

DEFAULT_PARAMS = Path("params.yaml")


class ConfigError(ValueError):
    """A configuration key is unknown or its value has the wrong type."""


@dataclass
class Moon3Config:
    """All stage configs; one section of ``params.yaml`` each."""

    data: DataConfig = field(default_factory=DataConfig, metadata={"help": "Dataset preparation."})
    validation: ValidationConfig = field(default_factory=ValidationConfig, metadata={"help": "Data validation gate."})
    synthesis: SynthesisConfig = field(
        default_factory=SynthesisConfig, metadata={"help": "Reasoning-trace synthesis and the trace gate."}
    )
    model: ModelConfig = field(default_factory=ModelConfig, metadata={"help": "Backbone and embedding contract."})
    train: TrainConfig = field(default_factory=TrainConfig, metadata={"help": "Contrastive pretraining."})
    rl: RLConfig = field(default_factory=RLConfig, metadata={"help": "RL fine-tuning with GRPO."})
    eval: EvalConfig = field(default_factory=EvalConfig, metadata={"help": "MBE3.0-style evaluation."})
    serve: ServeConfig = field(default_factory=ServeConfig, metadata={"help": "KServe serving and deployment."})
    pipeline: PipelineConfig = field(default_factory=PipelineConfig, metadata={"help": "Kubeflow pipeline."})
    promotion: PromotionConfig = field(
        default_factory=PromotionConfig, metadata={"help": "Model registry and CI-gated promotion."}
    )

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict, the shape of ``params.yaml``."""
        return dataclasses.asdict(self)


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``; return it (ints widen to float). Raise naming ``key``."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}")
    if origin is typing.Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"{key}: expected one of {list(typing.get_args(tp))}, got {value!r}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__} {value!r}")
        (item_tp, *_) = typing.get_args(tp) or (Any,)
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__} {value!r}")
        _, val_tp = typing.get_args(tp) or (Any, Any)
        return {str(k): _coerce(v, val_tp, f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected bool (true/false), got {type(value).__name__} {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected int, got {type(value).__name__} {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):
            # PyYAML (YAML 1.1) reads `3e-4` (no dot) as a string; accept what Python reads as a number.
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{key}: expected float, got {type(value).__name__} {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected str, got {type(value).__name__} {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key)
    raise ConfigError(f"{key}: unsupported annotation {tp!r}")  # a bug in a config class, not in the YAML


# Numeric ranges. Every int/float key must be finite and >= 0 unless listed here: (low, high, low_open) with
# None for no bound; low_open = the low bound itself is not allowed (a learning rate of 0 trains nothing).
_POSITIVE_INT = (1, None, False)
_POSITIVE = (0.0, None, True)
_FRACTION = (0.0, 1.0, False)
RANGES: dict[str, tuple[float | None, float | None, bool]] = {
    **dict.fromkeys(
        [
            "data.n_products",
            "data.n_queries",
            "data.scale",
            "data.image_size",
            "model.embed_dim",
            "model.max_trace_tokens",
            "model.fusion_heads",
            "model.fire_every",
            "model.image_size",
            "train.steps",
            "train.batch_size",
            "train.grad_accum",
            "train.save_every",
            "train.log_every",
            "eval.batch_size",
            "eval.search_batch",
            "eval.embed_chunk",
            "synthesis.hf_batch_size",
            "synthesis.max_tokens",
            "synthesis.concurrency",
            "rl.steps",
            "rl.queries_per_step",
            "rl.lora_r",
            "rl.lora_alpha",
            "rl.save_every",
            "pipeline.num_processes",
            "pipeline.num_nodes",
            "pipeline.trainjob_timeout_s",
            "validation.max_category_depth",
            "validation.image_workers",
            "validation.max_image_bytes",
            "validation.max_image_pixels",
            "validation.max_title_chars",
            "validation.max_query_chars",
            "eval.ks",
            "eval.curve_ks",
        ],
        _POSITIVE_INT,
    ),  # fmt: skip
    **dict.fromkeys(
        [
            "train.lr",
            "train.lr_heads",
            "train.lr_temperature",
            "synthesis.timeout_s",
            "rl.temperature",
            "rl.lr",
            "rl.lr_heads",
            "rl.infonce_temperature",
            "validation.max_price",
            "validation.remote_timeout_s",
        ],
        _POSITIVE,
    ),  # fmt: skip
    **dict.fromkeys(
        [
            "data.category_queries",
            "train.trace_dropout",
            "synthesis.min_grounded_score",
            "validation.max_reject_fraction",
        ],
        _FRACTION,
    ),  # fmt: skip
    "data.eval_fraction": (0.0, 1.0, True),
    "train.temperature_init": (0.01, 1.0, False),  # the clamp of the learnable temperature
    "rl.num_generations": (2, None, False),  # group-normalised advantages need two samples per query
    "rl.epsilon": (0.0, 1.0, True),
    "model.fire_vision_layer": (None, None, False),  # negative counts from the last vision block
}
RANGES.update(SERVE_RANGES)  # serve.* ranges live beside their keys (moon3/serve/config.py)


def _check_range(value: Any, key: str) -> None:
    """Raise naming ``key`` for a NaN/infinite number or one outside its range (:data:`RANGES`, default >= 0);
    each number of a list is checked against the list's range."""
    if isinstance(value, list):
        for i, item in enumerate(value):
            _check_range(item, key) if key in RANGES else _check_range(item, f"{key}[{i}]")
        return
    if isinstance(value, bool) or not isinstance(value, int | float):
        return
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{key}: expected a finite number, got {value!r}")
    low, high, low_open = RANGES.get(key, (0, None, False))
    if low is not None and (value < low or (low_open and value == low)):
        raise ConfigError(f"{key}: expected {'>' if low_open else '>='} {low}, got {value!r}")
    if high is not None and value > high:
        raise ConfigError(f"{key}: expected <= {high}, got {value!r}")


def _build(cls: type, values: Any, prefix: str) -> Any:
    """Build dataclass ``cls`` from a mapping, rejecting unknown keys and wrong types."""
    where = prefix or "params"
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(values).__name__} {values!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        name = f"{prefix}.{unknown[0]}" if prefix else unknown[0]
        raise ConfigError(f"unknown key '{name}' (known keys in {where}: {', '.join(sorted(known))})")
    kwargs = {}
    for key, value in values.items():
        dotted = f"{prefix}.{key}" if prefix else key
        kwargs[key] = _coerce(value, hints[key], dotted)
        _check_range(kwargs[key], dotted)
    return cls(**kwargs)


def config_from_dict(values: dict[str, Any]) -> Moon3Config:
    """Build and check a :class:`Moon3Config` from a nested dict (the ``params.yaml`` shape)."""
    return _build(Moon3Config, values, "")


def apply_overrides(values: dict[str, Any], overrides: list[str] | None) -> dict[str, Any]:
    """Apply ``section.key=value`` overrides (values parsed as YAML) to a nested dict, in place."""
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected KEY=VALUE, e.g. train.lr=3e-4")
        dotted, raw = item.split("=", 1)
        parts = dotted.strip().split(".")
        node = values
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {dotted!r}: '{part}' is not a section")
        node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else ""
    return values


def load_config(path: str | Path | None = DEFAULT_PARAMS, overrides: list[str] | None = None) -> Moon3Config:
    """Load ``params.yaml``, apply overrides, and type-check everything (types and ranges).

    Args:
        path: YAML file with one section per stage (it must exist); ``None`` uses only the built-in defaults.
        overrides: ``section.key=value`` strings applied after the file.

    Raises:
        ConfigError: a missing or unreadable file, invalid YAML (file and line named), an unknown key, a value
            of the wrong type or out of range; the message names the key.
    """
    values: dict[str, Any] = {}
    if path is not None:
        values = _read_params(Path(path))
    try:
        return config_from_dict(apply_overrides(values, overrides))
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}" if path else str(err)) from None


def _read_params(path: Path) -> dict[str, Any]:
    """The YAML mapping in ``path``; every problem is one ConfigError naming the file (and line)."""
    if not path.exists():
        raise ConfigError(f"{path}: no such file (pass --params with an existing params.yaml)")
    if not path.is_file():
        raise ConfigError(f"{path}: not a file (pass --params with a params.yaml)")
    try:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"{path}:{where}: invalid YAML ({problem})") from None
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    return loaded


def help_table(cls: type = Moon3Config, prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted key, default, help) rows for every leaf field, used by ``moon3 config show``."""
    rows = []
    instance = cls()
    for f in dataclasses.fields(cls):
        key = f"{prefix}.{f.name}" if prefix else f.name
        value = getattr(instance, f.name)
        if dataclasses.is_dataclass(value):
            rows.extend(help_table(type(value), key))
        else:
            rows.append((key, repr(value), f.metadata.get("help", "")))
    return rows
