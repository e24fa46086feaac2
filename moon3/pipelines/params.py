"""The stage configuration as a KFP pipeline parameter, and back.

The compiled pipeline takes the whole stage configuration as one ``params`` string (default: ``params.yaml``'s
stage sections as one line of JSON, which is YAML too) plus ``overrides`` (``section.key=value`` strings, the
CLI's ``--set``). A string, not a struct: KFP stores a struct as a protobuf ``Struct``, where every number is a
double, so the UI would show ``train.steps: 300`` as ``300.0``. A struct still works (an older run, a client that
sends a dict): :func:`config_from_params` turns integral floats back into ints where the config class says
``int``, then checks everything as usual.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import types
import typing
from pathlib import Path
from typing import Any

import yaml

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
    from moon3.pipelines.version import image_ref, image_tag

    pc = load_config(REPO_PARAMS if REPO_PARAMS.exists() else None).pipeline
    return image_ref(pc.image, pc.image_tag or image_tag())


def pipeline_params(cfg: Moon3Config) -> dict[str, Any]:
    """Every stage section of ``cfg`` (what the pipeline's ``params`` argument holds)."""
    return {k: v for k, v in cfg.to_dict().items() if k not in COMPILE_TIME_SECTIONS}


def params_text(cfg: Moon3Config) -> str:
    """The default of the pipeline's ``params`` argument: :func:`pipeline_params` as one line of JSON."""
    return json.dumps(pipeline_params(cfg), ensure_ascii=False, separators=(", ", ": "))


def parse_params(params: str | dict[str, Any] | None) -> dict[str, Any]:
    """The ``params`` argument as a dict: a YAML/JSON string (what the pipeline declares) or a struct.

    Raises:
        moon3.config.ConfigError: text that is not a YAML mapping.
    """
    from moon3.config import ConfigError

    if params is None or isinstance(params, dict):
        return copy.deepcopy(params or {})
    try:
        values = yaml.safe_load(params) if params.strip() else {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        raise ConfigError(f"params: not valid YAML/JSON{where}: {getattr(err, 'problem', err)}") from None
    if not isinstance(values, dict):
        raise ConfigError(f"params: expected a mapping of sections, got {type(values).__name__}")
    return values


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


def config_from_params(params: str | dict[str, Any], overrides: list[str] | None = None) -> Moon3Config:
    """Build the checked :class:`Moon3Config` a component runs with.

    Args:
        params: the pipeline's ``params`` (sections of ``params.yaml``): YAML/JSON text, or a struct as KFP
            hands one over (numbers as floats).
        overrides: ``section.key=value`` strings applied after ``params`` (values parsed as YAML).

    Raises:
        moon3.config.ConfigError: an unknown key or a wrong type; the message names the key.
    """
    values = _restore_ints(parse_params(params), Moon3Config)
    return config_from_dict(apply_overrides(values, list(overrides or [])))
