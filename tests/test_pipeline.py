"""Kubeflow pipeline: compiled YAML (placement, version, params defaults), TrainJob manifest, KFP client calls,
the CLI, and whole-pipeline runs with ``kfp.local`` (subprocesses, no Docker).

What cannot run here is faked, and only that: no Kubernetes API server exists (the TrainJob is checked as a
manifest and against a fake ``CustomObjectsApi``) and no KFP API server can run (upload/run are checked against a
fake ``kfp.Client`` that records the calls).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import yaml
from kfp_server_api import ApiException
from typer.testing import CliRunner

from moon3.config import ConfigError, load_config
from moon3.pipelines import client as kfp_client
from moon3.pipelines.compile import REPO, compile_pipeline, load_module, pipeline_files, pipeline_version
from moon3.pipelines.launch import accelerate_command, infra_path, torchrun_command, train_args
from moon3.pipelines.params import config_from_params, pipeline_params
from moon3.pipelines.placement import check_trainer, k8s_tolerations
from moon3.pipelines.steps import pretrain_trainjob_step, read_confusion, rl_step
from moon3.pipelines.trainjob import (
    apply_trainjob,
    build_trainjob,
    trainjob_name,
    trainjob_yaml,
    wait_for_trainjob,
)

PARAMS = REPO / "params.yaml"
COMPILED = REPO / "pipelines" / "compiled" / "moon3-training.yaml"
VERSION = "9.9.9+gtest123"
# Anything that would tie a compiled pipeline to this machine or leak a credential.
MACHINE_SPECIFIC = re.compile(r"(/work/|/root/|/tmp/|/home/|/Users/|file://)")
CREDENTIALS = re.compile(
    r"(?i)(password|passwd|api[_-]?key|secret[_-]?key|access[_-]?key|bearer\s|BEGIN [A-Z ]*PRIVATE KEY|AKIA[0-9A-Z]{16}"
    r"|gh[pousr]_[A-Za-z0-9]{20,})"
)
# A GPU pool unlike the defaults, so the test sees values travel from the config into the YAML.
POOL = [
    "pipeline.train_node_selector={pool: a100-pool, cloud.google.com/gke-accelerator: nvidia-tesla-a100}",
    "pipeline.train_tolerations=[{key: nvidia.com/gpu, operator: Exists, effect: NoSchedule},"
    " {key: dedicated, operator: Equal, value: ml, effect: NoExecute, toleration_seconds: 600}]",
    "pipeline.train_accelerator_limit=8",
    "pipeline.num_processes=8",
    "pipeline.train_cpu_request='30'",
    "pipeline.train_memory_limit=500G",
]


def compiled(tmp_path: Path, overrides: list[str] | None = None, params: Path = PARAMS) -> list[dict]:
    cfg = load_config(params, overrides)
    path = compile_pipeline(cfg, tmp_path / "p.yaml", version=VERSION)
    return list(yaml.safe_load_all(path.read_text()))


def executor(docs: list[dict], name: str) -> tuple[dict, dict]:
    """(container spec, kubernetes platform spec) of an executor."""
    container = docs[0]["deploymentSpec"]["executors"][f"exec-{name}"]["container"]
    platform = docs[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"].get(f"exec-{name}", {})
    return container, platform


# --- compile ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides",
    [[], ["pipeline.trainer=trainjob", "pipeline.pvc_access_mode=ReadWriteMany"], ["pipeline.prepare=false"],
     ["pipeline.pvc_name=", "pipeline.num_processes=1", "pipeline.train_accelerator_type="]],
    ids=["accelerate", "trainjob", "import-dataset", "cpu-no-volume"],
)  # fmt: skip
def test_every_pipeline_compiles(tmp_path, overrides):
    files = pipeline_files()
    assert [f.name for f in files] == ["training_pipeline.py"]
    for file in files:
        cfg = load_config(PARAMS, overrides)
        docs = list(yaml.safe_load_all(compile_pipeline(cfg, tmp_path / f"{file.stem}.yaml", file, VERSION).open()))
        executors = set(docs[0]["deploymentSpec"]["executors"])
        assert {"exec-validate", "exec-rl", "exec-evaluate", "exec-gate-failed"} <= executors
        assert ("exec-pretrain-trainjob" in executors) == ("pipeline.trainer=trainjob" in overrides)
        assert ("exec-prepare" in executors) != ("pipeline.prepare=false" in overrides)
        assert ("exec-importer" in executors) == ("pipeline.prepare=false" in overrides)
        inputs = docs[0]["root"]["inputDefinitions"]["parameters"]
        assert inputs["params"]["parameterType"] == "STRUCT"
        assert ("dataset_uri" in inputs) == ("pipeline.prepare=false" in overrides)
        for name, spec in docs[0]["deploymentSpec"]["executors"].items():
            if "container" in spec and not name.endswith("pvc"):
                assert spec["container"]["image"] == cfg.pipeline.image


def test_training_task_carries_node_pool_and_limits(tmp_path):
    docs = compiled(tmp_path, POOL)
    container, platform = executor(docs, "pretrain")
    res = container["resources"]
    assert res["accelerator"]["resourceType"] == "nvidia.com/gpu" and res["accelerator"]["resourceCount"] == "8"
    assert (res["resourceCpuRequest"], res["resourceCpuLimit"]) == ("30", "32")
    assert (res["resourceMemoryRequest"], res["resourceMemoryLimit"]) == ("64G", "500G")
    assert platform["nodeSelector"]["labels"] == {
        "pool": "a100-pool",
        "cloud.google.com/gke-accelerator": "nvidia-tesla-a100",
    }
    assert platform["tolerations"] == [
        {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},
        {"key": "dedicated", "operator": "Equal", "value": "ml", "effect": "NoExecute", "tolerationSeconds": "600"},
    ]  # fmt: skip
    assert platform["pvcMount"][0]["mountPath"] == "/mnt/moon3"
    assert platform["pvcMount"][0]["pvcNameParameter"]["taskOutputParameter"]["producerTask"] == "createpvc"
    # The per-run claim: created with the configured size/mode, deleted after training, never cached.
    comps = docs[0]["root"]["dag"]["tasks"]
    gate = docs[0]["components"][comps["condition-branches-1"]["componentRef"]["name"]]["dag"]["tasks"]
    inner = docs[0]["components"][gate["condition-2"]["componentRef"]["name"]]["dag"]["tasks"]
    create = inner["createpvc"]["inputs"]["parameters"]
    assert create["size"]["runtimeValue"]["constant"] == "200Gi"
    assert create["access_modes"]["runtimeValue"]["constant"] == ["ReadWriteOnce"]
    assert "pretrain" in inner["deletepvc"]["dependentTasks"]
    assert not inner["createpvc"].get("cachingOptions", {}).get("enableCache")
    assert not inner["pretrain"].get("cachingOptions", {}).get("enableCache")
    # Multi-GPU settings reach the training component as constants.
    args = inner["pretrain"]["inputs"]["parameters"]
    assert args["num_processes"]["runtimeValue"]["constant"] == 8
    assert args["deepspeed_config"]["runtimeValue"]["constant"] == "infra/deepspeed/zero2.json"
    # Only the training pod goes to the GPU pool; data steps are cached.
    v_container, v_platform = executor(docs, "validate")
    assert "resources" not in v_container and "nodeSelector" not in v_platform
    assert inner["evaluate"]["taskInfo"]["name"] == "evaluate"
    assert comps["prepare"]["cachingOptions"]["enableCache"] is True
    assert comps["validate"]["cachingOptions"]["enableCache"] is True


def inner_tasks(docs: list[dict]) -> dict:
    """The tasks inside the data gate's ``passed`` branch (synthesize, training, rl, evaluate, the claim)."""
    comps = docs[0]["root"]["dag"]["tasks"]
    gate = docs[0]["components"][comps["condition-branches-1"]["componentRef"]["name"]]["dag"]["tasks"]
    return docs[0]["components"][gate["condition-2"]["componentRef"]["name"]]["dag"]["tasks"]


