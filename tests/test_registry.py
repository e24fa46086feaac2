"""moon3.registry against a real ``mlflow server`` (sqlite backend, loopback): register, gate, promote, rollback,
contract refusal and racing promotions."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
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


def test_two_promotions_racing(cfg, model_dir, tmp_path, monkeypatch):
    client = client_for(cfg.promotion.tracking_uri)
    name = cfg.promotion.model_name
    v1 = register(cfg, model_dir, tmp_path, metrics(0.5))
    promote(cfg, client)
    va = register(cfg, model_dir, tmp_path, metrics(0.55))
    vb = register(cfg, model_dir, tmp_path, metrics(0.56))
    barrier = threading.Barrier(2, timeout=60)
    real = P._acquire_lock

    def both_gated_then_lock(*args, **kwargs):
        barrier.wait()  # both read champion=v1 and passed the gate before either takes the lock
        return real(*args, **kwargs)

    monkeypatch.setattr(P, "_acquire_lock", both_gated_then_lock)
    outcomes: dict[str, object] = {}

    def run(version):
        try:
            outcomes[version] = promote(cfg, client_for(cfg.promotion.tracking_uri), version)
        except Exception as err:  # noqa: BLE001 - recorded for the assertions
            outcomes[version] = err

    threads = [threading.Thread(target=run, args=(v,)) for v in (va, vb)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    wins = [v for v, o in outcomes.items() if isinstance(o, P.PromotionResult) and o.promoted]
    losses = [o for o in outcomes.values() if isinstance(o, PromotionConflict)]
    assert len(wins) == 1 and len(losses) == 1, outcomes
    assert "nothing was changed" in str(losses[0])
    assert aliases(cfg)[CHAMPION] == wins[0]
    tags = client.get_registered_model(name).tags
    assert tags["champion_history"] == f"{v1},{wins[0]}"
    assert len(json.loads(tags["champion_events"])) == 2
    assert client.search_registered_models(f"name='{name}-promotion-lock'") == []  # lock released


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
