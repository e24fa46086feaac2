"""moon3.registry against a real ``mlflow server`` (sqlite backend, loopback): register, gate, promote, rollback,
contract refusal and racing promotions."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import yaml
from conftest import mlflow_server_at

from moon3.config import load_config
from moon3.model.contract import ContractError
from moon3.registry import promote as P
from moon3.registry.promote import GateFailed, PromotionConflict, PromotionError, evaluate_gate, promote, rollback
from moon3.registry.register import CHALLENGER, CHAMPION, client_for, data_version, register_model

BIN = Path(sys.executable).parent
pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def mlflow_url(tmp_path_factory):
    """A real MLflow server on a free loopback port: sqlite store, artifacts served by the server."""
    with mlflow_server_at(tmp_path_factory.mktemp("mlflow-server"), serve_artifacts=True) as url:
        yield url


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, mini_dataset) -> Path:
    from moon3.model.embedder import Moon3Embedder
    from moon3.model.items import catalog_texts

    out = tmp_path_factory.mktemp("registry-model") / "model"
    Moon3Embedder.from_config(load_config(None).model, catalog_texts(mini_dataset)).save_pretrained(out)
    return out


@pytest.fixture
def cfg(mlflow_url):
    """Defaults with a fresh registered model name per test and the server's URI."""
    c = load_config(None)
    c.promotion.model_name = f"t-{uuid.uuid4().hex[:8]}"
    c.promotion.tracking_uri = mlflow_url
    c.promotion.min_values = {"trained/retrieval/text_to_mm/recall_at_10": 0.3}
    c.promotion.max_regression = {
        "trained/retrieval/text_to_mm/recall_at_10": 0.02,
        "trained/summary/retrieval_mean_recall_at_10": 0.02,
    }
    c.promotion.reasoning_metrics = ["retrieval/text_to_mm/recall_at_10"]
    c.promotion.reasoning_margin = 0.02
    return c


def metrics(recall: float, n: int = 242, summary: float | None = None, off: tuple[float, float] | None = None):
    """A metrics.json like `moon3 evaluate` writes; ``off`` = (lo, hi) of reasoning_off - trained."""
    data = {
        "trained": {
            "retrieval": {"text_to_mm": {"recall_at_10": recall, "mrr": recall / 2, "n": n}},
            "summary": {"retrieval_mean_recall_at_10": recall if summary is None else summary},
        },
        "deltas": {},
    }
    if off is not None:
        entry = {"delta": sum(off) / 2, "lo": off[0], "hi": off[1]}
        data["deltas"]["reasoning_off"] = {"retrieval/text_to_mm": {"recall_at_10": entry}}
    return data


def register(cfg, model_dir, tmp_path, m, **kw):
    file = tmp_path / f"metrics-{uuid.uuid4().hex[:6]}.json"
    file.write_text(json.dumps(m))
    return register_model(model_dir, file, cfg, client=client_for(cfg.promotion.tracking_uri), **kw).version


def aliases(cfg):
    rm = client_for(cfg.promotion.tracking_uri).get_registered_model(cfg.promotion.model_name)
    return {k: str(v) for k, v in rm.aliases.items()}


def test_register_sets_challenger_and_lineage(cfg, model_dir, tmp_path):
    client = client_for(cfg.promotion.tracking_uri)
    v = register(cfg, model_dir, tmp_path, metrics(0.5), pipeline_run_id="run-42")
    assert aliases(cfg) == {CHALLENGER: v}
    mv = client.get_model_version(cfg.promotion.model_name, v)
    assert mv.tags["pipeline_run_id"] == "run-42" and len(mv.tags["params_hash"]) == 12
    assert mv.tags["data_version"] == data_version("dvc.lock") and "git_sha" in mv.tags
    run = client.get_run(mv.run_id)  # version -> run -> metrics, data hash
    assert run.data.metrics["trained/retrieval/text_to_mm/recall_at_10"] == 0.5
    assert run.data.tags["data_version"] == mv.tags["data_version"]
    files = {f.path for f in client.list_artifacts(mv.run_id, "model")}
    assert "model/moon3_config.json" in files
    assert P.version_contract(client, cfg.promotion.model_name, v).embed_dim == cfg.model.embed_dim
    # ... and back: data hash -> versions
    found = client.search_model_versions(f"name='{cfg.promotion.model_name}' and tags.pipeline_run_id='run-42'")
    assert [str(x.version) for x in found] == [v]


