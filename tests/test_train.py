"""Contrastive pretraining for real: cross-rank negatives, DeepSpeed ZeRO-2 on CPU, kill-and-resume."""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import mlflow_server_at, subprocess_env
from safetensors.torch import load_file

from moon3.config import load_config
from moon3.model.contract import load_contract
from moon3.model.embedder import Moon3Embedder
from moon3.model.items import catalog_texts
from moon3.train.checkpoint import latest_checkpoint

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
FAST = [
    "train.traces_dir=",
    "train.heldout_queries=0",
    "train.log_every=1",
    "train.batch_size=8",
    "train.warmup_steps=10",
    "train.lr=3e-4",
]


def _env(tmp_path: Path) -> dict[str, str]:
    return subprocess_env(tmp_path)


@pytest.fixture(scope="module")
def init_model(mini_dataset, tmp_path_factory) -> Path:
    """One untrained tiny model, copied into each run's out_dir so every run starts from the same weights."""
    cfg = load_config(None)
    path = tmp_path_factory.mktemp("init") / "init"
    torch.manual_seed(0)
    Moon3Embedder.from_config(cfg.model, catalog_texts(mini_dataset)).save_pretrained(path)
    return path


def _out_dir(tmp_path: Path, name: str, init_model: Path) -> Path:
    out = tmp_path / name
    shutil.copytree(init_model, out / "init")
    return out


def _train_cmd(out: Path, data: Path, sets: list[str], resume: bool = False) -> list[str]:
    cmd = [str(BIN / "moon3"), "train", "contrastive", "--params", str(REPO / "params.yaml"),
           "--data-dir", str(data), "--out-dir", str(out), "--report-dir", str(out / "reports")]  # fmt: skip
    for item in FAST + sets:
        cmd += ["--set", item]
    return cmd + (["--resume"] if resume else [])


