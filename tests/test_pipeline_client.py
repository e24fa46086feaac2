"""Talking to clusters: the KFP client calls (credentials, namespace, run arguments), the ``moon3 pipeline`` CLI,
and the Kubeflow Trainer TrainJob (manifest, submission, cleanup).

What cannot run here is faked, and only that: no KFP API server can run (upload/run are checked against a fake
``kfp.Client`` whose methods keep the real signatures) and no Kubernetes API server exists (the TrainJob is checked
as a manifest and against a fake ``CustomObjectsApi``).
"""

# No ``from __future__ import annotations``: KFP reads the small test pipelines' annotations as types.
import inspect
import json
import os
import signal
from pathlib import Path
from types import SimpleNamespace

import kfp
import pytest
import yaml
from kfp import compiler, dsl
from kfp_server_api import ApiException
from typer.testing import CliRunner

from moon3.config import load_config
from moon3.pipelines import client as kfp_client
from moon3.pipelines import trainjob
from moon3.pipelines.compile import REPO
from moon3.pipelines.launch import torchrun_command, train_args
from moon3.pipelines.params import pipeline_params
from moon3.pipelines.placement import k8s_tolerations
from moon3.pipelines.steps import pretrain_trainjob_step
from moon3.pipelines.trainjob import (
    Terminated,
    apply_trainjob,
    build_trainjob,
    delete_trainjob,
    label_value,
    launcher_owner,
    trainjob_labels,
    trainjob_name,
    trainjob_yaml,
    wait_for_trainjob,
)

PARAMS = REPO / "params.yaml"
TRAINJOB = ["pipeline.trainer=trainjob", "pipeline.pvc_access_mode=ReadWriteMany"]
SECRET = "s3cr3t-token-value"


# --- a fake kfp.Client ----------------------------------------------------------------------------------------


def _server_spec(package: str) -> dict:
    """What the API server stores for an uploaded package: the pipeline spec, nested with the platform spec."""
    docs = list(yaml.safe_load_all(Path(package).read_text()))
    return {"pipeline_spec": docs[0], "platform_spec": docs[1]} if len(docs) > 1 else docs[0]


class FakeKfpClient:
    """Records the calls of the kfp.Client methods we use, with their real signatures (no KFP API server here)."""

    def __init__(self, conflict: bool = False):
        self.pipelines: dict[tuple[str | None, str], str] = {}  # (namespace, name) -> id
        self.versions: dict[str, list[tuple[str, dict]]] = {}  # pipeline id -> [(version id, spec)]
        self.conflict, self.calls = conflict, []

    def list_pipelines(self, page_token="", page_size=10, sort_by="", filter=None, namespace=None):  # noqa: A002
        (pred,) = json.loads(filter)["predicates"]
        assert (pred["operation"], pred["key"]) == (1, "display_name")
        pid = self.pipelines.get((namespace, pred["stringValue"]))
        return SimpleNamespace(pipelines=[SimpleNamespace(pipeline_id=pid)] if pid else None)

    def upload_pipeline(self, pipeline_package_path, pipeline_name=None, description=None, namespace=None):
        self.calls.append(("upload_pipeline", {"name": pipeline_name, "namespace": namespace}))
        self.pipelines[(namespace, pipeline_name)] = pid = f"p-{len(self.pipelines) + 1}"
        self.versions[pid] = [(f"{pid}-v1", _server_spec(pipeline_package_path))]
        return SimpleNamespace(pipeline_id=pid)

    def upload_pipeline_version(self, pipeline_package_path, pipeline_version_name, pipeline_id=None,
                                pipeline_name=None, description=None):  # fmt: skip
        self.calls.append(("upload_pipeline_version", {"name": pipeline_version_name, "pipeline_id": pipeline_id}))
        if self.conflict:
            raise ApiException(status=409, reason="Conflict")
        vid = f"{pipeline_id}-v{len(self.versions[pipeline_id]) + 1}"
        self.versions[pipeline_id].append((vid, _server_spec(pipeline_package_path)))
        return SimpleNamespace(pipeline_id=pipeline_id, pipeline_version_id=vid)

    def list_pipeline_versions(self, pipeline_id, page_token="", page_size=10, sort_by="", filter=None):  # noqa: A002
        assert sort_by == "created_at desc"
        newest = list(reversed(self.versions.get(pipeline_id, [])))[:page_size]
        return SimpleNamespace(pipeline_versions=[SimpleNamespace(pipeline_version_id=v) for v, _ in newest] or None)

    def get_pipeline_version(self, pipeline_id, pipeline_version_id):
        spec = dict(self.versions[pipeline_id])[pipeline_version_id]
        return SimpleNamespace(pipeline_version_id=pipeline_version_id, pipeline_spec=spec)

    def create_experiment(self, name, description=None, namespace=None):
        self.calls.append(("create_experiment", {"name": name, "namespace": namespace}))
        return SimpleNamespace(experiment_id=f"exp-{name}")

    def run_pipeline(self, experiment_id, job_name, pipeline_package_path=None, params=None, pipeline_id=None,
                     version_id=None, pipeline_root=None, enable_caching=None, cache_key=None,
                     service_account=None):  # fmt: skip
        self.calls.append(("run_pipeline", {"experiment_id": experiment_id, "job_name": job_name, "params": params,
                                            "pipeline_id": pipeline_id, "version_id": version_id,
                                            "service_account": service_account}))  # fmt: skip
        return SimpleNamespace(run_id="run-uploaded")

    def create_run_from_pipeline_package(self, pipeline_file, arguments=None, run_name=None, experiment_name=None,
                                         namespace=None, pipeline_root=None, enable_caching=None, cache_key=None,
                                         service_account=None, experiment_id=None):  # fmt: skip
        self.calls.append(("create_run_from_pipeline_package", {
            "file": Path(pipeline_file).name, "arguments": arguments, "experiment_name": experiment_name,
            "namespace": namespace, "service_account": service_account}))  # fmt: skip
        return SimpleNamespace(run_id="run-pkg")


