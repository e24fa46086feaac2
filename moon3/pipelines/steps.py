"""What each KFP component does, as plain functions over folders (the components only move artifacts).

Every step rebuilds the checked config from the pipeline's ``params`` + ``overrides``
(:func:`moon3.pipelines.params.config_from_params`), points the stage's folders at the artifact paths KFP gives
it, calls the same library function as the CLI and DVC, and returns plain numbers for KFP ``Metrics``.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import yaml

from moon3.pipelines.params import config_from_params


def flat_numbers(values: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """Finite numbers of a nested dict under ``a/b/c`` names (booleans, strings and lists are left out).

    Same names as ``moon3.eval.report.flatten_metrics``, without importing the evaluation stack (faiss) into
    the data steps.
    """
    flat: dict[str, float] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flat_numbers(value, f"{name}/"))
        elif isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
            flat[name] = float(value)
    return flat


def prepare_step(params: str | dict, overrides: list, out_dir: str) -> dict[str, float]:
    """Make or import the dataset into ``out_dir``; return its counts."""
    from moon3.data.prepare import prepare

    cfg = config_from_params(params, overrides)
    cfg.data.out_dir = out_dir
    stats = prepare(cfg.data, progress=False)
    counts = {k: stats[k] for k in ("products", "queries", "query_types")}
    counts["category_level1"] = {"n": len(stats["category_level1"])}
    counts["bytes_on_disk"] = stats["bytes_on_disk"]
    return flat_numbers(counts)


def fingerprint_step(params: str | dict, overrides: list, dataset_uri: str = "") -> str:
    """A content fingerprint of what ``prepare`` (or the importer of ``dataset_uri``) reads.

    The fingerprint is an input of the data steps, so KFP's cache keys on the catalog's content, not on its
    URI: a catalog replaced at the same ``gs://`` path re-runs prepare/validate; an unchanged one stays cached.

    Returns:
        ``kind:digest`` (``generated`` for the built-in sample).
    """
    from moon3.data.fingerprint import source_fingerprint

    cfg = config_from_params(params, overrides)
    if dataset_uri:  # an imported moon3-format folder: fingerprint it like a catalog of that path
        cfg.data.source, cfg.data.source_path = "moon3", dataset_uri
    found = source_fingerprint(cfg.data)
    return f"{found['kind']}:{found.get('digest', cfg.data.source)}"


MEDIA_DIR = "media"
IMAGE_COLUMNS = ("image", "query_image")


def carry_images(out_dir: str | Path, in_dir: str | Path) -> int:
    """Copy the images the accepted tables in ``out_dir`` use from ``in_dir`` into ``out_dir/media``.

    For a pipeline root other than ``gs://`` (MinIO, S3): a later pod receives only its input artifacts, never
    the prepare artifact the tables pointed into, so the validated dataset must carry its images. Paths become
    relative to ``out_dir`` (``media/images/x.png``), which every reader resolves against the table's folder.
    Hard links when both folders share a filesystem, else copies. ``gs://`` URIs and absolute paths are kept.

    Returns:
        The number of files carried.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    out, src_root = Path(out_dir).resolve(), Path(in_dir).resolve()
    carried: set[Path] = set()
    for table_path in sorted(out.glob("*.parquet")):
        table = pq.read_table(table_path)
        changed = False
        for column in (c for c in IMAGE_COLUMNS if c in table.column_names):
            values = table.column(column).to_pylist()
            new_values = []
            for value in values:
                if not value or value.startswith("gs://") or os.path.isabs(value):
                    new_values.append(value)
                    continue
                src = Path(os.path.normpath(out / value))
                if not src.is_relative_to(src_root) or not src.is_file():
                    new_values.append(value)  # outside the dataset (only in quarantined rows): left as written
                    continue
                rel = Path(MEDIA_DIR) / src.relative_to(src_root)
                dest = out / rel
                if src not in carried:
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    if not dest.exists():
                        try:
                            os.link(src, dest)
                        except OSError:
                            shutil.copyfile(src, dest)
                    carried.add(src)
                new_values.append(rel.as_posix())
            if new_values != values:
                index = table.column_names.index(column)
                table = table.set_column(index, table.schema.field(index), pa.array(new_values, pa.string()))
                changed = True
        if changed:
            pq.write_table(table, table_path)
    return len(carried)