def producer(task: dict, artifact: str) -> str:
    return task["inputs"]["artifacts"][artifact]["taskOutputArtifact"]["producerTask"]


def test_rl_task_is_placed_like_pretraining_and_feeds_evaluate(tmp_path):
    """rl: same GPU pool, resources and scratch volume as pretraining; evaluate scores the RL model, with the
    pretrained one as no_rl and the untrained one as the baseline."""
    docs = compiled(tmp_path, POOL)
    (pre_container, pre_platform), (rl_container, rl_platform) = executor(docs, "pretrain"), executor(docs, "rl")
    assert rl_container["resources"] == pre_container["resources"]
    assert rl_container["resources"]["accelerator"]["resourceCount"] == "8"
    for key in ("nodeSelector", "tolerations", "pvcMount", "imagePullPolicy"):
        assert rl_platform[key] == pre_platform[key], key
    assert rl_platform["nodeSelector"]["labels"]["pool"] == "a100-pool" and len(rl_platform["tolerations"]) == 2
    inner = inner_tasks(docs)
    assert producer(inner["rl"], "pretrained") == "pretrain"
    assert inner["rl"]["inputs"]["parameters"]["scratch_dir"]["runtimeValue"]["constant"] == "/mnt/moon3"
    assert not inner["rl"].get("cachingOptions", {}).get("enableCache")  # pipeline.cache_train: false
    assert {"pretrain", "rl"} <= set(inner["deletepvc"]["dependentTasks"])  # the claim outlives both trainers
    evaluate = inner["evaluate"]
    assert producer(evaluate, "model") == "rl"
    assert (producer(evaluate, "pretrained"), producer(evaluate, "init_model")) == ("pretrain", "pretrain")
    assert docs[0]["components"]["comp-evaluate"]["inputDefinitions"]["artifacts"]["pretrained"]["isOptional"]
    assert "-> rl -> evaluate" in docs[0]["pipelineInfo"]["description"]
    # With a TrainJob the launcher stays off the GPU pool, but rl trains in its own pod: on the pool.
    (tmp_path / "tj").mkdir()
    docs = compiled(tmp_path / "tj", [*POOL, "pipeline.trainer=trainjob", "pipeline.pvc_access_mode=ReadWriteMany",
                                      "pipeline.cache_train=true"])  # fmt: skip
    launcher_container, launcher_platform = executor(docs, "pretrain-trainjob")
    assert "accelerator" not in launcher_container.get("resources", {}) and "nodeSelector" not in launcher_platform
    rl_container, rl_platform = executor(docs, "rl")
    assert rl_container["resources"] == pre_container["resources"]
    assert (rl_platform["nodeSelector"], rl_platform["tolerations"]) == (
        pre_platform["nodeSelector"], pre_platform["tolerations"]
    )  # fmt: skip
    inner = inner_tasks(docs)
    assert inner["rl"]["cachingOptions"]["enableCache"] is True
    assert producer(inner["rl"], "pretrained") == "pretrain-trainjob" and producer(inner["evaluate"], "model") == "rl"
    assert producer(inner["evaluate"], "pretrained") == "pretrain-trainjob"