def test_fake_client_keeps_the_kfp_signatures():
    """The fake's methods take the real kfp.Client parameters (so a renamed keyword fails here, not in a cluster)."""
    for name, method in inspect.getmembers(FakeKfpClient, inspect.isfunction):
        if name.startswith("_"):
            continue
        real = list(inspect.signature(getattr(kfp.Client, name)).parameters)
        assert list(inspect.signature(method).parameters) == real, name


# --- small compiled pipelines (the real IR of each parameter type) ---------------------------------------------


@dsl.component(base_image="python:3.11-slim")
def _noop(text: str) -> str:
    return text


def _compiled(tmp_path: Path, kind: str) -> Path:
    if kind == "struct":

        @dsl.pipeline(name="p-struct")
        def pipeline(params: dict = {"train": {"steps": 3}}, overrides: list = []):  # noqa: B006
            _noop(text="x")

    else:

        @dsl.pipeline(name="p-import")
        def pipeline(dataset_uri: str, params: str = "{}", overrides: list = []):  # noqa: B006
            _noop(text=dataset_uri)

    path = tmp_path / f"{kind}.yaml"
    compiler.Compiler().compile(pipeline, str(path))
    return path


FLAGS = {"dataset_uri": "--dataset-uri", "overrides": "--set"}


def test_run_arguments_follow_the_declared_parameters(tmp_path):
    params = {"train": {"steps": 5, "lr": 3.0e-4}, "data": {"n_products": 120}}
    struct = kfp_client.package_spec(_compiled(tmp_path, "struct"))
    sent = kfp_client.pipeline_arguments(struct, {"params": params, "overrides": [], "dataset_uri": ""}, FLAGS)
    assert sent == {"params": params}  # no dataset_uri (undeclared, empty), no empty overrides (optional)
    with pytest.raises(ValueError, match=r"no parameter 'dataset_uri' \(--dataset-uri\).*overrides, params"):
        kfp_client.pipeline_arguments(struct, {"params": params, "dataset_uri": "gs://b/d"}, FLAGS)
    imported = kfp_client.package_spec(_compiled(tmp_path, "import"))
    with pytest.raises(ValueError, match=r"requires 'dataset_uri' \(--dataset-uri\)"):
        kfp_client.pipeline_arguments(imported, {"params": params, "dataset_uri": ""}, FLAGS)
    sent = kfp_client.pipeline_arguments(imported, {"params": params, "overrides": ["train.steps=7"],
                                                    "dataset_uri": "gs://b/d"}, FLAGS)  # fmt: skip
    assert isinstance(sent["params"], str)  # STRING: YAML text, integers stay integers
    assert yaml.safe_load(sent["params"]) == params and "steps: 5" in sent["params"]
    assert sent["overrides"] == ["train.steps=7"] and sent["dataset_uri"] == "gs://b/d"
    assert kfp_client.pipeline_arguments(struct, {"params": "train: {steps: 2}"}) == {"params": {"train": {"steps": 2}}}