def validate_step(
    params: str | dict, overrides: list, in_dir: str, in_uri: str, out_dir: str, quarantine_dir: str,
    report_dir: str,
) -> dict[str, Any]:  # fmt: skip
    """Run the validation gate on ``in_dir``.

    With a ``gs://`` input artifact the accepted tables point at its images by URI (``validation.image_root``),
    so the accepted dataset stays small and resolves in any pod. With any other pipeline root (MinIO, S3, a
    local ``kfp.local`` folder) the accepted dataset carries its images (:func:`carry_images`).

    Returns:
        ``passed``, ``metrics`` (flat numbers), ``summary`` (one line per blocking failure, or ``passed``) and
        ``html`` (path of the report).
    """
    from moon3.validation.gate import validate

    cfg = config_from_params(params, overrides)
    by_uri = in_uri.startswith("gs://")
    if by_uri and not cfg.validation.image_root:
        cfg.validation.image_root = in_uri
    result = validate(cfg.validation, in_dir=in_dir, out_dir=out_dir, quarantine_dir=quarantine_dir,
                      report_dir=report_dir, progress=False)  # fmt: skip
    if result.passed and not by_uri and not cfg.validation.image_root:
        print(f"validate: {carry_images(out_dir, in_dir)} images carried in the validated dataset", flush=True)
    lines = [f"{f.table}: {f.check} ({f.count}): {f.message or f.expectation}" for f in result.failures if f.blocking]
    return {
        "passed": bool(result.passed),
        "metrics": flat_numbers(result.metrics),
        "summary": "passed" if result.passed else "validation gate failed: " + "; ".join(lines),
        "html": str(result.paths.get("html_report", Path(report_dir) / "validation_report.html")),
    }


def _copy_model(src: Path, dest: str) -> None:
    if not src.is_dir():
        raise FileNotFoundError(f"training wrote no model folder {src}")
    shutil.copytree(src, dest, dirs_exist_ok=True)


def write_params(cfg: Any, path: Path) -> Path:
    """Write a resolved config as a ``params.yaml`` the CLI reads back unchanged."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    return path


def training_summary(report_dir: Path) -> dict[str, Any]:
    """What a training subprocess left in ``report_dir``: ``train_metrics.json`` plus the wall-clock numbers of
    ``run.json`` (seconds, pairs/s; kept out of the DVC-tracked metrics because they differ run to run)."""
    from moon3.common.provenance import RUN_FILE

    summary = json.loads((report_dir / "train_metrics.json").read_text())
    run_file = report_dir / RUN_FILE
    if run_file.is_file():
        summary.update({k: v for k, v in json.loads(run_file.read_text()).items() if k != "mlflow_run_id"})
    return summary


def work_folder(scratch_dir: str, run_id: str) -> Path:
    """This run's folder on the scratch volume (stable across pod retries, so training resumes), else a temp."""
    if scratch_dir:
        folder = Path(scratch_dir) / (run_id or "run")
        folder.mkdir(parents=True, exist_ok=True)
        return folder
    return Path(tempfile.mkdtemp(prefix="moon3-pretrain-"))


def synthesize_step(
    params: str | dict, overrides: list, data_dir: str, traces_dir: str, report_dir: str
) -> dict[str, Any]:
    """Trace synthesis on the validated dataset: accepted traces to ``traces_dir``, reports to ``report_dir``.

    Returns:
        ``metrics`` (flat numbers of ``synthesis_report.json``) and ``html`` (path of the report).
    """
    from moon3.synthesis.synthesize import synthesize

    cfg = config_from_params(params, overrides)
    if not Path(cfg.synthesis.cache_path).is_absolute():  # the pod's working folder may be read-only: keep the
        cfg.synthesis.cache_path = str(Path(report_dir) / "teacher_cache.sqlite")  # cache with the step's details
    report = synthesize(cfg, data_dir, traces_dir, report_dir, progress=False)
    numbers = {k: v for k, v in report.items() if k not in ("examples", "grounded_score_histogram")}
    return {"metrics": flat_numbers(numbers), "html": str(Path(report_dir) / "synthesis_report.html")}


