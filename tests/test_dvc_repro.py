"""The DVC pipeline reproduces itself (issue 18): two `dvc repro evaluate` runs from scratch, in two folders, record
the same dvc.lock (every output's md5), and a second `dvc repro` in the same folder runs no stage. A small config
with reasoning on, so that synthesize, trace SFT, GRPO and trace generation in evaluate all run."""

from __future__ import annotations

import difflib
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import subprocess_env

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

SMALL = {
    ("data", "n_products"): 60,
    ("data", "n_queries"): 60,
    ("data", "image_size"): 32,
    ("model", "reasoning"): True,
    ("train", "steps"): 6,
    ("train", "batch_size"): 4,
    ("train", "save_every"): 3,
    ("train", "heldout_queries"): 8,
    ("train", "log_every"): 2,
    ("rl", "steps"): 2,
    ("rl", "queries_per_step"): 2,
    ("rl", "num_generations"): 2,
    ("rl", "save_every"): 1,
    ("eval", "bootstrap_samples"): 20,
    ("eval", "example_queries"): 1,
    ("eval", "curve_ks"): [1, 5, 10],
    ("eval", "other_reasoning_mode"): False,
    ("eval", "ablation_dirs"): {},
}
MAIN_CHAIN = ["source", "prepare", "validate", "synthesize", "pretrain", "rl", "evaluate"]
# What changes from run to run: beside the reports, in files that are no DVC outputs.
RUN_FILES = ("reports/validation/run.json", "reports/synthesis/run.json", "reports/pretrain/run.json",
             "reports/rl/rl_run.json", "reports/eval/run.json")  # fmt: skip


def make_project(root: Path) -> Path:
    """This checkout's stage code, dvc.yaml and .dvcignore with a small params.yaml, in a new DVC project."""
    root.mkdir(parents=True)
    shutil.copytree(REPO / "moon3", root / "moon3", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    for (section, key), value in SMALL.items():
        assert key in params[section], f"params.yaml has no {section}.{key}"
        params[section][key] = value
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    shutil.copy(REPO / "dvc.yaml", root / "dvc.yaml")
    finish(start(root, "init", "--no-scm", "-q"))
    shutil.copy(REPO / ".dvcignore", root / ".dvcignore")
    return root


def start(root: Path, *args: str) -> tuple[subprocess.Popen, Path]:
    """``dvc ARGS`` in ``root``, its output to ``<root>.log``."""
    env = subprocess_env(root.parent / f"{root.name}-env")
    # PYTHONPATH: the stages import the project's moon3, not the checkout the venv's editable install points at.
    env.update(PATH=f"{BIN}:{env.get('PATH', '/usr/bin:/bin')}", PYTHONPATH=str(root), DVC_NO_ANALYTICS="1",
               MPLCONFIGDIR=str(root.parent / "mpl"), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")  # fmt: skip
    log = root.parent / f"{root.name}.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([str(BIN / "dvc"), *args], cwd=root, env=env, stdout=out, stderr=subprocess.STDOUT)
    return proc, log


def finish(started: tuple[subprocess.Popen, Path]) -> str:
    """Wait for a :func:`start` (killed after 10 minutes); its output."""
    proc, log = started
    try:
        proc.wait(timeout=600)
    finally:
        proc.kill()
    text = log.read_text()
    assert proc.returncode == 0, f"{' '.join(proc.args)} failed:\n{text[-6000:]}"
    return text


def ran(output: str) -> list[str]:
    return re.findall(r"Running stage '([^']+)'", output)


def outs(lock: str) -> dict[str, str]:
    stages = yaml.safe_load(lock)["stages"]
    return {f"{stage}: {o['path']}": o["md5"] for stage, entry in stages.items() for o in entry.get("outs", [])}


@pytest.mark.slow
def test_dvc_repro_is_reproducible_and_a_second_repro_runs_nothing(tmp_path):
    # Two runs from scratch in two folders, side by side (one OpenMP thread each, as on one machine).
    first, second = make_project(tmp_path / "a"), make_project(tmp_path / "b")
    runs = [start(first, "repro", "evaluate"), start(second, "repro", "evaluate")]
    output = [finish(run) for run in runs][0]
    assert ran(output) == MAIN_CHAIN, output[-3000:]
    assert json.loads((first / "reports/rl/rl_metrics.json").read_text())["skipped"] is False  # GRPO really ran

    # They wrote the same bytes: the same dvc.lock, every output's md5 with it.
    lock_a, lock_b = (first / "dvc.lock").read_text(), (second / "dvc.lock").read_text()
    differ = sorted(k for k, md5 in outs(lock_a).items() if outs(lock_b).get(k) != md5)
    diff = "".join(difflib.unified_diff(lock_a.splitlines(True), lock_b.splitlines(True), "a/dvc.lock", "b/dvc.lock"))
    assert not differ and lock_a == lock_b, f"outputs that differ: {differ}\n{diff[-4000:]}"
    for run_file in RUN_FILES:
        assert (first / run_file).is_file() and run_file not in lock_a, run_file

    # A second `dvc repro`: only `source` (always_changed: it re-fingerprints the catalog) runs, nothing after it.
    again = finish(start(first, "repro", "evaluate"))
    assert ran(again) == ["source"], again[-3000:]
    status = finish(start(first, "status", "--with-deps", "evaluate"))
    assert "changed" not in status.replace("always changed", ""), status
