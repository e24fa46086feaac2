"""Ablations (method.md section 6): the full model with one MOON3 module switched off, trained on the same
data, for the same steps, from the same seed, so the evaluation's delta measures that module alone.

``no_rl`` is not trained here: once the RL stage exists it is the pretrained model itself.
"""

from __future__ import annotations

from pathlib import Path

# name -> config overrides (dotted keys, as ``--set`` takes them)
ABLATIONS: dict[str, list[str]] = {
    "no_fusion": ["model.fusion=false"],
    "no_fire": ["model.fire=false"],
    # While the full model does not reason (model.reasoning: false, or no traces) this is the same training
    # run: the report shows a zero delta.
    "no_reasoning": ["model.reasoning=false"],
}
ABLATIONS_DIR = Path("models/ablations")
ABLATION_REPORTS_DIR = Path("reports/ablations")


def ablation_overrides(name: str) -> list[str]:
    """The ``--set`` overrides that train ablation ``name``: its switch, its own output and report folders.

    Raises:
        ValueError: ``name`` is not a known ablation.
    """
    if name not in ABLATIONS:
        raise ValueError(f"unknown ablation {name!r}; choose from {', '.join(ABLATIONS)}")
    return [
        *ABLATIONS[name],
        f"train.ablation={name}",
        f"train.out_dir={ABLATIONS_DIR / name}",
        f"train.report_dir={ABLATION_REPORTS_DIR / name}",
    ]