def pretrain_step(
    params: str | dict,
    overrides: list,
    data_dir: str,
    model_dir: str,
    init_dir: str,
    num_processes: int = 1,
    accelerate_config: str = "",
    deepspeed_config: str = "",
    scratch_dir: str = "",
    run_id: str = "",
    traces_dir: str = "",
    ablation: str = "",
) -> dict[str, float]:
    """Contrastive pretraining; the trained model goes to ``model_dir``, the untrained one to ``init_dir``.

    ``ablation`` (``no_fusion`` | ``no_fire`` | ``no_reasoning``) trains that variant (``train.ablation``) with
    the same data, steps and seed, in its own folder on the scratch volume.

    One process trains in this process. More run ``accelerate launch`` (one process per GPU) over the
    training CLI with the DeepSpeed config; checkpoints stay on ``scratch_dir`` (a PVC), so a retried pod
    resumes instead of starting over.

    Returns:
        The training summary (final loss, temperature, pairs/s, steps, world size).
    """
    from moon3.pipelines.launch import accelerate_command, infra_path, train_args

    if ablation:  # the variant's switch first, so an explicit override still wins (as `--ablation` on the CLI)
        from moon3.train.ablations import ABLATIONS

        if ablation not in ABLATIONS:
            raise ValueError(f"unknown ablation {ablation!r}; choose from {', '.join(ABLATIONS)}")
        overrides = [*ABLATIONS[ablation], f"train.ablation={ablation}", *(overrides or [])]
    cfg = config_from_params(params, overrides)
    cfg.train.traces_dir = traces_dir  # the synthesize step's artifact ('' = none), never a pod-relative path
    work = work_folder(scratch_dir, f"{run_id}-{ablation}" if ablation else run_id)
    out, reports = work / "pretrain", work / "reports"
    env = dict(os.environ)
    env.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{work / 'mlruns.db'}")
    if num_processes > 1:
        cfg.train.deepspeed_config = str(infra_path(deepspeed_config))
        args = train_args(write_params(cfg, work / "params.yaml"), data_dir, out, reports)
        cmd = accelerate_command(num_processes, infra_path(accelerate_config), cfg.train.deepspeed_config, args)
        print("running:", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True, env=env)
        summary = training_summary(reports)
    else:
        from moon3.train.contrastive import train_contrastive

        os.environ.setdefault("MLFLOW_TRACKING_URI", env["MLFLOW_TRACKING_URI"])
        summary = train_contrastive(cfg, data_dir, out_dir=out, report_dir=reports, resume=True, progress=False)
    _copy_model(out / "final", model_dir)
    _copy_model(out / "init", init_dir)
    return {k: float(v) for k, v in summary.items() if isinstance(v, int | float) and not isinstance(v, bool)}


def rl_step(
    params: str | dict,
    overrides: list,
    dataset_dir: str,
    init_model_dir: str,
    model_out: str,
    scratch_dir: str = "",
    run_id: str = "",
) -> dict[str, float]:
    """GRPO fine-tuning (stage B) of the pretrained model ``init_model_dir``; the RL model goes to ``model_out``.

    Single process only, in this process: multi-GPU RL (``accelerate launch`` over ``moon3 train rl``) is a later
    issue. Checkpoints stay on ``scratch_dir`` (a PVC) under this run's folder, so a retried pod resumes from the
    latest complete one. A starting model trained without traces (or ``rl.enabled: false``) is copied unchanged
    and the metrics say ``skipped``.

    Returns:
        The summary as flat numbers (``init_training/...``, ``timing/...``; no per-step history), with
        ``skipped`` as 1.0 or 0.0.
    """
    from moon3.pipelines.launch import infra_path
    from moon3.rl.finetune import train_rl

    cfg = config_from_params(params, overrides)
    if cfg.rl.deepspeed_config:  # relative to the checkout or $MOON3_HOME, never to the pod's working folder
        cfg.rl.deepspeed_config = str(infra_path(cfg.rl.deepspeed_config))
    work = work_folder(scratch_dir, run_id)
    out, reports = work / "rl", work / "rl-reports"
    os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{work / 'mlruns.db'}")
    summary = train_rl(cfg, dataset_dir, init_dir=init_model_dir, out_dir=out, report_dir=reports, resume=True,
                       progress=False)  # fmt: skip
    _copy_model(out / "final", model_out)
    numbers = flat_numbers({k: v for k, v in summary.items() if k != "history"})
    numbers["skipped"] = float(bool(summary.get("skipped")))  # a boolean, which flat_numbers leaves out
    return numbers