# --- credentials and namespace --------------------------------------------------------------------------------


class RecordingKfpClient:
    """Stands in for the kfp.Client class: records the constructor's keywords."""

    made: list[dict] = []

    def __init__(self, **kwargs):
        RecordingKfpClient.made.append(kwargs)


def test_make_client_credentials_and_namespace(monkeypatch):
    monkeypatch.setattr(kfp, "Client", RecordingKfpClient)
    made = RecordingKfpClient.made
    made.clear()
    monkeypatch.delenv("KFP_TOKEN", raising=False)
    kfp_client.make_client("https://kfp.invalid")
    assert made[-1] == {"host": "https://kfp.invalid"}  # kfp's own defaults (IAP, cookies, kube context)
    monkeypatch.setenv("KFP_TOKEN", SECRET)
    kfp_client.make_client("https://kfp.invalid", "team-a")
    assert made[-1] == {"host": "https://kfp.invalid", "namespace": "team-a", "existing_token": SECRET}
    monkeypatch.setenv("CI_OIDC", "other-token")
    kfp_client.make_client("https://kfp.invalid", token_env="CI_OIDC")
    assert made[-1]["existing_token"] == "other-token"
    with pytest.raises(ValueError, match="--token-env MISSING_VAR") as err:
        kfp_client.make_client("https://kfp.invalid", token_env="MISSING_VAR")
    assert SECRET not in str(err.value)
    kfp_client.make_client("https://kfp.invalid", "team-a", in_cluster=True)
    assert isinstance(made[-1]["credentials"], kfp.client.ServiceAccountTokenVolumeCredentials)
    assert "existing_token" not in made[-1] and made[-1]["namespace"] == "team-a"
    with pytest.raises(ValueError, match="not both"):
        kfp_client.make_client("https://kfp.invalid", token_env="CI_OIDC", in_cluster=True)


def test_upload_first_then_new_versions(tmp_path):
    package = _compiled(tmp_path, "struct")
    fake = FakeKfpClient()
    first = kfp_client.upload(fake, package, "moon3-training", "0.1.0+src.a", namespace="team-a")
    assert first == kfp_client.UploadResult("p-1", "p-1-v1", "moon3-training", first_upload=True)
    assert fake.calls[-1] == ("upload_pipeline", {"name": "moon3-training", "namespace": "team-a"})
    second = kfp_client.upload(fake, package, "moon3-training", "0.1.0+src.b", description="d", namespace="team-a")
    assert second == kfp_client.UploadResult("p-1", "p-1-v2", "0.1.0+src.b", first_upload=False)
    assert fake.calls[-1] == ("upload_pipeline_version", {"name": "0.1.0+src.b", "pipeline_id": "p-1"})
    # The namespaced pipeline is not a shared one: without the namespace it is a new pipeline.
    assert kfp_client.upload(fake, package, "moon3-training", "v").first_upload
    assert fake.calls[-1] == ("upload_pipeline", {"name": "moon3-training", "namespace": None})
    clash = FakeKfpClient(conflict=True)
    kfp_client.upload(clash, package, "moon3-training", "v1")
    with pytest.raises(ValueError, match="already has a version '0.1.0\\+src.b'"):
        kfp_client.upload(clash, package, "moon3-training", "0.1.0+src.b")
    with pytest.raises(FileNotFoundError, match="compile first"):
        kfp_client.upload(fake, tmp_path / "missing.yaml", "moon3-training", "v")


