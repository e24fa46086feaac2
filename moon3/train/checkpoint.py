"""Atomic, resumable training checkpoints.

A checkpoint is a folder ``checkpoints/step-000100`` holding the weights (safetensors), the optimizer and
scheduler state, every rank's RNG state and ``state.json``. It is written under a temporary name and renamed
into place only when complete, so a run killed mid-save leaves the previous checkpoint as the latest one.
Optimizer state is read back with ``torch.load(weights_only=True)``: tensors and plain containers only, never
arbitrary pickled objects.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_model, save_model

STEP_DIR = re.compile(r"^step-(\d{6,})$")


def checkpoint_dir(root: str | Path, step: int) -> Path:
    """``<root>/checkpoints/step-<step>``."""
    return Path(root) / "checkpoints" / f"step-{step:06d}"


def latest_checkpoint(root: str | Path) -> Path | None:
    """The complete checkpoint with the highest step, or None. Half-written (``.tmp``) folders are ignored."""
    folder = Path(root) / "checkpoints"
    if not folder.exists():
        return None
    steps = [(int(m.group(1)), p) for p in folder.iterdir() if (m := STEP_DIR.match(p.name)) and p.is_dir()]
    return max(steps)[1] if steps else None


def rng_state() -> dict[str, torch.Tensor]:
    """This process's torch RNG states (CPU and, if present, CUDA)."""
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, torch.Tensor]) -> None:
    """Restore what :func:`rng_state` returned."""
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save_checkpoint(
    root: str | Path,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    state: dict[str, Any],
    rank: int = 0,
    world_size: int = 1,
    keep: int = 2,
    engine: Any = None,
) -> Path:
    """Write checkpoint ``step`` atomically; every rank must call it (each writes its own RNG state).

    Plain PyTorch / DDP: rank 0 writes weights, optimizer and scheduler. With a DeepSpeed ``engine`` its own
    collective ``save_checkpoint`` writes them (possibly sharded) under ``ds/``. Either way the folder is
    renamed into place only after every rank has finished.
    """
    final = checkpoint_dir(root, step)
    tmp = final.with_name(final.name + ".tmp")
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier(world_size)
    torch.save(rng_state(), tmp / f"rng-rank{rank}.pt")
    if engine is not None:
        engine.save_checkpoint(str(tmp), tag="ds")
    elif rank == 0:
        save_model(model, str(tmp / "model.safetensors"))
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    if rank == 0:
        (tmp / "state.json").write_text(json.dumps({**state, "step": step, "world_size": world_size}, indent=2))
    _barrier(world_size)
    if rank == 0:
        _fsync_files(tmp)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        prune_checkpoints(root, keep)
    _barrier(world_size)
    return final


def load_checkpoint(
    path: str | Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    rank: int = 0,
    engine: Any = None,
) -> dict[str, Any]:
    """Restore weights, optimizer, scheduler (through ``engine`` if given) and this rank's RNG; return state."""
    path = Path(path)
    if engine is not None:
        engine.load_checkpoint(str(path), tag="ds")
    else:
        load_model(model, str(path / "model.safetensors"))
        optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
        scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    rng_file = path / f"rng-rank{rank}.pt"
    if rng_file.exists():
        set_rng_state(torch.load(rng_file, weights_only=True))
    return json.loads((path / "state.json").read_text())


# Keys whose change does not alter what a resumed run computes (where it writes, how often it logs or saves).
RESUME_NEUTRAL_KEYS = frozenset(
    {"out_dir", "report_dir", "mlflow_experiment", "num_workers", "torch_threads", "log_every", "save_every",
     "heldout_queries"}
)  # fmt: skip


def resume_settings(sections: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The settings a checkpoint records and a resume must match: ``{"section.key": value}`` minus
    :data:`RESUME_NEUTRAL_KEYS`."""
    return {
        f"{name}.{key}": value
        for name, section in sections.items()
        for key, value in section.items()
        if key not in RESUME_NEUTRAL_KEYS
    }


def settings_changes(saved: dict[str, Any], current: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """``{key: (saved, current)}`` for every setting that differs (a key only one side has counts too)."""
    keys = sorted(set(saved) | set(current))
    return {k: (saved.get(k), current.get(k)) for k in keys if saved.get(k) != current.get(k)}


class ResumeError(ValueError):
    """A resume that would silently train something other than what the checkpoint started."""


def resume_from_latest(
    root: str | Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    settings: dict[str, Any],
    allow_config_change: bool = False,
    rank: int = 0,
    engine: Any = None,
) -> tuple[Path | None, dict[str, Any], dict[str, tuple[Any, Any]]]:
    """Restore the newest checkpoint that loads, falling back to older complete ones with a warning.

    Args:
        root: the run's output folder (``<root>/checkpoints``).
        model, optimizer, scheduler, rank, engine: as :func:`load_checkpoint`.
        settings: this run's :func:`resume_settings`; compared with the ones the checkpoint recorded.
        allow_config_change: resume even if they differ (the caller logs the returned changes).

    Returns:
        ``(checkpoint or None, its state, changes)``.

    Raises:
        ResumeError: the settings changed and ``allow_config_change`` is false; the message lists the keys.
    """
    folder = Path(root) / "checkpoints"
    candidates = sorted(
        ((int(m.group(1)), p) for p in folder.iterdir() if (m := STEP_DIR.match(p.name)) and p.is_dir()),
        reverse=True,
    ) if folder.exists() else []  # fmt: skip
    for _, path in candidates:
        try:
            recorded = json.loads((path / "state.json").read_text())
        except (OSError, json.JSONDecodeError) as err:
            print(f"warning: {path} is unreadable ({type(err).__name__}); trying an older checkpoint")
            continue
        changes = settings_changes(recorded.get("settings", settings), settings)
        if changes and not allow_config_change:
            detail = "; ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in ((k, *v) for k, v in changes.items()))
            raise ResumeError(
                f"{path}: resuming with changed training settings ({detail}); start a new run (another out_dir), "
                "or pass --allow-config-change to resume anyway (the change is logged)"
            )
        try:
            state = load_checkpoint(path, model, optimizer, scheduler, rank=rank, engine=engine)
        except Exception as err:  # noqa: BLE001 - any unreadable part of a checkpoint means: try the previous one
            print(f"warning: {path} does not load ({type(err).__name__}: {str(err)[:200]}); trying an older one")
            continue
        return path, state, changes
    if candidates:
        # Weights may be half-overwritten by a failed load: starting fresh from them would be silently wrong.
        raise ResumeError(f"{folder}: none of the {len(candidates)} checkpoints loads; remove them to start afresh")
    return None, {}, {}


def prune_checkpoints(root: str | Path, keep: int) -> None:
    """Delete all but the newest ``keep`` complete checkpoints."""
    folder = Path(root) / "checkpoints"
    steps = sorted((int(m.group(1)), p) for p in folder.iterdir() if (m := STEP_DIR.match(p.name)))
    for _, old in steps[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)


def _fsync_files(path: Path) -> None:
    for f in path.rglob("*"):
        if not f.is_file():
            continue
        with open(f, "rb") as handle:
            os.fsync(handle.fileno())


def _barrier(world_size: int) -> None:
    if world_size > 1 and torch.distributed.is_initialized():
        torch.distributed.barrier()
