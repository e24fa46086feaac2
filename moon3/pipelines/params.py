"""The stage configuration as a KFP pipeline parameter, and back.

The compiled pipeline takes the whole stage configuration as one ``params`` struct (default: ``params.yaml``)
plus ``overrides`` (``section.key=value`` strings, the CLI's ``--set``). KFP stores a struct as a protobuf
``Struct``, where every number is a double: ``train.steps: 300`` comes back as ``300.0``. The strict config
loader rejects a float for an int field, so :func:`config_from_params` turns integral floats back into ints
where the config class says ``int``, then checks everything as usual.
"""

from __future__ import annotations

import copy
import dataclasses
import types
import typing
from pathlib import Path
from typing import Any

from moon3.config import Moon3Config, apply_overrides, config_from_dict, load_config

# Compile-time settings: they are not a run-time argument of the pipeline.
COMPILE_TIME_SECTIONS = ("pipeline",)
# params.yaml of the checkout this package runs from (editable install); absent in an installed wheel.
REPO_PARAMS = Path(__file__).resolve().parents[2] / "params.yaml"


def default_image() -> str:
    """The project image of the checkout's ``params.yaml`` (the components' ``base_image``).

    The pipeline sets every task's image from the config it is compiled with, so this is only the default a
    component carries when it is used on its own.
    """
    return load_config(REPO_PARAMS if REPO_PARAMS.exists() else None).pipeline.image


def pipeline_params(cfg: Moon3Config) -> dict[str, Any]:
    """The default of the pipeline's ``params`` argument: every stage section of ``cfg``."""
    return {k: v for k, v in cfg.to_dict().items() if k not in COMPILE_TIME_SECTIONS}


def _restore_ints(value: Any, tp: Any) -> Any:
    """``value`` with integral floats turned back into ints wherever the annotation ``tp`` wants an int."""
    origin = typing.get_origin(tp)
    if tp is int:
        return int(value) if isinstance(value, float) and value.is_integer() else value
    if origin in (typing.Union, types.UnionType):
        if int in typing.get_args(tp) and float not in typing.get_args(tp):
            return _restore_ints(value, int)
        return value
    if origin in (list, tuple) and isinstance(value, list):
        (item_tp, *_) = typing.get_args(tp) or (Any,)
        return [_restore_ints(v, item_tp) for v in value]
    if origin is dict and isinstance(value, dict):
        _, val_tp = typing.get_args(tp) or (Any, Any)
        return {k: _restore_ints(v, val_tp) for k, v in value.items()}
    if dataclasses.is_dataclass(tp) and isinstance(value, dict):
        hints = typing.get_type_hints(tp)
        # Unknown keys pass through untouched so that config_from_dict reports them by name.
        return {k: _restore_ints(v, hints[k]) if k in hints else v for k, v in value.items()}
    return value


def config_from_params(params: dict[str, Any], overrides: list[str] | None = None) -> Moon3Config:
    """Build the checked :class:`Moon3Config` a component runs with.

    Args:
        params: the pipeline's ``params`` struct (sections of ``params.yaml``), as KFP hands it over.
        overrides: ``section.key=value`` strings applied after ``params`` (values parsed as YAML).

    Raises:
        moon3.config.ConfigError: an unknown key or a wrong type; the message names the key.
    """
    values = _restore_ints(copy.deepcopy(params or {}), Moon3Config)
    return config_from_dict(apply_overrides(values, list(overrides or [])))