def test_run_uploaded_version_or_package(tmp_path):
    fake = FakeKfpClient()
    with pytest.raises(ValueError, match="upload first"):
        kfp_client.run(fake, {}, pipeline_name="moon3-training", namespace="team-a")
    struct, imported = _compiled(tmp_path, "struct"), _compiled(tmp_path, "import")
    kfp_client.upload(fake, imported, "moon3-training", "v1", namespace="team-a")
    kfp_client.upload(fake, struct, "moon3-training", "v2", namespace="team-a")
    args = {"params": {"train": {"steps": 5}}, "overrides": ["train.steps=5"], "dataset_uri": ""}
    started = kfp_client.run(fake, args, experiment="exp", pipeline_name="moon3-training", namespace="team-a",
                             service_account="moon3-runner")  # fmt: skip
    assert started == kfp_client.RunResult("run-uploaded", "p-1", "p-1-v2")  # the newest version
    assert fake.calls[-2:] == [
        ("create_experiment", {"name": "exp", "namespace": "team-a"}),
        ("run_pipeline", {"experiment_id": "exp-exp", "job_name": "moon3-training", "pipeline_id": "p-1",
                          "version_id": "p-1-v2", "service_account": "moon3-runner",
                          "params": {"params": {"train": {"steps": 5}}, "overrides": ["train.steps=5"]}}),
    ]  # fmt: skip
    given = {**args, "dataset_uri": "gs://b/d"}
    started = kfp_client.run(fake, given, package=imported, namespace="team-a", flags=FLAGS, service_account="")
    assert started == kfp_client.RunResult("run-pkg")
    name, call = fake.calls[-1]
    assert (name, call["file"], call["namespace"], call["service_account"]) == (
        "create_run_from_pipeline_package", "import.yaml", "team-a", None)  # fmt: skip
    assert call["arguments"]["dataset_uri"] == "gs://b/d" and isinstance(call["arguments"]["params"], str)
    with pytest.raises(ValueError, match="requires 'dataset_uri'"):  # checked before anything reaches the server
        kfp_client.run(fake, args, package=imported, flags=FLAGS)


def test_cli_compile_upload_run(tmp_path, monkeypatch):
    from moon3.cli import app

    fake, made = FakeKfpClient(), []

    def make_client(host, namespace=None, token_env=None, in_cluster=False):
        made.append({"host": host, "namespace": namespace, "token_env": token_env, "in_cluster": in_cluster})
        return fake

    monkeypatch.setattr(kfp_client, "make_client", make_client)
    monkeypatch.setenv("KFP_TOKEN", SECRET)
    runner = CliRunner()
    out = tmp_path / "c.yaml"
    res = runner.invoke(app, ["pipeline", "compile", "--params", str(PARAMS), "--out", str(out)])
    assert res.exit_code == 0, res.output
    declared = kfp_client.declared_parameters(kfp_client.package_spec(out))
    assert "dataset_uri" not in declared  # the default pipeline prepares its dataset
    host = ["--host", "http://kfp.invalid", "--params", str(PARAMS), "--namespace", "team-a"]
    res = runner.invoke(app, ["pipeline", "upload", *host, "--token-env", "KFP_TOKEN"])
    assert res.exit_code == 0, res.output
    assert made[-1] == {"host": "http://kfp.invalid", "namespace": "team-a", "token_env": "KFP_TOKEN",
                        "in_cluster": False}  # fmt: skip
    assert fake.calls[0] == ("upload_pipeline", {"name": "moon3-training", "namespace": "team-a"})
    res = runner.invoke(app, ["pipeline", "run", *host, "--in-cluster", "--set", "train.steps=5"])
    assert res.exit_code == 0, res.output
    assert made[-1]["in_cluster"] is True
    name, call = fake.calls[-1]
    assert name == "run_pipeline" and (call["pipeline_id"], call["version_id"]) == ("p-1", "p-1-v1")
    assert set(call["params"]) == {"params", "overrides"}  # no dataset_uri: the API server would reject it
    assert call["params"]["overrides"] == ["train.steps=5"]
    params = call["params"]["params"]
    expected = pipeline_params(load_config(PARAMS))
    if declared["params"]["parameterType"] == "STRING":
        params = yaml.safe_load(params)
    assert params == expected
    assert call["service_account"] == (load_config(PARAMS).pipeline.service_account or None)
    res = runner.invoke(app, ["pipeline", "run", *host, "--dataset-uri", "gs://b/d"])
    assert res.exit_code == 1 and "--dataset-uri" in res.output, res.output
    res = runner.invoke(app, ["pipeline", "run", "--host", "h", "--set", "pipeline.image=x"])
    assert res.exit_code == 2 and "compile time" in res.output
    res = runner.invoke(app, ["pipeline", "run", "--host", "h", "--set", "train.stepz=1"])
    assert res.exit_code == 2 and "train.stepz" in res.output
    assert SECRET not in res.output