def test_version_is_in_the_metadata(tmp_path):
    docs = compiled(tmp_path)
    assert docs[0]["pipelineInfo"]["name"] == "moon3-training"
    assert docs[0]["pipelineInfo"]["description"].startswith(f"moon3 {VERSION}:")
    platform = docs[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    for name in ("exec-prepare", "exec-validate", "exec-pretrain", "exec-rl", "exec-evaluate", "exec-gate-failed"):
        assert platform[name]["podMetadata"]["annotations"]["moon3.io/pipeline-version"] == VERSION
    version = pipeline_version()
    sha = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    assert version == f"0.1.0+g{sha.stdout.strip()}" if sha.returncode == 0 else version == "0.1.0"


def test_nothing_machine_specific_in_compiled_yaml(tmp_path):
    texts = {"fresh": (tmp_path / "p.yaml", compiled(tmp_path, POOL))[0].read_text()}
    if COMPILED.exists():
        texts["committed"] = COMPILED.read_text()
    for name, text in texts.items():
        assert not MACHINE_SPECIFIC.findall(text), (name, MACHINE_SPECIFIC.findall(text)[:3])
        assert not CREDENTIALS.findall(text), (name, CREDENTIALS.findall(text)[:3])
        assert str(REPO) not in text


def test_committed_yaml_matches_params_yaml(tmp_path):
    """pipelines/compiled/moon3-training.yaml is what `moon3 pipeline compile` makes from params.yaml now."""
    committed = list(yaml.safe_load_all(COMPILED.read_text()))
    version = re.match(r"moon3 (\S+):", committed[0]["pipelineInfo"]["description"]).group(1)
    fresh = compile_pipeline(load_config(PARAMS), tmp_path / "p.yaml", version=version)
    assert list(yaml.safe_load_all(fresh.read_text())) == committed, "stale: run `moon3 pipeline compile`"


def test_params_yaml_change_shows_in_compiled_defaults(tmp_path):
    """One edit of params.yaml reaches the pipeline's run-time default, its compile-time image, and DVC.

    DVC half: against the committed dvc.lock, `dvc status` reports the edited key as a changed param of
    `pretrain` (and so `dvc repro` re-runs it and what follows) and of no upstream stage.
    """
    values = yaml.safe_load(PARAMS.read_text())
    values["train"]["steps"] = 1234
    values["pipeline"]["image"] = "registry.example.com/moon3:edited"
    edited = tmp_path / "params.yaml"
    edited.write_text(yaml.safe_dump(values))
    project = tmp_path / "dvcproj"
    project.mkdir()
    for name in ("dvc.yaml", "dvc.lock"):
        shutil.copy(REPO / name, project / name)
    shutil.copy(edited, project / "params.yaml")
    dvc = str(Path(sys.executable).parent / "dvc")
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    subprocess.run([dvc, "init", "--no-scm", "-q"], cwd=project, check=True, env=env)
    status = subprocess.run([dvc, "status", "--json"], cwd=project, capture_output=True, text=True, env=env)
    # Stages list whole params.yaml sections, so DVC reports the section: {"params.yaml": {"train": "modified"}}.
    changed = {
        stage: [key for e in entries if isinstance(e, dict) for key in e.get("changed deps", {}).get("params.yaml", {})]
        for stage, entries in json.loads(status.stdout).items()
    }
    assert changed["pretrain"] == ["train"], changed
    assert not changed["prepare"] and not changed["validate"], changed
    docs = compiled(tmp_path, params=edited)
    default = docs[0]["root"]["inputDefinitions"]["parameters"]["params"]["defaultValue"]
    assert default["train"]["steps"] == 1234
    assert default == json.loads(json.dumps(pipeline_params(load_config(edited))))
    assert "pipeline" not in default  # compile-time settings are not a run argument
    assert executor(docs, "pretrain")[0]["image"] == "registry.example.com/moon3:edited"
    (tmp_path / "o").mkdir()
    original = compiled(tmp_path / "o", params=PARAMS)
    assert original[0]["root"]["inputDefinitions"]["parameters"]["params"]["defaultValue"]["train"]["steps"] == (
        load_config(PARAMS).train.steps
    )


def test_bad_pipeline_settings_fail_before_compiling(tmp_path):
    cases = {
        "pipeline.num_processes=16": "train_accelerator_limit",
        "pipeline.train_tolerations=[{key: a, operater: Exists}]": "operater",
        "pipeline.train_tolerations=[{key: a, operator: Exists, value: b}]": "Exists takes no value",
        "pipeline.trainer=trainjob": "ReadWriteMany",
    }
    for override, message in cases.items():
        with pytest.raises(ValueError, match=message):
            check_trainer(load_config(PARAMS, [override]).pipeline)
    with pytest.raises(ValueError, match="pvc_name"):
        check_trainer(load_config(PARAMS, ["pipeline.trainer=trainjob", "pipeline.pvc_name="]).pipeline)
    with pytest.raises(ConfigError, match="pipeline.trainer"):
        load_config(PARAMS, ["pipeline.trainer=slurm"])


# --- params round trip --------------------------------------------------------------------------------------


def test_params_survive_the_kfp_struct_round_trip():
    cfg = load_config(PARAMS)
    # A protobuf Struct stores every number as a double: what a component receives.
    as_struct = json.loads(json.dumps(pipeline_params(cfg)), parse_int=float)
    assert as_struct["train"]["steps"] == float(cfg.train.steps)
    back = config_from_params(as_struct, ["train.steps=7", "model.reasoning=false"])
    assert back.train.steps == 7 and isinstance(back.train.steps, int)
    assert back.eval.ks == cfg.eval.ks and all(isinstance(k, int) for k in back.eval.ks)
    assert back.train.lr == cfg.train.lr and back.model.reasoning is False
    assert back.data == cfg.data and back.validation == cfg.validation
    with pytest.raises(ConfigError, match="train.stepz"):
        config_from_params(as_struct, ["train.stepz=3"])
    with pytest.raises(ConfigError, match="train.steps: expected int"):
        config_from_params({**as_struct, "train": {**as_struct["train"], "steps": 2.5}})


# --- launch commands and the TrainJob -----------------------------------------------------------------------


def test_launch_commands(tmp_path, monkeypatch):
    args = train_args("/w/params.yaml", "/w/data", "/w/out", "/w/rep")
    cmd = accelerate_command(4, "/i/acc.yaml", "/i/ds.json", args)
    assert cmd[:3] == [sys.executable, "-m", "accelerate.commands.launch"]
    assert cmd[cmd.index("--num_processes") + 1] == "4"
    assert cmd[cmd.index("--deepspeed_config_file") + 1] == "/i/ds.json"
    assert cmd[cmd.index("-m", 3) :] == ["-m", "moon3.cli", "train", "contrastive", *args] and args[-1] == "--resume"
    assert torchrun_command(args) == ["torchrun", "-m", "moon3.cli", "train", "contrastive", *args]
    with pytest.raises(ValueError, match="in-process"):
        accelerate_command(1, "a", "b", args)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MOON3_HOME", str(REPO))
    assert infra_path("infra/deepspeed/zero2.json") == REPO / "infra/deepspeed/zero2.json"
    with pytest.raises(FileNotFoundError, match="infra/nope.json.*MOON3_HOME"):
        infra_path("infra/nope.json")


def test_training_module_entry_point_has_the_train_command():
    """`python -m moon3.cli train contrastive` is what accelerate launch and torchrun run on every rank."""
    out = subprocess.run([sys.executable, "-m", "moon3.cli", "train", "contrastive", "--help"],
                         capture_output=True, text=True, cwd=REPO, timeout=120)  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    assert "--data-dir" in out.stdout and "--resume" in out.stdout


def test_trainjob_manifest():
    """Manifest only: no Kubernetes cluster (nor the Trainer CRDs) can run here."""
    cfg = load_config(PARAMS, [*POOL[:2], "pipeline.trainer=trainjob", "pipeline.num_nodes=3",
                               "pipeline.pvc_access_mode=ReadWriteMany"])  # fmt: skip
    pc = cfg.pipeline
    name = trainjob_name("3F2a_91c0-44ee-b1d2-7e5f0c9a11aa")
    assert name == "moon3-pretrain-3f2a-91c0-44ee-b1d2" and len(name) <= 63
    command = torchrun_command(train_args("/mnt/moon3/r/params.yaml", "/mnt/moon3/r/data", "/mnt/moon3/r/pretrain",
                                          "/mnt/moon3/r/reports"))  # fmt: skip
    manifest = build_trainjob(name, pc, command, "run-1-moon3-scratch", "team-a", env={"MLFLOW_TRACKING_URI": "http://m"},
                              labels={"moon3.io/pipeline-version": "0.1.0-gabc"})  # fmt: skip
    assert yaml.safe_load(trainjob_yaml(manifest)) == manifest
    assert manifest["apiVersion"] == "trainer.kubeflow.org/v1alpha1" and manifest["kind"] == "TrainJob"
    assert manifest["metadata"] == {"name": name, "namespace": "team-a",
                                    "labels": {"moon3.io/pipeline-version": "0.1.0-gabc"}}  # fmt: skip
    spec = manifest["spec"]
    assert spec["runtimeRef"]["name"] == "torch-distributed"
    trainer = spec["trainer"]
    assert trainer["image"] == pc.image and trainer["command"] == command
    assert (trainer["numNodes"], trainer["numProcPerNode"]) == (3, 4)
    assert trainer["resourcesPerNode"]["limits"] == {"cpu": "32", "memory": "128G", "nvidia.com/gpu": 4}
    assert trainer["resourcesPerNode"]["requests"]["nvidia.com/gpu"] == 4
    assert trainer["env"] == [{"name": "MLFLOW_TRACKING_URI", "value": "http://m"}]
    (override,) = spec["podTemplateOverrides"]
    assert override["targetJobs"] == [{"name": "node"}]
    pod = override["spec"]
    assert pod["nodeSelector"] == pc.train_node_selector
    assert pod["tolerations"] == k8s_tolerations(pc.train_tolerations)
    assert pod["tolerations"][1]["tolerationSeconds"] == 600
    assert pod["volumes"] == [{"name": "moon3-shared", "persistentVolumeClaim": {"claimName": "run-1-moon3-scratch"}}]
    assert pod["containers"] == [{"name": "node", "volumeMounts": [{"name": "moon3-shared",
                                                                    "mountPath": "/mnt/moon3"}]}]  # fmt: skip
    with pytest.raises(ValueError, match="RFC 1035"):
        build_trainjob("Bad_Name", pc, command, "c", "ns")
    with pytest.raises(ValueError, match="PersistentVolumeClaim"):
        build_trainjob(name, pc, command, "", "ns")


class FakeCustomObjects:
    """Stands in for kubernetes.client.CustomObjectsApi: records calls, replays a list of TrainJob states."""

    def __init__(self, states: list[str | None], exists: bool = False):
        self.states, self.exists, self.calls = list(states), exists, []

    def create_namespaced_custom_object(self, group, version, namespace, plural, body):
        self.calls.append(("create", group, version, namespace, plural, body["metadata"]["name"]))
        if self.exists:
            raise ApiException(status=409, reason="AlreadyExists")
        return body

    def get_namespaced_custom_object(self, group, version, namespace, plural, name):
        self.calls.append(("get", name))
        state = self.states.pop(0) if self.states else None
        conditions = [{"type": state, "status": "True", "reason": "JobFailed", "message": "node-0 OOMKilled"}]
        return {"metadata": {"name": name}, "status": {"conditions": conditions if state else []}}


def test_trainjob_apply_and_wait_with_a_fake_api():
    """The Kubernetes API is faked: no cluster can run here."""
    pc = load_config(PARAMS, ["pipeline.trainer=trainjob", "pipeline.pvc_access_mode=ReadWriteMany"]).pipeline
    manifest = build_trainjob("moon3-pretrain-x", pc, ["torchrun"], "claim", "ns")
    api = FakeCustomObjects([None, None, "Complete"])
    apply_trainjob(manifest, api)
    assert api.calls[0] == ("create", "trainer.kubeflow.org", "v1alpha1", "ns", "trainjobs", "moon3-pretrain-x")
    slept = []
    done = wait_for_trainjob("moon3-pretrain-x", "ns", api, timeout_s=100, poll_s=10, sleep=slept.append)
    assert slept == [10, 10] and done["status"]["conditions"][0]["type"] == "Complete"
    retried = FakeCustomObjects([], exists=True)  # a retried launcher pod finds its TrainJob
    assert apply_trainjob(manifest, retried)["metadata"]["name"] == "moon3-pretrain-x"
    with pytest.raises(RuntimeError, match="JobFailed: node-0 OOMKilled"):
        wait_for_trainjob("x", "ns", FakeCustomObjects(["Failed"]), sleep=slept.append)
    with pytest.raises(TimeoutError, match="30 s"):
        wait_for_trainjob("x", "ns", FakeCustomObjects([]), timeout_s=30, poll_s=10, sleep=slept.append)


def test_trainjob_launcher_step_with_a_fake_cluster(tmp_path, monkeypatch, mini_dataset):
    """The launcher pod's work around a fake TrainJob: the 'nodes' write the model onto the shared volume."""
    monkeypatch.setenv("MOON3_HOME", str(REPO))
    mount = tmp_path / "pvc"
    cfg = load_config(PARAMS, ["pipeline.trainer=trainjob", "pipeline.pvc_access_mode=ReadWriteMany",
                               f"pipeline.pvc_mount_path={mount}", "pipeline.trainjob_namespace=team-a"])  # fmt: skip
    pipeline = json.loads(json.dumps(cfg.to_dict()["pipeline"]), parse_int=float)  # as KFP hands a struct over

    class TrainingCluster(FakeCustomObjects):
        def create_namespaced_custom_object(self, group, version, namespace, plural, body):
            self.body = body
            args = body["spec"]["trainer"]["command"]
            work = Path(args[args.index("--out-dir") + 1]).parent
            for folder in ("pretrain/final", "pretrain/init", "reports"):
                (work / folder).mkdir(parents=True)
            (work / "pretrain/final/weights.bin").write_bytes(b"trained")
            (work / "pretrain/init/weights.bin").write_bytes(b"untrained")
            (work / "reports/train_metrics.json").write_text(json.dumps({"steps": 300, "final_loss": 0.5}))
            return super().create_namespaced_custom_object(group, version, namespace, plural, body)

    api = TrainingCluster(["Complete"])
    params = json.loads(json.dumps(pipeline_params(cfg)), parse_int=float)
    model, init = str(tmp_path / "model"), str(tmp_path / "init")
    summary = pretrain_trainjob_step(params, ["train.steps=300"], pipeline, str(mini_dataset), model, init,
                                     "claim-1", "run-42", api)  # fmt: skip
    assert summary == {"steps": 300.0, "final_loss": 0.5}
    assert (tmp_path / "model/weights.bin").read_bytes() == b"trained"
    assert (tmp_path / "init/weights.bin").read_bytes() == b"untrained"
    work = mount / "run-42"
    assert sorted(p.name for p in (work / "data").iterdir()) == sorted(p.name for p in mini_dataset.iterdir())
    written = load_config(work / "params.yaml")  # the file every TrainJob node reads
    assert written.train.deepspeed_config == str(REPO / "infra/deepspeed/zero2.json")
    assert written.train.steps == 300 and written.model == cfg.model
    body = api.body
    assert body["metadata"]["namespace"] == "team-a" and body["metadata"]["name"] == "moon3-pretrain-run-42"
    assert body["spec"]["podTemplateOverrides"][0]["spec"]["volumes"][0]["persistentVolumeClaim"] == {
        "claimName": "claim-1"
    }


# --- upload / run against a fake kfp.Client ------------------------------------------------------------------


class FakeKfpClient:
    """Records the calls of the kfp.Client methods we use (no KFP API server can run here)."""

    def __init__(self, conflict: bool = False):
        self.pipelines: dict[str, str] = {}
        self.versions: dict[str, list[str]] = {}
        self.conflict, self.calls = conflict, []

    def get_pipeline_id(self, name):
        return self.pipelines.get(name)

    def upload_pipeline(self, path, pipeline_name=None, description=None):
        self.calls.append(("upload_pipeline", Path(path).name, pipeline_name, description))
        self.pipelines[pipeline_name] = pid = f"p-{len(self.pipelines) + 1}"
        self.versions[pid] = [f"{pid}-v1"]
        return SimpleNamespace(pipeline_id=pid)

    def upload_pipeline_version(self, path, pipeline_version_name, pipeline_id=None, description=None):
        self.calls.append(("upload_pipeline_version", pipeline_version_name, pipeline_id))
        if self.conflict:
            raise ApiException(status=409, reason="Conflict")
        self.versions[pipeline_id].append(vid := f"{pipeline_id}-v{len(self.versions[pipeline_id]) + 1}")
        return SimpleNamespace(pipeline_id=pipeline_id, pipeline_version_id=vid)

    def list_pipeline_versions(self, pipeline_id, page_size=10, sort_by=""):
        assert sort_by == "created_at desc"
        newest = list(reversed(self.versions.get(pipeline_id, [])))[:page_size]
        return SimpleNamespace(pipeline_versions=[SimpleNamespace(pipeline_version_id=v) for v in newest] or None)

    def create_run_from_pipeline_package(self, path, arguments=None, run_name=None, experiment_name=None,
                                         enable_caching=None):  # fmt: skip
        self.calls.append(("create_run_from_pipeline_package", Path(path).name, arguments, experiment_name))
        return SimpleNamespace(run_id="run-pkg")

    def create_experiment(self, name):
        self.calls.append(("create_experiment", name))
        return SimpleNamespace(experiment_id=f"exp-{name}")

    def run_pipeline(self, experiment_id, job_name, params=None, pipeline_id=None, version_id=None,
                     enable_caching=None):  # fmt: skip
        self.calls.append(("run_pipeline", experiment_id, job_name, params, pipeline_id, version_id))
        return SimpleNamespace(run_id="run-uploaded")


def test_upload_first_then_new_versions(tmp_path):
    package = tmp_path / "p.yaml"
    package.write_text("# compiled\n")
    fake = FakeKfpClient()
    first = kfp_client.upload(fake, package, "moon3-training", "0.1.0+gaaa")
    assert first == kfp_client.UploadResult("p-1", "p-1-v1", "moon3-training", first_upload=True)
    second = kfp_client.upload(fake, package, "moon3-training", "0.1.0+gbbb", description="d")
    assert second == kfp_client.UploadResult("p-1", "p-1-v2", "0.1.0+gbbb", first_upload=False)
    assert [c[0] for c in fake.calls] == ["upload_pipeline", "upload_pipeline_version"]
    assert fake.calls[1] == ("upload_pipeline_version", "0.1.0+gbbb", "p-1")
    clash = FakeKfpClient(conflict=True)
    clash.pipelines["moon3-training"], clash.versions["p-9"] = "p-9", ["p-9-v1"]
    with pytest.raises(ValueError, match="already has a version '0.1.0\\+gbbb'"):
        kfp_client.upload(clash, package, "moon3-training", "0.1.0+gbbb")
    with pytest.raises(FileNotFoundError, match="compile first"):
        kfp_client.upload(fake, tmp_path / "missing.yaml", "moon3-training", "v")


def test_run_uploaded_version_or_package(tmp_path):
    fake = FakeKfpClient()
    with pytest.raises(ValueError, match="upload first"):
        kfp_client.run(fake, {}, pipeline_name="moon3-training")
    fake.pipelines["moon3-training"], fake.versions["p-1"] = "p-1", ["v1", "v2"]
    args = {"overrides": ["train.steps=5"]}
    started = kfp_client.run(fake, args, experiment="exp", pipeline_name="moon3-training")
    assert started == kfp_client.RunResult("run-uploaded", "p-1", "v2")  # the newest version
    assert fake.calls[-2:] == [("create_experiment", "exp"),
                               ("run_pipeline", "exp-exp", "moon3-training", args, "p-1", "v2")]  # fmt: skip
    assert kfp_client.run(fake, args, package=tmp_path / "p.yaml").run_id == "run-pkg"
    assert fake.calls[-1] == ("create_run_from_pipeline_package", "p.yaml", args, "moon3")


def test_cli_compile_upload_run(tmp_path, monkeypatch):
    from moon3.cli import app

    fake = FakeKfpClient()
    monkeypatch.setattr(kfp_client, "make_client", lambda host, namespace=None: fake)
    runner = CliRunner()
    out = tmp_path / "c.yaml"
    res = runner.invoke(app, ["pipeline", "compile", "--params", str(PARAMS), "--set", "pipeline.image=r/m:1",
                              "--out", str(out)])  # fmt: skip
    assert res.exit_code == 0, res.output
    assert executor(list(yaml.safe_load_all(out.read_text())), "validate")[0]["image"] == "r/m:1"
    res = runner.invoke(app, ["pipeline", "upload", "--host", "http://kfp.invalid", "--params", str(PARAMS)])
    assert res.exit_code == 0, res.output
    assert fake.calls[0][0] == "upload_pipeline" and fake.calls[0][2] == "moon3-training"
    res = runner.invoke(app, ["pipeline", "run", "--host", "http://kfp.invalid", "--params", str(PARAMS),
                              "--set", "train.steps=5"])  # fmt: skip
    assert res.exit_code == 0, res.output
    _, _, _, arguments, pid, vid = fake.calls[-1]
    assert (pid, vid) == ("p-1", "p-1-v1")
    assert arguments == {"params": pipeline_params(load_config(PARAMS)), "overrides": ["train.steps=5"],
                         "dataset_uri": ""}  # fmt: skip
    res = runner.invoke(app, ["pipeline", "run", "--host", "h", "--set", "pipeline.image=x"])
    assert res.exit_code == 2 and "compile time" in res.output
    res = runner.invoke(app, ["pipeline", "run", "--host", "h", "--set", "train.stepz=1"])
    assert res.exit_code == 2 and "train.stepz" in res.output


def test_rl_step_resumes_on_the_scratch_volume(tmp_path, monkeypatch, mini_dataset):
    """The rl step's plumbing around a stand-in for ``train_rl`` (the real one runs in the kfp.local test)."""
    import moon3.rl.finetune as finetune

    calls = []

    def fake_train_rl(cfg, data_dir, init_dir=None, out_dir=None, report_dir=None, resume=False, progress=True):
        calls.append({"cfg": cfg, "data_dir": data_dir, "init_dir": init_dir, "out_dir": Path(out_dir),
                      "report_dir": Path(report_dir), "resume": resume, "progress": progress})  # fmt: skip
        (Path(out_dir) / "final").mkdir(parents=True)
        (Path(out_dir) / "final" / "weights.bin").write_bytes(b"rl")
        return {"skipped": False, "steps": 4, "reward_last_10pct": 0.75, "init_dir": str(init_dir),
                "init_training": {"stage": "pretrain", "steps": 6, "traces": True},
                "timing": {"generation": 0.5}, "history": [{"step": 1, "reward": 0.5}]}  # fmt: skip

    monkeypatch.setattr(finetune, "train_rl", fake_train_rl)
    monkeypatch.setenv("MOON3_HOME", str(REPO))
    monkeypatch.chdir(tmp_path)  # not the checkout: the DeepSpeed path must resolve through MOON3_HOME
    params = json.loads(json.dumps(pipeline_params(load_config(PARAMS))), parse_int=float)
    scratch, model = tmp_path / "pvc", tmp_path / "model"
    overrides = ["rl.steps=4", "rl.deepspeed_config=infra/deepspeed/zero2.json"]
    numbers = rl_step(params, overrides, str(mini_dataset), "/in/pretrained", str(model), str(scratch), "run-7")
    assert numbers == {"skipped": 0.0, "steps": 4.0, "reward_last_10pct": 0.75, "init_training/steps": 6.0,
                       "timing/generation": 0.5}  # fmt: skip
    (call,) = calls
    assert call["resume"] is True and call["progress"] is False and call["init_dir"] == "/in/pretrained"
    assert call["out_dir"].parent == call["report_dir"].parent == scratch / "run-7"  # same folder on a retry
    assert call["cfg"].rl.steps == 4 and call["cfg"].rl.deepspeed_config == str(REPO / "infra/deepspeed/zero2.json")
    assert (model / "weights.bin").read_bytes() == b"rl"


def test_read_confusion(tmp_path):
    assert read_confusion(tmp_path) is None
    level1 = {"labels": ["a", "b"], "confusion": [[3, 1], [0, 4]], "accuracy": 0.875}
    (tmp_path / "results.json").write_text(json.dumps({"details": {"trained": {"classification/level_1": level1}}}))
    assert read_confusion(tmp_path) == (["a", "b"], [[3, 1], [0, 4]])
    assert read_confusion(tmp_path, "untrained") is None  # skipped task: no matrix, no error
    (tmp_path / "confusion_level1.json").write_text(json.dumps({"trained": {"labels": ["a"], "matrix": [[2]]}}))
    assert read_confusion(tmp_path) == (["a"], [[2]])
    (tmp_path / "confusion_level1.json").write_text(json.dumps({"labels": ["a", "b"], "matrix": [[1]]}))
    with pytest.raises(ValueError, match="not 2x2"):
        read_confusion(tmp_path)


# --- kfp.local runs ------------------------------------------------------------------------------------------

# Compile-time settings of a CPU run without a cluster volume; stage settings go in as run-time overrides.
LOCAL = ["pipeline.pvc_name=", "pipeline.num_processes=1"]
SMALL = ["data.n_products=120", "data.n_queries=120", "model.reasoning=false", "model.image_size=32",
         "train.steps=6", "train.batch_size=8", "train.warmup_steps=1", "train.num_workers=0", "train.log_every=2",
         "train.hard_negatives_per_query=0", "train.heldout_queries=0", "eval.other_reasoning_mode=false",
         "eval.mlflow_experiment="]  # fmt: skip


@pytest.fixture
def kfp_local(tmp_path, monkeypatch):
    """kfp.local with subprocesses of this venv; MLflow and stray files kept inside tmp_path."""
    from kfp import local

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", (tmp_path / "mlruns").as_uri())
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    root = tmp_path / "kfp-root"
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(root))
    return root