def test_data_version_reads_dvc_lock(tmp_path):
    lock = tmp_path / "dvc.lock"
    lock.write_text("schema: '2.0'\nstages:\n  prepare:\n    outs:\n    - path: data/validated\n      md5: abc.dir\n")
    assert data_version(lock) == "abc.dir" and data_version(tmp_path / "none.lock") == ""


def test_first_model_needs_the_minimums(cfg, model_dir, tmp_path):
    client = client_for(cfg.promotion.tracking_uri)
    register(cfg, model_dir, tmp_path, metrics(0.2))  # below the 0.3 floor
    with pytest.raises(GateFailed) as err:
        promote(cfg, client)
    assert "FAIL" in str(err.value) and "| metric | champion | challenger | limit | verdict |" in str(err.value)
    assert CHAMPION not in aliases(cfg)
    v2 = register(cfg, model_dir, tmp_path, metrics(0.5))
    result = promote(cfg, client)
    assert result.promoted and result.previous is None and aliases(cfg)[CHAMPION] == v2


def test_gate_pass_moves_champion_and_records_history(cfg, model_dir, tmp_path):
    client = client_for(cfg.promotion.tracking_uri)
    name = cfg.promotion.model_name
    v1 = register(cfg, model_dir, tmp_path, metrics(0.5))
    promote(cfg, client)
    v2 = register(cfg, model_dir, tmp_path, metrics(0.49))  # a small drop, within noise
    dry = promote(cfg, client, dry_run=True)  # what CI runs on a pull request: the gate only
    assert not dry.promoted and P.passed(dry.rows) and aliases(cfg)[CHAMPION] == v1
    result = promote(cfg, client)
    assert result.promoted and result.previous == v1 and aliases(cfg)[CHAMPION] == v2
    assert client.get_model_version(name, v2).tags["previous_champion"] == v1
    tags = client.get_registered_model(name).tags
    assert tags["champion_history"] == f"{v1},{v2}"
    assert [e["action"] for e in json.loads(tags["champion_events"])] == ["promote", "promote"]
    assert not promote(cfg, client).promoted  # the challenger is already champion


@pytest.mark.parametrize(
    ("first", "second", "rule"),
    [
        (metrics(0.31, n=20), metrics(0.29, n=20, summary=0.31), "minimum"),  # below the floor, drop within noise
        (metrics(0.6, n=2000), metrics(0.4, n=2000, summary=0.6), "regression"),  # interval below the margin
        (metrics(0.6), metrics(0.6, off=(0.05, 0.12)), "reasoning"),  # reasoning_off wins beyond the margin
    ],
)
def test_gate_fails_on_each_kind_of_regression(cfg, model_dir, tmp_path, first, second, rule):
    client = client_for(cfg.promotion.tracking_uri)
    v1 = register(cfg, model_dir, tmp_path, first)
    promote(cfg, client)
    register(cfg, model_dir, tmp_path, second)
    with pytest.raises(GateFailed) as err:
        promote(cfg, client)
    failed = {r.rule for r in err.value.rows if r.verdict == P.FAIL}
    assert failed == {rule}
    assert aliases(cfg)[CHAMPION] == v1


def test_regression_counts_only_beyond_noise(cfg):
    pcfg = cfg.promotion
    # 0.60 -> 0.55 on 242 queries: the interval reaches above -0.02 -> noise, passes (a summary has no n: point)
    rows = evaluate_gate(metrics(0.55, summary=0.6), metrics(0.60), pcfg)
    assert P.passed(rows)
    # same drop on 20000 items: the whole interval is below -0.02 -> fails
    rows = evaluate_gate(metrics(0.55, n=20000, summary=0.6), metrics(0.60, n=20000), pcfg)
    assert [r.metric for r in rows if r.verdict == P.FAIL] == ["trained/retrieval/text_to_mm/recall_at_10"]
    # reasoning_off within the margin, and a model without a reasoning_off evaluation, pass
    assert P.passed(evaluate_gate(metrics(0.6, off=(0.01, 0.08)), None, pcfg))
    assert [r.verdict for r in evaluate_gate(metrics(0.6), None, pcfg) if r.rule == "reasoning"] == [P.NA]