# --- TrainJob -------------------------------------------------------------------------------------------------

POOL = [
    "pipeline.train_node_selector={pool: a100-pool, cloud.google.com/gke-accelerator: nvidia-tesla-a100}",
    "pipeline.train_tolerations=[{key: nvidia.com/gpu, operator: Exists, effect: NoSchedule},"
    " {key: dedicated, operator: Equal, value: ml, effect: NoExecute, toleration_seconds: 600}]",
]


def test_trainjob_manifest(tmp_path, monkeypatch):
    """Manifest only: no Kubernetes cluster (nor the Trainer CRDs) can run here."""
    cfg = load_config(PARAMS, [*POOL, *TRAINJOB, "pipeline.num_nodes=3", "pipeline.service_account=moon3-wi",
                               "pipeline.image=r/moon3-cuda:src-abc"])  # fmt: skip
    pc = cfg.pipeline
    name = trainjob_name("3F2a_91c0-44ee-b1d2-7e5f0c9a11aa")
    assert name == "moon3-pretrain-3f2a-91c0-44ee-b1d2" and len(name) <= 63
    command = torchrun_command(train_args("/mnt/moon3/r/params.yaml", "/mnt/moon3/r/data", "/mnt/moon3/r/pretrain",
                                          "/mnt/moon3/r/reports"))  # fmt: skip
    labels = trainjob_labels("3f2a-91c0", "0.1.0+src.1a2b3c4d5e6f.p.0a1b2c3d.dirty")
    assert labels == {"app.kubernetes.io/name": "moon3", "moon3.io/pipeline-run-id": "3f2a-91c0",
                      "moon3.io/pipeline-version": "0.1.0-src.1a2b3c4d5e6f.p.0a1b2c3d.dirty"}  # fmt: skip
    assert label_value("+" + "a" * 70 + "+") == "a" * 62 and label_value("") == ""
    monkeypatch.setattr(trainjob, "SA_NAMESPACE_FILE", tmp_path / "namespace")
    (tmp_path / "namespace").write_text("team-a\n")
    env = {"KFP_POD_NAME": "run-1-pretrain-123", "KFP_POD_UID": "0c1d-uid"}
    owner = launcher_owner("team-a", env)
    assert owner == {"apiVersion": "v1", "kind": "Pod", "name": "run-1-pretrain-123", "uid": "0c1d-uid",
                     "controller": False, "blockOwnerDeletion": False}  # fmt: skip
    assert launcher_owner("other-ns", env) is None  # no cross-namespace owners (Kubernetes would delete it)
    assert launcher_owner("team-a", {}) is None  # not in a KFP pod
    manifest = build_trainjob(name, pc, command, "run-1-moon3-scratch", "team-a", env={"MLFLOW_TRACKING_URI": "http://m"},
                              labels=labels, owner=owner)  # fmt: skip
    assert yaml.safe_load(trainjob_yaml(manifest)) == manifest
    assert manifest["apiVersion"] == "trainer.kubeflow.org/v1alpha1" and manifest["kind"] == "TrainJob"
    assert manifest["metadata"] == {"name": name, "namespace": "team-a", "labels": labels, "ownerReferences": [owner]}
    spec = manifest["spec"]
    assert spec["runtimeRef"]["name"] == "torch-distributed"
    trainer = spec["trainer"]
    assert trainer["image"] == "r/moon3-cuda:src-abc" and trainer["command"] == command
    assert (trainer["numNodes"], trainer["numProcPerNode"]) == (3, pc.num_processes)
    assert trainer["resourcesPerNode"]["limits"]["nvidia.com/gpu"] == pc.train_accelerator_limit
    assert trainer["env"] == [{"name": "MLFLOW_TRACKING_URI", "value": "http://m"}]
    (override,) = spec["podTemplateOverrides"]
    assert override["targetJobs"] == [{"name": "node"}]
    assert override["metadata"] == {"labels": labels, "annotations": {"sidecar.istio.io/inject": "false"}}
    pod = override["spec"]
    assert pod["serviceAccountName"] == "moon3-wi"
    assert pod["nodeSelector"] == pc.train_node_selector
    assert pod["tolerations"] == k8s_tolerations(pc.train_tolerations)
    assert pod["tolerations"][1]["tolerationSeconds"] == 600
    assert pod["volumes"] == [{"name": "moon3-shared", "persistentVolumeClaim": {"claimName": "run-1-moon3-scratch"}}]
    assert pod["containers"] == [{"name": "node", "volumeMounts": [{"name": "moon3-shared",
                                                                    "mountPath": pc.pvc_mount_path}]}]  # fmt: skip
    plain = build_trainjob(name, load_config(PARAMS, TRAINJOB).pipeline, command, "c", "ns")
    assert plain["metadata"]["labels"] == {"app.kubernetes.io/name": "moon3"}
    assert "ownerReferences" not in plain["metadata"]
    assert "serviceAccountName" not in plain["spec"]["podTemplateOverrides"][0]["spec"]  # the namespace default
    with pytest.raises(ValueError, match="RFC 1035"):
        build_trainjob("Bad_Name", pc, command, "c", "ns")
    with pytest.raises(ValueError, match="PersistentVolumeClaim"):
        build_trainjob(name, pc, command, "", "ns")