def pretrain_trainjob_step(
    params: str | dict,
    overrides: list,
    pipeline: dict,
    data_dir: str,
    model_dir: str,
    init_dir: str,
    claim_name: str,
    run_id: str,
    api: Any = None,
    traces_dir: str = "",
    pipeline_version: str = "",
    sleep: Any = None,
) -> dict[str, float]:
    """Multi-node pretraining as a Kubeflow Trainer TrainJob on the shared claim mounted at ``pvc_mount_path``.

    Copies the dataset tables and the config to ``<mount>/<run_id>``, submits the TrainJob, waits, and copies
    the model back. Images are read where the tables point (``gs://`` in a cluster), not copied.

    The TrainJob is labelled with the run id and ``pipeline_version`` (default: ``$MOON3_PIPELINE_VERSION``),
    owned by this pod (see :func:`moon3.pipelines.trainjob.launcher_owner`), and deleted when the wait fails,
    times out, or this pod receives SIGTERM (run terminated); a completed one is kept (its logs, and a retried
    pod whose copy failed reuses it instead of training again). ``api`` and ``sleep`` (the poll's) are for tests.

    Raises:
        RuntimeError: the TrainJob failed.
        TimeoutError: it did not finish within ``pipeline.trainjob_timeout_s``.
        moon3.pipelines.trainjob.Terminated: SIGTERM (exit status 143).
    """
    from moon3.pipelines.launch import infra_path, torchrun_command, train_args
    from moon3.pipelines.trainjob import (
        apply_trainjob,
        build_trainjob,
        current_namespace,
        custom_objects_api,
        delete_trainjob,
        launcher_owner,
        raise_on_sigterm,
        trainjob_labels,
        trainjob_name,
        wait_for_trainjob,
    )

    pc = config_from_params({"pipeline": pipeline}).pipeline  # a struct too: ints arrive as floats
    cfg = config_from_params(params, overrides)
    work = work_folder(pc.pvc_mount_path, run_id)
    shutil.copytree(data_dir, work / "data", dirs_exist_ok=True)
    cfg.train.traces_dir = ""  # the synthesize step's artifact, copied onto the claim every node mounts
    if traces_dir:
        shutil.copytree(traces_dir, work / "traces", dirs_exist_ok=True)
        cfg.train.traces_dir = str(work / "traces")
    if pc.num_processes * pc.num_nodes > 1:
        cfg.train.deepspeed_config = str(infra_path(pc.deepspeed_config))
    args = train_args(write_params(cfg, work / "params.yaml"), work / "data", work / "pretrain", work / "reports")
    env = {"MLFLOW_TRACKING_URI": pc.mlflow_tracking_uri} if pc.mlflow_tracking_uri else None
    namespace = pc.trainjob_namespace or current_namespace()
    labels = trainjob_labels(run_id, pipeline_version or os.environ.get("MOON3_PIPELINE_VERSION", ""))
    name = trainjob_name(run_id)
    manifest = build_trainjob(name, pc, torchrun_command(args), claim_name, namespace, env=env, labels=labels,
                              owner=launcher_owner(namespace))  # fmt: skip
    api = api or custom_objects_api()
    finished = False
    with raise_on_sigterm():
        try:
            apply_trainjob(manifest, api, sleep=sleep)
            print(f"submitted TrainJob {namespace}/{name}", flush=True)
            wait_for_trainjob(name, namespace, api, timeout_s=pc.trainjob_timeout_s, sleep=sleep)
            finished = True
        finally:
            if not finished:  # failed, timed out, terminated: free the GPU nodes now
                try:
                    if delete_trainjob(name, namespace, api):
                        print(f"deleted TrainJob {namespace}/{name}", flush=True)
                except Exception as err:  # noqa: BLE001 - never hide the error that got us here
                    print(f"could not delete TrainJob {namespace}/{name}: {err}", flush=True)
    _copy_model(work / "pretrain" / "final", model_dir)
    _copy_model(work / "pretrain" / "init", init_dir)
    summary = training_summary(work / "reports")
    return {k: float(v) for k, v in summary.items() if isinstance(v, int | float) and not isinstance(v, bool)}