def test_contract_mismatch_is_refused(cfg, model_dir, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(model_dir, other)
    payload = json.loads((other / "moon3_config.json").read_text())
    payload["contract"]["embed_dim"] = cfg.model.embed_dim * 2
    (other / "moon3_config.json").write_text(json.dumps(payload))
    register(cfg, other, tmp_path, metrics(0.9))
    with pytest.raises(ContractError, match="embed_dim"):
        promote(cfg, client_for(cfg.promotion.tracking_uri))
    assert CHAMPION not in aliases(cfg)


def test_rollback_moves_champion_back_and_keeps_history(cfg, model_dir, tmp_path):
    client = client_for(cfg.promotion.tracking_uri)
    name = cfg.promotion.model_name
    v1 = register(cfg, model_dir, tmp_path, metrics(0.5))
    promote(cfg, client)
    with pytest.raises(PromotionError, match="first champion"):
        rollback(cfg, client)
    v2 = register(cfg, model_dir, tmp_path, metrics(0.5))
    promote(cfg, client)
    assert rollback(cfg, client) == (v2, v1)
    assert aliases(cfg)[CHAMPION] == v1
    assert "rolled_back_at" in client.get_model_version(name, v2).tags
    tags = client.get_registered_model(name).tags
    assert tags["champion_history"] == v1
    assert [e["action"] for e in json.loads(tags["champion_events"])] == ["promote", "promote", "rollback"]


# Loaded by the promote subprocesses of the race test (PYTHONPATH): every process waits, after its gate and before
# taking the lock, until all have got there, so each round is a real conflict. Test code, not library code.
_RACE_HOOK = """
import os
import time
from pathlib import Path

barrier = os.environ.get("MOON3_RACE_BARRIER")
if barrier:
    import moon3.registry.promote as P

    real = P._acquire_lock

    def _wait_then_lock(*args, **kwargs):
        folder = Path(barrier)
        (folder / str(os.getpid())).touch()
        deadline = time.time() + 120
        while len(list(folder.iterdir())) < int(os.environ["MOON3_RACE_N"]) and time.time() < deadline:
            time.sleep(0.02)
        return real(*args, **kwargs)

    P._acquire_lock = _wait_then_lock
"""


def _promote_race(cfg, tmp_path: Path, versions: list[str], barrier: bool) -> list[tuple[str, int, str]]:
    """Run one `moon3 promote --version V` subprocess per version at once; ``(version, returncode, output)``."""
    from conftest import subprocess_env

    hook = tmp_path / "hook"
    hook.mkdir(exist_ok=True)
    (hook / "sitecustomize.py").write_text(_RACE_HOOK)
    env = subprocess_env(tmp_path)
    if barrier:
        folder = tmp_path / f"barrier-{uuid.uuid4().hex[:6]}"
        folder.mkdir()
        env.update(PYTHONPATH=str(hook), MOON3_RACE_BARRIER=str(folder), MOON3_RACE_N=str(len(versions)))
    params = tmp_path / "params.yaml"  # the fixture's gate rules, not the repository's
    params.write_text(yaml.safe_dump(cfg.to_dict()))
    procs = []
    for v in versions:
        args = [str(BIN / "moon3"), "promote", "--version", v, "--params", str(params),
                "--set", f"promotion.render_dir={tmp_path / ('render-' + v)}"]  # fmt: skip
        procs.append((v, subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)))
    return [(v, p.wait(timeout=300), p.stdout.read()) for v, p in procs]