def test_two_rank_loss_equals_single_process(mini_dataset, init_model, tmp_path):
    """Negatives gathered from 2 gloo ranks give the single-process loss (and gradients) on the same batch."""
    worker = str(REPO / "tests" / "workers" / "infonce_rank.py")
    env = _env(tmp_path)
    single, double = tmp_path / "single.safetensors", tmp_path / "double.safetensors"
    subprocess.run([sys.executable, worker, str(init_model), str(mini_dataset), str(single)],
                   env=env, check=True, capture_output=True)  # fmt: skip
    result = subprocess.run(
        [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", "29531", worker,
         str(init_model), str(mini_dataset), str(double)],
        env=env, capture_output=True, text=True,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    a, b = load_file(single), load_file(double)
    assert abs(a["loss"].item() - b["loss"].item()) < 1e-5, (a["loss"], b["loss"])
    assert a["loss"].item() > 0.1  # an untrained model: a real, non-trivial loss
    for name in ("temperature.log_tau", "embedder.proj.weight"):
        assert torch.allclose(a[name], b[name], atol=1e-6, rtol=1e-4), name


def test_training_loss_falls_and_writes_outputs(mini_dataset, init_model, tmp_path):
    out = _out_dir(tmp_path, "run", init_model)
    result = subprocess.run(_train_cmd(out, mini_dataset, ["train.steps=60", "train.save_every=30"]),
                            env=_env(tmp_path), capture_output=True, text=True)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert (out / "final" / "moon3_config.json").exists()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000030", "step-000060"]
    losses = [
        float(line.split()[1])
        for line in (out / "reports/dvclive/plots/metrics/infonce.tsv").read_text().splitlines()[1:]
    ]  # noqa: E501
    assert len(losses) == 60
    # The untrained tiny model sits on a plateau near the collapsed loss for ~20 steps, then learns.
    assert sum(losses[-10:]) / 10 < sum(losses[:10]) / 10 - 0.3, losses
    summary = json.loads((out / "reports" / "train_metrics.json").read_text())
    # The temperature learns at its own rate; FIRE's gates are open (tanh(1) at init) and stay so.
    assert abs(summary["final_temperature"] - 0.05) > 1e-3, summary
    assert summary["final_fire_gate_abs_mean"] > 0.1, summary
    gates = (out / "reports/dvclive/plots/metrics/fire_gate_abs_mean.tsv").read_text().splitlines()[1:]
    assert len(gates) == 60
    # Honest reasoning flag: no traces in this data, so the model is saved (and loads) with reasoning off.
    contract, payload = load_contract(out / "final")
    assert (contract.reasoning, contract.trained_with_traces) == (False, False)
    assert payload["training"]["steps"] == 60 and payload["training"]["traces"] is False
    assert Moon3Embedder.from_pretrained(out / "final").contract.reasoning is False
    # FIRE's zero-initialised last layers really moved.
    heads = load_file(out / "final" / "moon3_heads.safetensors")
    assert heads["fire.mlps.0.2.weight"].abs().max() > 0
    assert (heads["fire.alpha"] != 1.0).all()  # the gates learn too, not only the MLPs behind them


def test_sigkill_then_resume_matches_uninterrupted_run(mini_dataset, init_model, tmp_path):
    sets = ["train.steps=10", "train.save_every=4"]
    env = _env(tmp_path)
    reference = _out_dir(tmp_path, "reference", init_model)
    subprocess.run(_train_cmd(reference, mini_dataset, sets), env=env, check=True, capture_output=True)

    killed = _out_dir(tmp_path, "killed", init_model)
    proc = subprocess.Popen(_train_cmd(killed, mini_dataset, sets), env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.time() + 300
    while latest_checkpoint(killed) is None and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    # Killed after its first checkpoint (step 4; step 8 if this machine is very fast) and before the end.
    interrupted_at = int(latest_checkpoint(killed).name.split("-")[1])
    assert interrupted_at in (4, 8) and not (killed / "final").exists()
    # The MLflow run id a resume continues is in the reports' run.json, not in the checkpoint (a DVC output).
    run_id = json.loads((killed / "reports" / "run.json").read_text())["mlflow_run_id"]
    assert run_id and "mlflow_run_id" not in (latest_checkpoint(killed) / "state.json").read_text()

    resumed = subprocess.run(_train_cmd(killed, mini_dataset, sets, resume=True), env=env,
                             capture_output=True, text=True)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stdout and f"(step {interrupted_at})" in resumed.stdout
    resumed_run = json.loads((killed / "reports" / "run.json").read_text())
    assert resumed_run["mlflow_run_id"] == run_id and resumed_run["pairs_per_second"] > 0
    a = Moon3Embedder.from_pretrained(reference / "final").state_dict()
    b = Moon3Embedder.from_pretrained(killed / "final").state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-6), key


@pytest.mark.slow
def test_deepspeed_zero2_two_cpu_ranks_save_and_resume(mini_dataset, init_model, tmp_path):
    """DeepSpeed ZeRO-2 with 2 CPU processes (gloo) trains, checkpoints, and resumes from its checkpoint."""
    out = _out_dir(tmp_path, "ds", init_model)
    ds = ["train.deepspeed_config=" + str(REPO / "infra/deepspeed/zero2.json"), "train.save_every=2"]
    launcher = [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", "29533", "-m", "moon3.cli"]
    first = subprocess.run(launcher + _train_cmd(out, mini_dataset, ds + ["train.steps=4"])[1:],
                           env=_env(tmp_path), capture_output=True, text=True, timeout=600)  # fmt: skip
    assert first.returncode == 0, first.stderr[-4000:]
    ckpt = latest_checkpoint(out)
    assert ckpt.name == "step-000004" and (ckpt / "ds").is_dir() and (ckpt / "rng-rank1.pt").exists()
    # Extending the run (steps 4 -> 6) changes a training setting: allowed explicitly, and printed.
    extend = [*_train_cmd(out, mini_dataset, ds + ["train.steps=6"], resume=True)[1:], "--allow-config-change"]
    second = subprocess.run(launcher + extend,
                            env=_env(tmp_path), capture_output=True, text=True, timeout=600)  # fmt: skip
    assert second.returncode == 0, second.stderr[-4000:]
    assert "resuming from" in second.stdout and "(step 4)" in second.stdout
    assert "train.steps: 4 -> 6" in second.stdout
    assert latest_checkpoint(out).name == "step-000006"
    assert (out / "final" / "moon3_config.json").exists()


@pytest.fixture
def mlflow_server(tmp_path):
    """A real MLflow tracking server on loopback (sqlite store, local artifact root)."""
    with mlflow_server_at(tmp_path) as url:
        yield url


def test_training_is_tracked_in_a_real_mlflow_server(mini_dataset, init_model, tmp_path, mlflow_server):
    from mlflow.tracking import MlflowClient

    out = _out_dir(tmp_path, "tracked", init_model)
    env = {**_env(tmp_path), "MLFLOW_TRACKING_URI": mlflow_server}
    result = subprocess.run(_train_cmd(out, mini_dataset, ["train.steps=4", "train.save_every=4"]), env=env,
                            capture_output=True, text=True)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    client = MlflowClient(mlflow_server)
    (run,) = client.search_runs([client.get_experiment_by_name("moon3").experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.params["train.steps"] == "4" and run.data.params["model.backbone"] == "tiny"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "infonce")] == [1, 2, 3, 4]
    assert run.data.metrics["final_infonce"] > 0
    files = {f.path for f in client.list_artifacts(run.info.run_id, "model")}
    assert {"model/moon3_config.json", "model/moon3_heads.safetensors", "model/backbone"} <= files


def test_empty_mlflow_experiment_is_mlflow_off_dvclive_on(tmp_path, monkeypatch):
    """The Tracker behind train and rl: an empty (or blank) experiment starts no MLflow run; dvclive still logs."""
    import mlflow

    from moon3.train.tracking import Tracker

    def no_mlflow(*args, **kwargs):
        raise AssertionError("MLflow must not be called when the experiment name is empty")

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlruns.db")
    for name in ("set_experiment", "start_run", "log_metrics", "log_params", "log_artifacts", "end_run"):
        monkeypatch.setattr(mlflow, name, no_mlflow)
    for experiment in ("", "  "):
        live = tmp_path / f"live{len(experiment)}"
        tracker = Tracker(True, experiment, "pretrain", live, {"train": {"steps": 2}})
        assert tracker.enabled and not tracker.mlflow_on and tracker.run_id is None
        tracker.log_metrics({"infonce": 1.5}, 1)
        tracker.log_metrics({"infonce": 1.0}, 2)
        tracker.log_summary({"final_infonce": 1.0})
        tracker.log_model_dir(tmp_path)
        tracker.close()
        assert (live / "plots/metrics/infonce.tsv").read_text().splitlines()[1:] == ["1\t1.5", "2\t1.0"]
    assert not (tmp_path / "mlruns.db").exists()


def test_untracked_run_prints_progress_lines_when_stderr_is_a_pipe(mini_dataset, init_model, tmp_path):
    """`--set train.mlflow_experiment=` trains without MLflow; off a terminal (dvc repro in CI, a log file) the
    trainer prints plain progress lines with done/total, ETA and rate instead of nothing."""
    out = _out_dir(tmp_path, "untracked", init_model)
    env = {**_env(tmp_path), "MOON3_PROGRESS_INTERVAL": "0"}
    sets = ["train.steps=3", "train.save_every=3", "train.mlflow_experiment="]
    result = subprocess.run(_train_cmd(out, mini_dataset, sets), env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert not (tmp_path / "mlruns.db").exists()
    assert len((out / "reports/dvclive/plots/metrics/infonce.tsv").read_text().splitlines()) == 4
    lines = [line for line in result.stderr.splitlines() if line.startswith("pretrain: ")]
    assert len(lines) == 3, result.stderr[-3000:]
    assert re.fullmatch(r"pretrain: 3/3 \(100%\) elapsed \S+, ETA \S+, [\d.]+(step/s|s/step), loss=.*", lines[-1])
    assert "\r" not in result.stderr
