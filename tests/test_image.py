"""The project image: built offline (``make image``: ``infra/docker/build_image.sh``, or reused by its tag), then the
whole training pipeline run in its containers with ``kfp.local.DockerRunner``, checked by what each step wrote.

Status is not enough: kfp.local reports a container that exits before its logs are read as SUCCESS. So every step
that ran must have left its outputs (tables, traces, model folders with weights, metrics, reports), and every
step of the chain must have run: :data:`STEP_CHECKS` maps each step to its check.

Without a Docker engine that can be started (no root, no ``docker``), these tests skip, unless
``MOON3_REQUIRE_IMAGE=1`` (CI), where they fail. ``MOON3_SKIP_IMAGE=1`` skips them on purpose (a developer who does
not want a ~10 min cold image build inside ``make test``). ``MOON3_IMAGE_TIMES=FILE`` writes the step times of the
pipeline run there as JSON (BENCHMARKS.md).
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pytest
import yaml
from conftest import mlflow_server_at
from test_pipeline import LOCAL, SMALL, artifact_metadata, executor_outputs

from moon3.config import load_config
from moon3.pipelines.compile import REPO, load_module
from moon3.pipelines.version import image_tag

SCRIPT = REPO / "infra" / "docker" / "build_image.sh"
REQUIRE = os.environ.get("MOON3_REQUIRE_IMAGE") == "1"
pytestmark = pytest.mark.slow


def unavailable(reason: str) -> None:
    if REQUIRE:
        pytest.fail(f"MOON3_REQUIRE_IMAGE=1 but {reason}")
    pytest.skip(reason)


def docker(*args: str, timeout: float = 300) -> str:
    out = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"docker {' '.join(args)}: {out.stderr[-2000:]}"
    return out.stdout


@pytest.fixture(scope="module")
def image() -> str:
    """``moon3:<tag of this tree>``: reused when the engine has it, else built (as ``make image``)."""
    if os.environ.get("MOON3_SKIP_IMAGE") == "1" and not REQUIRE:
        pytest.skip("MOON3_SKIP_IMAGE=1")
    env = {**os.environ, "PY": sys.executable}
    tags = {image_tag()}  # this tree's, before and after the build (an edit meanwhile changes it)
    start = time.perf_counter()
    proc = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, env=env, timeout=3600)
    if proc.returncode == 3:  # the script's "no engine and not root" / "tools missing and not root"
        unavailable(f"no Docker engine can be started here: {proc.stderr.strip().splitlines()[-1]}")
    assert proc.returncode == 0, f"build_image.sh failed:\n{proc.stderr[-5000:]}"
    print(proc.stderr, f"build_image.sh: {time.perf_counter() - start:.1f} s", sep="\n")
    match = re.search(r"^IMAGE=(\S+)$", proc.stdout, re.M)
    assert match, proc.stdout
    assert match.group(1) in {f"moon3:{t}" for t in tags | {image_tag()}}, (match.group(1), tags)
    return match.group(1)


def test_image_matches_this_tree_and_the_tested_versions(image):
    """Tagged with a source hash (this tree's: see the fixture); Python 3.11, the CPU torch, and every package at its
    constraints.txt pin."""
    (info,) = json.loads(docker("image", "inspect", image))
    assert re.fullmatch(r"moon3:src-[0-9a-f]{12}", image)
    assert info["Config"]["User"] == "1000:1000"
    assert info["Config"]["Labels"]["org.opencontainers.image.version"] == image.split(":")[1]
    probe = (
        "import sys, torch, importlib.metadata as m; print(sys.version_info[:2] == (3, 11), torch.__version__); "
        "print('\\n'.join(sorted(f\"{d.metadata['Name']}=={d.version}\" for d in m.distributions())))"
    )
    lines = docker("run", "--rm", "--network", "none", image, "python", "-c", probe).splitlines()
    assert lines[0] == "True 2.13.0+cpu"
    pins = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        name, _, version = line.partition("==")
        pins[re.sub(r"[-_.]+", "-", name).lower()] = version
    installed = {re.sub(r"[-_.]+", "-", n).lower(): v for n, _, v in (x.partition("==") for x in lines[1:])}
    installed.pop("moon3")
    installed["torch"] = installed["torch"].removesuffix("+cpu")
    # pip, setuptools, wheel come with the venv, not from the constraints.
    for tool in ("pip", "setuptools", "wheel"):
        installed.pop(tool, None)
    unpinned = sorted(set(installed) - set(pins))
    differ = sorted(f"{n} {v} (pinned {pins[n]})" for n, v in installed.items() if n in pins and pins[n] != v)
    assert not unpinned and not differ, f"not in constraints.txt: {unpinned}; other versions: {differ}"
    assert "Usage" in docker("run", "--rm", "--network", "none", image, "moon3", "--help")


# --- the whole training pipeline in the image -----------------------------------------------------------------------


def check_prepare(run: Path) -> None:
    products = pd.read_parquet(run / "prepare" / "dataset" / "products.parquet")
    assert len(products) == 120 and artifact_metadata(run, "prepare", "stats")["products/total"] == 120
    assert len(pd.read_parquet(run / "prepare" / "dataset" / "queries.parquet")) > 0


def check_validate(run: Path) -> None:
    # The accepted dataset carries its images (relative paths): a later container that gets only this artifact
    # finds them.
    validated_dir = run / "validate" / "validated"
    validated = pd.read_parquet(validated_dir / "products.parquet")
    assert 0 < len(validated) <= 120
    assert all((validated_dir / p).is_file() for p in validated["image"])
    assert executor_outputs(run, "validate")["parameterValues"]["passed"] is True
    assert "<html" in (run / "validate" / "report").read_text().lower()
    assert json.loads((run / "validate" / "details" / "gx_results.json").read_text())


def check_synthesize(run: Path) -> None:
    synth = artifact_metadata(run, "synthesize", "metrics")
    rejected = sum(v for k, v in synth.items() if k.startswith("rejected/"))
    assert synth["in"] == synth["accepted"] + rejected + synth["failed"] and synth["accepted"] > 0
    assert len(pd.read_parquet(run / "synthesize" / "traces" / "traces.parquet")) == synth["accepted"]
    assert "<html" in (run / "synthesize" / "report").read_text().lower()


def model_files(folder: Path) -> dict[Path, bytes]:
    return {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def check_pretrain(run: Path) -> None:
    train_metrics = artifact_metadata(run, "pretrain", "metrics")
    assert train_metrics["steps"] == 6 and train_metrics["final_loss"] > 0
    model, init = model_files(run / "pretrain" / "model"), model_files(run / "pretrain" / "init_model")
    weights = [f for f in model if f.suffix == ".safetensors" and f.name != "training_probe.safetensors"]
    assert len(weights) >= 2 and set(weights) <= set(init)
    assert any(model[w] != init[w] for w in weights), "training changed no weight"
    assert any(f.name == "config.json" for f in model)


def check_rl(run: Path) -> None:
    # model.reasoning: false (SMALL): no traces to train on, so rl passes the pretrained model on unchanged.
    rl_metrics = artifact_metadata(run, "rl", "metrics")
    assert rl_metrics["skipped"] == 1.0 and rl_metrics["steps"] == 0
    assert model_files(run / "rl" / "model") == model_files(run / "pretrain" / "model")


def check_evaluate(run: Path) -> None:
    from moon3.pipelines.steps import flat_numbers

    details = json.loads((run / "evaluate" / "details" / "metrics.json").read_text())
    metrics = artifact_metadata(run, "evaluate", "metrics")
    assert metrics == flat_numbers(details)
    assert any(k.startswith("trained/") for k in metrics) and any(k.startswith("untrained/") for k in metrics)
    shares = {k: v for k, v in metrics.items() if ("recall" in k or "accuracy" in k) and not k.startswith("deltas/")}
    assert shares and all(0.0 <= v <= 1.0 for v in shares.values()), shares
    assert "<table" in (run / "evaluate" / "report").read_text()
    assert "|" in (run / "evaluate" / "summary").read_text()


def check_fingerprint(run: Path) -> None:
    assert executor_outputs(run, "fingerprint")["parameterValues"]["Output"] == "generated:mbe3-mini"


def check_register(run: Path) -> None:
    assert str(executor_outputs(run, "register")["parameterValues"]["version"]) == "1"


def check_gate(run: Path) -> None:
    gate = executor_outputs(run, "gate")["parameterValues"]
    assert gate["passed"] is True, gate
    assert "| metric |" in (run / "gate" / "table").read_text()


def check_deploy(run: Path) -> None:
    docs = yaml.safe_load_all((run / "deploy" / "manifests" / "manifests.yaml").read_text())
    isvc = [d for d in docs if d["kind"] == "InferenceService"]
    assert len(isvc) == 1 and isvc[0]["metadata"]["annotations"]["moon3.io/registry-version"] == "1"


# Every step the pipeline must have run, and what it must have left. A new step: add its check here.
STEP_CHECKS: dict[str, Callable[[Path], None]] = {
    "fingerprint": check_fingerprint,
    "prepare": check_prepare,
    "validate": check_validate,
    "synthesize": check_synthesize,
    "pretrain": check_pretrain,
    "rl": check_rl,
    "evaluate": check_evaluate,
    "register": check_register,
    "gate": check_gate,
    "deploy": check_deploy,
}


@pytest.fixture
def mlflow_url(tmp_path) -> str:
    """A real MLflow server on 127.0.0.1 that serves artifacts itself (the containers share the host network)."""
    with mlflow_server_at(tmp_path / "mlflow", serve_artifacts=True) as url:
        yield url


def test_whole_pipeline_runs_in_the_image(image, mlflow_url, tmp_path, monkeypatch):
    from kfp import local

    monkeypatch.chdir(tmp_path)
    root = tmp_path / "kfp-root"
    root.mkdir()
    root.chmod(0o1777)  # the image's user (uid 1000) writes the step outputs here
    # Host network: the engine runs without a bridge, and the steps reach the MLflow server on 127.0.0.1.
    local.init(runner=local.DockerRunner(network_mode="host"), pipeline_root=str(root))
    repository, tag = image.rsplit(":", 1)
    # One image for every step (no GPU here): the CUDA steps' placement off, so they take the CPU image too.
    cfg = load_config(
        REPO / "params.yaml",
        [*LOCAL, f"pipeline.image={repository}", f"pipeline.gpu_image={repository}", f"pipeline.image_tag={tag}",
         "pipeline.image_pull_policy=Never", "pipeline.train_accelerator_limit=0", "pipeline.eval_accelerator_limit=0",
         f"pipeline.mlflow_tracking_uri={mlflow_url}", "pipeline.deploy=render"],
    )  # fmt: skip
    pipeline = load_module(REPO / "pipelines" / "training_pipeline.py").build_pipeline(cfg, "9.9.9+gimage")
    timer = load_module(REPO / "bench" / "bench_pipeline.py").StepTimer()
    logging.getLogger().addFilter(timer)
    start = time.perf_counter()
    try:
        pipeline(overrides=[*SMALL, "promotion.min_values={}"])  # a 6-step model passes the promotion gate
    finally:
        logging.getLogger().removeFilter(timer)
    total = round(time.perf_counter() - start, 1)
    print(f"pipeline in {image}: {total} s, steps {timer.seconds}")
    if os.environ.get("MOON3_IMAGE_TIMES"):
        Path(os.environ["MOON3_IMAGE_TIMES"]).write_text(
            json.dumps({"image": image, "total_s": total, "steps_s": timer.seconds}, indent=2)
        )
    (run,) = list(root.iterdir())
    ran = {p.name for p in run.iterdir() if (p / "executor_output.json").is_file()}
    missing = sorted(set(STEP_CHECKS) - ran)
    assert not missing, f"steps that left no executor output: {missing} (ran: {sorted(ran)})"
    for step, check in STEP_CHECKS.items():
        try:
            check(run)
        except (AssertionError, OSError, KeyError, ValueError) as err:
            raise AssertionError(f"step {step!r}: {err!r}") from err
    assert not (run / "gate-failed").exists()
    # The steps reached the MLflow server on the host from their containers: training logged a run, register
    # created version 1 (with its lineage) and the gate made it champion.
    from mlflow.tracking import MlflowClient

    client = MlflowClient(mlflow_url)
    experiment = client.get_experiment_by_name(cfg.train.mlflow_experiment)
    assert experiment is not None, "the pretrain step logged nothing to MLflow"
    assert any(r.data.metrics for r in client.search_runs([experiment.experiment_id]))
    registered = client.get_model_version("moon3", "1")
    assert registered.tags["data_version"] == "generated:mbe3-mini" and registered.tags["pipeline_run_id"]
    assert str(client.get_registered_model("moon3").aliases["champion"]) == "1"


def test_dockerfiles_install_the_tested_versions():
    """Defect 7, the half no machine here can build (the CUDA image needs registry images): both Dockerfiles install
    every dependency under constraints.txt, torch as the pinned version's CPU or CUDA build, on CPython 3.11."""
    cpu = (REPO / "infra" / "docker" / "Dockerfile").read_text()
    cuda = (REPO / "infra" / "docker" / "Dockerfile.cuda").read_text()
    for name, text in (("Dockerfile", cpu), ("Dockerfile.cuda", cuda)):
        installs = [line for line in re.split(r"&&|\n", text.replace("\\\n", " ")) if re.search(r"pip install ", line)]
        assert installs, name
        unconstrained = [line.strip() for line in installs if "-c constraints.txt" not in line and ".whl" not in line]
        assert not unconstrained, f"{name}: pip install without constraints.txt: {unconstrained}"
        assert "COPY pyproject.toml constraints.txt" in text or "constraints.txt" in text.split("RUN")[0], name
    assert re.search(r"ARG PYTHON_IMAGE=python:3\.11-", cuda) and "FROM ${PYTHON_IMAGE}" in cuda
    assert re.search(r"ARG BASE_IMAGE=python:3\.11-", cpu)
    assert "cu128" in cuda and "+${TORCH_VARIANT}" in cuda
    for name in ("Dockerfile.dockerignore", "Dockerfile.cuda.dockerignore"):
        assert "!constraints.txt" in (REPO / "infra" / "docker" / name).read_text(), name