def test_promotions_racing_in_separate_processes(cfg, model_dir, tmp_path):
    """`moon3 promote` processes racing on one server: exactly one wins a conflict, the registry stays consistent."""
    client = client_for(cfg.promotion.tracking_uri)
    name = cfg.promotion.model_name
    v1 = register(cfg, model_dir, tmp_path, metrics(0.5))
    promote(cfg, client)
    champions = [v1]
    rounds = [(True, 2), (False, 3)]  # a forced conflict (all gated before any locks), then a free-for-all
    for barrier, n in rounds:
        versions = [register(cfg, model_dir, tmp_path, metrics(0.5 + 0.005 * i)) for i in range(n)]
        outcomes = _promote_race(cfg, tmp_path, versions, barrier)
        wins = [v for v, rc, output in outcomes if rc == 0]
        losses = [(v, output) for v, rc, output in outcomes if rc != 0]
        for _v, output in losses:
            assert "nothing was changed" in output, output[-2000:]
        for v in wins:
            assert f"promoted v{v} to champion" in next(o for x, _, o in outcomes if x == v)
        assert wins, outcomes
        if barrier:
            assert len(wins) == 1 and len(losses) == n - 1, outcomes
        # Serialised winners (a process that started after another finished gates against the new champion and
        # may pass too) all appear in the history, once each, in order; the last is champion.
        history = client.get_registered_model(name).tags["champion_history"].split(",")
        assert history[: len(champions)] == champions and sorted(history[len(champions) :]) == sorted(wins)
        champions = history
        assert aliases(cfg)[CHAMPION] == history[-1] and len(set(history)) == len(history)
        events = json.loads(client.get_registered_model(name).tags["champion_events"])
        assert [e["to"] for e in events] == history and [e["from"] for e in events] == [None, *history[:-1]]
        for v, _ in losses:
            assert "promoted_at" not in client.get_model_version(name, v).tags
        assert client.search_registered_models(f"name LIKE '{name}-promotion-lock%'") == []  # lock released


def test_cli_register_promote_rollback(cfg, model_dir, tmp_path):
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}
    sets = ["--set", f"promotion.model_name={cfg.promotion.model_name}",
            "--set", f"promotion.tracking_uri={cfg.promotion.tracking_uri}"]  # fmt: skip

    def moon3(*args):
        return subprocess.run([str(BIN / "moon3"), *args, *sets], capture_output=True, text=True, env=env)

    file = tmp_path / "metrics.json"
    file.write_text(json.dumps(metrics(0.1)))
    result = moon3("register", str(model_dir), "--metrics", str(file), "--pipeline-run-id", "cli")
    assert result.returncode == 0 and "as challenger" in result.stdout, result.stderr[-2000:]
    result = moon3("promote", "--table", str(tmp_path / "gate.md"))
    assert result.returncode == 1, result.stderr[-2000:]
    assert "| metric | champion | challenger | limit | verdict |" in result.stdout and "FAIL" in result.stdout
    assert "FAIL" in (tmp_path / "gate.md").read_text() and CHAMPION not in aliases(cfg)
    result = moon3("rollback")
    assert result.returncode == 1 and "no 'champion'" in result.stderr


# --- GitHub workflows ------------------------------------------------------------------------------------------
REPO = Path(__file__).resolve().parents[1]
WORKFLOWS = sorted((REPO / ".github" / "workflows").glob("*.yml"))


def _make_targets() -> dict[str, list[str]]:
    """Makefile target -> its recipe lines."""
    import re

    targets: dict[str, list[str]] = {}
    current = None
    for line in (REPO / "Makefile").read_text().splitlines():
        if match := re.match(r"^([A-Za-z][\w-]*)\s*:(?!=)", line):
            current = match.group(1)
            targets[current] = []
        elif line.startswith("\t") and current:
            targets[current].append(line.strip())
        elif line and not line.startswith("#"):
            current = None
    return targets


def _cli_commands() -> set[str]:
    import typer

    from moon3.cli import app

    return set(typer.main.get_command(app).commands)


