"""Kubeflow pipeline: compiled YAML (placement, version, params defaults), launch commands, and whole-pipeline
runs with ``kfp.local`` (subprocesses, no Docker). The TrainJob, the KFP client calls and the ``moon3 pipeline``
CLI are in ``test_pipeline_client.py``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from moon3.config import ConfigError, load_config
from moon3.pipelines.compile import REPO, compile_pipeline, load_module, pipeline_files
from moon3.pipelines.launch import accelerate_command, infra_path, torchrun_command, train_args
from moon3.pipelines.params import config_from_params, pipeline_params
from moon3.pipelines.placement import check_trainer, image_refs
from moon3.pipelines.steps import read_confusion, rl_step
from moon3.pipelines.version import PIPELINE_SOURCES, image_tag, pipeline_version, source_hash, sources_dirty

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
     ["pipeline.pvc_name=", "pipeline.num_processes=1", "pipeline.train_accelerator_type=",
      "pipeline.eval_accelerator_limit=0"],
     ["pipeline.ablations=[no_fusion, no_fire, no_reasoning]", "pipeline.deploy=render"]],
    ids=["accelerate", "trainjob", "import-dataset", "cpu-no-volume", "ablations"],
)  # fmt: skip
def test_every_pipeline_compiles_with_every_stage_of_the_card(tmp_path, overrides):
    files = pipeline_files()
    assert [f.name for f in files] == ["training_pipeline.py"]
    for file in files:
        cfg = load_config(PARAMS, overrides)
        docs = list(yaml.safe_load_all(compile_pipeline(cfg, tmp_path / f"{file.stem}.yaml", file, VERSION).open()))
        executors = set(docs[0]["deploymentSpec"]["executors"])
        card = {"fingerprint", "validate", "synthesize", "rl", "evaluate", "register", "gate", "deploy", "gate-failed"}
        assert {f"exec-{name}" for name in card} <= executors
        assert ("exec-pretrain-trainjob" in executors) == ("pipeline.trainer=trainjob" in overrides)
        assert ("exec-prepare" in executors) != ("pipeline.prepare=false" in overrides)
        assert ("exec-importer" in executors) == ("pipeline.prepare=false" in overrides)
        inputs = docs[0]["root"]["inputDefinitions"]["parameters"]
        # A string, so integers stay integers in the UI (a struct shows 600 as 600.0); every input is described.
        assert inputs["params"]["parameterType"] == "STRING"
        assert json.loads(inputs["params"]["defaultValue"])["train"]["steps"] == cfg.train.steps
        assert all(spec.get("description") for spec in inputs.values()), inputs.keys()
        assert ("dataset_uri" in inputs) == ("pipeline.prepare=false" in overrides)
        tasks = all_tasks(docs)
        assert any(name.startswith("for-loop") for name in tasks) == bool(cfg.pipeline.ablations)
        if cfg.pipeline.ablations:
            loop = next(t for name, t in tasks.items() if name.startswith("for-loop"))
            assert loop["parameterIterator"]["items"]["raw"] == json.dumps(cfg.pipeline.ablations)
            assert tasks["evaluate-2"]["inputs"]["parameters"]["ablation"]["componentInputParameter"].startswith(
                "pipelinechannel--loop-item"
            )


def all_tasks(docs: list[dict]) -> dict[str, dict]:
    """Every task of the compiled pipeline (root and every sub-DAG: exit handler, conditions, loops), by name."""
    out = dict(docs[0]["root"]["dag"]["tasks"])
    for comp in docs[0]["components"].values():
        out.update((comp.get("dag") or {}).get("tasks", {}))
    return out


def test_steps_run_on_their_own_image_and_resources(tmp_path):
    """CPU steps: the CPU image with CPU requests; GPU steps (pretrain, rl, evaluate): the CUDA image on the pool
    with /dev/shm; both tags from the source; retries everywhere but on the failure that is meant to fail."""
    docs = compiled(tmp_path, POOL)
    tag = image_tag()
    platform = docs[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    for name in ("fingerprint", "prepare", "validate", "synthesize", "register", "gate", "deploy", "gate-failed"):
        container, _ = executor(docs, name)
        assert container["image"] == f"ghcr.io/example/moon3:{tag}", name
        assert container["resources"]["resourceCpuRequest"] == "2" and container["resources"]["resourceMemoryLimit"]
        assert "accelerator" not in container["resources"] and "nodeSelector" not in platform.get(f"exec-{name}", {})
    for name in ("pretrain", "rl", "evaluate"):
        container, plat = executor(docs, name)
        assert container["image"] == f"ghcr.io/example/moon3-cuda:{tag}", name
        assert plat["nodeSelector"]["labels"]["pool"] == "a100-pool"
        assert plat["emptyDirMounts"] == [
            {"volumeName": "dshm", "mountPath": "/dev/shm", "medium": "Memory", "sizeLimit": "16Gi"}
        ]
    assert executor(docs, "evaluate")[0]["resources"]["accelerator"]["resourceCount"] == "1"
    tasks = all_tasks(docs)
    for name in ("prepare", "validate", "pretrain", "rl", "evaluate", "register", "gate"):
        assert tasks[name]["retryPolicy"]["maxRetryCount"] == 2 and tasks[name]["retryPolicy"]["backoffFactor"] == 2
    assert "retryPolicy" not in tasks["gate-failed"]
    for name, env in ((n, executor(docs, n)[0].get("env", [])) for n in ("pretrain", "register", "gate")):
        assert {"name": "MLFLOW_TRACKING_URI", "value": "http://mlflow.kubeflow.svc.cluster.local:5000"} in env, name
    # CPU-only evaluation: the CPU image, no accelerator.
    (tmp_path / "cpu").mkdir()
    container, _ = executor(compiled(tmp_path / "cpu", ["pipeline.eval_accelerator_limit=0"]), "evaluate")
    assert container["image"] == f"ghcr.io/example/moon3:{tag}" and "accelerator" not in container["resources"]


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
    claim = "moon3-{{$.pipeline_job_uuid}}-moon3-scratch"
    assert platform["pvcMount"][0]["pvcNameParameter"]["runtimeValue"]["constant"] == claim
    tasks = all_tasks(docs)
    # Multi-GPU settings reach the training component as constants.
    args = tasks["pretrain"]["inputs"]["parameters"]
    assert args["num_processes"]["runtimeValue"]["constant"] == 8
    assert args["deepspeed_config"]["runtimeValue"]["constant"] == "infra/deepspeed/zero2.json"
    assert tasks["evaluate"]["taskInfo"]["name"] == "evaluate"
    assert tasks["prepare"]["cachingOptions"]["enableCache"] is True
    assert tasks["validate"]["cachingOptions"]["enableCache"] is True
    assert not tasks["pretrain"].get("cachingOptions", {}).get("enableCache")


def test_scratch_volume_is_deleted_by_the_exit_handler_and_uses_the_default_class(tmp_path):
    """Defects 2 and 4: '' compiled to storageClassName "" (static binding: Pending forever), and DeletePVC ran only
    after a successful train, so every failed or terminated run leaked its claim."""
    docs = compiled(tmp_path)
    tasks = all_tasks(docs)
    root = docs[0]["root"]["dag"]["tasks"]
    claim = "moon3-{{$.pipeline_job_uuid}}-moon3-scratch"
    create = tasks["createpvc"]["inputs"]["parameters"]
    assert "storage_class_name" not in create  # '' = the cluster's default class
    assert create["pvc_name"]["runtimeValue"]["constant"] == claim
    assert create["size"]["runtimeValue"]["constant"] == "200Gi"
    assert create["access_modes"]["runtimeValue"]["constant"] == ["ReadWriteOnce"]
    # The delete is the exit task of a handler around everything: it runs on success, failure and termination.
    (handler,) = [name for name in root if name.startswith("exit-handler")]
    assert root["deletepvc"]["triggerPolicy"]["strategy"] == "ALL_UPSTREAM_TASKS_COMPLETED"
    assert root["deletepvc"]["dependentTasks"] == [handler]
    assert root["deletepvc"]["inputs"]["parameters"]["pvc_name"]["runtimeValue"]["constant"] == claim
    assert not root["deletepvc"].get("cachingOptions", {}).get("enableCache")
    handler_tasks = docs[0]["components"][root[handler]["componentRef"]["name"]]["dag"]["tasks"]
    assert {"createpvc", "fingerprint", "prepare"} <= set(handler_tasks)
    assert "createpvc" in handler_tasks["fingerprint"].get("dependentTasks", [])
    (tmp_path / "sc").mkdir()
    create = all_tasks(compiled(tmp_path / "sc", ["pipeline.pvc_storage_class=premium-rwo"]))["createpvc"]
    assert create["inputs"]["parameters"]["storage_class_name"]["runtimeValue"]["constant"] == "premium-rwo"


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
    inner = all_tasks(docs)
    assert producer(inner["rl"], "pretrained") == "pretrain"
    assert inner["rl"]["inputs"]["parameters"]["scratch_dir"]["runtimeValue"]["constant"] == "/mnt/moon3"
    assert not inner["rl"].get("cachingOptions", {}).get("enableCache")  # pipeline.cache_train: false
    evaluate = inner["evaluate"]
    assert producer(evaluate, "model") == "rl"
    assert (producer(evaluate, "pretrained"), producer(evaluate, "init_model")) == ("pretrain", "pretrain")
    assert docs[0]["components"]["comp-evaluate"]["inputDefinitions"]["artifacts"]["pretrained"]["isOptional"]
    assert "-> rl -> evaluate -> register -> gate -> deploy (apply)" in docs[0]["pipelineInfo"]["description"]
    # register takes the RL model and the evaluation; the gate its version; deploy runs only on a passing gate.
    assert producer(inner["register"], "model") == "rl" and producer(inner["register"], "eval_details") == "evaluate"
    version_in = inner["gate"]["inputs"]["parameters"]["version"]["taskOutputParameter"]
    assert version_in == {"producerTask": "register", "outputParameterKey": "version"}
    promotion = next(t for t in inner.values() if t["taskInfo"]["name"] == "promotion-passed")
    assert any(t["taskInfo"]["name"] == "not-promoted" for t in inner.values())  # the Else branch reports
    assert promotion["triggerPolicy"]["condition"] == (
        "inputs.parameter_values['pipelinechannel--gate-passed'] == true"
    )
    # Inside the nested condition the values arrive as channels named after their producer.
    assert inner["deploy"]["inputs"]["artifacts"]["model"]["componentInputArtifact"] == "pipelinechannel--rl-model"
    deploy_version = inner["deploy"]["inputs"]["parameters"]["registry_version"]["componentInputParameter"]
    assert deploy_version == "pipelinechannel--register-version"
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
    inner = all_tasks(docs)
    assert inner["rl"]["cachingOptions"]["enableCache"] is True
    assert producer(inner["rl"], "pretrained") == "pretrain-trainjob" and producer(inner["evaluate"], "model") == "rl"
    assert producer(inner["evaluate"], "pretrained") == "pretrain-trainjob"
    # The TrainJob's nodes get the CUDA image through the pipeline section the launcher receives.
    pipeline_arg = inner["pretrain-trainjob"]["inputs"]["parameters"]["pipeline"]["runtimeValue"]["constant"]
    assert pipeline_arg["image"] == f"ghcr.io/example/moon3-cuda:{image_tag()}"


def test_version_is_in_the_metadata(tmp_path):
    """Defect 9: the version names the content (sources and every setting), not a commit the YAML cannot know."""
    docs = compiled(tmp_path)
    assert docs[0]["pipelineInfo"]["name"] == "moon3-training"
    assert docs[0]["pipelineInfo"]["description"].startswith(f"moon3 {VERSION}:")
    platform = docs[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    for name in ("exec-prepare", "exec-validate", "exec-pretrain", "exec-rl", "exec-evaluate", "exec-gate-failed",
                 "exec-register", "exec-gate", "exec-deploy"):  # fmt: skip
        assert platform[name]["podMetadata"]["annotations"]["moon3.io/pipeline-version"] == VERSION
    cfg = load_config(PARAMS)
    version = pipeline_version(cfg)
    assert re.fullmatch(r"0\.1\.0\+src\.[0-9a-f]{12}\.p\.[0-9a-f]{8}(\.dirty)?", version), version
    assert version.split("+")[1].split(".")[1] == source_hash(REPO, PIPELINE_SOURCES)
    # Other compile settings, other version (no collision on upload); same settings, same version.
    other = pipeline_version(load_config(PARAMS, ["pipeline.pvc_size=500Gi"]))
    assert other != version and other.split(".p.")[0] == version.split(".p.")[0]
    assert pipeline_version(load_config(PARAMS)) == version


def test_source_hash_follows_the_content_and_marks_uncommitted_edits(tmp_path):
    repo = tmp_path / "repo"
    (repo / "moon3").mkdir(parents=True)
    (repo / "moon3" / "a.py").write_text("x = 1\n")
    (repo / "pyproject.toml").write_text("[project]\nname = 'moon3'\n")
    git = ["git", "-C", str(repo), "-c", "user.email=t@t", "-c", "user.name=t"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "."], check=True)
    subprocess.run([*git, "commit", "-qm", "init"], check=True)
    first, clean = source_hash(repo), sources_dirty(repo)
    assert not clean and image_tag(repo) == f"src-{first}"
    (repo / "moon3" / "b.py").write_text("y = 2\n")  # a new file counts before it is committed
    assert source_hash(repo) != first and sources_dirty(repo)
    (repo / "moon3" / "b.py").unlink()
    assert source_hash(repo) == first and not sources_dirty(repo)
    (repo / "moon3" / "a.py").write_text("x = 2\n")
    assert source_hash(repo) != first and sources_dirty(repo)
    assert pipeline_version(None, repo).endswith(".dirty")


def test_image_checks_refuse_a_cpu_image_on_gpus_and_moving_tags(tmp_path):
    """Defect 6: nothing stopped GPU placement with the CPU image, or a moving tag pulled IfNotPresent."""
    cases = {
        "pipeline.gpu_image=ghcr.io/example/moon3": "train on the CPU",
        "pipeline.image_tag=latest": "moving tag",
        "pipeline.image=ghcr.io/example/moon3:main": "moving tag",
        "pipeline.image_pull_policy=Sometimes": "image_pull_policy",
        "pipeline.pipeline_root=/local/folder": "pipeline_root",
        "pipeline.mlflow_tracking_uri=": "mlflow_tracking_uri",
    }
    for override, message in cases.items():
        with pytest.raises(ValueError, match=message):
            compiled(tmp_path, [override])
    # Allowed: a moving tag pulled Always; one image for both when nothing asks for a GPU; a gs:// root.
    compiled(tmp_path, ["pipeline.image_tag=latest", "pipeline.image_pull_policy=Always"])
    compiled(tmp_path, ["pipeline.gpu_image=ghcr.io/example/moon3", "pipeline.train_accelerator_limit=0",
                        "pipeline.eval_accelerator_limit=0", "pipeline.num_processes=1"])  # fmt: skip
    docs = compiled(tmp_path, ["pipeline.pipeline_root=gs://bucket/moon3/root", "pipeline.image_tag=v1.2.3"])
    assert docs[0]["defaultPipelineRoot"] == "gs://bucket/moon3/root"
    assert executor(docs, "prepare")[0]["image"] == "ghcr.io/example/moon3:v1.2.3"


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
    if not sources_dirty():
        # A clean tree (CI's clone): the committed file is exactly what compiling now makes, version and image
        # tags included. Workflow: commit the code, `moon3 pipeline compile`, commit the YAML.
        fresh = compile_pipeline(load_config(PARAMS), tmp_path / "p.yaml")
        assert list(yaml.safe_load_all(fresh.read_text())) == committed, "stale: commit, then `moon3 pipeline compile`"
        return
    # Uncommitted source edits change the version and the tag: compare everything else.
    version = re.match(r"moon3 (\S+):", committed[0]["pipelineInfo"]["description"]).group(1)
    tag = committed[0]["deploymentSpec"]["executors"]["exec-prepare"]["container"]["image"].rsplit(":", 1)[1]
    fresh = compile_pipeline(load_config(PARAMS, [f"pipeline.image_tag={tag}"]), tmp_path / "p.yaml", version=version)
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
    default = json.loads(docs[0]["root"]["inputDefinitions"]["parameters"]["params"]["defaultValue"])
    assert default["train"]["steps"] == 1234 and isinstance(default["train"]["steps"], int)
    assert default == json.loads(json.dumps(pipeline_params(load_config(edited))))
    assert "pipeline" not in default  # compile-time settings are not a run argument
    assert executor(docs, "prepare")[0]["image"] == "registry.example.com/moon3:edited"
    (tmp_path / "o").mkdir()
    original = compiled(tmp_path / "o", params=PARAMS)
    assert (
        json.loads(original[0]["root"]["inputDefinitions"]["parameters"]["params"]["defaultValue"])["train"]["steps"]
        == load_config(PARAMS).train.steps
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


# --- launch commands (the TrainJob, KFP client and CLI: tests/test_pipeline_client.py) ----------------------


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
LOCAL = ["pipeline.pvc_name=", "pipeline.num_processes=1", "pipeline.deploy=render"]
SMALL = ["data.n_products=120", "data.n_queries=120", "model.reasoning=false", "model.image_size=32",
         "train.steps=6", "train.batch_size=8", "train.warmup_steps=1", "train.num_workers=0", "train.log_every=2",
         "train.hard_negatives_per_query=0", "train.heldout_queries=0", "eval.other_reasoning_mode=false",
         "eval.mlflow_experiment="]  # fmt: skip


@pytest.fixture
def kfp_local(tmp_path, monkeypatch):
    """kfp.local with subprocesses of this venv; MLflow and stray files kept inside tmp_path."""
    from kfp import local

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    root = tmp_path / "kfp-root"
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(root))
    return root


def local_tracking(tmp_path: Path) -> str:
    """A real MLflow tracking + registry store (sqlite) for the steps of a local run (pipeline.mlflow_tracking_uri)."""
    return f"pipeline.mlflow_tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}"


def executor_outputs(run_dir: Path, task: str) -> dict:
    return json.loads((run_dir / task / "executor_output.json").read_text())


def artifact_metadata(run_dir: Path, task: str, name: str) -> dict:
    return executor_outputs(run_dir, task)["artifacts"][name]["artifacts"][0]["metadata"]


@pytest.mark.slow
def test_local_run_of_the_whole_training_pipeline(kfp_local, tmp_path):
    """Every stage of the card, for real, in subprocesses: a first model passes the gate (floors lowered to 0 so a
    6-step model qualifies), becomes champion, and its InferenceService is rendered with its registry version."""
    cfg = load_config(PARAMS, [*LOCAL, local_tracking(tmp_path), "pipeline.ablations=[no_fire]"])
    overrides = [*SMALL, "promotion.min_values={}"]
    load_module(REPO / "pipelines" / "training_pipeline.py").build_pipeline(cfg, VERSION)(overrides=overrides)
    (run,) = list(kfp_local.iterdir())
    # fingerprint -> prepare/validate: the content key of their cache and the data version of the registry.
    data_version = executor_outputs(run, "fingerprint")["parameterValues"]["Output"]
    assert data_version == "generated:mbe3-mini"
    # prepare -> validate: the dataset folder.
    dataset = run / "prepare" / "dataset"
    products = pd.read_parquet(dataset / "products.parquet")
    assert len(products) == 120 and artifact_metadata(run, "prepare", "stats")["products/total"] == 120
    # validate -> pretrain/evaluate: a pipeline root other than gs:// (here a local folder; MinIO in a default
    # cluster): the accepted dataset carries its images, by relative path, so a later pod that receives only the
    # validated artifact finds them (defect 3).
    validated_dir = run / "validate" / "validated"
    validated = pd.read_parquet(validated_dir / "products.parquet")
    assert 0 < len(validated) <= 120
    assert all(p.startswith("media/") and (validated_dir / p).is_file() for p in validated["image"])
    assert {(validated_dir / p).read_bytes() for p in validated["image"][:5]} <= {
        f.read_bytes() for f in (dataset / "images").rglob("*") if f.is_file()
    }
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
    # ablations (ParallelFor): no_fire trained with FIRE off and evaluated beside the model, with a paired delta.
    (variant,) = [d for d in run.iterdir() if d.name.startswith("for-loop")]
    assert json.loads((variant / "pretrain-2" / "model" / "moon3_config.json").read_text())["model"]["fire"] is False
    ablation_metrics = json.loads((variant / "evaluate-2" / "details" / "metrics.json").read_text())
    assert "no_fire" in ablation_metrics and "no_fire" in ablation_metrics["deltas"]
    # register -> gate -> deploy: version 1 in the real registry with its lineage; first model, floors met: champion;
    # the deploy step (render) wrote the InferenceService for that version.
    version = str(executor_outputs(run, "register")["parameterValues"]["version"])
    assert version == "1"
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    registered = client.get_model_version("moon3", version)
    assert registered.tags["data_version"] == data_version and registered.tags["pipeline_run_id"]
    assert str(client.get_registered_model("moon3").aliases["champion"]) == version
    gate = executor_outputs(run, "gate")["parameterValues"]
    assert gate["passed"] is True, gate
    assert "| metric |" in (run / "gate" / "table").read_text()
    isvc = [d for d in yaml.safe_load_all((run / "deploy" / "manifests" / "manifests.yaml").read_text())
            if d["kind"] == "InferenceService"]  # fmt: skip
    assert len(isvc) == 1 and isvc[0]["metadata"]["annotations"]["moon3.io/registry-version"] == version
    runtime = next(d for d in yaml.safe_load_all((run / "deploy" / "manifests" / "manifests.yaml").read_text())
                   if d["kind"] == "ServingRuntime")  # fmt: skip
    assert runtime["spec"]["containers"][0]["image"] == image_refs(cfg.pipeline)[0]  # the image that was trained


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


# --- data steps: the cache keys on content; images travel with the validated dataset -------------------------


def test_fingerprint_feeds_the_data_steps_and_follows_the_content(tmp_path, mini_dataset):
    """Defect 10: the importer's cache keyed on the URI, so a catalog replaced at the same path kept serving the
    old validated data. The fingerprint (never cached) is an input of prepare and validate: their cache key."""
    from moon3.pipelines.steps import fingerprint_step

    for overrides in ([], ["pipeline.prepare=false"]):
        tasks = all_tasks(compiled(tmp_path, overrides))
        assert not tasks["fingerprint"].get("cachingOptions", {}).get("enableCache")
        channel = tasks["validate"]["inputs"]["parameters"]["source_fingerprint"]["taskOutputParameter"]
        assert channel == {"producerTask": "fingerprint", "outputParameterKey": "Output"}
        assert ("prepare" in tasks) != bool(overrides)
        if "prepare" in tasks:
            assert tasks["prepare"]["inputs"]["parameters"]["source_fingerprint"]["taskOutputParameter"] == channel
        else:
            uri = tasks["fingerprint"]["inputs"]["parameters"]["dataset_uri"]["componentInputParameter"]
            assert uri == "pipelinechannel--dataset_uri"
    catalog = tmp_path / "catalog"
    shutil.copytree(mini_dataset, catalog)
    first = fingerprint_step(pipeline_params(load_config(PARAMS)), [], str(catalog))
    assert first.startswith("local:sha256:") and fingerprint_step("{}", [], str(catalog)) == first
    table = catalog / "products.parquet"
    products = pd.read_parquet(table)
    products.iloc[:-1].to_parquet(table)  # the same URI, other content
    assert fingerprint_step("{}", [], str(catalog)) != first
    assert fingerprint_step("{}", []) == "generated:mbe3-mini"


def test_validated_dataset_carries_its_images_off_gcs(tmp_path, mini_dataset):
    """Defect 3: with a pipeline root other than gs:// the accepted tables pointed at the prepare pod's local paths,
    which no later pod has. validate_step now copies what the accepted rows use into the validated artifact."""
    from moon3.pipelines.steps import validate_step

    source = tmp_path / "prepare" / "dataset"
    shutil.copytree(mini_dataset, source)
    out = {name: tmp_path / "validate" / name for name in ("validated", "quarantine", "details")}
    result = validate_step("{}", ["validation.max_reject_fraction=1.0"], str(source), "minio://mlpipeline/v2/x",
                           str(out["validated"]), str(out["quarantine"]), str(out["details"]))  # fmt: skip
    assert result["passed"]
    moved = tmp_path / "elsewhere"  # a later pod: only the validated artifact, at another path
    shutil.copytree(out["validated"], moved)
    shutil.rmtree(source)
    for table, column in (("products.parquet", "image"), ("queries.parquet", "query_image")):
        paths = [p for p in pd.read_parquet(moved / table)[column] if p]
        assert paths and all(p.startswith("media/") and (moved / p).is_file() for p in paths), table
    # With a gs:// input the tables name the images by URI and nothing is copied.
    gcs = validate_step("{}", ["validation.max_reject_fraction=1.0", "validation.check_images=false"],
                        str(mini_dataset), "gs://bucket/run/prepare/dataset", str(tmp_path / "v2"),
                        str(tmp_path / "q2"), str(tmp_path / "d2"))  # fmt: skip
    assert gcs["passed"] and not (tmp_path / "v2" / "media").exists()
    images = pd.read_parquet(tmp_path / "v2" / "products.parquet")["image"]
    assert all(p.startswith("gs://bucket/run/prepare/dataset/") for p in images if p)
