"""Compile the Kubeflow pipelines of this repo to versioned YAML (``moon3 pipeline compile``).

Pipeline definitions live in ``pipelines/*.py`` of the checkout (each exposes ``build_pipeline(cfg, version)``)
and the components in ``components/<stage>/component.py``; both are loaded by file path, so compiling needs a
checkout, while the image that runs them only needs the installed package.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

from moon3.config import Moon3Config
from moon3.pipelines.version import pipeline_version

REPO = Path(__file__).resolve().parents[2]
PIPELINES_DIR = REPO / "pipelines"
COMPILED_DIR = PIPELINES_DIR / "compiled"
TRAINING_PIPELINE = PIPELINES_DIR / "training_pipeline.py"


def load_module(path: str | Path) -> ModuleType:
    """Import a Python file of the checkout (a component or a pipeline definition) by its path."""
    path = Path(path).resolve()
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such pipeline or component file")
    name = "moon3_kfp_" + "_".join(path.relative_to(REPO).with_suffix("").parts) if path.is_relative_to(REPO) \
        else f"moon3_kfp_{path.stem}"  # fmt: skip
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # inspect.getsource (which KFP uses) needs the module registered
    spec.loader.exec_module(module)
    return module


def load_component(stage: str) -> ModuleType:
    """The module ``components/<stage>/component.py``."""
    return load_module(REPO / "components" / stage / "component.py")


def pipeline_files() -> list[Path]:
    """Every pipeline definition: ``pipelines/*.py`` that defines ``build_pipeline``."""
    return sorted(p for p in PIPELINES_DIR.glob("*.py") if "def build_pipeline(" in p.read_text())


def compile_pipeline(
    cfg: Moon3Config,
    out_path: str | Path | None = None,
    pipeline_file: str | Path = TRAINING_PIPELINE,
    version: str | None = None,
) -> Path:
    """Compile one pipeline with ``cfg`` (placement, image) and its version; return the YAML path.

    Args:
        cfg: the whole config; ``pipeline`` is fixed in the YAML, the stage sections become the ``params``
            default.
        out_path: default ``pipelines/compiled/<pipeline.name>.yaml``.
        pipeline_file: a ``pipelines/*.py`` file with ``build_pipeline(cfg, version)``.
        version: default :func:`moon3.pipelines.version.pipeline_version` of ``cfg``.
    """
    from kfp import compiler

    cfg = _without_credentials(cfg)
    module = load_module(pipeline_file)
    func = module.build_pipeline(cfg, version or pipeline_version(cfg))
    out = Path(out_path) if out_path else COMPILED_DIR / f"{cfg.pipeline.name}.yaml"
    out.parent.mkdir(parents=True, exist_ok=True)
    compiler.Compiler().compile(func, str(out))
    return out


def _without_credentials(cfg: Moon3Config) -> Moon3Config:
    """``cfg`` with every URI's user info and query string redacted: a compiled pipeline is shared and stored, so
    credentials must come from the cluster (a Kubernetes secret, workload identity), never from its YAML."""
    from moon3.common.redact import redact_values
    from moon3.config import config_from_dict

    values = cfg.to_dict()
    clean = redact_values(values)
    if clean != values:
        changed = sorted(_changed_keys(values, clean))
        print(f"compile: credentials removed from {', '.join(changed)}; give them to the pods as a secret "
              "(e.g. MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD)", file=sys.stderr)  # fmt: skip
    return config_from_dict(clean)


def _changed_keys(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict):
        return [k for key in a for k in _changed_keys(a[key], b[key], f"{prefix}.{key}" if prefix else key)]
    return [prefix] if a != b else []