def test_workflows_validate_against_the_github_schema():
    assert {p.name for p in WORKFLOWS} >= {"ci.yml", "promote.yml"}
    result = subprocess.run(
        [str(BIN / "check-jsonschema"), "--builtin-schema", "vendor.github-workflows", *map(str, WORKFLOWS)],
        capture_output=True, text=True,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr


def test_workflow_commands_exist_in_the_makefile_or_the_cli():
    import shlex

    import yaml

    targets, commands = _make_targets(), _cli_commands()
    assert {"register", "promote", "rollback"} <= commands
    used = set()
    for path in WORKFLOWS:
        wf = yaml.safe_load(path.read_text())
        for job in wf["jobs"].values():
            for step in job["steps"]:
                for line in filter(None, (x.strip() for x in step.get("run", "").splitlines())):
                    argv = shlex.split(line)
                    if argv[0] == "make":
                        names = [a for a in argv[1:] if "=" not in a and not a.startswith("-")]
                        assert names and set(names) <= set(targets), f"{path.name}: {line}"
                        used.update(names)
                    else:
                        assert argv[0] == "moon3" and argv[1] in commands, f"{path.name}: {line} is not make/moon3"
    assert {"test", "gate", "promote"} <= used
    for target in used:  # and every moon3 command those targets run exists
        for line in targets[target]:
            if "/moon3 " in line:
                assert line.split("/moon3 ", 1)[1].split()[0] in commands, f"make {target}: {line}"


def test_promote_workflow_triggers_and_secrets():
    import re

    import yaml

    wf = yaml.safe_load((REPO / ".github" / "workflows" / "promote.yml").read_text())
    on = wf.get("on", wf.get(True))  # YAML 1.1 reads `on` as true
    assert set(on["pull_request"]["paths"]) == {"params.yaml", "dvc.lock", "moon3/**"}
    assert on["push"]["branches"] == ["main"]
    for key, value in wf["env"].items():
        if key.startswith("MLFLOW_"):
            assert re.fullmatch(r"\$\{\{ secrets\.[A-Z_]+ \}\}", value), key
    text = "\n".join(p.read_text() for p in WORKFLOWS)
    no_expressions = re.sub(r"\$\{\{[^}]*\}\}", "", text)  # a literal credential would survive this
    assert not re.search(r"(?i)(password|token|secret)\w*[ \t]*[:=][ \t]*['\"]?[A-Za-z0-9]", no_expressions)


def test_a_held_lock_refuses_and_a_stale_one_is_broken(cfg, model_dir, tmp_path):
    client = client_for(cfg.promotion.tracking_uri)
    lock = f"{cfg.promotion.model_name}-promotion-lock"
    register(cfg, model_dir, tmp_path, metrics(0.5))
    client.create_registered_model(lock, tags={"holder": "other", "acquired_at": f"{time.time():.3f}"})
    with pytest.raises(PromotionConflict, match="holds the registry lock"):
        promote(cfg, client)
    assert CHAMPION not in aliases(cfg)
    client.set_registered_model_tag(lock, "acquired_at", f"{time.time() - 2 * cfg.promotion.lock_timeout_s:.3f}")
    assert promote(cfg, client).promoted
    assert client.search_registered_models(f"name LIKE '{lock}%'") == []


# --- rendering on promotion, lineage, KFP steps -----------------------------------------------------------------
def kfp_params(cfg, as_yaml: bool = False):
    """The pipeline's ``params`` as KFP hands it over: a struct with every number a float, or a YAML string."""
    from moon3.pipelines.params import pipeline_params

    def floats(x):
        if isinstance(x, dict):
            return {k: floats(v) for k, v in x.items()}
        if isinstance(x, list):
            return [floats(v) for v in x]
        return float(x) if isinstance(x, int) and not isinstance(x, bool) else x

    params = pipeline_params(cfg)
    return yaml.safe_dump(params) if as_yaml else floats(params)


def write_metrics(tmp_path, m) -> Path:
    folder = tmp_path / f"details-{uuid.uuid4().hex[:6]}"
    folder.mkdir()
    (folder / "metrics.json").write_text(json.dumps(m))
    return folder


def test_register_takes_an_explicit_data_version(cfg, model_dir, tmp_path):
    client = client_for(cfg.promotion.tracking_uri)
    v = register(cfg, model_dir, tmp_path, metrics(0.5), data_version="sha256:feedbeef")
    mv = client.get_model_version(cfg.promotion.model_name, v)
    assert mv.tags["data_version"] == "sha256:feedbeef" == client.get_run(mv.run_id).data.tags["data_version"]
    lock = tmp_path / "dvc.lock"
    lock.write_text("stages:\n  validate:\n    outs:\n    - path: data/validated\n      md5: fromlock.dir\n")
    v2 = register(cfg, model_dir, tmp_path, metrics(0.5), lock_file=lock)  # no argument: dvc.lock's md5
    assert client.get_model_version(cfg.promotion.model_name, v2).tags["data_version"] == "fromlock.dir"


def test_steps_gate_promote_render_canary_and_lineage_both_ways(cfg, model_dir, tmp_path):
    """register/gate steps (params as a float struct and as YAML): a failed gate returns passed=False; passes
    render the first champion at 100 % and the next as a 10 % canary, annotated; lineage walks both ways."""
    from moon3.registry.lineage import LineageError, data_lineage, manifest_lineage, version_lineage
    from moon3.registry.step import gate_step, register_step
    from moon3.serve.manifests import REGISTRY_MODEL, REGISTRY_RUN_ID, REGISTRY_VERSION, RegistryRef, round_trip

    client = client_for(cfg.promotion.tracking_uri)
    name = cfg.promotion.model_name
    struct, text = kfp_params(cfg), kfp_params(cfg, as_yaml=True)
    low = register_step(struct, [], str(model_dir), str(write_metrics(tmp_path, metrics(0.2))), "pr-1", "fp-1")
    failed = gate_step(text, [], low["version"], out_dir=str(tmp_path / "r0"))
    assert failed["passed"] is False and failed["promoted"] is False and failed["rendered"] is None
    assert "| FAIL |" in failed["table"] and "failed the gate" in failed["summary"] and CHAMPION not in aliases(cfg)
    assert not (tmp_path / "r0").exists()

    renders = {}
    for i, recall in enumerate((0.5, 0.49), start=1):
        reg = register_step(text, [], str(model_dir), str(write_metrics(tmp_path, metrics(recall))), f"pr-{i}", "fp-2")
        out = gate_step(struct, ["promotion.canary_traffic_percent=10"], "", out_dir=str(tmp_path / f"r{i}"))
        assert out["passed"] and out["promoted"] and out["version"] == reg["version"], out
        renders[reg["version"]] = (reg, out)
    (v1, (reg1, first)), (v2, (reg2, second)) = renders.items()
    assert first["rendered"]["canary_traffic_percent"] == 100 and first["rendered"]["previous"] is None
    assert second["rendered"]["canary_traffic_percent"] == 10 and second["rendered"]["previous"] == v1
    assert "10%" in second["summary"] and aliases(cfg)[CHAMPION] == v2
    for v, folder, canary in ((v1, tmp_path / "r1", None), (v2, tmp_path / "r2", 10)):
        runtime, isvc = yaml.safe_load_all((folder / "manifests.yaml").read_text())
        assert [round_trip(runtime), round_trip(isvc)] == [runtime, isvc]  # through KServe's models, unchanged
        mv = client.get_model_version(name, v)
        predictor = isvc["spec"]["predictor"]
        assert predictor["model"]["storageUri"] == mv.source and mv.source.endswith("/model")
        assert predictor.get("canaryTrafficPercent") == canary
        want = {REGISTRY_MODEL: name, REGISTRY_VERSION: v, REGISTRY_RUN_ID: mv.run_id}
        for meta in (isvc["metadata"], predictor):
            assert want.items() <= meta["annotations"].items() and want.items() <= meta["labels"].items()
        assert RegistryRef.from_metadata(isvc["metadata"]) == RegistryRef(name, v, mv.run_id)
        promotion = json.loads((folder / "promotion.json").read_text())
        assert promotion["version"] == v and promotion["isvc"] == "moon3/moon3"
        assert mv.tags["served_isvc"] == "moon3/moon3" and mv.tags["served_state"] == "rendered"

    # served revision -> version -> run -> data hash
    forward = manifest_lineage(client, tmp_path / "r2" / "manifests.yaml")
    assert forward["isvc"] == "moon3/moon3" and forward["version"] == v2 and forward["run_id"] == reg2["run_id"]
    assert forward["data_version"] == "fp-2" and forward["pipeline_run_id"] == "pr-2"
    assert forward["canary_traffic_percent"] == 10 and forward["storage_matches_source"]
    assert CHAMPION in forward["aliases"] and len(forward["params_hash"]) == 12 and "git_sha" in forward
    # the same from `kubectl get isvc -o yaml` (a List with the live status)
    live = list(yaml.safe_load_all((tmp_path / "r1" / "manifests.yaml").read_text()))[1]
    live["status"] = {"components": {"predictor": {"latestReadyRevision": "moon3-predictor-00001"}}}
    listed = manifest_lineage(client, yaml.safe_dump({"apiVersion": "v1", "kind": "List", "items": [live]}))
    assert listed["version"] == v1 and listed["latest_ready_revision"] == "moon3-predictor-00001"
    # ... and back: data hash -> versions -> where each is served
    back = data_lineage(client, name, "fp-2")
    assert [(x["version"], x["served_isvc"]) for x in back] == [(v1, "moon3/moon3"), (v2, "moon3/moon3")]
    assert version_lineage(client, name, CHAMPION)["version"] == v2
    assert version_lineage(client, name, v2)["previous_champion"] == v1
    # broken links are refused, never guessed
    live["metadata"]["annotations"][REGISTRY_RUN_ID] = live["metadata"]["labels"][REGISTRY_RUN_ID] = "0" * 32
    with pytest.raises(LineageError, match="names run"):
        manifest_lineage(client, live)
    del live["metadata"]["annotations"], live["metadata"]["labels"], live["spec"]["predictor"]["annotations"]
    del live["spec"]["predictor"]["labels"]
    with pytest.raises(LineageError, match="no moon3.io/registry"):
        manifest_lineage(client, live)
    with pytest.raises(LineageError, match="no version or alias"):
        version_lineage(client, name, "999")


def test_gate_step_raises_on_a_contract_mismatch(cfg, model_dir, tmp_path):
    from moon3.registry.step import gate_step

    other = tmp_path / "other"
    shutil.copytree(model_dir, other)
    payload = json.loads((other / "moon3_config.json").read_text())
    payload["contract"]["embed_dim"] = cfg.model.embed_dim * 2
    (other / "moon3_config.json").write_text(json.dumps(payload))
    v = register(cfg, other, tmp_path, metrics(0.9))
    with pytest.raises(ContractError, match="embed_dim"):
        gate_step(kfp_params(cfg), [], v, out_dir=str(tmp_path / "r"))
    from mlflow.exceptions import MlflowException

    empty = cfg.promotion.model_name + "-empty"
    with pytest.raises(MlflowException, match="not found"):  # a registry error fails the task
        gate_step(kfp_params(cfg), [f"promotion.model_name={empty}"], "")
    client_for(cfg.promotion.tracking_uri).create_registered_model(empty)
    with pytest.raises(PromotionError, match="no version given"):
        gate_step(kfp_params(cfg), [f"promotion.model_name={empty}"], "")


class FakeIsvcApi:
    """Stands in for kubernetes.client.CustomObjectsApi (no cluster in tests): keeps created objects."""

    def __init__(self):
        self.objects: dict[str, dict] = {}

    def create_namespaced_custom_object(self, group, version, namespace, plural, body):
        self.objects[plural] = body
        return body


def test_registry_components_and_deploy_with_a_registry_version(cfg, model_dir, tmp_path, monkeypatch):
    """The KFP components' functions with stand-in artifacts; deploy annotates and tags the served version."""
    from kfp import compiler

    import moon3.serve.deploy as deploy_mod
    from moon3.pipelines.compile import REPO as ROOT
    from moon3.pipelines.compile import load_module

    components = load_module(ROOT / "components" / "registry" / "component.py")
    deploy = load_module(ROOT / "components" / "deploy" / "component.py").deploy

    class Art:
        def __init__(self, uri: str = "", path: str = ""):
            self.uri, self.path = uri, path

    params = kfp_params(cfg)
    reg = components.register.python_func(
        params=params, overrides=[], model=Art(path=str(model_dir)),
        eval_details=Art(path=str(write_metrics(tmp_path, metrics(0.5)))), pipeline_run_id="kfp-7",
        data_version="fp-7",
    )  # fmt: skip
    assert reg.version == aliases(cfg)[CHALLENGER] and len(reg.run_id) == 32
    table, rendered = Art(path=str(tmp_path / "table.md")), Art(path=str(tmp_path / "rendered"))
    gate = components.gate.python_func(params=params, overrides=[], version=reg.version, table=table,
                                       rendered=rendered)  # fmt: skip
    assert gate.passed is True and f"promoted v{reg.version}" in gate.summary
    assert "| verdict |" in (tmp_path / "table.md").read_text() and (tmp_path / "rendered" / "manifests.yaml").exists()
    low = register(cfg, model_dir, tmp_path, metrics(0.1))
    gate = components.gate.python_func(params=params, overrides=[], version=low, table=table, rendered=rendered)
    assert gate.passed is False and "champion unchanged" in gate.summary and aliases(cfg)[CHAMPION] == reg.version

    api = FakeIsvcApi()
    monkeypatch.setattr(deploy_mod, "make_api", lambda context=None: api)
    summary = deploy.python_func(params=params, overrides=[], model=Art(uri="gs://b/models/v7"),
                                 manifests=Art(path=str(tmp_path / "deployed")), registry_version=CHAMPION)  # fmt: skip
    assert f"v{reg.version} of {cfg.promotion.model_name}" in summary
    isvc = api.objects["inferenceservices"]
    assert isvc["metadata"]["annotations"]["moon3.io/registry-version"] == reg.version
    assert isvc["spec"]["predictor"]["model"]["storageUri"] == "gs://b/models/v7"
    tags = client_for(cfg.promotion.tracking_uri).get_model_version(cfg.promotion.model_name, reg.version).tags
    assert tags["served_state"] == "applied" and tags["served_isvc"] == "moon3/moon3"
    for component in (components.register, components.gate, deploy):
        compiler.Compiler().compile(component, str(tmp_path / "c.yaml"))
        assert "moon3." in (tmp_path / "c.yaml").read_text()
    # The CLI: `moon3 deploy --registry-version champion` serves the version's source with its annotations.
    from typer.testing import CliRunner

    from moon3.cli import app

    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(cfg.to_dict()))
    result = CliRunner().invoke(app, ["deploy", "--params", str(params_file), "--dry-run", "--registry-version",
                                      CHAMPION])  # fmt: skip
    assert result.exit_code == 0, result.output
    docs = [d for d in yaml.safe_load_all(result.output) if d and d["kind"] == "InferenceService"]
    version = client_for(cfg.promotion.tracking_uri).get_model_version(cfg.promotion.model_name, reg.version)
    assert docs[0]["metadata"]["labels"]["moon3.io/registry-version"] == reg.version
    assert docs[0]["spec"]["predictor"]["model"]["storageUri"] == version.source
    missing = CliRunner().invoke(app, ["deploy", "--params", str(params_file), "--dry-run", "--registry-version", "99"])
    assert missing.exit_code == 2 and "99" in missing.output