class FakeCustomObjects:
    """Stands in for kubernetes.client.CustomObjectsApi: records calls, replays a list of TrainJob states."""

    def __init__(self, states: list[str | None], exists: bool = False, deleting: int = 0):
        self.states, self.exists, self.deleting, self.calls = list(states), exists, deleting, []
        self.owners: list[dict] = []

    def create_namespaced_custom_object(self, group, version, namespace, plural, body):
        self.calls.append(("create", group, version, namespace, plural, body["metadata"]["name"]))
        if self.exists or self.deleting:
            raise ApiException(status=409, reason="AlreadyExists")
        return body

    def get_namespaced_custom_object(self, group, version, namespace, plural, name):
        self.calls.append(("get", name))
        meta = {"name": name, "namespace": namespace, "ownerReferences": self.owners}
        if self.deleting:
            self.deleting -= 1
            return {"metadata": {**meta, "deletionTimestamp": "2025-01-01T00:00:00Z"}}
        state = self.states.pop(0) if self.states else None
        conditions = [{"type": state, "status": "True", "reason": "JobFailed", "message": "node-0 OOMKilled"}]
        return {"metadata": meta, "status": {"conditions": conditions if state else []}}

    def patch_namespaced_custom_object(self, group, version, namespace, plural, name, body):
        self.calls.append(("patch", name, body))
        self.owners = body["metadata"]["ownerReferences"]
        return {"metadata": {"name": name, "namespace": namespace, "ownerReferences": self.owners}}

    def delete_namespaced_custom_object(self, group, version, namespace, plural, name, **kwargs):
        self.calls.append(("delete", namespace, name, kwargs))
        if not self.exists and not any(c[0] == "create" for c in self.calls):
            raise ApiException(status=404, reason="NotFound")


