"""Command lines of multi-process training: ``accelerate launch`` in a pod, ``torchrun`` in a TrainJob.

Both run the same CLI command as DVC (``moon3 train contrastive``) with the config written to a YAML file, so a
pipeline run and ``dvc repro`` train with identical code and parameters.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

TRAIN_MODULE = ["-m", "moon3.cli", "train", "contrastive"]


def infra_path(path: str | Path) -> Path:
    """Resolve a repo-relative infra file (``infra/deepspeed/zero2.json``) to an absolute path.

    Looked up as given (absolute, or relative to the working directory: a repo checkout), then under
    ``$MOON3_HOME`` (the folder the image copies ``infra/`` to).

    Raises:
        FileNotFoundError: naming every place that was tried.
    """
    candidates = [Path(path)]
    if not Path(path).is_absolute() and os.environ.get("MOON3_HOME"):
        candidates.append(Path(os.environ["MOON3_HOME"]) / path)
    for candidate in candidates:
        if candidate.is_file():
            return candidate.resolve()
    tried = ", ".join(str(c) for c in candidates)
    raise FileNotFoundError(f"{path}: not found (tried {tried}); set MOON3_HOME to the folder holding infra/")


def train_args(params_file: str | Path, data_dir: str | Path, out_dir: str | Path, report_dir: str | Path) -> list[str]:
    """Arguments of ``moon3 train contrastive`` (resuming: a restarted pod continues from its checkpoints)."""
    return ["--params", str(params_file), "--data-dir", str(data_dir), "--out-dir", str(out_dir),
            "--report-dir", str(report_dir), "--resume"]  # fmt: skip


def accelerate_command(
    num_processes: int, accelerate_config: str | Path, deepspeed_config: str | Path, args: list[str]
) -> list[str]:
    """``accelerate launch`` of the training CLI on ``num_processes`` local processes (one per GPU).

    The DeepSpeed file is passed explicitly so the relative path inside the accelerate YAML never matters.
    """
    if num_processes < 2:
        raise ValueError(f"accelerate_command: num_processes={num_processes}; one process trains in-process")
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(accelerate_config),
            "--deepspeed_config_file", str(deepspeed_config), "--num_processes", str(num_processes),
            "--num_machines", "1", *TRAIN_MODULE, *args]  # fmt: skip


def torchrun_command(args: list[str]) -> list[str]:
    """``torchrun`` of the training CLI; node count, rank and rendezvous come from the ``PET_*`` variables
    that Kubeflow Trainer's torch runtime sets in every TrainJob pod."""
    return ["torchrun", *TRAIN_MODULE, *args]