def executor_outputs(run_dir: Path, task: str) -> dict:
    return json.loads((run_dir / task / "executor_output.json").read_text())


def artifact_metadata(run_dir: Path, task: str, name: str) -> dict:
    return executor_outputs(run_dir, task)["artifacts"][name]["artifacts"][0]["metadata"]


@pytest.mark.slow
def test_local_run_of_the_whole_training_pipeline(kfp_local):
    cfg = load_config(PARAMS, LOCAL)
    load_module(REPO / "pipelines" / "training_pipeline.py").build_pipeline(cfg, VERSION)(overrides=SMALL)
    (run,) = list(kfp_local.iterdir())
    # prepare -> validate: the dataset folder.
    dataset = run / "prepare" / "dataset"
    products = pd.read_parquet(dataset / "products.parquet")
    assert len(products) == 120 and artifact_metadata(run, "prepare", "stats")["products/total"] == 120
    # validate -> pretrain/evaluate: accepted tables whose images point into the prepare artifact.
    validated = pd.read_parquet(run / "validate" / "validated" / "products.parquet")
    assert 0 < len(validated) <= 120
    assert all(Path(p).is_file() and Path(p).is_relative_to(dataset) for p in validated["image"])
    assert executor_outputs(run, "validate")["parameterValues"]["passed"] is True
    assert "<html" in (run / "validate" / "report").read_text().lower()
    assert (run / "validate" / "details" / "gx_results.json").is_file()
    # synthesize: gated traces for the training items; every item accounted for.
    synth = artifact_metadata(run, "synthesize", "metrics")
    rejected = sum(v for k, v in synth.items() if k.startswith("rejected/"))
    assert synth["in"] == synth["accepted"] + rejected + synth["failed"] and synth["accepted"] > 0
    assert len(pd.read_parquet(run / "synthesize" / "traces" / "traces.parquet")) == synth["accepted"]
    assert "<html" in (run / "synthesize" / "report").read_text().lower()
    # pretrain -> evaluate: two self-contained model folders (evaluate loaded both), with different weights.
    train_metrics = artifact_metadata(run, "pretrain", "metrics")
    assert train_metrics["steps"] == 6 and train_metrics["final_loss"] > 0
    model, init = run / "pretrain" / "model", run / "pretrain" / "init_model"
    # The trained folder also keeps the embeddings it produced in memory (training_probe.safetensors, issue 15).
    assert {p.name for p in model.iterdir()} - {"training_probe.safetensors"} == {p.name for p in init.iterdir()}
    weights = sorted(p.relative_to(model) for p in model.rglob("*.safetensors"))
    assert len(weights) >= 2 and any((model / w).read_bytes() != (init / w).read_bytes() for w in weights)
    # evaluate: metrics for both variants, the same numbers in the KFP Metrics and in metrics.json.
    metrics = artifact_metadata(run, "evaluate", "metrics")
    assert any(k.startswith("trained/") for k in metrics) and any(k.startswith("untrained/") for k in metrics)
    from moon3.pipelines.steps import flat_numbers

    assert metrics == flat_numbers(json.loads((run / "evaluate" / "details" / "metrics.json").read_text()))
    # Deltas against the trained model may be negative; every other recall or accuracy is a share.
    shares = {k: v for k, v in metrics.items() if ("recall" in k or "accuracy" in k) and not k.startswith("deltas/")}
    assert shares and all(0.0 <= v <= 1.0 for v in shares.values())
    confusion = artifact_metadata(run, "evaluate", "confusion")["confusionMatrix"]
    labels = [a["displayName"] for a in confusion["annotationSpecs"]]
    assert labels and len(confusion["rows"]) == len(labels)
    assert sum(sum(r["row"]) for r in confusion["rows"]) > 0
    assert "<table" in (run / "evaluate" / "report").read_text()
    assert "|" in (run / "evaluate" / "summary").read_text()
    assert not (run / "gate-failed").exists()
    # pretrain -> rl -> evaluate: trained without traces (model.reasoning: false), so rl copies the model as is;
    # evaluate scores that copy as the trained model; no_rl (the pretrained model) has the same weights, so it is
    # listed as not evaluated with that reason instead of scored twice.
    rl_metrics = artifact_metadata(run, "rl", "metrics")
    assert rl_metrics["skipped"] == 1.0 and rl_metrics["steps"] == 0
    assert rl_metrics["init_training/steps"] == 6  # the starting model's training record, flattened
    tuned = run / "rl" / "model"
    files = sorted(p.relative_to(model) for p in model.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(tuned) for p in tuned.rglob("*") if p.is_file())
    assert all((tuned / f).read_bytes() == (model / f).read_bytes() for f in files)
    assert any(k.startswith("trained/") for k in metrics) and not any(k.startswith("no_rl/") for k in metrics)
    assert "no_rl: not evaluated: same weights as the trained model" in (run / "evaluate" / "summary").read_text()


@pytest.mark.slow
def test_local_run_stops_at_the_gate(kfp_local, mini_dataset, tmp_path):
    """A dataset whose images are gone fails validation: the run fails at gate-failed and never trains."""
    broken = tmp_path / "broken"
    broken.mkdir()
    for table in ("products.parquet", "queries.parquet"):
        shutil.copy(mini_dataset / table, broken / table)
    cfg = load_config(PARAMS, [*LOCAL, "pipeline.prepare=false"])
    pipeline = load_module(REPO / "pipelines" / "training_pipeline.py").build_pipeline(cfg, VERSION)
    with pytest.raises(RuntimeError, match="gate-failed"):
        pipeline(dataset_uri=str(broken), overrides=["validation.check_images=false"])
    (run,) = list(kfp_local.iterdir())
    assert executor_outputs(run, "validate")["parameterValues"]["passed"] is False
    assert "validation gate failed" in executor_outputs(run, "validate")["parameterValues"]["summary"]
    quarantined = pd.read_parquet(run / "validate" / "quarantine" / "products.parquet")
    assert len(quarantined) == len(pd.read_parquet(broken / "products.parquet"))
    assert not (run / "pretrain").exists() and not (run / "rl").exists() and not (run / "evaluate").exists()