def test_trainjob_apply_wait_and_delete_with_a_fake_api():
    """The Kubernetes API is faked: no cluster can run here."""
    pc = load_config(PARAMS, TRAINJOB).pipeline
    owner = {"apiVersion": "v1", "kind": "Pod", "name": "pod-2", "uid": "uid-2"}
    manifest = build_trainjob("moon3-pretrain-x", pc, ["torchrun"], "claim", "ns", owner=owner)
    api = FakeCustomObjects([None, None, "Complete"])
    apply_trainjob(manifest, api)
    assert api.calls[0] == ("create", "trainer.kubeflow.org", "v1alpha1", "ns", "trainjobs", "moon3-pretrain-x")
    slept = []
    done = wait_for_trainjob("moon3-pretrain-x", "ns", api, timeout_s=100, poll_s=10, sleep=slept.append)
    assert slept == [10, 10] and done["status"]["conditions"][0]["type"] == "Complete"
    retried = FakeCustomObjects([], exists=True)  # a retried launcher pod finds its TrainJob and co-owns it
    retried.owners = [{"apiVersion": "v1", "kind": "Pod", "name": "pod-1", "uid": "uid-1"}]
    kept = apply_trainjob(manifest, retried)
    assert [o["uid"] for o in kept["metadata"]["ownerReferences"]] == ["uid-1", "uid-2"]
    apply_trainjob(manifest, retried)  # already an owner: no second patch
    assert [c[0] for c in retried.calls] == ["create", "get", "patch", "create", "get"]
    cleaning = FakeCustomObjects([], deleting=2)  # an earlier attempt's TrainJob, still being deleted
    slept.clear()
    assert apply_trainjob(manifest, cleaning, poll_s=5, sleep=slept.append)["metadata"]["name"] == "moon3-pretrain-x"
    assert slept == [5, 5] and [c[0] for c in cleaning.calls] == ["create", "get", "create", "get", "create"]
    with pytest.raises(TimeoutError, match="still being deleted"):
        apply_trainjob(manifest, FakeCustomObjects([], deleting=99), deleting_timeout_s=10, sleep=slept.append)
    with pytest.raises(RuntimeError, match="JobFailed: node-0 OOMKilled"):
        wait_for_trainjob("x", "ns", FakeCustomObjects(["Failed"]), sleep=slept.append)
    with pytest.raises(TimeoutError, match="30 s"):
        wait_for_trainjob("x", "ns", FakeCustomObjects([]), timeout_s=30, poll_s=10, sleep=slept.append)
    assert delete_trainjob("moon3-pretrain-x", "ns", api) is True
    assert api.calls[-1] == ("delete", "ns", "moon3-pretrain-x", {"propagation_policy": "Background"})
    assert delete_trainjob("gone", "ns", FakeCustomObjects([])) is False  # 404: nothing to clean


class TrainingCluster(FakeCustomObjects):
    """A fake cluster whose 'nodes' write the model onto the shared volume when the TrainJob is created."""

    def create_namespaced_custom_object(self, group, version, namespace, plural, body):
        self.body = body
        args = body["spec"]["trainer"]["command"]
        work = Path(args[args.index("--out-dir") + 1]).parent
        for folder in ("pretrain/final", "pretrain/init", "reports"):
            (work / folder).mkdir(parents=True, exist_ok=True)
        (work / "pretrain/final/weights.bin").write_bytes(b"trained")
        (work / "pretrain/init/weights.bin").write_bytes(b"untrained")
        (work / "reports/train_metrics.json").write_text(json.dumps({"steps": 300, "final_loss": 0.5}))
        return super().create_namespaced_custom_object(group, version, namespace, plural, body)


def _launcher(tmp_path: Path, monkeypatch, extra: list[str] | None = None) -> tuple:
    """Config, the ``pipeline`` struct and the ``params`` as KFP hands them to the launcher pod."""
    monkeypatch.setenv("MOON3_HOME", str(REPO))
    cfg = load_config(PARAMS, [*TRAINJOB, f"pipeline.pvc_mount_path={tmp_path / 'pvc'}",
                               "pipeline.trainjob_namespace=team-a", *(extra or [])])  # fmt: skip
    pipeline = json.loads(json.dumps(cfg.to_dict()["pipeline"]), parse_int=float)  # as KFP hands a struct over
    params = json.loads(json.dumps(pipeline_params(cfg)), parse_int=float)
    return cfg, pipeline, params