def read_confusion(out_dir: str | Path, variant: str = "trained") -> tuple[list[str], list[list[int]]] | None:
    """The level-1 category confusion matrix of ``variant`` from the evaluation's outputs, if it has one.

    Read from ``confusion_level1.json`` (``{"labels", "matrix"}``, top level or per variant) when the evaluation
    writes it, else from ``results.json`` (``details/<variant>/classification/level_1``: ``labels``,
    ``confusion``). None when the task was skipped (e.g. too few eval products).

    Raises:
        ValueError: a matrix whose shape does not match its labels.
    """
    out = Path(out_dir)
    entry: dict[str, Any] = {}
    if (out / "confusion_level1.json").exists():
        data = json.loads((out / "confusion_level1.json").read_text())
        entry = data.get(variant, data)
    elif (out / "results.json").exists():
        details = json.loads((out / "results.json").read_text()).get("details", {})
        entry = details.get(variant, {}).get("classification/level_1") or {}
    labels, matrix = entry.get("labels"), entry.get("matrix", entry.get("confusion"))
    if labels is None or matrix is None:
        return None
    if len(matrix) != len(labels) or any(len(row) != len(labels) for row in matrix):
        raise ValueError(f"{out}: level-1 confusion matrix is not {len(labels)}x{len(labels)} like its labels")
    return [str(x) for x in labels], [[int(v) for v in row] for row in matrix]


def evaluate_step(
    params: str | dict,
    overrides: list,
    data_dir: str,
    model_dir: str,
    baseline_dir: str,
    out_dir: str,
    pretrained_dir: str = "",
    ablation_dirs: dict[str, str] | None = None,
) -> dict:
    """Evaluate the trained model and its untrained baseline on the eval split of ``data_dir``.

    Runs the evaluation stage as the CLI does (``eval.model_dir`` / ``eval.baseline_dir`` pointed at the model
    artifacts; ablation folders that are not in this pod are listed as not evaluated). ``pretrained_dir`` (the
    pretrained model before RL, when ``model_dir`` is the RL model) becomes ``eval.ablation_dirs.no_rl``;
    ``ablation_dirs`` (name -> folder, the pipeline's ablation variants) are added the same way.

    Returns:
        ``metrics`` (flat ``variant/kind/task/metric`` numbers), ``confusion`` (labels, matrix of the trained
        model, or None), ``html`` and ``markdown`` (report paths).
    """
    from moon3.eval.evaluate import run_evaluation

    cfg = config_from_params(params, overrides)
    cfg.eval.model_dir, cfg.eval.baseline_dir, cfg.eval.out_dir = model_dir, baseline_dir, out_dir
    if pretrained_dir:
        cfg.eval.ablation_dirs = {**cfg.eval.ablation_dirs, "no_rl": pretrained_dir}
    if ablation_dirs:
        cfg.eval.ablation_dirs = {**cfg.eval.ablation_dirs, **ablation_dirs}
    run_evaluation(cfg, data_dir, out_dir, progress=False)
    out = Path(out_dir)
    return {
        "metrics": flat_numbers(json.loads((out / "metrics.json").read_text())),
        "confusion": read_confusion(out),
        "html": str(out / "report.html"),
        "markdown": str(out / "report.md"),
    }