def test_cli_promote_renders_and_lineage(cfg, model_dir, tmp_path):
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}
    sets = ["--set", f"promotion.model_name={cfg.promotion.model_name}",
            "--set", f"promotion.tracking_uri={cfg.promotion.tracking_uri}",
            "--set", f"promotion.render_dir={tmp_path / 'promo'}"]  # fmt: skip

    def moon3(*args):
        return subprocess.run([str(BIN / "moon3"), *args, *sets], capture_output=True, text=True, env=env)

    file = tmp_path / "metrics.json"
    file.write_text(json.dumps(metrics(0.5)))
    result = moon3("register", str(model_dir), "--metrics", str(file), "--data-version", "fp-cli")
    assert result.returncode == 0, result.stderr[-2000:]
    result = moon3("promote")
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"{tmp_path / 'promo' / 'manifests.yaml'}" in result.stdout and "at 100% traffic" in result.stdout
    assert "storageUri" in result.stderr  # mlflow-artifacts: is not a URI KServe fetches: warned
    result = moon3("lineage", "--manifest", str(tmp_path / "promo" / "manifests.yaml"), "--json")
    assert result.returncode == 0, result.stderr[-2000:]
    info = json.loads(result.stdout)
    assert info["data_version"] == "fp-cli" and info["aliases"] == [CHALLENGER, CHAMPION]
    assert info["served_isvc"] == "moon3/moon3" and info["version"] == aliases(cfg)[CHAMPION]
    result = moon3("lineage", "--data-version", "fp-cli")
    assert result.returncode == 0 and f"v{info['version']} [challenger, champion]" in result.stdout, result.stderr
    assert "data_version: fp-cli" in result.stdout and "served_isvc: moon3/moon3" in result.stdout
    assert moon3("lineage").returncode == 2