def test_trainjob_launcher_step_with_a_fake_cluster(tmp_path, monkeypatch, mini_dataset):
    """The launcher pod's work around a fake TrainJob: the 'nodes' write the model onto the shared volume."""
    cfg, pipeline, params = _launcher(tmp_path, monkeypatch)
    monkeypatch.setattr(trainjob, "SA_NAMESPACE_FILE", tmp_path / "namespace")
    (tmp_path / "namespace").write_text("team-a")
    monkeypatch.setenv("KFP_POD_NAME", "run-42-pretrain-trainjob-77")
    monkeypatch.setenv("KFP_POD_UID", "5e1f-uid")
    monkeypatch.setenv("MOON3_PIPELINE_VERSION", "0.1.0+src.abc.p.def")
    api = TrainingCluster(["Complete"])
    model, init = str(tmp_path / "model"), str(tmp_path / "init")
    summary = pretrain_trainjob_step(params, ["train.steps=300"], pipeline, str(mini_dataset), model, init,
                                     "claim-1", "run-42", api)  # fmt: skip
    assert summary == {"steps": 300.0, "final_loss": 0.5}
    assert (tmp_path / "model/weights.bin").read_bytes() == b"trained"
    assert (tmp_path / "init/weights.bin").read_bytes() == b"untrained"
    work = tmp_path / "pvc" / "run-42"
    assert sorted(p.name for p in (work / "data").iterdir()) == sorted(p.name for p in mini_dataset.iterdir())
    written = load_config(work / "params.yaml")  # the file every TrainJob node reads
    assert written.train.deepspeed_config == str(REPO / "infra/deepspeed/zero2.json")
    assert written.train.steps == 300 and written.model == cfg.model
    meta = api.body["metadata"]
    assert meta["namespace"] == "team-a" and meta["name"] == "moon3-pretrain-run-42"
    assert meta["labels"] == {"app.kubernetes.io/name": "moon3", "moon3.io/pipeline-run-id": "run-42",
                              "moon3.io/pipeline-version": "0.1.0-src.abc.p.def"}  # fmt: skip
    assert meta["ownerReferences"][0]["uid"] == "5e1f-uid"
    assert api.body["spec"]["podTemplateOverrides"][0]["spec"]["volumes"][0]["persistentVolumeClaim"] == {
        "claimName": "claim-1"
    }
    assert not any(c[0] == "delete" for c in api.calls)  # a completed TrainJob is kept (logs, retries)


def test_trainjob_step_deletes_the_trainjob_on_failure_and_timeout(tmp_path, monkeypatch):
    _, pipeline, params = _launcher(tmp_path, monkeypatch, ["pipeline.trainjob_timeout_s=60"])
    data = tmp_path / "data"
    data.mkdir()
    (data / "products.parquet").write_bytes(b"")
    model, init = str(tmp_path / "model"), str(tmp_path / "init")
    slept = []
    timing_out = TrainingCluster([])
    with pytest.raises(TimeoutError, match="60 s"):
        pretrain_trainjob_step(params, [], pipeline, str(data), model, init, "claim", "run-7", timing_out,
                               sleep=slept.append)  # fmt: skip
    assert slept == [30, 30]
    assert timing_out.calls[-1] == ("delete", "team-a", "moon3-pretrain-run-7", {"propagation_policy": "Background"})
    failing = TrainingCluster([None, "Failed"])
    with pytest.raises(RuntimeError, match="OOMKilled"):
        pretrain_trainjob_step(params, [], pipeline, str(data), model, init, "claim", "run-7", failing,
                               sleep=slept.append)  # fmt: skip
    assert failing.calls[-1][0] == "delete"


def test_trainjob_step_deletes_the_trainjob_on_sigterm(tmp_path, monkeypatch):
    """KFP terminating the run sends SIGTERM to the launcher: the TrainJob goes, the step exits 143."""
    _, pipeline, params = _launcher(tmp_path, monkeypatch)
    data = tmp_path / "data"
    data.mkdir()
    (data / "products.parquet").write_bytes(b"")

    def terminate(seconds: float) -> None:  # the poll's sleep: the signal arrives while waiting
        os.kill(os.getpid(), signal.SIGTERM)

    class Unexpected(Exception):
        pass

    def fallback(signum, frame):  # if the step installed no handler, fail the test instead of killing pytest
        raise Unexpected("SIGTERM reached the test's own handler")

    previous = signal.signal(signal.SIGTERM, fallback)
    try:
        api = TrainingCluster([None, None])
        with pytest.raises(Terminated) as exited:
            pretrain_trainjob_step(params, [], pipeline, str(data), str(tmp_path / "m"), str(tmp_path / "i"),
                                   "claim", "run-8", api, sleep=terminate)  # fmt: skip
        assert exited.value.code == 143
        assert [c[0] for c in api.calls] == ["create", "get", "delete"]
        assert signal.getsignal(signal.SIGTERM) is fallback  # the step's handler is gone again
    finally:
        signal.signal(signal.SIGTERM, previous)
